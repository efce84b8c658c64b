"""``mobilenetv2 summary``: the per-layer table, parameters, multiply-adds and size."""

from __future__ import annotations

import argparse
import re

from ..registry import create_model
from .common import add_model_args, positive_float, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "summary", help="per-layer table, parameters, multiply-adds and size",
        description="Print the per-layer torchinfo table of a model with its total parameters, "
        "multiply-adds and size.",
    )
    add_model_args(parser, default=None)
    parser.add_argument("--width-mult", type=positive_float, default=None, metavar="W",
                        help="a width multiplier other than the named model's")
    parser.add_argument("--resolution", type=positive_int, default=None, metavar="R",
                        help="input size (default: 224, or 32 with --small-input)")
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                        metavar="OS", help="8 or 16: dilate the last rows as DeepLabv3 does "
                        "(paper, section 6.3; default 32)")
    parser.add_argument("--depth", type=positive_int, default=3, help="table depth (default 3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torchinfo

    from ..model import MobileNetV2

    kwargs = {
        key: value
        for key, value in (("num_classes", args.num_classes), ("in_channels", args.in_channels),
                           ("small_input", args.small_input), ("output_stride", args.output_stride))
        if value is not None
    }
    if args.width_mult is not None:
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
    resolution = args.resolution or default_size
    if resolution < 32:
        raise ValueError(f"--resolution must be at least 32, got {resolution}")
    stats = torchinfo.summary(
        model, input_size=(1, channels, resolution, resolution), depth=args.depth, verbose=0,
        col_names=("output_size", "num_params", "mult_adds"), device="cpu",
    )
    table = re.sub(r"\(Units\.(\w)\w*\)", r"(\1)", str(stats))  # torchinfo prints enum names
    print(table)
    print(f"{name} at {resolution}x{resolution}: {stats.total_params:,} parameters, "
          f"{stats.total_mult_adds / 1e6:,.1f} M multiply-adds, "
          f"{stats.total_params * 4 / 1e6:.2f} MB of fp32 weights")
    return 0
