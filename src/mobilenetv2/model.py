"""MobileNetV2 as in the paper, with the backbone contract of timm.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018
(arXiv 1801.04381). Section 3 and Table 2 of the paper, layer for layer as TF-Slim and
torchvision build it, so torchvision's and timm's weights load without loss (see weights.py).

    stem      3x3 conv, stride 2, 32*a channels, BN, ReLU6          224 -> 112
    stages    7 rows of inverted residual blocks, table (t, c, n, s)  112 -> 7
    head      1x1 conv to 1280 (1280*a when a > 1), BN, ReLU6
    pool      global average (or timm's other choices), dropout, linear classifier -> logits
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from .layers import ConvNormAct, act_layer_name, checkpoint_blocks, get_act_layer, make_divisible

# Table 2 of the paper: expansion t, output channels c, repeats n, stride s of the first block.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# timm's names for the global pooling; "" leaves the map unpooled (only without a classifier).
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalization(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's mean and std for RGB; their averages repeated for any other channel count."""
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return [round(mean, 4)] * in_channels, [round(std, 4)] * in_channels


class InvertedResidual(nn.Module):
    """The inverted residual block with a linear bottleneck (paper, section 3.3, Table 1).

    ``x (c_in) -> 1x1 expand to t*c_in, ReLU6 -> 3x3 depthwise, ReLU6 -> 1x1 project to c_out``,
    with no activation after the projection: a ReLU on the narrow bottleneck would destroy
    information the low-dimensional manifold carries (section 3.2). The shortcut joins the
    thin bottlenecks, and only where the shapes agree (stride 1, c_in == c_out); the paper
    uses no projection shortcut.

    The arguments after ``expand_ratio`` are keyword-only (torchvision's block takes
    ``norm_layer`` fifth).

    Args:
        in_channels: bottleneck channels coming in.
        out_channels: bottleneck channels going out.
        stride: stride of the depthwise convolution (1 or 2).
        expand_ratio: the expansion factor t; with t = 1 the expansion conv is left out.
        act_layer: activation of the expansion and depthwise layers.
        tf_padding: pad the strided depthwise convolution as TensorFlow does.
        bn_eps: BatchNorm's epsilon.
        drop_path: stochastic depth: in training, the residual branch of a block with a
            shortcut is dropped for each sample with this probability (survivors are scaled
            by ``1 / (1 - p)``), as timm's ``drop_path_rate`` does. Not in the paper.
        dilation: dilation of the depthwise convolution (with stride 1), for ``output_stride``.
        norm_layer: the normalisation after each convolution (see :class:`MobileNetV2`).
        linear_bottleneck: False puts ``act_layer`` after the projection too (before the
            shortcut's sum): the "ReLU6 in bottleneck" arm of the paper's ablation (Figure 6a).
        use_residual: False leaves the shortcut out even where the shapes agree: the "no
            residual" arm of the paper's ablation (Figure 6b).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        *,
        act_layer: Callable[..., nn.Module] = nn.ReLU6,
        tf_padding: bool = False,
        bn_eps: float = 1e-5,
        drop_path: float = 0.0,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        linear_bottleneck: bool = True,
        use_residual: bool = True,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio}")
        hidden_channels = in_channels * expand_ratio
        self.expand_ratio = expand_ratio
        self.use_residual = use_residual and stride == 1 and in_channels == out_channels
        self.expand: nn.Module = (
            ConvNormAct(in_channels, hidden_channels, 1, act_layer=act_layer, bn_eps=bn_eps,
                        norm_layer=norm_layer)
            if expand_ratio != 1
            else nn.Identity()
        )
        self.depthwise = ConvNormAct(
            hidden_channels, hidden_channels, 3, stride, groups=hidden_channels,
            act_layer=act_layer, tf_padding=tf_padding, bn_eps=bn_eps, dilation=dilation,
            norm_layer=norm_layer,
        )
        self.project = ConvNormAct(
            hidden_channels, out_channels, 1, act_layer=None if linear_bottleneck else act_layer,
            bn_eps=bn_eps, norm_layer=norm_layer,  # linear: no activation (section 3.2)
        )
        self.drop_path: nn.Module = (
            StochasticDepth(drop_path, "row") if drop_path > 0 and self.use_residual
            else nn.Identity()
        )

    def extra_repr(self) -> str:
        # What print(block) cannot show through its children: Table 1's t and s, and whether
        # the block adds its input (section 3.3), so a printed model reads beside the paper.
        stride = self.depthwise.conv.stride[0]
        return f"expand_ratio={self.expand_ratio}, stride={stride}, use_residual={self.use_residual}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = self.drop_path(out) + x
        return out


class GlobalPool(nn.Module):
    """Global pooling over H and W, flattened: (N, C, H, W) -> (N, C), or (N, 2C) for catavgmax.

    ``pool_type`` takes timm's names: ``"avg"`` (the paper's), ``"max"`` (Keras'
    ``pooling="max"``), ``"avgmax"`` (``0.5 * (avg + max)``), ``"catavgmax"`` (avg and max
    concatenated along channels) and ``""`` (no pooling: the map passes through unchanged).
    The branch below is on a constant of the module, never on data, so FX, TorchScript,
    torch.export and ONNX each see a single path.
    """

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        check_global_pool(pool_type)
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        """How many values per channel the pooled vector holds (2 for catavgmax)."""
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "max":
            x = F.adaptive_max_pool2d(x, 1)
        elif self.pool_type == "avgmax":  # timm's order of operations, for identical bits
            x = 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))
        elif self.pool_type == "catavgmax":
            x = torch.cat((F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)), 1)
        else:
            x = F.adaptive_avg_pool2d(x, 1)
        return torch.flatten(x, 1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def check_global_pool(global_pool: str, num_classes: int | None = None) -> None:
    """Refuse a pooling name timm does not know, and ``""`` in front of a classifier."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of 'avg', 'max', 'avgmax', 'catavgmax' or '' "
                         f"(no pooling), got {global_pool!r}")
    if global_pool == "" and num_classes:
        raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got {num_classes}: a "
                         "classifier takes pooled features")


class MobileNetV2(nn.Module):
    """MobileNetV2 for classification, and a backbone with timm's interface.

    Only ``num_classes`` and ``width_mult`` may be passed by position, as in torchvision's
    ``MobileNetV2(num_classes, width_mult, inverted_residual_setting, ...)``, whose third and
    later arguments are not ours: the rest are keyword-only, so a call written for
    torchvision fails with a clear ``TypeError`` instead of deep inside the constructor.

    Args:
        num_classes: classifier outputs; 0 leaves the classifier out, so ``forward`` returns
            the pooled features.
        width_mult: the width multiplier alpha (as in MobileNetV1); every layer's channels are
            scaled and rounded by :func:`make_divisible`. The head is scaled only when alpha > 1.
        in_channels: image channels (3 for RGB, 1 for grayscale).
        dropout: dropout before the classifier.
        round_nearest: channel counts are rounded to a multiple of this.
        small_input: stem stride 1 and the second row's stride 1, for 32x32 images (CIFAR,
            digits), so the last feature map is 4x4 rather than 1x1.
        last_channel: the head's width at alpha <= 1.
        inverted_residual_setting: a custom (t, c, n, s) table instead of the paper's.
        act_layer: the activation, ReLU6 as in the paper: a class, or a name of
            :data:`mobilenetv2.layers.ACTIVATIONS` (``"relu"``, ``"silu"``, ``"hard_swish"``,
            ...: timm's names). It is saved with the weights by name; a class of your own
            makes a model whose weights ``save_weights`` refuses (save its ``state_dict``).
        depth_mult: scales each row's repeats n to ``ceil(n * depth_mult)``, as timm's
            ``mobilenetv2_110d`` (1.2) and ``mobilenetv2_120d`` (1.4) do.
        fix_stem_head: keep the stem at 32 channels, the head at ``last_channel`` and the first
            and last rows' depths unscaled whatever the multipliers (timm's ``d`` variants).
        tf_padding: pad the stride-2 convolutions as TensorFlow's ``SAME`` does (0 before, 1
            after on even sides), for weights trained in Keras or TF-Slim.
        bn_eps: BatchNorm's epsilon: 1e-5 as PyTorch, 1e-3 for Keras and TF-Slim weights.
        drop_path_rate: stochastic depth for training (not in the paper): block i of N drops
            its residual branch with probability ``drop_path_rate * i / N``, as in timm.
        global_pool: the global pooling, by timm's names: ``"avg"`` (the paper's), ``"max"``
            (Keras' ``pooling="max"``), ``"avgmax"`` (``0.5 * (avg + max)``), ``"catavgmax"``
            (avg and max concatenated: the classifier takes ``2 * num_features`` inputs), or
            ``""`` (no pooling, only with ``num_classes=0``: ``forward`` then returns the
            (N, num_features, H, W) map, as Keras' ``include_top=False, pooling=None``).
        output_stride: the largest reduction of the input's size (32 in the paper's classifier).
            With 16 or 8 the strided blocks beyond it run at stride 1 and the blocks after them
            dilate their depthwise convolutions by the stride they skipped, as DeepLabv3 runs
            MobileNetV2 for segmentation (paper, section 6.3: output stride 16 and 8) and as
            timm's ``output_stride`` does. The weights are the same; ``feature_info`` gives
            each row's ``reduction`` and ``dilation``.
        norm_layer: the normalisation after each convolution, called as
            ``norm_layer(channels, eps=bn_eps)``, as torchvision's ``norm_layer``:
            ``nn.BatchNorm2d`` (the paper's), or torchvision's ``FrozenBatchNorm2d`` for
            detection and segmentation, whose small batches cannot estimate BatchNorm's
            statistics (torchvision's detection builders pass it with pretrained weights). Not
            stored with the weights: they have BatchNorm's tensors, and reload with
            ``nn.BatchNorm2d`` unless it is given again.
        linear_bottleneck: True (the paper's) keeps every block's projection linear; False
            puts ``act_layer`` after it, the "ReLU6 in bottleneck" arm of the paper's ablation
            (section 6.4, Figure 6a). The weights are the same tensors either way.
        use_residual: True (the paper's) adds the shortcut between bottlenecks wherever the
            shapes agree; False leaves out every shortcut, the "no residual" arm of Figure 6b.

    Raises:
        ValueError: for an argument that cannot make a network.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        *,
        in_channels: int = 3,
        dropout: float = 0.2,
        round_nearest: int = 8,
        small_input: bool = False,
        last_channel: int = 1280,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        act_layer: str | Callable[..., nn.Module] = nn.ReLU6,
        depth_mult: float = 1.0,
        fix_stem_head: bool = False,
        tf_padding: bool = False,
        bn_eps: float = 1e-5,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        output_stride: int = 32,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        linear_bottleneck: bool = True,
        use_residual: bool = True,
    ) -> None:
        super().__init__()
        setting = tuple(
            tuple(int(v) for v in row)
            for row in (inverted_residual_setting or INVERTED_RESIDUAL_SETTING)
        )
        num_classes = class_count(num_classes)
        _check_arguments(width_mult, in_channels, dropout, round_nearest, setting)
        if not depth_mult > 0:
            raise ValueError(f"depth_mult must be > 0, got {depth_mult}")
        if not 0 < bn_eps < 1:
            raise ValueError(f"bn_eps must be in (0, 1), got {bn_eps}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        check_global_pool(global_pool, num_classes)
        act_name, act_layer = act_layer_name(act_layer), get_act_layer(act_layer)
        stem_stride = 1 if small_input else 2
        if output_stride not in (1, 2, 4, 8, 16, 32) or output_stride < stem_stride:
            raise ValueError(f"output_stride must be a power of 2 from {stem_stride} (the stem's "
                             f"stride) to 32, got {output_stride}")
        self.num_classes = num_classes
        self.small_input = small_input
        # What save_weights stores so load_model can rebuild this exact network. (config, meta,
        # row_info and feature_info are typed as locals: torch.jit.script warns of every annotated
        # ``self.x: dict[...]`` in __init__, and rejects them annotated on the class.)
        config: dict[str, Any] = {
            "arch": "mobilenet_v2",
            "num_classes": num_classes,
            "width_mult": width_mult,
            "in_channels": in_channels,
            "dropout": dropout,
            "round_nearest": round_nearest,
            "small_input": small_input,
            "last_channel": last_channel,
        }
        if inverted_residual_setting is not None:
            config["inverted_residual_setting"] = [list(row) for row in setting]
        # Stored only when set, so files written before these options existed are unchanged.
        options = {"depth_mult": (depth_mult, 1.0), "fix_stem_head": (fix_stem_head, False),
                   "tf_padding": (tf_padding, False), "bn_eps": (bn_eps, 1e-5),
                   "drop_path_rate": (drop_path_rate, 0.0), "global_pool": (global_pool, "avg"),
                   "output_stride": (output_stride, 32), "act_layer": (act_name, "relu6"),
                   "linear_bottleneck": (linear_bottleneck, True),
                   "use_residual": (use_residual, True)}
        config.update({k: v for k, (v, default) in options.items() if v != default})
        self.config = config
        size = 32 if small_input else 224
        # How inputs are prepared; the trainer replaces it with its dataset's statistics.
        mean, std = default_normalization(in_channels)
        meta: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "input_size": [in_channels, size, size],
            "class_names": None,
        }
        self.meta = meta

        stem_channels = 32 if fix_stem_head else make_divisible(32 * width_mult, round_nearest)
        self.stem = ConvNormAct(
            in_channels, stem_channels, 3, stride=stem_stride, act_layer=act_layer,
            tf_padding=tf_padding, bn_eps=bn_eps, norm_layer=norm_layer,
        )
        reduction, dilation = stem_stride, 1
        stages: list[nn.Module] = []
        row_info: list[dict[str, Any]] = []
        self.row_info = row_info
        channels = stem_channels
        depths = [n if fix_stem_head and index in (0, len(setting) - 1) else math.ceil(n * depth_mult)
                  for index, (_, _, n, _) in enumerate(setting)]
        block_index, total_blocks = 0, sum(depths)
        for index, ((t, c, _, s), n) in enumerate(zip(setting, depths, strict=True)):
            if small_input and index == 1:
                s = 1  # keep 32x32 inputs from shrinking to 1x1 (the CIFAR adaptation)
            out_channels = make_divisible(c * width_mult, round_nearest)
            blocks = []
            for i in range(n):
                stride, block_dilation = (s if i == 0 else 1), dilation
                if stride > 1 and reduction * stride > output_stride:
                    # Beyond output_stride: no striding; this block keeps the dilation it
                    # had, the next ones widen theirs by the stride skipped (as timm).
                    stride, dilation = 1, dilation * stride
                reduction *= stride
                drop_path = drop_path_rate * block_index / total_blocks  # deeper ones drop more
                blocks.append(InvertedResidual(
                    channels, out_channels, stride, t, act_layer=act_layer,
                    tf_padding=tf_padding, bn_eps=bn_eps, drop_path=drop_path,
                    dilation=block_dilation, norm_layer=norm_layer,
                    linear_bottleneck=linear_bottleneck, use_residual=use_residual))
                channels = out_channels
                block_index += 1
            stages.append(nn.Sequential(*blocks))
            # timm's keys; "stage" counts the stem as 0, so row i is stage i + 1.
            self.row_info.append({"stage": index + 1, "module": f"stages.{index}",
                                  "num_chs": channels, "reduction": reduction,
                                  "dilation": dilation})
        self.stages = nn.Sequential(*stages)
        # timm's taps: the last row at each reduction (strides 2, 4, 8, 16, 32 for the paper's).
        feature_info: list[dict[str, Any]] = [self.row_info[r] for r in tap_rows(self.row_info)]
        self.feature_info = feature_info

        self.num_features = (
            last_channel if fix_stem_head
            else make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        )
        self.head: nn.Module = ConvNormAct(channels, self.num_features, 1, act_layer=act_layer,
                                           bn_eps=bn_eps, norm_layer=norm_layer)
        self.pool = GlobalPool(global_pool)  # no parameters: state_dicts are the same for all
        # What the classifier takes (timm's name): 2 * num_features after catavgmax.
        self.head_hidden_size = self.num_features * self.pool.feat_mult()
        self.dropout = nn.Dropout(dropout)
        self.classifier: nn.Module = (
            nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # As torchvision: He init (fan-out) for convs, unit BN, small normal for the classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) image -> (N, num_features, H/r, W/r) feature map after the head conv,
        r = ``feature_info[-1]["reduction"]``: 32 for the paper's model, 8 with ``small_input``,
        16 or 8 with ``output_stride`` (a side not divisible by r rounds up)."""
        x = self.stem(x)
        # TorchScript compiles only the plain path (is_scripting() first: it skips the rest).
        if not torch.jit.is_scripting() and self.grad_checkpointing and self.training:
            return self.head(checkpoint_blocks(self.stages, x))
        return self.head(self.stages(x))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in training, as timm's models do: each inverted residual
        block keeps only its input and recomputes its activations in the backward pass
        (:func:`mobilenetv2.layers.checkpoint_blocks`). Same gradients, same BatchNorm
        statistics; inference and exports are unaffected; under ``torch.compile`` too."""
        self.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits, or the pooled (N, head_hidden_size) vector with ``pre_logits``
        (with ``global_pool=""``, the map itself)."""
        x = self.pool(x)
        x = self.dropout(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) image -> (N, num_classes) logits (no softmax)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        extra_blocks: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The maps at chosen taps on the way, as timm >= 1.0's models give them.

        ``indices`` index :attr:`feature_info`, timm's five taps (the last row of the table at
        each stride: 2, 4, 8, 16, 32), exactly as ``features_only``'s ``out_indices`` and as
        timm's ``mobilenetv2_*`` do: the same call gives the same maps.

        Args:
            x: (N, C, H, W) images.
            indices: a sequence of taps (negative ones count from the end), or an int ``n`` for
                the last ``n`` taps; None: all of them.
            norm: accepted for timm's signature and ignored: MobileNetV2 has no final norm apart
                from the head conv's BatchNorm, which is not applied to the intermediates
                (timm ignores it for this model too).
            stop_early: run no row after the last one asked for. The head conv then runs only
                when the last row was reached, and the final map is that row's output otherwise
                (as in timm).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list.
            extra_blocks: as timm: index the stem's output (0) and every row's (1 to 7, as
                :attr:`row_info`) instead of the taps; None then takes all eight.

        Returns:
            ``(final, intermediates)``: the head's output (N, num_features, H/r, W/r), r as in
            :meth:`forward_features`, and the asked-for maps in network order; or only the list.

        Raises:
            ValueError: for an index out of range, or another ``output_fmt``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if extra_blocks:  # the stem is 0, row i is i + 1
            stem_info = [{"module": "stem", "num_chs": self.stem.out_channels}]
            taps = stem_info + list(self.row_info)
            take = [i - 1 for i in take_indices(taps, len(taps) if indices is None else indices)]
        else:
            take = [self.feature_info[t]["stage"] - 1 for t in take_indices(self.feature_info, indices)]
        end = take[-1] + 1 if stop_early else len(self.stages)
        checkpointed = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        intermediates: list[torch.Tensor] = []
        x = self.stem(x)
        if -1 in take:
            intermediates.append(x)
        for i, stage in enumerate(self.stages[:end]):
            x = checkpoint_blocks([stage], x) if checkpointed else stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if end == len(self.stages):
            x = self.head(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what the intermediates in ``indices`` do not need, as timm >= 1.0 does.

        The rows after the last one asked for go, and so does the head conv when rows go or
        with ``prune_head`` or ``prune_norm`` (the head's BatchNorm cannot go alone); the
        classifier is then reset to none (``num_classes=0``, ``global_pool=""``), so ``forward``
        returns the last kept row's map, and ``num_features`` becomes its channels.
        ``feature_info`` and ``row_info`` keep the taps and rows the network still has.

        A pruned model saves as a backbone: ``load_model`` rebuilds it as a
        :class:`MobileNetV2Features` whose ``forward`` returns
        ``forward_intermediates(x, indices=kept, intermediates_only=True)``.

        Args:
            indices: taps to keep, indexed as in :meth:`forward_intermediates`.
            prune_norm: drop the head conv (which holds the last BatchNorm).
            prune_head: drop the head conv and the classifier.

        Returns:
            The kept taps' indices, sorted and non-negative.
        """
        take = take_indices(self.feature_info, indices)
        rows = [self.feature_info[t]["stage"] - 1 for t in take]
        last = rows[-1]
        if not (prune_norm or prune_head or last + 1 < len(self.stages)):
            return take  # nothing to drop
        self.stages = self.stages[: last + 1]
        self.row_info = self.row_info[: last + 1]
        self.feature_info = [info for info in self.feature_info if info["stage"] - 1 <= last]
        self.head = nn.Identity()
        self.num_features = self.row_info[last]["num_chs"]
        # Saved, it rebuilds as the backbone with these stages (the same state_dict keys).
        self.config.update(features_only=True, out_rows=rows)
        self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameters grouped by depth, as timm's models group them: the stem, each block (each
        stage with ``coarse``), then the head conv; the classifier falls in the last group.

        timm's layer-wise learning-rate decay reads it:
        ``timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)`` gives the
        same groups as for timm's ``mobilenetv2_*`` (tested).
        """
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return {"stem": r"^stem\.", "blocks": [(blocks, None), (r"^head\.", (99999,))]}

    __jit_unused_properties__ = ["pretrained_cfg", "default_cfg"]  # plain Python: TorchScript skips them

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing in ``meta`` in timm's words, which timm's data pipeline reads:
        ``timm.data.create_transform(**timm.data.resolve_model_data_config(model))``. Computed
        from ``meta`` on each access: change ``meta`` to change it."""
        return timm_data_config(self, first_conv="stem.conv", classifier="classifier")

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`, which code written for timm < 0.9 reads."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's accessor): an ``nn.Linear``, or ``nn.Identity`` with
        ``num_classes=0``."""
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none).

        Args:
            num_classes: outputs of the new classifier; 0 leaves it out.
            global_pool: a new pooling (see the class's ``global_pool``); None keeps the current.

        Raises:
            ValueError: for a negative count, an unknown pooling, or ``""`` with a classifier.
        """
        num_classes = class_count(num_classes)  # before anything changes: a refusal leaves it whole
        global_pool = self.pool.pool_type if global_pool is None else global_pool
        check_global_pool(global_pool, num_classes)
        if num_classes > 0 and self.config.get("features_only"):
            raise ValueError(
                "this model was pruned to a backbone by prune_intermediate_layers and is saved "
                "as one: put the new classifier on a model built without pruning"
            )
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if global_pool == "avg":
            self.config.pop("global_pool", None)  # the default is not stored (see __init__)
        else:
            self.config["global_pool"] = global_pool
        self.meta["class_names"] = None
        self.pool = GlobalPool(global_pool)
        self.head_hidden_size = self.num_features * self.pool.feat_mult()
        weight = self.stem.conv.weight  # the new layer goes where the model is
        self.classifier = (
            nn.Linear(self.head_hidden_size, num_classes, device=weight.device, dtype=weight.dtype)
            if num_classes > 0 else nn.Identity()
        )
        if num_classes > 0:
            nn.init.normal_(self.classifier.weight, 0, 0.01)
            nn.init.zeros_(self.classifier.bias)
        self.classifier.train(self.training)


class FeatureInfo(list):
    """A backbone's ``feature_info``: a list with one dict per output map (``num_chs``,
    ``reduction``, ``dilation``, ``module``, ``index``), and the accessors of timm's
    ``FeatureInfo`` that detection and segmentation code calls: ``channels()``,
    ``reduction()``, ``module_name()``, ``get(key)``, ``get_dicts()``, each over the output
    maps, or the one (or ones) at ``idx``."""

    def _select(self, idx: int | Sequence[int] | None, read: Callable[[dict], Any]) -> Any:
        if idx is None:
            return [read(info) for info in self]
        if isinstance(idx, (tuple, list)):
            return [read(self[i]) for i in idx]
        return read(self[idx])

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key``'s value for each output map, or for the one (or ones) at ``idx``."""
        return self._select(idx, lambda info: info[key])

    def get_dicts(self, keys: Sequence[str] | None = None,
                  idx: int | Sequence[int] | None = None) -> Any:
        """Copies of the dicts (only ``keys`` of them, when given), as :meth:`get` selects."""
        return self._select(idx, lambda info: dict(info) if keys is None
                            else {k: info[k] for k in keys})

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """The maps' channel counts (``num_chs``), e.g. for an FPN's ``in_channels_list``."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """The maps' strides with respect to the input (``reduction``)."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """The names of the modules whose outputs the maps are (``stages.6`` ...)."""
        return self.get("module", idx)


class MobileNetV2Features(nn.Module):
    """Multi-scale feature maps for detection and segmentation heads.

    Runs the stem and the rows of a :class:`MobileNetV2` up to the last one asked for and
    returns the maps at ``out_indices``: indices into the model's ``feature_info``, timm's five
    taps (strides 2, 4, 8, 16, 32), so ``out_indices`` means what it means in timm. ``out_rows``
    picks rows of the table instead (0 to 6, as ``row_info``), for the maps between the taps
    (e.g. row 5's 160 channels at stride 32). The head and classifier are dropped. Module
    names are kept, so the classification model's weights load into it.

    Raises:
        ValueError: for an index out of range, or both ``out_indices`` and ``out_rows``.
    """

    def __init__(self, model: MobileNetV2, out_indices: int | Sequence[int] | None = None, *,
                 out_rows: Sequence[int] | None = None) -> None:
        super().__init__()
        taps_of = {info["stage"] - 1: k for k, info in enumerate(model.feature_info)}
        if out_rows is not None:
            if out_indices is not None:
                raise ValueError("give out_indices (timm's taps) or out_rows (rows of the "
                                 "table), not both")
            if isinstance(out_rows, int):
                raise ValueError(f"out_rows must be a list of rows in [0, "
                                 f"{len(model.row_info) - 1}], got the int {out_rows}")
            rows = take_indices(model.row_info, out_rows, "out_rows")
        else:
            rows = [model.feature_info[t]["stage"] - 1
                    for t in take_indices(model.feature_info, out_indices, "out_indices")]
        self.out_rows = rows
        # timm's attribute: the taps returned (None when a row between taps is among them)
        self.out_indices = [taps_of[r] for r in rows] if all(r in taps_of for r in rows) else None
        self.stem = model.stem
        self.stages = nn.Sequential(*list(model.stages)[: rows[-1] + 1])
        self.feature_info = FeatureInfo(
            dict(model.row_info[r], **({"index": taps_of[r]} if r in taps_of else {}))
            for r in rows)
        self.config = dict(model.config, features_only=True, out_rows=rows)
        self.meta = model.meta
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """See :meth:`MobileNetV2.set_grad_checkpointing`."""
        self.grad_checkpointing = enable

    __jit_unused_properties__ = ["pretrained_cfg", "default_cfg"]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """See :attr:`MobileNetV2.pretrained_cfg`."""
        return timm_data_config(self, first_conv="stem.conv")

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features: list[torch.Tensor] = []
        # TorchScript compiles only the plain loop (is_scripting() first: it skips the rest).
        if not torch.jit.is_scripting() and self.grad_checkpointing and self.training:
            for i, stage in enumerate(self.stages):
                x = checkpoint_blocks([stage], x)
                if i in self.out_rows:
                    features.append(x)
            return features
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_rows:
                features.append(x)
        return features


def timm_data_config(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """``model.meta`` as a timm ``pretrained_cfg``: input size, resampling, crop, mean, std."""
    meta, config = model.meta, model.config
    side = int(meta["input_size"][-1])
    small = side <= 64  # mobilenetv2.data resizes such images whole: timm's "squash" at crop 1
    return {
        "architecture": config.get("name", config.get("arch")),
        "input_size": tuple(int(v) for v in meta["input_size"]),
        "interpolation": meta.get("interpolation") or "bilinear",
        "crop_pct": 1.0 if small else float(meta.get("crop_pct") or 0.875),
        "crop_mode": "squash" if small else "center",
        "mean": tuple(float(v) for v in meta["mean"]),
        "std": tuple(float(v) for v in meta["std"]),
        "num_classes": getattr(model, "num_classes", 0),
        "pool_size": (max(1, side // model.feature_info[-1]["reduction"]),) * 2,
        **extra,
    }


def tap_rows(row_info: Sequence[dict[str, Any]]) -> list[int]:
    """The rows whose outputs are timm's taps: the last row at each reduction (strides 2, 4,
    8, 16, 32 for the paper's model: rows 0, 1, 2, 4, 6).

    Where ``output_stride`` replaced a stride by dilation, the change of dilation counts as
    the change of reduction it stands for, so the same rows are taken (as timm takes them)."""
    def scale(info: dict[str, Any]) -> tuple[int, int]:
        return info["reduction"], info.get("dilation", 1)

    return [i for i, info in enumerate(row_info)
            if i + 1 == len(row_info) or scale(row_info[i + 1]) != scale(info)]


def take_indices(
    feature_info: Sequence[dict[str, Any]],
    indices: int | Sequence[int] | None,
    name: str = "indices",
) -> list[int]:
    """The entries of ``feature_info`` that ``indices`` names, sorted, without repeats.

    None gives all; an int ``n`` the last ``n``; a sequence the ones it lists, negative indices
    counting from the end (timm's ``feature_take_indices``).

    Raises:
        ValueError: for an empty list or an index out of range.
    """
    count = len(feature_info)
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"{name}={indices} asks for the last {indices} of {count}; an int "
                             f"must be in [1, {count}]")
        return list(range(count - indices, count))
    wanted = [int(i) for i in indices]
    if not wanted or any(not -count <= i < count for i in wanted):
        raise ValueError(
            f"{name} must be a non-empty list of indices in [0, {count - 1}], got {wanted}"
        )
    return sorted({i % count for i in wanted})


def class_count(num_classes: Any, minimum: int = 0) -> int:
    """``num_classes`` as a plain int: NumPy's integers (``y.max() + 1``) and 0-d integer
    tensors are taken, as JSON (the saved config) cannot hold them.

    Raises:
        ValueError: for anything else (a float, a bool), or fewer than ``minimum``.
    """
    if hasattr(num_classes, "__index__") and not isinstance(num_classes, bool):
        with contextlib.suppress(TypeError):  # a float tensor has __index__, and refuses
            num_classes = operator.index(num_classes)
    if type(num_classes) is not int or num_classes < minimum:
        what = "0 for no classifier" if minimum == 0 else "the classifier's outputs"
        raise ValueError(f"num_classes must be an int >= {minimum} ({what}), got "
                         f"{num_classes!r}")
    return num_classes


def _check_arguments(
    width_mult: float,
    in_channels: int,
    dropout: float,
    round_nearest: int,
    setting: tuple[tuple[int, ...], ...],
) -> None:
    if not (width_mult > 0 and math.isfinite(width_mult)):
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if round_nearest < 1:
        raise ValueError(f"round_nearest must be >= 1, got {round_nearest}")
    if not setting or any(len(row) != 4 for row in setting):
        raise ValueError(
            "inverted_residual_setting must be a non-empty list of (t, c, n, s) rows, "
            f"got {setting}"
        )
    if any(t < 1 or c < 1 or n < 1 or s not in (1, 2) for t, c, n, s in setting):
        raise ValueError(f"every (t, c, n, s) row needs t, c, n >= 1 and s in (1, 2), got {setting}")
