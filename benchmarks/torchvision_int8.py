"""torchvision's int8 MobileNetV2: in PyTorch, and converted for ONNX Runtime (BENCHMARKS.md).

    python benchmarks/torchvision_int8.py [--rounds 7] [--batch-sizes 1,32] [--threads 2]

Builds torchvision's quantized mobilenet_v2 as ``quantize=True`` does (ImageNet shapes, 224x224;
the speed does not depend on the weights' values, so no download), converts its state_dict with
``mobilenetv2 quantize`` (``torchvision_int8_to_onnx``) with int8 and with uint8 weights, and
times, in interleaved rounds on one input batch: torchvision's int8 model in PyTorch on the
qnnpack engine (the reference: the engine its weights were made for), the two ONNX files, and
ONNX Runtime fp32 on torchvision's float model, folded and exported. Prints each one's latency
and its median per-round ratio to the reference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from interleaved import interleaved_seconds, ratio_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    import torchvision
    from torchvision.models.quantization import mobilenet_v2

    from mobilenetv2 import load_model
    from mobilenetv2.export import ExportConfig, export_model
    from mobilenetv2.quantize import cpu_has_vnni, torchvision_int8_to_onnx

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="torchvision-int8-"))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = mobilenet_v2(weights=None, quantize=True).eval()  # sets the qnnpack engine
    for weight_type in ("int8", "uint8"):
        torchvision_int8_to_onnx(int8.state_dict(), folder / f"{weight_type}.onnx",
                                 weight_type=weight_type)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), folder / "float.pth")
    export_model(load_model(folder / "float.pth"), folder / "fp32.onnx", ExportConfig())

    def onnxruntime(name: str, batch: np.ndarray) -> Callable[[], object]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(folder / name, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch}
        return lambda: session.run(None, feed)

    def pytorch(batch: np.ndarray) -> Callable[[], object]:
        images = torch.from_numpy(batch)

        def run() -> object:
            with torch.no_grad():
                return int8(images)
        return run

    print(f"torch {torch.__version__} (quantized engine {torch.backends.quantized.engine}), "
          f"onnxruntime {ort.__version__}, {args.threads} threads, {args.rounds} rounds, "
          f"VNNI: {cpu_has_vnni()}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batch = np.random.default_rng(0).standard_normal((batch_size, 3, 224, 224), np.float32)
        runs = {"torchvision int8, PyTorch qnnpack (reference)": pytorch(batch),
                "same weights, ONNX Runtime, uint8 weights": onnxruntime("uint8.onnx", batch),
                "same weights, ONNX Runtime, int8 weights": onnxruntime("int8.onnx", batch),
                "torchvision fp32, ONNX Runtime": onnxruntime("fp32.onnx", batch)}
        seconds = interleaved_seconds(runs, args.rounds, repeats=10 if batch_size == 1 else 2)
        reference = seconds["torchvision int8, PyTorch qnnpack (reference)"]
        print(f"batch {batch_size}")
        for name, times in seconds.items():
            print(f"  {name:48s} {1000 * statistics.median(times):8.1f} ms "
                  f"{batch_size / statistics.median(times):7.1f} img/s  "
                  f"{ratio_line(times, reference)}")


if __name__ == "__main__":
    main()
