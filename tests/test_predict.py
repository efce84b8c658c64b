"""``mobilenetv2 predict`` on many files: --out CSV and JSON Lines, unreadable images among
good ones, worker processes, ONNX weights, interrupted runs and --resume.

A small model trained on the 8x8 digits for a second (``conftest.fit_digits_model``) is saved
as safetensors and exported to ONNX once; the images are a few digits it was not trained on.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_digits_model
from PIL import Image
from sklearn.datasets import load_digits

from mobilenetv2 import runtime, save_weights
from mobilenetv2 import weights as weights_module
from mobilenetv2.cli import main
from mobilenetv2.export import ExportConfig, export_model

IMAGES = 7


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The same trained model as safetensors and as ONNX."""
    root = tmp_path_factory.mktemp("predict")
    model = fit_digits_model(epochs=3)
    save_weights(model, root / "m.safetensors")
    export_model(model, root / "m.onnx", ExportConfig())
    return {"torch": root / "m.safetensors", "onnx": root / "m.onnx"}


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of handwritten digits, 8x8 grayscale PNGs as the model was trained on."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, pixels in enumerate(load_digits().images[-IMAGES:]):
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def predict_json(capsys, *args: object) -> tuple[int, list[dict]]:
    code = run_cli("predict", *args, "--json")
    return code, json.loads(capsys.readouterr().out)["predictions"]


def test_out_csv_and_jsonl_hold_what_json_prints_and_no_partial_file(weights, images, tmp_path,
                                                                      capsys):
    common = ["--weights", weights["torch"], images, "--top-k", "3", "--batch-size", "3"]
    code, expected = predict_json(capsys, *common)
    assert code == 0 and len(expected) == IMAGES
    assert len({item["top_k"][0]["class"] for item in expected}) > 2  # so the order shows

    assert run_cli("predict", *common, "--out", tmp_path / "p.jsonl") == 0
    out = capsys.readouterr().out
    assert out == f"{IMAGES} images classified, 0 unreadable -> {tmp_path / 'p.jsonl'}\n"
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == expected

    assert run_cli("predict", *common) == 0  # text: semicolons, as class names hold commas
    first = expected[0]
    assert capsys.readouterr().out.splitlines()[0] == f"{first['path']}: " + "; ".join(
        f"{p['class']} {100 * p['probability']:.1f}%" for p in first["top_k"])

    assert run_cli("predict", *common, "--out", tmp_path / "p.csv") == 0
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2", "class_3",
                       "probability_3", "error"]
    assert [row[0] for row in rows[1:]] == [item["path"] for item in expected]
    for row, item in zip(rows[1:], expected, strict=True):
        assert row[1:-1:2] == [p["class"] for p in item["top_k"]]
        assert [float(v) for v in row[2:-1:2]] == [p["probability"] for p in item["top_k"]]
        assert row[-1] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.jsonl", "photos"]


def test_an_unreadable_image_among_good_ones_costs_only_its_own_row_and_exits_2(
        weights, images, tmp_path, capsys):
    (images / "notes.png").write_text("not an image")
    (images / "cut.png").write_bytes((images / "0.png").read_bytes()[:60])
    common = ["--weights", weights["torch"], images, "--top-k", "2", "--batch-size", "4"]
    code, items = predict_json(capsys, *common)
    assert code == 2
    bad = {Path(item["path"]).name: item for item in items if "error" in item}
    assert sorted(bad) == ["cut.png", "notes.png"]
    assert all(item["top_k"] == [] and "not a readable image" in item["error"]
               for item in bad.values())
    good = [item for item in items if "error" not in item]
    assert len(good) == IMAGES and all(len(item["top_k"]) == 2 for item in good)

    assert run_cli("predict", *common, "--out", tmp_path / "p.csv") == 2
    captured = capsys.readouterr()
    assert captured.out == f"{IMAGES} images classified, 2 unreadable -> {tmp_path / 'p.csv'}\n"
    assert "Traceback" not in captured.err
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all(line.startswith("warning: ") for line in warnings)
    assert {name for name in bad if any(name in line for line in warnings)} == set(bad)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    assert rows["notes.png"]["class"] == "" and rows["notes.png"]["error"] == bad["notes.png"]["error"]
    assert rows["0.png"]["class"] == good[0]["top_k"][0]["class"] and rows["0.png"]["error"] == ""


def test_files_of_a_folder_that_are_not_images_are_counted_in_one_warning(weights, images,
                                                                            tmp_path, capsys):
    # As train leaves them out: GIFs (torchvision's ImageFolder reads none) and other files.
    Image.open(images / "0.png").save(images / "anim.gif")
    (images / "notes.txt").write_text("not an image")
    (images / "._0.png").write_bytes(b"macOS metadata")  # hidden: neither an image nor counted
    assert run_cli("predict", "--weights", weights["torch"], images, "--out",
                   tmp_path / "p.csv") == 0
    captured = capsys.readouterr()
    assert captured.out == f"{IMAGES} images classified, 0 unreadable -> {tmp_path / 'p.csv'}\n"
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"warning: left out 2 files in {images} that are not images (.jpg, ")
    assert line.endswith(f"e.g. {images / 'anim.gif'}")
    # A GIF named on its own is classified: the user asked for it.
    code, (item,) = predict_json(capsys, "--weights", weights["torch"], images / "anim.gif")
    assert code == 0 and item["top_k"]


def test_an_out_file_of_another_format_is_refused_before_any_work(tmp_path, capsys):
    # Neither the weights nor the images exist: the suffix is checked first.
    assert run_cli("predict", "--weights", tmp_path / "none.safetensors", tmp_path / "none.png",
                   "--out", tmp_path / "p.txt") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert "p.txt" in line and ".csv or .jsonl" in line
    assert list(tmp_path.iterdir()) == []


def test_onnx_weights_honour_batch_size_and_give_the_torch_paths_items(weights, images,
                                                                      monkeypatch, capsys):
    sizes = []
    run = runtime.Predictor.run
    monkeypatch.setattr(runtime.Predictor, "run",
                        lambda self, batch: sizes.append(len(batch)) or run(self, batch))
    code, onnx = predict_json(capsys, "--weights", weights["onnx"], images, "--top-k", "3",
                              "--batch-size", "3")
    assert code == 0 and sizes == [3, 3, 1]
    # ONNX Runtime runs on the CPU here; so does PyTorch, even where a GPU is (TF32 convolutions)
    code, eager = predict_json(capsys, "--weights", weights["torch"], images, "--top-k", "3",
                               "--device", "cpu")
    assert code == 0
    for a, b in zip(onnx, eager, strict=True):
        assert a.keys() == b.keys() == {"path", "top_k"} and a["path"] == b["path"]
        assert [(p["class"], p["index"]) for p in a["top_k"]] == [(p["class"], p["index"])
                                                                 for p in b["top_k"]]
        assert [p["probability"] for p in a["top_k"]] == pytest.approx(
            [p["probability"] for p in b["top_k"]], abs=1e-4)
    # What the runtime's own Predictor.predict gives, batch for batch.
    expected = runtime.Predictor(weights["onnx"]).predict(sorted(images.iterdir()), top_k=3)
    assert [[(p["class"], p["probability"]) for p in item["top_k"]] for item in onnx] == expected


@pytest.mark.parametrize("name", ["m.pt", "model", "m.safetensors"])
def test_an_onnx_file_under_another_name_is_run_as_onnx(name, weights, images, tmp_path,
                                                        capsys):
    # Known by its bytes, as quantize used to write it under any --out name.
    renamed = tmp_path / name
    shutil.copyfile(weights["onnx"], renamed)
    code, expected = predict_json(capsys, "--weights", weights["onnx"], images, "--workers", "0")
    assert code == 0
    code, items = predict_json(capsys, "--weights", renamed, images, "--workers", "0")
    assert code == 0
    assert [item["top_k"] for item in items] == [item["top_k"] for item in expected]
    assert run_cli("eval", "--weights", renamed, "--data", "digits", "--json") == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 50
    # PyTorch weights still go to PyTorch.
    assert not runtime.runs_in_runtime(weights["torch"])


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_both_paths_refuse_an_image_beyond_pillows_pixel_limit(kind, weights, images,
                                                               monkeypatch, capsys):
    # Pillow warns between MAX_IMAGE_PIXELS and twice that (89-179 MP: a 108 MP phone's
    # photo) and refuses beyond; both preprocessings do as Pillow and torchvision do.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("L", (12, 12)).save(images / "large.png")  # 144 pixels: a warning to Pillow
    Image.new("L", (15, 15)).save(images / "bomb.png")  # 225 pixels: refused
    code, items = predict_json(capsys, "--weights", weights[kind], images, "--workers", "0")
    assert code == 2
    (bad,) = [item for item in items if "error" in item]
    assert Path(bad["path"]).name == "bomb.png" and "DecompressionBomb" in bad["error"]
    assert any(Path(item["path"]).name == "large.png" and "error" not in item for item in items)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_worker_processes_give_the_same_predictions_as_this_process(kind, weights, images,
                                                                    capsys):
    (images / "notes.png").write_text("not an image")
    common = ["--weights", weights[kind], images, "--batch-size", "2"]
    code, alone = predict_json(capsys, *common, "--workers", "0")
    assert code == 2
    code, workers = predict_json(capsys, *common, "--workers", "2")
    assert code == 2 and workers == alone


def test_an_interrupted_run_leaves_its_progress_in_the_partial_file(weights, images, tmp_path,
                                                                   monkeypatch, capsys):
    calls = []
    top_classes = runtime.top_classes

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return top_classes(*args, **kwargs)

    monkeypatch.setattr(runtime, "top_classes", interrupted_on_the_second_batch)
    common = ["--weights", weights["torch"], images, "--batch-size", "2", "--workers", "0"]
    assert run_cli("predict", *common, "--out", tmp_path / "p.jsonl") == 130
    assert not (tmp_path / "p.jsonl").exists()
    lines = (tmp_path / "p.jsonl.partial").read_text().splitlines()
    assert [Path(json.loads(line)["path"]).name for line in lines] == ["0.png", "1.png"]
    capsys.readouterr()
    calls.clear()
    assert run_cli("predict", *common) == 130  # text lines are printed batch by batch
    out = capsys.readouterr().out.splitlines()
    assert [Path(line.split(":")[0]).name for line in out] == ["0.png", "1.png"]


# --------------------------------------------------------------------------------------------
# --resume


def interrupted_run(*args: object, batch: int) -> None:
    """predict with ``args``, interrupted (as by Ctrl-C) when the model is on batch ``batch``:
    the batches before it are in the partial file."""
    calls = []
    top_classes = runtime.top_classes

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == batch:
            raise KeyboardInterrupt
        return top_classes(*a, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "top_classes", interrupted)
        assert run_cli("predict", *args) == 130


def counting_batches(monkeypatch) -> list[int]:
    """The sizes of the batches the model classifies from now on."""
    sizes: list[int] = []
    top_classes = runtime.top_classes
    monkeypatch.setattr(runtime, "top_classes",
                        lambda outputs, *a, **kw: sizes.append(len(outputs)) or
                        top_classes(outputs, *a, **kw))
    return sizes


def partial_files(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


@pytest.mark.parametrize("flags", [[], ["--probabilities"]])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_after_an_interruption_gives_the_uninterrupted_file_predicting_only_the_rest(
        suffix, flags, weights, images, tmp_path, monkeypatch, capsys):
    common = ["--weights", weights["torch"], images, "--top-k", "3", "--batch-size", "2",
              "--workers", "0", *flags]
    whole, out = tmp_path / f"whole{suffix}", tmp_path / f"p{suffix}"
    assert run_cli("predict", *common, "--out", whole) == 0
    interrupted_run(*common, "--out", out, batch=3)
    partial, record = partial_files(out)
    assert partial.exists() and record.exists() and not out.exists()
    capsys.readouterr()

    sizes = counting_batches(monkeypatch)
    assert run_cli("predict", *common, "--out", out, "--resume") == 0
    captured = capsys.readouterr()
    assert sizes == [2, 1]  # the 4 images of the first two batches were not classified again
    assert f"resuming {partial}: 4 images done, 3 to predict" in captured.err
    assert captured.out == f"{IMAGES} images classified, 0 unreadable -> {out}\n"
    # The same rows, byte for byte, and here (the same paths) in the same order.
    assert sorted(out.read_bytes().splitlines()) == sorted(whole.read_bytes().splitlines())
    assert out.read_bytes() == whole.read_bytes()
    assert not partial.exists() and not record.exists()


@pytest.mark.parametrize("cut", ["before the line break in its path",
                                 "after the line break in its path", "in its last column"])
def test_resume_drops_a_csv_row_cut_off_mid_write_and_predicts_its_image_again(
        cut, weights, images, tmp_path, monkeypatch, capsys):
    # CSV quotes a path with a comma, quotes or a line break; a line break in quotes does not
    # end the row, so the torn row is found by parsing, not by the last line break.
    (images / "3.png").rename(images / '3, "three"\nlines.png')
    common = ["--weights", weights["torch"], images, "--top-k", "3", "--batch-size", "1",
              "--workers", "0"]
    whole, out = tmp_path / "whole.csv", tmp_path / "p.csv"
    assert run_cli("predict", *common, "--out", whole) == 0
    interrupted_run(*common, "--out", out, batch=4)
    partial, _ = partial_files(out)
    done = partial.read_bytes()
    assert whole.read_bytes().startswith(done)  # header and the first 3 rows
    row = whole.read_bytes()[len(done):]
    row = row[:row.index(b"\r\n") + 2]
    assert row.startswith(b'"') and b'""three""' in row and b"\n" in row[:-2]
    torn = {"before the line break in its path": row[:row.index(b"\n")],
            "after the line break in its path": row[:row.index(b"\n") + 1],
            "in its last column": row[:-4]}[cut]
    partial.write_bytes(done + torn)  # killed while writing row 4
    capsys.readouterr()

    sizes = counting_batches(monkeypatch)
    assert run_cli("predict", *common, "--out", out, "--resume") == 0
    assert "cut off mid-write" in capsys.readouterr().err
    assert len(sizes) == IMAGES - 3
    assert out.read_bytes() == whole.read_bytes()
    with open(out, newline="") as f:
        assert [Path(r["path"]).name for r in csv.DictReader(f)].count('3, "three"\nlines.png') == 1


def test_resume_drops_a_json_line_cut_off_mid_write_and_predicts_its_image_again(
        weights, images, tmp_path, monkeypatch, capsys):
    common = ["--weights", weights["torch"], images, "--batch-size", "1", "--workers", "0"]
    whole, out = tmp_path / "whole.jsonl", tmp_path / "p.jsonl"
    assert run_cli("predict", *common, "--out", whole) == 0
    interrupted_run(*common, "--out", out, batch=3)
    partial, _ = partial_files(out)
    done = partial.read_bytes()
    line = whole.read_bytes()[len(done):].split(b"\n")[0]
    partial.write_bytes(done + line[:len(line) // 2])
    capsys.readouterr()

    sizes = counting_batches(monkeypatch)
    assert run_cli("predict", *common, "--out", out, "--resume") == 0
    assert "cut off mid-write" in capsys.readouterr().err
    assert len(sizes) == IMAGES - 2
    assert out.read_bytes() == whole.read_bytes()


def test_resume_keeps_the_error_rows_of_unreadable_images_and_does_not_retry_them(
        weights, images, tmp_path, monkeypatch, capsys):
    (images / "00-notes.png").write_text("not an image")  # sorted second: in the first batch
    out = tmp_path / "p.csv"
    common = ["--weights", weights["torch"], images, "--batch-size", "2", "--workers", "0",
              "--out", out]
    interrupted_run(*common, batch=2)
    (images / "00-notes.png").write_bytes((images / "0.png").read_bytes())  # readable now
    capsys.readouterr()

    sizes = counting_batches(monkeypatch)
    assert run_cli("predict", *common, "--resume") == 2  # the file it leaves holds an error
    assert capsys.readouterr().out == f"{IMAGES} images classified, 1 unreadable -> {out}\n"
    assert sum(sizes) == IMAGES - 1
    with open(out, newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == IMAGES + 1
    assert rows["00-notes.png"]["class"] == "" and "not a readable image" in rows["00-notes.png"]["error"]


def test_resume_without_a_partial_file_predicts_every_image(weights, images, tmp_path, capsys):
    common = ["--weights", weights["torch"], images, "--workers", "0"]
    assert run_cli("predict", *common, "--out", tmp_path / "whole.jsonl") == 0
    capsys.readouterr()
    assert run_cli("predict", *common, "--out", tmp_path / "p.jsonl", "--resume") == 0
    assert f"no {tmp_path / 'p.jsonl.partial'} to resume" in capsys.readouterr().err
    assert (tmp_path / "p.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "photos", "whole.jsonl"]


def test_resume_of_a_complete_file_predicts_nothing_and_repeats_its_summary(
        weights, images, tmp_path, monkeypatch, capsys):
    (images / "notes.png").write_text("not an image")
    out = tmp_path / "p.csv"
    common = ["--weights", weights["torch"], images, "--workers", "0", "--out", out]
    assert run_cli("predict", *common) == 2
    first = capsys.readouterr().out
    written = out.read_bytes()

    sizes = counting_batches(monkeypatch)
    assert run_cli("predict", *common, "--resume") == 2
    captured = capsys.readouterr()
    assert captured.out == first and f"{out} is complete: nothing to resume" in captured.err
    assert sizes == [] and out.read_bytes() == written

    # Images added since: resuming cannot make the file hold them, so it says so.
    (images / "7.png").write_bytes((images / "0.png").read_bytes())
    assert run_cli("predict", *common, "--resume") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "holds other images than those given" in captured.err
    assert sizes == [] and out.read_bytes() == written


def test_an_out_file_another_program_holds_open_is_tried_again_then_left_for_resume(
        weights, images, tmp_path, monkeypatch, capsys):
    # Windows refuses to replace a file another program has open: a virus scanner for a
    # moment (the rename of FILE.partial to FILE was tried once, and failed the whole run),
    # Excel for as long as it shows the file (the error named FILE.partial, not FILE).
    out = tmp_path / "preds.csv"
    replace, refusals = os.replace, [3]

    def held_open(source, target):
        if Path(target) == out and refusals[0] > 0:
            refusals[0] -= 1
            raise PermissionError(13, "Access is denied", str(source), None, str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", held_open)
    clock = [0.0]  # the retries' second passes at once
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    monkeypatch.setattr("time.sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    monkeypatch.setattr(weights_module.sys, "platform", "win32")
    common = ["--weights", weights["torch"], images, "--workers", "0", "--out", out]
    assert run_cli("predict", *common) == 0  # a scanner's moment: tried again
    assert refusals == [0] and len(out.read_text().splitlines()) == IMAGES + 1
    whole = out.read_bytes()
    out.write_text("what Excel shows\n")
    capsys.readouterr()
    refusals[0] = 10**9  # open in Excel
    assert run_cli("predict", *common) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"mobilenetv2 predict: error: cannot replace {out}: Access is denied (another "
                   f"program may have it open); the predictions are in {out}.partial: close it, "
                   "then run the same command with --resume to finish the file")
    assert out.read_text() == "what Excel shows\n"
    refusals[0] = 0  # closed
    assert run_cli("predict", *common, "--resume") == 0
    assert out.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "preds.csv"]


def _replace_line(number: int, new: bytes, end: bytes = b"\r\n"):
    def spoil(partial: Path) -> None:
        lines = partial.read_bytes().split(end)
        lines[number - 1] = new
        partial.write_bytes(end.join(lines))
    return spoil


# The partial file of an interrupted `--top-k 3 --out p.csv` (or p.jsonl) run, then what is
# changed (the arguments of the resumed run, or the file) and what the refusal says.
REFUSALS = {
    "other weights": ({"weights": "onnx"}, None, "it was written with other weights (m.safetensors"),
    "other top-k": ({"top_k": 2}, None, "holds the top 3 classes and this run the top 2; pass --top-k 3"),
    "other images": ({"folder": "subset"}, None, "holds 4 images not among those given"),
    "no record": ({}, "record", "p.csv.partial.json, which says what wrote it, is missing"),
    "a record nested too deep for JSON": ({}, "nested record", "p.csv.partial.json does not parse"),
    "another header": ({}, _replace_line(1, b"name,label"), "its first line is not the header predict writes"),
    "another top-k in the file": ({}, _replace_line(1, b"path,class,probability,class_2,probability_2,error"),
                                  "its columns hold the top 2 classes and this run the top 3"),
    "a row that does not parse": ({}, _replace_line(2, b"garbage"), "the row on line 2 has 1 column, not 8"),
    "an unclosed quote": ({}, _replace_line(3, b'"unclosed,'), "the row on line 3 has 1 column, not 8"),
    "a JSON line that does not parse": ({"suffix": ".jsonl"}, _replace_line(2, b"{garbage", b"\n"),
                                        "line 2 is not a prediction item"),
    "--tta added": ({"flag": "--tta"}, None, "it was written without --tta; leave out --tta"),
    "--probabilities added": ({"flag": "--probabilities"}, None,
                              "it was written without --probabilities; leave out --probabilities"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_resume_refuses_a_partial_file_it_cannot_continue_in_one_line_touching_nothing(
        case, weights, images, tmp_path, capsys):
    change, spoil, needle = REFUSALS[case]
    out = tmp_path / f"p{change.get('suffix', '.csv')}"
    common = ["--batch-size", "2", "--workers", "0", "--out", out]
    interrupted_run("--weights", weights["torch"], images, "--top-k", "3", *common, batch=3)
    partial, record = partial_files(out)
    if spoil == "record":
        record.unlink()
    elif spoil == "nested record":  # (RecursionError, a traceback)
        record.write_text("[" * 100_000)
    elif spoil is not None:
        spoil(partial)
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "0.png").write_bytes((images / "0.png").read_bytes())
    before = {p: p.read_bytes() for p in (partial, record) if p.exists()}
    capsys.readouterr()

    assert run_cli("predict", "--weights", weights[change.get("weights", "torch")],
                   subset if change.get("folder") == "subset" else images,
                   "--top-k", change.get("top_k", 3), *common, "--resume",
                   *([change["flag"]] if "flag" in change else [])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"mobilenetv2 predict: error: cannot resume {partial}"), line
    assert needle in line, line
    assert {p: p.read_bytes() for p in (partial, record) if p.exists()} == before
    assert not out.exists()


# Review of --resume


def test_resume_of_a_complete_file_refuses_another_top_k_or_missing_weights(
        weights, images, tmp_path, capsys):
    out = tmp_path / "p.csv"
    common = ["--workers", "0", "--out", out]
    assert run_cli("predict", "--weights", weights["torch"], images, "--top-k", "3", *common) == 0
    written = out.read_bytes()
    capsys.readouterr()
    # The file holds the top 3; the user asks for the top 2: 0 and the old file, silently.
    assert run_cli("predict", "--weights", weights["torch"], images, "--top-k", "2", *common,
                   "--resume") == 2
    assert "top 3" in capsys.readouterr().err
    # Weights that do not exist are not even opened.
    assert run_cli("predict", "--weights", tmp_path / "typo.safetensors", images,
                   "--top-k", "3", *common, "--resume") == 2
    capsys.readouterr()
    assert out.read_bytes() == written


def test_a_plain_run_killed_after_writing_its_record_does_not_vouch_for_the_old_rows(
        weights, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.jsonl"
    common = [images, "--batch-size", "2", "--workers", "0", "--out", out]
    interrupted_run("--weights", weights["torch"], *common, batch=3)  # 4 rows of the torch model
    # A new run with other weights (no --resume: start over) dies just after writing its
    # record, before it truncates the old partial file.
    write = weights_module.atomic_write

    def dies_after(*a, **kw):
        write(*a, **kw)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights_module, "atomic_write", dies_after)
        assert run_cli("predict", "--weights", weights["onnx"], *common) == 130
    capsys.readouterr()
    sizes = counting_batches(monkeypatch)
    code = run_cli("predict", "--weights", weights["onnx"], *common, "--resume")
    # Either refused, or every image predicted by the ONNX model; not 4 torch rows kept.
    assert code == 2 or sum(sizes) == IMAGES, f"kept {IMAGES - sum(sizes)} rows of other weights"


def test_resume_drops_a_torn_row_whose_path_holds_a_crlf(weights, images, tmp_path, monkeypatch,
                                                         capsys):
    (images / "3.png").rename(images / "3\r\nthree.png")
    common = ["--weights", weights["torch"], images, "--batch-size", "1", "--workers", "0"]
    whole, out = tmp_path / "whole.csv", tmp_path / "p.csv"
    assert run_cli("predict", *common, "--out", whole) == 0
    interrupted_run(*common, "--out", out, batch=4)
    partial, _ = partial_files(out)
    done = partial.read_bytes()
    row = whole.read_bytes()[len(done):]
    partial.write_bytes(done + row[:row.index(b"\r\n") + 2])  # killed after the path's CRLF
    capsys.readouterr()
    assert run_cli("predict", *common, "--out", out, "--resume") == 0, capsys.readouterr().err
    assert out.read_bytes() == whole.read_bytes()


def test_a_file_name_that_is_not_utf8_is_written_and_resumed_as_its_bytes(weights, images,
                                                                          tmp_path, capsys):
    # Linux file names are bytes: one that is not UTF-8 stopped a --out .csv run at its row.
    odd = images / os.fsdecode(b"caf\xe9.png")
    (images / "0.png").rename(odd)
    common = ["--weights", weights["torch"], images, "--top-k", "3", "--batch-size", "2",
              "--workers", "0"]
    whole, out = tmp_path / "whole.csv", tmp_path / "p.csv"
    assert run_cli("predict", *common, "--out", whole) == 0
    assert b"caf\xe9.png" in whole.read_bytes()
    interrupted_run(*common, "--out", out, batch=3)
    assert run_cli("predict", *common, "--out", out, "--resume") == 0
    assert out.read_bytes() == whole.read_bytes()


def _strict_json(text: str):
    """JSON as jq, JavaScript and Go read it: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_outputs_of_weights_that_diverged_are_strict_json(images, tmp_path, capsys):
    # json.dumps writes NaN for a NaN loss or probability: one object that no JSON parser but
    # Python's reads. Values that are not finite are null instead.
    import torch

    model = fit_digits_model(epochs=1)
    with torch.no_grad():
        model.get_classifier().weight.fill_(float("inf"))
    save_weights(model, tmp_path / "diverged.safetensors")
    args = ["--weights", tmp_path / "diverged.safetensors"]
    assert run_cli("predict", *args, images, "--top-k", "2", "--json") == 0
    top = _strict_json(capsys.readouterr().out)["predictions"][0]["top_k"]
    assert [p["probability"] for p in top] == [None, None]
    assert run_cli("predict", *args, images, "--out", tmp_path / "p.jsonl") == 0
    capsys.readouterr()
    for line in (tmp_path / "p.jsonl").read_text().splitlines():
        _strict_json(line)
    assert run_cli("eval", *args, "--data", "digits", "--json") == 0
    assert _strict_json(capsys.readouterr().out)["loss"] is None


def test_names_stdouts_code_page_cannot_spell_are_printed_escaped(weights, images,
                                                                  monkeypatch):
    # Windows gives a redirected stdout (predict ... > out.txt, a pipe) its ANSI code page:
    # cp1252 cannot spell a Japanese file name, which ended the run halfway with exit 2.
    import io
    import sys

    (images / "0.png").rename(images / "猫 0.png")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert run_cli("predict", "--weights", weights["torch"], images) == 0
    lines = stdout.buffer.getvalue().decode("cp1252").splitlines()
    assert len(lines) == IMAGES and lines[-1].startswith(f"{images}{os.sep}\\u732b 0.png: ")


@pytest.mark.parametrize("available", [False, True])
def test_device_mps_is_taken_where_mps_is_available_and_refused_in_one_line_elsewhere(
        available, monkeypatch):
    import torch

    from mobilenetv2.train import pick_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    if available:
        assert pick_device("mps", mps=True) == torch.device("mps")
    else:  # was a traceback from model.to("mps") ("PyTorch is not linked with support ...")
        with pytest.raises(ValueError, match="MPS is not available .*: pass --device cpu"):
            pick_device("mps", mps=True)
    with pytest.raises(ValueError, match="not supported for training and evaluation"):
        pick_device("mps")


def test_the_text_output_is_one_line_per_image_whatever_the_file_names(weights, images, capsys):
    # A line break in a file name split its line in two; a name that is not UTF-8 (a byte
    # os.fsdecode keeps as a surrogate) ended the run when stdout's encoding is strict UTF-8.
    import os

    (images / "0.png").rename(images / "line\nbreak.png")
    (images / "1.png").rename(images / os.fsdecode(b"latin1-\xe9.png"))
    assert run_cli("predict", "--weights", weights["torch"], images) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == IMAGES
    assert any(line.startswith(f"{images}/line\\nbreak.png: ") for line in lines)
    assert any(line.startswith(f"{images}/latin1-\\udce9.png: ") for line in lines)


def test_predict_starts_workers_that_spawn_only_for_batches_that_repay_them(monkeypatch):
    import torch.multiprocessing

    from mobilenetv2.cli import predict
    from mobilenetv2.runtime import usable_cpus

    cpus = min(8, usable_cpus())
    monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda *a, **k: "fork")
    assert predict.default_workers(1) == 0 and predict.default_workers(2) == cpus
    monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    assert [predict.default_workers(b) for b in (1, 2, 3)] == [0, 0, 0]  # Windows, macOS
    assert predict.default_workers(4) == 1 and predict.default_workers(1000) == cpus


def test_a_script_without_a_main_block_predicts_without_workers_where_they_spawn(
        weights, images, tmp_path):
    # macOS and Windows start workers with spawn, which runs the main script again in each:
    # a script calling mobilenetv2.predict outside `if __name__ == "__main__":` started
    # workers from the workers, and ended in Python's refusal, 190 lines of tracebacks.
    script = tmp_path / "classify.py"
    script.write_text(
        "import torch.multiprocessing\n"
        "import mobilenetv2\n"
        "torch.multiprocessing.set_start_method('spawn', force=True)  # as on a Mac\n"
        f"items = mobilenetv2.predict({str(weights['torch'])!r}, {str(images)!r}, batch_size=1)\n"
        "print(len(items))\n")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"{IMAGES}\n"
    assert done.stderr == (
        "warning: images are decoded in this process, not in worker processes: on macOS and "
        "Windows each worker runs classify.py again, which calls mobilenetv2 outside an "
        "'if __name__ == \"__main__\":' block; put the calls in one for parallel decoding\n")


def test_only_a_script_that_spawned_workers_would_run_again_goes_without_them(
        tmp_path, monkeypatch):
    import torch
    import torch.multiprocessing

    from mobilenetv2 import train as train_module
    from mobilenetv2.prediction import default_workers

    guarded, unguarded = tmp_path / "guarded.py", tmp_path / "unguarded.py"
    guarded.write_text("import mobilenetv2\nif __name__ == '__main__':\n    main()\n")
    unguarded.write_text("import mobilenetv2\nmobilenetv2.predict('m.safetensors', 'photos')\n")
    monkeypatch.setattr(train_module, "_UNGUARDED_SCRIPTS", {})
    monkeypatch.setattr("mobilenetv2.runtime.usable_cpus", lambda: 4)
    for method, script, workers in [("spawn", guarded, 2), ("spawn", unguarded, 0),
                                    ("fork", unguarded, 4), ("spawn", None, 2)]:
        monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda *a, m=method: m)
        monkeypatch.setattr(sys.modules["__main__"], "__file__", str(script), raising=False)
        if script is None:  # a notebook's __main__ has no file
            monkeypatch.delattr(sys.modules["__main__"], "__file__")
        assert default_workers(8) == workers, (method, script)
        folder_data = object()  # (not in memory): fit's and evaluate's loaders go the same way
        assert train_module.default_workers(folder_data, torch.device("cpu")) == (3 if workers else 0)


def last_digits_as_folders(data: Path, count: int = 20) -> Path:
    """The last ``count`` digits as PNG files in class folders under ``data``."""
    digits = load_digits()
    for i in range(len(digits.images) - count, len(digits.images)):
        folder = data / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    return data


def test_eval_starts_workers_that_spawn_only_for_batches_that_repay_them(weights, tmp_path,
                                                                         monkeypatch):
    # Where workers spawn (macOS, Windows), each imports torch again: eval of 18 images started
    # a worker for its one batch, 15 s where 9 s do without one (a 2-CPU machine).
    import torch.multiprocessing

    import mobilenetv2
    from mobilenetv2 import train as train_module

    data = last_digits_as_folders(tmp_path / "test")
    monkeypatch.setattr("mobilenetv2.runtime.usable_cpus", lambda: 4)
    make_loader, started = train_module.make_loader, []

    def counting(dataset, sampler, workers, *args, **kwargs):
        started.append(workers)
        return make_loader(dataset, sampler, 0, *args, **kwargs)  # (this process is forked)

    monkeypatch.setattr(train_module, "make_loader", counting)
    for method in ("spawn", "fork"):
        monkeypatch.setattr(torch.multiprocessing, "get_start_method", lambda *a, m=method: m)
        for batch_size in (20, 5, 2):  # 1, 4 and 10 batches
            mobilenetv2.evaluate(weights["torch"], data, batch_size=batch_size)
    assert started == [0, 1, 2, 3, 3, 3]  # spawn: one per four batches; fork: 3 of 4 CPUs


def test_a_cuda_device_without_a_gpu_is_named_as_asked(monkeypatch):
    import torch

    from mobilenetv2.train import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    # "cuda:1" was reported as "--device cuda was asked for".
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name} was asked for, but no CUDA GPU "
                           "is available: pass --device cpu"):
            pick_device(name)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_predict_from_python_gives_what_predict_json_prints(kind, weights, images, capsys):
    import mobilenetv2

    # On the CPU: a GPU's convolutions may differ in the last bits between batch sizes.
    code, printed = predict_json(capsys, "--weights", weights[kind], images, "--top-k", "3",
                                 "--workers", "0", "--device", "cpu")
    got = mobilenetv2.predict(weights[kind], images, top_k=3, workers=0, device="cpu")
    assert code == 0 and len(got) == IMAGES
    assert [g["path"] for g in got] == [p["path"] for p in printed]
    for g, p in zip(got, printed, strict=True):
        assert [c["class"] for c in g["top_k"]] == [c["class"] for c in p["top_k"]]
        assert [c["probability"] for c in g["top_k"]] == pytest.approx(
            [c["probability"] for c in p["top_k"]], abs=1e-6)
    # images in memory (PIL, uint8 arrays) beside a file: the same classes, no path
    first = sorted(images.iterdir())[0]
    with Image.open(first) as opened:
        pil = opened.copy()
    mixed = mobilenetv2.predict(weights[kind], [pil, np.asarray(pil), first], top_k=3, workers=0,
                                device="cpu")
    assert [m["path"] for m in mixed] == [None, None, str(first)]
    assert mixed[0]["top_k"] == mixed[1]["top_k"] == mixed[2]["top_k"] == got[0]["top_k"]
    (first.parent / "broken.png").write_bytes(b"not a png")
    (broken,) = mobilenetv2.predict(weights[kind], first.parent / "broken.png", workers=0)
    assert broken["top_k"] == [] and "not a readable image" in broken["error"]
    with pytest.raises(FileNotFoundError):
        mobilenetv2.predict(weights[kind], images / "missing.png")


# --------------------------------------------------------------------------------------------
# --tta


def probabilities_by_class(predictions: list[dict]) -> list[dict[str, float]]:
    return [{c["class"]: c["probability"] for c in p["top_k"]} for p in predictions]


@pytest.fixture(scope="module")
def pixel_onnx(weights, tmp_path_factory) -> Path:
    """The model exported to take uint8 (N, H, W, C) pixels."""
    from mobilenetv2 import load_model

    path = tmp_path_factory.mktemp("pixels") / "m_pixels.onnx"
    export_model(load_model(weights["torch"]), path, ExportConfig(pixel_input=True))
    return path


@pytest.mark.parametrize("kind", ["torch", "onnx", "onnx-pixels"])
def test_tta_gives_the_mean_probabilities_of_each_image_and_its_mirror(kind, weights, pixel_onnx,
                                                                      images, tmp_path, capsys):
    import mobilenetv2

    model = pixel_onnx if kind == "onnx-pixels" else weights[kind]
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for image in sorted(images.iterdir()):
        with Image.open(image) as opened:
            opened.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / image.name)
    plain = probabilities_by_class(mobilenetv2.predict(model, images, top_k=10, workers=0))
    flipped = probabilities_by_class(mobilenetv2.predict(model, mirrored, top_k=10, workers=0))
    code, printed = predict_json(capsys, "--weights", model, images, "--top-k", "10",
                                 "--workers", "0", "--tta")
    assert code == 0
    tta = probabilities_by_class(printed)
    assert tta == probabilities_by_class(
        mobilenetv2.predict(model, images, top_k=10, workers=0, tta=True))
    changed = 0
    for got, a, b in zip(tta, plain, flipped, strict=True):
        assert got == pytest.approx({c: (a[c] + b[c]) / 2 for c in a}, abs=1e-5)
        changed += max(abs(got[c] - a[c]) for c in a) > 1e-3
    assert changed > 0  # mirrored digits are other images: the mean is not the plain answer


def test_eval_tta_scores_the_mean_probabilities_of_each_image_and_its_mirror(weights, tmp_path,
                                                                             capsys):
    import mobilenetv2

    data = last_digits_as_folders(tmp_path / "test")
    files = sorted(data.glob("*/*.png"))
    labels = [f.parent.name for f in files]
    for tta in (False, True):
        probs = probabilities_by_class(mobilenetv2.predict(weights["torch"], files, top_k=10,
                                                           workers=0, tta=tta))
        top1 = 100 * np.mean([max(p, key=p.get) == label for p, label in zip(probs, labels, strict=True)])
        loss = np.mean([-np.log(p[label]) for p, label in zip(probs, labels, strict=True)])
        assert run_cli("eval", "--weights", weights["torch"], "--data", data, "--workers", "0",
                       "--json", *(["--tta"] if tta else [])) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert (metrics["top1"], metrics["loss"]) == pytest.approx((top1, loss), abs=1e-4)
        assert mobilenetv2.evaluate(weights["torch"], data, workers=0, tta=tta)["loss"] == \
            pytest.approx(loss, abs=1e-4)


# --------------------------------------------------------------------------------------------
# --probabilities


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_probabilities_give_every_class_in_the_models_order_in_json_csv_and_jsonl(
        kind, weights, images, tmp_path, capsys):
    import mobilenetv2

    (images / "broken.png").write_bytes(b"not a png")
    common = ["--weights", weights[kind], images, "--top-k", "2", "--workers", "0",
              "--probabilities"]
    code, printed = predict_json(capsys, *common)
    assert code == 2 and len(printed) == IMAGES + 1
    for item in printed:
        if "error" in item:
            assert item["probabilities"] == []
            continue
        assert len(item["probabilities"]) == 10
        assert sum(item["probabilities"]) == pytest.approx(1, abs=1e-5)
        for top in item["top_k"]:  # the top-k are the list's largest, at their index
            assert item["probabilities"][top["index"]] == top["probability"]
        assert max(item["probabilities"]) == item["top_k"][0]["probability"]
    assert mobilenetv2.predict(weights[kind], images, top_k=2, workers=0,
                               probabilities=True) == printed

    assert run_cli(*["predict", *common, "--out", tmp_path / "p.jsonl"]) == 2
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == printed
    assert run_cli(*["predict", *common, "--out", tmp_path / "p.csv"]) == 2
    with open(tmp_path / "p.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    # A submission's layout: a column per class, named by it, in the model's order.
    names = mobilenetv2.load_model(weights["torch"]).meta["class_names"]
    assert header == ["path", "class", "probability", "class_2", "probability_2", *names, "error"]
    for row, item in zip(rows, printed, strict=True):
        assert row[0] == item["path"]
        if "error" in item:
            assert row[5:-1] == [""] * 10 and row[-1] == item["error"]
        else:
            assert [float(v) for v in row[5:-1]] == item["probabilities"] and row[-1] == ""


def test_probabilities_without_out_or_json_are_refused_in_one_line(weights, images, capsys):
    assert run_cli("predict", "--weights", weights["torch"], images, "--probabilities") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "mobilenetv2 predict: error: --probabilities writes every class's probability to a "
        "file or JSON: add --out FILE.csv, --out FILE.jsonl or --json"]


# --use-ema: the EMA weights of a training checkpoint


@pytest.fixture(scope="module")
def ema_checkpoint(weights, tmp_path_factory) -> Path:
    """A checkpoint.pt as ``train --ema`` writes it, whose EMA is the trained model of
    ``weights`` and whose raw weights have moved away from it."""
    import torch

    from mobilenetv2 import load_model
    from mobilenetv2.checkpoint import save_checkpoint
    from mobilenetv2.engine import ModelEma

    model = load_model(weights["torch"])
    ema = ModelEma(model, 0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ema") / "checkpoint.pt"
    save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(),
                           "model_config": model.config, "model_meta": model.meta})
    return path


def test_use_ema_predicts_evaluates_and_exports_a_checkpoints_ema_weights(
        weights, ema_checkpoint, images, tmp_path, capsys):
    common = [images, "--workers", "0", "--probabilities"]
    _, trained = predict_json(capsys, "--weights", weights["torch"], *common)
    _, averaged = predict_json(capsys, "--weights", ema_checkpoint, "--use-ema", *common)
    _, raw = predict_json(capsys, "--weights", ema_checkpoint, *common)
    assert averaged == trained and raw != trained

    scores = []
    for args in (["--weights", weights["torch"]], ["--weights", ema_checkpoint, "--use-ema"]):
        assert run_cli("eval", *args, "--workers", "0", "--json") == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["top1"] == scores[1]["top1"] and scores[0]["loss"] == scores[1]["loss"]

    assert run_cli("summary", "--weights", ema_checkpoint, "--use-ema", "--json") == 0
    assert json.loads(capsys.readouterr().out)["parameters"] > 0

    assert run_cli("export", "--weights", ema_checkpoint, "--use-ema", "--out",
                   tmp_path / "ema.onnx") == 0
    capsys.readouterr()
    _, exported = predict_json(capsys, "--weights", tmp_path / "ema.onnx", *common)
    assert ([[c["class"] for c in item["top_k"]] for item in exported]
            == [[c["class"] for c in item["top_k"]] for item in trained])


def test_use_ema_on_files_without_ema_weights_is_refused_in_one_line(weights, images, capsys):
    for command, args in (("predict", [images]), ("eval", []), ("summary", [])):
        for kind, needle in (("torch", "holds one set of weights, no EMA weights: drop "
                                       "use_ema=True (--use-ema, --teacher-use-ema)"),
                             ("onnx", "is an exported model, one set of weights: drop --use-ema")):
            assert run_cli(command, "--weights", weights[kind], "--use-ema", *args) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"mobilenetv2 {command}: error: ") and needle in line, line


def test_resume_refuses_to_mix_predictions_of_raw_and_ema_weights(ema_checkpoint, images,
                                                                   tmp_path, capsys):
    out = tmp_path / "p.csv"
    common = ["--weights", ema_checkpoint, images, "--batch-size", "2", "--workers", "0",
              "--out", out]
    interrupted_run(*common, batch=3)
    capsys.readouterr()
    assert run_cli("predict", *common, "--resume", "--use-ema") == 2
    assert ("it was written without --use-ema; leave out --use-ema"
            in capsys.readouterr().err.strip().splitlines()[-1])
