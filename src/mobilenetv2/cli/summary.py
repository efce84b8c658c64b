"""``mobilenetv2 summary``: the per-layer table, parameters, multiply-adds and size."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..registry import create_model
from .common import add_model_args, image_side, positive_float, positive_int, printable


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary", help="per-layer table, parameters, multiply-adds and size",
        description="Print the per-layer torchinfo table of a model with its total parameters, "
        "multiply-adds and size; with --weights, of the model a weights file holds, and what "
        "the file says about its classes and preprocessing; of an exported file (ONNX, .ort, "
        "ExecuTorch .pte), what an app gives it and gets back.",
    )
    parser.add_argument("--weights", type=Path, default=None, metavar="FILE",
                        help="weights in any format load_model reads, or an exported file, "
                        "instead of --model")
    add_model_args(parser, default=None)
    parser.add_argument("--width-mult", type=positive_float, default=None, metavar="W",
                        help="a width multiplier other than the named model's")
    parser.add_argument("--resolution", type=image_side, default=None, metavar="R",
                        help="input size (default: 224, or 32 with --small-input)")
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                        metavar="OS", help="8 or 16: dilate the last rows as DeepLabv3 does "
                        "(paper, section 6.3; default 32)")
    parser.add_argument("--depth", type=positive_int, default=3, help="table depth (default 3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torchinfo

    from ..model import MobileNetV2
    from ..runtime import runs_in_runtime
    from ..weights import load_model

    kwargs = {
        key: value
        for key, value in (("num_classes", args.num_classes), ("in_channels", args.in_channels),
                           ("small_input", args.small_input), ("output_stride", args.output_stride))
        if value is not None
    }
    if args.weights is not None:
        given = [flag for flag, value in (
            ("--model", args.model), ("--width-mult", args.width_mult),
            ("--num-classes", args.num_classes), ("--in-channels", args.in_channels),
            ("--small-input", args.small_input), ("--output-stride", args.output_stride))
            if value is not None]
        if given:
            raise ValueError(f"--weights describes its own model: drop {', '.join(given)}")
        if runs_in_runtime(args.weights):
            if args.resolution is not None:
                raise ValueError(f"{args.weights} is exported for one input size: drop "
                                 "--resolution")
            print(describe_exported(args.weights))
            return 0
        model = load_model(args.weights)
        name = f"{args.weights} ({model.config.get('name') or 'MobileNetV2'})"
    elif args.width_mult is not None:
        if args.model is not None:
            raise ValueError("give either --model or --width-mult: a model name fixes the width")
        model = MobileNetV2(width_mult=args.width_mult, **kwargs)
        name = f"MobileNetV2 (width {args.width_mult})"
    else:
        args.model = args.model or "mobilenet_v2_100"
        if args.model == "seed":
            if args.small_input or args.output_stride:
                raise ValueError("--small-input and --output-stride do not apply to the seed variant")
            if args.resolution is not None:
                kwargs["input_width"] = args.resolution
        model = create_model(args.model, **kwargs)
        name = args.model
    channels, default_size = model.meta["input_size"][0], model.meta["input_size"][-1]
    resolution = args.resolution or default_size  # the weights' own may be smaller (digits: 16)
    if args.resolution is not None and args.resolution < 32:
        raise ValueError(f"--resolution must be at least 32, got {args.resolution}")
    stats = torchinfo.summary(
        model, input_size=(1, channels, resolution, resolution), depth=args.depth, verbose=0,
        col_names=("output_size", "num_params", "mult_adds"), device="cpu",
        # Each line named by its attribute, so `stages (Sequential)` / `1 (Sequential)` reads as
        # the state_dict's `stages.1`: the row of the (t, c, n, s) table docs/architecture.md
        # puts beside the paper's Table 2 (torchinfo's default shows only `Sequential: 2-5`).
        row_settings=("var_names",),
    )
    table = re.sub(r"\(Units\.(\w)\w*\)", r"(\1)", str(stats))  # torchinfo prints enum names
    print(table)
    print(f"{name} at {resolution}x{resolution}: {stats.total_params:,} parameters, "
          f"{stats.total_mult_adds / 1e6:,.1f} M multiply-adds, "
          f"{stats.total_params * 4 / 1e6:.2f} MB of fp32 weights")
    if args.weights is not None:
        print(describe_meta(model.meta))
    return 0


def describe_meta(meta: dict[str, Any]) -> str:
    """What a weights file says about its classes and preprocessing, in a few lines."""
    names = meta.get("class_names") or []
    shown = ", ".join(map(printable, names[:8])) + (
        f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    lines = [f"classes: {len(names)} ({shown})" if names else "classes: no names recorded"]
    if meta.get("dataset"):
        lines.append(f"trained on: {printable(meta['dataset'])}")
    c, h, w = meta["input_size"]
    preprocessing = f"input: {c}x{h}x{w}, mean ({_numbers(meta['mean'])}), std ({_numbers(meta['std'])})"
    if meta.get("interpolation"):
        preprocessing += f", {meta['interpolation']} resize"
    if meta.get("crop_pct"):
        preprocessing += f", crop {meta['crop_pct']:g}"
    return "\n".join([*lines, preprocessing])


def describe_exported(path: Path) -> str:
    """An exported file's contract with an app, from the file itself: its input (dtype, shape,
    layout, batch, the preprocessing before it), its output, classes and int8 recipe. Written
    for whoever calls the model from Kotlin or Swift, where the metadata's JSON is not at hand
    and getting the layout, the scale or the statistics wrong gives plausible, wrong answers."""
    from ..runtime import Predictor, is_executorch_program

    predictor = Predictor(path)
    meta, session = predictor.meta, predictor.session
    kind = "ExecuTorch program (XNNPACK)" if is_executorch_program(path) else (
        "ONNX Runtime (ORT format) model" if path.suffix.lower() == ".ort" else "ONNX model")
    recipe = meta.get("quantization")
    if recipe:
        bits = {True: ", 7-bit weights", False: ", 8-bit weights"}.get(recipe.get("reduce_range"), "")
        kind += f", int8 ({recipe.get('format', '?')}, {recipe.get('method', '?')}{bits})"
    else:
        kind += ", float32"
    name = (meta.get("config") or {}).get("name")
    lines = [f"{path}: {kind}, {path.stat().st_size / 1e6:.2f} MB" + (f" ({name})" if name else "")]
    c, h, w = (int(v) for v in meta["input_size"])
    batch = "N" if predictor.batch_size is None else str(predictor.batch_size)
    colour = "gray (Pillow's L: 0.299 R + 0.587 G + 0.114 B)" if c == 1 else "RGB"
    if meta.get("resize_mode") == "exact":
        resize = f"resize the whole image to {w}x{h}"
    else:
        resize = (f"resize the shorter side to {meta.get('resize')} and center-crop {w}x{h}")
    resize += f" ({meta.get('interpolation', 'bilinear')})"
    node = session.get_inputs()[0]
    if predictor.pixel_input:
        lines.append(f"input '{node.name}': uint8 ({batch}, {h}, {w}, {c}), channels last: "
                     f"{resize}, then the {colour} pixels as they are (0-255; the model "
                     "scales and normalises them itself)")
    else:
        lines.append(f"input '{node.name}': float32 ({batch}, {c}, {h}, {w}), channels first: "
                     f"{resize}, scale the {colour} pixels to [0, 1], subtract mean "
                     f"({_numbers(meta['mean'])}) and divide by std ({_numbers(meta['std'])})")
    if predictor.batch_size is not None:
        lines[-1] += f"; batch fixed at {predictor.batch_size}"
    else:
        lines[-1] += "; any batch size N"
    if "mobilenetv2_version" not in meta:  # another tool's export: only the shapes are its own
        lines.append("preprocessing: not recorded in the file (not exported by mobilenetv2): "
                     "the resize, mean and std above are the ImageNet defaults that predict "
                     "and eval assume, not the model's")
    outputs = session.get_outputs()
    if predictor.is_feature_extractor:
        lines.append(f"outputs: {len(outputs)} feature maps, "
                     + ", ".join(f"'{o.name}'" for o in outputs))
    else:
        what = meta.get("output", "logits")
        then = " (a softmax gives probabilities)" if what == "logits" else ""
        lines.append(f"output '{outputs[0].name}': ({batch}, {predictor.num_classes}) "
                     f"{what}{then}")
    names = meta.get("class_names") or []
    shown = ", ".join(map(printable, names[:8])) + (
        f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    where = ("the JSON its method mobilenetv2_metadata returns" if is_executorch_program(path)
             else "its metadata_props")
    lines.append(f"classes: {len(names)} ({shown}); all of this is stored in {where}"
                 if names else f"classes: no names recorded in {where}")
    if meta.get("dataset"):
        lines.append(f"trained on: {printable(meta['dataset'])}")
    return "\n".join(lines)


def _numbers(values: list[float]) -> str:
    """Statistics as the summaries print them: 4 significant digits, comma-separated."""
    return ", ".join(f"{v:.4g}" for v in values)
