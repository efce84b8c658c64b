"""The walk-through's MobileNetV2 variant, kept bit-compatible with its checkpoints.

The project began as an annotated walk-through implementation that departs from the paper
(docs/seed.md lists each departure and why the faithful model in model.py is our default):

* plain ReLU everywhere instead of ReLU6;
* the 1x1 expansion is present even in the first row, where the paper's t = 1 leaves it out;
* a projection shortcut (1x1 conv + BN) wherever the stride or the width changes, where the
  paper has no shortcut at all, and a ReLU *after* the addition, so no block is linear;
* no BN or activation after the 1280-channel conv, and no global pooling: the final map is
  flattened into a Linear of 1280 * (input_width // 32)**2 inputs (62.7 M of the 65.0 M
  parameters at 224x224), which ties the model to one input size;
* a softmax inside the model;
* no dropout before the classifier, and PyTorch's default initialisation.

Module names and order reproduce the walk-through exactly (``preliminary``, ``layer1`` ...
``layer7``, ``final``), so its state_dicts load with ``strict=True`` and give the same outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import INVERTED_RESIDUAL_SETTING, class_count, default_normalization


def check_input_size(x: torch.Tensor, input_width: int) -> None:
    """Refuse inputs of another size with a clear message, not a shape error in ``final``."""
    if x.shape[-1] != input_width or x.shape[-2] != input_width:
        raise ValueError(
            f"the seed variant was built for {input_width}x{input_width} inputs, got "
            f"{x.shape[-2]}x{x.shape[-1]}: resize the images or build it with "
            f"input_width={x.shape[-1]}"
        )


# FX records the check as one call instead of tracing into its shape comparison.
torch.fx.wrap("check_input_size")


class SeedBlock(nn.Module):
    """The walk-through's block: ``ReLU(block(x) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expand_ratio
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(
                hidden_channels,
                hidden_channels,
                3,
                stride=stride,
                padding=1,
                groups=hidden_channels,
                bias=False,
            ),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Sequential()  # identity, and no keys in the state_dict
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.block(x) + self.shortcut(x))


class SeedMobileNetV2(nn.Module):
    """The walk-through's network for square ``input_width`` x ``input_width`` images.

    Args:
        input_width: the one input size the model takes; a multiple of 32, since the final
            Linear layer sees the whole (input_width / 32)**2 map.
        num_classes: classifier outputs.
        in_channels: image channels.
        return_probs: return softmax probabilities, as the walk-through did, instead of logits.
            The softmax stays at ``final.3`` either way, so checkpoints are unaffected.

    Raises:
        ValueError: for an ``input_width`` that is not a positive multiple of 32, or other
            arguments that cannot make a network.
    """

    def __init__(
        self,
        input_width: int = 224,
        num_classes: int = 1000,
        in_channels: int = 3,
        return_probs: bool = False,
    ) -> None:
        super().__init__()
        if input_width < 32 or input_width % 32:
            raise ValueError(
                f"the seed variant needs an input_width that is a multiple of 32 (e.g. 224), "
                f"got {input_width}: its final Linear layer sees the whole input_width/32 map"
            )
        num_classes = class_count(num_classes, minimum=1)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.input_width = input_width
        self.num_classes = num_classes
        self.return_probs = return_probs
        # Typed as locals: torch.jit.script warns of annotated ``self.x: dict[...]`` here.
        config: dict[str, Any] = {
            "arch": "seed",
            "input_width": input_width,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "return_probs": return_probs,
        }
        self.config = config
        mean, std = default_normalization(in_channels)
        meta: dict[str, Any] = {
            "mean": mean,
            "std": std,
            "input_size": [in_channels, input_width, input_width],
            "class_names": None,
        }
        self.meta = meta

        self.preliminary = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
        )
        channels = 32
        for index, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING, start=1):
            blocks = []
            for i in range(n):
                blocks.append(SeedBlock(channels, c, s if i == 0 else 1, t))
                channels = c
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        side = input_width // 32
        self.num_features = 1280
        self.final = nn.Sequential(
            nn.Conv2d(channels, 1280, 1, bias=False),
            nn.Flatten(),
            nn.Linear(1280 * side * side, num_classes),
            nn.Softmax(dim=1),
        )

    def get_classifier(self) -> nn.Module:
        """The final Linear layer (timm's accessor; ``final[2]`` in the walk-through's names)."""
        return self.final[2]

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh final Linear layer with ``num_classes`` outputs, on the model's device and
        in its dtype."""
        num_classes = class_count(num_classes, minimum=1)  # before anything changes
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.meta["class_names"] = None
        old = self.final[2]
        self.final[2] = nn.Linear(old.in_features, num_classes, device=old.weight.device,
                                  dtype=old.weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, W, W) image -> (N, 1280, W/32, W/32) map after the 1280-channel conv."""
        check_input_size(x, self.input_width)
        x = self.preliminary(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        x = self.layer6(x)
        x = self.layer7(x)
        return self.final[0](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (probabilities with ``return_probs``), or with ``pre_logits``
        the flattened (N, 1280 * (W/32)^2) vector the Linear layer takes: this variant has no
        global pooling."""
        x = self.final[1](x)
        if pre_logits:
            return x
        x = self.final[2](x)
        if self.return_probs:
            x = self.final[3](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, W, W) image -> (N, num_classes) logits (probabilities with return_probs)."""
        return self.forward_head(self.forward_features(x))
