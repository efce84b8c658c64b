"""CUDA code paths: the model, AMP training, compile, resume, eval, torchrun with NCCL, bench.

CI has no GPU, so these are deselected by default (``-m 'not gpu'`` in pyproject.toml) and run
where a GPU is: ``python -m pytest -m gpu`` (benchmarks/gpu_check.sh runs them with the GPU
benchmarks). Without CUDA each one fails at once rather than passing vacuously.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build, randomize_batchnorm
from safetensors.torch import load_file

from mobilenetv2 import create_model
from mobilenetv2.bench_worker import _cuda_graphs
from mobilenetv2.cli import main
from mobilenetv2.engine import device_batches
from mobilenetv2.weights import load_model

pytestmark = pytest.mark.gpu

TINY = ["--resolution", "16", "--model", "mobilenet_v2_035", "--batch-size", "128", "--seed", "0",
        "--no-tensorboard", "--log-every", "5"]


@pytest.fixture(autouse=True)
def _needs_cuda():
    assert torch.cuda.is_available(), "the gpu tests need CUDA: run them where a GPU is"
    # Exact fp32 comparisons: no TF32 in convolutions or matrix products.
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def last_metrics(out) -> dict[str, float]:
    return {k: float(v) for k, v in list(csv.DictReader((out / "metrics.csv").open()))[-1].items()}


@pytest.mark.parametrize("name", ["mobilenet_v2_100", "mobilenet_v2_035", "seed"])
def test_cuda_fp32_matches_cpu(name, generator):
    model = randomize_batchnorm(build(name, 64, num_classes=10), generator).eval()
    x = torch.randn(4, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = model(x)
        got = model.cuda()(x.cuda()).cpu()
        got_cl = model.to(memory_format=torch.channels_last)(
            x.cuda().contiguous(memory_format=torch.channels_last)).cpu()
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(got_cl, expected, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_channels_last_stays_close_to_fp32(dtype, generator):
    model = randomize_batchnorm(create_model("mobilenet_v2_100", num_classes=10), generator)
    model = model.eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 96, 96, generator=generator).cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cuda", dtype=dtype):
            got = model(x)
    assert got.dtype == dtype
    error = (got.float() - expected).abs().max() / expected.abs().max()
    assert error < (0.05 if dtype == torch.bfloat16 else 0.01), error


def test_backward_under_amp_reaches_every_parameter():
    model = create_model("mobilenet_v2_100", num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(p.grad.is_cuda and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def amp_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"cuda-{request.param}")
    # The digits default cut to 5 epochs: 95.3% top-1 on a CPU in fp32, 97.5% with bf16.
    assert run_cli("train", "--epochs", "5", "--seed", "0", "--no-tensorboard", "--device", "cuda",
                   "--amp", request.param, "--out", out) == 0
    return request.param, out


def test_amp_training_on_cuda_learns_and_saves_its_scaler(amp_run):
    amp, out = amp_run
    metrics = last_metrics(out)
    assert metrics["val_top1"] > 85, metrics
    assert metrics["images_per_second"] > 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert json.loads((out / "config.json").read_text())["amp"] == amp
    assert (checkpoint["scaler"] is not None) == (amp == "fp16")  # a GradScaler only for fp16
    if amp == "fp16":
        assert checkpoint["scaler"]["scale"] > 0


def test_weights_trained_on_cuda_evaluate_alike_on_cpu_and_cuda(amp_run, capsys):
    _, out = amp_run
    results = {}
    for device in ("cpu", "cuda"):
        assert run_cli("eval", "--weights", out / "last.safetensors", "--device", device, "--json") == 0
        results[device] = json.loads(capsys.readouterr().out)
    assert results["cpu"]["images"] == results["cuda"]["images"] == 360
    assert abs(results["cpu"]["top1"] - results["cuda"]["top1"]) <= 0.6  # at most two images
    assert results["cuda"]["top1"] == pytest.approx(last_metrics(out)["val_top1"], abs=0.6)
    assert all(t.device.type == "cpu" for t in load_file(out / "last.safetensors").values())
    assert load_model(out / "last.safetensors").num_classes == 10


def test_predict_on_cuda(amp_run, tmp_path, capsys):
    from PIL import Image

    _, out = amp_run
    Image.new("L", (8, 8), 128).save(tmp_path / "x.png")
    assert run_cli("predict", "--weights", out / "best.safetensors", tmp_path / "x.png",
                   "--device", "cuda", "--top-k", "3", "--json") == 0
    capsys.readouterr()


def test_deterministic_resume_on_cuda_gives_the_same_weights(tmp_path):
    common = [*TINY, "--deterministic", "--device", "cuda"]
    assert run_cli("train", *common, "--epochs", "2", "--out", tmp_path / "whole") == 0
    assert run_cli("train", *common, "--epochs", "1", "--out", tmp_path / "half") == 0
    assert run_cli("train", "--resume", tmp_path / "half", "--epochs", "2") == 0
    whole, resumed = (load_file(tmp_path / n / "last.safetensors") for n in ("whole", "half"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=0, rtol=0, msg=key)


def test_compiled_training_on_cuda(tmp_path):
    assert run_cli("train", "--epochs", "5", "--seed", "0", "--no-tensorboard", "--device", "cuda",
                   "--compile", "--out", tmp_path) == 0
    assert last_metrics(tmp_path)["val_top1"] > 85
    model = load_model(tmp_path / "last.safetensors")  # no _orig_mod. prefix in what was saved
    assert model.eval()(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_torchrun_uses_nccl_and_sync_bn_on_one_gpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "-m", "mobilenetv2", "train", *TINY, "--epochs", "1", "--sync-bn", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl" in result.stderr.lower() or "nccl" in result.stdout.lower(), result.stderr[-2000:]
    assert (tmp_path / "last.safetensors").is_file()


def test_more_processes_than_gpus_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    assert run_cli("train", *TINY, "--epochs", "1", "--out", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one process per GPU" in err[0], err


def test_batches_copied_on_a_side_stream_arrive_whole_and_in_order(generator):
    # Each batch is copied while the compute stream is still busy with the previous step; a
    # missing wait would let the clone below read a half-copied batch.
    batches = [(torch.randn(64, 3, 32, 32, generator=generator).pin_memory(),
                torch.randint(0, 10, (64,), generator=generator).pin_memory(), i % 2) for i in range(6)]
    batches.insert(3, (None, None, 64))  # a batch whose images were all unreadable
    busy = torch.randn(2048, 2048, device="cuda")
    got = []
    for images, labels, dropped in device_batches(batches, torch.device("cuda"), channels_last=True):
        for _ in range(10):
            busy = torch.tanh(busy @ busy)
        if images is None:
            got.append((None, None, dropped))
            continue
        assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
        got.append((images.clone(), labels.clone(), dropped))
        del images, labels  # their memory may be reused at once: record_stream must prevent it
    torch.cuda.synchronize()
    assert len(got) == len(batches)
    for (images, labels, dropped), (want_images, want_labels, want_dropped) in zip(got, batches, strict=True):
        assert dropped == want_dropped
        if want_images is None:
            assert images is None and labels is None
            continue
        assert torch.equal(images.cpu(), want_images) and torch.equal(labels.cpu(), want_labels)


def test_cuda_graphs_replay_gives_the_eager_outputs(generator):
    model = randomize_batchnorm(create_model("mobilenet_v2_050", num_classes=10), generator)
    model = model.eval().cuda().half().to(memory_format=torch.channels_last)
    inputs = {b: torch.randn(b, 3, 64, 64, generator=generator).cuda().half()
              .contiguous(memory_format=torch.channels_last) for b in (1, 4)}
    call = _cuda_graphs(model, inputs)
    for batch in (4, 1):
        x = torch.randn_like(inputs[batch])  # new data through the captured input buffer
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(call(x).clone(), expected, atol=1e-3, rtol=1e-3)


def test_bench_measures_the_cuda_backends_against_torchvision_on_cuda(capsys):
    backends = "cuda_fp32,cuda_fp16,cuda_bf16,cuda_graphs,cuda_compile"
    code = main(["bench", "--model", "mobilenet_v2_035", "--num-classes", "10", "--resolution", "64",
                 "--batch-sizes", "1,4", "--rounds", "2", "--round-time", "0.2", "--warmup", "2",
                 "--backends", backends, "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    assert report["machine"]["cuda"]
    for backend in [*backends.split(","), "torchvision_cuda_fp32", "torchvision_cuda_fp16"]:
        for batch in (1, 4):
            row = rows[(backend, batch)]
            assert row["status"] == "ok", (backend, row["reason"])
            assert row["peak_cuda_mb"] > 0
            if row["role"] == "backend":
                assert set(row["speedup"]) == {"torchvision_cuda_fp32", "torchvision_cuda_fp16"}
    assert not any(b.startswith("torchvision_ort") or b == "torchvision_eager" for b, _ in rows)
