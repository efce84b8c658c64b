"""int8: ONNX Runtime QDQ models run int8 kernels and agree with fp32; PyTorch int8 too."""

from __future__ import annotations

import copy
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import fit_digits_model, randomize_batchnorm, refused_by_onnx_runtime_1_16

from mobilenetv2 import create_model, save_weights
from mobilenetv2.cli import main
from mobilenetv2.export import ExportConfig, export_model, real_images
from mobilenetv2.quantize import QuantizeConfig, compare_onnx, quantize_onnx, quantize_torch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(weights file, fp32 ONNX file, model) of the small trained digits model."""
    folder = tmp_path_factory.mktemp("quantize")
    model = fit_digits_model()
    save_weights(model, folder / "digits.safetensors")
    export_model(model, folder / "fp32.onnx", ExportConfig())
    return folder / "digits.safetensors", folder / "fp32.onnx", model


def _calibration(model: torch.nn.Module, count: int = 64):
    shape = tuple(model.meta["input_size"])
    return real_images(count, shape, model.meta).numpy().reshape(-1, 16, *shape)


def _holdout(model: torch.nn.Module):
    """Digits images the calibration did not see, with their labels."""
    from sklearn.datasets import load_digits

    images = real_images(600, tuple(model.meta["input_size"]), model.meta)[200:]
    labels = torch.as_tensor(load_digits().target[200:600])
    return torch.utils.data.TensorDataset(images, labels)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_model_agrees_with_fp32_on_real_images(method, trained, tmp_path):
    _, path, model = trained
    quantize_onnx(path, tmp_path / "int8.onnx", _calibration(model), QuantizeConfig(method=method))
    report = compare_onnx({"fp32": path, "int8": tmp_path / "int8.onnx"}, _holdout(model))
    assert report["top1_fp32"] >= 85.0
    assert report["agreement_int8"] >= 97.0
    assert abs(report["top1_int8"] - report["top1_fp32"]) <= 2.0


def test_int8_accuracy_decodes_images_in_worker_processes_unless_they_are_in_memory(
        trained, monkeypatch):
    from mobilenetv2.data import TensorImages

    _, path, model = trained
    workers = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            workers.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    monkeypatch.setattr("mobilenetv2.runtime.usable_cpus", lambda: 2)
    holdout = _holdout(model)  # as an image folder is: read item by item
    report = compare_onnx({"fp32": path}, holdout, max_images=64)
    in_memory = TensorImages(*holdout.tensors)  # the digits: nothing for a worker to do
    assert compare_onnx({"fp32": path}, in_memory, max_images=64) == report
    assert workers == [1, 0]  # the training loaders' policy: a CPU left to the model


def test_int8_model_runs_quantized_kernels_and_keeps_the_metadata(trained, tmp_path):
    _, path, model = trained
    quantize_onnx(path, tmp_path / "int8.onnx", _calibration(model))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops  # every convolution runs in int8
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "int8.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == model.meta["class_names"]
    assert json.loads(meta["quantization"])["per_channel"] is True
    assert (tmp_path / "int8.onnx").stat().st_size < path.stat().st_size


def _weight_range(path) -> int:
    """The largest |value| of the int8 weight tensors of a QDQ model."""
    import numpy as np
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert weights
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


@pytest.mark.parametrize("vnni", [False, True])
def test_weights_use_7_bits_by_default_whatever_cpu_quantizes(vnni, trained, tmp_path,
                                                              monkeypatch):
    """A file made on a VNNI machine must stay exact on an AVX2 one, where ONNX Runtime's
    u8 x s8 multiply-add saturates with 8-bit weights: 7 bits unless asked otherwise."""
    import mobilenetv2.quantize

    monkeypatch.setattr(mobilenetv2.quantize, "cpu_has_vnni", lambda: vnni)
    _, path, model = trained
    quantize_onnx(path, tmp_path / "7.onnx", _calibration(model))
    quantize_onnx(path, tmp_path / "8.onnx", _calibration(model),
                  QuantizeConfig(reduce_range=False))
    assert _weight_range(tmp_path / "7.onnx") <= 64 < _weight_range(tmp_path / "8.onnx")
    meta = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "7.onnx").metadata_props}
    assert meta["quantization"]["reduce_range"] is True


@pytest.fixture(scope="module")
def seven_and_eight_bit(trained, tmp_path_factory):
    """The trained model quantized with 7-bit (default) and with 8-bit weights."""
    folder = tmp_path_factory.mktemp("bits")
    _, path, model = trained
    quantize_onnx(path, folder / "7.onnx", _calibration(model))
    quantize_onnx(path, folder / "8.onnx", _calibration(model), QuantizeConfig(reduce_range=False))
    return folder / "7.onnx", folder / "8.onnx"


@pytest.mark.parametrize("saturates", [False, True])
def test_predictor_warns_of_8_bit_weights_where_they_saturate(saturates, trained,
                                                              seven_and_eight_bit,
                                                              monkeypatch, caplog):
    import sys

    from mobilenetv2.runtime import Predictor

    monkeypatch.setattr(sys.modules[Predictor.__module__], "int8_weights_saturate",
                        lambda: saturates)
    seven, eight = seven_and_eight_bit
    with caplog.at_level("WARNING", logger="mobilenetv2.runtime"):
        Predictor(seven)
        Predictor(trained[1])
        assert not caplog.records  # 7-bit weights and fp32 are exact everywhere
        Predictor(eight)
    assert len(caplog.records) == saturates
    if saturates:
        assert "8.onnx has int8 weights that use all 8 bits" in caplog.text


def test_a_fixed_batch_export_quantizes_with_its_batch_kept(trained, tmp_path):
    """export --static-batch (what ONNX Runtime's NNAPI and Core ML providers need) used to
    stop ONNX Runtime's calibrator with its 'invalid dimensions' error (and bench with a
    traceback): the calibration batches of 16 are regrouped to the file's batch size."""
    from mobilenetv2.runtime import Predictor

    _, _, model = trained
    # A batch of 5 that 48 images do not fill: the last group is completed.
    fixed = tmp_path / "b5.onnx"
    export_model(model, fixed, ExportConfig(dynamic_batch=False, batch_size=5))
    quantize_onnx(fixed, tmp_path / "int8_b5.onnx", _calibration(model, count=48))
    assert Predictor(tmp_path / "int8_b5.onnx").batch_size == 5
    report = compare_onnx({"fp32": fixed, "int8": tmp_path / "int8_b5.onnx"}, _holdout(model))
    assert report["agreement_int8"] >= 97.0


def test_int8_file_loads_in_onnx_runtime_1_16(trained, tmp_path):
    """ONNX Runtime's quantization pre-processing imports every domain it knows, ai.onnx.ml at
    opset 5 among them, and ONNX Runtime before 1.18 refuses such a file even though no node
    uses the domain: the int8 file imports only what its nodes use."""
    _, path, model = trained
    quantize_onnx(path, tmp_path / "int8.onnx", _calibration(model))
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    assert refused_by_onnx_runtime_1_16(proto) == []
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    assert proto.ir_version == 8
    assert compare_onnx({"int8": tmp_path / "int8.onnx"}, _holdout(model))["top1_int8"] >= 85.0


def test_quantize_needs_calibration_images(trained, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(trained[1], tmp_path / "int8.onnx", [])
    with pytest.raises(ValueError, match="unknown calibration method"):
        QuantizeConfig(method="kl")
    assert QuantizeConfig(reduce_range=None).reduce_range is True  # what None meant: safe


def test_pytorch_int8_agrees_with_fp32(trained):
    _, _, model = trained
    quantized = quantize_torch(model, torch.from_numpy(_calibration(model)))
    images = _holdout(model).tensors[0]
    with torch.no_grad():
        expected, got = model(images).argmax(1), quantized(images).argmax(1)
    assert (expected == got).float().mean() >= 0.97


def test_pytorch_int8_takes_the_seed_variant(generator):
    model = randomize_batchnorm(create_model("seed", input_width=64, num_classes=10),
                                generator).eval()
    images = real_images(8, (3, 64, 64), model.meta)
    quantized = quantize_torch(model, [images])
    with torch.no_grad():
        assert quantized(images).shape == (8, 10)


# --------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def weights(trained):
    return trained[0]


def test_quantize_command_on_digits(weights, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    code = main(["quantize", "--weights", str(weights), "--data", "digits", "--out", str(out),
                 "--calibration-batches", "2", "--batch-size", "32", "--max-eval-images", "128",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["calibration_images"] == 64 and report["eval_images"] == 128
    assert report["top1_fp32"] >= 85.0 and report["agreement_int8"] >= 97.0
    assert report["weight_bits"] == 7 and _weight_range(out) <= 64


def test_quantize_command_writes_8_bit_weights_when_asked(weights, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--weights", str(weights), "--data", "digits", "--out", str(out),
                 "--calibration-batches", "1", "--max-eval-images", "64", "--weight-bits", "8"]
                ) == 0
    assert "8-bit weights" in capsys.readouterr().out
    metadata = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert metadata["quantization"]["reduce_range"] is False and _weight_range(out) > 64


def test_quantize_command_exports_at_another_resolution(weights, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--weights", str(weights), "--data", "digits", "--out", str(out),
                 "--resolution", "32", "--calibration-batches", "1", "--max-eval-images", "64",
                 "--weight-type", "uint8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # an 8x8 model knows nothing at 32x32,
    assert report["eval_images"] == 64 and report["agreement_int8"] >= 90  # but int8 agrees
    metadata = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert metadata["input_size"] == [1, 32, 32]
    assert metadata["quantization"]["weights"] == "uint8"


def test_quantize_command_takes_the_ema_weights_of_a_training_checkpoint(trained, tmp_path,
                                                                         capsys):
    from mobilenetv2.checkpoint import save_checkpoint
    from mobilenetv2.engine import ModelEma

    model = copy.deepcopy(trained[2])
    ema = ModelEma(model, 0.999)  # the trained model; the raw weights move far from it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_checkpoint(tmp_path / "checkpoint.pt", {
        "model": model.state_dict(), "ema": ema.state_dict(), "model_config": model.config,
        "model_meta": model.meta})
    assert main(["quantize", "--weights", str(tmp_path / "checkpoint.pt"), "--use-ema",
                 "--data", "digits", "--out", str(tmp_path / "int8.onnx"),
                 "--calibration-batches", "1", "--max-eval-images", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1_fp32"] >= 85.0


@pytest.mark.parametrize("args, message", [
    (["--method", "kl"], "unknown calibration method 'kl'"),
    (["--weights", "missing.safetensors"], "not found"),
    (["--out", "{tmp}/no/folder/x.onnx"], "does not exist"),
    (["--data", "nowhere"], "is not digits, cifar10, cifar100"),
])
def test_quantize_command_errors_are_one_line_and_exit_2(args, message, weights, tmp_path,
                                                         capsys):
    base = {"--weights": str(weights), "--data": "digits", "--out": str(tmp_path / "x.onnx")}
    extra = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for flag in list(base):
        if flag in extra:
            del base[flag]
    assert main(["quantize", *[x for pair in base.items() for x in pair], *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["q.pt", "model", "q.safetensors"])
@pytest.mark.parametrize("source", [["--weights", "missing.safetensors", "--data", "digits"],
                                    ["--weights", "imagenet-int8"]])  # no download either
def test_quantize_refuses_an_out_that_is_not_onnx_or_pte_before_any_work(name, source, tmp_path,
                                                                         capsys):
    # An int8 model is ONNX (or a .pte program): under another name, predict and eval would take
    # it for PyTorch weights. Neither the weights nor the download are looked at first.
    assert main(["quantize", *source, "--out", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert name in line and "quantize writes int8 .onnx (ONNX Runtime) or .pte" in line
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_quantize_functions_refuse_an_out_that_is_not_onnx(weights, tmp_path):
    from mobilenetv2.quantize import quantize_from_data, torchvision_int8_to_onnx

    with pytest.raises(ValueError, match="not .pt files"):
        quantize_from_data(weights, "digits", tmp_path / "q.pt")
    with pytest.raises(ValueError, match=".onnx only"):
        torchvision_int8_to_onnx({}, tmp_path / "q.pte")
    assert list(tmp_path.iterdir()) == []


def test_quantize_command_refuses_weights_for_other_classes(tmp_path, capsys):
    save_weights(create_model("mobilenet_v2_035", num_classes=5, small_input=True,
                              in_channels=1), tmp_path / "five.safetensors")
    code = main(["quantize", "--weights", str(tmp_path / "five.safetensors"), "--data", "digits",
                 "--out", str(tmp_path / "x.onnx")])
    assert code == 2 and "5 classes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Trained models (minutes)


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    assert main(["train", "--data", "digits", "--model", "mobilenet_v2_035", "--epochs", "8",
                 "--out", str(folder / "run")]) == 0
    return folder / "run" / "best.safetensors"


@pytest.mark.slow
def test_int8_top1_is_within_half_a_point_of_fp32_on_a_trained_digits_model(
        trained_digits, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--weights", str(trained_digits), "--data", "digits",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1_fp32"] >= 90.0
    assert abs(report["top1_int8"] - report["top1_fp32"]) <= 0.5
    assert report["agreement_int8"] >= 99.0


@pytest.mark.slow
def test_qat_fine_tuning_produces_an_accurate_int8_model(trained_digits, tmp_path, capsys):
    out = tmp_path / "qat.onnx"
    assert main(["quantize", "--weights", str(trained_digits), "--data", "digits",
                 "--out", str(out), "--qat", "--epochs", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["qat"] is True and out.is_file()
    assert report["top1_int8_ptq"] >= report["top1_fp32"] - 0.5
    assert report["agreement_int8"] >= 97.0 and report["top1_int8"] >= report["top1_fp32"] - 1.5


# --------------------------------------------------------------------------------------------
# From data to an int8 model in one command


def test_train_int8_leaves_fp32_and_int8_onnx_models_and_reports_both(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--resolution", "16", "--model", "mobilenet_v2_035", "--epochs", "2",
                 "--batch-size", "128", "--seed", "0", "--no-tensorboard", "--int8",
                 "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)  # with --json: one object, the report in it
    assert (out / "model.onnx").is_file() and (out / "model_int8.onnx").is_file()
    assert (printed["int8"]["path"], printed["int8"]["fp32_path"]) == (
        str(out / "model_int8.onnx"), str(out / "model.onnx"))
    fp32, int8 = printed["int8"]["top1_fp32"], printed["int8"]["top1_int8"]
    results = {}
    for name in ("best.safetensors", "model.onnx", "model_int8.onnx"):
        assert main(["eval", "--weights", str(out / name), "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    # The ONNX export is the trained model; the report is what eval measures of each file.
    assert results["model.onnx"]["top1"] == pytest.approx(results["best.safetensors"]["top1"])
    assert results["model.onnx"]["top1"] == pytest.approx(fp32, abs=0.01)
    assert results["model_int8.onnx"]["top1"] == pytest.approx(int8, abs=0.01)
    ops = {node.op_type for node in onnx.load(out / "model_int8.onnx").graph.node}
    assert "QuantizeLinear" in ops


def test_train_int8_without_onnxruntime_stops_before_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    assert main(["train", "--int8", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mobilenetv2 train: error: --int8 needs onnxruntime: "
                   "pip install 'mobilenetv2[deploy]'")
    assert not (tmp_path / "run").exists()  # nothing was trained


def test_a_command_whose_extra_is_missing_says_which_to_install(trained, tmp_path, capsys,
                                                                 monkeypatch):
    import sys

    for name in ("onnx", "onnxruntime"):  # as if `pip install mobilenetv2` without [deploy]
        monkeypatch.setitem(sys.modules, name, None)
    import mobilenetv2

    for name in ("runtime", "export"):
        monkeypatch.delitem(sys.modules, f"mobilenetv2.{name}", raising=False)
        if hasattr(mobilenetv2, name):  # the re-import rebinds it: restore it afterwards too
            monkeypatch.setattr(mobilenetv2, name, getattr(mobilenetv2, name))
    weights, _, _ = trained
    assert main(["export", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'mobilenetv2[deploy]'" in err
