"""Small building blocks shared by the models: channel rounding and Conv-BN-activation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, as in the paper's TF-Slim code.

    The result is at least ``min_value`` (default ``divisor``) and never more than 10% below
    ``value``, so a width multiplier never removes more than a tenth of a layer.

    Args:
        value: the unrounded channel count, e.g. ``c * width_mult``.
        divisor: the multiple to round to (8 suits SIMD lanes and tensor cores).
        min_value: the smallest allowed result.

    Returns:
        The rounded channel count.
    """
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> activation`` with "same" padding for odd kernels.

    The children are named ``conv``, ``bn`` and (when there is one) ``act`` so state_dict keys
    read as what they are: ``stem.conv.weight``, ``stem.bn.running_mean``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size (odd).
        stride: convolution stride.
        groups: ``in_channels`` for a depthwise convolution, 1 for a dense one.
        act_layer: activation constructor, or ``None`` for a linear layer (the bottleneck's
            projection, section 3.2 of the paper).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act_layer: Callable[..., nn.Module] | None = nn.ReLU6,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,  # the BatchNorm that follows has its own bias
            ),
            bn=nn.BatchNorm2d(out_channels),
        )
        if act_layer is not None:
            layers["act"] = act_layer(inplace=True)
        super().__init__(layers)
        self.out_channels = out_channels
