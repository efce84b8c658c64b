"""Models that take uint8 pixels (export --pixel-input): the same answers as the eager model on
the same images, in every format, in int8, and through the runtime, eval, predict and bench."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fit_digits_model, randomize_batchnorm
from PIL import Image

from mobilenetv2 import create_model, save_weights
from mobilenetv2.cli import main
from mobilenetv2.export import ExportConfig, export_model, load_artefact, real_images
from mobilenetv2.runtime import Predictor, normalized_to_pixels

pytest.importorskip("onnxruntime")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(weights file, model): a small digits model (8x8, gray, ~92%)."""
    folder = tmp_path_factory.mktemp("pixels")
    model = fit_digits_model()
    save_weights(model, folder / "digits.safetensors")
    return folder / "digits.safetensors", model


def normalised(pixels: torch.Tensor, meta: dict) -> torch.Tensor:
    """What the eager model gets for uint8 (N, H, W, C) pixels: (N, C, H, W), scaled and
    normalised as torchvision's ToTensor + Normalize do."""
    channels = pixels.shape[-1]
    mean = torch.tensor(meta["mean"][:channels]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"][:channels]).view(1, -1, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std


@pytest.mark.parametrize("fmt", ["onnx", "exported", "torchscript"])
def test_a_pixel_input_export_equals_eager_on_the_same_pixels(fmt, tmp_path, generator):
    model = randomize_batchnorm(create_model("mobilenet_v2_035", num_classes=10,
                                             small_input=True), generator).eval()
    model.meta.update(input_size=[3, 32, 32])
    path = tmp_path / f"m.{ {'onnx': 'onnx', 'exported': 'pt2', 'torchscript': 'pt'}[fmt] }"
    report = export_model(model, path, ExportConfig(format=fmt, pixel_input=True))
    assert report.input_shape == ("batch", 32, 32, 3) and report.metadata["input_format"] == "pixels"
    # Not symmetric in height and width, and unlike in each channel: a layout or channel-order
    # mistake inside the model changes the answer.
    pixels = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=generator)
    (got,) = load_artefact(path, fmt)(pixels.numpy())
    with torch.no_grad():
        expected = model(normalised(pixels, model.meta)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_pixel_backbone_onnx_names_its_feature_maps(tmp_path):
    backbone = create_model("mobilenet_v2_035", features_only=True, out_indices=(1, 3))
    export_model(backbone, tmp_path / "f.onnx", ExportConfig(resolution=32, pixel_input=True))
    program = Predictor(tmp_path / "f.onnx")
    assert [o.name for o in program.session.get_outputs()] == ["features_0", "features_1"]
    maps = program.features(np.zeros((2, 32, 32, 3), np.uint8))
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in program.meta["feature_info"]]


def test_a_gray_pixel_onnx_takes_uint8_and_the_runtime_feeds_it(digits, tmp_path):
    weights, model = digits
    export_model(model, tmp_path / "pixels.onnx", ExportConfig(pixel_input=True))
    export_model(model, tmp_path / "float.onnx")
    pixels, floats = Predictor(tmp_path / "pixels.onnx"), Predictor(tmp_path / "float.onnx")
    node = pixels.session.get_inputs()[0]
    assert (node.type, node.shape) == ("tensor(uint8)", ["batch", 8, 8, 1])
    assert pixels.pixel_input and pixels.meta["input_format"] == "pixels"
    assert not floats.pixel_input and floats.meta["input_format"] == "normalized"
    batch = real_images(16, (1, 8, 8), model.meta)  # normalised, as the data pipeline gives
    as_pixels = normalized_to_pixels(batch.numpy(), model.meta["mean"], model.meta["std"])
    assert as_pixels.dtype == np.uint8 and as_pixels.shape == (16, 8, 8, 1)
    # A normalised batch is turned back into its pixels: the same answers either way; the
    # float model sees the digits before rounding to 8 bits (they are upsampled from 8x8).
    np.testing.assert_array_equal(pixels.run(batch.numpy()), pixels.run(as_pixels))
    np.testing.assert_allclose(pixels.run(as_pixels), floats.run(batch.numpy()), atol=0.1)
    assert (pixels.run(as_pixels).argmax(1) == floats.run(batch.numpy()).argmax(1)).mean() >= 0.9
    with pytest.raises(ValueError, match="takes uint8 pixels"):
        pixels.run(as_pixels.astype(np.float32))


def test_predict_with_a_pixel_model_equals_the_float_model(digits, tmp_path, capsys):
    _, model = digits
    export_model(model, tmp_path / "pixels.onnx", ExportConfig(pixel_input=True))
    export_model(model, tmp_path / "float.onnx")
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):  # larger than the model: the runtime resizes them in uint8 first
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(files[-1])
    pixels = Predictor(tmp_path / "pixels.onnx")
    assert pixels.preprocess(files[0]).dtype == np.uint8
    got = pixels.predict(files, top_k=3)
    expected = Predictor(tmp_path / "float.onnx").predict(files, top_k=3)
    for row, want in zip(got, expected, strict=True):
        assert [name for name, _ in row] == [name for name, _ in want]
        np.testing.assert_allclose([p for _, p in row], [p for _, p in want], atol=1e-5)
    # The command, whose worker processes preprocess with the file's metadata: the same.
    for name in ("pixels", "float"):
        assert main(["predict", "--weights", str(tmp_path / f"{name}.onnx"), *map(str, files),
                     "--top-k", "3", "--workers", "1", "--json"]) == 0
    pixel_json, float_json = (json.loads(line)["predictions"]
                              for line in capsys.readouterr().out.splitlines())
    assert [[c["index"] for c in item["top_k"]] for item in pixel_json] == [
        [c["index"] for c in item["top_k"]] for item in float_json]


@pytest.mark.parametrize("suffix", [".onnx", ".pte"])
def test_predict_with_a_pixel_model_prints_no_warning(suffix, digits, tmp_path):
    import os
    import subprocess
    import sys

    if suffix == ".pte":
        pytest.importorskip("executorch")
    weights, _ = digits
    assert run_cli("export", "--weights", weights, "--out", tmp_path / f"px{suffix}",
                   "--pixel-input") == 0
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    # The pixels the workers preprocess are writable arrays: torch.as_tensor warned, once per
    # worker process, of a read-only one. A process of its own, as torch warns once a process.
    assert Predictor(tmp_path / f"px{suffix}").preprocess(folder / "0.png").flags.writeable
    result = subprocess.run([sys.executable, "-m", "mobilenetv2", "predict", "--weights",
                             str(tmp_path / f"px{suffix}"), str(folder), "--out",
                             str(tmp_path / "p.csv"), "--batch-size", "2", "--workers", "2"],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("4 images classified, 0 unreadable")


def test_quantize_and_eval_bench_a_pixel_input_int8_model(digits, tmp_path, capsys):
    weights, _ = digits
    assert run_cli("quantize", "--weights", weights, "--data", "digits", "--out",
                   tmp_path / "int8.onnx", "--pixel-input", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1_int8"] >= report["top1_fp32"] - 2.0 >= 83.0
    int8 = Predictor(tmp_path / "int8.onnx")
    assert int8.pixel_input and int8.session.get_inputs()[0].type == "tensor(uint8)"
    # The preprocessing stays float: quantized, it rounded the image twice more, slowly.
    import onnx

    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    prelude = [node for node in graph.node if node.op_type in ("Mul", "Add")]
    assert prelude and not any(producers.get(name) == "DequantizeLinear"
                               for node in prelude for name in node.input)
    assert run_cli("eval", "--weights", tmp_path / "int8.onnx", "--json") == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(report["top1_int8"])
    assert run_cli("bench", "--weights", tmp_path / "int8.onnx", "--batch-sizes", "2", "--rounds",
                   "1", "--round-time", "0.05", "--warmup", "1", "--backends", "ort_int8",
                   "--no-references", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]  # the file: fed uint8 pixels
    assert row["status"] == "ok", row["reason"]
    assert row["backend"] == "ort_int8"  # an int8 file is timed in int8's row


def test_train_int8_pixel_input_writes_pixel_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--resolution", "16", "--model", "mobilenet_v2_035", "--epochs", "1",
                   "--batch-size", "128", "--no-tensorboard", "--out", out, "--int8",
                   "--pixel-input") == 0
    for name in ("model.onnx", "model_int8.onnx"):
        node = Predictor(out / name).session.get_inputs()[0]
        assert (node.type, node.shape) == ("tensor(uint8)", ["batch", 16, 16, 1]), name
    assert json.loads((out / "config.json").read_text())["pixel_input"] is True
    # Turning --int8 off on resume drops what went with it, rather than refusing --pixel-input.
    assert run_cli("train", "--resume", out, "--no-int8") == 0
    assert json.loads((out / "config.json").read_text())["pixel_input"] is False


def test_executorch_pixel_programs_fp32_and_int8(digits, tmp_path):
    pytest.importorskip("executorch")
    from mobilenetv2.quantize import compare_onnx, quantize_executorch

    _, model = digits
    # Gray: the channels-first view is a reshape, which XNNPACK takes (a permute it did not).
    export_model(model, tmp_path / "fp32.pte", ExportConfig(format="executorch", pixel_input=True))
    calibration = real_images(64, (1, 8, 8), model.meta).split(16)
    quantize_executorch(model, tmp_path / "int8.pte", calibration, pixel_input=True)
    program = Predictor(tmp_path / "int8.pte")
    assert program.pixel_input and program.meta["quantization"]["calibration_images"] == 64
    from sklearn.datasets import load_digits

    images = real_images(500, (1, 8, 8), model.meta)[200:]
    labels = torch.as_tensor(load_digits().target[200:500])
    accuracy = compare_onnx({"fp32": tmp_path / "fp32.pte", "int8": tmp_path / "int8.pte"},
                            torch.utils.data.TensorDataset(images, labels))
    assert accuracy["top1_fp32"] >= 85.0 and accuracy["agreement_int8"] >= 95.0


def test_the_pixel_input_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "bench_pixel_input.py"
    result = subprocess.run([sys.executable, str(script), "--model", "mobilenet_v2_035",
                             "--resolution", "32", "--runtimes", "onnx", "--precisions", "int8",
                             "--rounds", "2", "--repeats", "1", "--json"],
                            capture_output=True, text=True, timeout=600, check=True)
    row = json.loads(result.stdout)["results"]["onnx int8"]
    assert row["pixels_over_float"] > 0 and row["pixels_over_float_with_app_normalisation"] > 0
