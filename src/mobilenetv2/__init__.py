"""mobilenetv2: MobileNetV2 for PyTorch, faithful to the paper and checked against its peers.

    >>> import mobilenetv2
    >>> model = mobilenetv2.create_model("mobilenet_v2_100", num_classes=10)
    >>> mobilenetv2.save_weights(model, "model.safetensors")
    >>> same = mobilenetv2.load_model("model.safetensors")
    >>> result = mobilenetv2.fit(epochs=5, out="runs/digits")  # ``mobilenetv2 train`` from Python
    >>> mobilenetv2.evaluate(result.weights)["top1"]           # ``mobilenetv2 eval``
    >>> mobilenetv2.predict(result.weights, "photos/")         # ``mobilenetv2 predict``

The public names are imported on first use (PEP 562), so ``import mobilenetv2.runtime`` (the
ONNX Runtime predictor for devices without torch) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ConvNormAct": "layers",
    "make_divisible": "layers",
    "predict": "prediction",
    "InvertedResidual": "model",
    "FeatureInfo": "model",
    "MobileNetV2": "model",
    "MobileNetV2Features": "model",
    "SeedMobileNetV2": "seed",
    "eval_transform": "data",
    "evaluate": "evaluation",
    "create_model": "registry",
    "list_models": "registry",
    "WeightsError": "weights",
    "load_model": "weights",
    "load_weights": "weights",
    "peer_state_dict": "weights",
    "read_weights": "weights",
    "save_weights": "weights",
    "save_keras_weights": "keras_weights",
    "TrainConfig": "config",
    "TrainResult": "train",
    "fit": "train",
}

__all__ = [
    "ConvNormAct",
    "FeatureInfo",
    "InvertedResidual",
    "MobileNetV2",
    "MobileNetV2Features",
    "SeedMobileNetV2",
    "TrainConfig",
    "TrainResult",
    "WeightsError",
    "create_model",
    "eval_transform",
    "evaluate",
    "fit",
    "list_models",
    "load_model",
    "load_weights",
    "make_divisible",
    "peer_state_dict",
    "predict",
    "read_weights",
    "save_keras_weights",
    "save_weights",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the importing
    from .config import TrainConfig
    from .data import eval_transform
    from .evaluation import evaluate
    from .keras_weights import save_keras_weights
    from .layers import ConvNormAct, make_divisible
    from .model import (
        FeatureInfo,
        InvertedResidual,
        MobileNetV2,
        MobileNetV2Features,
    )
    from .prediction import predict
    from .registry import create_model, list_models
    from .seed import SeedMobileNetV2
    from .train import TrainResult, fit
    from .weights import (
        WeightsError,
        load_model,
        load_weights,
        peer_state_dict,
        read_weights,
        save_weights,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mobilenetv2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
