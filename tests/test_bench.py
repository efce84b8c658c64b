"""bench: one JSON object, every backend measured or skipped with a reason, ratios computed."""

from __future__ import annotations

import json

import pytest
import torch

from mobilenetv2 import create_model
from mobilenetv2.bench import BenchConfig, Measurement, _add_speedups
from mobilenetv2.cli import main
from mobilenetv2.export import ExportConfig, export_model

TINY = ["--model", "mobilenet_v2_035", "--num-classes", "10", "--resolution", "64",
        "--batch-sizes", "1,2", "--rounds", "2", "--round-time", "0.05", "--warmup", "1",
        "--threads", "1"]


def test_bench_json_on_a_tiny_setting(capsys):
    code = main(["bench", *TINY, "--backends", "eager,ort,cuda_fp16", "--no-references", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)  # exactly one JSON object on stdout
    rows = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(b, n) for b in ("eager", "ort", "cuda_fp16") for n in (1, 2)}
    for backend in ("eager", "ort"):
        for batch in (1, 2):
            row = rows[(backend, batch)]
            assert row["status"] == "ok", row["reason"]
            assert 0 < row["latency_ms_median"] <= row["latency_ms_p90"]
            assert row["images_per_second"] == pytest.approx(batch / row["latency_ms_median"] * 1e3)
            assert len(row["round_medians_ms"]) == 2 and row["calls"] >= 2
            assert row["peak_rss_mb"] > 10
    # The ONNX Runtime worker never imports torch, so its footprint is far below eager's.
    assert rows[("ort", 1)]["peak_rss_mb"] < rows[("eager", 1)]["peak_rss_mb"]
    if not torch.cuda.is_available():
        assert rows[("cuda_fp16", 1)]["status"] == "skipped"
        assert "CUDA" in rows[("cuda_fp16", 1)]["reason"]
    assert report["settings"]["shape"] == [3, 64, 64]
    assert {"torch", "onnxruntime", "numpy"} <= set(report["versions"])
    assert report["machine"]["cpu"]
    from mobilenetv2.runtime import cpu_has_vnni  # what int8's gain depends on

    assert report["machine"]["vnni"] is cpu_has_vnni()
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_bench_says_on_stderr_what_it_is_doing_while_it_sets_up_and_measures(capsys):
    # A default run sets up for minutes (exports, calibration, torch.compile) on a small CPU:
    # without a word on stderr it looks hung.
    assert main(["bench", *TINY, "--backends", "eager", "--no-references", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays one JSON object
    assert captured.err.splitlines() == [
        "bench: setting up eager (exports, int8 calibration and compilation take a while)",
        "bench: round 1/2 (about 0.1 s)", "bench: round 2/2 (about 0.1 s)"]


def test_bench_waits_for_its_workers_without_select_which_windows_has_only_for_sockets(
        monkeypatch, capsys):
    # Windows' select() refuses pipes ("WinError 10038: not a socket"): every bench there ended
    # in that error before the first backend was timed.
    import select

    def sockets_only(*args, **kwargs):
        raise OSError(10038, "An operation was attempted on something that is not a socket")

    monkeypatch.setattr(select, "select", sockets_only)
    code = main(["bench", *TINY, "--batch-sizes", "1", "--rounds", "1", "--backends", "eager",
                 "--no-references", "--json"])
    assert code == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["status"] == "ok" and row["latency_ms_median"] > 0


def test_bench_on_an_onnx_file_skips_the_pytorch_backends(tmp_path, capsys):
    model = create_model("mobilenet_v2_035", num_classes=10, small_input=True)
    export_model(model, tmp_path / "m.onnx", ExportConfig())
    code = main(["bench", "--weights", str(tmp_path / "m.onnx"), "--batch-sizes", "1",
                 "--rounds", "1", "--round-time", "0.05", "--warmup", "1",
                 "--backends", "eager,ort", "--no-references", "--json"])
    rows = {r["backend"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert code == 0
    assert rows["eager"]["status"] == "skipped" and "ONNX file" in rows["eager"]["reason"]
    assert rows["ort"]["status"] == "ok"
    # Asking only for backends the file cannot run is a mistake, not an empty report with exit 0.
    assert main(["bench", "--weights", str(tmp_path / "m.onnx"), "--backends", "eager",
                 "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "none of the backends asked for can run here (eager: needs PyTorch weights" in err
    assert err.count("\n") == 1


def test_bench_on_weights_trained_at_16_px_times_them_at_their_own_size(tmp_path, capsys):
    # The digits default trains at 16 px; bench --weights on its best.safetensors refused with
    # "resolution must be at least 32, got 16", a flag the user never passed: the ONNX file
    # was exported with the weights' size as an explicit --resolution.
    from mobilenetv2 import save_weights

    model = create_model("mobilenet_v2_035", num_classes=10, small_input=True, in_channels=1)
    model.meta["input_size"] = [1, 16, 16]
    save_weights(model, tmp_path / "digits.safetensors")
    code = main(["bench", "--weights", str(tmp_path / "digits.safetensors"), "--batch-sizes", "1",
                 "--rounds", "1", "--round-time", "0.05", "--warmup", "1", "--threads", "1",
                 "--backends", "ort", "--no-references", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["settings"]["shape"] == [1, 16, 16]
    (row,) = report["results"]
    assert row["status"] == "ok", row["reason"]


def test_bench_on_an_int8_onnx_file_times_it_as_ort_int8(tmp_path, capsys):
    # It was timed as "ort" (fp32's row) while ort_int8 quantized it again and failed, with a
    # warning per layer; the references were built at width 1.0 whatever the file's.
    from mobilenetv2.export import real_images
    from mobilenetv2.quantize import quantize_onnx

    model = create_model("mobilenet_v2_050", num_classes=10, small_input=True, in_channels=1)
    export_model(model, tmp_path / "m.onnx", ExportConfig())
    shape = tuple(model.meta["input_size"])
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx",
                  real_images(16, shape, model.meta).numpy().reshape(-1, 16, *shape))
    code = main(["bench", "--weights", str(tmp_path / "q.onnx"), "--batch-sizes", "1",
                 "--rounds", "1", "--round-time", "0.05", "--warmup", "1",
                 "--backends", "ort,ort_int8", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    rows = {r["backend"]: r for r in report["results"]}
    assert code == 0
    backends = [r["backend"] for r in report["results"] if r["role"] == "backend"]
    assert backends == ["ort_int8"]  # "ort" asked of an int8 file is its int8 row
    assert rows["ort_int8"]["status"] == "ok", rows["ort_int8"]["reason"]
    assert "Expected bias" not in captured.err  # not quantized a second time
    notes = " ".join(report["notes"])
    assert "calibrated here" not in notes and "small_input" in notes  # read off the file


def test_bench_on_a_backbone_onnx_file(tmp_path, capsys):
    # It crashed with a TypeError (a feature extractor has no class count) until stop 14.
    export_model(create_model("mobilenet_v2_035", features_only=True), tmp_path / "f.onnx",
                 ExportConfig(resolution=32))
    assert main(["bench", "--weights", str(tmp_path / "f.onnx"), "--batch-sizes", "1",
                 "--rounds", "1", "--round-time", "0.05", "--warmup", "1", "--backends", "ort",
                 "--no-references", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["status"] == "ok", row["reason"]


def test_speedups_are_reference_latency_over_own_latency():
    paired = [Measurement("ort", 8, latency_ms_median=2.0, round_medians_ms=[1.0, 2.0, 4.0]),
              Measurement("torchvision_ort", 8, "reference", latency_ms_median=6.0,
                          round_medians_ms=[3.0, 6.0, 8.0])]
    _add_speedups(paired)  # per-round ratios 3, 3, 2: the machine slowed both in round 2
    assert paired[0].speedup == {"torchvision_ort": 3.0}
    rows = [Measurement("ort", 1, latency_ms_median=2.0),
            Measurement("torchvision_eager", 1, "reference", latency_ms_median=10.0),
            Measurement("torchvision_ort", 1, "reference", latency_ms_median=3.0),
            Measurement("eager", 1, status="skipped", reason="x")]
    _add_speedups(rows)
    assert rows[0].speedup == {"torchvision_eager": 5.0, "torchvision_ort": 1.5}
    assert rows[1].speedup == {"torchvision_ort": 0.3}  # the slower reference
    assert rows[3].speedup == {}


def test_benchmark_scripts_interleave_their_contenders_in_a_rotating_order(monkeypatch):
    # benchmarks/interleaved.py times torchvision_int8.py's, int8_openvino.py's and
    # bench_pixel_input.py's contenders: none may always run right after the same other one.
    import sys
    import time
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    sys.modules.pop("interleaved", None)
    from interleaved import interleaved_seconds

    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = interleaved_seconds(runs, rounds=3, repeats=2)
    assert {name: len(times) for name, times in seconds.items()} == {"a": 3, "b": 3, "c": 3}
    timed = calls[6:]  # after two warm-up calls each
    rounds = [timed[i:i + 6:2] for i in range(0, len(timed), 6)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_the_bench_table_says_how_its_speedups_are_computed():
    from dataclasses import asdict

    from mobilenetv2.cli.deploy import format_report

    rows = [Measurement("ort", 8, latency_ms_median=2.0, latency_ms_p90=4.0, images_per_second=4e3,
                        round_medians_ms=[1.0, 2.0, 4.0]),
            Measurement("torchvision_ort", 8, "reference", latency_ms_median=10.0, latency_ms_p90=12.0,
                        images_per_second=800.0, round_medians_ms=[3.0, 6.0, 8.0])]
    _add_speedups(rows)  # per-round ratios 3, 3, 2: 3.0x, where the medians' ratio is 10 / 2
    report = {"settings": {"model": "m", "shape": [3, 32, 32], "threads": 1, "rounds": 3,
                           "round_time": 1.0, "warmup": 1},
              "machine": {"cpu": "cpu", "cores": 2}, "versions": {},
              "results": [asdict(m) for m in rows]}
    text = format_report(report)
    assert "median over rounds of a reference's round-median latency / this row's" in text
    row = next(line for line in text.splitlines() if line.startswith("ort "))
    assert "3.00x" in row and "3.00x" not in text.replace(row, "")


@pytest.mark.parametrize("args, message", [
    (["--backends", "tensorrt"], "unknown backend 'tensorrt'"),
    (["--weights", "missing.safetensors"], "not found"),
    (["--resolution", "16"], "at least 32"),
])
def test_bench_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(["bench", "--rounds", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_config_rejects_empty_work():
    with pytest.raises(ValueError, match="nothing to measure"):
        BenchConfig(backends=(), references=False)


@pytest.mark.slow
def test_bench_every_backend_and_reference_reports_ok_or_a_reason(capsys):
    assert main(["bench", *TINY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for row in report["results"]:
        assert row["status"] == "ok" or row["reason"], row
        if row["status"] == "ok" and row["role"] == "backend":
            assert {"torchvision_eager", "torchvision_ort"} <= set(row["speedup"])


def test_rows_are_compared_with_the_references_of_their_own_device():
    rows = [Measurement("cuda_fp16", 1, latency_ms_median=1.0),
            Measurement("ort", 1, latency_ms_median=2.0),
            Measurement("torchvision_eager", 1, "reference", latency_ms_median=4.0),
            Measurement("torchvision_cuda_fp32", 1, "reference", latency_ms_median=3.0)]
    _add_speedups(rows)
    assert rows[0].speedup == {"torchvision_cuda_fp32": 3.0}
    assert rows[1].speedup == {"torchvision_eager": 2.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given where CUDA is missing")
def test_gpu_backends_without_a_gpu_are_skipped_with_reasons(capsys):
    assert main(["bench", *TINY, "--batch-sizes", "1", "--backends", "eager,cuda_graphs,ort_cuda"]) == 0
    text = capsys.readouterr().out
    assert "vs tv eager" in text and "vs tv cuda fp32" in text  # a CPU and a GPU table
    skipped = {line.split()[0]: line for line in text.splitlines() if "skipped:" in line}
    assert "CUDA is not available" in skipped["cuda_graphs"]
    assert "CUDAExecutionProvider" in skipped["ort_cuda"]
    assert "CUDA is not available" in skipped["torchvision_cuda_fp16"]
    assert "torchvision_ort" not in skipped  # the CPU references ran


# /proc/cpuinfo of a Raspberry Pi 5 (Cortex-A76) and 4 (Cortex-A72), one core of four shown:
# aarch64 kernels give no "model name", and only the A76 lists the dot product (asimddp).
PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_bench_names_an_apple_chip_and_its_dot_product_from_sysctl(tmp_path, monkeypatch):
    """macOS has no /proc/cpuinfo: bench's header on an M2 said "arm (8 cores, ..., no dot
    product (asimddp))", no chip and an instruction it has."""
    import platform
    import subprocess
    import sys

    from mobilenetv2.bench import machine_info
    from mobilenetv2.cli.deploy import format_report

    sysctl = {"machdep.cpu.brand_string": "Apple M2\n", "hw.optional.arm.FEAT_DotProd": "1\n"}
    asked = []

    def run(command, **kwargs):
        if command[0] != "sysctl":  # (platform's own on "darwin": uname -p)
            return subprocess.CompletedProcess(command, 1, "", "")
        asked.append(command[-1])
        return subprocess.CompletedProcess(command, 0, sysctl.get(command[-1], ""), "")

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    machine = machine_info(tmp_path / "no-cpuinfo")
    assert asked == list(sysctl)
    assert machine["cpu"] == "Apple M2" and machine["dot_product"] is True
    report = {"settings": {"model": "mobilenet_v2_100", "shape": [3, 224, 224], "threads": 4,
                           "rounds": 1, "round_time": 1.0, "warmup": 1},
              "machine": machine, "versions": {}, "results": []}
    header = format_report(report).splitlines()[1]
    assert header.startswith("machine: Apple M2 (") and header.endswith(", dot product (asimddp))")


def test_bench_workers_measure_their_peak_memory_on_a_mac(monkeypatch):
    """macOS has no /proc/self/status: every row's peak MB was 0 there; getrusage has it
    (in bytes on macOS, in KiB on Linux). Windows has neither: "-", not 0 MB."""
    import resource
    import sys
    from pathlib import Path

    from mobilenetv2.bench_worker import _peaks

    def no_proc(self, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(Path, "read_text", no_proc)
    monkeypatch.setattr(sys, "platform", "darwin")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    monkeypatch.setattr(resource, "getrusage", lambda who: type(usage)(
        (*usage[:2], 734_003_200, *usage[3:])))  # ru_maxrss: 700 MiB, in bytes
    assert _peaks({"backend": "eager"}) == {"peak_rss_mb": 700.0, "peak_cuda_mb": None}
    monkeypatch.setattr(sys, "platform", "win32")
    assert _peaks({"backend": "eager"}) == {"peak_rss_mb": None, "peak_cuda_mb": None}

    from mobilenetv2.cli.deploy import format_report

    row = {"backend": "eager", "role": "candidate", "status": "ok", "batch_size": 1,
           "latency_ms_median": 5.0, "latency_ms_p90": 6.0,
           "images_per_second": 200.0, "peak_rss_mb": None, "peak_cuda_mb": None, "speedup": {}}
    report = {"settings": {"model": "mobilenet_v2_100", "shape": [3, 224, 224], "threads": 4,
                           "rounds": 1, "round_time": 1.0, "warmup": 1},
              "machine": {"cpu": "x", "cores": 4}, "versions": {}, "results": [row]}
    line = next(line for line in format_report(report).splitlines() if line.startswith("eager"))
    assert line.split()[:6] == ["eager", "1", "5.00", "6.00", "200.0", "-"]


@pytest.mark.parametrize("board, dot_product", [("5", True), ("4", False)])
def test_bench_names_an_arm_board_and_its_dot_product_not_vnni(board, dot_product, tmp_path,
                                                               monkeypatch):
    """On a Raspberry Pi, bench's header said "aarch64 (4 cores, ..., no VNNI)": no board, and
    an x86 instruction set where what decides int8's gain is the dot product."""
    import platform

    from mobilenetv2.bench import machine_info
    from mobilenetv2.cli.deploy import format_report

    text = PI_CPUINFO.replace("Pi 5", f"Pi {board}")
    if not dot_product:
        text = text.replace(" asimddp", "").replace("0xd0b", "0xd08")
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    machine = machine_info(tmp_path / "cpuinfo")
    assert machine["cpu"] == f"Raspberry Pi {board} Model B Rev 1.0"
    assert machine["dot_product"] is dot_product and machine["vnni"] is False
    report = {"settings": {"model": "mobilenet_v2_100", "shape": [3, 224, 224], "threads": 4,
                           "rounds": 1, "round_time": 1.0, "warmup": 1},
              "machine": machine, "versions": {}, "results": []}
    header = format_report(report).splitlines()[1]
    assert header.startswith(f"machine: Raspberry Pi {board} Model B Rev 1.0 (")
    assert header.endswith(f", {'' if dot_product else 'no '}dot product (asimddp))")
    assert "VNNI" not in header
