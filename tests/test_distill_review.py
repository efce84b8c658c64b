"""Review checks for train --teacher (not part of the feature's commit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobilenetv2 import create_model, save_weights
from mobilenetv2.cli import main

TINY = ["--resolution", "16", "--model", "mobilenet_v2_035", "--batch-size", "128", "--epochs", "1",
        "--seed", "0", "--no-tensorboard", "--device", "cpu", "--deterministic", "--workers", "0"]


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert run_cli("train", *TINY, "--model", "mobilenet_v2_050", "--out", out / "run") == 0
    return out / "run" / "best.safetensors"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), err[-20:]
    return err[-1]


def test_without_channels_last(teacher_file, tmp_path):
    assert run_cli("train", *TINY, "--no-channels-last", "--teacher", teacher_file,
                   "--out", tmp_path / "run") == 0


def test_missing_teacher_on_resume_is_one_line(teacher_file, tmp_path, capsys):
    copy = tmp_path / "t.safetensors"
    copy.write_bytes(teacher_file.read_bytes())
    assert run_cli("train", *TINY, "--teacher", copy, "--out", tmp_path / "run") == 0
    copy.unlink()
    capsys.readouterr()
    code = run_cli("train", "--resume", tmp_path / "run", "--epochs", "2")
    line = one_error_line(capsys)
    print(line)
    assert code == 2 and "config.json" in line and "pass --teacher" in line, line


def test_everything_at_once_mixup_cutmix_ema_class_weights_smoothing_accum(teacher_file, tmp_path):
    assert run_cli("train", *TINY, "--teacher", teacher_file, "--mixup-alpha", "0.2",
                   "--cutmix-alpha", "1.0", "--ema", "0.9", "--class-weights", "balanced",
                   "--label-smoothing", "0.1", "--grad-accum-steps", "2",
                   "--out", tmp_path / "run") == 0
    meta = json.loads(__import__("safetensors").safe_open(
        tmp_path / "run" / "best.safetensors", "pt").metadata()["meta"])
    assert "distilled_from" in meta


def test_bf16_autocast_on_cpu(teacher_file, tmp_path):
    assert run_cli("train", *TINY, "--amp", "bf16", "--teacher", teacher_file,
                   "--out", tmp_path / "run") == 0


def test_seed_teacher_with_return_probs(tmp_path, capsys):
    torch.manual_seed(0)
    seed = create_model("seed", input_width=32, num_classes=10, in_channels=1, return_probs=True)
    seed.meta["class_names"] = [str(i) for i in range(10)]
    save_weights(seed, tmp_path / "seed.safetensors")
    assert run_cli("train", *TINY, "--resolution", "32", "--teacher", tmp_path / "seed.safetensors",
                   "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "teacher" in err


def test_a_torchvision_pth_teacher_on_class_folders(tmp_path, capsys):
    import torchvision
    from PIL import Image

    tv = torchvision.models.mobilenet_v2(num_classes=2)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * c + i, 60, 90)).save(folder / f"{i}.png")
    assert run_cli("train", "--data", tmp_path / "data", "--resolution", "32", "--model",
                   "mobilenet_v2_035", "--batch-size", "4", "--epochs", "1", "--no-tensorboard",
                   "--workers", "0", "--device", "cpu", "--teacher", tmp_path / "tv.pth",
                   "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    print([line for line in err.splitlines() if "teacher" in line])


def test_a_keras_h5_teacher(tmp_path, capsys):
    from PIL import Image

    from mobilenetv2 import MobileNetV2, save_keras_weights
    model = MobileNetV2(width_mult=0.35, num_classes=2, tf_padding=True, bn_eps=1e-3)
    save_keras_weights(model, tmp_path / "k.h5")
    for split in ("train", "val"):
        for c, name in enumerate(("0", "1")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * c + i, 60, 90)).save(folder / f"{i}.png")
    assert run_cli("train", "--data", tmp_path / "data", "--resolution", "32", "--model",
                   "mobilenet_v2_035", "--batch-size", "4", "--epochs", "1", "--no-tensorboard",
                   "--workers", "0", "--device", "cpu", "--teacher", tmp_path / "k.h5",
                   "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    print([line for line in err.splitlines() if "teacher" in line])


def test_infinite_temperature_is_a_user_mistake(teacher_file, tmp_path, capsys):
    code = run_cli("train", *TINY, "--teacher", teacher_file, "--distill-temperature", "inf",
                   "--out", tmp_path / "run")
    line = one_error_line(capsys)
    print(code, line)
    assert code == 2, line


FLOAT64_CLI = Path(__file__).with_name("float64_cli.py")


def _train(out: Path, nproc: int, *extra: str) -> dict[str, torch.Tensor]:
    args = [str(FLOAT64_CLI), "train", "--resolution", "8", "--model", "mobilenet_v2_035",
            "--epochs", "1", "--batch-size", "250", "--lr", "0.002", "--dropout", "0", "--seed", "0",
            "--deterministic", "--device", "cpu", "--no-tensorboard", "--out", str(out), *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr, load_file(out / "last.safetensors")


def test_two_gloo_processes_distil_as_one(tmp_path):
    _, t = _train(tmp_path / "teacher", 1, "--model", "mobilenet_v2_050")
    kd = ["--teacher", str(tmp_path / "teacher" / "best.safetensors"), "--sync-bn",
          "--distill-weight", "0.7", "--distill-temperature", "3"]
    err1, one = _train(tmp_path / "one", 1, *kd)
    err2, two = _train(tmp_path / "two", 2, *kd)
    worst = max(((one[k] - two[k]).abs().max() / (one[k].abs().max() + 1e-3)).item()
                for k in one if one[k].is_floating_point())
    print("worst", worst)
    print([line for line in err2.splitlines() if "teacher" in line])
    assert worst < 1e-6


def test_mid_epoch_resume_with_teacher_mixup_ema_accum(teacher_file, tmp_path, monkeypatch):
    import signal

    from mobilenetv2 import train as train_module

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*TINY, "--epochs", "2", "--batch-size", "256", "--teacher", teacher_file,
              "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--ema", "0.9",
              "--grad-accum-steps", "2", "--distill-temperature", "2"]
    assert run_cli("train", *common, "--out", whole) == 0
    original = train_module.StopSignal.__call__

    def stop_at_step_2(self):
        if getattr(self, "_steps", 0) == 2:
            self.requested = signal.SIGTERM
        self._steps = getattr(self, "_steps", 0) + 1
        return original(self)

    monkeypatch.setattr(train_module.StopSignal, "__call__", stop_at_step_2)
    assert run_cli("train", *common, "--out", parts) == 128 + signal.SIGTERM
    monkeypatch.setattr(train_module.StopSignal, "__call__", original)
    assert run_cli("train", "--resume", parts) == 0
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_metadata_saying_none_and_advice_for_a_teacher(tmp_path):
    from mobilenetv2.distill import load_teacher

    classes = [str(i) for i in range(10)]
    n = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    n.meta.update(mean=None, std=None, class_names=classes)
    save_weights(n, tmp_path / "nomean.safetensors")
    load_teacher(tmp_path / "nomean.safetensors", class_names=classes, mean=(0.5,), std=(0.25,),
                 in_channels=1)  # was: TypeError 'NoneType' object is not iterable
    n.meta["class_names"] = list("abcdefghij")
    save_weights(n, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="use a teacher trained on these classes"):
        load_teacher(tmp_path / "other.safetensors", class_names=classes, mean=(0.5,),
                     std=(0.25,), in_channels=1, folders=False)
