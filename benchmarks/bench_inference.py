"""The inference numbers of BENCHMARKS.md: speed per backend, and accuracy per format.

    python benchmarks/bench_inference.py --out benchmarks/results
    python benchmarks/bench_inference.py --out benchmarks/results --digits-weights runs/x/best.safetensors

Speed: ``mobilenetv2 bench`` on mobilenet_v2_100 at 224x224, batch 1 and 32, every backend and
torchvision's references in one run with interleaved rounds (``speed.json``, ``speed.md``).
Accuracy (with ``--digits-weights``, a model trained by ``mobilenetv2 train``): top-1 on the
digits validation split of eager fp32, ONNX Runtime fp32, ONNX Runtime int8 for each calibration
method, and PyTorch int8 (``accuracy.json``, ``accuracy.md``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def speed(out: Path, rounds: int, round_time: float, resolution: int) -> None:
    from mobilenetv2.bench import BenchConfig, run_benchmark
    from mobilenetv2.cli.deploy import format_report

    report = run_benchmark(BenchConfig(model="mobilenet_v2_100", batch_sizes=(1, 32),
                                       resolution=resolution, rounds=rounds,
                                       round_time=round_time))
    report["lscpu_model_name"] = _lscpu_model_name()
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    (out / "speed.txt").write_text(format_report(report) + "\n")
    (out / "speed.md").write_text(speed_table(report))
    print(format_report(report))


def speed_table(report: dict[str, Any]) -> str:
    """Markdown: ratios first (they survive a busy machine), absolute numbers after."""
    lines = ["| backend | batch | vs torchvision eager | vs torchvision ONNX Runtime | "
             "vs torchvision ORT int8 | median ms | p90 ms | img/s | peak RSS MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["results"]:
        name = row["backend"] + (" (reference)" if row["role"] == "reference" else "")
        if row["status"] != "ok":
            lines.append(f"| {name} | {row['batch_size']} | skipped: {row['reason']} "
                         "| | | | | | |")
            continue
        ratio = [f"{row['speedup'][r]:.2f}x" if r in row["speedup"] else "1.00x" if
                 r == row["backend"] else "-" for r in
                 ("torchvision_eager", "torchvision_ort", "torchvision_ort_int8")]
        lines.append(f"| {name} | {row['batch_size']} | {' | '.join(ratio)} | "
                     f"{row['latency_ms_median']:.2f} | {row['latency_ms_p90']:.2f} | "
                     f"{row['images_per_second']:.1f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def accuracy(out: Path, weights: Path) -> None:
    import torch

    from mobilenetv2.data import build_datasets
    from mobilenetv2.export import ExportConfig, export_model, input_shape
    from mobilenetv2.quantize import (
        QuantizeConfig,
        calibration_images,
        compare_onnx,
        quantize_onnx,
        quantize_torch,
    )
    from mobilenetv2.weights import load_model

    model = load_model(weights).eval()
    channels, _, size = input_shape(model, None)
    # Calibration sees the training images as inference will: without augmentation.
    data = build_datasets("digits", resolution=size, in_channels=channels, augment=False,
                          mean=tuple(model.meta["mean"]), std=tuple(model.meta["std"]))
    images, labels = data.val.images, data.val.labels
    calibration = calibration_images(data.train, 256)
    with torch.no_grad():
        eager = (model(images).argmax(1) == labels).float().mean().item() * 100
        torch_int8 = quantize_torch(model, calibration.split(32))
        pt_int8 = (torch_int8(images).argmax(1) == labels).float().mean().item() * 100
    rows = {"eager fp32 (PyTorch)": eager, "PyTorch int8 (FX, x86)": pt_int8}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_model(model, fp32, ExportConfig())
        models = {"fp32": fp32}
        for method in ("minmax", "entropy", "percentile"):
            models[method] = Path(tmp) / f"{method}.onnx"
            quantize_onnx(fp32, models[method], calibration.split(32),
                          QuantizeConfig(method=method))
        report = compare_onnx(models, data.val)
    rows["ONNX Runtime fp32 (folded BN)"] = report["top1_fp32"]
    for method in ("minmax", "entropy", "percentile"):
        rows[f"ONNX Runtime int8, {method}"] = report[f"top1_{method}"]
    (out / "accuracy.json").write_text(json.dumps({"weights": str(weights), "top1": rows,
                                                   "eval_images": len(labels)}, indent=1))
    table = ["| format | digits val top-1 (%) |", "| --- | ---: |"]
    table += [f"| {name} | {value:.2f} |" for name, value in rows.items()]
    (out / "accuracy.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def _lscpu_model_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("Model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-time", type=float, default=1.5)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--digits-weights", type=Path, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_speed:
        speed(args.out, args.rounds, args.round_time, args.resolution)
    if args.digits_weights:
        accuracy(args.out, args.digits_weights)


if __name__ == "__main__":
    main()
