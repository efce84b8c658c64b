"""Datasets and transforms: the embedded digits, CIFAR-10/100 and image folders.

``build_datasets(spec)`` turns a ``--data`` value into train and validation datasets plus what
the model must remember about them (classes, normalisation, input size):

* ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, no
  download), upsampled to 16x16 and split 80/20, stratified, with ``random_state=0``.
* ``cifar10`` / ``cifar100``: torchvision's datasets under ``root`` (``download=True`` fetches).
* a folder ``PATH`` with ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` images.
* a folder ``PATH`` of class folders ``PATH/<class>/*``, with ``val_split`` of each class held
  out for validation (default 20%; see :meth:`SafeImageFolder.split`).

Training augmentations draw their randomness from a generator seeded by (seed, epoch, index),
so an example is augmented the same way whatever the number of processes or workers, and a
resumed run replays the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .config import check_augments
from .model import IMAGENET_MEAN, IMAGENET_STD
from .runtime import (
    IMAGE_EXTENSIONS,
    image_from_array,
    missing_image,
    resize_center_crop,
    to_mode,
    unreadable_image,
)

log = logging.getLogger(__name__)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
MIN_RESOLUTION = 8  # the smallest --resolution train takes (summary counts from it too)
DEFAULT_VAL_SPLIT = 0.2  # held out of a folder of class folders that has no val/
_SPLITS_SAID: set[tuple[str, int, float]] = set()
DIGITS_RESOLUTION = 16  # 8x8 digits upsampled 2x: a training step costs 3.6x less than at 32x32
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class DataBundle:
    """Train and validation sets and what a model trained on them must know."""

    name: str
    train: Dataset
    val: Dataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    resolution: int  # the training size
    small_input: bool  # whether the images are small enough to want the small_input model
    meta: dict[str, Any] = field(default_factory=dict)
    val_resolution: int | None = None  # the evaluation (and inference) size; default: resolution

    def __post_init__(self) -> None:
        if self.val_resolution is None:
            self.val_resolution = self.resolution

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def model_meta(self) -> dict[str, Any]:
        """The preprocessing a model trained on this data needs, for ``model.meta``."""
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": [self.in_channels, self.val_resolution, self.val_resolution],
            "class_names": list(self.class_names),
            "dataset": self.name,
            **self.meta,
        }


class SeededAugment(Dataset):
    """Applies ``transform`` with randomness fixed by (seed, epoch, index).

    Call :meth:`set_epoch` at the start of each epoch, as with a DistributedSampler. An index
    ``i + r * len(dataset)`` is copy ``r`` of example ``i`` (see ``ShardedBatchSampler``'s
    ``repeats``): the same image and label, augmented differently.
    """

    repeatable = True  # each copy of an example is augmented afresh
    # The epoch lives in shared memory: a persistent DataLoader worker holds a copy of this
    # dataset made when it started, and reads there the epoch set since. (A plain attribute
    # left every epoch in the workers augmented as the first.)
    epoch_in_shared_memory = True

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor], seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        copy, index = divmod(index, len(self.dataset))  # type: ignore[arg-type]
        image, label = self.dataset[index]
        if image is None:  # an unreadable file, dropped by collate_skipping
            return image, label
        # A distinct, reproducible stream per example, copy and epoch (splitmix-style mixing).
        key = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        if copy:
            key = key * 1_009 + copy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key % (2**63))
            return self.transform(image), label


class BatchMix:
    """MixUp and CutMix on a training batch, as torchvision's reference scripts apply them.

    Each batch is mixed with itself shifted by one (torchvision's ``v2.MixUp`` / ``v2.CutMix``);
    with both alphas set, each batch takes one of the two at random. Targets become class
    probabilities. The randomness depends only on (seed, epoch, step), so a resumed run mixes
    as an uninterrupted one; under torchrun each process mixes its own share of the batch.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 seed: int = 0) -> None:
        from torchvision.transforms import v2

        if mixup_alpha < 0 or cutmix_alpha < 0 or not mixup_alpha + cutmix_alpha > 0:
            raise ValueError("--mixup-alpha and --cutmix-alpha must be >= 0, one of them > 0")
        mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha else []) + (
            [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha else [])
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
        self.seed = seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = (torch.channels_last if images.is_contiguous(memory_format=torch.channels_last)
                         and not images.is_contiguous() else torch.contiguous_format)
        with torch.random.fork_rng(devices=[]):  # the draws are on the CPU whatever the device
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + step)
            images, targets = self.mix(images, labels)
        return images.contiguous(memory_format=memory_format), targets


class TensorImages(Dataset):
    """In-memory float images (N, C, H, W) with integer labels."""

    in_memory = True  # nothing for DataLoader worker processes to do

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class AffineAugmentedImages(Dataset):
    """In-memory images with a fresh random affine warp per example each epoch.

    The whole epoch is warped in one batched ``grid_sample`` at :meth:`set_epoch` (milliseconds
    for the digits), instead of thousands of tiny per-image calls; the warp of each example
    depends only on (seed, epoch, index). Rotations up to 10 degrees, shifts up to 10%, scale
    0.9-1.1; no flips, since a mirrored 2 is no longer a 2.
    """

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 normalize: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> None:
        self.images, self.labels, self.normalize, self.seed = images, labels, normalize, seed
        self.epoch_images = self.normalize(images)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        import torch.nn.functional as F

        n = len(self.labels)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
        scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2  # grid units: 2 = full width
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(self.images.shape), align_corners=False)
        warped = F.grid_sample(self.images, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        self.epoch_images = self.normalize(warped)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.epoch_images[index], int(self.labels[index])


def dataset_labels(dataset: Dataset) -> list[int]:
    """Every example's class index, read without loading an image: from ``targets`` (torchvision's
    datasets, image folders) or ``labels`` (the digits), through the wrappers that augment."""
    while True:
        for name in ("targets", "labels"):
            found = getattr(dataset, name, None)
            if found is not None:
                return [int(label) for label in found]
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            raise TypeError(f"cannot read the labels of a {type(dataset).__name__} without its images")
        dataset = inner


def data_fingerprint(dataset: Dataset, root: str | Path) -> dict[str, Any]:
    """What identifies the examples of ``dataset``, for a run's records: their number and a
    SHA-256 of the file list of an image folder (each file's path relative to ``root`` and its
    class index, in order: a file added, removed, renamed or moved to another class changes
    it; its contents do not, which would mean reading every image), of CIFAR's pixels and
    labels, or of the digits' labels (the split; the images are scikit-learn's own)."""
    import hashlib

    digest = hashlib.sha256()
    while True:
        samples = getattr(dataset, "samples", None)
        if samples is not None:
            prefix = os.path.join(os.path.abspath(root), "")  # (string work: no call per file)
            for path, label in samples:
                path = os.path.abspath(path)
                relative = path[len(prefix):] if path.startswith(prefix) else path
                digest.update(f"{label}\t{relative.replace(os.sep, '/')}\n".encode(
                    "utf-8", "surrogateescape"))
            return {"images": len(samples), "sha256": digest.hexdigest()}
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = getattr(dataset, "labels", None)
        if labels is not None:
            pixels = getattr(dataset, "data", None)  # torchvision's CIFAR: uint8 (N, 32, 32, 3)
            if pixels is not None:
                digest.update(torch.as_tensor(pixels).contiguous().numpy())
            digest.update(torch.as_tensor(labels, dtype=torch.int64).numpy().tobytes())
            return {"images": len(labels), "sha256": digest.hexdigest()}
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            raise TypeError(f"cannot fingerprint a {type(dataset).__name__}")
        dataset = inner


def build_datasets(
    spec: str,
    *,
    resolution: int | None = None,
    val_resolution: int | None = None,
    root: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    in_channels: int | None = None,
    strict: bool = False,
    augment: bool = True,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    auto_augment: str | None = None,
    random_erase: float = 0.0,
    val_only: bool = False,
    val_split: float | None = None,
) -> DataBundle:
    """Train and validation datasets for a ``--data`` value.

    Args:
        spec: ``digits``, ``cifar10``, ``cifar100``, a folder with ``train/`` and ``val/``, or
            a folder of class folders.
        resolution: training and evaluation size (default: 32 for digits and CIFAR, 224 for
            folders).
        val_resolution: a different evaluation size (FixRes: train smaller than you test).
        root: where CIFAR lives (or is downloaded to).
        download: fetch CIFAR if it is missing (needs internet).
        seed: seeds the training augmentations (see :class:`SeededAugment`).
        mean, std: normalisation to use instead of the dataset's, e.g. a trained model's.
        in_channels: 1 or 3 to force grayscale or RGB images (default: the dataset's own).
        strict: fail on an unreadable image in a folder instead of skipping it.
        augment: apply the training augmentations to ``train``; without, the training images
            are prepared as for evaluation (for int8 calibration, say).
        interpolation: how resizes resample (:data:`mobilenetv2.config.INTERPOLATIONS`; default bilinear).
        crop_pct: evaluation of images above 64 px resizes to ``resolution / crop_pct`` and
            crops the center (default 0.875: 256 -> 224).
        auto_augment: a policy of :data:`mobilenetv2.config.AUTO_AUGMENTS` for the training images (RandAugment,
            TrivialAugmentWide, AugMix or AutoAugment's learned policies), image files only.
        random_erase: probability of erasing a random rectangle of each training image.
        val_only: for evaluation: a folder needs (and has scanned) only ``val/``; ``train`` is
            then the validation set too.
        val_split: for a folder of class folders (no ``train/`` or ``val/``): the fraction of
            each class held out for validation (default :data:`DEFAULT_VAL_SPLIT`; see
            :meth:`mobilenetv2.imagefolder.SafeImageFolder.split`). With ``val_only``, the
            default and 0 evaluate every image.

    Raises:
        ValueError, FileNotFoundError: for a spec that names no usable data.
    """
    for name, value in (("--resolution", resolution), ("--val-resolution", val_resolution)):
        if value is not None and value < MIN_RESOLUTION:
            raise ValueError(f"{name} must be at least {MIN_RESOLUTION}, got {value}")
    if val_split is not None and not (0 < val_split < 1 or (val_only and val_split == 0)):
        raise ValueError(f"--val-split must be {'0 (every image) or ' if val_only else ''}a "
                         f"fraction in (0, 1), got {val_split}")
    layout = folder_layout(spec) if val_split is not None else None
    if val_split is not None and layout != "classes":
        raise ValueError(f"--val-split holds out part of a folder of class folders; {spec} "
                         + ("has its own train/ and val/" if layout == "split" else "is not one"))
    augments = {"interpolation": interpolation or "bilinear", "crop_pct": crop_pct or 0.875,
                "auto_augment": auto_augment, "random_erase": random_erase}
    check_augments(**augments)
    if spec == "digits":
        if auto_augment or random_erase:
            raise ValueError("--auto-augment and --random-erase work on image files (CIFAR, "
                             "folders); the digits are augmented by random affine warps")
        size = resolution or DIGITS_RESOLUTION
        return _digits(size, val_resolution or size, seed, mean, std, in_channels, augment,
                       augments["interpolation"])
    if spec in CIFAR_STATS:
        return _cifar(spec, resolution or 32, val_resolution or resolution or 32, Path(root),
                      download, seed, mean, std, in_channels, augment, augments)
    if spec == "imagenet":
        raise ValueError("this recipe is for ImageNet: pass --data PATH to a folder with train/ "
                         "and val/ class folders (the ILSVRC-2012 layout)")
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path, resolution or 224, val_resolution or resolution or 224, seed,
                             mean, std, in_channels, strict, augment, augments, val_only, val_split)
    if path.is_file():
        archive = next((s for s in ARCHIVE_SUFFIXES if path.name.lower().endswith(s)), None)
        if archive:
            unpack = (f"unzip {spec} -d DIR" if archive == ".zip" else f"tar xf {spec} -C DIR")
            raise ValueError(f"--data {spec} is an archive: unpack it ({unpack}) and pass the "
                             "folder of images it holds")
        raise ValueError(f"--data {spec} is a file: pass the folder of images (with train/ and "
                         "val/ subfolders, or of class folders)")
    raise ValueError(
        f"--data {spec!r} is not digits, cifar10, cifar100 or an existing folder (with train/ "
        "and val/ subfolders, or of class folders)"
    )


def folder_name(path: str | Path) -> str:
    """A data folder's name as the weights record it (``dataset``): the real folder's, so
    ``--data .``, ``--data photos/`` and a link to it all read ``photos``."""
    path = Path(path)
    return path.resolve().name or path.name or str(path)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


# Names datasets give their splits; a folder so named that holds class folders (not images)
# is a split, whatever its case. Only train/ and val/ are read; the rest are refused by name.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")


def split_folders(path: Path) -> list[Path]:
    """The subfolders of ``path`` named as dataset splits (:data:`SPLIT_NAMES`, any case)
    that hold folders and no images: a ``train/`` of photos is a class, not a split. A
    ``val/`` of ILSVRC-2012's validation images, unsorted, is one too (their classes are in
    a file: :func:`imagenet_val_labels`)."""
    from .imagefolder import is_hidden

    found = []
    for folder in sorted(path.iterdir()):
        # The name first: a class folder of photos is listed without a stat per photo.
        if folder.name.lower() not in SPLIT_NAMES or is_hidden(Path(folder.name)) or not folder.is_dir():
            continue
        children = [c for c in folder.iterdir() if not is_hidden(Path(c.name))]
        # ILSVRC-2012's unsorted val/ is told by its names first: no stat per image.
        if (folder.name.lower() == "val" and is_imagenet_val(children)
                or any(c.is_dir() for c in children) and not any(
                    c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS for c in children)):
            found.append(folder)
    return found


# The --data names that are not folders: the built-in datasets, and the recipes' placeholder.
BUILTIN_DATA = ("digits", *CIFAR_STATS, "imagenet")


def folder_layout(spec: str | Path) -> str | None:
    """``"split"`` for a folder of splits (see :func:`split_folders`), ``"classes"`` for any
    other folder (its subfolders are the classes), None for what is not a folder."""
    path = Path(spec)
    if str(spec) in BUILTIN_DATA or not path.is_dir():
        return None
    return "split" if split_folders(path) else "classes"


def imagenet_synsets() -> list[str]:
    """The WordNet ids of the 1,000 ImageNet-1k classes in class-index order (``n01440764``:
    tench, first): the folder names of ILSVRC-2012's train/ and val/, and of its subsets
    (Imagenette, ImageNet-A, ImageNet-R, ...). timm's list, bundled with the package."""
    from importlib.resources import files

    return files(__package__).joinpath("imagenet_synsets.txt").read_text().split()


def human_class_names(names: list[str] | None) -> list[str] | None:
    """Class names that are all ImageNet-1k WordNet ids (weights trained on ILSVRC-2012's
    folders, or some of them) as ImageNet's names for people (``n01440764``: ``tench``), as
    torchvision's and timm's ImageNet weights name their classes; any others as they are. For
    what eval and predict print: the weights keep the ids, which name the folders."""
    if not names:
        return names
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    if not all(name in index for name in names):
        return names
    from .weights import imagenet_categories

    categories = imagenet_categories()
    return [categories[index[name]] for name in names]


# ILSVRC-2012's validation images as its archive and Kaggle's download unpack them: one folder
# of ILSVRC2012_val_00000001.JPEG ..., their classes in Kaggle's LOC_val_solution.csv
# (ImageId,PredictionString: the WordNet id, then a box, per object), which Kaggle puts three
# folders above ILSVRC/Data/CLS-LOC/ (the folder of train/ and val/).
IMAGENET_VAL_PREFIX = "ILSVRC2012_val_"
IMAGENET_VAL_LABELS = "LOC_val_solution.csv"


def is_imagenet_val(files: list[Path]) -> bool:
    """Whether these files, directly in a folder, are ILSVRC-2012's validation images (by
    their names alone: 50,000 of them cost no stat on a network file system)."""
    return any(p.name.startswith(IMAGENET_VAL_PREFIX)
               and p.suffix.lower() in IMAGE_EXTENSIONS for p in files)


def imagenet_val_labels(folder: Path, images: list[Path]) -> list[str]:
    """The WordNet id of each of ``images``, ILSVRC-2012's validation images directly in
    ``folder``, read from Kaggle's ``LOC_val_solution.csv`` in ``folder`` or one of the four
    folders above it (the first found).

    Raises:
        FileNotFoundError: when there is no such file, saying how to label the images.
        ValueError: for a file that is not Kaggle's, or an image it gives no class.
    """
    import csv

    found = next((p / IMAGENET_VAL_LABELS for p in [folder, *folder.resolve().parents][:5]
                  if (p / IMAGENET_VAL_LABELS).is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{folder} holds ILSVRC-2012's validation images in one folder (e.g. "
            f"{images[0].name}) and no {IMAGENET_VAL_LABELS} was found in it or the 4 folders "
            f"above it: put Kaggle's {IMAGENET_VAL_LABELS} there, or sort the images into "
            f"{folder}/<WordNet id>/ folders (torchvision.datasets.ImageNet(ROOT, split='val') "
            "does, from ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in ROOT)")
    with open(found, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if header[:2] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{found} is not Kaggle's {IMAGENET_VAL_LABELS}: its first line "
                             f"should be ImageId,PredictionString, not {','.join(header)[:80]!r}")
        try:
            labels = {row[0]: row[1].split()[0] for row in rows if len(row) > 1 and row[1].split()}
        except csv.Error as e:  # a field over csv's limit of 128 KB (a damaged or forged file)
            raise ValueError(f"{found} is not Kaggle's {IMAGENET_VAL_LABELS}: line "
                             f"{rows.line_num}: {e}") from None
    missing = [p.name for p in images if p.stem not in labels]
    if missing:
        raise ValueError(f"{found} gives no class for {len(missing)} of the {len(images)} images "
                         f"in {folder} (e.g. {missing[0]}): is it ILSVRC-2012's?")
    return [labels[p.stem] for p in images]


@dataclass(frozen=True)
class ClassMatch:
    """How the classes of some data pair with a model's: ``indices[i]`` is the model's class
    for the data's class i, None when they are the model's classes in the model's order.
    ``how``: what paired them (``"name"``, ``"name, ignoring case"``, ``"WordNet id"``,
    ``"class index"``), for saying so."""

    indices: list[int] | None
    how: str = "name"


def _fold(name: str) -> str:
    """A class name as compared ignoring case, its accents composed (NFC)."""
    return unicodedata.normalize("NFC", name).casefold()


def match_classes(model_classes: list[str] | None, num_classes: int, data_classes: list[str],
                  *, weights: Any = "the weights", data: Any = "the data",
                  folders: bool = True,
                  advice: str = "evaluate on data with the model's classes") -> ClassMatch:
    """Pair the data's classes with the model's by name, never by position alone.

    Class folders are sorted by name, so data whose folders are named otherwise than the
    classes the model was trained on (or are fewer) would otherwise be scored against the
    wrong outputs without a word. A data class is the model's class of the same name (or, if
    none, the only one equal ignoring case), the same also when one is spelt with composed
    accents and the other with combining ones (NFC and NFD: macOS file names); for ImageNet-1k models, also a folder named by
    WordNet id (``n01440764``), as ILSVRC-2012 and its subsets name them; and, for ``folders``
    (not a built-in dataset) and a model whose class names are not numbers, folders named by
    class index (``0`` to ``K-1``), as ImageNetV2 names them. The data may hold a subset of
    the model's classes. A model without class names pairs by position when the counts agree,
    as before (with a warning where folders named by number sort otherwise as text).
    ``advice``: what a refusal tells the user to do (``train --teacher`` has its own).

    Raises:
        ValueError: when a data class pairs with none of the model's (one line, naming some).
    """
    def is_index(name: str) -> bool:
        return name.isdecimal() and str(int(name)) == name

    if model_classes is None or len(model_classes) != num_classes or len(data_classes) > num_classes:
        if len(data_classes) != num_classes:
            # Named only where the others pair by name (not by WordNet id or class index).
            known = {_fold(str(c)) for c in model_classes or []}
            foreign = [c for c in data_classes if _fold(c) not in known]
            which = (f" ({', '.join(foreign[:5])}{' ...' * (len(foreign) > 5)} "
                     f"{'is' if len(foreign) == 1 else 'are'} not among its classes)"
                     if model_classes and len(model_classes) == num_classes
                     and 0 < len(foreign) < len(data_classes) - len(foreign) else "")
            raise ValueError(f"{weights} has {num_classes} classes but {data} has "
                             f"{len(data_classes)}{which}: {advice}")
        numbered = folders and all(map(is_index, data_classes))
        if numbered and [int(n) for n in data_classes] != list(range(num_classes)):
            log.warning("%s has no class names: its outputs are taken in the order of the "
                        "folders of %s as text (%s, ...), as torchvision's ImageFolder orders "
                        "them, not by the numbers they are named by", weights, data,
                        ", ".join(data_classes[:4]))
        return ClassMatch(None, "position")
    if list(data_classes) == list(model_classes):
        return ClassMatch(None)
    from .weights import imagenet_categories

    exact = {name: i for i, name in enumerate(model_classes)}
    for i, name in enumerate(model_classes):  # "é" composed or as e + a combining accent
        exact.setdefault(unicodedata.normalize("NFC", name), i)
    folded: dict[str, int] = {}
    for i, name in enumerate(model_classes):  # a name twice, ignoring case: no pairing by it
        folded[_fold(name)] = -1 if _fold(name) in folded else i

    def by_name(name: str) -> tuple[int | None, bool]:
        for spelling in (name, unicodedata.normalize("NFC", name)):
            if spelling in exact:
                return exact[spelling], False
        index = folded.get(_fold(name), -1)
        return (index, True) if index >= 0 else (None, False)

    named = [by_name(name) for name in data_classes]
    candidates: list[tuple[str, list[int | None]]] = [
        ("name, ignoring case" if any(folded for _, folded in named) else "name",
         [index for index, _ in named])]
    imagenet = num_classes == 1000 and list(model_classes) == imagenet_categories()
    if imagenet:
        synsets = {w: i for i, w in enumerate(imagenet_synsets())}
        candidates.append(("WordNet id", [synsets.get(name) for name in data_classes]))
    by_index = folders and not any(map(is_index, model_classes))
    if by_index:
        candidates.append(("class index", [int(name) if is_index(name) and int(name) < num_classes
                                           else None for name in data_classes]))
    for how, indices in candidates:
        if None not in indices and len(set(indices)) == len(indices):
            same = indices == list(range(num_classes))
            return ClassMatch(None if same else indices, how)  # type: ignore[arg-type]
    unknown = [name for name, (index, _) in zip(data_classes, named, strict=True) if index is None]
    if not unknown:
        raise ValueError(f"classes of {data} that differ only in case pair with the same class "
                         f"of {weights}: merge or rename those folders")
    known = ", ".join(model_classes[:5]) + (", ..." if num_classes > 5 else "")
    if not folders:  # a built-in dataset: nothing to rename
        raise ValueError(f"the classes of {data} ({', '.join(data_classes[:5])}"
                         f"{', ...' if len(data_classes) > 5 else ''}) are not classes of "
                         f"{weights} ({known}): {advice}")
    ways = ["as the model's classes"] + ["by WordNet id"] * imagenet + [
        f"by class index (0 to {num_classes - 1})"] * by_index
    raise ValueError(
        f"{len(unknown)} of the {len(data_classes)} classes of {data} are not classes of "
        f"{weights} ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}; it knows "
        f"{known}): name the class folders " + " or ".join(ways)
    )


def _digits(resolution: int, val_resolution: int, seed: int, mean: Any, std: Any,
            in_channels: int | None, augment: bool, interpolation: str = "bilinear") -> DataBundle:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torchvision.transforms import v2

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.get_default_dtype()).unsqueeze(1) / 16.0  # (N,1,8,8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=DIGITS_TEST_FRACTION,
        stratify=labels.numpy(), random_state=DIGITS_SPLIT_SEED,
    )
    channels = in_channels or 1
    if channels not in (1, 3):
        raise ValueError(f"digits are grayscale: in_channels must be 1 or 3, got {channels}")

    def resized(index: Any, size: int) -> torch.Tensor:
        chosen = F.interpolate(images[torch.as_tensor(index)], size=(size, size), mode=interpolation,
                               **({} if interpolation == "nearest" else {"align_corners": False}))
        return chosen.clamp_(0, 1).expand(-1, channels, -1, -1).contiguous()

    train_images, val_images = resized(train_idx, resolution), resized(val_idx, val_resolution)
    if mean is None or std is None:  # statistics of the training split only
        mean = tuple(train_images.mean(dim=(0, 2, 3)).tolist())
        std = tuple(train_images.std(dim=(0, 2, 3)).tolist())
    normalize = v2.Normalize(mean, std)
    train_labels = labels[torch.as_tensor(train_idx)]
    train = (AffineAugmentedImages(train_images, train_labels, normalize, seed) if augment
             else TensorImages(normalize(train_images), train_labels))
    val = TensorImages(normalize(val_images), labels[torch.as_tensor(val_idx)])
    return DataBundle("digits", train, val, [str(i) for i in range(10)], tuple(mean), tuple(std),
                      channels, resolution, small_input=True,
                      meta={"interpolation": interpolation}, val_resolution=val_resolution)


def _cifar(name: str, resolution: int, val_resolution: int, root: Path, download: bool, seed: int,
           mean: Any, std: Any, in_channels: int | None, augment: bool,
           augments: dict[str, Any]) -> DataBundle:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train_raw = cls(str(root), train=True, download=download)
        val_raw = cls(str(root), train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} not found under {root}: fetch it with mobilenetv2 train --download (needs "
            f"internet) or point --data-dir at a folder holding {cls.base_folder}/ ({e})"
        ) from None
    except OSError as e:  # --download without a network (urllib's URLError is an OSError)
        if not download:
            raise
        why = getattr(e, "reason", None) or e
        raise OSError(
            f"could not download {name} to {root} ({why}): fetch {cls.url} by hand (a browser, "
            f"or curl -LO), unpack it so that {root / cls.base_folder}/ exists (or point "
            f"--data-dir at where it is) and run again"
        ) from None
    mean = mean or CIFAR_STATS[name][0]
    std = std or CIFAR_STATS[name][1]
    channels = in_channels or 3
    train_tf, val_tf = _transforms(resolution, val_resolution, mean, std, channels, augments,
                                   native=32)
    train = SeededAugment(train_raw, train_tf, seed) if augment else _Mapped(train_raw, val_tf)
    return DataBundle(name, train, _Mapped(val_raw, val_tf), list(train_raw.classes),
                      tuple(mean), tuple(std), channels, resolution, small_input=resolution <= 64,
                      meta=_eval_meta(val_resolution, augments), val_resolution=val_resolution)


def _transforms(resolution: int, val_resolution: int, mean: Any, std: Any, channels: int,
                augments: dict[str, Any], native: int | None = None) -> tuple[Any, Any]:
    """Training transforms at ``resolution``, evaluation ones at ``val_resolution``."""
    train_tf, val_tf = image_transforms(resolution, mean, std, channels, native=native, **augments)
    if val_resolution != resolution:
        _, val_tf = image_transforms(val_resolution, mean, std, channels, native=native,
                                     **augments)
    return train_tf, val_tf


def _eval_meta(resolution: int, augments: dict[str, Any]) -> dict[str, Any]:
    """How evaluation resized the images, for the model's meta (the crop only above 64 px)."""
    meta = {"interpolation": augments["interpolation"]}
    if resolution > 64:
        meta["crop_pct"] = augments["crop_pct"]
    return meta


def _image_folder(path: Path, resolution: int, val_resolution: int, seed: int, mean: Any, std: Any,
                  in_channels: int | None, strict: bool, augment: bool,
                  augments: dict[str, Any], val_only: bool = False,
                  val_split: float | None = None) -> DataBundle:
    from .imagefolder import SafeImageFolder, is_hidden

    channels = in_channels or 3
    held_out: dict[str, Any] = {}
    splits = {folder.name for folder in split_folders(path)}
    if not splits:
        nested = next((p for p in sorted(path.iterdir()) if not is_hidden(Path(p.name))
                       and folder_layout(p) == "split"), None)
        if nested is not None:  # a folder above the data: its classes would be datasets
            raise ValueError(f"{nested} holds dataset splits: pass --data {nested}")
        try:
            every = SafeImageFolder(path, channels, strict)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}; a data folder holds {path}/<class>/*.jpg (part of each class is held out "
                f"for validation) or {path}/train/<class>/*.jpg and {path}/val/<class>/*.jpg"
            ) from None
        counts = Counter(every.targets)
        if len(counts) < 2 and not val_only:
            only = path / every.classes[next(iter(counts))]
            inner = [p for p in only.iterdir() if p.is_dir() and not is_hidden(Path(p.name))]
            raise ValueError(f"{path} has images in one class folder only ({only.name}): a "
                             "classifier needs two or more, each in a folder of its own"
                             + (f" (if the folders in {only.name}/ are the classes, pass "
                                f"--data {only})" if len(inner) > 1 else ""))
        if val_only and not val_split:
            train_raw = val_raw = every
        else:
            fraction = val_split or DEFAULT_VAL_SPLIT
            train_raw, val_raw = every.split(fraction)
            held_out = {"val_split": fraction}
            if not len(val_raw):
                raise ValueError(f"{path} has no class of two or more images to hold one out "
                                 "for validation")
            single = [every.classes[label] for label, count in counts.items() if count == 1]
            if single and not val_only:
                log.warning("warning: %s in %s: a single image, trained on and never validated",
                            "class " + single[0] if len(single) == 1 else
                            f"{len(single)} classes (e.g. {sorted(single)[0]})", path)
            said = (str(path), len(every), fraction)  # once per process (quantize reads twice)
            if said not in _SPLITS_SAID:
                _SPLITS_SAID.add(said)
                log.info("%s has no val/ folder: %d of its %d images (about %g of each class, "
                         "--val-split) held out for validation", path, len(val_raw), len(every),
                         fraction)
    else:
        for split in ("val",) if val_only else ("train", "val"):
            if split not in splits:  # by name, so the same on case-insensitive file systems
                folder = path / split
                loose = sorted(p.name for p in folder.iterdir() if p.is_file()
                               and p.suffix.lower() in IMAGE_EXTENSIONS
                               and not is_hidden(Path(p.name))) if folder.is_dir() else []
                if loose:  # a split with a stray photo is no split (see split_folders)
                    raise ValueError(f"{folder} holds {len(loose)} image"
                                     f"{'s' * (len(loose) > 1)} directly (e.g. "
                                     f"{loose[0]}), so it is not read as a split: move "
                                     f"{'them' if len(loose) > 1 else 'it'} into "
                                     f"{folder}/<class>/")
                others = sorted(splits - {"train", "val"})
                raise FileNotFoundError(
                    f"{path} has no {split}/ folder"
                    + (f" (it has {', '.join(f'{name}/' for name in others)})" if others else "")
                    + f": expected {path}/train/<class>/*.jpg and {path}/val/<class>/*.jpg"
                    + (" (evaluation needs only val/)" if val_only else
                       f", or pass --data {path / 'train'} to hold part of it out for validation"
                       if "train" in splits else "")
                )
        val_raw = SafeImageFolder(path / "val", channels, strict)
        train_raw = val_raw if val_only else SafeImageFolder(path / "train", channels, strict)
        if val_raw.flat and not val_only:  # its classes are those of its images: train/'s
            val_raw = val_raw.with_classes(train_raw.classes)
        if val_raw.classes != train_raw.classes:  # named, however far down the lists they differ
            def lacks(split: str, names: list[str]) -> str:
                return (f"{path}/{split} has no folder for {', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''}")
            only_train = [c for c in train_raw.classes if c not in val_raw.classes]
            only_val = [c for c in val_raw.classes if c not in train_raw.classes]
            # Names that print alike: "no folder for éclair" twice read as a contradiction.
            twins = [(t, v) for t in only_train for v in only_val
                     if unicodedata.normalize("NFC", t).strip() == unicodedata.normalize("NFC", v).strip()]
            if twins:
                raise ValueError(
                    f"{path}/train and {path}/val spell {len(twins)} class"
                    f"{'es' * (len(twins) > 1)} differently, e.g. {ascii(twins[0][0])} and "
                    f"{ascii(twins[0][1])} (accents composed in one and decomposed in the other, "
                    "as Linux and macOS write them, or a space at an end): rename the folders of "
                    "one as the other's (convmv --nfc, say)")
            raise ValueError(
                "; ".join([lacks("val", only_train)] * bool(only_train)
                          + [lacks("train", only_val)] * bool(only_val))
                + ": both need the same class folders (an empty one keeps a class that has no "
                "images there)"
            )
    default_stats = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
    mean = mean or default_stats[0]
    std = std or default_stats[1]
    train_tf, val_tf = _transforms(resolution, val_resolution, mean, std, channels, augments)
    train = SeededAugment(train_raw, train_tf, seed) if augment else _Mapped(train_raw, val_tf)
    return DataBundle(folder_name(path), train, _Mapped(val_raw, val_tf),
                      list(train_raw.classes), tuple(mean), tuple(std), channels, resolution,
                      small_input=resolution <= 64,
                      meta={**_eval_meta(val_resolution, augments), **held_out},
                      val_resolution=val_resolution)


class _Mapped(Dataset):
    """A dataset with a deterministic transform applied to its images."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return (None if image is None else self.transform(image)), label


def image_transforms(
    resolution: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    channels: int = 3,
    native: int | None = None,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    auto_augment: str | None = None,
    random_erase: float = 0.0,
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """Training and evaluation transforms for PIL images, as torchvision's references use.

    Small images (<= 64 px) get pad-crop + flip and are resized whole for evaluation; larger
    ones get RandomResizedCrop + flip, and resize to ``resolution / crop_pct`` (256 for 224)
    then a center crop for evaluation. Every resize resamples with ``interpolation``
    (``bilinear``, ``bicubic`` as timm's weights want, or ``nearest``). ``auto_augment``
    follows the flip and ``random_erase`` the normalisation, in the order of torchvision's
    ``ClassificationPresetTrain``.
    """
    from torchvision.transforms import v2

    check_augments(interpolation, crop_pct, auto_augment, random_erase)
    mode = v2.InterpolationMode(interpolation)
    policy = [_auto_augment(auto_augment, mode)] if auto_augment else []
    erase = [v2.RandomErasing(random_erase, value=0)] if random_erase else []
    to_tensor = [v2.PILToTensor(), v2.ToDtype(torch.get_default_dtype(), scale=True),
                 v2.Normalize(mean, std)]
    if resolution <= 64:
        resize = ([] if native == resolution
                  else [v2.Resize((resolution, resolution), mode, antialias=True)])
        train = v2.Compose([*resize, v2.RandomCrop(resolution, padding=resolution // 8,
                                                   padding_mode="reflect"),
                            v2.RandomHorizontalFlip(), *policy, *to_tensor, *erase])
        val = v2.Compose([*resize, *to_tensor])
    else:
        train = v2.Compose([v2.RandomResizedCrop(resolution, interpolation=mode, antialias=True),
                            v2.RandomHorizontalFlip(), *policy, *to_tensor, *erase])
        val = v2.Compose([ResizeCenterCrop(math.floor(resolution / crop_pct), resolution, mode),
                          *to_tensor])
    if channels == 1:
        train = v2.Compose([v2.Grayscale(1), train])
        val = v2.Compose([v2.Grayscale(1), val])
    return train, val


class ResizeCenterCrop:
    """``v2.Resize(short)`` then ``v2.CenterCrop(side)``, in memory bounded by the crop for
    PIL images (the files eval and predict read): those go through
    :func:`mobilenetv2.runtime.resize_center_crop`, which does what the two do, bit for bit,
    except for a long strip (1 x 100,000 pixels, a PNG of a few hundred bytes), which they
    would resize to gigapixels before the crop: of that it resizes only the region the crop
    keeps. Tensors go through torchvision's two transforms."""

    def __init__(self, short: int, side: int, mode: Any) -> None:
        from torchvision.transforms import v2

        self.short, self.side, self.mode = short, side, mode
        self.steps = v2.Compose([v2.Resize(short, mode, antialias=True), v2.CenterCrop(side)])

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        if isinstance(image, Image.Image):
            resample = {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC}.get(
                self.mode.value, Image.BILINEAR)
            return resize_center_crop(image, self.short, (self.side, self.side), resample)
        return self.steps(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.steps!r})"


def _auto_augment(name: str, interpolation: Any) -> Callable[[Any], Any]:
    from torchvision.transforms import v2

    if name == "ra":
        return v2.RandAugment(interpolation=interpolation)
    if name == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=interpolation)
    if name == "augmix":
        return v2.AugMix(interpolation=interpolation)
    return v2.AutoAugment(v2.AutoAugmentPolicy(name), interpolation=interpolation)


def eval_transform(source: Any) -> Callable[[Any], torch.Tensor]:
    """The preprocessing of a model's weights, as torchvision's ``weights.transforms()``.

    ``source`` is a model (its ``meta``) or a meta dict. The transform takes a PIL image in
    any mode (palette, RGBA composited on white, 16-bit, ...), an HxW / HxWxC uint8 NumPy
    array (as :class:`mobilenetv2.runtime.Predictor` takes them; float arrays are refused
    rather than guessed at) or a (C, H, W) uint8 tensor, and returns the normalised
    (C, H, W) tensor the model expects: resized with the meta's ``interpolation``, center-
    cropped by its ``crop_pct`` above 64 px, normalised with its mean and std::

        model = mobilenetv2.load_model("best.safetensors").eval()
        batch = mobilenetv2.eval_transform(model)(Image.open("cat.jpg")).unsqueeze(0)

    Raises:
        ValueError: for anything else than a model of this package or a meta dict (a weights
            file's path: ``eval_transform(load_model(path))``).
    """
    meta = source if isinstance(source, dict) else getattr(source, "meta", None)
    if not isinstance(meta, dict):
        raise ValueError(f"eval_transform takes a model built by mobilenetv2 or its meta dict, "
                         f"not {type(source).__name__} {str(source)[:80]!r}: for a weights "
                         "file, eval_transform(mobilenetv2.load_model(path))")
    channels, height, _ = meta["input_size"]
    _, val = image_transforms(int(height), tuple(meta["mean"]), tuple(meta["std"]),
                              int(channels), crop_pct=float(meta.get("crop_pct") or 0.875),
                              interpolation=meta.get("interpolation") or "bilinear")
    return _AnyMode(val, int(channels))


class _AnyMode:
    """Bring a PIL image to RGB or L (as files are read) before ``transform``."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], channels: int) -> None:
        self.transform, self.channels = transform, channels

    def __call__(self, image: Any) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        if isinstance(image, np.ndarray):  # torchvision's v2 transforms pass arrays through
            image = image_from_array(image)
        if isinstance(image, Image.Image) and image.mode != ("L" if self.channels == 1 else "RGB"):
            image = to_mode(image, self.channels)  # open_image's files are converted already
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def open_image(path: str | Path, channels: int = 3):
    """Open an image file as a PIL image in RGB (or L for one channel), fully decoded.

    Raises:
        FileNotFoundError: for a path that names nothing (a broken link says where it points).
        ValueError: for a file that is not a readable image (corrupt, truncated, or a
            decompression bomb: more than twice Pillow's ``MAX_IMAGE_PIXELS``, 179 MP).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow refuses more than twice MAX_IMAGE_PIXELS (179 MP): a bomb. Below,
            # it only warns, as for a 108 MP phone photo: read, as torchvision reads it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_mode(image, channels)
    except FileNotFoundError:
        raise missing_image(path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as e:
        raise unreadable_image(path, e) from None


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global batches from a seeded permutation, each split across the processes.

    Process ``rank`` takes positions ``rank, rank + world_size, ...`` of every global batch, so
    the processes together take at step i exactly the batch one process would take alone, and
    each example is seen once per epoch. For training (``drop_small``), a last global batch
    smaller than the world size is dropped, since a process cannot take an empty step.

    Args:
        num_samples: dataset length.
        batch_size: the global batch size (all processes together).
        rank, world_size: this process's place in the job.
        shuffle: a new permutation each epoch, from ``seed + epoch``.
        drop_last: drop the last, partial global batch.
        repeats: repeated augmentation (torchvision's ``RASampler``, Hoffer et al. 2019): each
            example of the permutation comes ``repeats`` times in a row, as indices ``i``,
            ``i + n``, ``i + 2n``, ... that a :class:`SeededAugment` augments differently;
            an epoch keeps ``num_samples`` positions, so it sees ``n / repeats`` examples.
            Consecutive copies land on different processes, as with torchvision's.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 drop_small: bool = True, repeats: int = 1) -> None:
        if batch_size < world_size:
            raise ValueError(f"the global batch size ({batch_size}) must be at least the number "
                             f"of processes ({world_size})")
        if repeats < 1:
            raise ValueError(f"--ra-reps must be >= 1, got {repeats}")
        self.repeats = repeats
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last, self.drop_small = shuffle, seed, drop_last, drop_small
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` batches (for resume)."""
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.repeats > 1:
            n = self.num_samples
            order = [i + copy * n for i in order for copy in range(self.repeats)][:n]
        batches = [order[i:i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]
        if batches and (self.drop_last and len(batches[-1]) < self.batch_size
                        or self.drop_small and len(batches[-1]) < self.world_size):
            batches.pop()
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.start:]:
            part = batch[self.rank::self.world_size]
            if part:
                yield part

    def __len__(self) -> int:
        return sum(1 for b in self.global_batches()[self.start:] if b[self.rank::self.world_size])
