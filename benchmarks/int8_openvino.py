"""Does another runtime run our int8 model 2x faster than ONNX Runtime runs fp32? (BENCHMARKS.md)

    pip install openvino        # not a dependency of mobilenetv2: this experiment only
    python benchmarks/int8_openvino.py [--rounds 7] [--batch-size 32] [--threads 2]

Exports mobilenet_v2_100 at 224x224, quantizes it with the recipe of ``mobilenetv2 quantize``
(QDQ, calibrated on real images), and times, in interleaved rounds on one input batch: ONNX
Runtime fp32 (the reference), ONNX Runtime int8, and OpenVINO's CPU plugin on the same fp32 and
int8 files (latency and throughput hints). Prints each one's img/s and its median per-round
ratio to ONNX Runtime fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from interleaved import interleaved_seconds, ratio_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort
    import openvino as ov
    import torch

    from mobilenetv2 import create_model
    from mobilenetv2.export import ExportConfig, export_model, real_images
    from mobilenetv2.quantize import QuantizeConfig, quantize_onnx

    folder = Path(tempfile.mkdtemp(prefix="int8-openvino-"))
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_100").eval()
    export_model(model, folder / "fp32.onnx", ExportConfig())
    calibration = real_images(64, (3, 224, 224), model.meta).numpy()
    quantize_onnx(folder / "fp32.onnx", folder / "int8.onnx", [calibration[:32], calibration[32:]],
                  QuantizeConfig())
    batch = np.random.default_rng(0).standard_normal((args.batch_size, 3, 224, 224), np.float32)

    def onnxruntime(name: str) -> Callable[[], object]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(folder / name, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch}
        return lambda: session.run(None, feed)

    core = ov.Core()

    def openvino(name: str, hint: str = "LATENCY") -> Callable[[], object]:
        compiled = core.compile_model(core.read_model(folder / name), "CPU",
                                      {"INFERENCE_NUM_THREADS": args.threads,
                                       "PERFORMANCE_HINT": hint})
        request = compiled.create_infer_request()
        return lambda: request.infer({0: batch})

    runs = {"onnxruntime fp32 (reference)": onnxruntime("fp32.onnx"),
            "onnxruntime int8": onnxruntime("int8.onnx"),
            "openvino fp32": openvino("fp32.onnx"),
            "openvino int8": openvino("int8.onnx"),
            "openvino int8, throughput hint": openvino("int8.onnx", "THROUGHPUT")}
    seconds = interleaved_seconds(runs, args.rounds, repeats=3)
    reference = seconds["onnxruntime fp32 (reference)"]
    print(f"openvino {ov.__version__}, onnxruntime {ort.__version__}, batch {args.batch_size}, "
          f"{args.threads} threads, {args.rounds} rounds")
    for name, times in seconds.items():
        print(f"{name:32s} {args.batch_size / statistics.median(times):7.1f} img/s  "
              f"{ratio_line(times, reference)}")


if __name__ == "__main__":
    main()
