"""One backend of ``mobilenetv2 bench``, in a process of its own.

``python -m mobilenetv2.bench_worker SPEC_JSON`` sets up the backend the spec names, then answers
JSON-line requests on stdin ("run batch B for S seconds" -> the call times; "exit" -> its peak
memory). ONNX Runtime workers import numpy and onnxruntime only, never torch, so their peak
memory is the deployment runtime's own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ORT_BACKENDS = ("ort", "ort_int8", "torchvision_ort", "torchvision_ort_int8")



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
    except OSError:
        pass
    if spec["backend"].startswith("cuda"):
        import torch

        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def _setup_backend(spec: dict[str, Any]) -> tuple[Any, dict[int, Any], Any]:
    """(call, {batch size: input}, synchronise) for the spec's backend."""
    import numpy as np

    backend, shape = spec["backend"], spec["shape"]
    rng = np.random.default_rng(0)
    arrays = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in spec["batch_sizes"]}
    if backend in ORT_BACKENDS:
        from .runtime import Predictor  # numpy and onnxruntime only: no torch in this process

        predictor = Predictor(spec["onnx"], threads=spec["threads"])
        return predictor.run, arrays, lambda: None
    return _setup_torch_backend(spec, arrays)


def _setup_torch_backend(spec: dict[str, Any], arrays: dict[int, Any]) -> tuple[Any, dict[int, Any], Any]:
    import torch

    from .export import real_images
    from .quantize import quantize_torch
    from .weights import load_model

    torch.set_num_threads(spec["threads"])
    backend = spec["backend"]
    if backend.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if backend == "torchvision_eager":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v2(num_classes=spec["num_classes"]).eval()
    else:
        model = load_model(spec["weights"]).eval()
    inputs = {b: torch.from_numpy(a) for b, a in arrays.items()}
    if backend == "torch_int8":
        images = real_images(32, tuple(spec["shape"]), model.meta)
        model = quantize_torch(model, images.split(8))
    if backend in ("channels_last", "compile") or backend.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
        inputs = {b: x.contiguous(memory_format=torch.channels_last) for b, x in inputs.items()}
    dtype = {"cuda_fp16": torch.float16, "cuda_bf16": torch.bfloat16,
             "cuda_compile": torch.float16}.get(backend, torch.float32)
    device = torch.device("cuda" if backend.startswith("cuda") else "cpu")
    model = model.to(device, dtype)
    inputs = {b: x.to(device, dtype) for b, x in inputs.items()}
    if backend in ("compile", "cuda_compile"):
        # One static graph per batch size: dynamic-shape kernels are slower on CPU.
        model = torch.compile(model, dynamic=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def call(x: Any) -> Any:
        with torch.inference_mode():
            return model(x)

    return call, inputs, sync


if __name__ == "__main__":
    worker_main(sys.argv[1])
