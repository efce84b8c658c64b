"""int8 inference: ONNX Runtime static quantization, PyTorch int8, and quantization-aware tuning.

The only module of the package that touches quantization APIs.

* :func:`quantize_onnx` -- post-training static quantization for ONNX Runtime: ORT's
  pre-processing (shape inference, graph optimisation), then ``quantize_static`` in QDQ format
  with per-channel int8 weights and uint8 activations whose ranges are calibrated on real images
  (MinMax, Entropy or Percentile). uint8 activations x int8 weights (U8S8) is the combination
  x86 kernels run fastest: every Conv and the residual Adds become QLinearConv / QLinearAdd in
  NHWC. With int8 activations (S8S8), ORT 1.32 on AVX2 leaves the per-channel depthwise convs in
  float and is 1.3-1.5x slower. On x86 CPUs without VNNI the weights use 7 bits
  (``reduce_range``), because the AVX2 u8 x s8 multiply-add saturates in int16 otherwise.
* :func:`quantize_torch` -- PyTorch's own int8 (FX graph mode, fused Conv-BN(-ReLU), the x86
  engine), what ``bench``'s "torch_int8" backend runs. torchao (the successor of these APIs) is
  not a dependency; torch.ao.quantization still works in torch 2.14 but warns that it is
  deprecated, and those warnings are silenced here.
* :func:`quantize_from_data` -- the ``mobilenetv2 quantize`` command: calibrate on a dataset,
  optionally fine-tune with fake quantization first (QAT), write the int8 ONNX file, and report
  fp32 and int8 top-1 on the validation split.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .weights import PathLike, atomic_write

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class QuantizeConfig:
    """Post-training static quantization settings.

    Args:
        method: activation calibration: ``minmax`` (the observed range), ``entropy`` (the
            range that minimises the KL divergence of the histogram) or ``percentile``
            (the 99.999th percentile of |x|).
        calibration_batches: batches of real images to calibrate on.
        batch_size: images per calibration batch.
        per_channel: one weight scale per output channel (needed by depthwise convolutions,
            whose channels have very different ranges).
        activation_type: ``uint8`` (fastest on x86) or ``int8``.
        weight_type: ``int8`` or ``uint8``.
        reduce_range: 7-bit weights; ``None`` decides by the CPU (on for x86 without VNNI).
    """

    method: str = "minmax"
    calibration_batches: int = 8
    batch_size: int = 32
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; choose one of: "
                             f"{', '.join(METHODS)}")
        if self.calibration_batches < 1 or self.batch_size < 1:
            raise ValueError("calibration_batches and batch_size must be >= 1")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in QUANT_TYPES:
                raise ValueError(f"{name} must be one of {', '.join(QUANT_TYPES)}")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has the VNNI int8 dot-product instructions (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


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
            are nothing like real ones.
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

    config = config or QuantizeConfig()
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
    if not batches:
        raise ValueError("quantization needs at least one batch of calibration images")
    input_name = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]
                                      ).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    reduce_range = (not cpu_has_vnni()) if config.reduce_range is None else config.reduce_range
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
                per_channel=config.per_channel, reduce_range=reduce_range,
                activation_type=types[config.activation_type],
                weight_type=types[config.weight_type], calibrate_method=methods[config.method],
            )
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        for key, value in {**metadata, "quantization": _describe(config, reduce_range)}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        atomic_write(out_path, lambda path: onnx.save_model(model, path))
    return Path(out_path)


def _describe(config: QuantizeConfig, reduce_range: bool) -> str:
    import json

    return json.dumps({"format": "QDQ", "method": config.method, "per_channel": config.per_channel,
                       "activations": config.activation_type, "weights": config.weight_type,
                       "reduce_range": reduce_range})


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
) -> dict[str, Any]:
    """The ``mobilenetv2 quantize`` command: weights + data -> int8 ONNX model and its accuracy.

    Calibration images are ``calibration_batches * batch_size`` training images (a seeded
    sample, without training augmentation) brought to the model's input size and normalised
    with the model's statistics. fp32 (ONNX Runtime on the fp32 export of ``weights``) and int8
    top-1 are measured on the validation split, with the share of images on which they agree.

    Args:
        weights: a weights file load_model reads.
        data: ``digits``, ``cifar10``, ``cifar100`` or an image folder (see
            :func:`mobilenetv2.data.build_datasets`).
        out_path: the int8 ``.onnx`` file to write.
        config: quantization settings.
        data_dir: where CIFAR lives.
        qat: fine-tune with fake quantization (:func:`qat_finetune`) before quantizing.
        qat_epochs, qat_lr: QAT epochs and learning rate.
        max_eval_images: evaluate on at most this many validation images.
        fp32_path: also keep the (verified) fp32 ONNX export there; by default it is temporary.

    Returns:
        A JSON-able report: ``path``, ``method``, ``calibration_images``, ``qat``,
        ``eval_images``, ``top1_fp32``, ``top1_int8``, ``agreement_int8`` (percent of images
        where int8 and fp32 predict the same class) and, with QAT, ``top1_fp32_qat`` (the
        fine-tuned float model) and ``top1_int8_ptq`` (post-training int8 without QAT).

    Raises:
        ValueError, FileNotFoundError: for weights, data or an output path that cannot be used.
    """
    from .data import build_datasets
    from .export import ExportConfig, export_model, input_shape
    from .runtime import channel_stats
    from .weights import check_output_file, load_model

    config = config or QuantizeConfig()
    out_path = Path(out_path)
    check_output_file(out_path)
    if fp32_path is not None:
        check_output_file(Path(fp32_path))
    model = load_model(weights).eval()
    channels, _, size = input_shape(model, None)
    # Prepared as inference will prepare them: the model's statistics, resampling and crop.
    preprocessing = {"interpolation": model.meta.get("interpolation"),
                     "crop_pct": model.meta.get("crop_pct")}
    bundle = build_datasets(
        data, resolution=size, root=data_dir, in_channels=channels,
        mean=tuple(channel_stats(model.meta["mean"], channels)),
        std=tuple(channel_stats(model.meta["std"], channels)), **preprocessing,
    )
    if bundle.num_classes != getattr(model, "num_classes", None):
        raise ValueError(f"{weights} has {getattr(model, 'num_classes', '?')} classes but "
                         f"{data} has {bundle.num_classes}: quantize with the data it was "
                         "trained on")
    count = config.calibration_batches * config.batch_size
    plain = build_datasets(data, resolution=size, root=data_dir, in_channels=channels,
                           mean=bundle.mean, std=bundle.std, augment=False, **preprocessing)
    images = calibration_images(plain.train, count)
    seven_bit = (not cpu_has_vnni()) if config.reduce_range is None else config.reduce_range
    tuned = qat_finetune(model, bundle, epochs=qat_epochs, lr=qat_lr, batch_size=config.batch_size,
                         seven_bit_weights=seven_bit) if qat else model
    with tempfile.TemporaryDirectory(prefix="mobilenetv2-quant-") as tmp:
        fp32 = Path(fp32_path) if fp32_path is not None else Path(tmp) / "fp32.onnx"
        tuned_fp32 = Path(tmp) / "tuned.onnx"
        export_model(model, fp32, ExportConfig())
        models: dict[str, PathLike] = {"fp32": fp32, "int8": out_path}
        if qat:  # the post-training int8 model too, to show what QAT bought
            export_model(tuned, tuned_fp32, ExportConfig())
            models |= {"fp32_qat": tuned_fp32, "int8_ptq": Path(tmp) / "ptq.onnx"}
            quantize_onnx(fp32, models["int8_ptq"], images.split(config.batch_size), config)
        quantize_onnx(tuned_fp32 if qat else fp32, out_path, images.split(config.batch_size),
                      config)
        accuracy = compare_onnx(models, bundle.val, max_images=max_eval_images)
    return {"path": str(out_path), "method": config.method, "calibration_images": len(images),
            "qat": qat, **accuracy}


def describe_report(report: dict[str, Any], data: str) -> str:
    """One line for people: what :func:`quantize_from_data` wrote and the accuracy of each."""
    return (f"wrote {report['path']} (int8 {report['method']}, {report['calibration_images']} "
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
    """Top-1 of ONNX models on a labelled dataset, and how often each agrees with the first.

    Args:
        models: name -> ONNX file, e.g. ``{"fp32": ..., "int8": ...}``; the first is the
            reference for the agreement.
        dataset: yields (preprocessed CHW tensor, label).
        max_images: use at most this many images (the first ones).

    Returns:
        ``{"eval_images": n, "top1_<name>": %, ..., "agreement_<name>": %, ...}``.
    """
    from .imagefolder import collate_skipping
    from .runtime import Predictor

    predictors = {name: Predictor(path) for name, path in models.items()}
    reference = next(iter(predictors))
    subset = dataset
    if max_images is not None and max_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(max_images))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate_skipping)
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
