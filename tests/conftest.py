"""Shared helpers: a seeded generator, BatchNorm randomisation and model-name bookkeeping."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from mobilenetv2 import MobileNetV2, SeedMobileNetV2, create_model, list_models

# Two shared cores: a second intra-op thread mostly spins waiting for the first, and makes the
# small convolutions here several times slower.
torch.set_num_threads(1)

# The seed variant needs its input size at construction and takes only multiples of 32;
# every other registered name is a faithful MobileNetV2.
SEED = "seed"
FAITHFUL_MODELS = [name for name in list_models() if name != SEED]
# timm's names for the variants it has (no 1.3; two deeper ones, 110d and 120d).
TIMM_NAMES = {
    "mobilenet_v2_035": "mobilenetv2_035",
    "mobilenet_v2_050": "mobilenetv2_050",
    "mobilenet_v2_075": "mobilenetv2_075",
    "mobilenet_v2_100": "mobilenetv2_100",
    "mobilenet_v2_110d": "mobilenetv2_110d",
    "mobilenet_v2_120d": "mobilenetv2_120d",
    "mobilenet_v2_140": "mobilenetv2_140",
}


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def windows_text_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files opened in text mode translate "\\n" to "\\r\\n" when written, as on Windows.

    The pure-Python io module reads os.linesep when a file is opened (C io fixes it when
    CPython is built); open(), Path.write_text and Path.open all go through io.open.
    """
    import _pyio
    import builtins
    import io
    import os

    monkeypatch.setattr(os, "linesep", "\r\n")
    monkeypatch.setattr(io, "open", _pyio.open)
    monkeypatch.setattr(builtins, "open", _pyio.open)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, in place.

    Freshly built BatchNorms are the identity in eval mode (mean 0, var 1, weight 1, bias 0),
    which would hide a swapped running_mean/running_var or a BN loaded into the wrong layer.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model


def model_kwargs(name: str, resolution: int = 64) -> dict[str, Any]:
    """Constructor arguments a name needs to take ``resolution`` x ``resolution`` inputs."""
    return {"input_width": resolution} if name == SEED else {}


def build(name: str, resolution: int = 64, **kwargs: Any) -> nn.Module:
    return create_model(name, **model_kwargs(name, resolution), **kwargs)


def feature_side(model: nn.Module, resolution: int) -> int:
    """Side of the last feature map: every stride-2 3x3 conv (padding 1) maps n to ceil(n/2)."""
    if isinstance(model, SeedMobileNetV2):
        return resolution // 32
    return math.ceil(resolution / 32)


def assert_same_outputs(expected: Any, actual: Any, atol: float = 1e-5) -> None:
    """Outputs agree to ``atol`` and are large enough for that tolerance to mean something."""
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    actual = list(actual) if isinstance(actual, (list, tuple)) else [actual]
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert want.abs().max() > 100 * atol, "outputs too small to compare at this tolerance"
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit_digits_model(resolution: int = 8, epochs: int = 10) -> torch.nn.Module:
    """A small MobileNetV2 (3 rows of the table, width 0.5) trained on the 8x8 digits: ~92%.

    int8/fp32 agreement only means something on a trained network: a random one has logit
    margins far below one quantization step. Three rows at 8x8 train in a few seconds.
    """
    from mobilenetv2.data import build_datasets

    torch.manual_seed(0)
    data = build_datasets("digits", resolution=resolution)
    model = MobileNetV2(num_classes=10, in_channels=1, small_input=True, width_mult=0.5,
                        dropout=0.0, last_channel=128,
                        inverted_residual_setting=[(1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 1, 2)])
    model.config["name"] = "mobilenet_v2_tiny"
    model.meta.update(data.model_meta())
    images, labels = data.train.normalize(data.train.images), data.train.labels
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=1e-4)
    steps = epochs * (len(labels) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels) - 127, 128):
            batch = order[start:start + 128]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


# What ONNX Runtime 1.16 (ONNX 1.14.1; the aarch64 wheels and distribution packages boards
# still run) loads: IR 9 at most, and no import of a domain of ONNX's above the opset ONNX 1.14
# released for it (onnx/defs/schema.h's last_release_version_map), whether a node uses it or
# not: "Opset 5 is under development ...", raised by ONNX Runtime's ValidateOpsetForDomain.
ONNX_RUNTIME_1_16 = {"ir_version": 9, "": 19, "ai.onnx": 19, "ai.onnx.ml": 3,
                     "ai.onnx.training": 1, "ai.onnx.preview.training": 1}


def refused_by_onnx_runtime_1_16(proto: Any) -> list[str]:
    """Why ONNX Runtime 1.16 would refuse to load an ONNX model (empty: it loads it)."""
    limits = ONNX_RUNTIME_1_16
    why = [f"IR version {proto.ir_version}"] if proto.ir_version > limits["ir_version"] else []
    return why + [f"{opset.domain or 'ai.onnx'} opset {opset.version}"
                  for opset in proto.opset_import
                  if opset.version > limits.get(opset.domain, opset.version)]
