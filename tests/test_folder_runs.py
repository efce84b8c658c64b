"""Runs on a user's own image folders: the model their images get, where a run may write, and
what a resume or an evaluation says when the folders changed (each found by a new-user review)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from mobilenetv2.cli import main
from mobilenetv2.config import TORCHVISION_TAGS, resolve_config
from mobilenetv2.registry import PRETRAINED

QUICK = ["--model", "mobilenet_v2_035", "--epochs", "1", "--batch-size", "4", "--workers", "0",
         "--no-tensorboard", "--seed", "0"]


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def photos(root: Path, classes=("cat", "dog"), splits=("train", "val"), side: int = 40) -> Path:
    """``root/<split>/<class>/<i>.png``, 4 images per class (``splits=()``: class folders)."""
    for split in splits or (".",):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.new("RGB", (side, side), (60 * c + i, 90, 120)).save(folder / f"{i}.png")
    return root


def saved_config(weights: Path) -> dict:
    with safe_open(weights, "pt") as f:
        return json.loads(f.metadata()["config"])


def test_photos_larger_than_64_px_get_the_imagenet_model_by_default(tmp_path):
    # The 32x32 adaptation keeps the full resolution through the first stages: at 224 px it
    # costs 14x the multiply-adds (and ran a 23 GB machine out of memory at batch 64).
    data = photos(tmp_path / "data", side=80)
    assert run_cli("train", "--data", data, "--resolution", "72", *QUICK, "--out", tmp_path / "big") == 0
    assert saved_config(tmp_path / "big" / "best.safetensors")["small_input"] is False
    assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--out", tmp_path / "small") == 0
    assert saved_config(tmp_path / "small" / "best.safetensors")["small_input"] is True
    assert resolve_config(None, {}, {}).small_input is None  # by data, digits included


def test_a_run_folder_inside_the_images_is_refused_before_anything_is_written(tmp_path, capsys):
    data = photos(tmp_path / "data")
    for out in (data / "train" / "run1", data / "val" / "cat" / "run"):
        assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--out", out) == 2
        assert "whose folders are the classes: write the run somewhere else" in capsys.readouterr().err
        assert not out.exists()
    # beside the splits is harmless: only train/ and val/ are read
    assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--out",
                   data / "runs" / "a") == 0
    flat = photos(tmp_path / "flat", splits=())
    assert run_cli("train", "--data", flat, "--resolution", "32", *QUICK, "--out", flat / "run") == 2
    assert not (flat / "run").exists()


def test_a_new_run_never_overwrites_an_old_runs_files(tmp_path, capsys):
    data, out = photos(tmp_path / "data"), tmp_path / "run"
    args = ["train", "--data", data, "--resolution", "32", *QUICK, "--out", out]
    assert run_cli(*args) == 0
    assert run_cli(*args) == 2
    assert f"{out} already holds a run: pass --resume {out}" in capsys.readouterr().err
    # Without its checkpoint (deleted to save space) the weights and metrics are still kept.
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "already holds a run's best.safetensors, last.safetensors, metrics.csv" in err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A folder with only a config.json (a run that failed before training) is reused.
    for path in out.iterdir():
        if path.name != "config.json":
            path.unlink()
    assert run_cli(*args) == 0


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    from datetime import datetime

    from mobilenetv2 import train

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 30, 2, 25, 20)

    monkeypatch.setattr(train, "datetime", Frozen)
    folders = [train.new_run_folder(tmp_path / "runs") for _ in range(3)]
    assert [f.name for f in folders] == ["20261130-022520", "20261130-022520-2", "20261130-022520-3"]
    assert all(f.is_dir() for f in folders)


def test_resume_after_a_class_folder_was_added_names_the_change(tmp_path, capsys):
    data = photos(tmp_path / "data")
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--epochs", "2",
                   "--patience", "1", "--out", out) == 0
    photos(data, classes=("fish",))  # a third class appears in train/ and val/
    capsys.readouterr()
    assert run_cli("train", "--resume", out, "--epochs", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and (
        f"the data's classes changed since {out} began (2 then, 3 now; new: fish): resume with "
        f"the data it began with, or start a new run (--out) from its weights with --pretrained "
        f"{out / 'last.safetensors'}") in err.splitlines()[-1], err


def test_resume_of_a_run_whose_folder_moved_says_to_pass_data(tmp_path, capsys):
    data = photos(tmp_path / "data")
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--out", out) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert run_cli("train", "--resume", out, "--epochs", "2") == 2
    assert (f"--data {data} is not a folder (any more): resume the run in {out} with --data "
            "where its images are now") in capsys.readouterr().err
    assert run_cli("train", "--resume", out, "--epochs", "2", "--data", tmp_path / "moved") == 0


def test_eval_names_the_classes_the_model_lacks_and_asks_for_data_it_cannot_guess(tmp_path, capsys):
    data = photos(tmp_path / "data")
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--out", out) == 0
    weights = out / "best.safetensors"
    photos(data, classes=("bird",))
    capsys.readouterr()
    assert run_cli("eval", "--weights", weights, "--data", data) == 2
    assert f"has 2 classes but {data} has 3 (bird is not among its classes)" in capsys.readouterr().err
    for path in (weights, tmp_path / "m.onnx"):  # an export names its data too
        if path.suffix == ".onnx":
            assert run_cli("export", "--weights", weights, "--out", path) == 0
            capsys.readouterr()
        assert run_cli("eval", "--weights", path) == 2  # not the digits it was never trained on
        assert (f"pass --data: the images to evaluate {path} on (they were trained on data)"
                in capsys.readouterr().err)


def test_torchvisions_imagenet_weights_pick_their_model_unless_one_is_named():
    assert tuple(PRETRAINED) == TORCHVISION_TAGS
    assert resolve_config(None, {}, {"pretrained": "imagenet"}).model == "mobilenet_v2_100"
    assert resolve_config(None, {}, {"pretrained": "timm"}).model == "mobilenet_v2_050"
    named = resolve_config(None, {}, {"pretrained": "imagenet-v2", "model": "mobilenet_v2_140"})
    assert named.model == "mobilenet_v2_140"  # and the download then says why not


@pytest.mark.parametrize("tag", ["imagenet", "imagenet-v2"])
def test_the_readme_fine_tuning_command_builds_the_model_of_its_weights(tag, tmp_path, monkeypatch):
    # No download here: the weights are torchvision's model, as load_state_dict_from_url gives it.
    import torch
    import torchvision

    state = torchvision.models.mobilenet_v2().state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: state)
    data = photos(tmp_path / "data")
    assert run_cli("train", "--data", data, "--pretrained", tag, "--freeze", "backbone",
                   "--resolution", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                   "--no-tensorboard", "--out", tmp_path / "run") == 0
    assert saved_config(tmp_path / "run" / "best.safetensors")["name"] == "mobilenet_v2_100"


def test_resuming_a_finished_run_says_so_and_counts_in_words(tmp_path, capsys):
    data = photos(tmp_path / "data")
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--resolution", "32", *QUICK, "--out", out) == 0
    captured = capsys.readouterr()
    assert "for 1 epoch on " in captured.err and "after 1 epoch in" in captured.out
    assert run_cli("train", "--resume", out) == 0
    assert (f"{out} has trained 1 epoch (--epochs 1): nothing is left to train (pass --epochs "
            "N to train on)") in capsys.readouterr().err


def test_the_network_chosen_by_the_data_is_recorded_so_a_resume_keeps_it(tmp_path):
    data = photos(tmp_path / "data", side=80)
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--resolution", "64", *QUICK, "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["small_input"] is True
    # a larger size on resume would by itself pick the other network, of other strides
    assert run_cli("train", "--resume", out, "--epochs", "2", "--resolution", "96") == 0
    assert saved_config(out / "last.safetensors")["small_input"] is True


def test_only_classes_that_pair_no_way_are_named():
    from mobilenetv2.data import imagenet_synsets, match_classes
    from mobilenetv2.weights import imagenet_categories

    with pytest.raises(ValueError, match=r"has 2 classes but the data has 3 \(bird is not among"):
        match_classes(["cat", "dog"], 2, ["bird", "cat", "dog"])
    # ImageNet folders pair by WordNet id, not by name: no list of 'foreign' names then
    with pytest.raises(ValueError) as refused:
        match_classes(imagenet_categories(), 1000, [*imagenet_synsets(), "n99999999"])
    assert "has 1000 classes but the data has 1001: " in str(refused.value)
    assert "not among" not in str(refused.value)


def test_weights_of_a_folder_named_like_a_built_in_dataset_ask_for_data(tmp_path, capsys):
    data = photos(tmp_path / "digits")  # a folder that happens to be called digits
    assert run_cli("train", "--data", data, "--resolution", "16", *QUICK, "--out", tmp_path / "r") == 0
    capsys.readouterr()
    assert run_cli("eval", "--weights", tmp_path / "r" / "best.safetensors") == 2
    assert "pass --data" in capsys.readouterr().err
