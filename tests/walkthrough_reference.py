"""A test-only copy of the walk-through's MobileNetV2, written from its description.

It is deliberately independent of ``mobilenetv2.seed``: the parity tests in test_seed.py save
this model's state_dict and check that the package's ``seed`` variant loads it and computes the
same thing. Module names and order are the walk-through's, so the state_dict keys are too.

The walk-through departs from the paper (plain ReLU, an expansion conv even where t = 1, a
projection shortcut wherever the shape changes, a ReLU after the addition, a flatten + Linear
instead of global pooling, and a softmax inside the model); this copy keeps every departure.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, stride s of the first block), one row per layer.
WALKTHROUGH_TABLE = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class WalkthroughBlock(nn.Module):
    """``ReLU(block(x) + shortcut(x))`` with a 1x1 projection shortcut where shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.block(x) + self.shortcut(x))


class WalkthroughMobileNetV2(nn.Module):
    """The walk-through's network: (N, C, W, W) images -> (N, num_classes) probabilities."""

    def __init__(self, input_width: int = 224, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.preliminary = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        channels = 32
        for row, (t, c, n, s) in enumerate(WALKTHROUGH_TABLE, start=1):
            blocks = []
            for i in range(n):
                blocks.append(WalkthroughBlock(channels, c, s if i == 0 else 1, t))
                channels = c
            setattr(self, f"layer{row}", nn.Sequential(*blocks))
        self.final = nn.Sequential(
            nn.Conv2d(320, 1280, 1, bias=False),
            nn.Flatten(),
            nn.Linear(1280 * (input_width // 32) ** 2, num_classes),
            nn.Softmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preliminary(x)
        for row in range(1, len(WALKTHROUGH_TABLE) + 1):
            x = getattr(self, f"layer{row}")(x)
        return self.final(x)
