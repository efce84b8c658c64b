"""mobilenetv2: MobileNetV2 for PyTorch, faithful to the paper and checked against its peers.

    >>> import mobilenetv2
    >>> model = mobilenetv2.create_model("mobilenet_v2_100", num_classes=10)
    >>> mobilenetv2.save_weights(model, "model.safetensors")
    >>> same = mobilenetv2.load_model("model.safetensors")
"""

from .layers import ConvNormAct, make_divisible
from .model import InvertedResidual, MobileNetV2, MobileNetV2Features
from .registry import create_model, list_models
from .seed import SeedMobileNetV2
from .weights import (
    WeightsError,
    load_model,
    load_weights,
    peer_state_dict,
    read_weights,
    save_weights,
)

__version__ = "0.1.0"

__all__ = [
    "ConvNormAct",
    "InvertedResidual",
    "MobileNetV2",
    "MobileNetV2Features",
    "SeedMobileNetV2",
    "WeightsError",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "make_divisible",
    "peer_state_dict",
    "read_weights",
    "save_weights",
]
