"""An image-folder dataset that survives the files real folders contain.

``PATH/<class>/<image>`` as torchvision's ImageFolder reads it, but an epoch never dies on one
bad file: corrupt or truncated images and decompression bombs are skipped with a warning that
names the file (or raise with ``strict=True``), grayscale, palette, RGBA, CMYK and 16-bit
images are converted, files that are not images are left out, hidden and system folders
(``.ipynb_checkpoints``, ``__MACOSX``, Synology's ``@eaDir``) are neither classes nor images,
and empty class folders keep their class index so train and val agree.

:meth:`SafeImageFolder.split` holds out part of each class for validation when a folder has
no ``val/`` of its own (Keras' ``validation_split``, but per class and stable).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from .data import IMAGE_EXTENSIONS, imagenet_val_labels, is_imagenet_val, open_image

# In the torch-free runtime, whose command walks folders too; imported from here as well.
from .runtime import SYSTEM_FOLDERS, is_hidden, left_out_line, list_images  # noqa: F401

log = logging.getLogger(__name__)


def warn_left_out(others: list[Path], folder: Path) -> None:
    """One warning line for the files in ``folder`` left out as not images (if any)."""
    if others:
        log.warning("warning: %s", left_out_line(others, folder))


class SafeImageFolder(Dataset):
    """``root/<class>/<image>`` images as PIL images in RGB (or L for ``channels=1``).

    A ``root`` that holds ILSVRC-2012's validation images directly (``ILSVRC2012_val_*.JPEG``,
    as its archive unpacks) takes their classes, WordNet ids, from Kaggle's
    ``LOC_val_solution.csv`` (see :func:`mobilenetv2.data.imagenet_val_labels`); ``flat`` is
    then True.

    Args:
        root: the folder whose subfolders are the classes (sorted by name).
        channels: 3 for RGB, 1 for grayscale.
        strict: raise on the first unreadable image instead of skipping it.

    Raises:
        FileNotFoundError: when ``root`` has no class folders or no images at all.
    """

    def __init__(self, root: str | Path, channels: int = 3, strict: bool = False) -> None:
        self.root, self.channels, self.strict = Path(root), channels, strict
        self.named: set[str] = set()  # unreadable files already warned about by this process
        entries = [p for p in self.root.iterdir() if not is_hidden(Path(p.name))]
        self.classes = sorted(p.name for p in entries if p.is_dir())
        loose = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.flat = not self.classes and is_imagenet_val(loose)  # ILSVRC-2012's val/, unsorted
        if self.flat:
            labels = imagenet_val_labels(self.root, loose)
            self.classes = sorted(set(labels))
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
            self.samples = [(str(p), self.class_to_idx[c]) for p, c in zip(loose, labels, strict=True)]
            self.targets = [label for _, label in self.samples]
            return
        if not self.classes:
            raise FileNotFoundError(f"{self.root} has no class folders: expected {self.root}/<class>/*.jpg")
        if loose:  # torchvision's ImageFolder leaves them out without a word
            log.warning("warning: left out %d image%s directly in %s, in no class folder (e.g. "
                        "%s): a class's images go in %s/<class>/", len(loose),
                        "s" * (len(loose) > 1), self.root, loose[0].name, self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        ignored: list[Path] = []
        for name in self.classes:
            images, others = list_images(self.root / name)
            ignored += others
            if not images:
                log.warning("warning: class %r in %s has no images", name, self.root)
            self.samples += [(str(p), self.class_to_idx[name]) for p in images]
        warn_left_out(ignored, self.root)
        if not self.samples:
            raise FileNotFoundError(f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, fraction: float) -> tuple[SafeImageFolder, SafeImageFolder]:
        """(train, val): about ``fraction`` of each class's images held out for validation.

        An image is held out when the SHA-1 of its path inside the folder (``class/name``),
        read as a number in [0, 1), is below ``fraction``. A class of two or more images keeps
        at least one on each side (its lowest hash held out, or its highest trained on), and a
        class of one image is trained on. So the split needs no seed and is the same on every
        machine, wherever the folder lives and however the file system orders it; and an
        image's side depends on its own name alone, so adding images never moves one that was
        trained on into validation (but in a class whose every image hashed below
        ``fraction``, where the highest was kept for training): weights evaluated on a grown
        folder still see only images they never trained on.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"--val-split must be a fraction in (0, 1), got {fraction}")

        position = []  # each image's SHA-1 of class/name as a number in [0, 1)
        by_class: dict[int, list[int]] = {}
        for index, (path, label) in enumerate(self.samples):
            name = Path(path).relative_to(self.root).as_posix()
            # surrogateescape: a name that is not UTF-8 (unzipped from a Windows zip) is hashed
            # as its bytes; a UTF-8 name as before.
            digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
            position.append(int(digest[:13], 16) / 16**13)
            by_class.setdefault(label, []).append(index)
        held_out: set[int] = set()
        for indices in by_class.values():
            ranked = sorted(indices, key=position.__getitem__)
            chosen = [i for i in ranked if position[i] < fraction]
            if len(ranked) >= 2 and not chosen:
                chosen = ranked[:1]
            elif chosen and len(chosen) == len(ranked):
                chosen = chosen[:-1]
            held_out.update(chosen)
        train = [i for i in range(len(self.samples)) if i not in held_out]
        return self._subset(train), self._subset(sorted(held_out))

    def with_classes(self, classes: list[str]) -> SafeImageFolder:
        """This flat ILSVRC-2012 val/ with ``classes`` (train/'s) as its classes: the images of
        other classes (all 1,000 are there, a subset may be trained on) are left out, in one
        warning line.

        Raises:
            ValueError: when no image is of one of ``classes``.
        """
        index = {name: i for i, name in enumerate(classes)}
        samples = [(path, index[self.classes[label]]) for path, label in self.samples
                   if self.classes[label] in index]
        if not samples:
            raise ValueError(f"none of the {len(self.samples)} images in {self.root} is of one "
                             f"of the {len(classes)} classes of train/ (e.g. {classes[0]})")
        if len(samples) < len(self.samples):
            log.warning("warning: left out %d of the %d images in %s, of classes that train/ "
                        "has no folder for", len(self.samples) - len(samples), len(self.samples),
                        self.root)
        subset = copy.copy(self)
        subset.classes, subset.class_to_idx, subset.samples = list(classes), index, samples
        subset.targets = [label for _, label in samples]
        return subset

    def _subset(self, indices: list[int]) -> SafeImageFolder:
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        subset.targets = [label for _, label in subset.samples]
        return subset

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return open_image(path, self.channels), label
        except (ValueError, OSError) as e:
            if self.strict:
                raise ValueError(f"{e} (drop --strict to skip unreadable images)") from None
            if path not in self.named:  # once a run (per worker process), not every epoch
                self.named.add(path)
                log.warning("warning: %s; skipped it (--strict stops instead)", e)
            return None, label


def collate_skipping(batch: list[tuple[torch.Tensor | None, int]]):
    """Collate a batch, leaving out unreadable images; returns (images, labels, skipped)."""
    kept = [sample for sample in batch if sample[0] is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, labels = default_collate(kept)
    return images, labels, skipped
