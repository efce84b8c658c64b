"""``mobilenetv2 summary``: the per-layer table, parameters, multiply-adds and size."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ..registry import create_model
from ..runtime import json_text
from .common import (
    add_json_arg,
    add_model_args,
    add_use_ema_arg,
    image_side,
    positive_float,
    positive_int,
    printable,
)


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
                        help="input size, 8 or more (default: 224, or 32 with --small-input)")
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                        metavar="OS", help="8 or 16: dilate the last rows as DeepLabv3 does "
                        "(paper, section 6.3; default 32)")
    parser.add_argument("--depth", type=positive_int, default=3, help="table depth (default 3)")
    add_use_ema_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torchinfo

    from ..data import MIN_RESOLUTION
    from ..evaluation import ema_of_export_error
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
            if args.use_ema:
                raise ema_of_export_error(args.weights)
            if args.resolution is not None:
                raise ValueError(f"{args.weights} is exported for one input size: drop "
                                 "--resolution")
            contract = exported_contract(args.weights)
            print(json_text(contract) if args.json else describe_exported(contract))
            return 0
        model = load_model(args.weights, use_ema=args.use_ema)
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
    if args.resolution is not None and args.resolution < MIN_RESOLUTION:  # as train (digits: 16)
        raise ValueError(f"--resolution must be at least {MIN_RESOLUTION}, as in train, got "
                         f"{args.resolution}")
    stats = torchinfo.summary(
        model, input_size=(1, channels, resolution, resolution), depth=args.depth, verbose=0,
        col_names=("output_size", "num_params", "mult_adds"), device="cpu",
        # Each line named by its attribute, so `Sequential (stages)` / `Sequential (1)` reads as
        # the state_dict's `stages.1`: the row of the (t, c, n, s) table docs/architecture.md
        # puts beside the paper's Table 2 (torchinfo's default shows only `Sequential: 2-5`).
        row_settings=("var_names",),
    )
    if args.json:
        report = {"model": model.config.get("name") if args.weights is not None else name,
                  "weights": str(args.weights) if args.weights is not None else None,
                  **model_statistics(stats, channels, resolution, args.depth)}
        if args.weights is not None:
            report["meta"] = {key: model.meta.get(key) for key in _META_KEYS}
        print(json_text(report))
        return 0
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
    if isinstance(meta.get("training"), dict):
        lines.append(f"trained by: {printable(describe_training(meta['training']))}")
    c, h, w = meta["input_size"]
    preprocessing = f"input: {c}x{h}x{w}, mean ({_numbers(meta['mean'])}), std ({_numbers(meta['std'])})"
    if meta.get("interpolation"):
        preprocessing += f", {meta['interpolation']} resize"
    if meta.get("crop_pct"):
        preprocessing += f", crop {meta['crop_pct']:g}"
    return "\n".join([*lines, preprocessing])


def describe_training(training: dict[str, Any]) -> str:
    """A weights file's training record (``meta["training"]``, written by ``train``) in one
    line: the versions, the checkout, the epoch, the seed and the data's fingerprints."""
    config = training.get("config") if isinstance(training.get("config"), dict) else {}
    data = training.get("data") if isinstance(training.get("data"), dict) else {}
    parts = [f"mobilenetv2 {training.get('mobilenetv2')}, torch {training.get('torch')}"]
    if training.get("git_commit"):
        parts.append(f"git {str(training['git_commit'])[:12]}")
    parts.append(f"epoch {training.get('epoch')}, seed {config.get('seed')}")
    for split in ("train", "val"):
        if isinstance(data.get(split), dict):
            parts.append(f"{split} {data[split].get('images')} images "
                         f"(sha256 {str(data[split].get('sha256'))[:12]})")
    return "; ".join(parts)


# What summary --json reports of a weights file's metadata.
_META_KEYS = ("class_names", "dataset", "input_size", "mean", "std", "interpolation", "crop_pct",
              "training")


def model_statistics(stats: Any, channels: int, resolution: int, depth: int) -> dict[str, Any]:
    """torchinfo's statistics as plain data: the totals, and one entry per line of the table
    (its dotted module name, as in the state_dict, and the multiply-adds of every layer
    inside it, which torchinfo's table shows only for the lines at ``--depth``)."""
    def path(layer: Any) -> str:
        names = []
        while layer is not None and layer.depth > 0:
            names.append(layer.var_name)
            layer = layer.parent_info
        return ".".join(reversed(names))

    leaves = [(path(layer), layer.macs) for layer in stats.summary_list if layer.is_leaf_layer]
    layers = []
    for layer in stats.summary_list:
        if 0 < layer.depth <= depth:
            name = path(layer)
            layers.append({
                "name": name, "type": layer.class_name, "depth": layer.depth,
                "output_shape": list(layer.output_size), "parameters": layer.num_params,
                "multiply_adds": sum(macs for leaf, macs in leaves
                                     if leaf == name or leaf.startswith(name + ".")),
            })
    return {"input_size": [channels, resolution, resolution],
            "parameters": stats.total_params, "trainable_parameters": stats.trainable_params,
            "multiply_adds": stats.total_mult_adds, "parameter_bytes": stats.total_param_bytes,
            "layers": layers}


def exported_contract(path: Path) -> dict[str, Any]:
    """An exported file's contract with an app, from the file itself: its input (dtype, shape,
    layout, batch, the preprocessing before it), its outputs, classes and int8 recipe, as
    ``summary --json`` prints it. ``None`` in a shape is a dimension of any size: the batch,
    and the sides of a file exported with ``--dynamic-size``; ``image_size`` is the [H, W] the
    preprocessing gives."""
    from ..runtime import Predictor, is_executorch_program

    predictor = Predictor(path)
    meta, session = predictor.meta, predictor.session
    c, h, w = (int(v) for v in meta["input_size"])
    batch = predictor.batch_size
    sides = [None, None] if predictor.any_size else [h, w]
    pixel_input = bool(predictor.pixel_input)
    outputs = session.get_outputs()
    return {
        "file": str(path),
        "format": ("executorch" if is_executorch_program(path)
                   else "ort" if path.suffix.lower() == ".ort" else "onnx"),
        "quantization": meta.get("quantization"),
        "size_bytes": path.stat().st_size,
        "model": (meta.get("config") or {}).get("name"),
        "input": {
            "name": session.get_inputs()[0].name,
            "dtype": "uint8" if pixel_input else "float32",
            "shape": [batch, *sides, c] if pixel_input else [batch, c, *sides],
            "image_size": [h, w],
            "layout": "NHWC" if pixel_input else "NCHW",
            "pixel_input": pixel_input,
            "resize_mode": "exact" if meta.get("resize_mode") == "exact" else "shorter_side",
            "resize": meta.get("resize"),
            "interpolation": meta.get("interpolation", "bilinear"),
            "mean": meta["mean"], "std": meta["std"],
            "preprocessing_recorded": "mobilenetv2_version" in meta,
        },
        "outputs": [
            {"name": o.name, "shape": [batch, *(d if isinstance(d, int) else None
                                              for d in o.shape[1:])]} for o in outputs
        ],
        "output": "features" if predictor.is_feature_extractor else meta.get("output", "logits"),
        "num_classes": None if predictor.is_feature_extractor else predictor.num_classes,
        "class_names": meta.get("class_names") or None,
        "dataset": meta.get("dataset"),
        "training": meta.get("training") if isinstance(meta.get("training"), dict) else None,
    }


def describe_exported(contract: dict[str, Any]) -> str:
    """:func:`exported_contract` in a few lines, written for whoever calls the model from
    Kotlin or Swift, where the metadata's JSON is not at hand and getting the layout, the
    scale or the statistics wrong gives plausible, wrong answers."""
    path, put = contract["file"], contract["input"]
    kind = {"executorch": "ExecuTorch program (XNNPACK)",
            "ort": "ONNX Runtime (ORT format) model"}.get(contract["format"], "ONNX model")
    recipe = contract["quantization"]
    if recipe:
        bits = {True: ", 7-bit weights", False: ", 8-bit weights"}.get(recipe.get("reduce_range"), "")
        kind += f", int8 ({recipe.get('format', '?')}, {recipe.get('method', '?')}{bits})"
    else:
        kind += ", float32"
    name = contract["model"]
    lines = [f"{path}: {kind}, {contract['size_bytes'] / 1e6:.2f} MB" + (f" ({name})" if name else "")]
    batch = "N" if put["shape"][0] is None else str(put["shape"][0])
    h, w = put["image_size"]
    c = put["shape"][-1] if put["pixel_input"] else put["shape"][1]
    any_size = None in put["shape"][1:]
    side = "H, W" if any_size else f"{h}, {w}"
    colour = "gray (Pillow's L: 0.299 R + 0.587 G + 0.114 B)" if c == 1 else "RGB"
    if put["resize_mode"] == "exact":
        resize = f"resize the whole image to {w}x{h}"
    else:
        resize = f"resize the shorter side to {put['resize']} and center-crop {w}x{h}"
    resize += f" ({put['interpolation']})"
    if put["pixel_input"]:
        lines.append(f"input '{put['name']}': uint8 ({batch}, {side}, {c}), channels last: "
                     f"{resize}, then the {colour} pixels as they are (0-255; the model "
                     "scales and normalises them itself)")
    else:
        lines.append(f"input '{put['name']}': float32 ({batch}, {c}, {side}), channels first: "
                     f"{resize}, scale the {colour} pixels to [0, 1], subtract mean "
                     f"({_numbers(put['mean'])}) and divide by std ({_numbers(put['std'])})")
    lines[-1] += "; any batch size N" if batch == "N" else f"; batch fixed at {batch}"
    if any_size:
        lines[-1] += "; any height H and width W (exported with --dynamic-size)"
    if not put["preprocessing_recorded"]:  # another tool's export: only the shapes are its own
        lines.append("preprocessing: not recorded in the file (not exported by mobilenetv2): "
                     "the resize, mean and std above are the ImageNet defaults that predict "
                     "and eval assume, not the model's")
    outputs = contract["outputs"]
    if contract["output"] == "features":
        lines.append(f"outputs: {len(outputs)} feature maps, "
                     + ", ".join(f"'{o['name']}'" for o in outputs))
    else:
        what = contract["output"]
        then = " (a softmax gives probabilities)" if what == "logits" else ""
        lines.append(f"output '{outputs[0]['name']}': ({batch}, {contract['num_classes']}) "
                     f"{what}{then}")
    names = contract["class_names"] or []
    shown = ", ".join(map(printable, names[:8])) + (
        f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    where = ("the JSON its method mobilenetv2_metadata returns"
             if contract["format"] == "executorch" else "its metadata_props")
    lines.append(f"classes: {len(names)} ({shown}); all of this is stored in {where}"
                 if names else f"classes: no names recorded in {where}")
    if contract["dataset"]:
        lines.append(f"trained on: {printable(contract['dataset'])}")
    if contract["training"]:
        lines.append(f"trained by: {printable(describe_training(contract['training']))}")
    return "\n".join(lines)


def _numbers(values: list[float]) -> str:
    """Statistics as the summaries print them: 4 significant digits, comma-separated."""
    return ", ".join(f"{v:.4g}" for v in values)
