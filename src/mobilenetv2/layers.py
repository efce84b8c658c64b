"""Small building blocks shared by the models: channel rounding and Conv-BN-activation."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
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


# Activations by the names timm's ``get_act_layer`` gives them, so a model's activation can be
# stored in its weights file (and passed as a string, as to timm's models).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu6": nn.ReLU6, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU,
    "hard_swish": nn.Hardswish, "gelu": nn.GELU, "mish": nn.Mish, "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}


def get_act_layer(act_layer: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """An activation constructor from a name of :data:`ACTIVATIONS` or a constructor.

    Raises:
        ValueError: for an unknown name.
    """
    if not isinstance(act_layer, str):
        if not callable(act_layer):
            raise ValueError(f"act_layer must be a name ({', '.join(ACTIVATIONS)}) or an "
                             f"activation class, got {act_layer!r}")
        return act_layer
    if act_layer.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown act_layer {act_layer!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act_layer.lower()]


def act_layer_name(act_layer: str | Callable[..., nn.Module]) -> str:
    """The name :func:`get_act_layer` knows ``act_layer`` by, or its qualified name (which it
    does not know: such a model cannot be saved with its configuration)."""
    if isinstance(act_layer, str):
        return act_layer.lower()
    name = next((k for k, v in ACTIVATIONS.items() if v is act_layer), None)
    return name or f"{getattr(act_layer, '__module__', '?')}.{getattr(act_layer, '__qualname__', act_layer)}"


def create_act(act_layer: Callable[..., nn.Module]) -> nn.Module:
    """``act_layer(inplace=True)``, or ``act_layer()`` for one without ``inplace`` (GELU)."""
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()


class PadSame(nn.Module):
    """Zero padding as TensorFlow's ``padding="SAME"`` computes it, from the input's size.

    For a stride-2 3x3 convolution on an even side TensorFlow pads 0 before and 1 after (PyTorch's
    ``padding=1`` pads 1 on both sides, so the window grid is shifted by a pixel); on an odd side
    both pad 1. Weights trained in TensorFlow (Keras, TF-Slim) expect TensorFlow's grid.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel_size {kernel_size} < stride {stride} needs no padding")
        self.kernel_size = kernel_size
        self.stride = stride

    def padding_for(self, x: torch.Tensor) -> list[int]:
        """``[left, right, top, bottom]`` for ``x``: in total what gives ceil(side / stride)
        outputs, the smaller half first. Never negative when kernel_size >= stride, so there is
        no max() and torch.fx can trace it (int8 quantization)."""
        height, width = x.shape[-2], x.shape[-1]
        pad_h = (-(-height // self.stride) - 1) * self.stride + self.kernel_size - height
        pad_w = (-(-width // self.stride) - 1) * self.stride + self.kernel_size - width
        return [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.padding_for(x))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class ConvNormAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> activation`` with "same" padding for odd kernels.

    The children are named ``conv``, ``bn`` and (when there is one) ``act`` so state_dict keys
    read as what they are: ``stem.conv.weight``, ``stem.bn.running_mean``. With ``tf_padding``
    a strided convolution is padded as TensorFlow pads it, by a parameter-free ``pad`` child.

    The arguments after ``stride`` are keyword-only: torchvision's ``Conv2dNormActivation``
    takes ``padding`` fifth, which here would silently become ``groups``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size (odd).
        stride: convolution stride.
        groups: ``in_channels`` for a depthwise convolution, 1 for a dense one.
        act_layer: activation constructor, or ``None`` for a linear layer (the bottleneck's
            projection, section 3.2 of the paper).
        tf_padding: pad strided convolutions as TensorFlow's ``SAME`` (see :class:`PadSame`);
            at stride 1 the two agree.
        bn_eps: BatchNorm's epsilon (1e-5 in PyTorch, 1e-3 in Keras and TF-Slim).
        dilation: spacing of the kernel's taps (atrous convolution, for ``output_stride``);
            the padding grows with it so the map keeps its size.
        norm_layer: the normalisation, called as ``norm_layer(out_channels, eps=bn_eps)``:
            ``nn.BatchNorm2d``, or torchvision's ``FrozenBatchNorm2d`` for detection's small
            batches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        groups: int = 1,
        act_layer: Callable[..., nn.Module] | None = nn.ReLU6,
        tf_padding: bool = False,
        bn_eps: float = 1e-5,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        if dilation > 1 and stride > 1:
            raise ValueError("a convolution is either strided or dilated, not both")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        padding = dilation * (kernel_size - 1) // 2
        if tf_padding and stride > 1:
            layers["pad"], padding = PadSame(kernel_size, stride), 0
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,  # the BatchNorm that follows has its own bias
        )
        layers["bn"] = norm_layer(out_channels, eps=bn_eps)
        if act_layer is not None:
            layers["act"] = create_act(act_layer)
        super().__init__(layers)
        self.out_channels = out_channels


def checkpoint_blocks(stages: Iterable[nn.Sequential], x: torch.Tensor) -> torch.Tensor:
    """Run the blocks of ``stages`` in turn, keeping only each block's input for backward.

    Gradient checkpointing (timm's ``set_grad_checkpointing``): the activations inside a block
    (the expanded, 6x wider tensors of an inverted residual) are recomputed during the
    backward pass instead of being stored. The recomputation sees the same random numbers
    (drop path, dropout) and leaves BatchNorm's running statistics as the first forward set
    them, so a step with checkpointing gives the same weights and buffers as one without.
    """
    from torch.utils.checkpoint import checkpoint

    # Under torch.compile the checkpoint becomes part of the graph, whose recomputation does
    # not write the buffers again (tested), and Dynamo cannot trace a context_fn.
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    for block in (block for stage in stages for block in stage):
        if compiling:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda block=block: (contextlib.nullcontext(),
                                                           _buffers_restored(block)))
    return x


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Undo what the recomputation writes into ``module``'s buffers: without it, every
    BatchNorm would fold each batch into its running mean and variance twice."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved, strict=True):
                buffer.copy_(value)
