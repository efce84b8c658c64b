"""Keras' MobileNetV2 weights (HDF5): read into our model, and written back for Keras.

Keras ships the paper's ImageNet weights, ported from TF-Slim, as ``.h5`` files for the widths
0.35 to 1.4 (``keras.applications.MobileNetV2``). Their layers are ours one for one; three
TensorFlow conventions differ from PyTorch's, and a model built for these weights takes them all:

* TensorFlow's ``SAME`` padding puts a stride-2 3x3 window's extra row and column after an even
  side (pad 0 before, 1 after), where PyTorch's ``padding=1`` pads both sides: ``tf_padding=True``.
* BatchNorm's epsilon is 1e-3, not 1e-5: ``bn_eps=1e-3``.
* Inputs are scaled to [-1, 1] (``preprocess_input``): mean 0.5 and std 0.5 in the metadata.

Kernels are stored channels-last: Conv2D ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``,
DepthwiseConv2D ``(kh, kw, channels, 1)`` -> ``(channels, 1, kh, kw)``, Dense ``(in, out)`` ->
``(out, in)``. Files are read with h5py, which holds arrays only: nothing is unpickled.

Two file layouts exist. Keras 2's HDF5 (the official files, ``save_weights("x.h5")``,
``save("x.h5")``) names a group after each layer (``block_3_depthwise``); Keras 3's
``.weights.h5`` (also inside ``.keras`` archives) names layers by class and position
(``depthwise_conv2d_3``), so those are matched by their order in the network.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import INVERTED_RESIDUAL_SETTING, MobileNetV2

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # the weights inside a Keras 3 ``.keras`` zip
# What a model needs to compute what Keras computes with these weights.
KERAS_CONFIG = {"tf_padding": True, "bn_eps": 1e-3}
KERAS_META = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875, "interpolation": "bilinear"}
KERAS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}.h5")
KERAS_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
# Keras publishes weights trained at each of these input sizes (TF-Slim's checkpoints); the
# weight tag names the size: "keras" (224) or "keras-160".
KERAS_TAGS = {"keras": 224, "keras-96": 96, "keras-128": 128, "keras-160": 160, "keras-192": 192}

# Keras 3 names a layer by its class in snake case: which of ours each class holds.
_KERAS3_CLASSES = {"conv": "conv2d", "depthwise": "depthwise_conv2d", "bn": "batch_normalization",
                   "dense": "dense"}
_BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
_BN_OURS = ("weight", "bias", "running_mean", "running_var")
# Far above MobileNetV2's largest tensor (1.4's classifier: 1.8 M); a forged HDF5 dataset can
# declare any size and have libhdf5 fill it in, so sizes are checked before reading.
_MAX_ELEMENTS = 50_000_000
_MAX_ARCHIVE_WEIGHTS = 256 << 20  # bytes of a .keras archive's model.weights.h5, unpacked


class _Nested(Exception):
    """A Keras file whose model holds another model (named by the message)."""


def _layers(top: bool) -> Iterator[tuple[str, str, str]]:
    """Keras' layers with weights, in network order: (Keras name, kind, our module). Keras
    numbers the blocks 1..16 across rows after the first, ``expanded_conv``."""
    yield "Conv1", "conv", "stem.conv"
    yield "bn_Conv1", "bn", "stem.bn"
    block = 0
    for stage, (t, _, n, _) in enumerate(INVERTED_RESIDUAL_SETTING):
        for index in range(n):
            prefix, ours = ("expanded_conv_" if block == 0 else f"block_{block}_",
                            f"stages.{stage}.{index}")
            if t != 1:
                yield f"{prefix}expand", "conv", f"{ours}.expand.conv"
                yield f"{prefix}expand_BN", "bn", f"{ours}.expand.bn"
            yield f"{prefix}depthwise", "depthwise", f"{ours}.depthwise.conv"
            yield f"{prefix}depthwise_BN", "bn", f"{ours}.depthwise.bn"
            yield f"{prefix}project", "conv", f"{ours}.project.conv"
            yield f"{prefix}project_BN", "bn", f"{ours}.project.bn"
            block += 1
    yield "Conv_1", "conv", "head.conv"
    yield "Conv_1_bn", "bn", "head.bn"
    if top:
        yield "predictions", "dense", "classifier"



# --------------------------------------------------------------------------------------------
# Reading


def is_keras_archive(path: Path) -> bool:
    """A ``.keras`` zip (Keras 3's saved model), as opposed to a ``torch.save`` zip; a damaged
    zip is one when so named (read_keras then says it is damaged)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return KERAS_ARCHIVE_WEIGHTS in archive.namelist()
    except Exception:  # a damaged zip raises half a dozen types (found by fuzzing)
        return path.suffix == ".keras"


def read_keras(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A Keras MobileNetV2 file as our state_dict, the configuration it needs, and its meta.

    Raises:
        ValueError: when the file is not a Keras MobileNetV2 (the message says what is missing),
            or h5py is not installed.
    """
    try:
        import h5py
    except ImportError:
        raise ValueError(f"{path} is a Keras HDF5 file; reading it needs h5py: "
                         "pip install h5py") from None
    model_config: Any = None  # a saved model's (not weights') architecture, as JSON
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                # Read whole into memory (h5py seeks): a zip bomb of 1 MB that unpacked to
                # 1 GiB took 2.8 GB and 19 s. Keras' largest MobileNetV2 (1.4) is 25 MB, about
                # 75 MB with Adam's state saved beside it.
                if archive.getinfo(KERAS_ARCHIVE_WEIGHTS).file_size > _MAX_ARCHIVE_WEIGHTS:
                    raise ValueError("its weights unpack to more than "
                                     f"{_MAX_ARCHIVE_WEIGHTS >> 20} MiB")
                data = archive.read(KERAS_ARCHIVE_WEIGHTS)
                if "config.json" in archive.namelist() and (
                        archive.getinfo("config.json").file_size < 1 << 24):
                    model_config = archive.read("config.json")
            source: Any = io.BytesIO(data)
        elif path.suffix == ".keras":
            raise ValueError("it is not a readable zip archive (cut short?)")
        else:
            source = path
        with h5py.File(source, "r") as f:
            arrays = _keras3_arrays(f) if "layers" in f else _keras2_arrays(f)
            model_config = f.attrs.get("model_config", model_config)  # model.save("x.h5")
    except _Nested as e:
        raise ValueError(
            f"{path} holds a model inside its model ({e}), as Keras' transfer-learning recipe "
            "builds them: only keras.applications.MobileNetV2's own weights are read; save "
            "those (base_model.save_weights('base.weights.h5'), or a MobileNetV2(classes=K) "
            "with your classifier as its predictions layer)") from None
    except Exception as e:  # libhdf5 reports damage as OSError, RuntimeError, KeyError ... (fuzzed)
        raise ValueError(f"{path} is a damaged Keras weights file: {e}"[:500]) from None
    state = _to_state_dict(arrays, str(path))
    stem, head = state["stem.conv.weight"], state["head.conv.weight"]
    from .weights import _infer_width_and_depth, imagenet_categories

    config: dict[str, Any] = {
        "arch": "mobilenet_v2",
        "num_classes": int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0,
        "in_channels": int(stem.shape[1]),
        **_infer_width_and_depth(int(stem.shape[0]), int(head.shape[1]), int(head.shape[0]), None),
        **KERAS_CONFIG,
    }
    # A saved model's input layer gives its input size; Keras' file names carry the
    # resolution the weights were trained at: ..._1.0_160.h5
    match = re.search(r"_(\d{2,4})(?:_no_top)?\.h5$", path.name)
    side = _input_side(model_config) or (
        int(match.group(1)) if match and 32 <= int(match.group(1)) <= 1024 else 224)
    meta = dict(KERAS_META, input_size=[config["in_channels"], side, side])
    if config["in_channels"] != 3:
        meta["mean"], meta["std"] = [0.5] * config["in_channels"], [0.5] * config["in_channels"]
    if config["num_classes"] == 1000:  # Keras' ImageNet classes, in torchvision's order
        meta["class_names"] = imagenet_categories()
    return state, config, meta


def _input_side(model_config: Any) -> int | None:
    """The side of a saved Keras model's square input (``input_shape=(160, 160, 3)``), from
    the JSON of its architecture; None when it has none, or takes any size."""
    try:
        layers = json.loads(model_config)["config"]["layers"]
        inputs = [layer["config"] for layer in layers if layer["class_name"] == "InputLayer"]
        shape = inputs[0].get("batch_shape") or inputs[0]["batch_input_shape"]  # Keras 3, 2
        height, width = shape[1:3]
    except Exception:  # no saved model, or not one we know: the file name or 224 then
        return None
    if type(height) is int and height == width and 32 <= height <= 1024:
        return height
    return None


def _keras2_arrays(f: Any) -> dict[str, list[np.ndarray]]:
    """Keras 2's layout: one group per layer name, weights listed in its ``weight_names``."""
    if "model_weights" in f:  # a whole model saved with model.save("x.h5")
        f = f["model_weights"]
    arrays = {}
    for name in f:
        group = f[name]
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in group.attrs.get("weight_names", [])]
        if len(names) > len(_BN_WEIGHTS):  # no layer has more: a model inside the model
            raise _Nested(name)
        if names:
            arrays[name] = [_array(group[n]) for n in names]
    return arrays


def _array(dataset: Any) -> np.ndarray:
    if not hasattr(dataset, "shape") or dataset.size > _MAX_ELEMENTS:
        raise ValueError(f"{dataset.name} is not a weight array of a MobileNetV2")
    return np.asarray(dataset)


def _keras3_arrays(f: Any) -> dict[str, list[np.ndarray]]:
    """Keras 3's layout: ``layers/<class>_<k>/vars/<i>``; the k-th layer of a class in network
    order, so each class's layers are paired with Keras' names by position."""
    by_class: dict[str, list[tuple[int, str, list[np.ndarray]]]] = {}
    for name, group in f["layers"].items():
        if "layers" in group:  # a model inside the model (Keras' transfer-learning recipe)
            raise _Nested(name)
        match = re.fullmatch(r"([a-z0-9_]+?)(?:_(\d+))?", name)
        if match is None or "vars" not in group or not len(group["vars"]):
            continue
        variables = group["vars"]
        values = [_array(variables[str(i)]) for i in range(len(variables))]
        by_class.setdefault(match.group(1), []).append((int(match.group(2) or 0), name, values))
    queues = {cls: [(n, v) for _, n, v in sorted(layers, key=lambda item: item[0])]
              for cls, layers in by_class.items()}
    top = bool(queues.get("dense"))
    arrays = {}
    for keras_name, kind, _ in _layers(top):
        queue = queues.get(_KERAS3_CLASSES[kind], [])
        if not queue:
            return arrays  # reported as missing
        arrays[keras_name] = queue.pop(0)[1]
    for queue in queues.values():  # layers MobileNetV2 does not have: reported as foreign
        arrays.update(queue)
    return arrays


def _to_state_dict(arrays: dict[str, list[np.ndarray]], name: str) -> dict[str, torch.Tensor]:
    top = "predictions" in arrays or "Logits" in arrays
    if "Logits" in arrays:  # Keras before 2.2 named the classifier "Logits"
        arrays["predictions"] = arrays.pop("Logits")
    layers = list(_layers(top))
    missing = [keras_name for keras_name, _, _ in layers if keras_name not in arrays]
    if missing:
        raise ValueError(
            f"{name} is not a Keras MobileNetV2 weights file: it has no layer "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            "(expected the layers of keras.applications.MobileNetV2)"
        )
    known = {keras_name for keras_name, _, _ in layers}
    foreign = [keras_name for keras_name in arrays if keras_name not in known]
    if foreign:  # a model built on MobileNetV2: its other layers would be dropped unseen
        raise ValueError(
            f"{name} holds layers with weights that keras.applications.MobileNetV2 does not "
            f"have ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): only "
            "MobileNetV2's own weights are read; save those (include_top=False, or classes=K "
            "with your classifier as its predictions layer)"
        )
    state: dict[str, torch.Tensor] = {}
    for keras_name, kind, ours in layers:
        values = arrays[keras_name]
        expected = {"conv": 1, "depthwise": 1, "bn": 4, "dense": 2}[kind]
        if len(values) != expected or (kind != "bn" and values[0].ndim != (2 if kind == "dense" else 4)):
            raise ValueError(f"{name}: Keras layer {keras_name} holds {len(values)} arrays of "
                             f"unexpected shapes; expected a {kind} layer of MobileNetV2")
        try:
            tensors = [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: Keras layer {keras_name} holds arrays that are not float "
                             "weights") from None
        if kind == "conv":
            state[f"{ours}.weight"] = tensors[0].permute(3, 2, 0, 1).contiguous()
        elif kind == "depthwise":
            state[f"{ours}.weight"] = tensors[0].permute(2, 3, 0, 1).contiguous()
        elif kind == "dense":
            state[f"{ours}.weight"], state[f"{ours}.bias"] = tensors[0].T.contiguous(), tensors[1]
        else:
            for suffix, tensor in zip(_BN_OURS, tensors, strict=True):
                state[f"{ours}.{suffix}"] = tensor
    return state


# --------------------------------------------------------------------------------------------
# Writing


def save_keras_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s weights as a Keras HDF5 file that ``keras.applications.MobileNetV2``
    of the same width loads with ``load_weights(path)`` (Keras 2 and 3), atomically.

    Only a model built as Keras builds it computes the same function there: the paper's table,
    ``tf_padding=True`` and ``bn_eps=1e-3`` (what ``load_model`` gives for a Keras file).

    Raises:
        ValueError: for a model Keras' MobileNetV2 cannot represent, or without h5py.
    """
    from .weights import _unwrap_module, atomic_write

    model = _unwrap_module(model)
    if not isinstance(model, MobileNetV2) or model.config.get("features_only"):
        raise ValueError("save_keras_weights needs a MobileNetV2 classifier or backbone without "
                         "features_only or pruned rows (the seed variant has no Keras counterpart)")
    from .weights import _CONVENTIONS

    config = model.config
    differs = [f"{k}={v!r}" for k, v in KERAS_CONFIG.items() if config.get(k) != v]
    differs += [f"{k}=False" for k in ("small_input", "fix_stem_head") if config.get(k)]
    # The other options that change the function but no tensor (act_layer, the ablations).
    differs += [f"{k}={default!r}" for k, default in _CONVENTIONS.items()
                if k not in KERAS_CONFIG and config.get(k, default) != default]
    if config.get("depth_mult", 1.0) != 1.0 or "inverted_residual_setting" in config:
        differs.append("the paper's depths")
    if model.num_classes > 0 and config.get("global_pool", "avg") != "avg":
        differs.append("global_pool='avg' (Keras' classifier follows average pooling)")
    if differs:
        raise ValueError(
            "Keras' MobileNetV2 computes a different function than this model: build it with "
            f"{', '.join(differs)} (load_model gives that for Keras' own files), then fine-tune"
        )
    name = Path(path).name
    if not name.endswith((".h5", ".hdf5")) or name.endswith(".weights.h5"):
        # Keras picks its reader by the name: .weights.h5 and .keras are Keras 3's own layout.
        raise ValueError(f"save_keras_weights writes Keras' HDF5 layout, which Keras' "
                         f"load_weights reads from a name ending .h5 (but not .weights.h5, "
                         f"its other layout) or .hdf5: name it, e.g., "
                         f"{name.split('.')[0] or 'model'}.h5, not {name}")
    try:
        import h5py
    except ImportError:
        raise ValueError("writing Keras weights needs h5py: pip install h5py") from None
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    top = model.num_classes > 0

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            layer_names = []
            for keras_name, kind, ours in _layers(top):
                layer_names.append(keras_name)
                weight = state[f"{ours}.weight"]
                if kind == "conv":
                    arrays = {"kernel": weight.permute(2, 3, 1, 0)}
                elif kind == "depthwise":
                    arrays = {"depthwise_kernel": weight.permute(2, 3, 0, 1)}
                elif kind == "dense":
                    arrays = {"kernel": weight.T, "bias": state[f"{ours}.bias"]}
                else:
                    arrays = {k: state[f"{ours}.{o}"] for k, o in zip(_BN_WEIGHTS, _BN_OURS, strict=True)}
                group = f.create_group(keras_name)
                names = [f"{keras_name}/{k}:0" for k in arrays]
                group.attrs["weight_names"] = np.array(names, dtype="S")
                for full, tensor in zip(names, arrays.values(), strict=True):
                    group.create_dataset(full, data=tensor.contiguous().numpy())
            f.attrs["layer_names"] = np.array(layer_names, dtype="S")
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = b"2.15.0"

    atomic_write(path, write)
