"""One backend of ``mobilenetv2 bench``, in a process of its own.

``python -m mobilenetv2.bench_worker SPEC_JSON`` sets up the backend the spec names, then answers
JSON-line requests on stdin ("run batch B for S seconds" -> the call times; "exit" -> its peak
memory). ONNX Runtime workers import numpy and onnxruntime only, never torch, so their peak
memory is the deployment runtime's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ORT_BACKENDS = ("ort", "ort_int8", "ort_cuda", "ort_tensorrt", "torchvision_ort",
                "torchvision_ort_int8")
# dtype of each GPU backend; all of them run channels_last except the fp32 NCHW reference.
CUDA_DTYPES = {"cuda_fp32": "float32", "cuda_fp16": "float16", "cuda_bf16": "bfloat16",
               "cuda_compile": "float16", "cuda_graphs": "float16",
               "torchvision_cuda_fp32": "float32", "torchvision_cuda_fp16": "float16"}


def worker_main(spec_json: str) -> None:
    """A worker's life: set up one backend, answer "run" requests, report its peak memory."""
    # Protocol messages go to the real stdout; anything a library prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(spec_json)

    def send(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        call, inputs, sync = _setup_backend(spec)
        for batch in spec["batch_sizes"]:
            for _ in range(max(spec["warmup"], 1)):
                call(inputs[batch])
            sync()
    except Exception as e:  # the parent reports the backend as skipped, with this reason
        send({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
        return
    send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("exit"):
            send(_peaks(spec))
            return
        x, times = inputs[request["batch"]], []
        end = time.perf_counter() + request["seconds"]
        try:
            while not times or time.perf_counter() < end:
                start = time.perf_counter()
                call(x)
                sync()
                times.append(time.perf_counter() - start)
        except Exception as e:
            send({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
            return
        send({"times": times})


def _peaks(spec: dict[str, Any]) -> dict[str, Any]:
    peaks: dict[str, Any] = {"peak_rss_mb": None, "peak_cuda_mb": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:  # macOS: getrusage's maximum, in bytes there (Windows has neither: none)
        with contextlib.suppress(ImportError):
            import resource

            if sys.platform == "darwin":
                maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peaks["peak_rss_mb"] = round(maxrss / 2**20, 1)
    if spec["backend"] in CUDA_DTYPES:
        import torch

        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def _setup_backend(spec: dict[str, Any]) -> tuple[Any, dict[int, Any], Any]:
    """(call, {batch size: input}, synchronise) for the spec's backend."""
    import numpy as np

    backend, shape = spec["backend"], spec["shape"]
    rng = np.random.default_rng(0)
    arrays = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in spec["batch_sizes"]}
    if "programs" in spec:  # ExecuTorch: one fixed-batch program per batch size
        from .runtime import Predictor

        programs = {int(b): Predictor(path, threads=spec["threads"])
                    for b, path in spec["programs"].items()}
        if next(iter(programs.values())).pixel_input:
            arrays = _pixels(arrays)

        def call(x: Any) -> Any:
            program = programs[len(x)]
            return program.features(x) if program.is_feature_extractor else program.run(x)

        return call, arrays, lambda: None
    if backend in ORT_BACKENDS:
        from .runtime import Predictor  # numpy and onnxruntime only: no torch in this process

        predictor = Predictor(spec["onnx"], threads=spec["threads"], providers=spec.get("providers"))
        call = predictor.features if predictor.is_feature_extractor else predictor.run
        return call, _pixels(arrays) if predictor.pixel_input else arrays, lambda: None
    return _setup_torch_backend(spec, arrays)


def _pixels(arrays: dict[int, Any]) -> dict[int, Any]:
    """Random uint8 (N, H, W, C) batches for pixel-input models, in place of float ones."""
    import numpy as np

    rng = np.random.default_rng(0)
    return {b: rng.integers(0, 256, (b, *x.shape[2:], x.shape[1]), dtype=np.uint8)
            for b, x in arrays.items()}


def _setup_torch_backend(spec: dict[str, Any], arrays: dict[int, Any]) -> tuple[Any, dict[int, Any], Any]:
    import torch

    from .export import real_images
    from .quantize import quantize_torch
    from .weights import load_model

    torch.set_num_threads(spec["threads"])
    backend = spec["backend"]
    on_gpu = backend in CUDA_DTYPES
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if backend.startswith("torchvision"):
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v2(num_classes=spec["num_classes"],
                                                width_mult=spec.get("width_mult", 1.0)).eval()
    else:
        model = load_model(spec["weights"]).eval()
    inputs = {b: torch.from_numpy(a) for b, a in arrays.items()}
    if backend == "torch_int8":
        images = real_images(32, tuple(spec["shape"]), model.meta)
        model = quantize_torch(model, images.split(8))
    if backend in ("channels_last", "compile") or (on_gpu and backend != "torchvision_cuda_fp32"):
        model = model.to(memory_format=torch.channels_last)
        inputs = {b: x.contiguous(memory_format=torch.channels_last) for b, x in inputs.items()}
    dtype = getattr(torch, CUDA_DTYPES.get(backend, "float32"))
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # one input shape per batch size: autotune it
    model = model.to(device, dtype)
    inputs = {b: x.to(device, dtype) for b, x in inputs.items()}
    if backend in ("compile", "cuda_compile"):
        # One static graph per batch size: dynamic-shape kernels are slower on CPU.
        model = torch.compile(model, dynamic=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if backend == "cuda_graphs":
        return _cuda_graphs(model, inputs), inputs, sync

    def call(x: Any) -> Any:
        with torch.inference_mode():
            return model(x)

    return call, inputs, sync


def _cuda_graphs(model: Any, inputs: dict[int, Any]) -> Any:
    """A call that replays one captured CUDA graph per batch size: no Python and no kernel
    launch overhead per layer, the inference analogue of ``torch.compile(mode="reduce-overhead")``."""
    import torch

    graphs = {}
    with torch.inference_mode():
        for batch, x in inputs.items():
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up off the default stream, as capture needs
                for _ in range(3):
                    model(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(static_in)
            graphs[batch] = (graph, static_in, static_out)

    def call(x: Any) -> Any:
        graph, static_in, static_out = graphs[x.shape[0]]
        with torch.inference_mode():  # static_in is an inference tensor
            static_in.copy_(x)
        graph.replay()
        return static_out

    return call


if __name__ == "__main__":
    worker_main(sys.argv[1])
