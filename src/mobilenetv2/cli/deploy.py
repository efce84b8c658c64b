"""``mobilenetv2 export | quantize | bench``: deployment artefacts and their speed.

Thin wrappers: each turns its flags into the frozen config of :mod:`mobilenetv2.export`,
:mod:`mobilenetv2.quantize` or :mod:`mobilenetv2.bench` and prints the result (a line, a table,
or one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..runtime import json_text
from .common import (
    add_json_arg,
    add_model_args,
    add_use_ema_arg,
    image_side,
    int_list,
    positive_float,
    positive_int,
)

# The speedup columns of the bench tables (bench.CPU_REFERENCES and bench.CUDA_REFERENCES):
# CPU rows are compared with the CPU references, GPU rows with the GPU ones.
RATIO_COLUMNS = {"torchvision_eager": "vs tv eager", "torchvision_ort": "vs tv ort",
                 "torchvision_ort_int8": "vs tv int8"}
RATIO_COLUMNS_GPU = {"torchvision_cuda_fp32": "vs tv cuda fp32",
                     "torchvision_cuda_fp16": "vs tv cuda fp16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_export(subparsers)
    _register_quantize(subparsers)
    _register_bench(subparsers)


# --------------------------------------------------------------------------------------------
# export


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="ONNX, ExecuTorch, torch.export or TorchScript, checked against eager",
        description="Export weights to ONNX (BatchNorm folded, preprocessing in the metadata), "
        "an ExecuTorch program for phones (.pte, lowered to XNNPACK, batch --batch-size), "
        "a torch.export program (.pt2) or TorchScript (.pt). The file is compared with the eager "
        "model on random and real images and kept only when the logits agree within --atol.",
    )
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE",
                        help="weights in any format load_model reads")
    parser.add_argument("--format", default=None, metavar="FORMAT",
                        help="onnx, executorch (.pte), exported (.pt2) or torchscript (.pt); "
                        "default: from --out")
    parser.add_argument("--out", required=True, type=Path, metavar="PATH",
                        help="the file to write; its suffix gives the format without --format: "
                        ".onnx, .pte, .pt2 or .pt")
    parser.add_argument("--resolution", type=image_side, default=None, metavar="R",
                        help="input size (default: the model's; the seed variant takes only "
                        "its input_width)")
    parser.add_argument("--static-batch", action="store_true",
                        help="a fixed batch dimension (--batch-size) instead of a dynamic one")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                        help="the fixed batch size with --static-batch and of ExecuTorch "
                        "programs, which have no dynamic batch (default 1)")
    parser.add_argument("--opset", type=positive_int, default=None, metavar="N",
                        help="ONNX opset (default 18)")
    parser.add_argument("--onnx-exporter", default="torchscript", metavar="NAME",
                        help="torchscript (default, fast) or dynamo (torch.export-based)")
    parser.add_argument("--atol", type=positive_float, default=1e-4,
                        help="largest allowed |logit difference| against eager (default 1e-4)")
    parser.add_argument("--pixel-input", action="store_true",
                        help="the model takes uint8 pixels (N, H, W, C) and scales and "
                        "normalises them itself: an app resizes and crops the decoded image to "
                        "the model's size and passes its bytes as they are, with no mean or std "
                        "(default: normalised float32 (N, C, H, W))")
    add_use_ema_arg(parser)
    parser.add_argument("--dynamic-size", action="store_true",
                        help="ONNX and .pt2: any image height and width (--resolution is then "
                        "the size the metadata's preprocessing resizes to), for detection and "
                        "segmentation backbones; checked at a second size too")
    add_json_arg(parser)
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..export import DEFAULT_OPSET, SUFFIXES, ExportConfig, export_model, format_of
    from ..weights import check_output_file, load_model

    check_output_file(args.out)  # before the slow part, so a typo fails in a second
    by_suffix = format_of(args.out)
    if args.format in SUFFIXES and by_suffix not in (None, args.format):  # eval goes by bytes
        raise ValueError(f"--format {args.format} does not write {args.out.suffix} files: name "
                         f"the file {SUFFIXES[args.format]} or drop --format")
    fmt = args.format or by_suffix
    if fmt is None:
        raise ValueError(f"cannot tell the format from --out {args.out}: pass --format onnx, "
                         "executorch, exported or torchscript, or name the file .onnx, .pte, "
                         ".pt2 or .pt")
    if args.batch_size is not None and not args.static_batch and fmt != "executorch":
        # It was ignored: a file meant for batch 1 (NNAPI, Core ML) took any batch.
        raise ValueError(f"--batch-size {args.batch_size} fixes the batch only with "
                         "--static-batch: add it, or drop --batch-size for a file that takes "
                         "any batch size")
    config = ExportConfig(
        format=fmt, resolution=args.resolution, dynamic_batch=not args.static_batch,
        batch_size=args.batch_size or 1, opset=args.opset or DEFAULT_OPSET,
        onnx_exporter=args.onnx_exporter, atol=args.atol, pixel_input=args.pixel_input,
        dynamic_size=args.dynamic_size,
    )
    report = export_model(load_model(args.weights, use_ema=args.use_ema), args.out, config)
    if args.json:
        print(json_text({"path": str(report.path), "format": report.format,
                          "input_shape": list(report.input_shape),
                          "max_abs_diff": report.max_abs_diff}))
    else:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in report.max_abs_diff.items())
        print(f"wrote {report.path} ({report.format}, input {list(report.input_shape)}); "
              f"max |output difference| against eager: {diffs}")
    return 0


# --------------------------------------------------------------------------------------------
# quantize


def _register_quantize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="int8 ONNX model or ExecuTorch program, calibrated on real images",
        description="Post-training static int8 quantization for ONNX Runtime (QDQ, per-channel "
        "weights) or, with --out NAME.pte, for ExecuTorch's XNNPACK (phones), calibrated on "
        "images from --data; with --qat, quantization-aware "
        "fine-tuning first. Prints fp32 and int8 top-1 on the validation split. Given "
        "torchvision's int8 MobileNetV2 (a quantized state_dict, or the tag imagenet-int8 to "
        "download its ImageNet weights), writes it for ONNX Runtime instead, with torchvision's "
        "own scales, checked against torchvision's model in PyTorch; no --data needed.",
    )
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE",
                        help="float weights load_model reads, torchvision's quantized "
                        "state_dict, or imagenet-int8")
    parser.add_argument("--data", default=None, metavar="DATA",
                        help="digits, cifar10, cifar100, a folder with train/ and val/, or a "
                        "folder of class folders (required for float weights)")
    parser.add_argument("--val-split", type=positive_float, default=None, metavar="F",
                        help="a folder of class folders: the fraction of each class held out "
                        "for the evaluation (default: as the weights were trained, else 0.2)")
    parser.add_argument("--data-dir", default="data", metavar="DIR",
                        help="where CIFAR lives (default ./data)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an unreadable image instead of skipping it (and naming "
                        "it in a warning)")
    parser.add_argument("--out", required=True, type=Path, metavar="PATH",
                        help="the int8 file to write: .onnx (ONNX Runtime) or .pte (ExecuTorch)")
    parser.add_argument("--resolution", type=image_side, default=None, metavar="R",
                        help="input size of the int8 model (default: the weights')")
    parser.add_argument("--calibration-batches", type=positive_int, default=8, metavar="N",
                        help="batches of --batch-size training images to calibrate on (default 8)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="B",
                        help="images per calibration (and --qat) batch (default 32)")
    parser.add_argument("--method", default="minmax", metavar="METHOD",
                        help="activation calibration: minmax (default); entropy or percentile "
                        "(ONNX); histogram (.pte)")
    parser.add_argument("--weight-type", default=None, choices=["int8", "uint8"],
                        help="int8 (default; for torchvision's int8 weights: uint8 on x86 CPUs "
                        "without VNNI, where ONNX Runtime's int8 kernels saturate, int8 "
                        "elsewhere; uint8 is exact on every CPU, int8 2x faster with VNNI)")
    parser.add_argument("--weight-bits", type=int, default=None, choices=[7, 8],
                        help="7 (default): exact on every CPU; 8: one more bit, exact only on "
                        "x86 CPUs with VNNI and on ARM (ONNX Runtime's kernels saturate on "
                        "other x86 CPUs)")
    parser.add_argument("--qat", action="store_true",
                        help="quantization-aware fine-tuning before the export")
    parser.add_argument("--epochs", type=positive_int, default=1, metavar="N",
                        help="QAT epochs (default 1)")
    parser.add_argument("--lr", type=positive_float, default=1e-4,
                        help="QAT learning rate (default 1e-4)")
    parser.add_argument("--max-eval-images", type=positive_int, default=None, metavar="N",
                        help="evaluate on at most N validation images")
    parser.add_argument("--pixel-input", action="store_true",
                        help="the model takes uint8 pixels (N, H, W, C) and scales and "
                        "normalises them itself: an app resizes and crops the decoded image to "
                        "the model's size and passes its bytes as they are, with no mean or std "
                        "(default: normalised float32 (N, C, H, W))")
    add_use_ema_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from ..quantize import (
        QuantizeConfig,
        describe_report,
        int8_format,
        quantize_from_data,
        torchvision_int8_to_onnx,
    )

    int8_format(args.out)  # before anything else: a .pt or .safetensors name would hold ONNX
    from ..runtime import runs_in_runtime

    if Path(args.weights).is_file() and runs_in_runtime(args.weights):
        raise ValueError(f"{args.weights} is an exported model: quantize starts from the float "
                         "PyTorch weights it was exported from (e.g. runs/NAME/best.safetensors)")
    if args.data is None:  # only torchvision's int8 weights come with their calibration
        if args.qat or args.max_eval_images or args.val_split or args.pixel_input or args.strict:
            raise ValueError("--qat, --max-eval-images, --val-split, --pixel-input and --strict "
                             "work on --data: pass --data DATA")
        if args.use_ema:
            raise ValueError("--use-ema picks the EMA weights of a float training checkpoint, "
                             "quantized with --data DATA; torchvision's int8 weights have none")
        if args.out.suffix.lower() == ".pte":
            raise ValueError("an int8 ExecuTorch program (.pte) is calibrated on images: pass "
                             "--data DATA (torchvision's int8 weights convert to .onnx only)")
        if args.weight_bits is not None:
            raise ValueError("--weight-bits is for calibrated quantization (--data); "
                             "torchvision's int8 weights use 8 bits: choose --weight-type")
        report = torchvision_int8_to_onnx(args.weights, args.out, resolution=args.resolution,
                                          weight_type=args.weight_type)
        print(json_text(report) if args.json else (
            f"wrote {report['path']} (torchvision's int8 weights, {report['weight_scheme']} "
            f"{report['weight_type']}, input {report['input_shape']}); against torchvision's "
            f"int8 model in PyTorch: same top-1 on {report['agreement']:.0f}% of "
            f"{report['images']} images, largest logit difference {report['max_steps']:.0f} "
            "output steps"))
        return 0
    if args.out.suffix.lower() == ".pte" and (args.weight_type or args.weight_bits):
        raise ValueError("--weight-type and --weight-bits are ONNX Runtime's choices: an "
                         "ExecuTorch program (.pte) has 8-bit int8 weights, which XNNPACK does not saturate")
    config = QuantizeConfig(method=args.method, calibration_batches=args.calibration_batches,
                            batch_size=args.batch_size, weight_type=args.weight_type or "int8",
                            reduce_range=args.weight_bits != 8)
    report = quantize_from_data(
        args.weights, args.data, args.out, config, data_dir=args.data_dir, qat=args.qat,
        qat_epochs=args.epochs, qat_lr=args.lr, max_eval_images=args.max_eval_images,
        resolution=args.resolution, val_split=args.val_split, pixel_input=args.pixel_input,
        strict=args.strict, use_ema=args.use_ema,
    )
    print(json_text(report) if args.json else describe_report(report, args.data))
    return 0


# --------------------------------------------------------------------------------------------
# bench


def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    from ..bench import ALL_BACKENDS

    parser = subparsers.add_parser(
        "bench", help="latency and throughput per backend, against torchvision",
        description="Latency (median, p90), throughput and peak memory of each backend, with "
        "torchvision's mobilenet_v2 (eager and ONNX Runtime on the CPU, fp32 and fp16 on the GPU) "
        "measured in the same run as "
        "references. Rounds are interleaved across backends; each backend runs in its own "
        "process so its peak RSS is its own.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, default=None, metavar="FILE",
                        help="weights to benchmark: any weights file, or an .onnx / .pte file "
                        "for its runtime alone (default: --model, randomly initialised)")
    add_model_args(parser)
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 32], metavar="B,B",
                        help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--resolution", type=image_side, default=None, metavar="R",
                        help="input size (default: the model's)")
    parser.add_argument("--backends", default=None, metavar="LIST",
                        help=f"comma-separated, from: {', '.join(ALL_BACKENDS)} "
                        "(default: every CPU one; the cuda ones run where CUDA is)")
    parser.add_argument("--no-references", action="store_true",
                        help="leave out torchvision's references (CPU and GPU)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="T",
                        help="intra-op threads (default: OMP_NUM_THREADS, else the physical cores)")
    parser.add_argument("--rounds", type=positive_int, default=5, metavar="N",
                        help="interleaved rounds (default 5)")
    parser.add_argument("--round-time", type=positive_float, default=1.0, metavar="S",
                        help="seconds each backend runs per round (default 1.0)")
    parser.add_argument("--warmup", type=positive_int, default=3, metavar="N",
                        help="untimed calls per backend and batch size (default 3)")
    add_json_arg(parser)
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, run_benchmark

    model_kwargs = {key: value for key, value in (
        ("num_classes", args.num_classes), ("in_channels", args.in_channels),
        ("small_input", args.small_input)) if value is not None}
    backends = {} if args.backends is None else {
        "backends": tuple(b.strip() for b in args.backends.split(",") if b.strip())}
    config = BenchConfig(
        weights=str(args.weights) if args.weights else None, model=args.model,
        model_kwargs=model_kwargs, batch_sizes=tuple(args.batch_sizes),
        resolution=args.resolution, references=not args.no_references, threads=args.threads,
        rounds=args.rounds, round_time=args.round_time, warmup=args.warmup, **backends,
    )
    report = run_benchmark(config)
    print(json_text(report) if args.json else format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    """A bench report as text tables (CPU, then GPU): one row per backend and batch size, with
    its ratios to the references of its device."""
    from ..bench import on_cuda

    settings, machine = report["settings"], report["machine"]
    # What decides int8's gain: VNNI on x86, the dot-product instructions on ARM.
    if "dot_product" in machine:
        int8_instructions = f", {'' if machine['dot_product'] else 'no '}dot product (asimddp)"
    else:
        int8_instructions = (", VNNI" if machine.get("vnni") else
                             ", no VNNI" if "vnni" in machine else "")
    lines = [
        f"{settings['model']} at {'x'.join(map(str, settings['shape']))}, "
        f"{settings['threads']} threads, {settings['rounds']} interleaved rounds of "
        f"{settings['round_time']:g} s per backend and batch size, {settings['warmup']} "
        "warm-up calls",
        f"machine: {machine['cpu']} ({machine['cores']} cores"
        f"{', ' + machine['cpu_capability'] if machine.get('cpu_capability') else ''}"
        f"{int8_instructions}{', ' + machine['cuda'] if machine.get('cuda') else ''})",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "speedup = the median over rounds of a reference's round-median latency / this "
        "row's, at the same batch size (> 1: faster than the reference); each row against the "
        "references of its device",
        "peak MB: the worker's peak resident set (CPU rows), torch.cuda.max_memory_allocated "
        "(GPU rows)",
        "",
    ]
    for gpu in (False, True):
        rows = [row for row in report["results"] if on_cuda(row["backend"]) == gpu]
        if rows:
            lines += _table(rows, RATIO_COLUMNS_GPU if gpu else RATIO_COLUMNS) + [""]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]], columns: dict[str, str]) -> list[str]:
    """One device's rows, with a speedup column per reference of that device."""
    header = (f"{'backend':<27}{'batch':>6}{'median ms':>11}{'p90 ms':>10}{'img/s':>9}"
              f"{'peak MB':>9}" + "".join(f"{title:>{len(title) + 2}}" for title in columns.values()))
    lines = [header, "-" * len(header)]
    for row in rows:
        name = row["backend"] + (" (ref)" if row["role"] == "reference" else "")
        if row["status"] != "ok":
            lines.append(f"{name:<27}{row['batch_size']:>6}  skipped: {row['reason']}")
            continue
        ratios = "".join(
            f"{row['speedup'][ref]:>{len(title) + 1}.2f}x" if ref in row["speedup"]
            else f"{'-':>{len(title) + 2}}" for ref, title in columns.items())
        peak = row["peak_cuda_mb"] if row["peak_cuda_mb"] is not None else row["peak_rss_mb"]
        lines.append(f"{name:<27}{row['batch_size']:>6}{row['latency_ms_median']:>11.2f}"
                     f"{row['latency_ms_p90']:>10.2f}{row['images_per_second']:>9.1f}"
                     + (f"{peak:>9.0f}" if peak is not None else f"{'-':>9}")  # (Windows)
                     + ratios)
    return lines
