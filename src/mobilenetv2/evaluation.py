"""Evaluate weights on a dataset: what ``mobilenetv2 eval`` prints, as a function.

:func:`evaluate` takes any weights file ``load_model`` reads (and ONNX / ExecuTorch exports)
and any data ``train`` takes, prepares the images as the weights were trained to see them, and
returns top-1, top-5, loss and throughput. Also here: opening a file for inference, shared by
``eval`` and ``predict``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def evaluate(weights: str | Path, data: str | Path | None = None, *, data_dir: str | Path = "data",
             batch_size: int = 256, workers: int | None = None, device: str = "auto",
             small_input: bool | None = None, strict: bool = False,
             resolution: int | None = None, crop_pct: float | None = None,
             interpolation: str | None = None, val_split: float | None = None,
             per_class: bool = False, only_data_classes: bool = False,
             tta: bool = False, use_ema: bool = False) -> dict[str, Any]:
    """Top-1 and top-5 (percent), mean loss, images and img/s of ``weights`` on ``data``'s
    validation split, as ``mobilenetv2 eval --json`` prints them.

        >>> mobilenetv2.evaluate("runs/digits/best.safetensors")["top1"]   # its own test split
        >>> mobilenetv2.evaluate("imagenet", "/data/imagenet", batch_size=128)

    Args:
        weights: a file (safetensors, torchvision/timm/Keras/walk-through weights, .onnx,
            .ort, .pte) or a tag (``imagenet``).
        data: ``digits``, ``cifar10``, ``cifar100``, a folder with ``val/<class>/`` or a folder
            of class folders; default: the built-in dataset the weights were trained on.
        resolution, crop_pct, interpolation: the preprocessing, default the weights' own (as
            timm's validate.py ``--img-size``, ``--crop-pct``, ``--interpolation``).
        val_split: for a folder of class folders, the held-out fraction to score (default: the
            one the weights were trained with, when it is that folder; 0: every image).
        per_class: add ``per_class`` (images, top-1, precision, most confused class of each)
            and the ``confusion`` matrix (row: true class, column: prediction).
        only_data_classes: score only the outputs of the data's classes (ImageNet-A/-R style).
        tta: score the mean of each image's class probabilities and its left-right mirror's
            (test-time augmentation; the loss is that mean's).
        use_ema: the EMA weights of a training checkpoint rather than its raw ones (timm's
            ``state_dict_ema``, torchvision's ``model_ema``, our ``checkpoint.pt``'s ``ema``).
        The others are as ``eval``'s flags of the same names.

    Returns ``unreadable`` too when images were skipped (``strict=True`` raises instead).

    Raises:
        ValueError, FileNotFoundError: for weights or data that cannot be evaluated.
    """
    from .reporting import log_to_stderr_unless_configured

    with log_to_stderr_unless_configured():
        return evaluate_weights(
            weights, data, data_dir=data_dir, batch_size=batch_size, workers=workers,
            device=device, small_input=small_input, strict=strict, resolution=resolution,
            crop_pct=crop_pct, interpolation=interpolation, val_split=val_split,
            per_class=per_class, only_data_classes=only_data_classes, tta=tta,
            use_ema=use_ema)[0]


def evaluate_weights(weights: str | Path, data: str | Path | None, *, data_dir: str | Path,
                     batch_size: int, workers: int | None, device: str,
                     small_input: bool | None, strict: bool, resolution: int | None,
                     crop_pct: float | None, interpolation: str | None,
                     val_split: float | None, per_class: bool,
                     only_data_classes: bool, tta: bool = False,
                     use_ema: bool = False) -> tuple[dict[str, Any], str]:
    """:func:`evaluate`'s metrics, and the data they were measured on (the default named)."""
    from torch import nn

    from .config import check_augments
    from .data import (
        ShardedBatchSampler,
        build_datasets,
        folder_layout,
        folder_name,
        human_class_names,
        match_classes,
    )
    from .engine import evaluate as run_model
    from .engine import per_class_metrics
    from .reporting import Progress
    from .train import close_loaders, default_workers, make_loader, pick_device, plural

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    weights = Path(weights)
    torch_device = pick_device(device)
    model, meta = load_for_inference(weights, torch_device, small_input=small_input,
                                     use_ema=use_ema)
    data = str(data) if data is not None else default_eval_data(weights, meta)
    # The preprocessing: the weights' own, where the caller names none.
    channels, size = int(meta["input_size"][0]), int(meta["input_size"][-1])
    resample = interpolation or meta.get("interpolation")
    crop = crop_pct or meta.get("crop_pct")
    if crop_pct is not None:
        check_augments(resample or "bilinear", crop_pct, None, 0.0)
    if resolution is not None and resolution != size:
        if not isinstance(model, nn.Module):
            raise ValueError(f"{weights} was exported for {size}x{size} inputs and takes no "
                             f"other size: evaluate it without --resolution, or export the "
                             f"weights again with --resolution {resolution}")
        from .export import input_shape

        size = input_shape(model, resolution)[-1]  # the seed variant: its own only
    if (resolution, crop_pct, interpolation) != (None, None, None):
        log.info("evaluating at %dx%d, %s, crop_pct %g (image files above 64 px)", size, size,
                 resample or "bilinear", crop or 0.875)
    trained_on = meta.get("dataset")
    if (val_split is None and folder_layout(data) == "classes" and meta.get("val_split")
            and trained_on in (folder_name(data), Path(data).name, ".", "..", None)):
        # The folder training split (by its real name; files of earlier versions may record
        # "." for --data ., or no name): score what it held out, not what it learnt. Any other
        # folder of class folders is a test set: every image counts.
        val_split = float(meta["val_split"])
        log.info("%s is the folder %s was trained on: evaluating the images training held out "
                 "(--val-split 0: every image)", data, weights.name)
    bundle = build_datasets(data, resolution=size, root=data_dir,
                            mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                            in_channels=channels, interpolation=resample, crop_pct=crop,
                            strict=strict, val_only=True, val_split=val_split)
    classes = meta.get("num_classes") or len(meta.get("class_names") or []) or bundle.num_classes
    match = match_classes(meta.get("class_names"), classes, bundle.class_names,
                          weights=weights, data=data, folders=folder_layout(data) is not None)
    names = human_class_names(list(meta.get("class_names") or bundle.class_names))
    probabilities = meta.get("output") == "probabilities"
    if tta:
        model, probabilities = with_flip_tta(model, probabilities), True
    label_map, rows = None, None  # rows: the model's classes the data holds, when not all
    if match.indices is not None:
        log.info("%s: its %s paired with %s's %d by %s", data,
                 plural(bundle.num_classes, "class", "classes"), weights, classes, match.how)
        if only_data_classes:
            model = only_classes(model, match.indices, probabilities)
            names, classes = [names[i] for i in match.indices], bundle.num_classes
        else:
            label_map, rows = match.indices, match.indices
    elif only_data_classes:
        log.info("--only-data-classes changes nothing: %s holds all the classes of %s",
                 data, weights)
    if workers is None:
        workers = default_workers(bundle.val, torch_device, batches=-(-len(bundle.val) // batch_size))
    loader = make_loader(bundle.val, ShardedBatchSampler(len(bundle.val), batch_size, shuffle=False,
                                                         drop_small=False), workers, torch_device)
    # A bar on a terminal (ImageNet's 50,000 images take minutes on a CPU), as predict's;
    # nothing in a log or a pipe, where the result line is all there is to read.
    progress = Progress(len(loader), "eval", enabled=sys.stderr.isatty())
    try:
        metrics = run_model(model, loader, device=torch_device,
                            confusion_classes=classes if per_class else 0,
                            probabilities=probabilities, label_map=label_map, progress=progress)
    finally:
        progress.close()
        close_loaders(loader)
    unreadable = metrics.pop("skipped")
    if unreadable:  # each was named as it was read; the count goes with the result
        metrics["unreadable"] = unreadable
    if per_class:
        metrics["per_class"] = per_class_metrics(metrics["confusion"], names)
        metrics["confusion_columns"] = names
        if rows is not None:  # a row per class of the data; columns: all of the model's classes
            metrics["per_class"] = [metrics["per_class"][i] for i in rows]
            metrics["confusion"] = [metrics["confusion"][i] for i in rows]
    return metrics, data


def default_eval_data(weights: Path, meta: dict) -> str:
    """The built-in dataset the weights were trained on, as their metadata names it; digits
    for files that name none (exports of earlier versions). Weights trained on a folder, or
    on ImageNet, need --data."""
    dataset = meta.get("dataset")
    if dataset is None and meta.get("num_classes") != 1000:
        return "digits"
    # A folder may be named digits or cifar10 too: the built-in data has 1 channel (digits)
    # or 3, and its number of classes.
    channels, classes = (meta.get("input_size") or [None])[0], meta.get("num_classes")
    builtin = {"digits": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100)}
    if dataset in builtin and (channels, classes) == builtin[dataset]:
        return dataset
    trained_on = f" (they were trained on {dataset})" if dataset else ""
    raise ValueError(f"pass --data: the images to evaluate {weights} on{trained_on}, e.g. "
                     "a folder with val/<class>/ or a folder of class folders")


def only_classes(model, indices: list[int], probabilities: bool):
    """``model`` answering among the given classes only (its outputs at ``indices``, in that
    order); probabilities are renormalised over them."""
    import torch

    index = torch.tensor(indices)

    def run(images: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(model(images))
        out = out.index_select(1, index.to(out.device))
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-30) if probabilities else out

    return run


def with_flip_tta(model, probabilities: bool, width_axis: int = -1):
    """``model`` answering with the mean of its class probabilities for each image and for
    the image mirrored left to right (test-time augmentation, fastai's ``tta`` flip): always
    probabilities, whatever ``model`` returns (``probabilities``: it ends in a softmax).

    ``width_axis``: the batch's width, -1 for (N, C, H, W) and 2 for the uint8 (N, H, W, C)
    pixels of a pixel-input export. Mirroring suits images whose classes survive it (photos
    of animals, leaves, scans); not text, digits or road signs that point one way.
    """
    import torch

    def run(images: torch.Tensor) -> torch.Tensor:
        total = 0
        for view in (images, images.flip(width_axis)):
            out = torch.as_tensor(model(view)).float()
            total = total + (out if probabilities else out.softmax(dim=1))
        return total / 2

    return run


def ema_of_export_error(path: Path) -> ValueError:
    """``--use-ema`` given an ONNX or ExecuTorch file, which holds one set of weights."""
    return ValueError(f"{path} is an exported model, one set of weights: drop --use-ema "
                      "(export the EMA weights with export --use-ema)")


def load_for_inference(path: Path, device, small_input: bool | None = None,
                       use_ema: bool = False):
    """(callable from an image batch to logits, preprocessing meta) for any weights file
    (``use_ema``: a training checkpoint's EMA weights)."""
    from .runtime import runs_in_runtime
    from .weights import load_model

    if runs_in_runtime(path):
        if use_ema:
            raise ema_of_export_error(path)
        return _onnx_runner(path)
    overrides = {} if small_input is None else {"small_input": small_input}
    model = load_model(path, use_ema=use_ema, **overrides).to(device).eval()
    if model.config.get("features_only"):
        raise not_a_classifier(path)
    if model.config.get("arch") == "mobilenet_v2":
        model.to(memory_format=__import__("torch").channels_last)
    meta = dict(model.meta, num_classes=getattr(model, "num_classes", None))
    if model.config.get("return_probs"):  # the walk-through's softmax output, as exports say it
        meta["output"] = "probabilities"
    return model, meta


def not_a_classifier(path: Path) -> ValueError:
    return ValueError(f"{path} is a feature extractor (features_only): it returns feature maps, "
                      "not classes, so it cannot be evaluated or predict classes")


def open_exported_classifier(path: Path):
    """(Predictor, its class count or None) for an ONNX or ExecuTorch file that classifies."""
    from .runtime import Predictor

    if path.is_dir():  # named like a model (x.onnx) but a folder
        raise IsADirectoryError(f"{path} is a folder: pass the model file in it")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    predictor = Predictor(str(path))
    if predictor.is_feature_extractor:
        raise not_a_classifier(path)
    outputs = predictor.num_classes  # an int, unless the export left the dimension symbolic
    return predictor, outputs if isinstance(outputs, int) else None


def _onnx_runner(path: Path):
    import numpy as np
    import torch

    predictor, classes = open_exported_classifier(path)

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(predictor.run(images.cpu().numpy())))

    meta = dict(predictor.meta, num_classes=classes)
    if not meta.get("class_names") and classes == 1000:
        from .weights import imagenet_categories  # as for peers' .pth files: ImageNet-1k's

        meta["class_names"] = imagenet_categories()
    return run, meta
