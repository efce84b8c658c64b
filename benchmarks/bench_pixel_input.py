"""What a pixel-input model (``export --pixel-input``) costs against the float model.

Three contenders per runtime (ONNX Runtime; ExecuTorch with XNNPACK) and precision (fp32;
int8, both models calibrated on the same 64 real images), MobileNetV2 1.0 at 224x224, batch 1, one image of random pixels: the float model fed a normalised batch, the
pixel model fed the uint8 pixels, and the float model again with the step an app takes
before it: scaling, normalising and transposing the decoded pixels (NumPy, as
``Predictor.preprocess`` does). Rounds are interleaved; each ratio is the median over rounds
of pixel time / float time in the same round (below 1: the pixel model is faster). One
intra-op thread per model by default (``--threads``): with two multi-threaded ONNX Runtime
sessions in one process the pixel model measured 1.8x the float one when run right after it,
where ONNX Runtime's own profile put its preprocessing at 80 us of 2.4 ms.

    python benchmarks/bench_pixel_input.py
    python benchmarks/bench_pixel_input.py --runtimes onnx --precisions int8 --rounds 15 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
from interleaved import interleaved_seconds

from mobilenetv2 import create_model
from mobilenetv2.export import ExportConfig, export_model, real_images
from mobilenetv2.quantize import quantize_executorch, quantize_onnx
from mobilenetv2.runtime import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2_100")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runtimes", default="onnx,executorch")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per model (default 1: two ONNX Runtime sessions "
                        "with thread pools in one process contend, and the ratio followed the "
                        "contenders' order, up to 1.8x for the one run after the other)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = create_model(args.model, num_classes=1000).eval()
    size = args.resolution
    pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    mean = np.asarray(model.meta["mean"], np.float32)
    std = np.asarray(model.meta["std"], np.float32)

    def normalise(batch: np.ndarray) -> np.ndarray:  # the app's step for the float model
        return np.ascontiguousarray(((batch.astype(np.float32) / 255.0 - mean) / std)
                                    .transpose(0, 3, 1, 2))

    floats = normalise(pixels)
    calibration = list(real_images(64, (3, size, size), model.meta).split(16))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "executorch" in args.runtimes.split(","):
            # XNNPACK's thread pool is the process's, sized by the first program loaded and never
            # again: load one at --threads before the exports below verify theirs at the
            # default (the physical cores), which would leave every ExecuTorch row on those.
            first = Path(tmp) / "pool.pte"
            export_model(create_model("mobilenet_v2_035", num_classes=2).eval(), first,
                         ExportConfig(format="executorch", resolution=32, verify=False))
            Predictor(first, threads=args.threads)
        for runtime, precision in [(r, p) for r in args.runtimes.split(",")
                                   for p in args.precisions.split(",")]:
            suffix = {"onnx": ".onnx", "executorch": ".pte"}[runtime]
            paths = {kind: Path(tmp) / f"{kind}_{precision}{suffix}" for kind in ("float", "pixels")}
            for kind, path in paths.items():
                config = ExportConfig(format=runtime, resolution=size, pixel_input=kind == "pixels")
                if precision == "fp32":
                    export_model(model, path, config)
                elif runtime == "executorch":
                    quantize_executorch(model, path, calibration, resolution=size,
                                        pixel_input=kind == "pixels")
                else:
                    export_model(model, Path(tmp) / f"{kind}_tmp.onnx", config)
                    quantize_onnx(Path(tmp) / f"{kind}_tmp.onnx", path, calibration)
            flt, pix = (Predictor(paths[kind], threads=args.threads) for kind in ("float", "pixels"))
            seconds = interleaved_seconds({
                "float": lambda flt=flt: flt.run(floats),
                "pixels": lambda pix=pix: pix.run(pixels),
                "float + app normalisation": lambda flt=flt: flt.run(normalise(pixels)),
            }, args.rounds, args.repeats)

            def ratio(name: str, seconds=seconds) -> float:
                return statistics.median(p / f for p, f in zip(seconds["pixels"], seconds[name],
                                                               strict=True))

            results[f"{runtime} {precision}"] = {
                "float_ms": 1000 * statistics.median(seconds["float"]),
                "pixels_ms": 1000 * statistics.median(seconds["pixels"]),
                "pixels_over_float": ratio("float"),
                "pixels_over_float_with_app_normalisation": ratio("float + app normalisation"),
            }
    report = {"model": args.model, "resolution": size, "batch": 1, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "results": results}
    if args.json:
        print(json.dumps(report))
        return
    for runtime, row in results.items():
        print(f"{runtime:15s} float {row['float_ms']:.2f} ms  pixels {row['pixels_ms']:.2f} ms  "
              f"pixels/float {row['pixels_over_float']:.2f}x  with the app's normalisation "
              f"{row['pixels_over_float_with_app_normalisation']:.2f}x")


if __name__ == "__main__":
    main()
