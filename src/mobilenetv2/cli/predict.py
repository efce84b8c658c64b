"""``mobilenetv2 predict``: the top-k classes of image files, thousands at a time.

DataLoader worker processes decode and preprocess the next batches while the model runs on
this one, for every kind of weights (safetensors and ``.pth`` in PyTorch; ONNX and ExecuTorch
files in :class:`mobilenetv2.runtime.Predictor`, with its own NumPy preprocessing). Results are
printed, or written to ``--out``, batch by batch. An image that cannot be read (corrupt,
truncated, not an image, a decompression bomb) gets a warning on stderr and an item with its
``error``, and the others are still classified; the exit code is then 2, so a script notices,
but no work is lost. ``--out`` with ``--resume`` continues an interrupted run from what its
``FILE.partial`` holds.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..prediction import (
    ImageFiles,
    classify,
    collate_images,
    default_workers,
    every_class,
    image_files,
    load_classifier,
)
from ..runtime import json_text
from .common import add_json_arg, add_use_ema_arg, non_negative_int, positive_int, printable

log = logging.getLogger("mobilenetv2")

# --out's formats, by suffix.
OUT_FORMATS = (".csv", ".jsonl")
# The flags that change what a row holds, recorded for --resume beside the weights and top-k.
WRITTEN_WITH = ("tta", "probabilities", "use_ema")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="top-k classes of images",
        description="Classify images (files, or folders walked recursively) with trained "
        "weights. An image that cannot be read gets a warning and an error item; the others "
        "are still classified, and the exit code is 2.",
    )
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE",
                        help="the weights to classify with: any file eval takes")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    parser.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                        help="classes per image, most probable first (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="B",
                        help="images per batch (default 32)")
    parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                        help="processes that decode images (default: one per CPU, at most 8; "
                        "where workers spawn, as on Windows and macOS, one per four batches; "
                        "0: this one)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (PyTorch weights; auto: a CUDA GPU "
                        "if there is one, else the CPU)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write the predictions to FILE as they are made, .csv or .jsonl "
                        "(FILE.partial until the last one is in); stdout gets a one-line summary")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: the mean of each image's class "
                        "probabilities and its left-right mirror's (twice the model's work; for "
                        "classes that mirroring does not change, not digits or text)")
    parser.add_argument("--probabilities", action="store_true",
                        help="with --out or --json: every class's probability too, in the "
                        "model's class order (a CSV column per class, named by it; a JSON "
                        "'probabilities' list), for a submission file or averaging models")
    parser.add_argument("--resume", action="store_true",
                        help="with --out: keep the images an interrupted run left in "
                        "FILE.partial and predict only the others (without FILE.partial: all)")
    add_use_ema_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from ..reporting import Progress

    if args.resume and args.out is None:
        raise ValueError("--resume continues the FILE.partial of an interrupted --out FILE: "
                         "add --out")
    if args.probabilities and args.out is None and not args.json:
        raise ValueError("--probabilities writes every class's probability to a file or "
                         "JSON: add --out FILE.csv, --out FILE.jsonl or --json")
    if args.out is not None:  # before any work: a typo costs a second, not the run
        check_out_file(args.out)
    files = image_files(args.paths)
    classifier = load_classifier(args.weights, args.device, tta=args.tta, use_ema=args.use_ema)
    top_k = min(args.top_k, classifier.num_classes or args.top_k)
    # The CSV's column per class; JSON holds a list, in the model's order, whatever it knows.
    classes = (every_class(classifier, args.weights) if args.probabilities and args.out
               is not None and args.out.suffix.lower() == ".csv" else None)
    if args.resume and args.out.exists() and not partial_path(args.out).exists():
        return nothing_to_resume(args.out, files, args.json, top_k, args.weights, classes)
    out = done = None
    if args.out is not None:
        weights = weights_identity(args.weights)
        written_with = {"tta": args.tta, "probabilities": args.probabilities,
                        "use_ema": args.use_ema}
        done = (resume_point(args.out, top_k, weights, files, written_with, classes)
                if args.resume else None)
        out = PredictionsFile(args.out, top_k, weights, done, written_with, classes)
    if done is not None:
        files = remaining(files, done.paths)
        log.info("resuming %s: %d image%s done, %d to predict", out.partial, len(done.paths),
                 "s" * (len(done.paths) != 1), len(files))
    batches = -(-len(files) // args.batch_size)
    workers = args.workers if args.workers is not None else default_workers(batches)
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, classifier.preprocess), batch_size=args.batch_size,
        num_workers=workers, collate_fn=collate_images,
        pin_memory=classifier.device.type == "cuda")
    progress = Progress(batches, "predict", enabled=sys.stderr.isatty())
    collected: list[dict[str, Any]] = []
    # A resumed run counts the images its partial file holds too: its summary and exit code
    # are those of the file it leaves, as if it had never been interrupted.
    unreadable = done.unreadable if done is not None else 0
    classified = len(done.paths) - unreadable if done is not None else 0
    before, start = classified + unreadable, time.perf_counter()
    try:
        for step, items in enumerate(classify(loader, classifier, files, top_k,
                                              args.probabilities), 1):
            for item in items:
                if "error" in item:
                    progress.write(f"warning: {printable(item['error'])}")
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
                progress.update(step, img_s=(classified + unreadable - before)
                                / (time.perf_counter() - start))
        if out is not None:
            out.commit()
    finally:
        progress.close()
        if out is not None and not out.committed:
            out.close()
            log.info("predictions so far: %s (--resume continues from there)", out.partial)
    if out is not None:
        print_summary(classified, unreadable, args.out, args.json)
    elif args.json:
        print(json_text({"predictions": collected}))
    return 2 if unreadable else 0


def print_summary(classified: int, unreadable: int, out: Path, as_json: bool) -> None:
    """The one line on stdout of a run with ``--out``."""
    summary = {"classified": classified, "unreadable": unreadable, "out": str(out)}
    print(json_text(summary) if as_json else
          f"{classified} image{'s' * (classified != 1)} classified, {unreadable} "
          f"unreadable -> {out}")


def text_line(item: dict[str, Any]) -> str:
    """``path: class 61.0%; class 22.3%; ...``: one image's line in the default output
    (semicolons: ImageNet's names hold commas, as in ``tabby, tabby cat``). The path and the
    class names, which come from the weights' metadata, are :func:`printable`."""
    top = "; ".join(f"{printable(p['class'])} {100 * p['probability']:.1f}%"
                    for p in item["top_k"])
    return f"{printable(item['path'])}: {top}"


def check_out_file(path: Path) -> None:
    """Refuse an ``--out`` with another suffix than .csv or .jsonl, or in no folder, at once."""
    from ..weights import check_output_file

    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: name the file to write, e.g. "
                         f"{path / 'predictions.csv'} or {path / 'predictions.jsonl'}")
    if path.suffix.lower() not in OUT_FORMATS:
        raise ValueError(f"--out {path}: the format comes from the suffix, "
                         f"{' or '.join(OUT_FORMATS)}")
    check_output_file(path)


# --------------------------------------------------------------------------------------------
# --out


def partial_path(out: Path) -> Path:
    """Where ``--out FILE`` writes until the last prediction is in."""
    return out.with_name(out.name + ".partial")


def record_path(out: Path) -> Path:
    """``FILE.partial.json``: which weights, top-k and flags write ``FILE.partial``, so that
    ``--resume`` can refuse to mix the rows of two models (a file of its own, so that the
    partial file stays plain CSV or JSON Lines)."""
    return out.with_name(out.name + ".partial.json")


def weights_identity(path: Path) -> dict[str, Any]:
    """A weights file's name, size and SHA-256: the same model, whatever the file is called."""
    from ..weights import file_sha256

    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def csv_header(top_k: int, classes: list[str] | None = None) -> list[str]:
    """``path``, the top-k pairs, a column per class of ``classes`` (``--probabilities``:
    each class's probability, named by it), ``error``."""
    return ["path", "class", "probability",
            *(f"{key}_{i}" for i in range(2, top_k + 1) for key in ("class", "probability")),
            *(classes or []), "error"]


@dataclass(frozen=True)
class Done:
    """What an interrupted run left in ``FILE.partial``.

    Attributes:
        paths: the images it holds a row for, in its order.
        unreadable: how many of those rows are errors (not retried: the run is resumed, not
            redone, and an unreadable file stays so).
        size: the bytes of its complete rows; a last row cut off mid-write is beyond them.
    """

    paths: list[str]
    unreadable: int
    size: int


def resume_point(out: Path, top_k: int, weights: dict[str, Any], files: list[Path],
                 written_with: dict[str, bool] | None = None,
                 classes: list[str] | None = None) -> Done | None:
    """What ``--resume`` keeps of ``FILE.partial``: None when there is none (the run starts
    from the first image).

    A refused resume changes nothing: every check is made before the file is touched.

    Raises:
        ValueError: the partial file was written by other weights, for another top-k or
            with(out) ``--tta`` or ``--probabilities``, does not parse, has no record of what
            wrote it, or holds images not among ``files``.
    """
    partial, record = partial_path(out), record_path(out)
    if not partial.exists():
        log.info("no %s to resume: predicting every image", partial)
        return None
    fix = "leave out --resume to start over"
    if not record.exists():
        raise ValueError(f"cannot resume {partial}: {record}, which says what wrote it, is "
                         f"missing; {fix}")
    try:
        written = json.loads(record.read_text(encoding="utf-8"))
        then, then_k = written["weights"], int(written["top_k"])
        then_sha256 = then["sha256"]
        # Records of earlier versions have neither: their runs had neither flag.
        then_with = {flag: bool(written.get(flag, False)) for flag in WRITTEN_WITH}
    except (ValueError, KeyError, TypeError, RecursionError):  # (RecursionError: too nested)
        raise ValueError(f"cannot resume {partial}: {record} does not parse; {fix}") from None
    if then_sha256 != weights["sha256"]:
        raise ValueError(f"cannot resume {partial}: it was written with other weights "
                         f"({then.get('file')}, {then.get('bytes')} bytes, sha256 "
                         f"{str(then_sha256)[:12]}...) than {weights['file']}; pass those, "
                         f"or {fix}")
    if then_k != top_k:
        raise ValueError(f"cannot resume {partial}: it holds the top {then_k} classes and this "
                         f"run the top {top_k}; pass --top-k {then_k}, or {fix}")
    for flag in WRITTEN_WITH:
        if then_with[flag] != (written_with or {}).get(flag, False):
            then, option = then_with[flag], "--" + flag.replace("_", "-")
            raise ValueError(f"cannot resume {partial}: it was written "
                             f"{'with' if then else 'without'} {option}; "
                             f"{'add' if then else 'leave out'} {option}, or {fix}")
    given = [str(f) for f in files]
    done = read_predictions(partial, out.suffix.lower(), top_k, given, classes)
    extra = Counter(done.paths) - Counter(given)
    if extra:
        count = sum(extra.values())
        raise ValueError(f"cannot resume {partial}: it holds {count} image"
                         f"{'s' * (count != 1)} not among those given (such as "
                         f"{next(iter(extra))}); pass the paths of the interrupted run, or {fix}")
    return done


def remaining(files: list[Path], done: list[str]) -> list[Path]:
    """``files`` less those done (as many times as they are done: a file named twice, as
    itself and in its folder, has two rows in an uninterrupted run too), in their order."""
    left = Counter(done)
    todo = []
    for f in files:
        if left[str(f)] > 0:
            left[str(f)] -= 1
        else:
            todo.append(f)
    return todo


def _complete_lines(f: Any) -> Iterator[tuple[str, int]]:
    """The lines of binary file ``f`` that end in a line break, decoded, with their bytes; a
    last line without one was cut off mid-write. Bytes that are not UTF-8 (a file name's, as
    :class:`PredictionsFile` writes them) come back as the path's str holds them."""
    for raw in f:
        if not raw.endswith(b"\n"):
            return
        yield raw.decode("utf-8", "surrogateescape"), len(raw)


def read_predictions(path: Path, fmt: str, top_k: int | None,
                     given: list[str] | None = None, classes: list[str] | None = None) -> Done:
    """The rows of a file that :class:`PredictionsFile` wrote (``fmt``: ``.csv`` or
    ``.jsonl``), each holding ``top_k`` classes (CSV columns; at most that many JSON items),
    or, for None, as many as the CSV header says. Read line by line: what is kept is the paths.

    A process killed mid-write leaves a last line without its line break (or, for a CSV path
    holding a line break, a row short of columns): that row is left out of :class:`Done`, to
    be written again. Anything else that is not a row of predict is refused. ``given``: the
    paths of this run; a short last row that is the start of one of them is a torn row even
    when the path holds a CRLF. ``classes``: the CSV's column per class (``--probabilities``).

    Raises:
        ValueError: the file does not parse, or holds another number of classes per row.
    """
    paths: list[str] = []
    unreadable = 0
    with open(path, "rb") as f:
        if fmt == ".jsonl":  # json.dumps escapes line breaks: every complete line is an item
            size = 0
            for number, (line, length) in enumerate(_complete_lines(f), 1):
                try:
                    item = json.loads(line)
                    path_of, classes = item["path"], len(item["top_k"])
                except (ValueError, KeyError, TypeError, RecursionError):
                    raise ValueError(f"cannot resume {path}: line {number} is not a prediction "
                                     f"item") from None
                # Fewer is no sign of another --top-k: a model whose export does not say how
                # many classes it has gives fewer than --top-k when it has fewer.
                if top_k is not None and classes > top_k:
                    raise ValueError(f"cannot resume {path}: line {number} holds the top "
                                     f"{classes} classes and this run the top {top_k}; pass "
                                     f"--top-k {classes}, or leave out --resume to start over")
                paths.append(str(path_of))
                unreadable += "error" in item
                size += length
            return Done(paths, unreadable, size)

        consumed = lines_read = 0  # bytes and lines the csv reader has taken

        def lines() -> Iterator[str]:
            nonlocal consumed, lines_read
            for line, length in _complete_lines(f):
                consumed += length
                lines_read += 1
                yield line

        reader = csv.reader(lines())
        header: list[str] | None = None
        end = end_line = 0  # bytes and lines of the complete rows
        try:
            for row in reader:
                if header is None:
                    header = row
                    check_csv_header(path, header, top_k, classes)
                elif len(row) != len(header):
                    # A row cut off after a line break in its quoted path is the last and
                    # short; one that holds a row's end (CRLF) swallowed rows that were there
                    # (an unclosed quote) and is refused with the others, unless it is the
                    # start of a path given (a path may hold a CRLF).
                    if next(reader, None) is None and (
                            not any("\r\n" in field for field in row)
                            or (len(row) == 1 and given is not None
                                and any(p.startswith(row[0]) for p in given))):
                        break
                    raise ValueError(f"cannot resume {path}: the row on line {end_line + 1} has "
                                     f"{len(row)} column{'s' * (len(row) != 1)}, not "
                                     f"{len(header)}")
                else:
                    paths.append(row[0])
                    unreadable += row[-1] != ""
                end, end_line = consumed, lines_read
        except csv.Error as e:
            raise ValueError(f"cannot resume {path}: line {reader.line_num} does not parse "
                             f"({e})") from None
    return Done(paths, unreadable, end)


def check_csv_header(path: Path, header: list[str], top_k: int | None,
                     columns: list[str] | None = None) -> None:
    """Refuse a CSV file whose header is not predict's for ``top_k`` classes (None: any)
    and, with ``--probabilities``, the ``columns`` of the model's classes."""
    if columns:
        if top_k is None or header != csv_header(top_k, columns):
            raise ValueError(f"cannot resume {path}: its first line is not the header predict "
                             f"--probabilities writes for these weights and --top-k "
                             f"({','.join(csv_header(top_k or 1, columns))})")
        return
    classes = (len(header) - 2) // 2
    if header != csv_header(max(classes, 1)):
        raise ValueError(f"cannot resume {path}: its first line is not the header predict "
                         f"writes ({','.join(csv_header(top_k or 1))})")
    if top_k is not None and classes != top_k:
        raise ValueError(f"cannot resume {path}: its columns hold the top {classes} classes "
                         f"and this run the top {top_k}; pass --top-k {classes}, or leave out "
                         f"--resume to start over")


def nothing_to_resume(out: Path, files: list[Path], as_json: bool, top_k: int,
                      weights: Path, classes: list[str] | None = None) -> int:
    """``--resume`` when ``--out FILE`` is complete (and no later run left a partial file):
    nothing is predicted again; the summary and exit code are those of the run that wrote it,
    so that a script may pass ``--resume`` every time.

    Raises:
        ValueError: FILE does not hold exactly the images given (another folder, images added
            since): resuming cannot make it so, predicting them again does.
    """
    if weights.stat().st_mtime > out.stat().st_mtime:
        raise ValueError(f"{out} is complete but older than {weights}: leave out --resume to "
                         f"predict the images with these weights")
    given = [str(f) for f in files]
    done = read_predictions(out, out.suffix.lower(), top_k, given, classes)
    if Counter(done.paths) != Counter(given):
        raise ValueError(f"{out} is complete but holds other images than those given: leave "
                         f"out --resume to predict them (a new {out.name} replaces it at the end)")
    record_path(out).unlink(missing_ok=True)  # left by a run killed right after its rename
    log.info("%s is complete: nothing to resume", out)
    print_summary(len(done.paths) - done.unreadable, done.unreadable, out, as_json)
    return 2 if done.unreadable else 0


class PredictionsFile:
    """``--out``: predictions written to ``FILE.partial`` as they are made, batch by batch,
    and renamed to FILE when the last one is in. So FILE only ever holds a complete set, and
    a run that is interrupted leaves its progress in ``FILE.partial``, and in
    ``FILE.partial.json`` the weights, top-k and flags (:data:`WRITTEN_WITH`) that wrote it
    (for ``--resume``; removed with the partial file).

    ``.csv``: ``path,class,probability,class_2,probability_2,...,error`` (``top_k`` pairs;
    with ``classes``, a column per class, named by it, before ``error``; ``error`` empty, or
    why the image could not be read). ``.jsonl``: one ``--json``
    "predictions" item per line.

    ``done``: what an interrupted run left (:func:`resume_point`); the rows go after its
    complete ones, and a last row it was cut off writing is removed first.
    """

    def __init__(self, path: Path, top_k: int, weights: dict[str, Any],
                 done: Done | None = None, written_with: dict[str, bool] | None = None,
                 classes: list[str] | None = None) -> None:
        from ..weights import atomic_write

        self.path, self.top_k, self.classes = path, top_k, classes or []
        self.partial, self.record = partial_path(path), record_path(path)
        self.committed = False
        if done is None:
            # The old record goes first and the new one comes once the old rows are gone: an
            # interruption in between leaves no record (refused), never one for rows it did
            # not write.
            self.record.unlink(missing_ok=True)
            # A new file ("x": never through a link planted under the name, which "w" would
            # follow and overwrite whatever it points to).
            self.partial.unlink(missing_ok=True)
            self.file = open(self.partial, "x", encoding="utf-8", errors="surrogateescape",  # noqa: SIM115
                             newline="")
            os.fsync(self.file.fileno())
            record = json.dumps({"weights": weights, "top_k": top_k, **(written_with or {})},
                                indent=2) + "\n"
            atomic_write(self.record, lambda tmp: Path(tmp).write_text(record, encoding="utf-8"))
        else:
            if self.partial.stat().st_size > done.size:
                log.info("%s: removed the last row, cut off mid-write; its image is predicted "
                         "again", self.partial)
                os.truncate(self.partial, done.size)
            self.file = open(self.partial, "a", encoding="utf-8", errors="surrogateescape",  # noqa: SIM115
                             newline="")
        self.csv = csv.writer(self.file) if path.suffix.lower() == ".csv" else None
        if self.csv is not None and (done is None or done.size == 0):
            self.csv.writerow(csv_header(top_k, classes))

    def write(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            if self.csv is None:
                self.file.write(json_text(item) + "\n")
                continue
            pairs = [value for p in item["top_k"] for value in (p["class"], p["probability"])]
            every = item.get("probabilities") or [""] * len(self.classes)
            self.csv.writerow([item["path"], *pairs, *[""] * (2 * self.top_k - len(pairs)),
                               *every, item.get("error", "")])
        self.file.flush()  # on disk for whoever watches, and kept if this process dies

    def commit(self) -> None:
        """Flush to disk and rename FILE.partial to FILE; FILE.partial.json goes after it (a
        crash in between leaves FILE complete, not a partial file that cannot be resumed)."""
        from ..weights import replace_file

        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:  # (tried again for a second on Windows, where a scanner may hold it a moment)
            replace_file(self.partial, self.path)
        except PermissionError as e:  # on Windows, FILE open in another program (Excel)
            raise PermissionError(
                f"cannot replace {self.path}: {e.strerror or e} (another program may have it "
                f"open); the predictions are in {self.partial}: close it, then run the same "
                "command with --resume to finish the file") from None
        self.record.unlink(missing_ok=True)
        self.committed = True

    def close(self) -> None:
        """Close, leaving FILE.partial (a run that did not finish)."""
        self.file.close()
