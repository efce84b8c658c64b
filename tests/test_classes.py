"""Evaluating on data whose class folders are named, ordered or counted otherwise than the
model's classes: paired by name, ImageNet WordNet id or class index, never by position alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mobilenetv2
from mobilenetv2.cli import main
from mobilenetv2.data import imagenet_synsets, match_classes
from mobilenetv2.weights import imagenet_categories


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def constant_model(path: Path, class_names: list[str], scores: dict[int, float]) -> Path:
    """Weights whose model gives every image the same logits: ``scores`` (index: logit), 0
    elsewhere. Its answers are known whatever the images, so the tests read the pairing."""
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=len(class_names),
                                     small_input=True)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for index, logit in scores.items():
            head.bias[index] = logit
    model.meta.update(class_names=class_names, input_size=[3, 32, 32])
    mobilenetv2.save_weights(model, path)
    return path


def class_folders(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / "val" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(root / "val" / name / f"{i}.png")
    return root


def evaluate(weights: Path, data: Path, capsys, *flags: str) -> dict:
    assert run_cli("eval", "--weights", weights, "--data", data, "--json", *flags) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------------------------
# The pairing rules


def test_the_same_classes_in_the_same_order_need_no_pairing():
    assert match_classes(["a", "b"], 2, ["a", "b"]).indices is None
    assert match_classes(None, 2, ["x", "y"]).indices is None  # no names: by position, as before


def test_classes_pair_by_name_when_reordered_or_fewer():
    assert match_classes(["b", "c", "a"], 3, ["a", "b", "c"]).indices == [2, 0, 1]
    assert match_classes(["cat", "dog", "emu"], 3, ["emu"]).indices == [2]
    match = match_classes(["Cat", "Dog"], 2, ["dog"])
    assert (match.indices, match.how) == ([1], "name, ignoring case")


def test_accented_names_pair_whether_spelt_composed_or_with_combining_accents():
    # A folder copied from a Mac may spell "Écureuil" as E + U+0301 (NFD): the same name,
    # refused as "Écureuil is not a class (it knows Écureuil, ...)".
    composed, combining = "\u00c9cureuil", "E\u0301cureuil"
    for model, data in ((composed, combining), (combining, composed)):
        match = match_classes(["chat", model], 2, ["chat", data])
        assert (match.indices, match.how) == (None, "name")
        assert match_classes(["chat", model, "zèbre"], 3, [data.lower()]).indices == [1]


def test_names_equal_ignoring_case_twice_in_the_model_do_not_pair():
    with pytest.raises(ValueError, match="1 of the 1 classes of"):
        match_classes(["Cat", "cat", "dog"], 3, ["CAT"])


def test_imagenet_folders_named_by_wordnet_id_pair_with_imagenet_classes():
    synsets = imagenet_synsets()
    assert synsets == sorted(synsets) and len(set(synsets)) == 1000
    categories = imagenet_categories()
    # ILSVRC-2012's order: tench (n01440764) first, toilet tissue (n15075141) last.
    assert (synsets[0], categories[0]) == ("n01440764", "tench")
    assert (synsets[1], categories[1]) == ("n01443537", "goldfish")
    assert (synsets[999], categories[999]) == ("n15075141", "toilet tissue")
    full = match_classes(categories, 1000, synsets)
    assert (full.indices, full.how) == (None, "WordNet id")  # the whole of ILSVRC-2012's val/
    subset = match_classes(categories, 1000, ["n01443537", "n15075141"])
    assert subset.indices == [1, 999]
    # Only an ImageNet-1k model's classes are WordNet ids.
    with pytest.raises(ValueError, match="not classes of"):
        match_classes([f"c{i}" for i in range(1000)], 1000, ["n01443537"])


def test_the_bundled_synsets_are_timms():
    timm = pytest.importorskip("timm")
    listed = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    assert imagenet_synsets() == listed.read_text().split()


def test_folders_named_by_class_index_pair_by_index():
    # ImageNetV2's folders are 0 ... 999: sorted as text, folder "10" comes before "2".
    names = [f"class {i}" for i in range(12)]
    match = match_classes(names, 12, ["0", "10", "2"])
    assert (match.indices, match.how) == ([0, 10, 2], "class index")
    assert match_classes(names, 12, sorted(str(i) for i in range(12))).indices == [
        int(n) for n in sorted(str(i) for i in range(12))]


def test_classes_that_pair_with_none_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"2 of the 2 classes of data are not classes of the "
                       r"weights \(kitten, puppy; it knows cat, dog\)"):
        match_classes(["cat", "dog"], 2, ["kitten", "puppy"], data="data")
    with pytest.raises(ValueError, match="has 2 classes but .* has 3"):
        match_classes(["cat", "dog"], 2, ["cat", "dog", "emu"])
    with pytest.raises(ValueError, match="has 2 classes but .* has 1"):
        match_classes(None, 2, ["cat"])


# --------------------------------------------------------------------------------------------
# eval


def test_eval_scores_reordered_class_folders_by_name(tmp_path, capsys):
    # The model's classes are b, c, a (another tool's order); it always answers "b". The
    # folders sort as a, b, c: by position the one "a" image would count as right.
    weights = constant_model(tmp_path / "m.safetensors", ["b", "c", "a"], {0: 5.0})
    data = class_folders(tmp_path / "data", {"a": 1, "b": 2, "c": 1})
    result = evaluate(weights, data, capsys, "--per-class")
    assert result["top1"] == pytest.approx(50.0)
    assert [(r["class"], r["images"], r["top1"]) for r in result["per_class"]] == [
        ("a", 1, 0.0), ("b", 2, 100.0), ("c", 1, 0.0)]  # the data's classes, in its order
    assert result["confusion"] == [[1, 0, 0], [2, 0, 0], [1, 0, 0]]  # columns: b, c, a


def test_eval_on_some_of_imagenets_classes_by_wordnet_id(tmp_path, capsys):
    # An ImageNet-1k model that answers class 5 first, goldfish (1) second, tench (0) third.
    weights = constant_model(tmp_path / "imagenet.safetensors", imagenet_categories(),
                             {5: 9.0, 1: 8.0, 0: 7.0})
    data = class_folders(tmp_path / "imagenette", {"n01440764": 1, "n01443537": 2})
    every = evaluate(weights, data, capsys, "--per-class")
    assert (every["top1"], every["top5"], every["images"]) == (0.0, 100.0, 3)
    assert [r["class"] for r in every["per_class"]] == ["tench", "goldfish"]
    assert [r["confused_with"] for r in every["per_class"]] == [imagenet_categories()[5]] * 2
    assert len(every["confusion"]) == 2 and len(every["confusion"][0]) == 1000
    only = evaluate(weights, data, capsys, "--per-class", "--only-data-classes")
    assert only["top1"] == pytest.approx(200 / 3) and only["top5"] == 100.0
    assert only["confusion"] == [[0, 1], [0, 2]]
    assert [r["class"] for r in only["per_class"]] == ["tench", "goldfish"]
    # The loss over two classes: -log softmax([7, 8]) of the true one, averaged.
    two = torch.tensor([7.0, 8.0]).log_softmax(0)
    assert only["loss"] == pytest.approx(-(two[0] + 2 * two[1]).item() / 3, rel=1e-5)


def flat_imagenet_val(folder: Path, synsets: list[str], csv: Path) -> Path:
    """ILSVRC-2012's val/ as its archive unpacks: ILSVRC2012_val_<n>.JPEG, one per synset,
    their classes in Kaggle's LOC_val_solution.csv (the WordNet id, then a box)."""
    folder.mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for n, synset in enumerate(synsets, 1):
        Image.new("RGB", (32, 32), (10 * n, 0, 0)).save(folder / f"ILSVRC2012_val_{n:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{n:08d},{synset} 1 2 30 31 {synset} 4 5 20 21")
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("\n".join(rows) + "\n")
    return folder


def test_eval_on_imagenets_flat_val_with_kaggles_labels(tmp_path, capsys):
    # Kaggle's download: LOC_val_solution.csv beside ILSVRC/, the images in
    # ILSVRC/Data/CLS-LOC/val/ unsorted. They were read as one class "val" (or refused), where
    # each image is of the class the file gives it.
    synsets = imagenet_synsets()
    weights = constant_model(tmp_path / "imagenet.safetensors", imagenet_categories(), {5: 9.0})
    data = tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC"
    flat_imagenet_val(data / "val", [synsets[5], synsets[0], synsets[5]],
                      tmp_path / "kaggle" / "LOC_val_solution.csv")
    for given in (data, data / "val"):
        result = evaluate(weights, given, capsys, "--per-class")
        assert (result["top1"], result["images"]) == (pytest.approx(200 / 3), 3)
        assert [(r["class"], r["images"]) for r in result["per_class"]] == [
            ("tench", 1), (imagenet_categories()[5], 2)]
    (tmp_path / "kaggle" / "LOC_val_solution.csv").unlink()
    assert run_cli("eval", "--weights", weights, "--data", data) == 2
    err = capsys.readouterr().err
    assert "holds ILSVRC-2012's validation images in one folder" in err
    assert "LOC_val_solution.csv" in err and len(err.strip().splitlines()) == 1


def test_weights_trained_on_wordnet_id_folders_print_imagenets_names(tmp_path, capsys):
    # Trained on ILSVRC-2012's folders (or some of them), the weights name their classes by
    # WordNet id; predict said "n01443537 99.9%" where torchvision's weights say "goldfish".
    synsets = imagenet_synsets()[:3]
    weights = constant_model(tmp_path / "subset.safetensors", synsets, {1: 9.0})
    [item] = mobilenetv2.predict(weights, Image.new("RGB", (32, 32)), top_k=2)
    assert [guess["class"] for guess in item["top_k"]] == ["goldfish", "tench"]
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")  # --probabilities' columns too
    assert run_cli("predict", "--weights", weights, tmp_path / "photo.png", "--probabilities",
                   "--out", tmp_path / "p.csv") == 0
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == (
        "path,class,probability,class_2,probability_2,class_3,probability_3,"
        "tench,goldfish,great white shark,error")
    capsys.readouterr()
    data = class_folders(tmp_path / "val", {"n01443537": 1, "n01440764": 1})
    result = evaluate(weights, data, capsys, "--per-class")  # still paired by the ids
    assert result["top1"] == 50.0
    assert [r["class"] for r in result["per_class"]] == ["tench", "goldfish"]
    assert result["confusion_columns"] == ["tench", "goldfish", "great white shark"]
    # Names that are not all WordNet ids stay as they are.
    other = constant_model(tmp_path / "other.safetensors", [*synsets[:2], "cat"], {1: 9.0})
    [item] = mobilenetv2.predict(other, Image.new("RGB", (32, 32)), top_k=1)
    assert item["top_k"][0]["class"] == synsets[1]


def test_eval_on_folders_named_by_class_index(tmp_path, capsys):
    names = [f"class {i}" for i in range(12)]
    weights = constant_model(tmp_path / "m.safetensors", names, {10: 5.0})
    data = class_folders(tmp_path / "v2", {"0": 1, "10": 2, "2": 1})
    assert evaluate(weights, data, capsys)["top1"] == pytest.approx(50.0)


def test_eval_of_an_onnx_export_pairs_classes_too(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    weights = constant_model(tmp_path / "m.safetensors", ["b", "c", "a"], {0: 5.0})
    assert run_cli("export", "--weights", weights, "--format", "onnx",
                   "--out", tmp_path / "m.onnx") == 0
    capsys.readouterr()
    data = class_folders(tmp_path / "data", {"a": 1, "b": 2, "c": 1})
    assert evaluate(tmp_path / "m.onnx", data, capsys)["top1"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------
# What a review found


def test_a_built_in_dataset_never_pairs_by_class_index(tmp_path, capsys):
    # The digits' classes are called 0 ... 9: read as class indices they would pair digit 0
    # with an ImageNet model's tench and score it, where the data simply is not ImageNet.
    with pytest.raises(ValueError, match="are not classes of .*evaluate on data with the model"):
        match_classes(imagenet_categories(), 1000, [str(d) for d in range(10)], folders=False)
    weights = constant_model(tmp_path / "imagenet.safetensors", imagenet_categories(), {0: 1.0})
    assert run_cli("eval", "--weights", weights, "--data", "digits") == 2
    assert "are not classes of" in capsys.readouterr().err


def test_models_with_numbers_for_class_names_pair_by_name_only():
    # Trained on folders 1 ... 12, its classes sort as text: 1, 10, 11, 12, 2, ...
    names = sorted(str(i) for i in range(1, 13))
    assert match_classes(names, 12, ["5", "7"]).indices == [names.index("5"), names.index("7")]
    with pytest.raises(ValueError, match=r"1 of the 3 classes .* \(0; it knows"):
        match_classes(names, 12, ["0", "5", "7"])


def test_names_pair_exactly_first_and_ignoring_case_only_where_they_must():
    # ImageNet has both "Cardigan" (a corgi) and "cardigan" (the sweater).
    categories = imagenet_categories()
    match = match_classes(categories, 1000, ["Tench", "cardigan"])
    assert match.indices == [0, categories.index("cardigan")]
    assert match.how == "name, ignoring case"
    with pytest.raises(ValueError, match="differ only in case"):
        match_classes(["cat", "dog"], 2, ["Cat", "cat"])


def test_nameless_weights_on_numbered_folders_pair_by_position_with_a_warning(caplog):
    folders = sorted(str(i) for i in range(12))  # 0, 1, 10, 11, 2, ...
    with caplog.at_level("WARNING"):
        assert match_classes(None, 12, folders).indices is None
    assert "as text" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        match_classes(None, 10, [str(i) for i in range(10)])
    assert not caplog.text


def test_eval_of_an_onnx_file_without_class_names_checks_the_count(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=3, small_input=True)
    model.meta.update(class_names=None, input_size=[3, 32, 32])
    mobilenetv2.save_weights(model, tmp_path / "m.safetensors")
    assert run_cli("export", "--weights", tmp_path / "m.safetensors", "--out", tmp_path / "m.onnx") == 0
    capsys.readouterr()
    data = class_folders(tmp_path / "data", {"a": 1, "b": 1, "c": 1, "d": 1})
    assert run_cli("eval", "--weights", tmp_path / "m.onnx", "--data", data, "--per-class") == 2
    assert "has 3 classes but" in capsys.readouterr().err


def test_per_class_json_names_the_confusion_columns(tmp_path, capsys):
    weights = constant_model(tmp_path / "m.safetensors", ["b", "c", "a"], {0: 5.0})
    data = class_folders(tmp_path / "data", {"a": 1, "c": 1})
    result = evaluate(weights, data, capsys, "--per-class")
    assert result["confusion_columns"] == ["b", "c", "a"]
    only = evaluate(weights, data, capsys, "--per-class", "--only-data-classes")
    assert only["confusion_columns"] == ["a", "c"] and only["confusion"] == [[1, 0], [1, 0]]
