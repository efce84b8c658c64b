"""torchvision's int8 MobileNetV2 in ONNX Runtime: the same network, torchvision's numbers.

The reference is torchvision's own quantized model (``torchvision.models.quantization``), built
and quantized here as torchvision builds its ImageNet int8 weights (fused Conv-BN-ReLU, qnnpack
or x86 qconfig), so every test compares with the peer's module, not with our reading of it.
"""

from __future__ import annotations

import collections
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import randomize_batchnorm

from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.export import ExportVerificationError, real_images
from mobilenetv2.quantize import (
    TORCHVISION_INT8_URL,
    read_torchvision_int8,
    torchvision_int8_to_onnx,
)
from mobilenetv2.runtime import Predictor
from mobilenetv2.weights import WeightsError


def torchvision_int8(engine: str = "qnnpack", num_classes: int = 10, width_mult: float = 0.5,
                     resolution: int = 64) -> torch.nn.Module:
    """torchvision's quantizable MobileNetV2, quantized as torchvision does it (PTQ here)."""
    from torch.ao.quantization import convert, get_default_qconfig, prepare
    from torchvision.models.quantization import mobilenet_v2

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mobilenet_v2(weights=None, quantize=False, num_classes=num_classes,
                                 width_mult=width_mult)
            randomize_batchnorm(model, torch.Generator().manual_seed(0)).eval()
            model.fuse_model()
            model.qconfig = get_default_qconfig(engine)
            prepare(model, inplace=True)
            with torch.no_grad():
                model(real_images(32, (3, resolution, resolution),
                                  {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
            convert(model, inplace=True)
    finally:
        torch.backends.quantized.engine = previous
    return model


def run_torchvision(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        with torch.no_grad():
            return model(images).numpy()
    finally:
        torch.backends.quantized.engine = previous


@pytest.fixture(scope="module")
def per_tensor(tmp_path_factory):
    """(file, module) of a torchvision int8 model as its ImageNet weights are: qnnpack, per tensor."""
    model = torchvision_int8("qnnpack")
    path = tmp_path_factory.mktemp("tv_int8") / "mobilenet_v2_qnnpack.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_uint8_weights_reproduce_torchvision_int8_logits(per_tensor, tmp_path):
    path, reference = per_tensor
    report = torchvision_int8_to_onnx(path, tmp_path / "m.onnx", resolution=64,
                                      weight_type="uint8")
    images = real_images(64, (3, 64, 64), {"mean": [0.485, 0.456, 0.406],
                                           "std": [0.229, 0.224, 0.225]})
    expected = run_torchvision(reference, images)
    got = Predictor(tmp_path / "m.onnx").run(images.numpy())
    # ONNX Runtime and qnnpack requantize with different rounding, so a logit may land a step
    # or two away; a wrong scale, zero point or bias moves them by tens of steps.
    steps = np.abs(got - expected) / float(reference.classifier[1].scale)
    assert steps.max() <= 2.0001 and steps.mean() < 0.1
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert report["weight_scheme"] == "per-tensor" and report["max_steps"] <= 2.0001
    assert report["agreement"] == 100.0 and report["input_shape"] == [3, 64, 64]


def test_per_channel_weights_of_the_x86_qconfig_convert_too(tmp_path):
    model = torchvision_int8("x86")
    report = torchvision_int8_to_onnx(model.state_dict(), tmp_path / "m.onnx", resolution=64)
    assert report["weight_scheme"] == "per-channel" and report["max_steps"] <= 2.0001
    conv = next(i for i in onnx.load(tmp_path / "m.onnx").graph.initializer
                if i.name == "features.1.conv.0.0.weight.scale")
    assert list(conv.dims) == [16]  # one scale per output channel of the first depthwise conv


@pytest.mark.parametrize("weight_type, dtype", [("int8", np.int8), ("uint8", np.uint8)])
def test_the_graph_runs_int8_kernels_end_to_end(per_tensor, tmp_path, weight_type, dtype):
    path, reference = per_tensor
    torchvision_int8_to_onnx(path, tmp_path / "m.onnx", resolution=64, weight_type=weight_type)
    proto = onnx.load(tmp_path / "m.onnx")
    weight = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer
                                             if i.name == "features.0.0.weight.q"))
    assert weight.dtype == dtype
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["QLinearConv"] == 52 and ops["QLinearAdd"] == 10 and ops["QGemm"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1
    assert not {"Conv", "Add", "Gemm", "Relu"} & set(ops)  # nothing left in float


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_predictor_warns_of_int8_weights_on_a_cpu_that_saturates_them(
        per_tensor, tmp_path, weight_type, monkeypatch, caplog):
    import sys

    torchvision_int8_to_onnx(per_tensor[0], tmp_path / "m.onnx", resolution=64,
                             weight_type=weight_type)
    monkeypatch.setattr(sys.modules[Predictor.__module__], "int8_weights_saturate", lambda: True)
    with caplog.at_level("WARNING", logger="mobilenetv2.runtime"):
        Predictor(tmp_path / "m.onnx")
    assert ("use all 8 bits" in caplog.text) == (weight_type == "int8")


def test_imagenet_sized_file_carries_preprocessing_and_class_names(tmp_path):
    model = torchvision_int8(num_classes=1000, width_mult=0.35)
    torchvision_int8_to_onnx(model.state_dict(), tmp_path / "m.onnx", resolution=96,
                             weight_type="uint8")
    predictor = Predictor(tmp_path / "m.onnx")
    meta = predictor.meta
    assert meta["input_size"] == [3, 96, 96] and meta["mean"] == [0.485, 0.456, 0.406]
    assert len(meta["class_names"]) == 1000 and meta["class_names"][0] == "tench"
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert json.loads(props["quantization"]) == {
        "format": "QDQ", "method": "torchvision int8", "per_channel": False,
        "activations": "uint8", "weights": "uint8"}


def test_quantize_command_converts_without_data(per_tensor, tmp_path, capsys):
    path, _ = per_tensor
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--weights", str(path), "--out", str(out), "--resolution", "64",
                 "--weight-type", "uint8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["path"] == str(out) and report["weight_type"] == "uint8"
    assert main(["eval", "--weights", str(out), "--data", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 360


def test_the_imagenet_int8_tag_downloads_torchvision_weights(per_tensor, tmp_path, monkeypatch):
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return per_tensor[1].state_dict()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    assert main(["quantize", "--weights", "imagenet-int8", "--out", "m.onnx",
                 "--resolution", "64"]) == 0
    (url, kwargs), = calls
    assert url == TORCHVISION_INT8_URL and url.endswith("mobilenet_v2_qnnpack_37f702c5.pth")
    assert kwargs["weights_only"] and kwargs["check_hash"]


def test_float_weights_and_int8_weights_each_point_to_the_other_command(per_tensor, tmp_path,
                                                                         capsys):
    path, _ = per_tensor
    float_file = tmp_path / "float.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), float_file)
    cases = [
        (["quantize", "--weights", str(float_file), "--out", str(tmp_path / "a.onnx")],
         "pass --data DATA"),
        (["quantize", "--weights", str(path), "--data", "digits", "--out",
          str(tmp_path / "b.onnx")], "(no --data: its calibration is in the file)"),
        (["eval", "--weights", str(path), "--data", "digits"], "mobilenetv2 quantize --weights"),
        (["quantize", "--weights", str(tmp_path / "missing.pth"), "--out",
          str(tmp_path / "c.onnx")], "not found"),
        (["quantize", "--weights", str(path), "--qat", "--out", str(tmp_path / "d.onnx")],
         "--qat, --max-eval-images, --val-split, --pixel-input and --strict work on --data"),
        (["quantize", "--weights", str(path), "--weight-bits", "8", "--out",
          str(tmp_path / "e.onnx")], "torchvision's int8 weights use 8 bits"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.onnx"))
    with pytest.raises(WeightsError, match="int8"):
        load_model(path)


def test_a_state_dict_that_does_not_fit_is_refused(per_tensor, tmp_path):
    state = dict(per_tensor[1].state_dict())
    state["features.3.conv.1.0.weight"] = state["features.2.conv.1.0.weight"][:5]
    with pytest.raises(WeightsError, match="does not fit torchvision's quantized MobileNetV2"):
        torchvision_int8_to_onnx(state, tmp_path / "m.onnx", resolution=64)
    with pytest.raises(WeightsError, match="not torchvision's int8"):
        read_torchvision_int8({"features.0.0.weight": torch.zeros(1)})
    assert not (tmp_path / "m.onnx").exists()


def test_a_file_that_disagrees_with_torchvision_is_not_kept(per_tensor, tmp_path, monkeypatch):
    import mobilenetv2.quantize as quantize

    monkeypatch.setattr(quantize._QDQGraph, "_bias", lambda self, name, bias, x, scale: (
        self._const(name, np.full(bias.shape, 3.0, np.float32))))  # every bias wrong
    (tmp_path / "m.onnx").write_bytes(b"the previous file")
    with pytest.raises(ExportVerificationError, match="differ from torchvision's int8 model"):
        torchvision_int8_to_onnx(per_tensor[0], tmp_path / "m.onnx", resolution=64,
                                 weight_type="uint8")
    assert (tmp_path / "m.onnx").read_bytes() == b"the previous file"


@pytest.mark.slow
def test_a_qat_trained_model_keeps_torchvision_top1_exactly_with_uint8_weights(tmp_path):
    """A torchvision model trained on digits (64x64) with QAT, as torchvision's ImageNet int8
    weights were: uint8 weights give torchvision's top-1 in ONNX Runtime; int8 weights do on
    ARM and VNNI CPUs, and moved 0.5% of these predictions on an AVX2-only x86 CPU."""
    from sklearn.datasets import load_digits
    from torch.ao.quantization import convert, get_default_qat_qconfig, prepare_qat
    from torchvision.models.quantization import mobilenet_v2

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.nn.functional.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None]
                                        / 16, size=64, mode="bilinear").repeat(1, 3, 1, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    train, test = order[:1400], order[1400:]
    model = mobilenet_v2(weights=None, quantize=False, num_classes=10, width_mult=0.5)

    def fit(epochs: int, lr: float) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(epochs):
            for i in range(0, len(train), 64):
                batch = train[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"  # as torchvision made its QNNPACK weights
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(6, 0.05)
            model.eval().fuse_model(is_qat=True)
            model.qconfig = get_default_qat_qconfig("qnnpack")
            prepare_qat(model.train(), inplace=True)
            fit(2, 0.005)
            convert(model.eval(), inplace=True)
    finally:
        torch.backends.quantized.engine = previous
    expected = run_torchvision(model, x[test])
    torchvision_int8_to_onnx(model.state_dict(), tmp_path / "m.onnx", resolution=64,
                             weight_type="uint8")
    got = Predictor(tmp_path / "m.onnx").run(x[test].numpy())
    assert (expected.argmax(1) == y[test].numpy()).mean() >= 0.95
    step = float(model.classifier[1].scale)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # Measured: every logit identical on an AVX2 CPU; on a VNNI CPU (Zen 5), where ONNX Runtime
    # takes other kernels, 3.3% of the logits one or two output steps off.
    assert np.abs(got - expected).max() <= 2.0001 * step


@pytest.mark.parametrize("layout", ["packed weight and bias", "weight and bias"])
def test_older_torch_layouts_of_the_classifier_convert_to_the_same_file(per_tensor, tmp_path,
                                                                        layout):
    """torch saved a quantized Linear three ways over its releases; torchvision's ImageNet int8
    file (torchvision 0.5) predates the current one. The state_dict's version metadata tells
    torch's loader which one it holds, and our reader takes each."""
    from collections import OrderedDict

    modern = per_tensor[1].state_dict()
    weight, bias = modern["classifier.1._packed_params._packed_params"]
    legacy = OrderedDict((k, v) for k, v in modern.items()
                         if not k.startswith("classifier.1._packed_params"))
    legacy._metadata = OrderedDict(modern._metadata)
    if layout == "weight and bias":  # quantized Linear version 1
        legacy.update({"classifier.1.weight": weight, "classifier.1.bias": bias})
        legacy._metadata["classifier.1"] = {"version": 1}
    else:  # LinearPackedParams version 1
        legacy.update({"classifier.1._packed_params.weight": weight,
                       "classifier.1._packed_params.bias": bias})
    legacy._metadata["classifier.1._packed_params"] = {"version": 1}
    torchvision_int8_to_onnx(modern, tmp_path / "modern.onnx", resolution=64, weight_type="uint8")
    report = torchvision_int8_to_onnx(legacy, tmp_path / "legacy.onnx", resolution=64,
                                      weight_type="uint8")
    assert report["max_steps"] <= 2.0001  # torchvision's own loader read it the same way
    assert (tmp_path / "modern.onnx").read_bytes() == (tmp_path / "legacy.onnx").read_bytes()
