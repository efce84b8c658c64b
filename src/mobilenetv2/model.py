"""MobileNetV2 as in the paper, with the backbone contract of timm.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018
(arXiv 1801.04381). Section 3 and Table 2 of the paper, layer for layer as TF-Slim and
torchvision build it, so torchvision's and timm's weights load without loss (see weights.py).

    stem      3x3 conv, stride 2, 32*a channels, BN, ReLU6          224 -> 112
    stages    7 rows of inverted residual blocks, table (t, c, n, s)  112 -> 7
    head      1x1 conv to 1280 (1280*a when a > 1), BN, ReLU6
    pool      global average, dropout, linear classifier -> logits
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from .layers import ConvNormAct, make_divisible

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
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        act_layer: Callable[..., nn.Module] = nn.ReLU6,
        tf_padding: bool = False,
        bn_eps: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio}")
        hidden_channels = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand: nn.Module = (
            ConvNormAct(in_channels, hidden_channels, 1, act_layer=act_layer, bn_eps=bn_eps)
            if expand_ratio != 1
            else nn.Identity()
        )
        self.depthwise = ConvNormAct(
            hidden_channels, hidden_channels, 3, stride, groups=hidden_channels,
            act_layer=act_layer, tf_padding=tf_padding, bn_eps=bn_eps,
        )
        self.project = ConvNormAct(
            hidden_channels, out_channels, 1, act_layer=None, bn_eps=bn_eps  # linear
        )
        self.drop_path: nn.Module = (
            StochasticDepth(drop_path, "row") if drop_path > 0 and self.use_residual
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = self.drop_path(out) + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 for classification, and a backbone with timm's interface.

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
        act_layer: the activation, ReLU6 as in the paper.
        depth_mult: scales each row's repeats n to ``ceil(n * depth_mult)``, as timm's
            ``mobilenetv2_110d`` (1.2) and ``mobilenetv2_120d`` (1.4) do.
        fix_stem_head: keep the stem at 32 channels, the head at ``last_channel`` and the first
            and last rows' depths unscaled whatever the multipliers (timm's ``d`` variants).
        tf_padding: pad the stride-2 convolutions as TensorFlow's ``SAME`` does (0 before, 1
            after on even sides), for weights trained in Keras or TF-Slim.
        bn_eps: BatchNorm's epsilon: 1e-5 as PyTorch, 1e-3 for Keras and TF-Slim weights.
        drop_path_rate: stochastic depth for training (not in the paper): block i of N drops
            its residual branch with probability ``drop_path_rate * i / N``, as in timm.

    Raises:
        ValueError: for an argument that cannot make a network.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        dropout: float = 0.2,
        round_nearest: int = 8,
        small_input: bool = False,
        last_channel: int = 1280,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU6,
        depth_mult: float = 1.0,
        fix_stem_head: bool = False,
        tf_padding: bool = False,
        bn_eps: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        setting = tuple(
            tuple(int(v) for v in row)
            for row in (inverted_residual_setting or INVERTED_RESIDUAL_SETTING)
        )
        _check_arguments(num_classes, width_mult, in_channels, dropout, round_nearest, setting)
        if not depth_mult > 0:
            raise ValueError(f"depth_mult must be > 0, got {depth_mult}")
        if not 0 < bn_eps < 1:
            raise ValueError(f"bn_eps must be in (0, 1), got {bn_eps}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.small_input = small_input
        # What save_weights stores so load_model can rebuild this exact network.
        self.config: dict[str, Any] = {
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
            self.config["inverted_residual_setting"] = [list(row) for row in setting]
        # Stored only when set, so files written before these options existed are unchanged.
        options = {"depth_mult": (depth_mult, 1.0), "fix_stem_head": (fix_stem_head, False),
                   "tf_padding": (tf_padding, False), "bn_eps": (bn_eps, 1e-5),
                   "drop_path_rate": (drop_path_rate, 0.0)}
        self.config.update({k: v for k, (v, default) in options.items() if v != default})
        size = 32 if small_input else 224
        # How inputs are prepared; the trainer replaces it with its dataset's statistics.
        mean, std = default_normalization(in_channels)
        self.meta: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "input_size": [in_channels, size, size],
            "class_names": None,
        }

        stem_channels = 32 if fix_stem_head else make_divisible(32 * width_mult, round_nearest)
        self.stem = ConvNormAct(
            in_channels, stem_channels, 3, stride=1 if small_input else 2, act_layer=act_layer,
            tf_padding=tf_padding, bn_eps=bn_eps,
        )
        reduction = 1 if small_input else 2
        stages: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
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
                stride = s if i == 0 else 1
                drop_path = drop_path_rate * block_index / total_blocks  # deeper ones drop more
                blocks.append(InvertedResidual(channels, out_channels, stride, t, act_layer,
                                               tf_padding, bn_eps, drop_path))
                channels = out_channels
                block_index += 1
            stages.append(nn.Sequential(*blocks))
            reduction *= s
            self.feature_info.append(
                {"module": f"stages.{index}", "num_chs": channels, "reduction": reduction}
            )
        self.stages = nn.Sequential(*stages)

        self.num_features = (
            last_channel if fix_stem_head
            else make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        )
        self.head = ConvNormAct(channels, self.num_features, 1, act_layer=act_layer, bn_eps=bn_eps)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )
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
        """(N, C, H, W) image -> (N, num_features, H/32, W/32) feature map after the head conv."""
        return self.head(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits, or the pooled (N, num_features) vector with ``pre_logits``."""
        x = torch.flatten(self.pool(x), 1)
        x = self.dropout(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) image -> (N, num_classes) logits (no softmax)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.meta["class_names"] = None
        self.classifier = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )
        if num_classes > 0:
            nn.init.normal_(self.classifier.weight, 0, 0.01)
            nn.init.zeros_(self.classifier.bias)


class MobileNetV2Features(nn.Module):
    """Multi-scale feature maps for detection and segmentation heads.

    Runs the stem and the stages of a :class:`MobileNetV2` up to the last one asked for and
    returns the output of each stage in ``out_indices`` (indices into ``feature_info``, one per
    row of the table). The head and classifier are dropped. Module names are kept, so the
    classification model's weights load into it.
    """

    def __init__(self, model: MobileNetV2, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        info = model.feature_info
        if out_indices is None:
            out_indices = default_out_indices(info)
        out_indices = [int(i) for i in out_indices]
        if not out_indices or any(not -len(info) <= i < len(info) for i in out_indices):
            raise ValueError(
                f"out_indices must be a non-empty list of stage indices in [0, {len(info) - 1}], "
                f"got {out_indices}"
            )
        self.out_indices = sorted({i % len(info) for i in out_indices})
        self.stem = model.stem
        self.stages = nn.Sequential(*list(model.stages)[: self.out_indices[-1] + 1])
        self.feature_info = [dict(info[i], index=i) for i in self.out_indices]
        self.config = dict(model.config, features_only=True, out_indices=self.out_indices)
        self.meta = model.meta

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                features.append(x)
        return features


def default_out_indices(feature_info: Sequence[dict[str, Any]]) -> list[int]:
    """The last stage at each reduction: strides 2, 4, 8, 16, 32 for the standard model."""
    return [
        i
        for i, info in enumerate(feature_info)
        if i + 1 == len(feature_info) or feature_info[i + 1]["reduction"] != info["reduction"]
    ]


def _check_arguments(
    num_classes: int,
    width_mult: float,
    in_channels: int,
    dropout: float,
    round_nearest: int,
    setting: tuple[tuple[int, ...], ...],
) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 for no classifier), got {num_classes}")
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
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
