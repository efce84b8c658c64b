"""Reliability: bad data, bad arguments, and crashes of every kind a long run meets.

* Bad data: decompression bombs and truncated files in a training folder read by DataLoader
  worker processes; ``predict`` on files that are missing or not images.
* Bad arguments: one parametrized table of CLI mistakes across every subcommand; each must
  end in one line on stderr that names the problem, exit code 2, no traceback.
* Crashes: SIGTERM (checkpoint and exit 143), SIGKILL at any moment (resume gives the same
  weights, bit for bit), a crash between the weights and the checkpoint, a loss that turns NaN,
  a full disk while saving, and torchrun restarting a job whose worker died.

The exactness checks compare against an uninterrupted run with the same arguments; on CPU with
``--deterministic`` the weights agree bit for bit. The default-suite variants train on a folder
of 56 images of 8x8 pixels (under a second an epoch), in this process or in a real
``python -m mobilenetv2`` subprocess; the ``slow`` ones run the digits command of
docs/reliability.md as a user would type it, and a real 2-process torchrun job.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file

from mobilenetv2 import create_model, save_weights
from mobilenetv2 import train as train_module
from mobilenetv2.checkpoint import load_checkpoint
from mobilenetv2.cli import main

TESTS = Path(__file__).parent
# The digits run of docs/reliability.md, for the slow tests.
DIGITS_16 = ["--data", "digits", "--resolution", "16", "--model", "mobilenet_v2_035",
             "--epochs", "3", "--seed", "0", "--deterministic", "--device", "cpu", "--device", "cpu", "--no-tensorboard"]


def run_cli(*args: object) -> int:
    """The CLI's exit code, whether it returns it or argparse exits."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


def error_line(err: str, alone: bool = True) -> str:
    """The one line a failed command printed on stderr: all it printed when ``alone``, else
    the one error line after a run's progress lines."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if not alone:
        lines = [line for line in lines if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def assert_same_weights(expected: Path, actual: Path, name: str = "last.safetensors") -> None:
    a, b = load_file(expected / name), load_file(actual / name)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metrics(run: Path) -> list[tuple[str, ...]]:
    """metrics.csv's rows; the train loss to 6 digits, since a resumed epoch adds its running
    sum in two parts."""
    return [(row["epoch"], f"{float(row['train_loss']):.6g}", row["val_loss"], row["val_top1"])
            for row in csv.DictReader((run / "metrics.csv").open())]


def spawn_train(*args: object) -> subprocess.Popen:
    """``python -m mobilenetv2 train ...`` as a user starts it, on one thread like this process
    (so its arithmetic is the same), with stderr piped for its progress lines."""
    return subprocess.Popen([sys.executable, "-m", "mobilenetv2", "train", *map(str, args)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


# --------------------------------------------------------------------------------------------
# Fixtures: data and the uninterrupted runs the resumed ones must equal


def write_tiny_folder(root: Path, per_class: tuple[int, int] = (24, 4)) -> Path:
    """Two classes of 8x8 images (bright left or right half) in train/ and val/."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(("left", "right")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 96, (8, 8, 3), dtype=np.uint8)
                pixels[:, 4 * c:4 * c + 4] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("tiny"))


def folder_args(folder: Path, epochs: int = 2, workers: int = 0) -> list[object]:
    """A run on the tiny folder: 12 steps of 4 images per epoch, under a second."""
    return ["--data", folder, "--resolution", "8", "--model", "mobilenet_v2_035", "--epochs",
            epochs, "--batch-size", "4", "--workers", workers, "--seed", "0", "--deterministic", "--device", "cpu",
            "--no-tensorboard", "--log-every", "1"]


@pytest.fixture(scope="module")
def folder_runs(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """The tiny folder trained 2 epochs uninterrupted ("whole"), and 1 epoch ("half"): with one
    warm-up epoch, the first epoch's schedule is the same whatever --epochs says, so "half" is
    exactly the first checkpoint of "whole"."""
    root = tmp_path_factory.mktemp("folder-runs")
    assert run_cli("train", *folder_args(tiny_folder, 2), "--out", root / "whole") == 0
    assert run_cli("train", *folder_args(tiny_folder, 1), "--out", root / "half") == 0
    return {"whole": root / "whole", "half": root / "half"}


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / run.name
    shutil.copytree(run, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, out=str(out))))
    return out


# --------------------------------------------------------------------------------------------
# 2. Bad data


def png_bomb(path: Path, side: int = 100_000) -> Path:
    """A 200-byte PNG that declares side x side pixels: decoding it would take 30 GB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))
    return path


def add_bad_images(folder: Path) -> list[str]:
    png_bomb(folder / "train" / "left" / "bomb.png")
    good = (folder / "train" / "right" / "0.png").read_bytes()
    (folder / "train" / "right" / "truncated.png").write_bytes(good[:len(good) // 2])
    return ["bomb.png", "truncated.png"]


def test_an_epoch_in_worker_processes_skips_a_bomb_and_a_truncated_image_naming_each(
        tmp_path, capfd):
    folder = write_tiny_folder(tmp_path / "data", per_class=(8, 2))
    bad = add_bad_images(folder)
    assert run_cli("train", *folder_args(folder, 2, workers=1), "--out", tmp_path / "run") == 0
    err = capfd.readouterr().err  # fd-level: the warnings come from the worker processes
    for name in bad:  # named once, not in every epoch (a 200-epoch run: 200 lines a file)
        assert err.count(f"{name} is not a readable image") == 1, name
    assert err.count("skipped 2 unreadable training") == 2  # but counted in each
    assert load_checkpoint(tmp_path / "run")["state"]["epoch"] == 2


def test_a_loader_alive_at_exit_does_not_hang_the_interpreter(tmp_path):
    # Our workers ignore SIGTERM (a scheduler signals the whole job); Python ends the workers
    # still alive at exit with SIGTERM and waits for them. A loader alive until then (here a
    # global; in pytest, a cycle kept the trainer's) hung the exit for good.
    script = tmp_path / "keep.py"
    script.write_text(
        "import torch\n"
        "from mobilenetv2.data import ShardedBatchSampler\n"
        "from mobilenetv2.train import make_loader\n"
        "data = [(torch.zeros(1), 0)] * 8\n"
        "LOADER = make_loader(data, ShardedBatchSampler(8, 4, shuffle=False), 1, torch.device('cpu'))\n"
        "assert next(iter(LOADER))[0].shape == (4, 1)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]


def test_strict_stops_at_a_bomb_read_by_a_worker_process_in_one_line(tmp_path, capfd):
    folder = write_tiny_folder(tmp_path / "data", per_class=(8, 2))
    png_bomb(folder / "train" / "left" / "bomb.png")
    args = folder_args(folder, 1, workers=1)
    assert run_cli("train", *args, "--strict", "--out", tmp_path / "run") == 2
    line = error_line(capfd.readouterr().err, alone=False)
    assert "bomb.png" in line and "--strict" in line


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> Path:
    """Weights shaped like a digits run's (1 channel, 16x16, 10 classes), without training."""
    model = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    model.meta.update(mean=[0.5], std=[0.25], input_size=[1, 16, 16],
                      class_names=[str(i) for i in range(10)])
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    save_weights(model, path)
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# (the path, what the one line says, and whether it stops the run before any work).
PREDICT_INPUTS = {
    "missing file": (lambda d: d / "missing.png", "no such file", True),
    "text file": (lambda d: _written(d / "notes.png", b"not an image"), "not a readable image", False),
    "truncated image": (lambda d: _written(d / "cut.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
                        "not a readable image", False),
    "decompression bomb": (lambda d: png_bomb(d / "bomb.png"), "not a readable image", False),
    "folder without images": (lambda d: _written(d / "empty" / "notes.txt", b"") and d / "empty",
                              "holds no images", True),
}


@pytest.mark.parametrize("case", list(PREDICT_INPUTS))
def test_predict_on_a_missing_or_unreadable_file_is_one_line_and_exit_2(
        case, digits_weights, tmp_path, capsys):
    """A path that is not there stops predict before any work (an error); an image that cannot
    be read is a warning, and its item in the output says why (the other images would still be
    classified: tests/test_predict.py)."""
    make, needle, fatal = PREDICT_INPUTS[case]
    (tmp_path / "empty").mkdir()
    path = make(tmp_path)
    assert run_cli("predict", "--weights", digits_weights, path, "--json") == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert needle in line and path.name in line
    if fatal:
        assert "error:" in line and captured.out == ""
    else:
        assert line.startswith("warning: ")
        (item,) = json.loads(captured.out)["predictions"]
        assert item["path"] == str(path) and item["top_k"] == [] and needle in item["error"]


# --------------------------------------------------------------------------------------------
# 3. Bad arguments


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, digits_weights) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    seed = create_model("seed", input_width=32, num_classes=10)
    save_weights(seed, root / "seed.safetensors")
    hundred = root / "hundred"
    for split in ("train", "val"):
        for c in range(100):
            (hundred / split / f"class{c:03d}").mkdir(parents=True)
            Image.new("L", (8, 8), c).save(hundred / split / f"class{c:03d}" / "0.png")
    (root / "file").write_text("a regular file")
    (root / "photos.tar.gz").write_bytes(b"\x1f\x8b")
    (root / "unknown.yaml").write_text("epochs: 1\nlearning_rate: 0.1\n")
    (root / "broken.yaml").write_text("epochs: [1,\n")
    (root / "typed.yaml").write_text("batch-size: eight\n")
    (root / "exponent.yaml").write_text("lr: 1e-3\n")
    (root / "edited").mkdir()
    (root / "folder.onnx").mkdir()
    (root / "exported.onnx").write_bytes(b"\x08\x08")  # known by its name before it is read
    (root / "edited" / "config.json").write_text(json.dumps({"epochs": "3", "out": "edited"}))
    (root / "image.png").write_bytes((hundred / "val" / "class001" / "0.png").read_bytes())
    for folder in ("onlyval/val/a", "oneclass/a", *(f"renamed/val/digit{d}" for d in range(10)),
                   "subset/train/3", "subset/train/7", "subset/val/3", "subset/val/7"):
        (root / "data" / folder).mkdir(parents=True)
        Image.new("L", (8, 8)).save(root / "data" / folder / "0.png")
    return {"weights": digits_weights, "seed": root / "seed.safetensors", "hundred": hundred,
            "file": root / "file", "unknown": root / "unknown.yaml",
            "broken": root / "broken.yaml", "typed": root / "typed.yaml",
            "exponent": root / "exponent.yaml",
            "edited": root / "edited", "image": root / "image.png", "tmp": root,
            "onlyval": root / "data" / "onlyval", "oneclass": root / "data" / "oneclass",
            "renamed": root / "data" / "renamed", "subset": root / "data" / "subset"}


TRAIN = ["train", "--resolution", "16", "--model", "mobilenet_v2_035", "--epochs", "1"]
# (arguments, what the one line must say); {name} is a path from cli_files.
MISTAKES = {
    "unknown subcommand": (["fit"], "invalid choice: 'fit'"),
    "train: unknown model": (["train", "--model", "mobilenet_v3"], "unknown model 'mobilenet_v3'; choose one of"),
    "train: batch size 0": ([*TRAIN, "--batch-size", "0"], "--batch-size: must be a positive integer"),
    "train: batch size not a number": ([*TRAIN, "--batch-size", "ten"], "--batch-size"),
    "train: epochs 0": ([*TRAIN[:-1], "0"], "--epochs: must be a positive integer"),
    "train: negative lr": ([*TRAIN, "--lr", "-1"], "--lr: must be > 0"),
    "train: unknown optimizer": ([*TRAIN, "--optimizer", "lamb"], "invalid choice: 'lamb'"),
    "train: label smoothing 1.5": ([*TRAIN, "--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    "train: resolution 4": ([*TRAIN[:2], "4", *TRAIN[3:]], "--resolution must be from 8 to 8192"),
    "export: a typo'd resolution": (["export", "--weights", "{weights}", "--out", "{tmp}/m.onnx",
                                     "--resolution", "22400"], "must be at most 8192 pixels"),
    "eval: a typo'd resolution": (["eval", "--weights", "{weights}", "--resolution", "100000"],
                                  "must be at most 8192 pixels"),
    "train: seed variant at 16 px": (["train", "--model", "seed", "--resolution", "16", "--epochs", "1"],
                                     "multiple of 32"),
    "train: seed variant at 48 px": (["train", "--model", "seed", "--resolution", "48", "--epochs", "1"],
                                     "multiple of 32"),
    "train: model and width": ([*TRAIN, "--model", "mobilenet_v2_100", "--width-mult", "0.5"],
                               "give either --model or --width-mult"),
    "train: infinite width": (["train", "--width-mult", "inf", "--epochs", "1"],
                              "--width-mult must be a finite number > 0"),
    # (config.json and --print-config would hold Infinity, which is not JSON)
    "train: infinite lr": ([*TRAIN, "--lr", "inf"], "--lr must be a finite number > 0"),
    "train: infinite warm-up": ([*TRAIN, "--warmup-epochs", "inf"],
                                "--warmup-epochs must be a finite number >= 0"),
    "train: infinite grad clip": ([*TRAIN, "--grad-clip", "inf"],
                                  "--grad-clip must be a finite number > 0"),
    "train: infinite weight decay": ([*TRAIN, "--weight-decay", "inf"],
                                     "--weight-decay must be a finite number >= 0"),
    "train: infinite mixup alpha": ([*TRAIN, "--mixup-alpha", "inf"],
                                    "--mixup-alpha and --cutmix-alpha must be finite numbers"),
    "train: infinite decay period": ([*TRAIN, "--lr-decay-epochs", "inf"],
                                     "lr_decay_epochs a finite number > 0"),
    "train: negative momentum": ([*TRAIN, "--momentum", "-1"], "--momentum must be in [0, 1)"),
    "train: YAML exponent read as text": ([*TRAIN, "--config", "{exponent}"],
                                          "write 1.0e-3 or 0.001"),
    "train: width for the seed variant": (["train", "--model", "seed", "--width-mult", "0.5"],
                                          "--grad-checkpointing do not apply to the seed variant: drop them"),
    "train: pixel input without int8": ([*TRAIN, "--pixel-input"], "--pixel-input chooses the input of "
                                        "the models --int8 writes: add --int8"),
    "train: drop path of 1": ([*TRAIN, "--drop-path", "1"], "--drop-path must be in [0, 1)"),
    "train: unknown device": ([*TRAIN, "--device", "tpu"], "--device 'tpu' is not a device"),
    # Apple's GPUs: float64 metrics, which MPS lacks, ended in a traceback after loading
    "train: Apple's GPU": ([*TRAIN, "--device", "mps"], "--device mps: Apple's GPUs are not supported"),
    "eval: a device torch knows but this package does not run on": (
        ["eval", "--weights", "{weights}", "--device", "xla"], "--device 'xla' is not supported here"),
    "train: missing data folder": ([*TRAIN, "--data", "{tmp}/nowhere"], "is not digits, cifar10"),
    "train: an archive as data": ([*TRAIN, "--data", "{tmp}/photos.tar.gz"],
                                  "is an archive: unpack it (tar xf "),
    "eval: a file as data": (["eval", "--weights", "{weights}", "--data", "{file}"],
                             "is a file: pass the folder of images"),
    "train: folder without train/": ([*TRAIN, "--data", "{onlyval}"], "has no train/ folder"),
    "train: the folder above the data": ([*TRAIN, "--data", "{tmp}"], "holds dataset splits: pass --data"),
    "train: one class": ([*TRAIN, "--data", "{oneclass}"], "has images in one class"),
    "train: out under a regular file": ([*TRAIN, "--out", "{file}/run"], "cannot create the output folder"),
    "train: config with unknown keys": ([*TRAIN, "--config", "{unknown}"], "unknown keys: learning_rate"),
    "train: config that does not parse": ([*TRAIN, "--config", "{broken}"], "does not parse"),
    "train: config with a wrong type": ([*TRAIN, "--config", "{typed}"], "batch_size must be int, got 'eight' (str)"),
    "train: resume of a hand-edited config.json": (["train", "--resume", "{edited}"],
                                                   "epochs must be int, got '3' (str)"),
    "train: missing config": ([*TRAIN, "--config", "{tmp}/none.yaml"], "config file not found"),
    "train: resume of no run": (["train", "--resume", "{tmp}"], "holds no run to resume"),
    "train: missing pretrained weights": ([*TRAIN, "--pretrained", "{tmp}/none.pth"], "weights file not found"),
    "train: distillation without a teacher": ([*TRAIN, "--distill-weight", "0.5"],
                                              "shape the loss of a teacher: add --teacher WEIGHTS"),
    "train: missing teacher": ([*TRAIN, "--teacher", "{tmp}/none.safetensors"],
                               "--teacher: weights file not found"),
    "train: teacher of other classes": ([*TRAIN, "--data", "{hundred}", "--teacher", "{seed}"],
                                        "has 10 classes but"),
    "train: RGB teacher for gray images": ([*TRAIN, "--teacher", "{seed}"],
                                           "takes 3-channel images but digits has 1"),
    "eval: missing weights": (["eval", "--weights", "{tmp}/none.safetensors"], "weights file not found"),
    "eval: 10-class model on 100 classes": (["eval", "--weights", "{weights}", "--data", "{hundred}"],
                                            "has 10 classes but"),
    "eval: class folders named otherwise": (["eval", "--weights", "{weights}", "--data", "{renamed}"],
                                            "10 of the 10 classes of"),
    "eval: batch size 0": (["eval", "--weights", "{weights}", "--batch-size", "0"], "--batch-size"),
    "eval: seed variant at another size": (["eval", "--weights", "{seed}", "--resolution", "64"],
                                           "takes no other size: pass --resolution 32"),
    "eval: crop-pct above 1": (["eval", "--weights", "{weights}", "--crop-pct", "1.5"],
                               "--crop-pct must be in [0.05, 1], got 1.5"),
    "eval: a run folder as weights": (["eval", "--weights", "{tmp}"], "is a folder: pass the weights file"),
    "predict: top-k 0": (["predict", "--weights", "{weights}", "{image}", "--top-k", "0"], "--top-k"),
    "predict: missing weights": (["predict", "--weights", "{tmp}/none.pth", "{image}"], "weights file not found"),
    "predict: a folder named like a model": (["predict", "--weights", "{tmp}/folder.onnx", "{image}"],
                                             "folder.onnx is a folder: pass the model file in it"),
    "predict: a folder as --out": (["predict", "--weights", "{weights}", "{image}", "--out", "{tmp}"],
                                   "is a folder: name the file to write"),
    "predict: no image given": (["predict", "--weights", "{weights}"], "required: PATH"),
    "predict: resume without out": (["predict", "--weights", "{weights}", "{image}", "--resume"],
                                    "--resume continues the FILE.partial of an interrupted --out FILE: add --out"),
    "summary: unknown model": (["summary", "--model", "mobilenet_v2_999"], "unknown model"),
    "summary: seed variant at 48 px": (["summary", "--model", "seed", "--resolution", "48"], "multiple of 32"),
    "summary: model and width": (["summary", "--model", "mobilenet_v2_100", "--width-mult", "0.5"],
                                 "give either --model or --width-mult"),
    "export: unknown format": (["export", "--weights", "{weights}", "--format", "tflite", "--out", "{tmp}/m.x"],
                               "unknown export format 'tflite'"),
    "export: format not given": (["export", "--weights", "{weights}", "--out", "{tmp}/m.x"],
                                 "cannot tell the format"),
    "export: out under a regular file": (["export", "--weights", "{weights}", "--format", "onnx", "--out",
                                          "{file}/m.onnx"], "cannot write --out"),
    "export: seed variant at 48 px": (["export", "--weights", "{seed}", "--format", "onnx", "--out",
                                       "{tmp}/s.onnx", "--resolution", "48"], "48"),
    "export: missing weights": (["export", "--weights", "{tmp}/none.pth", "--out", "{tmp}/m.onnx"],
                                "weights file not found"),
    # (it was ignored: a file meant for batch 1, for NNAPI or Core ML, took any batch)
    "export: batch size without --static-batch": (["export", "--weights", "{weights}", "--out",
                                                   "{tmp}/m.onnx", "--batch-size", "1"],
                                                  "--batch-size 1 fixes the batch only with --static-batch"),
    "quantize: an exported model": (["quantize", "--weights", "{tmp}/exported.onnx", "--data",
                                     "digits", "--out", "{tmp}/q.onnx"],
                                    "is an exported model: quantize starts from the float"),
    "quantize: 10-class model on 100 classes": (["quantize", "--weights", "{weights}", "--data", "{hundred}",
                                                 "--out", "{tmp}/q.onnx"], "has 10 classes but"),
    "quantize: two of the ten classes": (["quantize", "--weights", "{weights}", "--data", "{subset}",
                                          "--out", "{tmp}/q.onnx"], "but not one for one"),
    "quantize: pixel input without data": (["quantize", "--weights", "{weights}", "--out", "{tmp}/q.onnx",
                                            "--pixel-input"], "--pixel-input and --strict work on --data"),
    "quantize: unknown method": (["quantize", "--weights", "{weights}", "--data", "digits", "--out",
                                  "{tmp}/q.onnx", "--method", "magic"], "unknown calibration method"),
    "quantize: out under a regular file": (["quantize", "--weights", "{weights}", "--data", "digits",
                                            "--out", "{file}/q.onnx"], "cannot write"),
    "quantize: batch size 0": (["quantize", "--weights", "{weights}", "--data", "digits", "--out",
                                "{tmp}/q.onnx", "--batch-size", "0"], "--batch-size"),
    "bench: unknown backend": (["bench", "--backends", "tensorrt"], "unknown backend 'tensorrt'"),
    "bench: batch size 0": (["bench", "--batch-sizes", "0"], "expected positive integers"),
    "bench: unknown model": (["bench", "--model", "resnet50"], "unknown model"),
    "bench: missing weights": (["bench", "--weights", "{tmp}/none.safetensors", "--no-references"],
                               "not found"),
}


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 240000000000 bytes. Error code 12"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_running_out_of_memory_is_one_line_with_what_to_lower_and_exit_1(error, monkeypatch,
                                                                         capsys):
    from mobilenetv2.cli import summary

    def run(args):
        raise error

    monkeypatch.setattr(summary, "run", run)
    assert run_cli("summary") == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mobilenetv2 summary: error: out of memory (")
    assert line.endswith("lower the batch size or the resolution (--batch-size, --resolution)")
    monkeypatch.setattr(summary, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError stays a bug report
        run_cli("summary")


def test_an_out_on_a_read_only_file_system_is_refused_before_any_work(
        cli_files, tmp_path, monkeypatch, capsys):
    # Tests run as root, which chmod does not stop: os.access says what a read-only mount says.
    import errno

    from mobilenetv2 import export

    read_only = tmp_path / "ro"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        Path(path) != read_only and access(path, mode, **kw)))
    monkeypatch.setattr(export, "export_model", lambda *a, **kw: pytest.fail("exported"))
    for args in (["export", "--weights", cli_files["weights"], "--out", read_only / "m.onnx"],
                 ["quantize", "--weights", cli_files["weights"], "--data", "digits", "--out",
                  read_only / "m_int8.onnx"],
                 ["predict", "--weights", cli_files["weights"], cli_files["image"], "--out",
                  read_only / "p.csv"],
                 ["train", *TRAIN[1:], "--out", read_only]):
        assert run_cli(*args) == 2, args
        assert "not writable" in error_line(capsys.readouterr().err)
    assert list(read_only.iterdir()) == []

    def read_only_runs(parent):
        raise OSError(errno.EROFS, "Read-only file system", str(parent))

    monkeypatch.setattr(train_module, "new_run_folder", read_only_runs)
    assert run_cli(*TRAIN) == 2  # no --out: runs/ in a read-only working directory
    assert error_line(capsys.readouterr().err) == (
        "mobilenetv2 train: error: cannot create the output folder runs/: Read-only file "
        "system; pass --out a folder that can be created")


def test_a_reader_that_stops_early_ends_the_command_quietly_with_sigpipes_code(
        cli_files, tmp_path):
    # predict ... | head -1 printed "error: [Errno 32] Broken pipe" and exited 1, as a failed run.
    for i in range(40):
        shutil.copy(cli_files["image"], tmp_path / f"{i}.png")
    command = (f"{sys.executable} -m mobilenetv2 predict --weights {cli_files['weights']} "
               f"{tmp_path} --batch-size 1 --workers 0 | head -n 1; exit ${{PIPESTATUS[0]}}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.stdout.startswith(str(tmp_path)) and done.stdout.count("\n") == 1
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")


def test_a_closed_stdout_ends_quietly_where_signal_has_no_sigpipe(monkeypatch, capsys):
    # Windows' signal module has no SIGPIPE: the handler raised AttributeError, a traceback.
    from mobilenetv2.cli import summary

    def run(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(summary, "run", run)
    monkeypatch.delattr(signal, "SIGPIPE")
    assert run_cli("summary") == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_cli_mistake_is_one_line_naming_it_and_exit_2(mistake, cli_files, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a mistake that slipped through would write runs/ here
    args, needle = MISTAKES[mistake]
    args = [a.format(**cli_files) for a in args]
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert line.startswith("mobilenetv2"), line
    assert needle in line, line
    assert captured.out == ""


@pytest.mark.parametrize("args", [["train"], ["eval", "--weights", "w"],
                                  ["predict", "--weights", "w", "p.jpg"],
                                  ["export", "--weights", "w", "--out", "m.onnx"],
                                  ["quantize", "--weights", "w", "--out", "m.onnx"], ["bench"],
                                  ["summary"]])
def test_an_unknown_option_is_refused_by_its_subcommand_in_one_line(args, capsys):
    """As reliability.md says of every error: 'mobilenetv2 COMMAND: error: ... (for usage:
    mobilenetv2 COMMAND -h)', not the top-level parser's 'mobilenetv2: error:'."""
    assert run_cli(*args, "--no-such-option") == 2
    line = error_line(capsys.readouterr().err)
    assert line == (f"mobilenetv2 {args[0]}: error: unrecognized arguments: --no-such-option "
                    f"(for usage: mobilenetv2 {args[0]} -h)")


@pytest.mark.parametrize("args, hint", [
    (["trian"], "; did you mean 'train'?"),
    (["train", "--epochz", "1"], "; --epochz: did you mean --epochs?"),
    (["train", "--bath-size=8"], "; --bath-size: did you mean --batch-size?"),
    (["train", "--optimizer", "adam"], "; did you mean 'adamw'?"),
    # argparse stops at the missing --weights first and never names the misspelling
    (["predict", "--wieghts", "w", "p.jpg"], "required: --weights; --wieghts: did you mean --weights?"),
])
def test_a_mistyped_option_or_choice_names_the_closest_spelling(args, hint, capsys):
    assert run_cli(*args) == 2
    captured = capsys.readouterr()
    line = error_line(captured.err)
    assert f"{hint} (for usage: mobilenetv2" in line, line
    assert captured.out == ""


# --------------------------------------------------------------------------------------------
# 4. Crashes: signals


def _wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    process.kill()
    pytest.fail(f"no {needle!r} line; stderr was:\n{''.join(lines)[-3000:]}")


def sigterm_after_the_first_epoch(args: list[object], out: Path) -> None:
    """Start a run, SIGTERM it once epoch 1 is logged; check it saved mid-epoch and exited 143."""
    process = spawn_train(*args, "--out", out)
    _wait_for_line(process, "train loss")  # the end of epoch 1: its checkpoint is written
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received" in err and "checkpoint saved" in err
    state = load_checkpoint(out)["state"]
    assert state["epoch"] == 1 and state["step"] > 0  # stopped inside epoch 2, not at its end


def test_sigterm_saves_a_checkpoint_and_resume_gives_the_uninterrupted_weights(
        tiny_folder, folder_runs, tmp_path):
    out = tmp_path / "run"
    sigterm_after_the_first_epoch(folder_args(tiny_folder), out)
    assert run_cli("train", "--resume", out) == 0
    assert_same_weights(folder_runs["whole"], out)
    assert metrics(out) == metrics(folder_runs["whole"])


def test_sigterm_to_the_whole_process_group_with_worker_processes_saves_and_exits_143(
        tiny_folder, tmp_path):
    # SLURM's preemption (and kill -- -PGID, Ctrl-C) signals the DataLoader workers too: a
    # worker killed by it used to end the run in a traceback, exit 1 and no checkpoint.
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mobilenetv2", "train", *map(str, folder_args(tiny_folder, 3, 2)),
         "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    _wait_for_line(process, "train loss")  # the workers of both loaders are running
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and err.count("SIGTERM received") == 1, err[-3000:]
    assert load_checkpoint(out)["state"]["epoch"] >= 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_with_that_signals_exit_code(signum, monkeypatch, capsys):
    # The exit code is the signal's: 143, not 130 (SIGINT's), so a requeue-on-143 script
    # still requeues.
    from mobilenetv2.cli import summary
    from mobilenetv2.distributed import DistEnv

    stop = train_module.StopSignal(DistEnv(), torch.device("cpu"))

    def run(args):
        stop._handle(signum, None)
        # A scheduler that sends SIGTERM twice within milliseconds (slurmstepd, and srun that
        # forwards it) asks once: the run still saves. A second signal later stops at once.
        stop._handle(signum, None)
        assert stop.requested == signum
        stop.requested_at -= stop.REPEAT_WINDOW
        stop._handle(signum, None)

    monkeypatch.setattr(summary, "run", run)
    assert run_cli("summary") == 128 + signum
    assert capsys.readouterr().err.strip().endswith(
        "interrupted" if signum == signal.SIGINT else "interrupted by SIGTERM")


def test_a_folder_another_process_trains_in_is_refused_in_one_line_touching_nothing(
        tmp_path, capsys):
    # Two resumes of one run (a requeued job whose first instance still saves), or two runs
    # started with one --out at once, trained twice and wrote each other's files.
    out = tmp_path / "run"
    out.mkdir()
    held = train_module.lock_run_folder(out)  # as the other process holds it
    assert held is not None
    try:
        assert run_cli("train", "--data", "digits", "--epochs", "1", "--out", out) == 2
        assert "in use by another training process" in error_line(capsys.readouterr().err)
        assert list(out.iterdir()) == []
        (out / "config.json").write_text(json.dumps({"data": "digits", "out": str(out)}))
        assert run_cli("train", "--resume", out) == 2
        assert "in use by another training process" in error_line(capsys.readouterr().err)
        assert [p.name for p in out.iterdir()] == ["config.json"]
    finally:
        held.release()
    again = train_module.lock_run_folder(out)  # released by the process that held it
    assert again is not None
    # A forked DataLoader worker outlives a SIGKILL of its trainer by seconds: it must not
    # keep the lock (shared by fork) and refuse the resume that follows.
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    started = fork.Event()

    def work() -> None:
        started.set()  # (after the fork's hooks)
        time.sleep(30)

    worker = fork.Process(target=work)
    worker.start()
    try:
        assert started.wait(60)
        again.release()  # as the trainer's death does
        after = train_module.lock_run_folder(out)
        assert after is not None
        after.release()
    finally:
        worker.kill()
        worker.join()


def test_sigkill_right_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
        tiny_folder, folder_runs, tmp_path):
    out = tmp_path / "run"
    process = spawn_train(*folder_args(tiny_folder), "--out", out)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    assert run_cli("train", "--resume", out) == 0
    assert_same_weights(folder_runs["whole"], out)
    assert metrics(out) == metrics(folder_runs["whole"])


def test_resume_removes_what_a_killed_save_left_half_written(folder_runs, tmp_path):
    out = copy_run(folder_runs["half"], tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID now names no process
    stale = out / f".checkpoint.pt.tmp-{gone.pid}"
    stale.write_bytes(b"half a checkpoint")
    writing = out / f".last.safetensors.tmp-{os.getppid()}"  # a writer that is still alive
    writing.write_bytes(b"in progress")
    # A container restarted after a kill gives the new process the PID of the old one.
    # (a file this run does not write again: --int8's, so the run cannot replace it)
    own = out / f".model.onnx.tmp-{os.getpid()}"
    own.write_bytes(b"half the model of a killed process that had this PID")
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0
    assert not stale.exists() and writing.exists() and not own.exists()
    assert_same_weights(folder_runs["whole"], out)


def test_each_session_of_a_run_is_recorded_and_the_weights_say_what_trained_them(folder_runs, tmp_path):
    # config.json held the options alone and the weights nothing of their run: which torch,
    # machine, command and data made a model could not be told afterwards.
    import torchvision

    import mobilenetv2
    from mobilenetv2.weights import read_weights

    out = copy_run(folder_runs["half"], tmp_path)
    (first,) = json.loads((out / "run.json").read_text())["sessions"]
    assert (first["mobilenetv2"], first["torch"], first["torchvision"]) == (
        mobilenetv2.__version__, torch.__version__, torchvision.__version__)
    assert first["command"] == sys.argv and first["resumed_at_epoch"] is None
    assert (first["device"], first["processes"], first["threads"]) == ("cpu", 1, torch.get_num_threads())
    assert [first["data"][split]["images"] for split in ("train", "val")] == [48, 8]
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert sessions[0] == first and sessions[1]["resumed_at_epoch"] == 1
    assert sessions[1]["data"] == first["data"] and sessions[1]["started"] >= first["started"]
    training = read_weights(out / "last.safetensors").meta["training"]
    assert training["data"] == first["data"] and training["epoch"] == 2
    assert training["torch"] == torch.__version__ and training["config"]["seed"] == 0
    # Nothing of the folder or the time: the same run trained elsewhere says the same.
    assert training == read_weights(folder_runs["whole"] / "last.safetensors").meta["training"]
    assert (out / "last.safetensors").read_bytes() == (folder_runs["whole"] / "last.safetensors").read_bytes()


def test_the_weights_training_record_names_no_folder_of_the_machine(folder_runs, tiny_folder, tmp_path):
    # meta["training"]["config"] held --data, --pretrained and --teacher as typed: the absolute
    # paths of the user's machine (/home/alice/clients/acme/...) went into every weights file
    # and every export of it, which are the files that are shared.
    from mobilenetv2.weights import read_weights

    start = folder_runs["whole"] / "last.safetensors"
    assert run_cli("train", *folder_args(tiny_folder, 1), "--pretrained", start,
                   "--teacher", start, "--out", tmp_path / "run") == 0
    weights = (tmp_path / "run" / "best.safetensors").read_bytes()
    for folder in (tiny_folder, folder_runs["whole"], tmp_path):
        assert str(folder).encode() not in weights, folder
    config = read_weights(tmp_path / "run" / "best.safetensors").meta["training"]["config"]
    assert (config["data"], config["pretrained"], config["teacher"]) == (
        tiny_folder.name, "last.safetensors", "last.safetensors")
    assert config["model"] == "mobilenet_v2_035" and "out" not in config


def test_the_data_fingerprint_follows_the_file_list_not_where_the_folder_is(
        tiny_folder, tmp_path, monkeypatch):
    from mobilenetv2.data import build_datasets, data_fingerprint

    def fingerprint(folder: Path, root: Path | None = None) -> dict:
        data = build_datasets(str(folder), resolution=8)
        return {split: data_fingerprint(getattr(data, split), root or folder) for split in ("train", "val")}

    before = fingerprint(tiny_folder)
    moved = shutil.copytree(tiny_folder, tmp_path / "elsewhere")
    assert fingerprint(moved) == before
    monkeypatch.chdir(tmp_path)  # --data given relative to where the run starts
    assert fingerprint(Path("elsewhere")) == fingerprint(Path("elsewhere"), moved) == before
    (moved / "train" / "left" / "0.png").rename(moved / "train" / "right" / "moved.png")
    after = fingerprint(moved)
    assert after["train"]["images"] == before["train"]["images"]
    assert after["train"]["sha256"] != before["train"]["sha256"] and after["val"] == before["val"]
    digits = build_datasets("digits", resolution=8)
    assert data_fingerprint(digits.train, "data")["images"] == 1437
    assert data_fingerprint(digits.train, "data") == data_fingerprint(
        build_datasets("digits", resolution=16).train, "data")  # the split, at any size


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(
        folder_runs, tmp_path, capsys):
    # What a kill leaves before the first checkpoint: the run folder and its config.json only
    # (written atomically, so never half a file).
    out = tmp_path / "run"
    out.mkdir()
    config = json.loads((folder_runs["whole"] / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, out=str(out))))
    assert run_cli("train", "--resume", out) == 0
    assert "holds no checkpoint yet: starting the run from the beginning" in capsys.readouterr().err
    assert_same_weights(folder_runs["whole"], out)


class Crash(BaseException):
    """Stands in for SIGKILL at one exact point of the code (nothing after it runs)."""


@pytest.mark.parametrize("point", ["after the weights, before checkpoint.pt",
                                   "after the last checkpoint.pt, before metrics.csv"])
def test_a_crash_between_saving_the_weights_and_the_checkpoint_resumes_identically(
        point, folder_runs, tmp_path, monkeypatch):
    out = copy_run(folder_runs["half"], tmp_path)
    if point.startswith("after the weights"):
        def crash(path, state):
            raise Crash  # last.safetensors already holds epoch 2; checkpoint.pt still epoch 1
        monkeypatch.setattr(train_module, "save_checkpoint", crash)
    else:
        def crash(self, history):
            raise Crash  # checkpoint.pt holds the finished run; metrics.csv has one row
        monkeypatch.setattr(train_module.RunLog, "write", crash)
    with pytest.raises(Crash):
        run_cli("train", "--resume", out, "--epochs", "2")
    monkeypatch.undo()
    if point.startswith("after the weights"):  # the files really disagree at this point
        assert load_checkpoint(out)["state"]["epoch"] == 1
        assert (out / "last.safetensors").read_bytes() != (
            folder_runs["half"] / "last.safetensors").read_bytes()
    else:
        assert load_checkpoint(out)["state"]["epoch"] == 2
        assert len(metrics(out)) == 1
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0
    assert_same_weights(folder_runs["whole"], out)
    assert_same_weights(folder_runs["whole"], out, "best.safetensors")
    assert metrics(out) == metrics(folder_runs["whole"])


# --------------------------------------------------------------------------------------------
# 4. Crashes: a loss that diverges


def test_a_huge_learning_rate_stops_with_one_line_exit_1_and_writes_no_weights(
        tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *folder_args(tiny_folder, 1), "--lr", "1e6", "--out", out) == 1
    line = error_line(capsys.readouterr().err, alone=False)
    assert "NaN or infinite" in line and "--lr" in line and "--skip-nonfinite" in line
    assert not (out / "checkpoint.pt").exists() and not (out / "last.safetensors").exists()


def _nan_loss_on(call_numbers: set[int], monkeypatch) -> None:
    """Make the training loss NaN on the given training steps (1-based, counted from now)."""
    import torch.nn.functional as F

    original, calls = F.cross_entropy, [0]

    def cross_entropy(*args, **kwargs):
        loss = original(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not evaluation
            calls[0] += 1
            if calls[0] in call_numbers:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)


def test_a_nan_loss_stops_in_one_line_keeping_the_last_good_checkpoint(
        folder_runs, tmp_path, monkeypatch, capsys):
    out = copy_run(folder_runs["half"], tmp_path)
    before = (out / "checkpoint.pt").read_bytes(), (out / "last.safetensors").read_bytes()
    _nan_loss_on({2}, monkeypatch)  # the second step of epoch 2
    assert run_cli("train", "--resume", out, "--epochs", "2") == 1
    line = error_line(capsys.readouterr().err, alone=False)
    assert "NaN or infinite in epoch 2" in line and "last good checkpoint is kept" in line
    assert (out / "checkpoint.pt").read_bytes() == before[0]
    assert (out / "last.safetensors").read_bytes() == before[1]
    state = load_checkpoint(out)
    assert state["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_the_bad_step_and_finishes_with_finite_weights(
        folder_runs, tmp_path, monkeypatch, capsys):
    out = copy_run(folder_runs["half"], tmp_path)
    _nan_loss_on({2}, monkeypatch)
    assert run_cli("train", "--resume", out, "--epochs", "2", "--skip-nonfinite") == 0
    assert "skipped 1 steps whose loss was NaN or infinite in epoch 2" in capsys.readouterr().err
    weights = load_file(out / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert load_checkpoint(out)["state"]["epoch"] == 2


# --------------------------------------------------------------------------------------------
# 4. Crashes: a full disk


def _full_disk_at_last_safetensors(monkeypatch) -> None:
    """ENOSPC from safetensors' writer at epoch 2's last.safetensors, after half a file."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _file_too_large_at_checkpoint(monkeypatch) -> None:
    """A real write error from the kernel: RLIMIT_FSIZE lets the 1.7 MB weights through and
    stops the 3.5 MB checkpoint.pt with EFBIG, as a quota or a full disk would."""
    original = train_module.save_checkpoint

    def save_checkpoint(path, state):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, limit[1]))
        try:
            original(path, state)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, previous)

    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)


def test_a_failed_first_save_does_not_promise_a_previous_checkpoint(tiny_folder, tmp_path,
                                                                     monkeypatch, capsys):
    _full_disk_at_last_safetensors(monkeypatch)
    assert run_cli("train", *folder_args(tiny_folder), "--out", tmp_path / "run") == 1
    line = error_line(capsys.readouterr().err, alone=False)
    assert "No space left on device; there was no checkpoint yet (run the command again)" in line


@pytest.mark.parametrize("failure, cause", [
    (_full_disk_at_last_safetensors, "No space left on device"),
    (_file_too_large_at_checkpoint, "File too large"),
])
def test_a_failed_save_keeps_the_previous_checkpoint_says_why_and_resumes(
        failure, cause, folder_runs, tmp_path, monkeypatch, capsys):
    out = copy_run(folder_runs["half"], tmp_path / "my runs")  # a space, as in C:\Users\Jane Doe
    failure(monkeypatch)
    assert run_cli("train", "--resume", out, "--epochs", "2") == 1
    line = error_line(capsys.readouterr().err, alone=False)
    assert f"cannot save the checkpoint to {out}: {cause}" in line
    assert f"previous checkpoint is intact (resume with mobilenetv2 train --resume '{out}')" in line
    monkeypatch.undo()
    assert load_checkpoint(out)["state"]["epoch"] == 1  # the previous one, and it loads
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0
    assert_same_weights(folder_runs["whole"], out)


# --------------------------------------------------------------------------------------------
# 4. Crashes: torchrun restarts


def test_a_restarted_torchrun_job_resumes_its_out_folder(folder_runs, tmp_path, monkeypatch,
                                                          capsys):
    """What torchrun --max-restarts does after a worker died: the same command again, with
    TORCHELASTIC_RESTART_COUNT > 0. It continues the run instead of refusing OUT."""
    out = copy_run(folder_runs["half"], tmp_path)
    config = json.loads((out / "config.json").read_text())
    args = folder_args(Path(config["data"]), 2)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert run_cli("train", *args, "--out", out) == 2  # a first attempt: OUT holds a run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert run_cli("train", *args, "--out", out) == 0
    assert "restart 1 of this job: resuming" in capsys.readouterr().err
    assert_same_weights(folder_runs["whole"], out)


def test_a_retried_pipeline_step_resumes_its_out_folder_with_resume_existing(
        folder_runs, tiny_folder, tmp_path, capsys):
    """An Airflow, Kubeflow or CI retry runs the step's command again as it was: a first
    attempt needed --out, a retry --resume, so no one command could be retried."""
    out = copy_run(folder_runs["half"], tmp_path)
    args = folder_args(Path(json.loads((out / "config.json").read_text())["data"]), 2)
    assert run_cli("train", *args, "--out", out, "--resume-existing") == 0
    assert "--resume-existing: resuming" in capsys.readouterr().err
    assert_same_weights(folder_runs["whole"], out)
    assert run_cli("train", *args, "--out", out, "--resume-existing") == 0  # done: nothing to do
    assert "nothing is left to train" in capsys.readouterr().err
    assert_same_weights(folder_runs["whole"], out)
    fresh = tmp_path / "fresh"  # the first attempt: a new run
    assert run_cli("train", *folder_args(tiny_folder, 1), "--out", fresh, "--resume-existing") == 0
    assert_same_weights(folder_runs["half"], fresh)
    assert run_cli("train", *args, "--resume-existing") == 2
    assert "give --out DIR" in capsys.readouterr().err


ELASTIC = ["--data", "digits", "--resolution", "8", "--model", "mobilenet_v2_035", "--epochs", "2",
           "--batch-size", "250", "--seed", "0", "--deterministic", "--device", "cpu", "--no-tensorboard",
           "--log-every", "1"]


def _torchrun(out: Path, *torchrun_args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *torchrun_args, str(TESTS / "elastic_cli.py"), "train", *ELASTIC, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint_to_the_same_weights(tmp_path):
    whole = _torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", "--max-restarts=1",
                       MOBILENETV2_TEST_KILL_RANK="1")
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "rank 1 kills itself" in killed.stderr  # the failure really happened ...
    assert "restart 1 of this job: resuming" in killed.stderr  # ... and the job resumed
    assert "resuming" in killed.stderr and "at epoch 2" in killed.stderr
    a, b = load_file(tmp_path / "whole" / "last.safetensors"), load_file(
        tmp_path / "killed" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


# --------------------------------------------------------------------------------------------
# Slow: the digits commands as a user types them


@pytest.mark.slow
def test_sigterm_during_the_documented_digits_run_resumes_to_the_same_weights(tmp_path):
    whole = spawn_train(*DIGITS_16, "--out", tmp_path / "whole")
    _, err = whole.communicate(timeout=1200)
    assert whole.returncode == 0, err[-3000:]
    sigterm_after_the_first_epoch(DIGITS_16, tmp_path / "parts")
    resumed = spawn_train("--resume", tmp_path / "parts")
    _, err = resumed.communicate(timeout=1200)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_weights(tmp_path / "whole", tmp_path / "parts")
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "parts")


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_run(tmp_path):
    """Kill the documented digits run at random moments, resuming each time (or starting
    again if it had no config.json yet); the last resume ends on the uninterrupted weights."""
    whole = spawn_train(*DIGITS_16, "--out", tmp_path / "whole")
    start = time.monotonic()
    _, err = whole.communicate(timeout=1200)
    duration = time.monotonic() - start
    assert whole.returncode == 0, err[-3000:]
    out, rng, kills = tmp_path / "parts", random.Random(0), []
    for _ in range(6):
        resuming = (out / "config.json").exists()
        process = spawn_train(*(["--resume", out] if resuming else [*DIGITS_16, "--out", out]))
        delay = rng.uniform(0.5, duration / 2)
        try:
            process.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        kills.append((round(delay, 1), resuming, process.returncode))
    final = spawn_train("--resume", out)
    _, err = final.communicate(timeout=1200)
    assert final.returncode == 0, err[-3000:]
    assert sum(code == -signal.SIGKILL for _, _, code in kills) >= 4, kills
    assert_same_weights(tmp_path / "whole", out)
    assert metrics(tmp_path / "whole") == metrics(out)
    print("kills (delay s, resumed, exit code):", kills)
