"""int8 inference: ONNX Runtime static quantization, PyTorch int8, and quantization-aware tuning.

The only module of the package that touches quantization APIs.

* :func:`quantize_onnx` -- post-training static quantization for ONNX Runtime: ORT's
  pre-processing (shape inference, graph optimisation), then ``quantize_static`` in QDQ format
  with per-channel int8 weights and uint8 activations whose ranges are calibrated on real images
  (MinMax, Entropy or Percentile). uint8 activations x int8 weights (U8S8) is the combination
  x86 kernels run fastest: every Conv and the residual Adds become QLinearConv / QLinearAdd in
  NHWC. With int8 activations (S8S8), ORT 1.32 on AVX2 leaves the per-channel depthwise convs in
  float and is 1.3-1.5x slower (on a VNNI CPU, 2x slower: no faster than fp32). The weights use
  7 bits (``reduce_range``) by default, whatever CPU quantizes: on x86 CPUs without VNNI the
  AVX2 u8 x s8 multiply-add saturates in int16 with 8-bit weights, and a file made on a VNNI
  machine must stay exact where it is deployed.
* :func:`quantize_executorch` -- an int8 ExecuTorch program for XNNPACK (phones): PT2E static
  quantization with ExecuTorch's XNNPACKQuantizer, calibrated on real images.
* :func:`quantize_torch` -- PyTorch's own int8 (FX graph mode, fused Conv-BN(-ReLU), the x86
  engine), what ``bench``'s "torch_int8" backend runs. torchao (the successor of these APIs) is
  not a dependency; torch.ao.quantization still works in torch 2.14 but warns that it is
  deprecated, and those warnings are silenced here.
* :func:`quantize_from_data` -- the ``mobilenetv2 quantize`` command: calibrate on a dataset,
  optionally fine-tune with fake quantization first (QAT), write the int8 ONNX file, and report
  fp32 and int8 top-1 on the validation split.
* :func:`torchvision_int8_to_onnx` -- ``mobilenetv2 quantize`` on torchvision's int8 weights:
  its quantized state_dict written as an ONNX QDQ graph with its own scales (no calibration),
  checked against torchvision's quantized model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .runtime import (  # noqa: F401  (cpu_has_vnni: public here too)
    cpu_has_vnni,
    int8_weights_saturate,
    model_input,
    read_metadata,
)
from .weights import PathLike, atomic_write

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile", "histogram")
ONNX_METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's calibrators
EXECUTORCH_METHODS = ("minmax", "histogram")  # PT2E observers (see mobilenetv2.pte)
QUANT_TYPES = ("uint8", "int8")
# The files an int8 model is written as, by suffix.
INT8_FORMATS = {".onnx": "onnx", ".pte": "executorch"}


def int8_format(out_path: PathLike) -> str:
    """The int8 format an output file's name asks for: ``onnx`` or ``executorch``.

    Raises:
        ValueError: for any other suffix (``.pt``, ``.safetensors``, none): the file would hold
            ONNX under a name that says otherwise.
    """
    path = Path(out_path)
    if path.suffix.lower() not in INT8_FORMATS:
        kind = f"{path.suffix} files" if path.suffix else "files without a suffix"
        raise ValueError(f"--out {path}: quantize writes int8 .onnx (ONNX Runtime) or .pte "
                         f"(ExecuTorch) files, not {kind}: name it "
                         f"{path.with_suffix('.onnx').name} or {path.with_suffix('.pte').name}")
    return INT8_FORMATS[path.suffix.lower()]


@dataclass(frozen=True)
class QuantizeConfig:
    """Post-training static quantization settings.

    Args:
        method: activation calibration: ``minmax`` (the observed range), ``entropy`` (the
            range that minimises the KL divergence of the histogram) or ``percentile``
            (the 99.999th percentile of |x|) for ONNX Runtime; ``minmax`` or ``histogram``
            (the range that minimises the quantization error of the histogram) for ExecuTorch.
            ``activation_type``, ``weight_type`` and ``reduce_range`` are ONNX Runtime's
            choices: ExecuTorch's XNNPACK takes int8 activations and full 8-bit per-channel
            int8 weights on every CPU (its x86 kernels without VNNI widen int8 to 16 bits
            before multiplying, so they do not saturate as ONNX Runtime's do; by design, not
            measured here on such a CPU).
        calibration_batches: batches of real images to calibrate on.
        batch_size: images per calibration batch.
        per_channel: one weight scale per output channel (needed by depthwise convolutions,
            whose channels have very different ranges).
        activation_type: ``uint8`` (fastest on x86) or ``int8``.
        weight_type: ``int8`` or ``uint8``.
        reduce_range: 7-bit weights (default): exact on every CPU. 8-bit weights
            (``False``) are exact only where ONNX Runtime's int8 kernels do not saturate
            (x86 with VNNI, ARM); on an x86 CPU without VNNI they cost accuracy (the digits
            model: 99.44% fp32, 91.9% int8), and :class:`mobilenetv2.runtime.Predictor` warns.
    """

    method: str = "minmax"
    calibration_batches: int = 8
    batch_size: int = 32
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of: "
                             f"{', '.join(METHODS)}")
        if self.calibration_batches < 1 or self.batch_size < 1:
            raise ValueError("calibration_batches and batch_size must be >= 1")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in QUANT_TYPES:
                raise ValueError(f"{name} must be one of {', '.join(QUANT_TYPES)}")
        if self.reduce_range is None:  # once "decide by this CPU"; now the default, 7 bits
            object.__setattr__(self, "reduce_range", True)
        if not isinstance(self.reduce_range, bool):
            raise ValueError(f"reduce_range must be True or False, got {self.reduce_range!r}")


# --------------------------------------------------------------------------------------------
# ONNX Runtime


def quantize_onnx(
    model_path: PathLike,
    out_path: PathLike,
    calibration: Iterable[np.ndarray],
    config: QuantizeConfig | None = None,
) -> Path:
    """Quantize an fp32 ONNX model to int8 (QDQ) for ONNX Runtime, calibrated on real images.

    Args:
        model_path: the fp32 model (e.g. from :func:`mobilenetv2.export.export_model`); its
            metadata (preprocessing, class names) is carried over.
        out_path: where to write the int8 model (atomically).
        calibration: batches of preprocessed images, (N, C, H, W) float32 -- real images,
            normalised as for the fp32 model; never random tensors, whose activation ranges
            are nothing like real ones. For a pixel-input model, they are turned back into
            pixels (or may be given as its uint8 (N, H, W, C) pixels). A model with a fixed
            batch size gets the same images regrouped into batches of that size.
        config: quantization settings.

    Returns:
        ``out_path``.

    Raises:
        ValueError: when no calibration batch is given.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .export import stamp_oldest_versions

    config = config or QuantizeConfig()
    if config.method not in ONNX_METHODS:
        raise ValueError(f"{config.method} calibration is for ExecuTorch programs (.pte); "
                         f"for ONNX choose one of: {', '.join(ONNX_METHODS)}")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name, meta = session.get_inputs()[0].name, read_metadata(session)
    pixels = meta.get("input_format") == "pixels"
    batches = [model_input(b, meta) for b in calibration]  # pixel models: back to pixels
    if not batches:
        raise ValueError("quantization needs at least one batch of calibration images")
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and any(len(b) != fixed for b in batches):
        # A file exported with a fixed batch (export --static-batch: what NNAPI and Core ML
        # need) takes only batches of that size: the same images, regrouped, the last group
        # filled from the first images (repeats leave minmax ranges as they are; they weigh
        # those images slightly more in the histograms of percentile and entropy).
        images = np.concatenate(batches)
        images = images[np.arange(-(-len(images) // fixed) * fixed) % len(images)]
        batches = list(np.split(images, len(images) // fixed))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    metadata = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    with tempfile.TemporaryDirectory(prefix="mobilenetv2-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "int8.onnx"
        with _quiet():
            # ORT's recommended pre-processing: shape inference and basic graph optimisation,
            # so every tensor has a shape and the quantizer sees the fused graph.
            quant_pre_process(str(model_path), str(prepared))
            quantize_static(
                str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                nodes_to_exclude=_preprocessing_nodes(prepared) if pixels else None,
                per_channel=config.per_channel, reduce_range=config.reduce_range,
                activation_type=types[config.activation_type],
                weight_type=types[config.weight_type], calibrate_method=methods[config.method],
            )
        model = onnx.load(str(quantized))
        stamp_oldest_versions(model)  # pre-processing imports ai.onnx.ml 5: ONNX Runtime 1.18+
        del model.metadata_props[:]
        for key, value in {**metadata, "quantization": _describe(config)}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        atomic_write(out_path, lambda path: onnx.save_model(model, path))
    return Path(out_path)


def _preprocessing_nodes(path: Path) -> list[str]:
    """The nodes of a pixel-input model before its first convolution (the cast, transpose and
    multiply-add of :class:`mobilenetv2.export.PixelInput`), named if they were not, so that
    the quantizer leaves them in float: quantized, they rounded the image twice more and their
    broadcasting int8 kernels took longer than the rest of the network (measured at 160x160)."""
    import onnx

    model = onnx.load(str(path))
    first_conv = next(i for i, node in enumerate(model.graph.node) if node.op_type == "Conv")
    for i, node in enumerate(model.graph.node[:first_conv]):
        node.name = node.name or f"pixel_input_{i}"
    onnx.save_model(model, str(path))
    return [node.name for node in model.graph.node[:first_conv]]


def _describe(config: QuantizeConfig) -> str:
    return json.dumps({"format": "QDQ", "method": config.method, "per_channel": config.per_channel,
                       "activations": config.activation_type, "weights": config.weight_type,
                       "reduce_range": config.reduce_range})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' deprecation warnings, per-tensor INFO logs and progress prints."""
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        root.setLevel(max(level, logging.WARNING))  # ORT's quantizer logs on the root logger
        try:
            yield
        finally:
            root.setLevel(level)


# --------------------------------------------------------------------------------------------
# ExecuTorch


def quantize_executorch(model: nn.Module, out_path: PathLike, calibration: Iterable[torch.Tensor],
                        config: QuantizeConfig | None = None, *,
                        resolution: int | None = None, batch_size: int = 1,
                        pixel_input: bool = False) -> Path:
    """An int8 ExecuTorch program (``.pte``, XNNPACK) of a float model, calibrated on real images.

    PT2E static quantization with ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric int8
    weights, per-tensor int8 activations), on the BatchNorm-folded model, then lowered to
    XNNPACK (:func:`mobilenetv2.pte.program_bytes`). The program takes ``batch_size`` images
    per call and carries the preprocessing and a ``quantization`` entry in its metadata.

    Args:
        model: a model from :func:`mobilenetv2.create_model` or :func:`mobilenetv2.load_model`.
        out_path: the ``.pte`` file to write (atomically).
        calibration: batches of preprocessed images, (N, C, H, W) -- real images, normalised as
            for the model.
        config: ``method`` (``minmax`` or ``histogram``) is what counts here.
        resolution: the input side (default: the model's).
        batch_size: the program's fixed batch size.
        pixel_input: the program takes uint8 pixels (N, H, W, C) and normalises them itself
            (:class:`mobilenetv2.export.PixelInput`); ``calibration`` stays normalised.

    Raises:
        ValueError: for a calibration method ExecuTorch has no observer for.
        ImportError: without ExecuTorch.
    """
    from .export import (
        PixelInput,
        deployment_metadata,
        fold_batchnorm,
        freeze_padding,
        input_shape,
    )
    from .pte import INT8_SCHEME, program_bytes, quiet_imports, require_executorch

    require_executorch()
    config = config or QuantizeConfig()
    if config.method not in EXECUTORCH_METHODS:
        raise ValueError(f"{config.method} calibration is ONNX Runtime's; for ExecuTorch "
                         f"programs (.pte) choose one of: {', '.join(EXECUTORCH_METHODS)}")
    batches = list(calibration)
    shape = input_shape(model, resolution)
    metadata = deployment_metadata(model, shape, pixel_input)
    metadata["quantization"] = {**INT8_SCHEME, "method": config.method,
                                "calibration_images": sum(len(b) for b in batches)}
    folded = fold_batchnorm(model)
    example = torch.randn(batch_size, *shape)
    freeze_padding(folded, example)
    with _quiet(), quiet_imports():
        int8 = _pt2e_int8(folded, example, batches, config.method)
    if pixel_input:  # the preprocessing around the int8 network, in float: not quantized
        int8, example = PixelInput.wrap(int8, metadata, batch_size, channels_last_math=True)
    payload = program_bytes(int8, example, metadata, allow_cast=pixel_input)
    atomic_write(out_path, lambda path: Path(path).write_bytes(payload))
    return Path(out_path)


def _pt2e_int8(folded: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor],
               activation_observer: str) -> nn.Module:
    """PT2E static int8 with ExecuTorch's XNNPACK quantizer: observers, calibration, conversion.

    The graph is exported with a free batch so that calibration runs in batches; the converted
    module is exported again, with ``example``'s fixed batch, by
    :func:`mobilenetv2.pte.program_bytes`.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True)
    if activation_observer == "minmax":
        import dataclasses

        from torchao.quantization.pt2e import MinMaxObserver

        def minmax(spec: Any) -> Any:
            return dataclasses.replace(spec, observer_or_fake_quant_ctr=MinMaxObserver.with_args(
                eps=2**-12)) if spec is not None else None

        config = dataclasses.replace(config, input_activation=minmax(config.input_activation),
                                     output_activation=minmax(config.output_activation))
    elif activation_observer != "histogram":
        raise ValueError(f"unknown activation calibration {activation_observer!r} for ExecuTorch: "
                         "choose histogram or minmax")
    pair = torch.cat([example[:1], example[:1]])  # a batch of 1 would be specialised
    with torch.no_grad():
        graph = torch.export.export(folded, (pair,), dynamic_shapes=(
            {0: torch.export.Dim("batch", min=1)},)).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
    seen = 0
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
            seen += len(batch)
    if not seen:
        raise ValueError("no calibration images")
    return convert_pt2e(prepared)


# --------------------------------------------------------------------------------------------
# PyTorch


def traceable(model: nn.Module) -> nn.Module:
    """``model`` as a module torch.fx can trace: the seed variant's size check flattened away.

    The seed variant checks its input size in Python, which symbolic tracing cannot follow; its
    forward is otherwise a straight chain of its children, so that chain is traced instead.
    """
    if getattr(model, "config", {}).get("arch") != "seed":
        return model
    layers = [model.preliminary, *(getattr(model, f"layer{i}") for i in range(1, 8)),
              model.final[0], model.final[1], model.final[2]]
    if model.return_probs:
        layers.append(model.final[3])
    return nn.Sequential(*layers)


def quantize_torch(model: nn.Module, calibration: Iterable[torch.Tensor],
                   engine: str = "x86") -> nn.Module:
    """PyTorch int8 (FX graph mode, static): Conv-BN(-ReLU) fused, observers calibrated, converted.

    Args:
        model: a float model (left untouched; a copy is quantized).
        calibration: batches of real, preprocessed images (N, C, H, W).
        engine: the quantized engine, ``x86`` (fbgemm + oneDNN) or ``qnnpack`` (ARM).

    Returns:
        The int8 module; it takes and returns float tensors.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = list(calibration)
    if not batches:
        raise ValueError("quantization needs at least one batch of calibration images")
    torch.backends.quantized.engine = engine
    float_model = traceable(copy.deepcopy(model).eval())
    with _quiet(), torch.no_grad():
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(engine), (batches[0],))
        for batch in batches:
            prepared(batch)
        return convert_fx(prepared)


# --------------------------------------------------------------------------------------------
# From a dataset: calibrate, (optionally) fine-tune with fake quantization, evaluate


def quantize_from_data(
    weights: PathLike,
    data: str,
    out_path: PathLike,
    config: QuantizeConfig | None = None,
    *,
    data_dir: PathLike = "data",
    qat: bool = False,
    qat_epochs: int = 1,
    qat_lr: float = 1e-4,
    max_eval_images: int | None = None,
    fp32_path: PathLike | None = None,
    resolution: int | None = None,
    val_split: float | None = None,
    pixel_input: bool = False,
    strict: bool = False,
    use_ema: bool = False,
) -> dict[str, Any]:
    """The ``mobilenetv2 quantize`` command: weights + data -> int8 model and its accuracy.

    Calibration images are ``calibration_batches * batch_size`` training images (a seeded
    sample, without training augmentation) brought to the model's input size and normalised
    with the model's statistics. fp32 (the fp32 export of ``weights``, in the same runtime) and
    int8 top-1 are measured on the validation split, with the share of images on which they
    agree. ``out_path`` ending in ``.pte`` makes an ExecuTorch program for XNNPACK
    (:func:`quantize_executorch`), anything else an ONNX model (:func:`quantize_onnx`).

    Args:
        weights: a weights file load_model reads (``use_ema``: a training checkpoint's EMA
            weights).
        data: ``digits``, ``cifar10``, ``cifar100`` or an image folder (see
            :func:`mobilenetv2.data.build_datasets`).
        out_path: the int8 ``.onnx`` (or ``.pte``) file to write.
        config: quantization settings.
        data_dir: where CIFAR lives.
        qat: fine-tune with fake quantization (:func:`qat_finetune`) before quantizing.
        qat_epochs, qat_lr: QAT epochs and learning rate.
        max_eval_images: evaluate on at most this many validation images.
        fp32_path: also keep the (verified) fp32 export (ONNX, or .pte for a .pte
            ``out_path``) there; by default it is temporary.
        resolution: input side of the exported models (default: the weights').
        val_split: for a folder of class folders, the fraction of each class held out for the
            evaluation, the rest calibrates (default: the split the weights were trained
            with, else 0.2).
        pixel_input: both models take uint8 pixels (N, H, W, C) and normalise them
            themselves (:class:`mobilenetv2.export.PixelInput`).
        strict: fail on an unreadable image instead of skipping it (skipped, it is named in
            a warning, as in training and eval).

    Returns:
        A JSON-able report: ``path``, ``format`` (``onnx`` or ``executorch``), ``method``,
        ``calibration_images``, ``weight_bits``, ``qat``,
        ``eval_images``, ``top1_fp32``, ``top1_int8``, ``agreement_int8`` (percent of images
        where int8 and fp32 predict the same class) and, with QAT, ``top1_fp32_qat`` (the
        fine-tuned float model) and ``top1_int8_ptq`` (post-training int8 without QAT).

    Raises:
        ValueError, FileNotFoundError: for weights, data or an output path that cannot be used.
    """
    from .data import build_datasets, folder_layout, match_classes
    from .export import ExportConfig, export_model, input_shape
    from .runtime import channel_stats
    from .weights import check_output_file, load_model

    config = config or QuantizeConfig()
    out_path = Path(out_path)
    executorch = int8_format(out_path) == "executorch"
    check_output_file(out_path)
    suffix = ".pte" if executorch else ".onnx"
    if fp32_path is not None:
        check_output_file(Path(fp32_path))
        if Path(fp32_path).suffix.lower() != suffix:
            raise ValueError(f"the fp32 model goes with the int8 one: name it {suffix}, "
                             f"not {fp32_path}")
    methods = EXECUTORCH_METHODS if executorch else ONNX_METHODS
    if config.method not in methods:  # before the slow part
        raise ValueError(f"{config.method} calibration is not available for {suffix} files: "
                         f"choose one of: {', '.join(methods)}")
    if executorch:
        from .pte import require_executorch

        require_executorch()
    model = load_model(weights, use_ema=use_ema).eval()
    if model.config.get("features_only"):
        raise ValueError(f"{weights} is a feature extractor (features_only): with no classes, "
                         "its int8 accuracy cannot be measured; quantize its ONNX export with "
                         "mobilenetv2.quantize.quantize_onnx and calibration images instead")
    channels, _, size = input_shape(model, resolution)
    # Prepared as inference will prepare them: the model's statistics, resampling and crop.
    preprocessing = {"interpolation": model.meta.get("interpolation"),
                     "crop_pct": model.meta.get("crop_pct")}
    if val_split is None and folder_layout(data) == "classes" and model.meta.get("val_split"):
        val_split = float(model.meta["val_split"])  # calibrate on no image training held out
    preprocessing["val_split"] = val_split
    preprocessing["strict"] = strict  # (how the folder is read, for both builds below)
    bundle = build_datasets(
        data, resolution=size, root=data_dir, in_channels=channels,
        mean=tuple(channel_stats(model.meta["mean"], channels)),
        std=tuple(channel_stats(model.meta["std"], channels)), **preprocessing,
    )
    match = match_classes(model.meta.get("class_names"), getattr(model, "num_classes", 0),
                          bundle.class_names, weights=weights, data=data,
                          folders=folder_layout(data) is not None)
    if match.indices is not None:  # calibration would not mind, but the accuracies (and QAT) would
        raise ValueError(f"the {bundle.num_classes} classes of {data} pair with the "
                         f"{model.num_classes} of {weights} by {match.how}, but not one for one "
                         "in the model's order: quantize with the data it was trained on")
    count = config.calibration_batches * config.batch_size
    plain = build_datasets(data, resolution=size, root=data_dir, in_channels=channels,
                           mean=bundle.mean, std=bundle.std, augment=False, **preprocessing)
    images = calibration_images(plain.train, count)
    tuned = qat_finetune(model, bundle, epochs=qat_epochs, lr=qat_lr, batch_size=config.batch_size,
                         seven_bit_weights=config.reduce_range and not executorch
                         ) if qat else model  # XNNPACK's int8 weights use all 8 bits
    export_config = ExportConfig(format="executorch" if executorch else "onnx",
                                 resolution=resolution, pixel_input=pixel_input)

    def make_int8(float_model: nn.Module, float_file: Path, target: Path) -> None:
        if executorch:
            quantize_executorch(float_model, target, images.split(config.batch_size), config,
                                resolution=resolution, pixel_input=pixel_input)
        else:
            quantize_onnx(float_file, target, images.split(config.batch_size), config)

    with tempfile.TemporaryDirectory(prefix="mobilenetv2-quant-") as tmp:
        fp32 = Path(fp32_path) if fp32_path is not None else Path(tmp) / f"fp32{suffix}"
        tuned_fp32 = Path(tmp) / f"tuned{suffix}"
        export_model(model, fp32, export_config)
        models: dict[str, PathLike] = {"fp32": fp32, "int8": out_path}
        if qat:  # the post-training int8 model too, to show what QAT bought
            export_model(tuned, tuned_fp32, export_config)
            models |= {"fp32_qat": tuned_fp32, "int8_ptq": Path(tmp) / f"ptq{suffix}"}
            make_int8(model, fp32, models["int8_ptq"])
        make_int8(tuned, tuned_fp32 if qat else fp32, out_path)
        accuracy = compare_onnx(models, bundle.val, max_images=max_eval_images)
    bits = 8 if executorch or not config.reduce_range else 7
    return {"path": str(out_path), "format": "executorch" if executorch else "onnx",
            "method": config.method, "calibration_images": len(images), "weight_bits": bits,
            "qat": qat, **accuracy}


def describe_report(report: dict[str, Any], data: str) -> str:
    """One line for people: what :func:`quantize_from_data` wrote and the accuracy of each."""
    runtime = "ExecuTorch XNNPACK " if report.get("format") == "executorch" else ""
    return (f"wrote {report['path']} ({runtime}int8 {report['method']}, {report['weight_bits']}-bit "
            f"weights, {report['calibration_images']} "
            f"calibration images{', QAT' if report['qat'] else ''}); top-1 on "
            f"{report['eval_images']} {data} validation images: fp32 "
            f"{report['top1_fp32']:.2f}%, int8 {report['top1_int8']:.2f}% (same class as fp32 "
            f"on {report['agreement_int8']:.2f}%)"
            + (f"; after QAT fp32 {report['top1_fp32_qat']:.2f}%, without QAT int8 "
               f"{report['top1_int8_ptq']:.2f}%" if report["qat"] else ""))


def calibration_images(train: Any, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` images (a seeded sample) of an unaugmented training set: (N, C, H, W).

    Calibration should see the images inference will see: pass ``build_datasets(...,
    augment=False).train``. Unreadable images are left out.
    """
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(train), generator=generator)[:count].tolist()
    images = [image for image, _ in (train[i] for i in indices) if image is not None]
    if not images:
        raise ValueError("the calibration data holds no readable images")
    return torch.stack(images)


def compare_onnx(models: dict[str, PathLike], dataset: Any, max_images: int | None = None,
                 batch_size: int = 64) -> dict[str, Any]:
    """Top-1 of exported models on a labelled dataset, and how often each agrees with the first.

    Args:
        models: name -> ONNX or ExecuTorch file (anything :class:`mobilenetv2.runtime.Predictor`
            runs), e.g. ``{"fp32": ..., "int8": ...}``; the first is the reference for the
            agreement.
        dataset: yields (preprocessed CHW tensor, label).
        max_images: use at most this many images (the first ones).

    Returns:
        ``{"eval_images": n, "top1_<name>": %, ..., "agreement_<name>": %, ...}``.
    """
    from .imagefolder import collate_skipping
    from .runtime import Predictor
    from .train import default_workers

    predictors = {name: Predictor(path) for name, path in models.items()}
    reference = next(iter(predictors))
    subset = dataset
    if max_images is not None and max_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(max_images))
    # Image files are decoded in worker processes while the models run, as `eval` does:
    # decoded one after another here, a JPEG's few milliseconds came on top of each image's.
    workers = default_workers(dataset, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_skipping,
                                         num_workers=workers)
    seen, right, same = 0, dict.fromkeys(predictors, 0), dict.fromkeys(predictors, 0)
    for images, labels, _ in loader:
        if images is None:
            continue
        batch, labels = images.numpy(), labels.numpy()
        predictions = {name: p.run(batch).argmax(1) for name, p in predictors.items()}
        seen += len(labels)
        for name, predicted in predictions.items():
            right[name] += int((predicted == labels).sum())
            same[name] += int((predicted == predictions[reference]).sum())
    if not seen:
        raise ValueError("the validation data holds no readable images")
    report: dict[str, Any] = {"eval_images": seen}
    report |= {f"top1_{name}": 100 * right[name] / seen for name in predictors}
    report |= {f"agreement_{name}": 100 * same[name] / seen for name in predictors
               if name != reference}
    return report


def qat_finetune(model: nn.Module, bundle: Any, *, epochs: int = 1, lr: float = 1e-4,
                 batch_size: int = 32, seed: int = 0, seven_bit_weights: bool = True) -> nn.Module:
    """Quantization-aware fine-tuning: train with simulated int8, return the float model.

    FX ``prepare_qat_fx`` folds each BatchNorm into its convolution's weights and fake-quantizes
    them as ONNX Runtime will run them (symmetric per-channel int8 weights, 7-bit with
    ``seven_bit_weights`` as ``reduce_range`` gives; asymmetric uint8 activations), so SGD
    moves the weights to where that rounding costs least. The prepared graph shares its parameters and BatchNorm buffers
    with a copy of ``model``; that copy, fine-tuned, is returned in eval mode, to be exported
    and calibrated like any float model (the learned activation ranges are not carried over:
    ONNX Runtime's calibration sets them). BatchNorm statistics stay frozen at the trained
    model's, so the folded weights QAT sees are the ones the export will fold.

    Args:
        model: the float model (left untouched).
        bundle: a :func:`mobilenetv2.data.build_datasets` result (its ``train`` split is used).
        epochs, lr, batch_size, seed: the fine-tuning schedule (SGD, momentum 0.9, cosine).
        seven_bit_weights: simulate 7-bit weights (match ``QuantizeConfig.reduce_range``).

    Returns:
        The fine-tuned float copy of ``model``.
    """
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import (
        FusedMovingAvgObsFakeQuantize,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        get_default_qat_qconfig_mapping,
    )
    from torch.ao.quantization.fake_quantize import default_fused_act_fake_quant
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from .data import ShardedBatchSampler
    from .distributed import DistEnv
    from .engine import StepState, train_one_epoch
    from .train import make_loader

    if epochs < 1 or not lr > 0:
        raise ValueError(f"QAT needs epochs >= 1 and lr > 0, got {epochs} and {lr}")
    torch.backends.quantized.engine = "x86"
    tuned = copy.deepcopy(model).train()
    sampler = ShardedBatchSampler(len(bundle.train), batch_size, seed=seed, drop_last=True)
    loader = make_loader(bundle.train, sampler, 0, torch.device("cpu"), seed)
    example = next(iter(loader))[0][:2]
    bound = 64 if seven_bit_weights else 128
    weight = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=-bound, quant_max=bound - 1,
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    mapping = get_default_qat_qconfig_mapping("x86").set_global(
        QConfig(activation=default_fused_act_fake_quant, weight=weight))
    with _quiet():
        prepared = prepare_qat_fx(traceable(tuned), mapping, (example,))
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    steps = len(sampler)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    # The trained model's BatchNorm statistics are kept: re-estimating them from a few hundred
    # augmented batches of fake-quantized activations costs more accuracy than QAT recovers.
    prepared.apply(freeze_bn_stats)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        if hasattr(bundle.train, "set_epoch"):
            bundle.train.set_epoch(epoch)
        state = StepState(epoch=epoch)  # this epoch's loss, not the running one since the first
        with _quiet():
            train_one_epoch(prepared, loader, optimizer, scheduler, state,
                            global_batch_sizes=[batch_size] * steps, device=torch.device("cpu"),
                            env=DistEnv())
        log.info("QAT epoch %d/%d: loss %.4f", epoch + 1, epochs,
                 state.loss_sum / max(state.seen, 1))
    return tuned.eval()


# --------------------------------------------------------------------------------------------
# torchvision's int8 weights -> ONNX Runtime
#
# torchvision ships MobileNetV2 int8 weights trained with quantization-aware training
# (``MobileNet_V2_QuantizedWeights.IMAGENET1K_QNNPACK_V1``: 71.658% top-1 on ImageNet, against
# 71.878% in float), for PyTorch's own quantized kernels. Their state_dict holds everything an
# int8 network is: int8 weights with BatchNorm folded in, float biases, and the scale and zero
# point of every activation (each fused Conv-BN-ReLU's output, each residual sum, the input).
# Written out as an ONNX QDQ graph with exactly those numbers, ONNX Runtime runs the same int8
# network: QuantizeLinear/DequantizeLinear pairs fix each tensor's int8 grid, and ORT fuses
# DequantizeLinear -> Conv -> Relu -> QuantizeLinear into one QLinearConv.

TORCHVISION_INT8_URL = ("https://download.pytorch.org/models/quantized/"
                        "mobilenet_v2_qnnpack_37f702c5.pth")
TORCHVISION_INT8_TAG = "imagenet-int8"
MAX_STEPS = 4  # the largest logit difference from torchvision's that passes verification


def is_torchvision_int8(state: Any) -> bool:
    """Whether ``state`` is the state_dict of torchvision's quantized MobileNetV2."""
    if not isinstance(state, Mapping):
        return False
    weight = state.get("features.0.0.weight")
    return "quant.scale" in state and isinstance(weight, torch.Tensor) and weight.is_quantized


def read_torchvision_int8(source: PathLike | dict[str, Any]) -> dict[str, Any]:
    """The state_dict of torchvision's quantized MobileNetV2, from a file, a tag or a dict.

    Args:
        source: a ``torch.save`` file of ``torchvision.models.quantization.mobilenet_v2``'s
            state_dict (``quantize=True``), its state_dict itself, or ``"imagenet-int8"``:
            torchvision's ImageNet weights, downloaded once into the torch hub cache.

    Raises:
        FileNotFoundError: when the file does not exist.
        WeightsError: when it is not such a state_dict.
    """
    from .weights import WeightsError, is_torch_save, torch_load

    if isinstance(source, Mapping):
        state, name = source, "the state_dict"
    elif str(source) == TORCHVISION_INT8_TAG and not Path(source).exists():
        from torch.hub import load_state_dict_from_url

        from .registry import explain_download

        with explain_download("torchvision's int8 ImageNet weights", TORCHVISION_INT8_URL,
                              "quantize --weights FILE"):
            state = load_state_dict_from_url(TORCHVISION_INT8_URL, map_location="cpu",
                                             weights_only=True, check_hash=True)
        name = "imagenet-int8"
    else:
        path = name = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        with open(path, "rb") as f:
            state = torch_load(path) if is_torch_save(f.read(16)) else None
    if not is_torchvision_int8(state):
        raise WeightsError(f"{name} is not torchvision's int8 (quantized) MobileNetV2; float "
                           "weights are quantized by calibrating on images: pass --data DATA")
    return state


def torchvision_int8_to_onnx(source: PathLike | dict[str, Any], out_path: PathLike, *,
                             resolution: int | None = None, weight_type: str | None = None,
                             opset: int = 17) -> dict[str, Any]:
    """Write torchvision's int8 MobileNetV2 as an ONNX QDQ model for ONNX Runtime, verified.

    No calibration: every scale and zero point is torchvision's. The model's preprocessing
    (ImageNet mean and std, resize 256 -> crop 224, bilinear) and, for 1000 classes, the
    ImageNet class names go into the metadata as :func:`mobilenetv2.export.export_model`
    writes them, so ``eval``, ``predict`` and :class:`mobilenetv2.runtime.Predictor` take the
    file as any export. Before the file is renamed into place, ONNX Runtime's logits are
    compared with torchvision's quantized model in PyTorch (the qnnpack engine) on real and
    random images.

    Args:
        source: see :func:`read_torchvision_int8`.
        out_path: the ``.onnx`` file to write (atomically).
        resolution: input side (default 224); the batch dimension is dynamic.
        weight_type: ``int8`` (the weights as stored) or ``uint8`` (the same values + 128 with
            zero point 128). ``None``: ``uint8`` on x86 CPUs without VNNI, ``int8`` elsewhere.
            Without VNNI, ONNX Runtime multiplies uint8 x int8 with an instruction that
            saturates in int16 (hence ``reduce_range`` in :class:`QuantizeConfig`);
            torchvision's weights use all 8 bits, and on two QAT-trained digits models that
            moved 0.5% and 1.3% of the predictions. With uint8 weights every logit equalled
            torchvision's there (on a VNNI CPU, within two output steps); those kernels are
            only 1.1-1.2x fp32, where int8 weights with VNNI are 2.3x: the default suits the
            CPU that converts, and :class:`mobilenetv2.runtime.Predictor` warns when an
            int8-weight file is loaded where it saturates.
        opset: ONNX opset (>= 13, for per-channel DequantizeLinear).

    Returns:
        A JSON-able report: ``path``, ``weight_type``, ``weight_scheme``, ``input_shape``, and
        against torchvision's PyTorch int8 model: ``images``, ``agreement`` (percent same
        top-1), ``max_steps`` (largest logit difference in units of the output's scale).

    Raises:
        ExportVerificationError: when ONNX Runtime's logits differ from torchvision's by more
            than ``MAX_STEPS`` output steps where its kernels are exact (uint8 weights, or
            not an AVX2-only x86 CPU). They requantize with other rounding than qnnpack, which
            moves a logit by a step or two; a wrong scale, zero point or bias moves it by tens.
    """
    import onnx

    from .export import ExportVerificationError, deployment_metadata
    from .weights import WeightsError, check_output_file

    if weight_type is None:
        weight_type = "uint8" if int8_weights_saturate() else "int8"
    if weight_type not in QUANT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(QUANT_TYPES)}")
    if resolution is not None and resolution < 32:
        raise ValueError(f"resolution must be at least 32, got {resolution}")
    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-channel DequantizeLinear), got {opset}")
    out_path = Path(out_path)
    if int8_format(out_path) != "onnx":
        raise ValueError(f"--out {out_path}: torchvision's int8 weights convert to .onnx only")
    check_output_file(out_path)
    state = read_torchvision_int8(source)
    name = "the state_dict" if isinstance(source, Mapping) else str(source)
    try:
        model = _torchvision_int8_skeleton(state)
        shape = (model.stem.conv.in_channels, resolution or 224, resolution or 224)
        graph = _QDQGraph(state, weight_type)
        graph.build(model)
    except (KeyError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        raise WeightsError(f"{name} does not fit torchvision's quantized MobileNetV2: "
                           f"{' '.join(str(e).split())[:300]}") from None
    proto = graph.model(shape, model.num_classes, opset)
    metadata = deployment_metadata(model, shape)
    metadata["quantization"] = {"format": "QDQ", "method": "torchvision int8",
                                "per_channel": graph.weight_scheme == "per-channel",
                                "activations": "uint8", "weights": weight_type}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    report: dict[str, Any] = {"path": str(out_path), "weight_type": weight_type,
                              "weight_scheme": graph.weight_scheme, "input_shape": list(shape)}

    def write_and_verify(tmp: str) -> None:
        onnx.save_model(proto, tmp)
        report.update(_compare_with_torchvision(state, model, tmp, shape, metadata))
        if report["max_steps"] > MAX_STEPS:
            message = (f"ONNX Runtime's logits differ from torchvision's int8 model by up to "
                       f"{report['max_steps']:.0f} steps of the output scale (same top-1 on "
                       f"{report['agreement']:.1f}% of {report['images']} images)")
            if weight_type == "uint8" or not int8_weights_saturate():
                raise ExportVerificationError(message)
            log.warning("%s: this CPU's uint8 x int8 kernel saturates; weight_type='uint8' "
                        "gives torchvision's results", message)

    atomic_write(out_path, write_and_verify)
    return report


def _compare_with_torchvision(state: dict[str, Any], model: nn.Module, path: str,
                              shape: tuple[int, int, int], meta: dict[str, Any],
                              count: int = 16) -> dict[str, Any]:
    """ONNX Runtime on ``path`` against torchvision's quantized model holding ``state``."""
    import onnxruntime as ort
    from torchvision.models.quantization import mobilenet_v2

    from .export import INPUT_NAME, random_images, real_images
    from .weights import WeightsError

    images = torch.cat([real_images(count // 2, shape, meta),
                        random_images(count - count // 2, shape, meta)])
    engine = torch.backends.quantized.engine
    try:
        # qnnpack: the engine torchvision's weights were made for. (The x86 engine runs them
        # with the same saturating uint8 x int8 multiply as ONNX Runtime without VNNI.)
        with _quiet():  # quantize=True sets the engine too, and warns of deprecated APIs
            reference = mobilenet_v2(weights=None, quantize=True, num_classes=model.num_classes,
                                     width_mult=model.config.get("width_mult", 1.0))
            if "qnnpack" in torch.backends.quantized.supported_engines:
                torch.backends.quantized.engine = "qnnpack"
            try:
                reference.load_state_dict(state)  # packs the weights for the engine
            except (RuntimeError, KeyError, TypeError, ValueError) as e:
                raise WeightsError(f"torchvision's own quantized MobileNetV2 does not load it: "
                                   f"{' '.join(str(e).split())[:300]}") from None
            with torch.no_grad():
                expected = reference.eval()(images).numpy()
    finally:
        torch.backends.quantized.engine = engine
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: images.numpy()})[0]
    step = float(state["classifier.1.scale"])
    return {"images": len(images),
            "agreement": 100 * float((got.argmax(1) == expected.argmax(1)).mean()),
            "max_steps": float(np.abs(got - expected).max() / step)}


def _linear_weight_bias(state: Mapping[str, Any], prefix: str) -> tuple[Any, Any]:
    """A quantized Linear's (weight, bias) in each layout torch has saved it in: a
    ``_packed_params._packed_params`` tuple (since torch 1.5), ``_packed_params.weight`` and
    ``.bias``, or ``weight`` and ``bias`` (the first quantized releases)."""
    packed = state.get(f"{prefix}._packed_params._packed_params")
    if packed is not None:
        weight, bias = packed
        return weight, bias
    for owner in (f"{prefix}._packed_params", prefix):
        if f"{owner}.weight" in state:
            return state[f"{owner}.weight"], state.get(f"{owner}.bias")
    raise KeyError(f"{prefix}._packed_params._packed_params")


def _torchvision_int8_skeleton(state: dict[str, Any]) -> nn.Module:
    """Our float network of the same shape, on the meta device: the structure to walk."""
    from .registry import build_from_config
    from .weights import LoadedWeights, imagenet_categories, infer_config

    last = max(int(k.split(".")[1]) for k in state if k.startswith("features."))
    linear, _ = _linear_weight_bias(state, "classifier.1")
    shapes = {"features.0.0.weight": state["features.0.0.weight"],
              f"features.{last}.0.weight": state[f"features.{last}.0.weight"],
              "classifier.1.weight": linear}
    config = infer_config(LoadedWeights({k: torch.empty(v.shape, device="meta")
                                         for k, v in shapes.items()}, format="torchvision"))
    with torch.device("meta"):
        model = build_from_config(config)
    if model.num_classes == 1000:
        model.meta["class_names"] = imagenet_categories()
    return model


class _QDQGraph:
    """Builds the QDQ graph of torchvision's int8 network, module by module.

    Every float tensor between two operators is the output of a DequantizeLinear, so it holds
    exactly the values of a uint8 activation; ``self.grid`` remembers each one's scale and zero
    point (the int32 biases are quantized with input scale x weight scale, as the int8 kernels
    need).
    """

    def __init__(self, state: dict[str, Any], weight_type: str) -> None:
        self.state, self.weight_type = state, weight_type
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.grid: dict[str, tuple[float, int]] = {}
        self.weight_scheme = "per-tensor"

    def build(self, model: nn.Module) -> None:
        from .export import INPUT_NAME, OUTPUT_NAME
        from .weights import _peer_prefixes

        names = _peer_prefixes(model, "torchvision")
        x = self._requantize(INPUT_NAME, "quant", self._activation("quant"))
        x = self._conv(x, model.stem.conv, names["stem.conv"], relu=True)
        for si, stage in enumerate(model.stages):
            for bi, block in enumerate(stage):
                ours, shortcut = f"stages.{si}.{bi}", x
                if not isinstance(block.expand, nn.Identity):
                    x = self._conv(x, block.expand.conv, names[f"{ours}.expand.conv"], relu=True)
                x = self._conv(x, block.depthwise.conv, names[f"{ours}.depthwise.conv"], relu=True)
                x = self._conv(x, block.project.conv, names[f"{ours}.project.conv"], relu=False)
                if block.use_residual:
                    skip = names[f"{ours}.project.conv"].rsplit(".conv.", 1)[0] + ".skip_add"
                    self._node("Add", [shortcut, x], f"{skip}.sum")
                    x = self._requantize(f"{skip}.sum", skip, self._activation(skip))
        x = self._conv(x, model.head.conv, names["head.conv"], relu=True)
        # Average pooling keeps its input's int8 grid in PyTorch's quantized kernels too.
        self._node("GlobalAveragePool", [x], "pool.avg")
        x = self._requantize("pool.avg", "pool", self.grid[x])
        self._node("Flatten", [x], "pool.flatten", axis=1)  # requantized, so ORT makes a QGemm
        x = self._requantize("pool.flatten", "flatten", self.grid[x])
        weight, bias = _linear_weight_bias(self.state, "classifier.1")
        w, w_scale = self._weight("classifier.1.weight", weight)
        inputs = [x, w] + ([self._bias("classifier.1.bias", bias, x, w_scale)]
                           if bias is not None else [])
        self._node("Gemm", inputs, "classifier.out", transB=1)
        self._requantize("classifier.out", "classifier", self._activation("classifier.1"),
                         output=OUTPUT_NAME)

    # -- pieces --------------------------------------------------------------------------

    def _activation(self, module: str) -> tuple[float, int]:
        scale, zero_point = self.state[f"{module}.scale"], self.state[f"{module}.zero_point"]
        return float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])

    def _const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def _requantize(self, x: str, name: str, params: tuple[float, int],
                    output: str | None = None) -> str:
        """x -> QuantizeLinear -> DequantizeLinear: x on the uint8 grid (scale, zero point)."""
        scale, zero_point = params
        if not (math.isfinite(scale) and scale > 0 and 0 <= zero_point <= 255):
            raise RuntimeError(f"{name} has scale {scale} and zero point {zero_point}")
        s = self._const(f"{name}.scale", np.array(scale, np.float32))
        z = self._const(f"{name}.zero_point", np.array(zero_point, np.uint8))
        self._node("QuantizeLinear", [x, s, z], f"{name}.q")
        out = self._node("DequantizeLinear", [f"{name}.q", s, z], output or f"{name}.out")
        self.grid[out] = (float(np.float32(scale)), zero_point)
        return out

    def _weight(self, name: str, weight: torch.Tensor) -> tuple[str, np.ndarray]:
        """An int8 weight and its DequantizeLinear; returns its name and its scale(s)."""
        if not (isinstance(weight, torch.Tensor) and weight.is_quantized
                and weight.dtype == torch.qint8):
            raise TypeError(f"{name} is not a qint8 tensor")
        axis = None
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scale = np.array(weight.q_scale(), np.float32)
            zero = np.array(weight.q_zero_point())
        else:
            axis, self.weight_scheme = weight.q_per_channel_axis(), "per-channel"
            scale = weight.q_per_channel_scales().numpy().astype(np.float32)
            zero = weight.q_per_channel_zero_points().numpy()
        if np.any(zero != 0) or axis not in (None, 0):
            raise RuntimeError(f"{name} is not symmetric per output channel or per tensor")
        values = weight.int_repr().numpy()
        if self.weight_type == "uint8":  # the same numbers: (q + 128) - 128
            values, zero = (values.astype(np.int16) + 128).astype(np.uint8), zero + 128
        dtype = np.uint8 if self.weight_type == "uint8" else np.int8
        q = self._const(f"{name}.q", values)
        s = self._const(f"{name}.scale", scale)
        z = self._const(f"{name}.zero_point", zero.astype(dtype))
        kwargs = {} if axis is None else {"axis": axis}
        return self._node("DequantizeLinear", [q, s, z], name, **kwargs), scale

    def _bias(self, name: str, bias: torch.Tensor, x: str, weight_scale: np.ndarray) -> str:
        """A float bias as int32 on the accumulator's grid (input scale x weight scale)."""
        scale = (np.float32(self.grid[x][0]) * weight_scale).astype(np.float32)
        values = np.clip(np.round(bias.detach().numpy() / scale), -(2**31), 2**31 - 1)
        q = self._const(f"{name}.q", values.astype(np.int32))
        s = self._const(f"{name}.scale", scale)
        z = self._const(f"{name}.zero_point", np.zeros(scale.shape, np.int32))
        kwargs = {} if scale.ndim == 0 else {"axis": 0}
        return self._node("DequantizeLinear", [q, s, z], name, **kwargs)

    def _conv(self, x: str, conv: nn.Conv2d, prefix: str, relu: bool) -> str:
        weight = self.state[f"{prefix}.weight"]
        if tuple(weight.shape) != tuple(conv.weight.shape):
            raise RuntimeError(f"{prefix}.weight has shape {tuple(weight.shape)}, expected "
                               f"{tuple(conv.weight.shape)}")
        w, w_scale = self._weight(f"{prefix}.weight", weight)
        inputs = [x, w]
        if self.state.get(f"{prefix}.bias") is not None:
            inputs.append(self._bias(f"{prefix}.bias", self.state[f"{prefix}.bias"], x, w_scale))
        out = self._node("Conv", inputs, f"{prefix}.conv", kernel_shape=list(conv.kernel_size),
                         strides=list(conv.stride), pads=list(conv.padding) * 2,
                         group=conv.groups)
        if relu:  # torchvision's quantizable model uses ReLU; int8 clamps at 255 * scale
            out = self._node("Relu", [out], f"{prefix}.relu")
        return self._requantize(out, prefix, self._activation(prefix))

    def model(self, shape: tuple[int, int, int], num_classes: int, opset: int) -> Any:
        from onnx import TensorProto, helper

        from .export import INPUT_NAME, OUTPUT_NAME

        graph = helper.make_graph(
            self.nodes, "mobilenetv2",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *shape])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                           ["batch", num_classes])],
            self.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="mobilenetv2")
        proto.ir_version = min(proto.ir_version, 8)
        proto.doc_string = "MobileNetV2, torchvision's int8 weights"
        return proto
