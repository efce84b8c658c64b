"""The trainer end to end: CLI runs on tiny data, recipes, schedules, resume and outputs."""

from __future__ import annotations

import csv
import json
import math
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mobilenetv2
from mobilenetv2.cli import main
from mobilenetv2.config import RECIPES, TrainConfig, field_names, resolve_config
from mobilenetv2.engine import ModelEma, device_batches
from mobilenetv2.train import build_optimizer, load_pretrained, lr_factor

# A digits run small enough for the default suite: 16x16 inputs, the narrowest width.
TINY = ["--resolution", "16", "--model", "mobilenet_v2_035", "--batch-size", "128", "--epochs", "1",
        "--seed", "0", "--no-tensorboard", "--log-every", "5"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny digits run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "digits"
    assert run_cli("train", *TINY, "--epochs", "2", "--out", out) == 0
    return out


def test_train_writes_every_output(trained):
    for name in ("best.safetensors", "last.safetensors", "checkpoint.pt", "metrics.csv",
                 "curves.png", "config.json"):
        assert (trained / name).is_file(), name
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                "images_per_second", "seconds", "wall_seconds"):
        assert math.isfinite(float(rows[-1][key])), key
    # wall_seconds: the run so far, evaluation included
    first, second = (float(r["wall_seconds"]) for r in rows)
    assert first > float(rows[0]["seconds"]) and second > first + float(rows[1]["seconds"])
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_count_whole_epochs_and_leave_matplotlibs_backend_alone(tmp_path):
    import matplotlib

    from mobilenetv2.reporting import plot_curves

    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_top1": 50.0 + e,
             "val_top1": 48.0 + e} for e in (1, 2)]
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's choice (a notebook's inline backend), which pyplot.use reset
    try:
        fig = plot_curves(rows, tmp_path / "curves.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for ax in fig.axes:  # two epochs drew ticks at 1.0, 1.2, ... 2.0
        assert all(tick == int(tick) for tick in ax.get_xticks())


def test_metrics_csv_has_one_line_break_per_row_on_windows(tmp_path, windows_text_mode):
    # csv writes "\r\n" itself: a text-mode file on Windows made each "\r\r\n", an empty
    # row between every two in Excel and in csv readers.
    from mobilenetv2.reporting import RunLog

    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_top1": 50.0 + e,
             "val_top1": 48.0 + e} for e in (1, 2)]
    RunLog(tmp_path, enabled=True, tensorboard=False).write(rows)
    data = (tmp_path / "metrics.csv").read_bytes()
    assert b"\r\r" not in data and data.count(b"\r\n") == 3
    with (tmp_path / "metrics.csv").open(newline="", encoding="utf-8") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


def test_a_metrics_file_another_program_holds_open_is_warned_about_not_fatal(
        tmp_path, monkeypatch, caplog):
    # Windows refuses to replace a file that Excel (or a viewer) has open: the run ended with
    # "error: [WinError 5] Access is denied" at the end of an epoch, for a view of its history.
    import os
    from pathlib import Path

    import mobilenetv2.weights as weights_module
    from mobilenetv2.reporting import RunLog

    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "train_top1": 50.0,
             "val_top1": 48.0}]
    out = tmp_path / "my runs"  # a space, as in C:\Users\Jane Doe: the resume hint quotes it
    out.mkdir()
    (out / "metrics.csv").write_text("the previous rows\n")
    replace, tries = os.replace, []

    def held_open(source, target):
        if Path(target).name == "metrics.csv":
            tries.append(target)
            raise PermissionError(13, "Access is denied", str(source), None, str(target))
        replace(source, target)

    monkeypatch.setattr(weights_module.os, "replace", held_open)
    clock = [0.0]  # the retries' second passes at once
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    monkeypatch.setattr("time.sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    monkeypatch.setattr(weights_module.sys, "platform", "win32")
    with caplog.at_level("WARNING"):
        RunLog(out, enabled=True, tensorboard=False).write(rows)
    assert f"could not update {out / 'metrics.csv'}: Access is denied" in caplog.text
    assert f'train --resume "{out}" once the run is over' in caplog.text  # (Windows' quotes)
    assert len(tries) > 1  # tried again on Windows, in case a scanner had it for a moment
    assert (out / "metrics.csv").read_text() == "the previous rows\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv"]  # no temporaries
    monkeypatch.setattr(weights_module.sys, "platform", "linux")
    tries.clear()
    with pytest.raises(PermissionError):  # elsewhere it is no passing lock: no tries again
        weights_module.atomic_write(out / "metrics.csv", lambda tmp: Path(tmp).touch())
    assert len(tries) == 1


def test_config_json_holds_the_fully_resolved_configuration(trained):
    config = json.loads((trained / "config.json").read_text())
    assert set(config) == set(field_names())
    assert config["resolution"] == 16 and config["model"] == "mobilenet_v2_035"
    assert config["recipe"] == "digits" and config["epochs"] == 2


def test_checkpoint_loads_with_weights_only_and_holds_the_run_state(trained):
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "ema", "state", "rng", "history", "config"):
        assert key in state
    assert state["state"]["epoch"] == 2 and state["state"]["step"] == 0


def test_saved_weights_rebuild_with_metadata(trained):
    model = mobilenetv2.load_model(trained / "best.safetensors")
    assert model.config["small_input"] is True and model.config["in_channels"] == 1
    assert model.meta["class_names"] == [str(i) for i in range(10)]
    assert model.meta["input_size"] == [1, 16, 16]
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_eval_json_prints_exactly_one_object_with_the_metrics(trained, capsys):
    assert run_cli("eval", "--weights", trained / "last.safetensors", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"top1", "top5", "loss", "images", "images_per_second"}
    assert result["images"] == 360
    last = list(csv.DictReader((trained / "metrics.csv").open()))[-1]
    assert result["top1"] == pytest.approx(float(last["val_top1"]))


def test_eval_shows_a_progress_bar_on_a_terminal_only(trained, monkeypatch, capsys):
    # eval ran silently for minutes on ImageNet's 50,000 images; predict and train had a bar.
    args = ["eval", "--weights", trained / "last.safetensors", "--batch-size", "40"]
    assert run_cli(*args) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 1  # a log or a pipe: the result
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.setenv("TERM", "xterm")
    assert run_cli(*args) == 0
    captured = capsys.readouterr()
    assert "eval:" in captured.err and "/9 " in captured.err  # 360 images in batches of 40
    assert captured.out.count("\n") == 1 and "top-1" in captured.out  # the bar is on stderr


def test_eval_per_class_reads_out_the_confusion_matrix(trained, capsys):
    assert run_cli("eval", "--weights", trained / "last.safetensors", "--per-class", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    confusion, rows = result["confusion"], result["per_class"]
    assert len(confusion) == len(rows) == 10 and all(len(row) == 10 for row in confusion)
    assert sum(map(sum, confusion)) == result["images"] == 360
    assert 100 * sum(confusion[i][i] for i in range(10)) / 360 == pytest.approx(result["top1"])
    assert [r["class"] for r in rows] == [str(i) for i in range(10)]
    for i, r in enumerate(rows):
        assert r["images"] == sum(confusion[i])
        assert r["top1"] == pytest.approx(100 * confusion[i][i] / r["images"])
    assert run_cli("eval", "--weights", trained / "last.safetensors", "--per-class") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["class", "images", "top-1", "precision", "most", "often", "taken", "for"]
    assert len(lines) == 12


def test_eval_needs_only_the_val_folder_and_predict_skips_hidden_files(tmp_path, capsys):
    from PIL import Image

    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=2, small_input=True)
    model.meta.update(class_names=["a", "b"], input_size=[3, 32, 32])
    mobilenetv2.save_weights(model, tmp_path / "m.safetensors")
    for name in ("a", "b"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "data" / "val" / name / "1.png")
    (tmp_path / "data" / "val" / "a" / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert run_cli("eval", "--weights", tmp_path / "m.safetensors", "--data", tmp_path / "data",
                   "--json") == 0  # no train/ folder: evaluation reads val/ only
    assert json.loads(capsys.readouterr().out)["images"] == 2
    assert run_cli("predict", "--weights", tmp_path / "m.safetensors", tmp_path / "data",
                   "--json") == 0  # macOS' ._ files are not images
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 2


def test_models_that_return_probabilities_are_not_softmaxed_twice(tmp_path, capsys):
    import torch.nn.functional as F

    from mobilenetv2.data import build_datasets

    # The walk-through's return_probs=True ends in a softmax: predict must not apply another,
    # and eval's loss is the probabilities' negative log-likelihood.
    model = mobilenetv2.create_model("seed", input_width=32, num_classes=10, in_channels=1,
                                     return_probs=True).eval()
    with torch.no_grad():
        model.final[2].weight.normal_(0, 0.2)
    data = build_datasets("digits", resolution=32, augment=False)
    model.meta.update(data.model_meta())
    mobilenetv2.save_weights(model, tmp_path / "probs.safetensors")
    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    labels = torch.tensor([data.val[i][1] for i in range(len(data.val))])
    with torch.no_grad():
        probs = model(images)
    assert run_cli("eval", "--weights", tmp_path / "probs.safetensors", "--json") == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert loss == pytest.approx(F.nll_loss(probs.log(), labels).item(), rel=1e-4)
    from PIL import Image

    from mobilenetv2.data import eval_transform, open_image

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    with torch.no_grad():
        expected = model(eval_transform(model.meta)(open_image(tmp_path / "x.png", 1))[None])[0]
    assert run_cli("predict", "--weights", tmp_path / "probs.safetensors", tmp_path / "x.png",
                   "--top-k", "10", "--json") == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top_k"]
    got = {p["index"]: p["probability"] for p in top}
    assert got == pytest.approx({i: float(v) for i, v in enumerate(expected)}, abs=1e-5)


def test_per_class_metrics_of_a_small_matrix():
    from mobilenetv2.engine import per_class_metrics

    rows = per_class_metrics([[3, 1, 0], [0, 0, 0], [2, 0, 2]], ["cat", "dog", "fox"])
    assert rows[0] == {"class": "cat", "images": 4, "top1": 75.0, "precision": 60.0,
                       "confused_with": "dog", "confused": 1}
    assert rows[1] == {"class": "dog", "images": 0, "top1": None, "precision": 0.0,
                       "confused_with": None, "confused": 0}
    assert rows[2]["confused_with"] == "cat" and rows[2]["confused"] == 2
    assert rows[2]["precision"] == 100.0


def test_predict_names_the_top_k_classes(trained, tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((digits.images[i] * 15).astype("uint8")).resize((16, 16)).save(folder / f"{i}.png")
    assert run_cli("predict", "--weights", trained / "best.safetensors", folder, "--top-k", "3",
                   "--json") == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert len(predictions) == 3
    for item in predictions:
        assert len(item["top_k"]) == 3
        assert {p["class"] for p in item["top_k"]} <= {str(i) for i in range(10)}
        probs = [p["probability"] for p in item["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*TINY, "--deterministic", "--device", "cpu", "--epochs", "2"]
    assert run_cli("train", *common, "--out", whole) == 0
    assert run_cli("train", *common[:-2], "--epochs", "1", "--out", parts) == 0
    capsys.readouterr()
    assert run_cli("train", "--resume", parts, "--epochs", "2") == 0
    # The time reported is the run's, both sessions' (it was this session's alone).
    rows = list(csv.DictReader((parts / "metrics.csv").open()))
    assert float(rows[1]["wall_seconds"]) > float(rows[0]["wall_seconds"]) + float(rows[1]["seconds"])
    assert (f"in {float(rows[1]['wall_seconds']):.0f} s of training and evaluation over its "
            "sessions" in capsys.readouterr().out)
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_run_checkpointed_before_wall_seconds_existed_resumes(tmp_path, capsys):
    # metrics.csv's wall_seconds column is newer than the checkpoints of earlier versions:
    # their history rows lack it, and resuming such a run was refused as a damaged
    # checkpoint ("its metrics history is not a list of epoch rows").
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--out", out) == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for row in checkpoint["history"]:
        del row["wall_seconds"]
    torch.save(checkpoint, out / "checkpoint.pt")
    capsys.readouterr()
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[0]["wall_seconds"] == "" and float(rows[1]["wall_seconds"]) > float(rows[1]["seconds"])


def test_a_resumed_fine_tune_keeps_the_normalisation_it_was_trained_with(tmp_path, capsys):
    # A run fine-tuned from Keras' weights by an earlier version normalised the data by its
    # own statistics; resumed, it switched to Keras' [-1, 1] mid-run, without a word, and its
    # weights then recorded [-1, 1] for epochs trained on the other.
    pytest.importorskip("h5py")
    keras_file = tmp_path / "k.h5"
    mobilenetv2.save_keras_weights(
        mobilenetv2.create_model("mobilenet_v2_035", tf_padding=True, bn_eps=1e-3), keras_file)
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--pretrained", keras_file, "--out", out) == 0
    assert load_file_meta(out / "last.safetensors")["mean"] == [0.5]  # Keras' own
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["model_meta"] |= {"mean": [0.3], "std": [0.3]}  # as an earlier version stored
    torch.save(checkpoint, out / "checkpoint.pt")
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0, capsys.readouterr().err
    meta = load_file_meta(out / "last.safetensors")
    assert (meta["mean"], meta["std"]) == ([0.3], [0.3])


def load_file_meta(path) -> dict:
    from mobilenetv2.weights import read_weights

    return read_weights(path).meta


def test_more_epochs_after_a_cosine_run_ended_say_where_the_rate_goes_on(tmp_path, capsys):
    # Found by a CIFAR review: --resume DIR --epochs N after a cosine run ended restarted the
    # rate from part of its peak (the cosine stretched over N epochs) without a word, and the
    # first step after the resume still took the old schedule's rate.
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--warmup-epochs", "0", "--out", out) == 0
    capsys.readouterr()
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: the resumed options change the learning-rate schedule (cosine "
                        "over 2 epochs, 0 of warm-up): training goes on at lr 0.05, where the "
                        "run's own schedule was at 0"], warnings
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.0  # 2 epochs: the end again


def test_grad_checkpointing_trains_to_the_same_weights(tmp_path, capsys):
    common = [*TINY, "--deterministic", "--device", "cpu", "--drop-path", "0.1"]
    assert run_cli("train", *common, "--out", tmp_path / "plain") == 0
    assert run_cli("train", *common, "--grad-checkpointing", "--out", tmp_path / "ckpt") == 0
    a, b = load_file(tmp_path / "plain" / "last.safetensors"), load_file(
        tmp_path / "ckpt" / "last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["grad_checkpointing"] is True
    assert run_cli("train", *TINY, "--model", "seed", "--grad-checkpointing",
                   "--out", tmp_path / "seed") == 2
    assert "--grad-checkpointing do not apply to the seed variant" in capsys.readouterr().err


@pytest.mark.slow
def test_grad_checkpointing_under_compile_trains(tmp_path):
    # Refused until stop 19 (Dynamo could not trace the checkpoint's BatchNorm guard); the
    # exactness is tested on the model (test_model.py), this is the trainer's path.
    assert run_cli("train", *TINY, "--compile", "--grad-checkpointing", "--device", "cpu",
                   "--out", tmp_path) == 0
    steps = json.loads((tmp_path / "config.json").read_text())
    state = load_file(tmp_path / "last.safetensors")
    assert steps["grad_checkpointing"] and steps["compile"]
    assert int(state["stages.1.0.expand.bn.num_batches_tracked"]) == 12  # 1,437 images / 128


def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from mobilenetv2 import train as train_module

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*TINY, "--deterministic", "--device", "cpu", "--epochs", "2", "--batch-size", "256"]
    assert run_cli("train", *common, "--out", whole) == 0

    original = train_module.StopSignal.__call__

    def stop_at_step_8(self):
        if getattr(self, "_steps", 0) == 8:
            self.requested = signal.SIGTERM
        self._steps = getattr(self, "_steps", 0) + 1
        return original(self)

    monkeypatch.setattr(train_module.StopSignal, "__call__", stop_at_step_8)
    assert run_cli("train", *common, "--out", parts) == 128 + signal.SIGTERM
    state = torch.load(parts / "checkpoint.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step"]) == (1, 3)  # 6 steps per epoch: stopped in epoch 2
    monkeypatch.setattr(train_module.StopSignal, "__call__", original)
    assert run_cli("train", "--resume", parts) == 0
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    rows_whole = list(csv.DictReader((whole / "metrics.csv").open()))
    rows_parts = list(csv.DictReader((parts / "metrics.csv").open()))
    assert [r["val_top1"] for r in rows_whole] == [r["val_top1"] for r in rows_parts]
    assert float(rows_whole[-1]["train_loss"]) == pytest.approx(float(rows_parts[-1]["train_loss"]))


def test_a_new_run_refuses_a_folder_that_holds_a_run(trained, capsys):
    assert run_cli("train", *TINY, "--out", trained) == 2
    assert "--resume" in capsys.readouterr().err


def test_print_config_shows_the_resolved_run_and_a_config_json_starts_the_same_run(trained, tmp_path,
                                                                                  capsys):
    # A previous run's config.json is a --config file: it used to be refused, as it names both
    # model and width_mult (null).
    stored = (trained / "config.json").read_text()
    again = tmp_path / "again"
    assert run_cli("train", "--config", trained / "config.json", "--out", again, "--print-config") == 0
    assert json.loads(capsys.readouterr().out) == {**json.loads(stored), "out": str(again)}
    assert not again.exists()  # nothing trained, nothing written
    # Beside --resume: what the continued run would use; the run is untouched.
    assert run_cli("train", "--resume", trained, "--epochs", "5", "--print-config") == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 5
    assert (trained / "config.json").read_text() == stored
    assert run_cli("train", "--recipe", "cifar", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["optimizer"], printed["nesterov"], printed["epochs"]) == ("sgd", True, 200)


def test_train_json_prints_exactly_one_object_with_the_runs_result(tmp_path, capsys):
    # For a pipeline that trains and then reads the result: the result line's numbers, as JSON.
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--out", out, "--json") == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the object and nothing else
    last = list(csv.DictReader((out / "metrics.csv").open()))[-1]
    assert result == {"out": str(out), "weights": str(out / "best.safetensors"), "split": "test",
                      "epochs": 1, "top1": pytest.approx(float(last["val_top1"])),
                      "top5": pytest.approx(float(last["val_top5"])),
                      "loss": pytest.approx(float(last["val_loss"])),
                      "best_top1": pytest.approx(float(last["val_top1"])),
                      "seconds": pytest.approx(float(last["wall_seconds"]))}
    assert "json" not in json.loads((out / "config.json").read_text())  # not a run's option


def test_a_run_that_fails_before_training_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    # A wrong --data (or any mistake found while setting up) used to leave runs/<timestamp>/
    # holding only config.json, one per attempt.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert run_cli("train", *TINY, "--data", "empty") == 2
    assert run_cli("train", *TINY, "--data", "empty", "--out", "mine/run") == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "mine" / "run").exists()
    assert not any((tmp_path / "runs").iterdir())
    # A folder the user made is theirs: it stays, as it was.
    (tmp_path / "kept").mkdir()
    assert run_cli("train", *TINY, "--data", "empty", "--out", "kept") == 2
    assert (tmp_path / "kept").is_dir()


def test_compile_without_a_cpp_compiler_is_refused_in_one_line_before_the_data_loads(
        tmp_path, monkeypatch, capsys):
    # Most Windows machines have no C++ compiler (torch.compile's CPU code needs MSVC's cl):
    # --compile failed at the first step, after the data had loaded, in a 100-line traceback.
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    cpp_compiler_search.cache_clear()  # (it remembers the compiler it found)
    monkeypatch.chdir(tmp_path)
    try:
        assert run_cli("train", *TINY, "--compile", "--device", "cpu", "--out", "run") == 2
    finally:
        cpp_compiler_search.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--compile on the CPU needs a C++ compiler" in err and "drop --compile" in err
    assert not (tmp_path / "run").exists()


def test_compile_on_a_gpu_without_triton_is_refused_in_one_line(monkeypatch):
    # Triton has no official Windows wheels: torch.compile failed at the first step there.
    import torch.utils._triton

    from mobilenetv2.train import check_compile

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    with pytest.raises(ValueError, match="--compile on a GPU needs Triton.*drop --compile"):
        check_compile(torch.device("cuda"))


COMMANDS = ["train", "eval", "predict", "export", "quantize", "bench", "summary"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-h"])
    assert exit_info.value.code == 0
    assert "usage: mobilenetv2 " + command in capsys.readouterr().out


def test_the_top_level_help_shows_examples_and_what_the_exit_codes_mean(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exit_info:
        main(["-h"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:\n  mobilenetv2 train " in text
    assert "mobilenetv2 predict --weights runs/DIR/best.safetensors photo.jpg" in text
    for meaning in ("0 done", "1 the run failed", "2 a mistake", "130: Ctrl-C"):
        assert meaning in text
    assert max(len(line) for line in text.splitlines()) <= 80  # a plain 80-column terminal


def test_version_gives_what_a_bug_report_needs(capsys):
    # It printed "mobilenetv2 0.1.0" alone: torch's, torchvision's and Python's versions and the
    # platform decide most bugs, and a checkout's commit says which code ran.
    import platform

    import torchvision

    from mobilenetv2.reporting import source_commit

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mobilenetv2 {mobilenetv2.__version__}"  # scripts that read it still can
    assert lines[1] == (f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
                        f"Python {platform.python_version()}")
    assert lines[2] == f"platform {platform.platform()}"
    commit = source_commit()  # this test runs from a checkout; an installed copy has none
    assert (lines[3:] == [f"git commit {commit}"]) if commit else len(lines) == 3


def test_the_git_commit_is_only_of_a_checkout_that_tracks_the_package(tmp_path, monkeypatch):
    # An installed copy inside some project's git work tree (a .venv in a checkout) is not
    # that project's code: no commit is claimed for it, and git is not even run there, since
    # that repository's config can make git run commands (core.fsmonitor, a clean filter).
    import subprocess
    from pathlib import Path

    from mobilenetv2 import reporting

    def repository(repo: Path, package: Path) -> list[str]:
        package.mkdir(parents=True)
        (package / "reporting.py").write_text("")
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "add", "-f", "."], check=True)
        subprocess.run([*git, "commit", "-qm", "x"], check=True)
        monkeypatch.setattr(reporting, "__file__", str(package / "reporting.py"))
        return git

    repo = tmp_path / "prepared"
    git = repository(repo, repo / ".venv" / "lib" / "mobilenetv2")  # tracked, even
    marker = tmp_path / "ran"
    subprocess.run([*git, "config", "core.fsmonitor", f"touch {marker} #"], check=True)
    (repo / ".git" / "info" / "attributes").write_text("* filter=run\n")
    subprocess.run([*git, "config", "filter.run.clean", f"touch {marker}; cat"], check=True)
    (repo / ".venv" / "lib" / "mobilenetv2" / "reporting.py").write_text("changed")
    assert reporting.source_commit() is None
    assert not marker.exists()

    repo = tmp_path / "checkout"
    git = repository(repo, repo / "src" / "mobilenetv2")  # this project's layout
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert reporting.source_commit() == head
    (repo / "src" / "mobilenetv2" / "reporting.py").write_text("changed")
    assert reporting.source_commit() == head + "-dirty"
    (repo / "src" / "mobilenetv2" / "other.py").write_text("")  # untracked: not the package's
    monkeypatch.setattr(reporting, "__file__", str(repo / "src" / "mobilenetv2" / "other.py"))
    assert reporting.source_commit() is None


def test_every_option_of_every_subcommand_says_what_it_does():
    # train -h listed --epochs EPOCHS, --seed SEED, --optimizer {...} and eval/predict -h
    # --weights FILE and --batch-size BATCH_SIZE with no word on what they do or their default.
    import argparse

    from mobilenetv2.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(commands.choices) == sorted(COMMANDS)
    silent = [f"{name} {action.option_strings[0]}" for name, sub in commands.choices.items()
              for action in sub._actions if action.option_strings and not action.help]
    assert silent == []
    # One metavar per idea across subcommands (argparse's default is the flag in capitals).
    metavars = {(a.option_strings[0], a.metavar) for sub in commands.choices.values()
                for a in sub._actions if a.option_strings[:1] in (["--batch-size"], ["--workers"],
                                                                   ["--epochs"], ["--weights"])}
    assert metavars == {("--batch-size", "B"), ("--workers", "N"), ("--epochs", "N"),
                        ("--weights", "FILE")}


def test_main_leaves_the_callers_logging_as_it_found_it(monkeypatch, tmp_path, capsys):
    # From a notebook: logging.basicConfig(force=True) closed and dropped the caller's handlers
    # (a log file then stayed silent) and left the root logger at INFO for every library.
    import logging

    import mobilenetv2.cli.summary as summary

    def command(args) -> int:
        logging.getLogger("mobilenetv2").info("a line of the command")
        return 0

    monkeypatch.setattr(summary, "run", command)
    root = logging.getLogger()
    own = logging.FileHandler(tmp_path / "notebook.log", mode="w")
    root.addHandler(own)
    handlers, level = list(root.handlers), root.level
    try:
        assert main(["summary"]) == 0
        assert main(["summary"]) == 0  # and again
        assert root.handlers == handlers and root.level == level
        logging.getLogger("notebook").warning("still mine")
    finally:
        root.removeHandler(own)
        own.close()
    assert capsys.readouterr().err == "a line of the command\n" * 2
    assert (tmp_path / "notebook.log").read_text() == "still mine\n"


def test_every_train_option_except_recipe_internals_has_a_flag():
    from mobilenetv2.cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {action.dest for action in train_parser._actions}
    internals = {"lr_base", "lr_base_batch", "rmsprop_decay", "rmsprop_eps"}
    assert set(field_names()) - internals <= flags


def test_config_file_overrides_the_recipe_and_flags_override_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: cifar\nepochs: 7\nbatch-size: 32\n")
    from mobilenetv2.config import read_config_file

    config = resolve_config(None, read_config_file(path), {"epochs": 3})
    assert config.recipe == "cifar" and config.epochs == 3 and config.batch_size == 32
    assert config.optimizer == "sgd" and config.nesterov and config.weight_decay == 5e-4
    assert config.learning_rate() == pytest.approx(0.1 * 32 / 128)


def test_a_folder_that_holds_a_run_is_refused_with_a_resume_command_that_pastes(tmp_path):
    # "pass --resume /Users/jane/Mobile Documents/run" pasted as printed is two arguments.
    import re

    from mobilenetv2.train import prepare_out_dir

    out = tmp_path / "my runs"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"pass --resume '{out}' to continue it")):
        prepare_out_dir(out, resuming=False)


def test_a_runs_config_json_starts_the_same_run_again(trained, tmp_path, capsys):
    # Found by a CIFAR review: every config.json holds width_mult (null, or the width beside
    # the recipe's model), and --config OLD/config.json was refused as --model with --width-mult.
    assert run_cli("train", "--config", trained / "config.json") == 2  # its --out: refused later
    assert "already holds a run" in capsys.readouterr().err
    tiny = [a for a in TINY if a not in ("--model", "mobilenet_v2_035")]
    first, again = tmp_path / "first", tmp_path / "again"
    assert run_cli("train", *tiny, "--width-mult", "0.3", "--deterministic", "--out", first) == 0
    assert json.loads((first / "config.json").read_text())["width_mult"] == 0.3
    assert run_cli("train", "--config", first / "config.json", "--out", again) == 0
    a, b = load_file(first / "last.safetensors"), load_file(again / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a model named beside a width is still refused, in a file as on the command line
    (tmp_path / "both.yaml").write_text("model: mobilenet_v2_100\nwidth_mult: 0.5\n")
    assert run_cli("train", "--config", tmp_path / "both.yaml", "--out", tmp_path / "x") == 2
    assert "give either --model or --width-mult" in capsys.readouterr().err


def test_a_config_file_with_unknown_keys_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"epochs": 1, "learning_rate": 0.1}))
    assert run_cli("train", "--config", path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learning_rate" in err


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "mobilenet_v3"], "unknown model"),
    (["--data", "/no/such/folder"], "--data"),
    (["--optimizer", "lamb"], "--optimizer"),
])
def test_bad_train_arguments_exit_2_with_one_line(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        code = run_cli("train", *args, "--out", tmp_path / "x")
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_device_batches_keep_order_and_unreadable_batches_and_set_the_memory_format():
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), 0), (None, None, 4),
               (torch.randn(2, 3, 8, 8), torch.tensor([5, 6]), 1)]
    got = list(device_batches(batches, torch.device("cpu"), channels_last=True))
    assert [d for _, _, d in got] == [0, 4, 1]
    assert got[1][0] is None and got[1][1] is None
    for (images, labels, _), (want_images, want_labels, _) in zip(got[::2], batches[::2], strict=True):
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_eval_throughput_counts_the_wait_for_the_last_results(monkeypatch):
    # On a GPU evaluate's loop only queues the batches, and reading the counts back waits for
    # them: stood in for here by a read-back that takes 0.3 s. The clock must include it.
    import time

    from mobilenetv2 import engine

    def slow_read_back(tensor, env):
        time.sleep(0.3)
        return tensor

    monkeypatch.setattr(engine, "all_reduce_sum", slow_read_back)
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), 0)] * 2
    metrics = engine.evaluate(lambda images: torch.randn(len(images), 3), batches)
    assert metrics["images"] == 8
    assert metrics["images_per_second"] <= 8 / 0.3


def test_ema_averages_weights_and_batchnorm_statistics_with_tf_warm_up():
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=3, small_input=True)
    ema = ModelEma(model, decay=0.9999)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 3, 16, 16))  # new BatchNorm running statistics
    ema.update(model)
    decay = min(0.9999, 2 / 11)  # TF's num_updates warm-up after one update
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, start[name] * decay + dict(model.named_parameters())[name] * (1 - decay))
    # The running statistics too, as TF-Slim, torchvision's reference and timm average them
    # (they were copied: statistics of the current weights beside averaged weights).
    for name, b in ema.module.named_buffers():
        now = dict(model.named_buffers())[name]
        if b.is_floating_point():
            assert not torch.equal(now, start[name]), name
            torch.testing.assert_close(b, start[name] * decay + now * (1 - decay))
        else:
            assert torch.equal(b, now), name  # num_batches_tracked: the model's count
    assert not any(p.requires_grad for p in ema.module.parameters())
    copy = ModelEma(model, decay=0.9999)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(copy.module.state_dict().values(),
                                                 ema.module.state_dict().values(), strict=True))


def test_ema_equals_torchvision_references_average_with_buffers():
    """torchvision's reference scripts average with torch's AveragedModel(use_buffers=True)
    (their ExponentialMovingAverage); past TF's warm-up our average is the same, running
    statistics included."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    generator = torch.Generator().manual_seed(0)
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=3, small_input=True)
    ours = ModelEma(model, decay=0.1)  # below TF's warm-up from the first update: 0.1 throughout
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.1), use_buffers=True)
    theirs.update_parameters(model)  # their first update copies, as our constructor does
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        model.train()(torch.randn(4, 3, 16, 16, generator=generator))
        ours.update(model)
        theirs.update_parameters(model)
    expected = theirs.module.state_dict()
    for name, value in ours.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[name], msg=name)


def test_a_run_with_ema_saves_the_averaged_weights_and_resumes_them(tmp_path):
    common = [*TINY, "--ema", "0.99", "--deterministic", "--device", "cpu"]
    assert run_cli("train", *common, "--epochs", "2", "--out", tmp_path / "whole") == 0
    checkpoint = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert checkpoint["ema"]["updates"] == 24  # one per step: 1,437 images in 12 batches of 128
    saved = load_file(tmp_path / "whole" / "last.safetensors")
    ema_state = checkpoint["ema"]["module"]
    assert all(torch.equal(saved[k], ema_state[k]) for k in saved)  # what is evaluated and saved
    assert any(not torch.equal(saved[k], checkpoint["model"][k]) for k in saved)
    # Stopped after one epoch and resumed, the average continues where it was.
    assert run_cli("train", *common, "--epochs", "1", "--out", tmp_path / "half") == 0
    assert run_cli("train", "--resume", tmp_path / "half", "--epochs", "2") == 0
    resumed = load_file(tmp_path / "half" / "last.safetensors")
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)


def test_pretrained_rgb_weights_fine_tune_on_grayscale_data_with_a_fresh_classifier(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    # torchvision's layout and key names, 1000 classes, RGB: what --pretrained usually gets.
    peer = torchvision.models.mobilenet_v2(width_mult=0.35)
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_()
    save_file(peer.state_dict(), tmp_path / "tv.safetensors")
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    classifier = model.classifier.weight.clone()
    load_pretrained(model, str(tmp_path / "tv.safetensors"))
    torch.testing.assert_close(model.stem.conv.weight, peer.features[0][0].weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.head.conv.weight, peer.features[18][0].weight)
    assert torch.equal(model.classifier.weight, classifier)  # 10 classes: started afresh

    # The same from the command line.
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--pretrained", tmp_path / "tv.safetensors", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["pretrained"] == str(tmp_path / "tv.safetensors")
    assert load_file(out / "last.safetensors")["stem.conv.weight"].shape == (16, 1, 3, 3)


def test_pretrained_use_ema_starts_from_the_ema_weights_of_a_training_checkpoint(tmp_path, capsys):
    import argparse

    import torchvision
    from torch.optim.swa_utils import AveragedModel

    # As torchvision's references/classification/train.py --model-ema saves its checkpoints.
    peer = torchvision.models.mobilenet_v2(width_mult=0.35)
    ema = AveragedModel(peer, use_buffers=True)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"model": peer.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 9,
                "args": argparse.Namespace(model="mobilenet_v2"), "model_ema": ema.state_dict()},
               tmp_path / "checkpoint.pth")
    out = tmp_path / "run"
    # Without --model the file names the network: it is read twice (name, then weights).
    no_model = [a for a in TINY if a not in ("--model", "mobilenet_v2_035")]
    assert run_cli("train", *no_model, "--pretrained", tmp_path / "checkpoint.pth", "--freeze",
                   "backbone", "--out", tmp_path / "raw") == 0
    # The raw weights, with one notice that the file holds EMA weights too.
    assert capsys.readouterr().err.count("holds EMA weights too (model_ema)") == 1
    assert run_cli("train", *TINY, "--pretrained", tmp_path / "checkpoint.pth", "--use-ema",
                   "--freeze", "backbone", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["use_ema"] is True
    trained = load_file(out / "last.safetensors")
    averaged = mobilenetv2.load_model(tmp_path / "checkpoint.pth", use_ema=True).state_dict()
    frozen = [k for k in trained if k.startswith(("stages.", "head."))]
    assert frozen and all(torch.equal(trained[k], averaged[k]) for k in frozen)


@pytest.mark.parametrize("args, message", [
    (["--use-ema"], "pass --pretrained FILE (to keep an EMA of this run's weights: --ema"),
    (["--use-ema", "--pretrained", "imagenet"], "no EMA weights beside them: drop --use-ema"),
])
def test_use_ema_without_a_training_checkpoint_is_refused_in_one_line(args, message, tmp_path,
                                                                      capsys):
    assert run_cli("train", *TINY, *args, "--out", tmp_path / "run") == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def digits_start(tmp_path_factory):
    """Starting weights for the digits, with BatchNorm statistics of their own."""
    from tests.conftest import randomize_batchnorm

    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10, in_channels=1,
                                     small_input=True)
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("start") / "start.safetensors"
    mobilenetv2.save_weights(model, path)
    return path


@pytest.mark.parametrize("part", ["backbone", "3"])
def test_freeze_keeps_the_frozen_layers_and_their_batchnorm_statistics_bit_for_bit(
        part, digits_start, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--epochs", "2", "--pretrained", digits_start, "--freeze", part,
                   "--drop-path", "0.1", "--out", out) == 0
    before, after = load_file(digits_start), load_file(out / "last.safetensors")
    model = mobilenetv2.create_model("mobilenet_v2_035")
    blocks = [f"stages.{i}.{j}." for i, stage in enumerate(model.stages) for j in range(len(stage))]
    frozen = (("stem.", *blocks, "head.") if part == "backbone" else ("stem.", *blocks[:3]))
    assert any(k.startswith(frozen) and "running_mean" in k for k in before)
    for key in before:  # weights, running statistics and their counters alike
        assert torch.equal(before[key], after[key]) == key.startswith(frozen), key
    assert json.loads((out / "config.json").read_text())["freeze"] == (
        "backbone" if part == "backbone" else 3)
    # A resume that changes what is frozen does not fit the checkpoint: refused, and the run
    # resumes as it was.
    config = (out / "config.json").read_bytes()
    other = "12" if part == "backbone" else "backbone"
    assert run_cli("train", "--resume", out, "--epochs", "3", "--freeze", other) == 2
    assert (out / "config.json").read_bytes() == config
    assert run_cli("train", "--resume", out, "--epochs", "3") == 0


def test_frozen_parameters_are_left_out_of_the_optimizer():
    from mobilenetv2.train import freeze_layers

    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10)
    frozen = freeze_layers(model, 5)
    assert frozen[0].startswith("stem.") and frozen[-1].startswith("stages.2.1.")
    optimizer = build_optimizer(TrainConfig(), model)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    seed = mobilenetv2.create_model("seed", input_width=32, num_classes=10)
    frozen = freeze_layers(seed, "backbone")  # the walk-through's classifier is final.2
    assert frozen == [name for name, _ in seed.named_parameters() if not name.startswith("final.2.")]
    assert [p.requires_grad for p in seed.get_classifier().parameters()] == [True, True]


@pytest.mark.parametrize("args, message", [
    (["--freeze", "backbone"], "pass --pretrained"),
    (["--freeze", "18", "--pretrained", "{start}"], "has 17 blocks"),
    (["--freeze", "some"], "expected backbone or a number of blocks"),
    (["--freeze", "2", "--model", "seed", "--pretrained", "{start}"], "takes --freeze backbone"),
])
def test_bad_freezes_are_refused_in_one_line(args, message, digits_start, tmp_path, capsys):
    args = [a.replace("{start}", str(digits_start)) for a in args]
    try:
        code = run_cli("train", *TINY, *args, "--out", tmp_path / "run")
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after any progress lines: the one error line
    assert last.startswith("mobilenetv2 train: error:") and message in last


def test_the_seed_variant_records_no_dropout_and_refuses_one(capsys):
    # The walk-through's network has no dropout layer: --dropout was ignored, and config.json
    # said 0.2.
    assert resolve_config(None, {}, {"model": "seed"}).dropout == 0.0
    assert resolve_config(None, {"model": "seed", "dropout": 0.2}, {}).dropout == 0.0  # a config.json
    assert run_cli("train", "--model", "seed", "--dropout", "0.3", "--print-config") == 2
    assert "no dropout layer" in capsys.readouterr().err


def test_the_seed_variant_on_the_digits_default_says_which_resolution_to_pass(tmp_path, capsys):
    # `train --model seed` alone trains on the digits at 16 px, which the seed cannot take;
    # the line spoke of an input_width of 16, neither of which the user had typed.
    assert run_cli("train", "--model", "seed", "--epochs", "1", "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multiple of 32" in err and "pass --resolution 32" in err
    assert run_cli("train", "--model", "seed", "--resolution", "48", "--epochs", "1",
                   "--out", tmp_path / "r") == 2
    assert "not 48 px: pass --resolution 64" in capsys.readouterr().err


def test_resuming_an_older_run_with_an_options_default_is_no_change(tmp_path, capsys):
    # An earlier version's config.json has no decay_norm_and_bias; the run had the default
    # (False), and --no-decay-norm-and-bias beside --resume was refused as a change.
    old = json.loads(TrainConfig(out=str(tmp_path)).to_json())
    del old["decay_norm_and_bias"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert run_cli("train", "--resume", tmp_path, "--no-decay-norm-and-bias", "--print-config") == 0
    assert json.loads(capsys.readouterr().out)["decay_norm_and_bias"] is False
    assert run_cli("train", "--resume", tmp_path, "--decay-norm-and-bias", "--print-config") == 2
    assert "--decay-norm-and-bias cannot change" in capsys.readouterr().err


def test_an_older_seed_runs_config_json_starts_the_run_again(tmp_path, capsys):
    # Earlier versions wrote small_input: true (and dropout 0.2) into a seed run's config.json
    # on 32 px data; --config OLD/config.json was refused as if --small-input had been passed,
    # where its dropout is replaced by what the network has.
    old = json.loads(TrainConfig(model="seed", data="cifar10", small_input=True).to_json())
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert run_cli("train", "--config", tmp_path / "config.json", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["model"], printed["small_input"], printed["dropout"]) == ("seed", None, 0.0)
    assert run_cli("train", "--config", tmp_path / "config.json", "--small-input",
                   "--print-config") == 2
    assert "--small-input does not apply to the seed variant" in capsys.readouterr().err
    # Beside --resume as for a new run (they were taken, and written to config.json); what
    # the older run recorded itself is left as it is.
    assert run_cli("train", "--resume", tmp_path, "--dropout", "0.3", "--print-config") == 2
    assert "no dropout layer" in capsys.readouterr().err
    assert run_cli("train", "--resume", tmp_path, "--small-input", "--print-config") == 0
    assert json.loads(capsys.readouterr().out)["small_input"] is True
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text(TrainConfig(model="seed", dropout=0.0).to_json())
    assert run_cli("train", "--resume", new, "--small-input", "--print-config") == 2
    assert "--small-input does not apply to the seed variant" in capsys.readouterr().err


def test_adamw_at_a_recipes_sgd_rate_is_warned_about():
    from mobilenetv2.train import config_warnings

    (warning,) = config_warnings(TrainConfig(optimizer="adamw"))
    assert f"rate {TrainConfig().learning_rate():.4g}," in warning and "--lr" in warning
    assert config_warnings(TrainConfig(optimizer="adamw", lr=0.1)) == []  # asked for: as given
    assert config_warnings(TrainConfig(optimizer="adamw", lr_base=1e-3)) == []
    assert config_warnings(TrainConfig()) == []


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
def test_weight_decay_skips_batchnorm_and_biases_for_every_optimizer(optimizer):
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10)
    config = TrainConfig(optimizer=optimizer, weight_decay=4e-5, rmsprop_eps=1.0, momentum=0.9)
    built = build_optimizer(config, model)
    assert type(built).__name__ == {"sgd": "SGD", "rmsprop": "RMSprop", "adamw": "AdamW"}[optimizer]
    decay, no_decay = built.param_groups
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    if optimizer == "rmsprop":  # TF-Slim's: decay 0.9, momentum 0.9, epsilon 1.0
        assert (decay["alpha"], decay["momentum"], decay["eps"]) == (0.9, 0.9, 1.0)


def test_the_torchvision_recipe_decays_every_parameter_as_torchvisions_train_py():
    # torchvision's references/classification/train.py (no --norm-weight-decay given): one SGD
    # over model.parameters() with weight_decay 4e-5, BatchNorm's and the classifier's bias
    # included. One step of each from the same weights and gradients must agree.
    config = resolve_config("torchvision", {}, {})
    assert config.decay_norm_and_bias and not resolve_config("paper", {}, {}).decay_norm_and_bias
    torch.manual_seed(0)
    ours = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10)
    theirs = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10)
    theirs.load_state_dict(ours.state_dict())
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizers = (build_optimizer(config, ours),
                  torch.optim.SGD(theirs.parameters(), lr=config.learning_rate(), momentum=0.9,
                                  weight_decay=4e-5))
    for model, optimizer in zip((ours, theirs), optimizers, strict=True):
        torch.manual_seed(1)  # the same dropout mask
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_the_paper_recipe_puts_no_weight_decay_on_depthwise_filters_as_tf_slim():
    # TF-Slim's mobilenet.training_scope regularises slim.conv2d (the stem, every 1x1 and the
    # logits) and not slim.separable_conv2d, the depthwise 3x3s (the MobileNetV1 paper: "very
    # little or no weight decay" on them); the paper recipe decayed them too.
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=10)
    depthwise = {id(m.weight) for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    weights = {id(p) for p in model.parameters() if p.ndim > 1}

    def decayed(config: TrainConfig) -> set[int]:
        return {id(p) for group in build_optimizer(config, model).param_groups
                if group["weight_decay"] for p in group["params"]}

    assert len(depthwise) == 17  # one per inverted residual block
    assert decayed(resolve_config("paper", {}, {})) == weights - depthwise
    assert decayed(resolve_config("paper", {}, {"decay_depthwise": True})) == weights
    assert decayed(resolve_config("torchvision", {}, {})) >= weights  # torchvision's train.py: all


@pytest.mark.parametrize("name", ["mobilenet_v2_050", "mobilenet_v2_110d"])
def test_layer_decay_gives_each_parameter_timms_lr_and_weight_decay(name):
    from timm.optim import create_optimizer_v2

    def per_parameter(model, optimizer, scale_key):
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr"] * g.get(scale_key, 1.0), g["weight_decay"])
                for g in optimizer.param_groups for p in g["params"]}

    model = mobilenetv2.create_model(name, num_classes=10)
    config = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.05, layer_decay=0.7)
    ours = per_parameter(model, build_optimizer(config, model), "unused")
    theirs = per_parameter(model, create_optimizer_v2(model, "adamw", lr=0.01, weight_decay=0.05,
                                                      layer_decay=0.7), "lr_scale")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key
    groups = build_optimizer(config, model).param_groups
    assert groups[0]["lr"] == 0.01  # the head first: the lr that the progress bar and metrics show
    assert ours["stem.conv.weight"][0] == pytest.approx(0.01 * 0.7 ** (sum(map(len, model.stages)) + 1))
    assert ours["head.conv.weight"][0] == pytest.approx(0.01 * 0.7)


def test_layer_decay_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--layer-decay", "0.8", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["layer_decay"] == 0.8
    assert run_cli("train", "--resume", out, "--epochs", "2") == 0  # the groups reload as saved
    assert run_cli("train", *TINY, "--layer-decay", "1.5", "--out", tmp_path / "bad") == 2
    assert "--layer-decay must be in (0, 1)" in capsys.readouterr().err
    assert run_cli("train", *TINY, "--model", "seed", "--layer-decay", "0.8",
                   "--out", tmp_path / "seed") == 2
    assert "does not apply to the seed variant" in capsys.readouterr().err


def test_tensorboard_gets_every_metric_of_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mobilenetv2.reporting import RunLog

    rows = [{"epoch": e, "train_loss": 2.0 / e, "train_top1": 10.0 * e, "val_loss": 1.0 / e,
             "val_top1": 20.0 * e, "val_top5": 50.0, "lr": 0.1, "images_per_second": 400.0,
             "seconds": 3.0} for e in (1, 2)]
    run_log = RunLog(tmp_path, enabled=True, tensorboard=True)
    run_log.write(rows[:1])
    run_log.write(rows)
    run_log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/top1", "val/top5", "lr"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(1, 20.0), (2, 40.0)]


def test_on_a_terminal_progress_is_a_bar_with_loss_accuracy_and_speed(monkeypatch, capsys):
    from mobilenetv2.reporting import Progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.setenv("TERM", "xterm")  # (a CI runner's TERM=dumb gets plain lines)
    progress = Progress(4, "epoch 1/1", enabled=True)
    assert progress.bar is not None
    for step in range(1, 5):
        if progress.due():
            progress.update(step, loss=0.5, acc=90.0, img_s=1234.0, lr=0.01)
    assert progress.bar.n == 4
    assert progress.bar.postfix == "loss 0.5000 acc 90.00% 1,234 img/s lr 0.01"
    progress.close()
    assert progress.bar is None  # the next epoch draws its own
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss 0.5000" in err


def test_a_dumb_terminal_gets_plain_progress_lines_not_a_redrawn_bar(monkeypatch, caplog,
                                                                      capsys):
    # TERM=dumb (Emacs' shell, screen-reader setups) cannot redraw a line in place: tqdm's
    # carriage returns left a new line per refresh there, each one more line to read.
    from mobilenetv2.reporting import Progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.setenv("TERM", "dumb")
    progress = Progress(4, "epoch 1/1", enabled=True, log_every=2)
    assert progress.bar is None
    with caplog.at_level("INFO", logger="mobilenetv2"):
        for step in range(1, 5):
            if progress.due():
                progress.update(step, loss=0.5, acc=90.0)
        progress.close()
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 1/1 2/4 loss 0.5000 acc 90.00%", "epoch 1/1 4/4 loss 0.5000 acc 90.00%"]
    assert "\r" not in capsys.readouterr().err


def test_the_paper_schedule_decays_the_lr_by_0_98_per_epoch():
    config = resolve_config("paper", {}, {})
    assert config.optimizer == "rmsprop" and config.rmsprop_eps == 1.0 and config.ema == 0.9999
    # 0.045 per 96-image batch, each of the 16 workers' (TF-Slim: --learning_rate=0.045 *
    # NUM_GPUS, "slim internally averages clones so we compensate"): 0.72 at 16 x 96.
    assert config.learning_rate() == pytest.approx(0.045 * 16)
    assert resolve_config("paper", {}, {"batch_size": 96}).learning_rate() == pytest.approx(0.045)
    steps = 100
    for k in (0, 1, 5, 50):
        assert lr_factor(k * steps, steps_per_epoch=steps, config=config) == pytest.approx(0.98 ** k)
        assert lr_factor(k * steps + steps - 1, steps_per_epoch=steps, config=config) == pytest.approx(0.98 ** k)


def test_the_torchvision_recipe_matches_their_reference():
    config = resolve_config("torchvision", {}, {})
    assert (config.optimizer, config.momentum, config.weight_decay, config.epochs) == ("sgd", 0.9, 4e-5, 300)
    assert config.learning_rate() == pytest.approx(0.045) and config.batch_size == 256
    assert lr_factor(3 * 10, steps_per_epoch=10, config=config) == pytest.approx(0.98 ** 3)


def test_the_torchvision_v2_recipe_matches_the_command_of_their_v2_weights():
    # pytorch/vision PR 5560: --batch-size 128 (x 8 GPUs) --lr 0.5 --lr-scheduler cosineannealinglr
    # --lr-warmup-epochs 5 --auto-augment ta_wide --epochs 600 --random-erase 0.1
    # --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 --weight-decay 0.00002
    # --norm-weight-decay 0.0 --train-crop-size 176 --model-ema --val-resize-size 232
    # --ra-sampler --ra-reps 4
    config = resolve_config("torchvision-v2", {}, {})
    assert config.ra_reps == 4
    assert (config.batch_size, config.learning_rate(), config.scheduler, config.warmup_epochs,
            config.epochs) == (1024, 0.5, "cosine", 5.0, 600)
    assert (config.auto_augment, config.random_erase, config.label_smoothing, config.mixup_alpha,
            config.cutmix_alpha, config.weight_decay) == ("ta_wide", 0.1, 0.1, 0.2, 1.0, 2e-5)
    assert (config.resolution, config.val_resolution) == (176, 224)
    assert math.floor(224 / config.crop_pct) == 232
    # Their EMA: decay 0.99998 per update every 32 steps, its complement scaled by
    # global batch x 32 / epochs; per step that is our decay.
    per_update = 1 - (1 - 0.99998) * 1024 * 32 / 600
    assert config.ema == pytest.approx(per_update ** (1 / 32), abs=2e-6)


def test_cosine_with_warmup_rises_linearly_then_falls_to_zero():
    config = TrainConfig(epochs=10, warmup_epochs=2, scheduler="cosine")
    f = [lr_factor(s, steps_per_epoch=10, config=config) for s in range(100)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
    assert f[20] == pytest.approx(1.0) and f[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[20:], f[21:], strict=False)) and f[99] < 1e-3


def test_every_recipe_resolves_to_a_valid_config():
    for name in RECIPES:
        assert resolve_config(name, {}, {}).recipe == name


def test_drop_path_reaches_the_model_and_its_saved_configuration(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--drop-path", "0.1", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["drop_path"] == 0.1
    model = mobilenetv2.load_model(out / "last.safetensors")
    assert model.config["drop_path_rate"] == 0.1
    assert max(getattr(block.drop_path, "p", 0.0) for stage in model.stages for block in stage) > 0


def test_the_papers_ablations_train_from_the_cli_and_are_saved(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--no-linear-bottleneck", "--no-use-residual",
                   "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["linear_bottleneck"] is False and config["use_residual"] is False
    model = mobilenetv2.load_model(out / "last.safetensors")
    assert model.config["linear_bottleneck"] is False and model.config["use_residual"] is False
    assert not any(block.use_residual for stage in model.stages for block in stage)
    assert all(hasattr(block.project, "act") for stage in model.stages for block in stage)
    assert run_cli("train", *TINY, "--model", "seed", "--resolution", "32",
                   "--no-use-residual", "--out", tmp_path / "seed") == 2
    assert "--no-use-residual and --grad-checkpointing do not apply" in capsys.readouterr().err


def test_the_freeze_benchmark_runs_and_trains_only_what_it_says():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "bench_freeze.py"
    result = subprocess.run([sys.executable, str(script), "--resolution", "32", "--batch-size", "4",
                             "--rounds", "2", "--steps", "1", "--parts", "backbone,12", "--json"],
                            capture_output=True, text=True, timeout=600, check=True)
    rows = {row["freeze"]: row for row in json.loads(result.stdout)["rows"]}
    assert list(rows) == ["none", "backbone", "12"]  # full fine-tuning first: the reference
    assert rows["none"]["vs_full"] == 1.0
    assert rows["backbone"]["trainable_parameters"] == 1280 * 10 + 10
    assert rows["none"]["trainable_parameters"] > rows["12"]["trainable_parameters"] > 1280 * 10 + 10


def test_balanced_class_weights_are_scikit_learns_and_read_no_image():
    from sklearn.utils.class_weight import compute_class_weight

    from mobilenetv2.data import build_datasets, dataset_labels
    from mobilenetv2.train import balanced_class_weights

    labels = [0] * 30 + [1] * 6 + [3] * 4  # class 2 has no examples
    weights = balanced_class_weights(labels, ["a", "b", "c", "d"])
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=np.array(labels))
    torch.testing.assert_close(weights[[0, 1, 3]], torch.tensor(expected, dtype=torch.float32))
    assert weights[2] == 0 and math.isclose(float(weights[labels].mean()), 1.0, rel_tol=1e-6)
    digits = build_datasets("digits")
    assert dataset_labels(digits.train) == [int(digits.train[i][1]) for i in range(len(digits.train))]


def test_class_weights_change_the_training_of_an_imbalanced_folder(tmp_path, capsys):
    from tests.test_data import write_class_folder

    data = write_class_folder(tmp_path / "photos", {"cat": 24, "dog": 6})
    args = ["train", "--data", data, "--resolution", "16", "--model", "mobilenet_v2_035",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--seed", "0",
            "--deterministic", "--no-tensorboard"]
    runs = {}
    for weights in ("none", "balanced"):
        out = tmp_path / weights
        assert run_cli(*args, "--class-weights", weights, "--out", out) == 0
        runs[weights] = load_file(out / "last.safetensors")["classifier.weight"]
        assert json.loads((out / "config.json").read_text())["class_weights"] == weights
    assert "--class-weights balanced: from 0.6" in capsys.readouterr().err  # dog's 2.5 the other end
    assert not torch.equal(runs["none"], runs["balanced"])


def test_patience_counts_epochs_since_the_first_best():
    from mobilenetv2.train import patience_ran_out

    history = [{"val_top1": v} for v in (50.0, 60.0, 60.0, 55.0)]
    assert patience_ran_out(history, 2) and not patience_ran_out(history, 3)
    assert not patience_ran_out(history, 0) and not patience_ran_out([], 1)


def test_patience_stops_a_run_that_no_longer_improves_and_resume_keeps_that(digits_start,
                                                                           tmp_path, capsys):
    # A frozen backbone and a vanishing learning rate: the validation top-1 cannot move.
    out = tmp_path / "run"
    args = ["train", *TINY, "--pretrained", digits_start, "--freeze", "backbone", "--lr", "1e-9"]
    assert run_cli(*args, "--epochs", "5", "--patience", "1", "--out", out) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 and rows[0]["val_top1"] == rows[1]["val_top1"]
    assert "stopped early after epoch 2 of 5" in capsys.readouterr().err
    metrics = out / "metrics.csv"  # as if it died between its checkpoint and its logs
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    assert run_cli("train", "--resume", out) == 0  # nothing left to train; the logs repaired
    assert len(list(csv.DictReader(metrics.open()))) == 2
    assert run_cli("train", "--resume", out, "--patience", "3") == 0  # more patience: 2 more
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 4


def test_class_weights_scale_each_examples_whole_loss_smoothing_included():
    import torch.nn.functional as F

    from mobilenetv2.engine import classification_loss

    weights = torch.tensor([0.55, 5.5])  # 10:1 classes, balanced
    # A common-class image predicted as smoothing 0.1 wants (0.95 / 0.05): no gradient left.
    # (torch's weight= would push it towards the rare class, whose weight also scales the
    # smoothing this image spreads over it.)
    logits = torch.tensor([[math.log(0.95), math.log(0.05)]], requires_grad=True)
    classification_loss(logits, torch.tensor([0]), 0.1, weights).backward()
    assert logits.grad.abs().max() < 1e-6
    # Each example's smoothed loss times its class's weight; mixed targets mix the weights.
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    expected = (F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
                * weights[labels]).sum()
    torch.testing.assert_close(classification_loss(logits, labels, 0.1, weights), expected)
    mixed = torch.tensor([[0.7, 0.3], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    expected = (F.cross_entropy(logits, mixed, reduction="none") * (mixed @ weights)).sum()
    torch.testing.assert_close(classification_loss(logits, mixed, 0.0, weights), expected)
    torch.testing.assert_close(classification_loss(logits, labels, 0.1),
                               F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum"))


def test_class_weights_follow_the_default_dtype():
    from mobilenetv2.train import balanced_class_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert balanced_class_weights([0, 0, 1], ["a", "b"]).dtype == torch.float64
    finally:
        torch.set_default_dtype(default)


def test_gradient_accumulation_takes_the_steps_of_the_whole_batch(digits_start, tmp_path):
    # BatchNorm frozen (--freeze backbone) and no dropout: nothing depends on how the batch is
    # cut, so K micro-batches must give the weights of one batch. Class weights and label
    # smoothing ride along, since each micro-batch's loss is scaled by the whole batch.
    args = ["train", *TINY, "--epochs", "2", "--pretrained", digits_start, "--freeze", "backbone",
            "--dropout", "0", "--class-weights", "balanced", "--deterministic", "--device", "cpu"]
    runs = {}
    for k in ("1", "3"):
        out = tmp_path / f"k{k}"
        assert run_cli(*args, "--grad-accum-steps", k, "--out", out) == 0
        runs[k] = load_file(out / "last.safetensors")
        history = list(csv.DictReader((out / "metrics.csv").open()))
        runs[k + "loss"] = float(history[-1]["train_loss"])
    torch.testing.assert_close(runs["3"]["classifier.weight"], runs["1"]["classifier.weight"],
                               rtol=1e-5, atol=1e-6)
    assert math.isclose(runs["3loss"], runs["1loss"], rel_tol=1e-5)
    assert not torch.equal(runs["1"]["classifier.weight"], load_file(digits_start)["classifier.weight"])


def test_gradient_accumulation_beyond_the_batch_is_refused(tmp_path, capsys):
    assert run_cli("train", *TINY, "--batch-size", "4", "--grad-accum-steps", "8",
                   "--out", tmp_path / "run") == 2
    assert "--grad-accum-steps must be between 1 and half the --batch-size (4" in capsys.readouterr().err


def test_skipped_steps_count_neither_images_nor_correct_answers(tmp_path, monkeypatch):
    import torch.nn.functional as F

    original = F.cross_entropy

    def nan_in_training(*args, **kwargs):  # every training loss NaN, evaluation untouched
        loss = original(*args, **kwargs)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(F, "cross_entropy", nan_in_training)
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--skip-nonfinite", "--grad-accum-steps", "2", "--out", out) == 0
    row = list(csv.DictReader((out / "metrics.csv").open()))[-1]
    assert float(row["train_top1"]) == 0.0


def test_evaluate_breaks_ties_as_argmax_and_predict_do():
    # Quantized logits tie exactly; topk's order among equals is unspecified, and eval's top-1
    # differed from quantize's (argmax) and predict's on the same int8 file.
    from mobilenetv2.engine import evaluate
    from mobilenetv2.runtime import top_classes

    logits = torch.tensor([[1.0, 2.0, 0.0, 2.0, 1.0, 1.0, 2.0]] * 4)  # topk picked class 3
    labels = torch.tensor([1, 3, 5, 6])
    loader = [(torch.zeros(4, 1), labels, 0)]  # (images, labels, unreadable) batches
    metrics = evaluate(lambda x: logits[: len(x)], loader, confusion_classes=7)
    assert metrics["top1"] == 25.0  # class 1 only: the first of the tied
    assert int(logits[0].argmax()) == 1 == top_classes(logits[:1].numpy(), 1)[0][0][0]
    assert metrics["top5"] == 75.0  # 1, 3, 6, then 0 and 4 of the three 1.0s: not 5
    assert [row[1] for row in metrics["confusion"]] == [0, 1, 0, 1, 0, 1, 1]  # all read as 1


def test_resume_refuses_what_the_checkpoint_fixes_and_changes_nothing(tmp_path, capsys):
    # Found by a trainer review: --lr, --batch-size, --momentum ... beside --resume were
    # announced, written to config.json and not used (the checkpoint's optimizer and schedule
    # hold the old ones); --config and --out were ignored.
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--out", out) == 0
    capsys.readouterr()
    config = (out / "config.json").read_bytes()
    (tmp_path / "c.yaml").write_text("epochs: 3\n")
    for extra, message in ((["--lr", "0.5"], "--lr cannot change when resuming"),
                           (["--batch-size", "64", "--momentum", "0.5"],
                            "--batch-size, --momentum cannot change when resuming"),
                           (["--recipe", "cifar"], "--recipe cannot change"),
                           (["--config", tmp_path / "c.yaml"], "--config sets up a new run"),
                           (["--out", tmp_path / "elsewhere"], "a resumed run goes on in")):
        assert run_cli("train", "--resume", out, "--epochs", "2", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert (out / "config.json").read_bytes() == config
    assert not (tmp_path / "elsewhere").exists()
    assert run_cli("train", "--resume", out, "--epochs", "2", "--out", out) == 0  # its own


def test_resume_names_a_moved_pretrained_file(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    mobilenetv2.save_weights(mobilenetv2.create_model("mobilenet_v2_035", num_classes=10,
                                                      in_channels=1, small_input=True), weights)
    out = tmp_path / "run"
    assert run_cli("train", *TINY, "--pretrained", weights, "--out", out) == 0
    weights.rename(tmp_path / "moved.safetensors")
    assert run_cli("train", "--resume", out, "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "(the --pretrained file the run in" in err and "pass --pretrained with where" in err
    assert run_cli("train", "--resume", out, "--epochs", "2", "--pretrained",
                   tmp_path / "moved.safetensors") == 0


def test_metrics_show_the_learning_rate_each_epoch_trained_at(tmp_path):
    # They showed the next step's rate: epoch 1 of a step schedule read 0.098, not 0.1.
    assert run_cli("train", *TINY, "--epochs", "2", "--scheduler", "step", "--warmup-epochs",
                   "0", "--lr-decay-rate", "0.5", "--lr", "0.1", "--out", tmp_path) == 0
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.1, 0.05])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_no_recipe_decides_the_network_the_images_decide(recipe):
    # Recipes set small_input until stop 19: --recipe cifar on 224-px photos built the 32x32
    # network (14x the multiply-adds), --recipe torchvision on CIFAR the ImageNet stem. The
    # data's resolution decides (tests/test_folder_runs.py), CIFAR's 32 px included.
    assert "small_input" not in RECIPES[recipe]
    assert resolve_config(recipe, {}, {"data": "photos"}).small_input is None


def test_the_training_benchmark_gives_every_loop_a_grad_scaler_where_ours_has_one(monkeypatch, capsys):
    # fp16 autocast (a GPU without bf16): the plain loops must scale their losses as our trainer
    # does, each with its own scaler, or the reference would skip that work and its sync per step.
    # A CPU GradScaler stands in for the GPU's here.
    import sys
    from contextlib import nullcontext
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    sys.modules.pop("bench_train", None)
    import bench_train

    scalers = []

    class CountingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = 0
            scalers.append(self)

        def step(self, optimizer, *args, **kwargs):
            self.steps += 1
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    monkeypatch.setattr(bench_train, "mixed_precision",
                        lambda mode, device: (nullcontext(), CountingScaler("cpu")))
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--batch-size", "4",
                                      "--steps", "1", "--rounds", "1", "--json"])
    bench_train.main()
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 4 and len(scalers) == 4  # ours and the three plain loops, one each
    assert [s.steps for s in scalers] == [2, 2, 2, 2]  # warm-up and the round



def test_steps_the_grad_scaler_skips_do_not_warn_of_a_wrong_schedule_order(tmp_path, monkeypatch, recwarn):
    # fp16 on a GPU: the scaler skips the optimizer's step while its scale overflows, and PyTorch
    # then warns that lr_scheduler.step() came "before optimizer.step()" (seen on an H200). A CPU
    # GradScaler with a scale that overflows float32 stands in for it here.
    from contextlib import nullcontext

    import mobilenetv2.train

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    monkeypatch.setattr(mobilenetv2.train, "mixed_precision", lambda mode, device: (nullcontext(), scaler))
    assert run_cli("train", *TINY, "--out", str(tmp_path)) == 0
    assert scaler.get_scale() < 2.0**127  # it did skip steps
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]

# --------------------------------------------------------------------------------------------
# mobilenetv2.fit: the trainer from Python

FIT_TINY = {"resolution": 16, "model": "mobilenet_v2_035", "batch_size": 128, "epochs": 1,
            "seed": 0, "tensorboard": False, "log_every": 5}


def test_fit_trains_resumes_and_leaves_the_callers_process_as_it_was(tmp_path, capsys, monkeypatch):
    import logging
    import random

    import mobilenetv2

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # logging unset, as in a notebook
    torch.manual_seed(123)
    random.seed(5)
    expected_torch, expected_python = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(5)
    logger = logging.getLogger("mobilenetv2")
    handlers, level = list(logger.handlers), logger.level

    result = mobilenetv2.fit(**FIT_TINY, out=tmp_path / "run")
    # the run seeded the generators; the caller's draws go on as if it had not run
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python
    assert result.epochs == 1 and result.int8 is None and not result.interrupted
    assert result.weights == tmp_path / "run" / "best.safetensors"
    assert isinstance(mobilenetv2.load_model(result.weights), mobilenetv2.MobileNetV2)
    assert result.final["val_top1"] == pytest.approx(result.best_top1)
    # its lines reached stderr (nothing set logging up), and no handler stayed behind
    assert "epoch 1/1" in capsys.readouterr().err
    assert logger.handlers == handlers and logger.level == level
    # the same configuration as the command resolves from the same options
    assert run_cli("train", *TINY, "--log-every", "5", "--out", tmp_path / "run",
                   "--print-config") == 0
    printed, written = (json.loads(capsys.readouterr().out),
                        json.loads((tmp_path / "run" / "config.json").read_text()))
    assert printed == {**written, "small_input": None}  # (the run records what the data chose)

    with pytest.raises(ValueError, match="--batch-size cannot change"):
        mobilenetv2.fit(resume=tmp_path / "run", batch_size=64)
    resumed = mobilenetv2.fit(resume=tmp_path / "run", epochs=2)
    assert resumed.epochs == 2 and resumed.out == tmp_path / "run"
    assert "resuming with changed options: epochs=2" in capsys.readouterr().err


def test_fit_refuses_mistakes_before_training(tmp_path, monkeypatch):
    import importlib.util

    import mobilenetv2
    from mobilenetv2 import TrainConfig

    with pytest.raises(ValueError, match=r"unknown options: epoch \(did you mean epochs\?\)"):
        mobilenetv2.fit(epoch=3, out=tmp_path / "a")
    with pytest.raises(ValueError, match="either a TrainConfig or a recipe"):
        mobilenetv2.fit(TrainConfig(), recipe="cifar", out=tmp_path / "a")
    with pytest.raises(ValueError, match="give only the options to change"):
        mobilenetv2.fit(recipe="cifar", resume=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="holds no run to resume"):
        mobilenetv2.fit(resume=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown options: epoch"):
        mobilenetv2.fit(TrainConfig(), epoch=3)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ValueError, match=r"int8=True needs onnxruntime: pip install"):
        mobilenetv2.fit(**FIT_TINY, int8=True, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_recipe_applies_through_from_recipe_and_fit_not_the_constructor(tmp_path):
    from mobilenetv2 import TrainConfig

    config = TrainConfig.from_recipe("cifar", epochs=5)
    assert config == resolve_config("cifar", {}, {"epochs": 5})
    assert (config.recipe, config.nesterov, config.weight_decay, config.label_smoothing,
            config.epochs) == ("cifar", True, 5e-4, 0.0, 5)
    assert TrainConfig(recipe="cifar").label_smoothing == 0.1  # a record of the name only
    path = tmp_path / "ablation.yaml"
    path.write_text("epochs: 7\nrecipe: paper\n")
    assert TrainConfig.from_recipe(config_file=path, lr=0.01).optimizer == "rmsprop"
    with pytest.raises(ValueError, match="give either --model or --width-mult"):
        TrainConfig.from_recipe(model="mobilenet_v2_100", width_mult=0.5)
    # paths as pathlib gives them, written to config.json as text
    assert TrainConfig(out=tmp_path, data=tmp_path / "photos").out == str(tmp_path)


def test_evaluate_from_python_gives_what_eval_json_prints(trained, capsys):
    weights = trained / "best.safetensors"
    metrics = mobilenetv2.evaluate(weights, workers=0, per_class=True)  # digits, by its meta
    assert run_cli("eval", "--weights", weights, "--json", "--workers", "0", "--per-class") == 0
    printed = json.loads(capsys.readouterr().out)
    assert metrics.keys() == printed.keys()
    for key in ("top1", "top5", "loss", "images", "per_class", "confusion"):
        assert metrics[key] == pytest.approx(printed[key]) if key == "loss" else metrics[key] == printed[key]
    assert metrics["images"] == 360 and len(metrics["per_class"]) == 10
    assert mobilenetv2.evaluate(str(weights), "digits", workers=0)["top1"] == metrics["top1"]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        mobilenetv2.evaluate(weights, batch_size=0)
    with pytest.raises(FileNotFoundError):
        mobilenetv2.evaluate(trained / "missing.safetensors")
