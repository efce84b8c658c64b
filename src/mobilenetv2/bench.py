"""Latency, throughput and peak memory per inference backend, as data.

:func:`run_benchmark` measures each backend -- eager fp32 (NCHW), eager channels_last,
torch.compile, ONNX Runtime fp32 and int8 on our export, PyTorch int8, and on CUDA fp32 / fp16 /
bf16 / compile / CUDA graphs / ONNX Runtime's CUDA and TensorRT providers -- next to references
measured in the same run: torchvision's ``mobilenet_v2`` in eager mode and ONNX Runtime on
torchvision's ONNX export (fp32 and, with the same int8 recipe, int8), and on CUDA torchvision's
model in fp32 and in fp16 channels_last. A row's ratios are to the references on its device.
Absolute times on a shared machine drift; ratios measured in one run do not.

How it measures:

* every backend runs in its own worker process, started once; the parent sends it "run batch
  size B for S seconds" and gets back one latency per call. Rounds are interleaved: round r runs
  every backend once (the order rotates each round), so machine drift hits all alike.
* each worker warms up (``warmup`` untimed calls per batch size, after compiling) before the
  first round; latency is the median and 90th percentile over every timed call of all rounds,
  throughput is batch size / median latency. A speedup against a reference is the median over
  rounds of the paired ratio of round medians, so a slow patch of the machine cancels out.
* peak memory is the worker's own peak resident set (``VmHWM`` in ``/proc/self/status``), so
  it is the backend's whole footprint (runtime, weights, activations), measured alone. ONNX
  Runtime workers import only NumPy and onnxruntime (through :mod:`mobilenetv2.runtime`), never
  torch. ``getrusage``'s ``ru_maxrss`` is not used: on Linux a freshly started child inherits
  the parent's peak from before ``exec``, so it would report the parent's gigabyte.
  CUDA backends also report ``torch.cuda.max_memory_allocated``.

Each worker runs :mod:`mobilenetv2.bench_worker` (``python -m``), which imports only the
standard library at the top (and the package imports its names lazily): ONNX Runtime workers
stay torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CPU_BACKENDS = ("eager", "channels_last", "compile", "ort", "ort_int8", "torch_int8",
                "executorch", "executorch_int8")
# ExecuTorch programs have a fixed batch: one is made per batch size.
EXECUTORCH_BACKENDS = ("executorch", "executorch_int8")
CUDA_BACKENDS = ("cuda_fp32", "cuda_fp16", "cuda_bf16", "cuda_compile", "cuda_graphs",
                 "ort_cuda", "ort_tensorrt")
CPU_REFERENCES = ("torchvision_eager", "torchvision_ort", "torchvision_ort_int8")
CUDA_REFERENCES = ("torchvision_cuda_fp32", "torchvision_cuda_fp16")
REFERENCES = CPU_REFERENCES + CUDA_REFERENCES
ALL_BACKENDS = CPU_BACKENDS + CUDA_BACKENDS
# Every row gets its speedup against each of these that ran on its device, in the same run.
RATIO_REFERENCES = REFERENCES
# ONNX Runtime execution providers of the GPU backends (onnxruntime-gpu has them).
ORT_PROVIDERS = {"ort_cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "ort_tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                  "CPUExecutionProvider"]}
CALIBRATION_IMAGES = 64

log = logging.getLogger("mobilenetv2")


def on_cuda(backend: str) -> bool:
    """Whether a backend or reference runs on the GPU (its ratios are to the GPU references)."""
    return backend in CUDA_BACKENDS or backend in CUDA_REFERENCES


def default_backends() -> tuple[str, ...]:
    """Every CPU backend, and the GPU ones where CUDA is."""
    import torch

    return ALL_BACKENDS if torch.cuda.is_available() else CPU_BACKENDS


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how.

    Args:
        weights: a weights file (any format load_model reads, or an .onnx file, which limits
            the run to the ONNX Runtime backends, or a .pte program, run by the ExecuTorch
            backend of its kind); default: ``model`` randomly initialised.
        model: a registered model name, used without ``weights``.
        model_kwargs: constructor arguments for ``model`` (num_classes, small_input ...).
        batch_sizes: batch sizes to measure.
        resolution: input size (default: the model's).
        backends: from :data:`ALL_BACKENDS`.
        references: also measure torchvision's model (:data:`REFERENCES`).
        threads: intra-op threads for every backend (default: physical cores).
        rounds: interleaved rounds.
        round_time: seconds each backend runs per batch size and round.
        warmup: untimed calls per backend and batch size before the first round.
        timeout: seconds a worker may take to start (compiling included) or answer.
    """

    weights: str | None = None
    model: str = "mobilenet_v2_100"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = (1, 32)
    resolution: int | None = None
    backends: tuple[str, ...] = field(default_factory=default_backends)
    references: bool = True
    threads: int | None = None
    rounds: int = 5
    round_time: float = 1.0
    warmup: int = 3
    timeout: float = 900.0

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in ALL_BACKENDS + REFERENCES]
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r}; choose from: {', '.join(ALL_BACKENDS)}")
        if not self.backends and not self.references:
            raise ValueError("nothing to measure: name at least one backend")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.rounds < 1 or self.warmup < 0 or not self.round_time > 0:
            raise ValueError("rounds must be >= 1, warmup >= 0 and round_time > 0")
        if self.resolution is not None and self.resolution < 32:
            raise ValueError(f"resolution must be at least 32, got {self.resolution}")


@dataclass
class Measurement:
    """One backend at one batch size: ``status`` is ``ok`` or ``skipped`` (with ``reason``)."""

    backend: str
    batch_size: int
    role: str = "backend"  # or "reference"
    status: str = "ok"
    reason: str | None = None
    latency_ms_median: float | None = None
    latency_ms_p90: float | None = None
    images_per_second: float | None = None
    calls: int = 0
    round_medians_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The parent: prepare artefacts, run the workers' rounds, collect the numbers


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Measure every backend of ``config`` and return the report as plain data (JSON-able).

    Returns:
        ``{"settings", "machine", "versions", "results": [Measurement as dict, ...]}``.

    Raises:
        ValueError, FileNotFoundError: for weights or settings that cannot be benchmarked.
    """
    with tempfile.TemporaryDirectory(prefix="mobilenetv2-bench-") as tmp:
        plan = _prepare(config, Path(tmp))
        results: dict[str, list[Measurement]] = {}
        workers: dict[str, _Worker] = {}
        try:
            # Setting up takes minutes on a small CPU: say what is happening, on stderr.
            log.info("bench: setting up %s (exports, int8 calibration and compilation take "
                     "a while)", ", ".join(name for name, *_, skip in plan.backends if not skip))
            # PyTorch workers start (import torch, compile) while the exported files are written.
            _start_workers(plan, config, Path(tmp), workers, results, with_onnx=False)
            for write in plan.artefacts:
                write()
            _start_workers(plan, config, Path(tmp), workers, results, with_onnx=True)
            for name, worker in workers.items():  # they set up in parallel; wait for each
                error = worker.wait_ready(config.timeout)
                if error:
                    results[name] = [Measurement(name, b, worker.role, "skipped", error)
                                     for b in config.batch_sizes]
            live = [w for n, w in workers.items() if n not in results]
            results |= _run_rounds(live, config)
        finally:
            for worker in workers.values():
                worker.kill()
    ordered = [m for name, _, _, _ in plan.backends for m in results[name]]
    _add_speedups(ordered)
    return {
        "settings": {**{k: v for k, v in asdict(config).items() if k != "timeout"},
                     "threads": plan.threads, "shape": plan.shape, "model": plan.model_name},
        "machine": plan.machine,
        "versions": plan.versions,
        "notes": plan.notes,
        "results": [asdict(m) for m in ordered],
    }


def _start_workers(plan: _Plan, config: BenchConfig, tmp: Path, workers: dict[str, _Worker],
                   results: dict[str, list[Measurement]], with_onnx: bool) -> None:
    """Start a worker per backend whose spec does (or does not) name an ONNX file or
    ExecuTorch programs (the artefacts written in between)."""
    for name, role, spec, skip in plan.backends:
        exported = "onnx" in spec or "programs" in spec
        if name in results or name in workers or exported != with_onnx:
            continue
        if skip:
            results[name] = [Measurement(name, b, role, "skipped", skip) for b in config.batch_sizes]
            continue
        spec = {**spec, "backend": name, "threads": plan.threads, "warmup": config.warmup,
                "batch_sizes": list(config.batch_sizes)}
        workers[name] = _Worker(name, role, spec, tmp)


def _run_rounds(live: list[_Worker], config: BenchConfig) -> dict[str, list[Measurement]]:
    """Interleaved rounds: each round runs every worker at every batch size, in rotated order."""
    latencies: dict[tuple[str, int], list[float]] = {
        (w.name, b): [] for w in live for b in config.batch_sizes}
    round_medians: dict[tuple[str, int], list[float]] = {key: [] for key in latencies}
    for r in range(config.rounds):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        log.info("bench: round %d/%d (about %.3g s)", r + 1, config.rounds,
                 len(live) * len(config.batch_sizes) * config.round_time)
        for batch in config.batch_sizes:
            for worker in order:
                if worker.failed:
                    continue
                times = worker.run(batch, config.round_time, config.timeout)
                if times:
                    latencies[(worker.name, batch)] += times
                    round_medians[(worker.name, batch)].append(statistics.median(times) * 1e3)
                time.sleep(0.05)  # let the last worker's spinning threads go idle
    results = {}
    for worker in live:
        peaks = worker.close()
        results[worker.name] = [
            _summarise(worker, b, latencies[(worker.name, b)], round_medians[(worker.name, b)],
                       peaks) for b in config.batch_sizes]
    return results


def _summarise(worker: _Worker, batch: int, times: list[float], medians: list[float],
               peaks: dict[str, Any]) -> Measurement:
    if worker.failed or not times:
        return Measurement(worker.name, batch, worker.role, "skipped",
                           worker.failed or "no timed calls")
    times_ms = sorted(t * 1e3 for t in times)
    median = statistics.median(times_ms)
    p90 = times_ms[min(len(times_ms) - 1, int(round(0.9 * (len(times_ms) - 1))))]
    return Measurement(
        worker.name, batch, worker.role, latency_ms_median=median, latency_ms_p90=p90,
        images_per_second=batch / median * 1e3, calls=len(times_ms),
        round_medians_ms=[round(m, 4) for m in medians], peak_rss_mb=peaks.get("peak_rss_mb"),
        peak_cuda_mb=peaks.get("peak_cuda_mb"),
    )


def _add_speedups(measurements: list[Measurement]) -> None:
    """speedup[ref]: how many times faster than the reference, at the same batch size.

    The median over rounds of (reference's round median / this backend's round median): the
    two ran within seconds of each other in every round, so a slow patch of the machine moves
    both and cancels out of the ratio. Without round medians, the overall medians' ratio.
    """
    reference = {(m.backend, m.batch_size): m for m in measurements
                 if m.role == "reference" and m.status == "ok"}
    for m in measurements:
        if m.status != "ok":
            continue
        for name in RATIO_REFERENCES:
            ref = reference.get((name, m.batch_size))
            if ref is None or m.backend == name or on_cuda(name) != on_cuda(m.backend):
                continue
            pairs = list(zip(ref.round_medians_ms, m.round_medians_ms, strict=False))
            if pairs and len(ref.round_medians_ms) == len(m.round_medians_ms):
                ratio = statistics.median(r / own for r, own in pairs)
            else:
                ratio = ref.latency_ms_median / m.latency_ms_median
            m.speedup[name] = round(ratio, 4)


class _Worker:
    """One backend's process, driven over stdin / stdout with JSON lines."""

    def __init__(self, name: str, role: str, spec: dict[str, Any], tmp: Path) -> None:
        self.name, self.role, self.failed = name, role, None
        self.log = tmp / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mobilenetv2.bench_worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
            )
        # A thread reads the worker's lines, so that waiting for one can time out: not
        # select(), which takes only sockets on Windows ("not a socket" for a pipe).
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    def _read_lines(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # the worker's stdout closed: it exited

    def _message(self, timeout: float) -> dict[str, Any] | None:
        """The worker's next message; None when it exited or sent none within ``timeout``."""
        try:
            line = self._lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if not line.endswith(b"\n"):  # the end of its output, or a line cut off by its death
            self._lines.put(b"")  # (for every later call too)
            return None
        return json.loads(line)

    def _fail(self, what: str) -> str:
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
        self.failed = f"{what}{': ' + tail[0][:300] if tail else ''}"
        self.process.kill()
        return self.failed

    def wait_ready(self, timeout: float) -> str | None:
        message = self._message(timeout)
        if message is None:
            return self._fail("the worker died or timed out while setting up")
        if "error" in message:
            self.failed = message["error"]
            self.process.kill()
            return self.failed
        return None

    def run(self, batch: int, seconds: float, timeout: float) -> list[float]:
        try:
            self.process.stdin.write(json.dumps({"batch": batch, "seconds": seconds}).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self._fail("the worker exited")
            return []
        message = self._message(timeout)
        if message is None or "error" in message:
            self._fail(message["error"] if message else "the worker died or timed out")
            return []
        return message["times"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> dict[str, Any]:
        if self.failed:
            return {}
        try:
            self.process.stdin.write(b'{"exit": true}\n')
            self.process.stdin.flush()
            message = self._message(60) or {}
        except BrokenPipeError:
            message = {}
        self.process.wait(timeout=60)
        return message


# --------------------------------------------------------------------------------------------
# Preparing: the model, its exports and the references


@dataclass
class _Plan:
    """Per backend (name, role, worker spec, reason to skip or None), and the ONNX files to
    write (``artefacts``) before the workers whose spec names an ``onnx`` file can start."""

    backends: list[tuple[str, str, dict[str, Any], str | None]]
    artefacts: list[Callable[[], Any]]
    shape: list[int]
    threads: int
    model_name: str
    machine: dict[str, Any]
    versions: dict[str, str]
    notes: list[str]


def _prepare(config: BenchConfig, tmp: Path) -> _Plan:
    """Load the model, save it for the PyTorch workers, plan the ONNX files and the rows."""
    import torch

    from .export import ExportConfig, export_model, input_shape, real_images
    from .quantize import quantize_executorch, quantize_onnx
    from .registry import create_model
    from .runtime import Predictor, default_threads, is_executorch_program, runs_in_runtime
    from .weights import load_model, save_weights

    weights = Path(config.weights) if config.weights else None
    exported = weights is not None and runs_in_runtime(weights)  # not PyTorch weights
    pte_weights = exported and is_executorch_program(weights)
    onnx_weights = exported and not pte_weights
    int8_weights = False  # an int8 file: the row of its kind, never quantized again
    if exported:
        predictor = Predictor(weights)
        meta, model = predictor.meta, None
        int8_weights = bool(meta.get("quantization")) or (onnx_weights and _has_int8_ops(weights))
        shape = [int(v) for v in meta["input_size"]]
        if config.resolution not in (None, shape[-1]):
            raise ValueError(f"{weights} takes {shape[-1]}x{shape[-1]} inputs only: "
                             f"drop --resolution or export it again at {config.resolution}")
        num_classes = int(predictor.num_classes or 0) or 1000  # a backbone: none
    else:
        model = (load_model(weights) if weights
                 else create_model(config.model, **config.model_kwargs)).eval()
        meta, shape = model.meta, list(input_shape(model, config.resolution))
        num_classes = int(getattr(model, "num_classes", 0)) or 1000
        save_weights(model, tmp / "model.safetensors")
    # What the network is (an export keeps its model's configuration in its metadata).
    model_config = model.config if model is not None else dict(meta.get("config") or {})
    wanted = [b for b in config.backends if b in ALL_BACKENDS]
    if onnx_weights and int8_weights:  # "ort" on an int8 file (as docs once showed): its row
        wanted = list(dict.fromkeys("ort_int8" if b == "ort" else b for b in wanted))
    fp32_onnx = weights if onnx_weights else tmp / "model.onnx"
    int8_onnx = weights if onnx_weights and int8_weights else tmp / "model_int8.onnx"
    artefacts: list[Callable[[], Any]] = []
    cuda = torch.cuda.is_available()
    ort_version, providers = _ort_providers()
    if not exported and {"ort", "ort_int8", *ORT_PROVIDERS} & set(wanted):
        # (config.resolution, not shape[-1]: None exports at the weights' own size, which may be
        # below the 32 px an explicit --resolution needs: the digits default trains at 16.)
        artefacts.append(lambda: export_model(model, fp32_onnx,
                                              ExportConfig(resolution=config.resolution)))
    if "ort_int8" in wanted and not pte_weights and not int8_weights:
        calibration = real_images(CALIBRATION_IMAGES, tuple(shape), meta).numpy()
        artefacts.append(lambda: quantize_onnx(fp32_onnx, int8_onnx,
                                               calibration.reshape(-1, 16, *shape)))
    executorch_skip = _executorch_missing() if set(EXECUTORCH_BACKENDS) & set(wanted) else None
    programs = {backend: {b: tmp / f"{backend}_{b}.pte" for b in config.batch_sizes}
                for backend in EXECUTORCH_BACKENDS}
    if pte_weights:  # the file is the one program of its kind, whatever the batch size
        kind = "executorch_int8" if int8_weights else "executorch"
        programs[kind] = dict.fromkeys(config.batch_sizes, weights)
    if "executorch" in wanted and not (exported or executorch_skip):
        for b, path in programs["executorch"].items():
            artefacts.append(lambda b=b, path=path: export_model(
                model, path, ExportConfig(format="executorch", resolution=config.resolution,
                                          batch_size=b)))
    if "executorch_int8" in wanted and not (exported or executorch_skip):
        images = real_images(CALIBRATION_IMAGES, tuple(shape), meta)
        for b, path in programs["executorch_int8"].items():
            artefacts.append(lambda b=b, path=path: quantize_executorch(
                model, path, images.split(16), resolution=shape[-1], batch_size=b))
    rows: list[tuple[str, str, dict[str, Any], str | None]] = []
    for backend in wanted:
        spec: dict[str, Any] = {"shape": shape, "num_classes": num_classes,
                                "weights": str(tmp / "model.safetensors")}
        skip = None
        if backend in EXECUTORCH_BACKENDS:
            spec["programs"] = {str(b): str(path) for b, path in programs[backend].items()}
            skip = executorch_skip or (
                "needs PyTorch weights; --weights is an ONNX file" if onnx_weights else
                f"--weights is {'an fp32' if kind == 'executorch' else 'an int8'} program"
                if pte_weights and backend != kind else None)
        elif pte_weights:
            skip = "needs PyTorch weights or ONNX; --weights is an ExecuTorch program"
        elif backend in ORT_PROVIDERS:
            spec["onnx"], spec["providers"] = str(fp32_onnx), ORT_PROVIDERS[backend]
            if ORT_PROVIDERS[backend][0] not in providers:
                skip = (f"onnxruntime {ort_version} here has no {ORT_PROVIDERS[backend][0]} "
                        "(install onnxruntime-gpu)")
        elif backend in ("ort", "ort_int8"):
            spec["onnx"] = str(fp32_onnx if backend == "ort" else int8_onnx)
        elif onnx_weights:
            skip = "needs PyTorch weights; --weights is an ONNX file"
        elif on_cuda(backend) and not cuda:
            skip = "CUDA is not available here"
        rows.append((backend, "backend", spec, skip))
    if rows and all(skip for _, _, _, skip in rows):
        reasons = "; ".join(f"{backend}: {skip}" for backend, _, _, skip in rows)
        raise ValueError(f"none of the backends asked for can run here ({reasons}): "
                         "pick others with --backends")
    if config.references:
        # The references of the devices asked for: CPU ones for CPU backends, GPU ones for GPU
        # backends (both when only references were asked for).
        gpu = any(on_cuda(b) for b in wanted) or not wanted
        cpu = any(not on_cuda(b) for b in wanted) or not wanted
        width = float(model_config.get("width_mult") or 1.0)
        rows += _plan_references(shape, num_classes, tmp, artefacts, cpu=cpu, gpu=gpu,
                                 gpu_skip=None if cuda else "CUDA is not available here",
                                 width=width)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "onnxruntime", "onnx", "numpy"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = "missing"
    machine = machine_info()
    if cuda:
        machine["cuda"] = torch.cuda.get_device_name()
    notes = []
    quantized_here = set() if int8_weights else {"ort_int8", "executorch_int8"} & set(wanted)
    if quantized_here:
        notes.append(f"{' and '.join(sorted(quantized_here))}: calibrated here on "
                     f"{CALIBRATION_IMAGES} digits images, for speed only; "
                     "`mobilenetv2 quantize` measures accuracy")
    if config.references:
        small = bool(model_config.get("small_input"))
        notes.append("torchvision references: its mobilenet_v2 with as many classes, the same "
                     "width, 3 input channels, the same input size; ONNX exported with "
                     "torch.onnx.export (TorchScript-based), int8 with the same recipe as ours"
                     + ("; this model is small_input (stem and second row at stride 1: about 4x "
                        "the multiply-adds of torchvision's at this size), so the ratios compare "
                        "networks of different cost" if small else ""))
    name = weights.name if weights else model.config.get("name", config.model)
    return _Plan(rows, artefacts, shape, config.threads or default_threads(), name, machine,
                 versions, notes)


def _has_int8_ops(path: Path) -> bool:
    """Whether an ONNX file holds quantized operators (QDQ or QOperator), whoever made it."""
    try:
        import onnx
    except ImportError:
        return False
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - ONNX Runtime, which loaded it, decides what it is
        return False
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv",
                                "ConvInteger", "MatMulInteger") for node in graph.node)


def _executorch_missing() -> str | None:
    """Why the ExecuTorch backends cannot run here, or None when they can."""
    from .pte import require_executorch

    try:
        require_executorch()
    except (ImportError, ValueError) as e:
        return str(e)
    return None


def _ort_providers() -> tuple[str, set[str]]:
    """ONNX Runtime's version and execution providers here ("missing", none without it)."""
    try:
        import onnxruntime
    except ImportError:
        return "missing", set()
    return onnxruntime.__version__, set(onnxruntime.get_available_providers())


def _plan_references(shape: list[int], num_classes: int, tmp: Path,
                     artefacts: list[Callable[[], Any]], cpu: bool = True, gpu: bool = False,
                     gpu_skip: str | None = None, width: float = 1.0,
                     ) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """torchvision's mobilenet_v2 in eager mode, and exported as anyone would, fp32 and int8
    (``cpu``); on the GPU (``gpu``, skipped for ``gpu_skip``) in fp32 NCHW, as anyone would
    first run it, and in fp16 channels_last, the settings of our fastest eager GPU backend.
    torchvision's model has our model's width multiplier (1.0 for the seed variant)."""
    tv_shape = [3, *shape[1:]]
    base = {"shape": tv_shape, "num_classes": num_classes, "width_mult": width}
    rows = [(name, "reference", base, gpu_skip) for name in CUDA_REFERENCES] if gpu else []
    if not cpu:
        return rows
    fp32, int8 = tmp / "torchvision.onnx", tmp / "torchvision_int8.onnx"

    def write() -> None:
        import warnings

        import torch
        import torchvision

        from .export import real_images
        from .model import IMAGENET_MEAN, IMAGENET_STD
        from .quantize import quantize_onnx

        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, *tv_shape),), str(fp32), dynamo=False,
                              input_names=["input"], output_names=["logits"], opset_version=18,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        meta = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        calibration = real_images(CALIBRATION_IMAGES, tuple(tv_shape), meta).numpy()
        quantize_onnx(fp32, int8, calibration.reshape(-1, 16, *tv_shape))

    artefacts.append(write)
    return [("torchvision_eager", "reference", base, None),
            ("torchvision_ort", "reference", {**base, "onnx": str(fp32)}, None),
            ("torchvision_ort_int8", "reference", {**base, "onnx": str(int8)}, None)] + rows


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model name, core count and the instruction sets the numbers depend on: PyTorch's
    CPU kernel level (``AVX2``, ``AVX512``, ...) and whether the CPU has VNNI, which decides
    what int8 gains over fp32 (1.3-1.7x without, 2.1-2.3x with, in BENCHMARKS.md). On ARM,
    ``dot_product``: whether it has the dot-product instructions (``asimddp``: a Raspberry Pi
    5's Cortex-A76 has them, a Pi 4's Cortex-A72 not), with which ONNX Runtime's int8 gains
    most there, as with VNNI on x86. On a Mac, ``sysctl`` names the chip and its features
    (every Apple M chip has the dot product; ``platform`` called it "arm", without)."""
    import torch

    from .runtime import cpu_has_vnni, sysctl

    try:
        fields = [line.partition(":") for line in cpuinfo.read_text().splitlines()]
    except OSError:
        fields = []
    values = {}
    for key, _, value in fields:
        values.setdefault(key.strip(), value.strip())  # the first CPU's
    if not values and sys.platform == "darwin":  # no /proc/cpuinfo on macOS: sysctl says it
        values = {"model name": sysctl("machdep.cpu.brand_string"),  # "Apple M2"
                  "Features": "asimddp" if sysctl("hw.optional.arm.FEAT_DotProd") == "1" else ""}
    arm = platform.machine().lower() in ("aarch64", "arm64") or "asimd" in values.get(
        "Features", "").split()
    # x86 kernels name the CPU model; ARM ones give part numbers only, and a Raspberry Pi's
    # names the board ("Raspberry Pi 5 Model B Rev 1.0").
    cpu = (values.get("model name") or values.get("Model") or platform.processor()
           or platform.machine())
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "vnni": not arm and cpu_has_vnni()}
    if arm:
        info["dot_product"] = "asimddp" in values.get("Features", "").split()
    return info
