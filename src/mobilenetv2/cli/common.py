"""Argument types and flag groups that several subcommands share (declared once, here)."""

from __future__ import annotations

import argparse
import importlib.util

from ..registry import list_models
from ..runtime import one_line, printable  # noqa: F401  (the CLI's commands take them from here)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# The largest image side a command takes (as the weights' metadata allows): a typo such as
# 22400 for 224 is refused here instead of asking for hundreds of gigabytes.
MAX_RESOLUTION = 8192


def image_side(text: str) -> int:
    value = positive_int(text)
    if value > MAX_RESOLUTION:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RESOLUTION} pixels, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """``"1,32"`` -> ``[1, 32]``, each a positive integer."""
    try:
        values = [int(part) for part in text.split(",")]  # "1,,2" is a typo, not [1, 2]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text}")
    return values


def model_name(text: str) -> str:
    from ..registry import _ALIASES

    if text not in list_models() and text not in _ALIASES:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose one of: {', '.join(list_models())}"
        )
    return text


def add_model_args(parser: argparse.ArgumentParser, default: str | None = "mobilenet_v2_100") -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", type=model_name, default=default, metavar="NAME",
        help=f"one of {', '.join(list_models())} (default: {default or 'mobilenet_v2_100'})",
    )
    group.add_argument("--num-classes", type=positive_int, default=None, metavar="K",
                       help="classifier outputs")
    group.add_argument("--in-channels", type=positive_int, default=None, metavar="C",
                       help="image channels (3 for RGB)")
    group.add_argument("--small-input", action="store_true", default=None,
                       help="stem and second row at stride 1, for 32x32 images")


def add_use_ema_arg(parser: argparse.ArgumentParser, what: str = "--weights") -> None:
    parser.add_argument("--use-ema", action="store_true",
                        help=f"the EMA weights of a {what} training checkpoint rather than its "
                        "raw ones (timm's state_dict_ema, torchvision's model_ema, our "
                        "checkpoint.pt's ema), as timm's validate.py --use-ema")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object on stdout, for machines")


# Optional packages -> the extra of pyproject.toml that installs them.
EXTRAS = {"onnx": "deploy", "onnxruntime": "deploy", "onnxscript": "deploy", "h5py": "keras",
          "tensorboard": "tensorboard", "executorch": "executorch"}


def missing_package_message(name: str, why: str = "this") -> str | None:
    """One line saying how to install an optional package, or None for any other module."""
    root = (name or "").split(".")[0]
    extra = EXTRAS.get(root)
    return f"{why} needs {root}: pip install 'mobilenetv2[{extra}]'" if extra else None


def require(*packages: str, why: str) -> None:
    """Fail before any work when an optional package that will be needed is not installed."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ValueError(missing_package_message(package, why))
