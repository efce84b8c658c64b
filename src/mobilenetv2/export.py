"""Deployment artefacts: ONNX, torch.export (.pt2), TorchScript and ExecuTorch (.pte), each
checked against eager.

Every export goes the same way:

1. fold each BatchNorm into the convolution before it, in PyTorch, on a copy of the model
   (inference then runs one Conv per ConvNormAct, and no runtime has to find the pattern), and
   freeze TensorFlow-style padding (``tf_padding`` models) to constants for the input size;
2. trace or export the folded copy with a dynamic batch dimension (or a fixed one), and a
   dynamic image size when asked (``dynamic_size``, for detection and segmentation);
3. write the artefact to a temporary file next to the target;
4. load that file back (ONNX through ONNX Runtime, .pte through ExecuTorch) and compare its
   logits with the *unfolded* eager model on random inputs and on real images (scikit-learn's
   bundled digits, resized to the model's input size and normalised), failing when they differ
   by more than ``atol``;
5. only then rename it over the target, so a failed export never leaves a file behind.

The ONNX file is self-contained (no external data), has one input ``input`` (N, C, H, W) float32
-- or, exported with ``pixel_input``, (N, H, W, C) uint8 pixels, scaled and normalised inside
the model (:class:`PixelInput`) -- and one output ``logits`` (N, num_classes) -- for a ``features_only`` backbone, one output per feature
map, ``features_0`` (the finest) ... ``features_<n-1>`` -- no BatchNormalization node, and carries
the preprocessing in its ``metadata_props`` as JSON strings (see :func:`deployment_metadata`),
which :mod:`mobilenetv2.runtime` reads.

ONNX exporter: torch 2.14 has two. Both give the same graph after our explicit folding (the
TorchScript-based one writes GlobalAveragePool + Flatten, the dynamo one ReduceMean + Reshape)
and the same ONNX Runtime speed, and both pass the parity checks for every variant. The
TorchScript-based exporter is the default because it exports 3-4x faster here (about 4 s
against 13-17 s for a dynamic-batch MobileNetV2 on two cores); ``onnx_exporter="dynamo"``
selects the torch.export-based one, which is also used when the TorchScript-based one is gone.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d

from .layers import PadSame
from .runtime import DEFAULT_META, channel_stats, resize_policy
from .weights import PathLike, atomic_write, check_output_file

log = logging.getLogger(__name__)

FORMATS = ("onnx", "exported", "torchscript", "executorch")
ONNX_EXPORTERS = ("torchscript", "dynamo")
SUFFIXES = {"onnx": ".onnx", "exported": ".pt2", "torchscript": ".pt", "executorch": ".pte"}
DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Name of the JSON entry that carries the metadata inside .pt2 and TorchScript archives.
EXTRA_FILE = "mobilenetv2.json"


class ExportVerificationError(ValueError):
    """An exported artefact whose outputs do not match the eager model's."""


@dataclass(frozen=True)
class ExportConfig:
    """How to export a model.

    Args:
        format: ``"onnx"``, ``"exported"`` (torch.export, .pt2), ``"torchscript"`` (.pt) or
            ``"executorch"`` (.pte, lowered to XNNPACK; see :mod:`mobilenetv2.pte`).
        resolution: square input size; default: the model's ``meta["input_size"]``.
        dynamic_batch: export with a free batch dimension; otherwise it is ``batch_size``.
            ExecuTorch programs always have a fixed batch (``batch_size``).
        batch_size: the fixed batch size when ``dynamic_batch`` is off (refused beside a
            dynamic batch, which would ignore it).
        opset: ONNX opset (>= 17).
        onnx_exporter: ``"torchscript"`` or ``"dynamo"`` (see the module docstring).
        atol: the largest allowed absolute difference between exported and eager logits.
        verify: compare the artefact with the eager model before keeping it.
        pixel_input: the artefact takes uint8 pixels, (N, H, W, C) as image decoders and
            cameras give them, resized and cropped to the model's size, and does the scaling
            to [0, 1] and the normalisation itself (:class:`PixelInput`); an app then needs
            no mean or std. Default: normalised float32 (N, C, H, W), as torchvision's models.
        dynamic_size: free height and width too (ONNX and .pt2 only), for a detection or
            segmentation backbone fed images of any size, as torchvision's detection models
            are exported; the file is also verified at a second, odd, non-square size.
            ``resolution`` is then the example size and the one the metadata's preprocessing
            resizes to.
    """

    format: str = "onnx"
    resolution: int | None = None
    dynamic_batch: bool = True
    batch_size: int = 1
    opset: int = DEFAULT_OPSET
    onnx_exporter: str = "torchscript"
    atol: float = 1e-4
    verify: bool = True
    pixel_input: bool = False
    dynamic_size: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown export format {self.format!r}; choose one of: "
                             f"{', '.join(FORMATS)}")
        if self.onnx_exporter not in ONNX_EXPORTERS:
            raise ValueError(f"unknown ONNX exporter {self.onnx_exporter!r}; choose one of: "
                             f"{', '.join(ONNX_EXPORTERS)}")
        if self.resolution is not None and self.resolution < 32:
            raise ValueError(f"resolution must be at least 32, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.batch_size != 1 and self.dynamic_batch and self.format != "executorch":
            # It would be ignored: a file meant for a fixed batch (NNAPI, Core ML) takes any.
            raise ValueError(f"batch_size={self.batch_size} fixes the batch only with "
                             "dynamic_batch=False: add it, or drop batch_size for a file that "
                             "takes any batch size")
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17, got {self.opset}")
        if not self.atol > 0:
            raise ValueError(f"atol must be > 0, got {self.atol}")
        if self.dynamic_size and self.format not in ("onnx", "exported"):
            raise ValueError(f"a dynamic image size is for ONNX and .pt2 files; a {self.format} "
                             "file keeps the size it was exported at: drop dynamic_size, or "
                             "export to .onnx or .pt2")


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely it matches the eager model."""

    path: Path
    format: str
    input_shape: tuple[int | str, ...]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Preparing the model


class PixelInput(nn.Module):
    """``model`` taking uint8 pixels, (N, H, W, C) as image decoders and cameras give them,
    and doing the preprocessing's arithmetic itself: ``(pixels / 255 - mean) / std``, as one
    multiply-add per channel in float32, and the channels moved first.

    Resizing and cropping stay outside (an app has its platform's image scaler); what moves
    inside is what apps get wrong: the 0-255 scale, the statistics and the channel order.

    Args:
        model: the model it feeds, taking normalised (N, C, H, W).
        mean, std: per input channel.
        channels_last_math: normalise in the decoders' layout, then move the channels (what
            ExecuTorch hands to XNNPACK whole, but for the uint8 -> float cast); otherwise move
            the uint8 channels first and normalise plane by plane (ONNX Runtime's fastest:
            about 1.0x the float model at 224x224 here, against 1.18x the other way round).
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float],
                 channels_last_math: bool = False) -> None:
        super().__init__()
        self.model, self.channels_last_math = model, channels_last_math
        mean_t = torch.tensor(mean, dtype=torch.float32)
        std_t = torch.tensor(std, dtype=torch.float32)
        shape = (-1,) if channels_last_math else (-1, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(shape), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(shape), persistent=False)

    @classmethod
    def wrap(cls, model: nn.Module, metadata: dict[str, Any], batch: int,
             channels_last_math: bool = False) -> tuple[PixelInput, torch.Tensor]:
        """``model`` wrapped with the statistics of its :func:`deployment_metadata`, and a
        uint8 (batch, H, W, C) example input. The wrapper has no train/eval mode to set (a
        converted PT2E module refuses the switch)."""
        channels, height, width = metadata["input_size"]
        example = torch.randint(0, 256, (batch, height, width, channels), dtype=torch.uint8)
        return cls(model, metadata["mean"], metadata["std"], channels_last_math), example

    def forward(self, pixels: torch.Tensor) -> Any:
        if not self.channels_last_math:
            return self.model(pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift)
        x = pixels.to(torch.float32) * self.scale + self.shift  # (N, H, W, C)
        if x.shape[-1] == 1:  # gray: the same memory; XNNPACK takes a reshape, not this permute
            return self.model(x.reshape(x.shape[0], 1, x.shape[1], x.shape[2]))
        return self.model(x.permute(0, 3, 1, 2).contiguous())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair folded.

    ``W' = W * gamma / sqrt(var + eps)`` and ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``
    (torch.nn.utils.fusion.fuse_conv_bn_eval); the BatchNorm becomes an Identity, which every
    exporter drops. A frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, which timm's
    ``freeze_batch_norm_2d`` puts in for small-batch training) holds the same four tensors and
    folds the same way; left unfolded, it exported as a Mul and an Add per layer. ``model``
    itself is left untouched.

    Raises:
        ValueError: when a BatchNorm is left that does not follow a convolution.
    """
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, norms):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    left = [name for name, m in folded.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))]
    if left:
        raise ValueError(f"cannot fold BatchNorm layers {left[:3]} that follow no convolution")
    return folded


def freeze_padding(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Replace each TensorFlow-style :class:`PadSame` by the constant padding it computes for
    ``example``'s size, in place.

    PadSame works the padding out from the input's shape, which a trace records as a chain of
    Shape/Gather/arithmetic nodes that ONNX Runtime cannot fold: a ``tf_padding`` model ran 1.6x
    slower than the same network without it. A ``tf_padding`` model exports only at a fixed
    image size (``dynamic_size`` is refused for it), so a constant ``ZeroPad2d`` is exact, and
    ONNX Runtime fuses it into the convolution's own (asymmetric) pads.
    """
    if not any(isinstance(m, PadSame) for m in model.modules()):
        return model  # nothing to freeze: spare the forward pass
    pads: dict[str, list[int]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: pads.__setitem__(name, m.padding_for(args[0])))
        for name, module in model.named_modules() if isinstance(module, PadSame)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    for name, padding in pads.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.ZeroPad2d(padding))
    return model


def output_names(model: nn.Module) -> list[str]:
    """``["logits"]``, or ``features_0`` ... one per feature map of a ``features_only`` model."""
    if isinstance(model, PixelInput):
        model = model.model
    if getattr(model, "config", {}).get("features_only"):
        return [f"features_{i}" for i in range(len(model.feature_info))]
    return [OUTPUT_NAME]


def input_shape(model: nn.Module, resolution: int | None) -> tuple[int, int, int]:
    """(C, H, W) the model is exported for; the seed variant takes only its ``input_width``.

    Raises:
        ValueError: for a seed model and a resolution other than its input width.
    """
    channels, height, width = (int(v) for v in model.meta["input_size"])
    if resolution is None:
        return channels, height, width
    fixed = getattr(model, "config", {}).get("arch") == "seed"
    if fixed and resolution != width:
        raise ValueError(
            f"the seed variant was built for {width}x{width} inputs and takes no other size: "
            f"pass --resolution {width}, or rebuild it with input_width={resolution}"
        )
    return channels, resolution, resolution


def deployment_metadata(model: nn.Module, shape: tuple[int, int, int],
                        pixel_input: bool = False) -> dict[str, Any]:
    """Preprocessing and provenance an artefact carries, as plain JSON-able values.

    Keys: ``input_format`` (``"normalized"``: float32 (N, C, H, W) after the preprocessing;
    ``"pixels"``: uint8 (N, H, W, C), see :class:`PixelInput`), ``mean``, ``std``,
    ``input_size`` [C, H, W], ``class_names`` (list or null),
    ``resize_mode`` ("exact": resize whole; "shorter": resize the shorter side to ``resize``,
    then center-crop), ``resize``, ``crop_pct``, ``interpolation``, ``output`` ("logits",
    "probabilities" or "features"), ``config`` and ``mobilenetv2_version``; for a
    ``features_only`` model also ``feature_info`` (``num_chs`` and ``reduction`` per output);
    for a model trained on a folder of class folders, ``val_split`` (the fraction it held out,
    which ``eval`` then evaluates by default); ``dataset``, the data the model was
    trained on, and ``training``, what trained it (versions, data fingerprints, options,
    epoch), where its weights say.
    """
    from . import __version__

    meta, config = dict(model.meta), dict(getattr(model, "config", {}))
    crop_pct = float(meta.get("crop_pct") or DEFAULT_META["crop_pct"])
    resize_mode, resize = resize_policy(shape[-1], crop_pct)
    features = bool(config.get("features_only"))
    output = "features" if features else "probabilities" if config.get("return_probs") else "logits"
    extra = {"feature_info": [{"num_chs": int(info["num_chs"]), "reduction": int(info["reduction"])}
                              for info in model.feature_info]} if features else {}
    if meta.get("val_split"):
        extra["val_split"] = float(meta["val_split"])
    if isinstance(meta.get("dataset"), str):  # what eval takes when not given --data
        extra["dataset"] = meta["dataset"]
    if isinstance(meta.get("training"), dict):  # what trained the weights: traced to their run
        extra["training"] = meta["training"]
    return {
        "input_format": "pixels" if pixel_input else "normalized",
        "mean": channel_stats(meta["mean"], shape[0]),  # one value per input channel
        "std": channel_stats(meta["std"], shape[0]),
        "input_size": list(shape),
        "class_names": meta.get("class_names"),
        "resize_mode": resize_mode,
        "resize": resize,
        "crop_pct": crop_pct,
        "interpolation": meta.get("interpolation", "bilinear"),
        "output": output,
        "config": config,
        "mobilenetv2_version": __version__,
        **extra,
    }


def real_images(count: int, shape: tuple[int, int, int], meta: dict[str, Any]) -> torch.Tensor:
    """``count`` real images, normalised as the model expects: (count, C, H, W) float32.

    The handwritten digits bundled with scikit-learn (8x8, 0..16), scaled to [0, 1], resized
    bilinearly to H x W, repeated over the C channels and normalised with ``meta``'s mean/std.
    Real images have the smooth, correlated statistics random tensors lack, and reach the
    activation ranges random inputs never do.
    """
    return _normalise(_real_pixels(count, shape), meta)


def _real_pixels(count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:count]).float().div(16.0).unsqueeze(1)
    channels, height, width = shape
    return nn.functional.interpolate(images, size=(height, width), mode="bilinear",
                                     align_corners=False).clamp(0, 1).repeat(1, channels, 1, 1)


def random_images(count: int, shape: tuple[int, int, int], meta: dict[str, Any],
                  seed: int = 0) -> torch.Tensor:
    """``count`` images of uniform random pixels in [0, 1], normalised as the model expects.

    Random *images*, not N(0, 1) tensors: the logits of a trained network on inputs far outside
    what its BatchNorm statistics describe can reach the thousands, where float32 rounding
    alone exceeds any absolute tolerance.
    """
    return _normalise(_random_pixels(count, shape, seed), meta)


def _random_pixels(count: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.rand(count, *shape, generator=torch.Generator().manual_seed(seed))


def _normalise(pixels: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    channels = pixels.shape[1]
    mean = torch.tensor(channel_stats(meta["mean"], channels)).view(1, -1, 1, 1)
    std = torch.tensor(channel_stats(meta["std"], channels)).view(1, -1, 1, 1)
    return ((pixels - mean) / std).contiguous()


# --------------------------------------------------------------------------------------------
# Exporting


def format_of(path: PathLike) -> str | None:
    """The export format a file name's suffix stands for (:data:`SUFFIXES`), or None."""
    return {suffix: fmt for fmt, suffix in SUFFIXES.items()}.get(Path(path).suffix.lower())


def export_model(model: nn.Module, path: PathLike, config: ExportConfig | None = None) -> ExportReport:
    """Export ``model`` to ``path`` in ``config.format`` and check it against eager.

    Args:
        model: a model from :func:`mobilenetv2.create_model` or :func:`mobilenetv2.load_model`.
        path: the file to write (its folder must exist); written atomically.
        config: the export settings (default: the format of ``path``'s suffix -- ``.onnx``,
            ``.pte``, ``.pt2``, ``.pt`` -- or ONNX for any other, with a dynamic batch).

    Returns:
        An :class:`ExportReport` with the largest absolute logit differences found.

    Raises:
        ValueError: for a model or resolution that cannot be exported, or a ``config.format``
            that writes files of another suffix than ``path``'s.
        FileNotFoundError: when ``path`` is a folder or its folder does not exist.
        ExportVerificationError: when the artefact's outputs differ from eager by more than
            ``config.atol`` (nothing is written then).
    """
    path = Path(path)
    by_suffix = format_of(path)
    config = config or ExportConfig(format=by_suffix or "onnx")
    if by_suffix not in (None, config.format):  # readers go by the bytes, people by the name
        raise ValueError(f"format {config.format!r} does not write {path.suffix} files: name "
                         f"the file {SUFFIXES[config.format]}, or export with format "
                         f"{by_suffix!r}")
    check_output_file(path)
    if not isinstance(getattr(model, "meta", None), dict):
        raise ValueError("export needs a model built by mobilenetv2 (create_model or load_model)")
    was_training = model.training
    try:
        return _export(model.eval(), path, config)
    finally:
        model.train(was_training)


def _export(model: nn.Module, path: Path, config: ExportConfig) -> ExportReport:
    if config.format == "executorch" and config.dynamic_batch:  # see mobilenetv2.pte
        config = replace(config, dynamic_batch=False)
    shape = input_shape(model, config.resolution)
    if config.dynamic_size and getattr(model, "config", {}).get("arch") == "seed":
        raise ValueError(f"the seed variant takes only {shape[-1]}x{shape[-1]} inputs: export "
                         "it without a dynamic image size")
    if config.dynamic_size and any(isinstance(m, PadSame) for m in model.modules()):
        # The exporters record its padding for the example's size (a wrong map elsewhere).
        raise ValueError("a tf_padding model pads as TensorFlow does for one image size and "
                         "exports only at a fixed size: drop the dynamic image size")
    metadata = deployment_metadata(model, shape, config.pixel_input)
    folded = fold_batchnorm(model)
    batch = 2 if config.dynamic_batch else config.batch_size  # batch 1 would be specialised
    example = torch.randn(batch, *shape)
    freeze_padding(folded, example)
    if config.pixel_input:
        folded, example = PixelInput.wrap(folded, metadata, batch,
                                          channels_last_math=config.format == "executorch")
        folded.eval()
    if config.format == "onnx":
        payload = _onnx_bytes(folded, example, metadata, config)
    elif config.format == "exported":
        payload = _exported_bytes(folded, example, metadata, config)
    elif config.format == "executorch":
        from .pte import program_bytes

        payload = program_bytes(folded, example, metadata, allow_cast=config.pixel_input)
    else:
        payload = _torchscript_bytes(folded, example, metadata)

    diffs: dict[str, float] = {}

    def write_and_verify(tmp: str) -> None:
        Path(tmp).write_bytes(payload)
        if config.verify:
            diffs.update(verify_artefact(model, tmp, config.format, shape, config))

    atomic_write(path, write_and_verify)
    axes = input_axes(config)
    dims = tuple(axes.get(i, size) for i, size in enumerate(example.shape))
    log.debug("wrote %s (%s, input %s)%s", path, config.format, list(dims),
             "".join(f", max |diff| {k} {v:.2e}" for k, v in diffs.items()))
    return ExportReport(path, config.format, dims, diffs, metadata)


def input_axes(config: ExportConfig) -> dict[int, str]:
    """The input's free dimensions by name: the batch, and with ``dynamic_size`` the image's
    height and width (axes 1 and 2 of a pixel-input model's (N, H, W, C), else 2 and 3)."""
    axes = {0: "batch"} if config.dynamic_batch else {}
    if config.dynamic_size:
        height = 1 if config.pixel_input else 2
        axes.update({height: "height", height + 1: "width"})
    return axes


def _export_dims(config: ExportConfig, onnx: bool = False) -> tuple[dict[int, Any], ...] | None:
    """:func:`input_axes` as torch.export's ``dynamic_shapes`` (None when all are fixed).

    The sides' ranges are torch.export's to find (a side of 32 makes a 1x1 map at stride 32,
    which it specialises, so a .pt2 takes 33 and more); the ONNX exporter takes them as names,
    which it then gives the graph's dimensions."""
    dims: dict[int, Any] = {}
    for i, name in input_axes(config).items():
        if name == "batch":
            dims[i] = torch.export.Dim("batch", min=1)
        else:
            dims[i] = name if onnx else torch.export.Dim.AUTO
    return (dims,) if dims else None




def _onnx_bytes(folded: nn.Module, example: torch.Tensor, metadata: dict[str, Any],
                config: ExportConfig) -> bytes:
    import onnx

    exporter, outputs = config.onnx_exporter, output_names(folded)
    if exporter == "torchscript" and not hasattr(torch.onnx, "utils"):
        exporter = "dynamo"  # the TorchScript-based exporter is deprecated and may be removed
    with _quiet_exporters(), torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(
                folded, (example,), None, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                output_names=outputs, dynamic_shapes=_export_dims(config, onnx=True),
                opset_version=config.opset,
            )
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            batch = {0: "batch"} if config.dynamic_batch else {}
            maps = config.dynamic_size and outputs != [OUTPUT_NAME]  # feature maps' sides
            axes = {INPUT_NAME: input_axes(config), **{
                name: {**batch, **({2: f"{name}_height", 3: f"{name}_width"} if maps else {})}
                for name in outputs}}
            torch.onnx.export(
                folded, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                output_names=outputs, dynamic_axes=axes if axes[INPUT_NAME] else None,
                opset_version=config.opset,
            )
            proto = onnx.load_from_string(buffer.getvalue())
    leftover = sorted({n.op_type for n in proto.graph.node} & {"BatchNormalization"})
    if leftover:
        raise ExportVerificationError(f"the ONNX graph still has {leftover[0]} nodes after folding")
    proto.graph.name = "mobilenetv2"
    proto.doc_string = f"MobileNetV2 ({metadata['config'].get('name', 'mobilenetv2')})"
    stamp_oldest_versions(proto)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def stamp_oldest_versions(proto: Any) -> None:
    """Stamp an ONNX model, in place, with the oldest versions its graph needs, so that the
    ONNX Runtime of a board or a distribution (often a year or two old) loads it.

    ONNX Runtime refuses a model whose IR version is newer than its own, and one that imports
    any official domain at an opset newer than its ONNX release knows, even a domain that no
    node uses ("Opset 5 is under development ..."). The dynamo exporter stamps IR 10 (ONNX
    Runtime 1.18+) on an opset-18 graph, which IR 8 (1.14+) describes; ONNX Runtime's
    quantization pre-processing imports every domain it knows (``ai.onnx.ml`` 5: 1.18+). So
    the imports are cut to the domains the nodes use, and the IR version to the lowest those
    opsets allow, dropping the per-node metadata (exporter stack traces, the build machine's
    paths) that only IR 10 has fields for.
    """
    import onnx

    def nodes(container: Any) -> Iterator[Any]:  # a graph's or function's, and its subgraphs'
        for node in container.node:
            yield node
            for attribute in node.attribute:
                for graph in [attribute.g, *attribute.graphs] if attribute.type in (
                        onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []:
                    yield from nodes(graph)

    containers = [proto.graph, *proto.functions]
    used = {""} | {node.domain for c in containers for node in nodes(c)}
    used |= {function.domain for function in proto.functions}
    kept = [opset for opset in proto.opset_import if opset.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    oldest = onnx.helper.find_min_ir_version_for(kept, ignore_unknown=True)
    if proto.ir_version > oldest:
        proto.ir_version = oldest
        if oldest < 10:  # metadata_props of graphs, nodes and functions are IR 10 fields
            for item in [*containers, *(node for c in containers for node in nodes(c))]:
                del item.metadata_props[:]


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' progress prints, INFO logs and deprecation warnings.

    The dynamo exporter prints its steps and logs every optimisation pass at INFO, and both warn
    about their own future; the parity check after the export is what tells whether it worked.
    """
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _exported_bytes(folded: nn.Module, example: torch.Tensor, metadata: dict[str, Any],
                    config: ExportConfig) -> bytes:
    with _quiet_exporters():
        program = torch.export.export(folded, (example,), dynamic_shapes=_export_dims(config))
    for node in program.graph.nodes:  # the Python stack of each op: the machine's paths
        node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()  # torch.export.save wants a buffer or a name ending in .pt2
    torch.export.save(program, buffer, extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _torchscript_bytes(folded: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    # torch.jit is deprecated upstream (FutureWarning), and tracing the seed variant's
    # input-size check records it as a constant (TracerWarning), which is what it is.
    with _quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(folded, example)
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(metadata)})
    return _without_debug_info(buffer.getvalue())


def _without_debug_info(archive: bytes) -> bytes:
    """A TorchScript archive less its ``*.debug_pkl`` records: the source ranges of the
    traced Python code, named by the absolute paths of the machine that exported it
    (``/home/alice/...``), in a file shipped inside apps. torch.jit.load does without them
    (an error inside the program then names no Python line)."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as kept:
        for info in source.infolist():
            if not info.filename.endswith(".debug_pkl"):
                kept.writestr(info, source.read(info))
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Verifying


def load_artefact(path: PathLike, format: str) -> Any:
    """A callable ``(N, C, H, W) float32 numpy -> [outputs as numpy]`` for an exported file
    (``(N, H, W, C) uint8`` for a pixel-input one): ``[logits]``, or a ``features_only``
    model's feature maps."""
    if format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {INPUT_NAME: x})
    if format == "executorch":
        from .pte import PteSession

        program = PteSession(path)
        return lambda x: program.run(None, {INPUT_NAME: x})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if format == "exported":
            module = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()
        else:
            module = torch.jit.load(str(path), map_location="cpu")

    def run(x: Any) -> Any:
        with torch.no_grad():
            return [t.numpy() for t in _as_list(module(torch.from_numpy(x)))]

    return run


def _as_list(output: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]
             ) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else list(output)


def verify_artefact(model: nn.Module, path: PathLike, format: str, shape: tuple[int, int, int],
                    config: ExportConfig) -> dict[str, float]:
    """Compare an artefact's outputs (logits, or a backbone's feature maps) with ``model``'s on
    random inputs and real images.

    Returns:
        ``{"random": max_abs_diff, "real": max_abs_diff}``, and ``"other_size"`` (random
        images of another size) with ``config.dynamic_size``.

    Raises:
        ExportVerificationError: when a difference exceeds ``config.atol``.
    """
    run = load_artefact(path, format)
    count = 3 if config.dynamic_batch else config.batch_size  # another size than the example's
    pixels = {  # in [0, 1]
        "random": _random_pixels(count, shape),
        "real": _real_pixels(8 if config.dynamic_batch else config.batch_size, shape),
    }
    if config.dynamic_size:  # another size, not square, with sides of the other parity
        channels, height, width = shape
        pixels["other_size"] = _random_pixels(count, (channels, height + 33, width + 17), seed=1)
    diffs = {}
    for name, batch in pixels.items():
        if config.pixel_input:  # uint8 into the artefact; the eager model gets them normalised
            batch = batch.mul(255).round()
            feed = batch.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            batch = batch / 255
        batch = _normalise(batch, model.meta)
        if not config.pixel_input:
            feed = batch.numpy()
        with torch.no_grad():
            expected = [t.numpy() for t in _as_list(model(batch))]
        got = run(feed)
        shapes = [list(a.shape) for a in got], [list(e.shape) for e in expected]
        diffs[name] = max(float(abs(a - e).max()) for a, e in zip(got, expected, strict=True)
                          ) if shapes[0] == shapes[1] else float("inf")
        if not diffs[name] <= config.atol:
            raise ExportVerificationError(
                f"the {format} export does not match the eager model: max |output difference| "
                f"{diffs[name]:.3g} on {name} inputs exceeds {config.atol:g} "
                f"(output shapes {shapes[0]}, expected {shapes[1]})"
            )
    return diffs
