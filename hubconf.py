"""torch.hub entry points, one per registered model, as torchvision and timm offer them.

    model = torch.hub.load("path/to/mobilenetv2", "mobilenet_v2_100", source="local",
                           weights="imagenet")
    model = torch.hub.load("<owner>/mobilenetv2", "mobilenet_v2_100")   # from GitHub
    torch.hub.list("<owner>/mobilenetv2")

Each entry point is :func:`mobilenetv2.create_model` for that name, with its keyword arguments
(``weights``, ``progress``, ``num_classes``, ``features_only`` ...). ``mobilenet_v2`` is
torchvision's entry point's name, for ``mobilenet_v2_100``: code that calls
``torch.hub.load("pytorch/vision", "mobilenet_v2", weights="IMAGENET1K_V2", progress=False)``
needs only the repository changed (torchvision's weight names are taken as our tags).
"""

import os
import sys

dependencies = ["torch", "torchvision", "safetensors"]

# torch.hub imports this file from the repository's root; the package lives in src/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from mobilenetv2.registry import create_model as _create_model  # noqa: E402
from mobilenetv2.registry import list_models as _list_models  # noqa: E402

# torchvision's hub name, and the model it builds.
_TORCHVISION_NAMES = {"mobilenet_v2": "mobilenet_v2_100"}


def _entry_point(name: str, builds: str):
    def build(**kwargs):
        return _create_model(builds, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"``mobilenetv2.create_model({builds!r}, **kwargs)``: see its docstring for "
                     "weights=, progress=, num_classes=, features_only= and the constructor "
                     "arguments.")
    return build


for _name in _list_models():
    globals()[_name] = _entry_point(_name, _name)
for _name, _builds in _TORCHVISION_NAMES.items():
    globals()[_name] = _entry_point(_name, _builds)
