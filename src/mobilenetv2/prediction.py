"""Predict the classes of images: what ``mobilenetv2 predict`` prints, as a function.

:func:`predict` takes any weights file (PyTorch weights in PyTorch; ONNX and ExecuTorch files
in :class:`mobilenetv2.runtime.Predictor`) and image files, folders or images in memory, and
returns the top-k classes of each. DataLoader worker processes decode the next batches while
the model runs; an image that cannot be read gets an ``error`` instead of classes, and the
others are still classified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .runtime import one_line

log = logging.getLogger("mobilenetv2")


def predict(weights: str | os.PathLike[str], images: Any, *, top_k: int = 5,
            batch_size: int = 32, workers: int | None = None,
            device: str = "auto", tta: bool = False,
            probabilities: bool = False, use_ema: bool = False) -> list[dict[str, Any]]:
    """The ``top_k`` classes of each image, most likely first, as ``predict --json`` gives them.

        >>> mobilenetv2.predict("runs/digits/best.safetensors", "photos/")[0]
        {'path': 'photos/a.png', 'top_k': [{'class': '3', 'index': 3, 'probability': 0.97}, ...]}
        >>> mobilenetv2.predict("imagenet", PIL.Image.open("cat.jpg"), top_k=3)

    Args:
        weights: a file (safetensors, torchvision/timm/Keras/walk-through weights, .onnx,
            .ort, .pte) or a tag (``imagenet``).
        images: an image file or a folder (walked, as ``predict`` walks it), a PIL image or an
            HxW / HxWxC uint8 array, or a list of these.
        top_k: classes per image (at most the model's).
        batch_size, workers, device: as ``predict``'s flags (workers: decoding processes,
            default by the number of batches; 0 decodes here).
        tta: the mean of each image's class probabilities and its left-right mirror's
            (test-time augmentation, as fastai's ``tta`` flips; for classes that mirroring does
            not change).
        probabilities: each item also holds ``probabilities``, every class's probability in
            the model's class order (the ``index`` of ``top_k``), for a submission file or an
            average over models.
        use_ema: the EMA weights of a training checkpoint rather than its raw ones (timm's
            ``state_dict_ema``, torchvision's ``model_ema``, our ``checkpoint.pt``'s ``ema``).

    Returns:
        One dict per image, in the order given (a folder's files sorted): ``path`` (None for
        an image in memory) and ``top_k`` (``class``, ``index``, ``probability``), or an empty
        ``top_k`` and the ``error`` that kept the file from being read.

    Raises:
        ValueError, FileNotFoundError: for weights that cannot classify, a path that does not
            exist or a folder without images.
    """
    from .reporting import log_to_stderr_unless_configured

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    given = list(images) if isinstance(images, (list, tuple)) else [images]
    items: list[Any] = []
    with log_to_stderr_unless_configured():
        for item in given:  # folders walked in place, as the command walks them
            items += image_files([item]) if isinstance(item, (str, os.PathLike)) else [item]
        classifier = load_classifier(Path(weights), device, tta=tta, use_ema=use_ema)
        top_k = min(top_k, classifier.num_classes or top_k)
        batches = -(-len(items) // batch_size)
        loader = torch.utils.data.DataLoader(
            ImageFiles(items, classifier.preprocess), batch_size=batch_size,
            num_workers=default_workers(batches) if workers is None else workers,
            collate_fn=collate_images, pin_memory=classifier.device.type == "cuda")
        return [item for batch in classify(loader, classifier, items, top_k, probabilities)
                for item in batch]


def default_workers(batches: int) -> int:
    """Decoding processes: one per CPU this process may use, at most 8; none for a single
    batch (a worker would decode it while this process waits).

    Unlike the loaders of training and ``eval``, these keep no CPU back for the model: a worker
    sleeps once its next batches are ready, so a spare one costs nothing where the model is the
    slow part, and where decoding is (a 12-megapixel JPEG takes about 110 ms to decode and
    resize on one core of a 2-CPU machine, 8x what ``mobilenet_v2_100`` needs to classify it)
    every CPU decodes.

    Where workers start with ``spawn`` (Windows, macOS), each imports torch again before its
    first batch, seconds that a few batches do not repay: there, one worker per four batches.
    """
    import torch.multiprocessing

    from .runtime import usable_cpus
    from .train import workers_would_rerun_the_script

    cpus = usable_cpus()
    if batches <= 1 or workers_would_rerun_the_script():
        return 0
    if torch.multiprocessing.get_start_method() != "fork":
        return min(8, cpus, batches // 4)
    return min(8, cpus)


def image_files(paths: list[Path]) -> list[Path]:
    """The image files named, and those in the folders named (walked recursively, sorted).

    A folder's files that are not images by their suffix (a GIF, notes) are left out with one
    warning that says how many, as training leaves them out; a file named is taken whatever it
    is. Hidden and system files (macOS' ._ files, @eaDir) are left out without a word.

    Raises:
        FileNotFoundError: for a path that does not exist or a folder that holds no images.
    """
    from . import runtime

    # The walk of the torch-free runtime's command, which takes the same arguments.
    return [Path(f) for f in runtime.image_files(
        paths, warn=lambda line: log.warning("warning: %s", line))]


# --------------------------------------------------------------------------------------------
# Weights -> a classifier


@dataclass(frozen=True)
class Classifier:
    """What predict needs of any weights file.

    Attributes:
        preprocess: an image file -> its (C, H, W) tensor or array; picklable (a worker
            process may be spawned, not forked), so it holds the preprocessing, not the model.
        infer: a (N, C, H, W) batch -> (N, classes) outputs as a NumPy array.
        class_names: the stored names, or None.
        probabilities: whether the outputs are probabilities already (a model that ends in a
            softmax), not logits.
        num_classes: the model's classes, where it says.
        device: where ``infer`` runs; the batches are pinned for a GPU.
        width_axis: the images' width in a batch: -1 for (N, C, H, W), 2 for the uint8
            (N, H, W, C) pixels of a pixel-input export.
    """

    preprocess: Callable[[Any], Any]
    infer: Callable[[torch.Tensor], Any]
    class_names: list[str] | None
    probabilities: bool
    num_classes: int | None
    device: torch.device
    width_axis: int = -1


def load_classifier(path: Path, device_name: str, tta: bool = False,
                    use_ema: bool = False) -> Classifier:
    """Any weights file as a :class:`Classifier`: PyTorch weights with the evaluation
    transform of :mod:`mobilenetv2.data`, ONNX and ExecuTorch files with the NumPy preprocessing
    of :mod:`mobilenetv2.runtime` (what their users get from ``Predictor.predict``). ``tta``:
    its outputs are the mean probabilities of each image and its mirror
    (:func:`mobilenetv2.evaluation.with_flip_tta`). ``use_ema``: a training checkpoint's
    EMA weights."""
    classifier = _load_classifier(path, device_name, use_ema)
    if not tta:
        return classifier
    from .evaluation import with_flip_tta

    mean = with_flip_tta(classifier.infer, classifier.probabilities, classifier.width_axis)
    return replace(classifier, infer=lambda images: mean(images).numpy(), probabilities=True)


def _load_classifier(path: Path, device_name: str, use_ema: bool = False) -> Classifier:
    from .data import eval_transform
    from .evaluation import load_for_inference, open_exported_classifier
    from .runtime import preprocess_image, runs_in_runtime
    from .train import pick_device

    if runs_in_runtime(path) and not use_ema:  # (load_for_inference refuses both)
        predictor, classes = open_exported_classifier(path)
        return Classifier(preprocess=partial(preprocess_image, meta=predictor.meta),
                          infer=lambda images: predictor.run(images.numpy()),
                          class_names=predictor.meta.get("class_names"),
                          probabilities=predictor.meta.get("output") == "probabilities",
                          num_classes=classes,
                          device=torch.device("cpu"),
                          width_axis=2 if predictor.pixel_input else -1)
    device = pick_device(device_name, mps=True)
    model, meta = load_for_inference(path, device, use_ema=use_ema)

    def infer(images: torch.Tensor):
        with torch.inference_mode():
            return model(images.to(device, non_blocking=True)).float().cpu().numpy()

    return Classifier(preprocess=partial(_open_transformed, transform=eval_transform(meta),
                                         channels=int(meta["input_size"][0])),
                      infer=infer, class_names=meta.get("class_names"),
                      probabilities=meta.get("output") == "probabilities",
                      num_classes=meta.get("num_classes"), device=device)


def _open_transformed(image: Any, transform: Callable[[Any], Any], channels: int) -> Any:
    """A file opened and transformed; an image in memory (PIL, uint8 array) transformed."""
    from .data import open_image

    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, channels)
    return transform(image)


# --------------------------------------------------------------------------------------------
# Files -> batches -> predictions


class ImageFiles(Dataset):
    """Image files (or images in memory), each preprocessed on its own: ``(index, image,
    None)``, or ``(index, None, why)`` for one that cannot be read, so that a bad file costs
    its own prediction, not the run's."""

    def __init__(self, files: Sequence[Any], preprocess: Callable[[Any], Any]) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = self.preprocess(self.files[index])
        except (ValueError, OSError) as e:  # unreadable, or gone since it was listed
            return index, None, one_line(e)
        return index, torch.as_tensor(image), None


def collate_images(samples: list[tuple[int, torch.Tensor | None, str | None]]):
    """A batch of :class:`ImageFiles` samples -> ``(indices, images, errors)``: the indices of
    the readable images, their (N, C, H, W) tensor (None when there are none) and
    ``{index: why}`` for the others."""
    indices = [index for index, image, _ in samples if image is not None]
    images = torch.stack([image for _, image, _ in samples if image is not None]) if indices else None
    errors = {index: why for index, image, why in samples if image is None}
    return indices, images, errors


def classify(loader: Any, classifier: Classifier, files: Sequence[Any], top_k: int,
             probabilities: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Each batch's predictions, in the order of ``files``: ``{"path", "top_k": [{"class",
    "index", "probability"}, ...]}``, most likely first, or ``{"path", "top_k": [], "error"}``
    for an image that could not be read (``path`` None for an image in memory).
    ``probabilities``: each item also holds ``"probabilities"``, every class's in the model's
    order (empty for an image that could not be read)."""
    from .data import human_class_names
    from .runtime import class_name, softmax, top_classes

    def path(index: int) -> str | None:
        return str(files[index]) if isinstance(files[index], (str, os.PathLike)) else None

    names = human_class_names(classifier.class_names)
    for indices, images, errors in loader:
        probs = []
        if images is not None:
            outputs = np.asarray(classifier.infer(images), dtype=np.float32)
            probs = outputs if classifier.probabilities else softmax(outputs)
        ranked = [] if images is None else top_classes(probs, top_k, True)
        top = dict(zip(indices, ranked, strict=True))
        every = dict(zip(indices, probs, strict=True))
        items: list[dict[str, Any]] = []
        for index in sorted([*indices, *errors]):
            if index in errors:
                item = {"path": path(index), "top_k": [], "error": errors[index]}
            else:
                item = {"path": path(index), "top_k": [
                    {"class": class_name(names, i), "index": i, "probability": p}
                    for i, p in top[index]]}
            if probabilities:
                item["probabilities"] = [float(p) for p in every.get(index, [])]
            items.append(item)
        yield items


def every_class(classifier: Classifier, weights: Path) -> list[str]:
    """The names of all the model's classes, in its order (``class_<i>`` where it stores
    none), for ``--probabilities``.

    Raises:
        ValueError: the weights (an export whose class dimension is left open, with no class
            names) do not say how many classes there are.
    """
    from .data import human_class_names
    from .runtime import class_name

    count = classifier.num_classes or len(classifier.class_names or [])
    if not count:
        raise ValueError(f"{weights} does not say how many classes it has, so there are no "
                         f"columns to give every class's probability: leave out --probabilities")
    names = human_class_names(classifier.class_names)  # as the rows name them
    return [class_name(names, i) for i in range(count)]


