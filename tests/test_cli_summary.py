"""``mobilenetv2 summary``: the table, the totals line, and one-line errors."""

from __future__ import annotations

import pytest
import torchinfo
from conftest import num_parameters

from mobilenetv2 import MobileNetV2, create_model
from mobilenetv2.cli import main


def totals_line(stdout: str) -> str:
    """The last line: '<name> at RxR: N parameters, M M multiply-adds, S MB of fp32 weights'."""
    return stdout.strip().splitlines()[-1]


def test_summary_prints_the_table_and_the_papers_totals(capsys: pytest.CaptureFixture) -> None:
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "Mult-Adds" in out
    assert "InvertedResidual" in out
    line = totals_line(out)
    assert line.startswith("mobilenet_v2_100 at 224x224")
    assert "3,504,872 parameters" in line
    assert "300.8 M multiply-adds" in line


def test_summary_width_and_resolution_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["summary", "--width-mult", "0.5", "--resolution", "64", "--depth", "1"]) == 0
    line = totals_line(capsys.readouterr().out)
    assert "width 0.5" in line
    assert "at 64x64" in line
    assert f"{num_parameters(MobileNetV2(width_mult=0.5)):,} parameters" in line


def test_summary_of_a_named_model_with_its_options(capsys: pytest.CaptureFixture) -> None:
    args = ["summary", "--model", "mobilenet_v2_035", "--num-classes", "10", "--in-channels", "1",
            "--small-input", "--depth", "1"]
    assert main(args) == 0
    line = totals_line(capsys.readouterr().out)
    expected = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    assert line.startswith("mobilenet_v2_035 at 32x32")  # small inputs default to 32
    assert f"{num_parameters(expected):,} parameters" in line


def test_summary_with_an_output_stride_counts_the_dilated_rows(capsys: pytest.CaptureFixture) -> None:
    madds = {}
    for stride in ("32", "16"):
        assert main(["summary", "--output-stride", stride, "--resolution", "128", "--depth", "1"]) == 0
        line = totals_line(capsys.readouterr().out)
        assert "3,504,872 parameters" in line  # dilation adds no weights
        madds[stride] = float(line.split(" parameters, ")[1].split(" M ")[0].replace(",", ""))
    assert madds["16"] > 1.5 * madds["32"]  # the last rows run on a 4x larger map


def test_summary_of_the_seed_variant_at_its_resolution(capsys: pytest.CaptureFixture) -> None:
    assert main(["summary", "--model", "seed", "--resolution", "64", "--depth", "1"]) == 0
    line = totals_line(capsys.readouterr().out)
    seed = create_model("seed", input_width=64)
    assert line.startswith("seed at 64x64")
    assert f"{num_parameters(seed):,} parameters" in line


def test_summary_counts_the_digits_model_at_the_size_it_trains_at(
    capsys: pytest.CaptureFixture,
) -> None:
    # The digits default trains mobilenet_v2_050 at 16x16 (and --resolution goes down to 8):
    # the cost of each point of a width x resolution sweep (the paper's Figure 5) is counted.
    assert main(["summary", "--model", "mobilenet_v2_050", "--small-input", "--resolution", "16",
                 "--num-classes", "10", "--in-channels", "1", "--depth", "1"]) == 0
    line = totals_line(capsys.readouterr().out)
    model = create_model("mobilenet_v2_050", small_input=True, num_classes=10, in_channels=1)
    stats = torchinfo.summary(model, input_size=(1, 1, 16, 16), verbose=0)
    assert line.startswith("mobilenet_v2_050 at 16x16")
    assert f"{num_parameters(model):,} parameters" in line
    assert f"{stats.total_mult_adds / 1e6:,.1f} M multiply-adds" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "seed", "--resolution", "100"], "multiple of 32"),
        (["--model", "seed", "--width-mult", "0.5"], "--width-mult"),
        (["--model", "mobilenet_v2_050", "--width-mult", "0.75"], "fixes the width"),
        (["--resolution", "4"], "at least 8"),
        (["--model", "seed", "--output-stride", "16"], "do not apply to the seed"),
    ],
)
def test_summary_user_error_is_one_line_and_exit_code_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["summary", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mobilenetv2 summary: error:")
    assert message in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("args", [["--model", "mobilenet_v2_999"], ["--resolution", "0"]])
def test_summary_rejects_bad_flags_with_usage(args: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", *args])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_summary_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--resolution" in out
    assert "--width-mult" in out


def test_summary_of_a_weights_file_describes_its_classes_and_preprocessing(tmp_path, capsys):
    from mobilenetv2 import save_weights

    model = create_model("mobilenet_v2_035", num_classes=12, in_channels=1, small_input=True)
    model.meta.update(class_names=[f"class{i}" for i in range(12)], dataset="digits",
                      input_size=[1, 16, 16])  # the digits default trains at 16x16
    save_weights(model, tmp_path / "w.safetensors")
    assert main(["summary", "--weights", str(tmp_path / "w.safetensors"), "--depth", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-4].startswith(f"{tmp_path / 'w.safetensors'} (mobilenet_v2_035) at 16x16: "
                                f"{num_parameters(model):,} parameters")
    assert lines[-3] == "classes: 12 (class0, class1, class2, class3, class4, class5, class6, class7, ... (4 more))"
    assert lines[-2] == "trained on: digits"
    assert lines[-1].startswith("input: 1x16x16, mean (")
    # A file is its own model: the model options are refused, --resolution is not.
    assert main(["summary", "--weights", str(tmp_path / "w.safetensors"), "--num-classes", "3"]) == 2
    assert "--weights describes its own model: drop --num-classes" in capsys.readouterr().err
    assert main(["summary", "--weights", str(tmp_path / "w.safetensors"), "--resolution", "64",
                 "--depth", "1"]) == 0
    assert " at 64x64: " in capsys.readouterr().out


def test_summary_of_trained_weights_says_what_trained_them(tmp_path, capsys):
    # The weights carry their run's record (meta["training"]); summary showed none of it.
    from mobilenetv2 import save_weights

    model = create_model("mobilenet_v2_035", num_classes=2)
    model.meta["training"] = {
        "mobilenetv2": "0.1.0", "torch": "2.9.0", "git_commit": "0123456789abcdef-dirty",
        "epoch": 3, "config": {"seed": 7}, "data": {"train": {"images": 48, "sha256": "ab" * 32},
                                                   "val": {"images": 8, "sha256": "cd" * 32}}}
    save_weights(model, tmp_path / "w.safetensors")
    assert main(["summary", "--weights", str(tmp_path / "w.safetensors"), "--depth", "1"]) == 0
    assert ("trained by: mobilenetv2 0.1.0, torch 2.9.0; git 0123456789ab; epoch 3, seed 7; "
            "train 48 images (sha256 abababababab); val 8 images (sha256 cdcdcdcdcdcd)"
            ) in capsys.readouterr().out.splitlines()


def test_summary_of_an_exported_file_states_its_input_contract(tmp_path, capsys):
    """An app developer holding model.onnx could only be told to run it through eval or
    predict; summary now says what the app feeds it (dtype, shape, layout, batch, the
    preprocessing) and gets back, from the file itself."""
    from mobilenetv2.export import ExportConfig, export_model

    model = create_model("mobilenet_v2_035", num_classes=3)
    model.meta.update(class_names=["bird", "cat", "dog"], input_size=[3, 96, 96])
    export_model(model, tmp_path / "m.onnx", ExportConfig())
    export_model(model, tmp_path / "px.onnx", ExportConfig(pixel_input=True, dynamic_batch=False))
    assert main(["summary", "--weights", str(tmp_path / "m.onnx")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{tmp_path / 'm.onnx'}: ONNX model, float32, ")
    assert lines[1] == ("input 'input': float32 (N, 3, 96, 96), channels first: resize the "
                        "shorter side to 109 and center-crop 96x96 (bilinear), scale the RGB "
                        "pixels to [0, 1], subtract mean (0.485, 0.456, 0.406) and divide by std "
                        "(0.229, 0.224, 0.225); any batch size N")
    assert lines[2] == "output 'logits': (N, 3) logits (a softmax gives probabilities)"
    assert lines[3] == "classes: 3 (bird, cat, dog); all of this is stored in its metadata_props"
    assert main(["summary", "--weights", str(tmp_path / "px.onnx")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("input 'input': uint8 (1, 96, 96, 3), channels last: ")
    assert lines[1].endswith("then the RGB pixels as they are (0-255; the model scales and "
                             "normalises them itself); batch fixed at 1")
    assert main(["summary", "--weights", str(tmp_path / "px.onnx"), "--resolution", "64"]) == 2
    assert "exported for one input size: drop --resolution" in capsys.readouterr().err


def test_summary_of_an_export_without_our_metadata_says_its_preprocessing_is_assumed(
        tmp_path, capsys):
    """Another tool's ONNX file (torch.onnx.export of torchvision's model) records no
    preprocessing: summary stated predict's ImageNet defaults as the file's contract."""
    import onnx

    from mobilenetv2.export import ExportConfig, export_model

    export_model(create_model("mobilenet_v2_035", num_classes=3), tmp_path / "m.onnx",
                 ExportConfig(resolution=64))
    foreign = onnx.load(str(tmp_path / "m.onnx"))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    assert main(["summary", "--weights", str(tmp_path / "foreign.onnx")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("input 'input': float32 (N, 3, 64, 64)")
    assert lines[2].startswith("preprocessing: not recorded in the file (not exported by "
                               "mobilenetv2): the resize, mean and std above are the ImageNet "
                               "defaults")
    assert main(["summary", "--weights", str(tmp_path / "m.onnx")]) == 0  # ours: recorded
    assert "not recorded" not in capsys.readouterr().out


def test_summary_names_each_line_by_its_module_as_the_architecture_table_does(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["summary", "--depth", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # docs/architecture.md's table names the rows stem, stages.0 ... stages.6, head, classifier.
    for name in ("ConvNormAct (stem)", "Sequential (stages)", "Sequential (1)",
                 "ConvNormAct (head)", "Linear (classifier)"):
        assert any(name in line for line in lines), name
    row_2 = next(line for line in lines if "Sequential (1)" in line)
    assert "[1, 24, 56, 56]" in row_2 and "13,968" in row_2  # (6, 24, 2, 2): stages.1


def test_summary_json_is_the_table_as_data(capsys: pytest.CaptureFixture) -> None:
    """--json gives a CI job the totals (a size budget to check) and every line of the table,
    each named as in the state_dict with the multiply-adds of all layers inside it."""
    import json

    assert main(["summary", "--json", "--depth", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "mobilenet_v2_100" and report["weights"] is None
    assert report["input_size"] == [3, 224, 224]
    assert report["parameters"] == report["trainable_parameters"] == 3_504_872
    assert report["multiply_adds"] == 300_809_384
    assert report["parameter_bytes"] == 4 * 3_504_872
    rows = {layer["name"]: layer for layer in report["layers"]}
    assert [layer["name"] for layer in report["layers"] if layer["depth"] == 1] == [
        "stem", "stages", "head", "pool", "dropout", "classifier"]
    for key in ("parameters", "multiply_adds"):  # the top lines add up to the totals
        assert sum(layer[key] for layer in report["layers"] if layer["depth"] == 1) == report[key]
    assert rows["stages"]["multiply_adds"] == sum(rows[f"stages.{i}"]["multiply_adds"]
                                                  for i in range(7))
    assert rows["stem.conv"] == {"name": "stem.conv", "type": "Conv2d", "depth": 2,
                                 "output_shape": [1, 32, 112, 112], "parameters": 864,
                                 "multiply_adds": 864 * 112 * 112}
    assert rows["stages.1"]["output_shape"] == [1, 24, 56, 56]  # the table's 24-channel row
    assert not any(layer["depth"] > 2 for layer in report["layers"])


def test_summary_json_of_weights_and_of_an_exported_file(tmp_path, capsys) -> None:
    import json

    from mobilenetv2 import save_weights
    from mobilenetv2.cli.summary import describe_exported, exported_contract
    from mobilenetv2.export import ExportConfig, export_model

    model = create_model("mobilenet_v2_035", num_classes=3)
    model.meta.update(class_names=["bird", "cat", "dog"], input_size=[3, 96, 96], dataset="pets")
    save_weights(model, tmp_path / "w.safetensors")
    assert main(["summary", "--json", "--weights", str(tmp_path / "w.safetensors")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "mobilenet_v2_035"
    assert report["weights"] == str(tmp_path / "w.safetensors")
    assert report["input_size"] == [3, 96, 96] and report["parameters"] == num_parameters(model)
    assert report["meta"]["class_names"] == ["bird", "cat", "dog"]
    assert report["meta"]["dataset"] == "pets" and report["meta"]["mean"] == [0.485, 0.456, 0.406]

    export_model(model, tmp_path / "px.onnx", ExportConfig(pixel_input=True, dynamic_batch=False))
    assert main(["summary", "--json", "--weights", str(tmp_path / "px.onnx")]) == 0
    contract = json.loads(capsys.readouterr().out)
    assert contract["format"] == "onnx" and contract["quantization"] is None
    assert contract["size_bytes"] == (tmp_path / "px.onnx").stat().st_size
    assert contract["input"] == {
        "name": "input", "dtype": "uint8", "shape": [1, 96, 96, 3], "image_size": [96, 96],
        "layout": "NHWC",
        "pixel_input": True, "resize_mode": "shorter_side", "resize": 109,
        "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "preprocessing_recorded": True}
    assert contract["outputs"] == [{"name": "logits", "shape": [1, 3]}]
    assert contract["output"] == "logits" and contract["num_classes"] == 3
    assert contract["class_names"] == ["bird", "cat", "dog"] and contract["dataset"] == "pets"
    # The text is drawn from the same contract.
    assert main(["summary", "--weights", str(tmp_path / "px.onnx")]) == 0
    assert capsys.readouterr().out.strip() == describe_exported(
        exported_contract(tmp_path / "px.onnx"))
