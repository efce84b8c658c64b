"""``mobilenetv2 predict``: the top-k classes of image files, thousands at a time.

DataLoader worker processes decode and preprocess the next batches while the model runs on
this one, for every kind of weights (safetensors and ``.pth`` in PyTorch; ONNX and ExecuTorch
files in :class:`mobilenetv2.runtime.Predictor`, with its own NumPy preprocessing). Results are
printed, or written to ``--out``, batch by batch. An image that cannot be read (corrupt,
truncated, not an image, a decompression bomb) gets a warning on stderr and an item with its
``error``, and the others are still classified; the exit code is then 2, so a script notices,
but no work is lost.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .common import add_json_arg, non_negative_int, one_line, positive_int

log = logging.getLogger("mobilenetv2")

# --out's formats, by suffix.
OUT_FORMATS = (".csv", ".jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="top-k classes of images",
        description="Classify images (files, or folders walked recursively) with trained "
        "weights. An image that cannot be read gets a warning and an error item; the others "
        "are still classified, and the exit code is 2.",
    )
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    parser.add_argument("--top-k", type=positive_int, default=5, metavar="K")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                        help="processes that decode images (default: one per CPU, at most 8; "
                        "0: this one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (PyTorch weights)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write the predictions to FILE as they are made, .csv or .jsonl "
                        "(FILE.partial until the last one is in); stdout gets a one-line summary")
    add_json_arg(parser)
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..reporting import Progress

    if args.out is not None:  # before any work: a typo costs a second, not the run
        check_out_file(args.out)
    files = image_files(args.paths)
    classifier = load_classifier(args.weights, args.device)
    batches = -(-len(files) // args.batch_size)
    workers = args.workers if args.workers is not None else default_workers(batches)
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, classifier.preprocess), batch_size=args.batch_size,
        num_workers=workers, collate_fn=collate_images,
        pin_memory=classifier.device.type == "cuda")
    top_k = min(args.top_k, classifier.num_classes or args.top_k)
    out = PredictionsFile(args.out, top_k) if args.out is not None else None
    progress = Progress(batches, "predict", enabled=sys.stderr.isatty())
    collected: list[dict[str, Any]] = []
    classified = unreadable = 0
    start = time.perf_counter()
    try:
        for step, items in enumerate(classify(loader, classifier, files, top_k), 1):
            for item in items:
                if "error" in item:
                    progress.write(f"warning: {item['error']}")
            unreadable += sum("error" in item for item in items)
            classified += sum("error" not in item for item in items)
            if out is not None:
                out.write(items)
            elif args.json:
                collected += items
            else:
                for item in items:
                    if "error" not in item:
                        progress.write(text_line(item), stdout=True)
                sys.stdout.flush()  # a pipe sees each batch as it is done
            if progress.due():
                progress.update(step, img_s=(classified + unreadable) / (time.perf_counter() - start))
        if out is not None:
            out.commit()
    finally:
        progress.close()
        if out is not None and not out.committed:
            out.close()
            log.info("predictions so far: %s", out.partial)
    if out is not None:
        summary = {"classified": classified, "unreadable": unreadable, "out": str(args.out)}
        print(json.dumps(summary) if args.json else
              f"{classified} image{'s' * (classified != 1)} classified, {unreadable} "
              f"unreadable -> {args.out}")
    elif args.json:
        print(json.dumps({"predictions": collected}))
    return 2 if unreadable else 0


def default_workers(batches: int) -> int:
    """Decoding processes: one per CPU this process may use, at most 8; none for a single
    batch (a worker would decode it while this process waits).

    Unlike the loaders of training and ``eval``, these keep no CPU back for the model: a worker
    sleeps once its next batches are ready, so a spare one costs nothing where the model is the
    slow part, and where decoding is (a 12-megapixel JPEG takes about 110 ms to decode and
    resize on one core of a 2-CPU machine, 8x what ``mobilenet_v2_100`` needs to classify it)
    every CPU decodes.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if batches <= 1 else min(8, cpus)


def text_line(item: dict[str, Any]) -> str:
    """``path: class 61.0%, class 22.3%, ...``: one image's line in the default output."""
    top = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in item["top_k"])
    return f"{item['path']}: {top}"


def check_out_file(path: Path) -> None:
    """Refuse an ``--out`` with another suffix than .csv or .jsonl, or in no folder, at once."""
    from ..weights import check_output_file

    if path.suffix.lower() not in OUT_FORMATS:
        raise ValueError(f"--out {path}: the format comes from the suffix, "
                         f"{' or '.join(OUT_FORMATS)}")
    check_output_file(path)


def image_files(paths: list[Path]) -> list[Path]:
    """The image files named, and those in the folders named (walked recursively, sorted).

    Raises:
        FileNotFoundError: for a path that does not exist or a folder that holds no images.
    """
    from ..data import IMAGE_EXTENSIONS
    from ..imagefolder import is_hidden

    files: list[Path] = []
    for path in paths:
        if path.is_dir():  # hidden and system files (macOS' ._ files, @eaDir) are not images
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not is_hidden(p.relative_to(path)))
            if not found:
                raise FileNotFoundError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


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
    """

    preprocess: Callable[[Path], Any]
    infer: Callable[[torch.Tensor], Any]
    class_names: list[str] | None
    probabilities: bool
    num_classes: int | None
    device: torch.device


def load_classifier(path: Path, device_name: str) -> Classifier:
    """Any weights file as a :class:`Classifier`: PyTorch weights with the evaluation
    transform of :mod:`mobilenetv2.data`, ONNX and ExecuTorch files with the NumPy preprocessing
    of :mod:`mobilenetv2.runtime` (what their users get from ``Predictor.predict``)."""
    from ..data import eval_transform
    from ..runtime import preprocess_image, runs_in_runtime
    from ..train import pick_device
    from .train import load_for_inference, open_exported_classifier

    if runs_in_runtime(path):
        predictor, classes = open_exported_classifier(path)
        return Classifier(preprocess=partial(preprocess_image, meta=predictor.meta),
                          infer=lambda images: predictor.run(images.numpy()),
                          class_names=predictor.meta.get("class_names"),
                          probabilities=predictor.meta.get("output") == "probabilities",
                          num_classes=classes,
                          device=torch.device("cpu"))
    device = pick_device(device_name)
    model, meta = load_for_inference(path, device)

    def infer(images: torch.Tensor):
        with torch.inference_mode():
            return model(images.to(device, non_blocking=True)).float().cpu().numpy()

    return Classifier(preprocess=partial(_open_transformed, transform=eval_transform(meta),
                                         channels=int(meta["input_size"][0])),
                      infer=infer, class_names=meta.get("class_names"),
                      probabilities=meta.get("output") == "probabilities",
                      num_classes=meta.get("num_classes"), device=device)


def _open_transformed(path: Path, transform: Callable[[Any], Any], channels: int) -> Any:
    from ..data import open_image

    return transform(open_image(path, channels))


# --------------------------------------------------------------------------------------------
# Files -> batches -> predictions


class ImageFiles(Dataset):
    """Image files, each preprocessed on its own: ``(index, image, None)``, or
    ``(index, None, why)`` for one that cannot be read, so that a bad file costs its own
    prediction, not the run's."""

    def __init__(self, files: list[Path], preprocess: Callable[[Path], Any]) -> None:
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


def classify(loader: Any, classifier: Classifier, files: list[Path],
             top_k: int) -> Iterator[list[dict[str, Any]]]:
    """Each batch's predictions, in the order of ``files``: ``{"path", "top_k": [{"class",
    "index", "probability"}, ...]}``, most likely first, or ``{"path", "top_k": [], "error"}``
    for an image that could not be read."""
    from ..runtime import class_name, top_classes

    names = classifier.class_names
    for indices, images, errors in loader:
        ranked = [] if images is None else top_classes(classifier.infer(images), top_k,
                                                       classifier.probabilities)
        top = dict(zip(indices, ranked, strict=True))
        items: list[dict[str, Any]] = []
        for index in sorted([*indices, *errors]):
            if index in errors:
                items.append({"path": str(files[index]), "top_k": [], "error": errors[index]})
            else:
                items.append({"path": str(files[index]), "top_k": [
                    {"class": class_name(names, i), "index": i, "probability": p}
                    for i, p in top[index]]})
        yield items


# --------------------------------------------------------------------------------------------
# --out


class PredictionsFile:
    """``--out``: predictions written to ``FILE.partial`` as they are made, batch by batch,
    and renamed to FILE when the last one is in. So FILE only ever holds a complete set, and
    a run that is interrupted leaves its progress in ``FILE.partial``.

    ``.csv``: ``path,class,probability,class_2,probability_2,...,error`` (``top_k`` pairs;
    ``error`` empty, or why the image could not be read). ``.jsonl``: one ``--json``
    "predictions" item per line.
    """

    def __init__(self, path: Path, top_k: int) -> None:
        self.path, self.top_k = path, top_k
        self.partial = path.with_name(path.name + ".partial")
        self.committed = False
        self.file = open(self.partial, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.csv = csv.writer(self.file) if path.suffix.lower() == ".csv" else None
        if self.csv is not None:
            self.csv.writerow(["path", "class", "probability",
                               *(f"{key}_{i}" for i in range(2, top_k + 1)
                                 for key in ("class", "probability")), "error"])

    def write(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            if self.csv is None:
                self.file.write(json.dumps(item) + "\n")
                continue
            pairs = [value for p in item["top_k"] for value in (p["class"], p["probability"])]
            self.csv.writerow([item["path"], *pairs, *[""] * (2 * self.top_k - len(pairs)),
                               item.get("error", "")])
        self.file.flush()  # on disk for whoever watches, and kept if this process dies

    def commit(self) -> None:
        """Flush to disk and rename FILE.partial to FILE."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        self.committed = True

    def close(self) -> None:
        """Close, leaving FILE.partial (a run that did not finish)."""
        self.file.close()
