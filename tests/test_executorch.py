"""ExecuTorch (.pte, XNNPACK): exports equal eager, int8 agrees with fp32, the commands take them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import fit_digits_model

pytest.importorskip("executorch", reason="the [executorch] extra (Linux x86_64, macOS arm64)")

from mobilenetv2 import create_model, load_model, save_weights  # noqa: E402
from mobilenetv2.cli import main  # noqa: E402
from mobilenetv2.export import ExportConfig, export_model, real_images  # noqa: E402
from mobilenetv2.quantize import QuantizeConfig, compare_onnx, quantize_executorch  # noqa: E402
from mobilenetv2.runtime import Predictor, is_executorch_program  # noqa: E402
from mobilenetv2.weights import WeightsError  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(weights file, fp32 .pte file, model): the small digits model of test_quantize (~92%)."""
    folder = tmp_path_factory.mktemp("executorch")
    model = fit_digits_model()
    save_weights(model, folder / "digits.safetensors")
    export_model(model, folder / "fp32.pte", ExportConfig(format="executorch"))
    return folder / "digits.safetensors", folder / "fp32.pte", model


def _holdout(model: torch.nn.Module, count: int = 300):
    from sklearn.datasets import load_digits

    images = real_images(200 + count, tuple(model.meta["input_size"]), model.meta)[200:]
    labels = torch.as_tensor(load_digits().target[200:200 + count])
    return torch.utils.data.TensorDataset(images, labels)


# --------------------------------------------------------------------------------------------
# Export


def test_pte_equals_eager_and_carries_the_preprocessing(trained):
    _, path, model = trained
    assert path.read_bytes()[4:6] == b"ET" and is_executorch_program(path)
    predictor = Predictor(path)
    assert predictor.batch_size == 1 and predictor.input_size == (1, 8, 8)
    assert predictor.meta["class_names"] == model.meta["class_names"] == [str(i) for i in range(10)]
    assert predictor.meta["mean"] == pytest.approx(list(model.meta["mean"]))
    assert predictor.meta["std"] == pytest.approx(list(model.meta["std"]))
    assert predictor.meta["config"]["name"] == "mobilenet_v2_tiny"
    images = real_images(5, (1, 8, 8), model.meta)  # 5 calls of the batch-1 program
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(predictor.run(images.numpy()), expected, atol=1e-4)
    # The preprocessing it carries is what predict applies: a digit image, its class.
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[:20] * 255 / 16).astype(np.uint8)
    top = [p[0][0] for p in predictor.predict(list(pixels), top_k=1)]
    assert np.mean([t == str(y) for t, y in zip(top, digits.target[:20], strict=True)]) >= 0.8


@pytest.mark.parametrize("kwargs, batch", [
    ({"features_only": True}, 2),  # a backbone: one output per feature map
    ({"tf_padding": True, "num_classes": 10}, 1),  # Keras' padding, frozen to constants
])
def test_variants_export_to_pte_with_a_fixed_batch(kwargs, batch, generator, tmp_path):
    from conftest import randomize_batchnorm

    model = randomize_batchnorm(create_model("mobilenet_v2_035", **kwargs), generator).eval()
    report = export_model(model, tmp_path / "m.pte",
                          ExportConfig(format="executorch", resolution=64, batch_size=batch))
    assert report.input_shape == (batch, 3, 64, 64) and max(report.max_abs_diff.values()) < 1e-4
    predictor = Predictor(tmp_path / "m.pte")
    images = real_images(3, (3, 64, 64), model.meta)  # 3 images: the last call is padded
    with torch.no_grad():
        expected = model(images)
    got = (predictor.features(images.numpy()) if predictor.is_feature_extractor
           else [predictor.run(images.numpy())])
    expected = expected if isinstance(expected, list) else [expected]
    assert len(got) == len(expected) == (5 if kwargs.get("features_only") else 1)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4)


def test_export_model_writes_the_format_its_file_name_says(trained, tmp_path):
    model = trained[2]
    report = export_model(model, tmp_path / "m.pte")  # no config: the suffix decides
    assert report.format == "executorch" and is_executorch_program(tmp_path / "m.pte")
    with pytest.raises(ValueError, match="'executorch' does not write .onnx files"):
        export_model(model, tmp_path / "m.onnx", ExportConfig(format="executorch"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pte"]


THREADS_SCRIPT = """
import logging, sys, threading
import numpy as np
from mobilenetv2.runtime import Predictor

logging.basicConfig(level=logging.WARNING)
path = sys.argv[1]
running = Predictor(path, threads=2)
batch = np.zeros((1, 1, 8, 8), np.float32)
expected = running.run(batch)
stop, errors = threading.Event(), []

def loop():
    try:
        while not stop.is_set():
            assert np.allclose(running.run(batch), expected)
    except Exception as e:
        errors.append(e)

worker = threading.Thread(target=loop)
worker.start()
try:
    for i in range(12):
        Predictor(path, threads=1 + i % 2).run(batch)
finally:
    stop.set()
    worker.join()
print("ok" if not errors else errors)
"""


def test_programs_loaded_with_other_thread_counts_leave_running_ones_alone(trained):
    """XNNPACK's thread pool is the process's and every loaded program keeps a pointer to it:
    resizing it for a later program crashed the process (a segmentation fault in the running
    program, in CI's fresh-clone run). In a subprocess, so that a crash fails this test only."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(trained[1])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert "cannot be resized once a program is loaded; running with 2, not 1" in done.stderr


def test_loading_a_pte_program_keeps_native_logs_off_the_terminal(trained, capfd):
    Predictor(trained[1]).run(np.zeros((1, 1, 8, 8), np.float32))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # XNNPACK's CPU probing lines included


# --------------------------------------------------------------------------------------------
# int8


def test_int8_pte_agrees_with_fp32_and_holds_int8_weights(trained, tmp_path):
    _, fp32, model = trained
    calibration = real_images(64, (1, 8, 8), model.meta).split(16)
    out = quantize_executorch(model, tmp_path / "int8.pte", calibration)
    accuracy = compare_onnx({"fp32": fp32, "int8": out}, _holdout(model))
    assert accuracy["top1_fp32"] >= 85.0
    assert accuracy["agreement_int8"] >= 97.0
    assert accuracy["top1_int8"] >= accuracy["top1_fp32"] - 2.0
    # int8 weights: a quarter of the float bytes, plus scales and the graph, which are most of
    # this tiny model's file (35 KB against 50 KB; MobileNetV2 1.0 at 224: 3.7 MB against 14 MB)
    assert out.stat().st_size < 0.75 * fp32.stat().st_size
    quantization = Predictor(out).meta["quantization"]
    assert quantization["weights"] == "int8" and quantization["calibration_images"] == 64


def test_executorch_refuses_onnx_calibration_methods(trained, tmp_path):
    with pytest.raises(ValueError, match="for ExecuTorch programs .* minmax, histogram"):
        quantize_executorch(trained[2], tmp_path / "x.pte", [torch.zeros(1, 1, 8, 8)],
                            QuantizeConfig(method="entropy"))
    assert not (tmp_path / "x.pte").exists()


# --------------------------------------------------------------------------------------------
# The commands


def test_export_eval_predict_commands_take_pte(trained, tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    weights, _, _ = trained
    out = tmp_path / "m.pte"
    assert main(["export", "--weights", str(weights), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "executorch" and report["input_shape"] == [1, 1, 8, 8]
    results = {}
    for name in (weights, out):
        assert main(["eval", "--weights", str(name), "--data", "digits", "--json"]) == 0
        results[name.suffix] = json.loads(capsys.readouterr().out)
    assert results[".pte"]["top1"] == pytest.approx(results[".safetensors"]["top1"])
    assert results[".pte"]["images"] == results[".safetensors"]["images"]
    digit = load_digits()
    Image.fromarray((digit.images[0] * 255 / 16).astype(np.uint8)).save(tmp_path / "zero.png")
    assert main(["predict", "--weights", str(out), str(tmp_path / "zero.png"), "--top-k", "1",
                 "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)["predictions"]
    assert item["top_k"][0]["class"] == str(digit.target[0])


def test_quantize_command_writes_an_int8_pte(trained, tmp_path, capsys):
    out = tmp_path / "int8.pte"
    assert main(["quantize", "--weights", str(trained[0]), "--data", "digits", "--out", str(out),
                 "--calibration-batches", "2", "--max-eval-images", "128", "--method",
                 "histogram", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "executorch" and report["weight_bits"] == 8
    assert report["method"] == "histogram" and report["eval_images"] == 128
    assert report["top1_fp32"] >= 85.0 and report["agreement_int8"] >= 97.0
    assert is_executorch_program(out)


def test_quantize_command_qat_writes_an_int8_pte_and_reports_both_models(trained, tmp_path,
                                                                         capsys, monkeypatch):
    import mobilenetv2.quantize as quantize

    seen = {}
    real = quantize.qat_finetune
    monkeypatch.setattr(quantize, "qat_finetune",
                        lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    out = tmp_path / "qat.pte"
    assert main(["quantize", "--weights", str(trained[0]), "--data", "digits", "--out", str(out),
                 "--qat", "--epochs", "1", "--calibration-batches", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["qat"] is True and report["format"] == "executorch" and out.is_file()
    assert report["top1_int8_ptq"] >= report["top1_fp32"] - 2.0
    assert report["agreement_int8"] >= 95.0 and report["top1_fp32_qat"] >= 80.0
    assert seen["seven_bit_weights"] is False  # fine-tuned for XNNPACK's 8-bit weights


@pytest.mark.parametrize("args, message", [
    (["--weight-bits", "8"], "ONNX Runtime's choices"),
    (["--weight-type", "uint8"], "ONNX Runtime's choices"),
    (["--method", "entropy"], "not available for .pte files"),
    (["--data", None], "pass --data DATA"),
])
def test_quantize_command_refuses_what_pte_cannot_take(args, message, trained, tmp_path, capsys):
    flags = {"--weights": str(trained[0]), "--data": "digits", "--out": str(tmp_path / "x.pte")}
    flags.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = [x for flag, value in flags.items() if value is not None for x in (flag, value)]
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.pte").exists()


@pytest.mark.parametrize("content", [b"not a program", "truncated"])
def test_a_damaged_pte_file_is_one_line_and_exit_2(content, trained, tmp_path, capsys):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(trained[1].read_bytes()[:300] if content == "truncated" else content)
    assert main(["eval", "--weights", str(bad), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "is not a program ExecuTorch can run here" in err and err.count("\n") == 1
    renamed = tmp_path / "renamed.bin"
    renamed.write_bytes(trained[1].read_bytes())
    with pytest.raises(WeightsError, match="ExecuTorch program"):  # by its bytes, not its name
        load_model(renamed)


def test_damaged_copies_of_a_program_are_refused_before_executorch_reads_them(trained):
    """ExecuTorch's loader is not built for damaged files: of 40 random mutants of an unsealed
    program, one aborted the process. Ours carry a checksum, so a mutant is refused before
    ExecuTorch reads it, except one cut short before the checksum, which ExecuTorch's own size
    check refuses."""
    import random

    from mobilenetv2.pte import PteSession, checksum_matches

    data = trained[1].read_bytes()
    assert checksum_matches(data) is True
    rng = random.Random(0)
    folder = trained[1].parent / "mutants"
    folder.mkdir(exist_ok=True)
    for i in range(40):
        mutant = bytearray(data)
        kind = ("flip", "truncate", "overwrite")[i % 3]
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                mutant[rng.randrange(len(mutant))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            mutant = mutant[:rng.randrange(len(mutant))]
        else:
            start = rng.randrange(len(mutant))
            mutant[start:start + 32] = rng.randbytes(32)
        path = folder / f"{i}.pte"
        path.write_bytes(bytes(mutant))
        if checksum_matches(bytes(mutant)) is None:  # cut short before the checksum: the
            assert kind == "truncate"  # header's declared size is what tells ExecuTorch
            with pytest.raises(ValueError, match="File size is too small"):
                PteSession(path)
        else:
            with pytest.raises(ValueError, match="is damaged: its bytes no longer match"):
                PteSession(path)


@pytest.mark.parametrize("argv, message", [
    (["export", "--weights", "{weights}", "--format", "executorch", "--out", "{tmp}/m.onnx"],
     "--format executorch does not write .onnx files: name the file .pte"),
    (["train", "--int8-format", "executorch", "--out", "{tmp}/run"],
     "--int8-format executorch chooses the files --int8 writes: add --int8"),
])
def test_mismatched_executorch_flags_are_one_line_and_exit_2(argv, message, trained, tmp_path,
                                                             capsys):
    argv = [a.format(weights=trained[0], tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_without_executorch_the_commands_say_which_extra_to_install(trained, tmp_path, capsys,
                                                                    monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "executorch" else real_find_spec(name, *a))
    assert main(["export", "--weights", str(trained[0]), "--out", str(tmp_path / "m.pte")]) == 2
    assert ("pip install 'mobilenetv2[executorch]'" in capsys.readouterr().err)
    assert main(["train", "--int8", "--int8-format", "executorch", "--out",
                 str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("mobilenetv2 train: error: --int8 needs "
                                               "executorch: pip install 'mobilenetv2[executorch]'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.pte").exists()


def test_train_int8_executorch_leaves_fp32_and_int8_programs_and_reports_both(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--resolution", "16", "--model", "mobilenet_v2_035", "--epochs", "2",
                 "--batch-size", "128", "--seed", "0", "--no-tensorboard", "--int8",
                 "--int8-format", "executorch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "model.pte").is_file() and (out / "model_int8.pte").is_file()
    assert not list(out.glob("*.onnx"))
    assert json.loads((out / "config.json").read_text())["int8_format"] == "executorch"
    fp32, int8 = map(float, re.search(r"fp32 ([\d.]+)%, int8 ([\d.]+)%", printed).groups())
    results = {}
    for name in ("best.safetensors", "model.pte", "model_int8.pte"):
        assert main(["eval", "--weights", str(out / name), "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["model.pte"]["top1"] == pytest.approx(results["best.safetensors"]["top1"])
    assert results["model.pte"]["top1"] == pytest.approx(fp32, abs=0.01)
    assert results["model_int8.pte"]["top1"] == pytest.approx(int8, abs=0.01)


def test_bench_measures_executorch_fp32_and_int8(capsys):
    # One program per batch size (they have a fixed batch); 2 here, as lowering an int8 program
    # takes ExecuTorch about 17 s whatever the model's size.
    assert main(["bench", "--model", "mobilenet_v2_035", "--num-classes", "10", "--resolution",
                 "32", "--batch-sizes", "2", "--rounds", "1", "--round-time", "0.05",
                 "--warmup", "1", "--threads", "1", "--backends", "executorch,executorch_int8",
                 "--no-references", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {
        ("executorch", 2), ("executorch_int8", 2)}
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert row["latency_ms_median"] > 0


def test_bench_runs_a_feature_extractor_program(tmp_path, capsys):
    export_model(create_model("mobilenet_v2_035", features_only=True), tmp_path / "f.pte",
                 ExportConfig(format="executorch", resolution=32))
    assert main(["bench", "--weights", str(tmp_path / "f.pte"), "--batch-sizes", "1",
                 "--rounds", "1", "--round-time", "0.05", "--warmup", "1", "--backends",
                 "executorch", "--no-references", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["status"] == "ok", row["reason"]


def test_bench_runs_a_pte_file_as_the_backend_of_its_kind(trained, capsys):
    assert main(["bench", "--weights", str(trained[1]), "--batch-sizes", "1,3", "--rounds", "1",
                 "--round-time", "0.05", "--warmup", "1", "--backends",
                 "eager,ort,executorch,executorch_int8", "--no-references", "--json"]) == 0
    rows = {(r["backend"], r["batch_size"]): r for r in
            json.loads(capsys.readouterr().out)["results"]}
    assert rows[("executorch", 1)]["status"] == rows[("executorch", 3)]["status"] == "ok"
    assert rows[("executorch_int8", 1)]["reason"] == "--weights is an fp32 program"
    for backend in ("eager", "ort"):
        assert "is an ExecuTorch program" in rows[(backend, 1)]["reason"]


def test_a_program_whose_metadata_is_not_json_text_is_one_clear_error(tmp_path):
    # Programs of other tools carry no checksum and go to ExecuTorch as they are; a metadata
    # method that returns a number, not JSON text, raised TypeError through Predictor (a
    # traceback from eval, predict and bench).
    from executorch.exir import to_edge_transform_and_lower

    from mobilenetv2.pte import METADATA_METHOD

    program = torch.export.export(torch.nn.Conv2d(3, 2, 1).eval(), (torch.randn(1, 3, 8, 8),))
    edge = to_edge_transform_and_lower(program, constant_methods={METADATA_METHOD: 7})
    (tmp_path / "other.pte").write_bytes(edge.to_executorch().buffer)
    with pytest.raises(ValueError, match="is not a program ExecuTorch can run here"):
        Predictor(tmp_path / "other.pte")
