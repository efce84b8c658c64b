"""Augmentations beyond flips and crops (torchvision's reference-script options): AutoAugment's
policies, random erasing, MixUp / CutMix, and the resampling and crop that evaluation, the
saved metadata and the torch-free runtime must agree on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mobilenetv2 import load_model
from mobilenetv2.cli import main
from mobilenetv2.config import AUTO_AUGMENTS
from mobilenetv2.data import BatchMix, build_datasets, eval_transform, open_image

DIGITS = ["--resolution", "16", "--model", "mobilenet_v2_035", "--batch-size", "128",
          "--epochs", "1", "--seed", "0", "--no-tensorboard", "--device", "cpu"]


def write_folder(root: Path, side: int = 80, per_class: int = 4) -> Path:
    """train/ and val/ with two classes of noisy, photo-like RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("ant", "bee"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                yy, xx = np.mgrid[0:side, 0:side + 7]
                base = np.stack([xx, yy, xx + yy], -1) * (100 if label == "ant" else 60) / side
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("policy", AUTO_AUGMENTS)
def test_every_auto_augment_policy_changes_images_reproducibly(policy, folder):
    plain = build_datasets(str(folder), resolution=32, seed=0)
    augmented = build_datasets(str(folder), resolution=32, seed=0, auto_augment=policy)
    images = [augmented.train[i][0] for i in range(8)]
    assert all(image.shape == (3, 32, 32) for image in images)
    # Seeded by (seed, epoch, index): the same example in the same epoch is the same image ...
    assert all(torch.equal(image, augmented.train[i][0]) for i, image in enumerate(images))
    # ... the policy changes what the crop and flip alone give (same seed, same crops) ...
    assert any(not torch.equal(image, plain.train[i][0]) for i, image in enumerate(images))
    # ... and the next epoch draws again.
    augmented.train.set_epoch(1)
    assert any(not torch.equal(image, augmented.train[i][0]) for i, image in enumerate(images))


def test_random_erasing_blanks_one_rectangle_to_the_mean(folder):
    plain = build_datasets(str(folder), resolution=72, seed=0)
    erased = build_datasets(str(folder), resolution=72, seed=0, random_erase=1.0)
    for index in range(4):
        before, after = plain.train[index][0], erased.train[index][0]
        changed = (before != after).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        box = after[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.all(box == 0)  # erased after normalisation: the dataset's mean colour
        outside = torch.ones_like(changed)
        outside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = False
        assert torch.equal(before[:, outside], after[:, outside])


@pytest.mark.parametrize("flag", [["--auto-augment", "ra"], ["--random-erase", "0.25"]])
def test_the_digits_refuse_image_file_augmentations_in_one_line(flag, tmp_path, capsys):
    assert main(["train", *DIGITS, *flag, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "affine warps" in err


@pytest.mark.parametrize("args, needle", [
    (["--random-erase", "1.5"], "--random-erase must be a probability"),
    (["--mixup-alpha", "-1"], "--mixup-alpha and --cutmix-alpha must be finite numbers >= 0"),
    (["--crop-pct", "1.5"], "--crop-pct must be in"),
    (["--auto-augment", "bogus"], "invalid choice"),
    (["--interpolation", "lanczos"], "invalid choice"),
])
def test_bad_augmentation_options_exit_2_with_one_line(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse exits itself; main returns 2
        raise SystemExit(main(["train", *DIGITS, *args, "--out", str(tmp_path / "run")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


# --------------------------------------------------------------------------------------------
# MixUp and CutMix


def _batch(n: int = 8, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 12, 12, generator=generator)
    labels = torch.arange(n) % classes  # neighbours differ, so each row shows its lambda
    return images, labels


def test_mixup_blends_each_image_with_its_neighbour_and_the_labels_alike():
    images, labels = _batch()
    mixed, targets = BatchMix(5, mixup_alpha=0.4)(images, labels, epoch=0, step=0)
    lam = float(targets[0, labels[0]])
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    one_hot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))


def test_cutmix_pastes_one_box_of_the_neighbour_and_weights_labels_by_its_area():
    images, labels = _batch()
    mixed, targets = BatchMix(5, cutmix_alpha=1.0)(images, labels, epoch=0, step=3)
    from_neighbour = (mixed == images.roll(1, 0)).all(1)  # (N, H, W)
    assert torch.all(from_neighbour | (mixed == images).all(1))
    box = from_neighbour[0]
    assert box.any() and torch.equal(from_neighbour, box.expand_as(from_neighbour))
    lam = 1 - box.float().mean()
    torch.testing.assert_close(targets[0, labels[0]], lam)
    torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))


def test_batch_mixing_depends_only_on_seed_epoch_and_step_and_leaves_the_global_rng():
    images, labels = _batch()
    mix = BatchMix(5, mixup_alpha=0.2, cutmix_alpha=1.0, seed=7)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    first = mix(images, labels, epoch=2, step=5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    again = mix(images, labels, epoch=2, step=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    kinds = set()
    for step in range(20):  # with both alphas, each batch takes one of the two
        mixed, _ = mix(images, labels, epoch=0, step=step)
        pasted = ((mixed == images) | (mixed == images.roll(1, 0))).all()
        kinds.add("cutmix" if pasted else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_batch_mixing_keeps_the_channels_last_memory_format():
    images, labels = _batch()
    images = images.contiguous(memory_format=torch.channels_last)
    for mix in (BatchMix(5, mixup_alpha=0.2), BatchMix(5, cutmix_alpha=1.0)):
        mixed, _ = mix(images, labels, epoch=0, step=0)
        assert mixed.is_contiguous(memory_format=torch.channels_last)


def test_a_mixup_cutmix_run_resumes_to_the_same_weights(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*DIGITS, "--deterministic", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
    assert main(["train", *common, "--epochs", "2", "--out", str(whole)]) == 0
    assert main(["train", *common, "--epochs", "1", "--out", str(parts)]) == 0
    assert main(["train", "--resume", str(parts), "--epochs", "2"]) == 0
    config = json.loads((whole / "config.json").read_text())
    assert (config["mixup_alpha"], config["cutmix_alpha"]) == (0.2, 1.0)
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------
# Resampling and crop: trained with, stored, evaluated with


def test_a_folder_run_stores_its_resampling_and_crop_and_eval_uses_them(folder, tmp_path, capsys,
                                                                       monkeypatch):
    from mobilenetv2 import engine

    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--resolution", "72", "--model",
                 "mobilenet_v2_035", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--no-tensorboard", "--interpolation", "bicubic", "--crop-pct", "0.8",
                 "--auto-augment", "ta_wide", "--random-erase", "0.25", "--mixup-alpha", "0.2",
                 "--out", str(out)]) == 0
    model = load_model(out / "best.safetensors")
    assert (model.meta["interpolation"], model.meta["crop_pct"]) == ("bicubic", 0.8)

    seen = []  # the images eval feeds the model
    real_evaluate = engine.evaluate

    def recording_evaluate(model, loader, **kwargs):
        seen.extend(images for images, _, _ in loader)
        return real_evaluate(model, loader, **kwargs)

    monkeypatch.setattr(engine, "evaluate", recording_evaluate)
    capsys.readouterr()
    assert main(["eval", "--weights", str(out / "best.safetensors"), "--data", str(folder),
                 "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
    files = sorted((folder / "val").glob("*/*.png"))  # the loader's order: class, then name

    def prepared(meta: dict) -> torch.Tensor:
        transform = eval_transform(meta)
        return torch.stack([transform(open_image(f)) for f in files])

    # As the model's meta says (bicubic, resize to 72 / 0.8 = 90, crop 72), not the defaults.
    torch.testing.assert_close(torch.cat(seen), prepared(model.meta), rtol=0, atol=1e-6)
    default = prepared(model.meta | {"interpolation": "bilinear", "crop_pct": 0.875})
    assert (default - prepared(model.meta)).abs().max() > 0.1


def test_quantize_calibrates_on_images_prepared_as_the_weights_say(folder, tmp_path, monkeypatch):
    from mobilenetv2 import create_model, quantize, save_weights

    model = create_model("mobilenet_v2_035", num_classes=2)
    model.meta.update(input_size=[3, 72, 72], interpolation="bicubic", crop_pct=0.8,
                      class_names=["ant", "bee"])
    save_weights(model, tmp_path / "m.safetensors")
    captured = {}

    def capture(train, count, seed=0):
        captured["train"] = train
        raise KeyboardInterrupt  # enough: the rest of quantization is tested elsewhere

    monkeypatch.setattr(quantize, "calibration_images", capture)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_from_data(tmp_path / "m.safetensors", str(folder), tmp_path / "q.onnx")
    files = sorted((folder / "train").glob("*/*.png"))
    transform = eval_transform(model.meta)
    for index in (0, 5):
        expected = transform(open_image(files[index]))
        torch.testing.assert_close(captured["train"][index][0], expected, rtol=0, atol=1e-6)


def test_fixres_trains_at_one_size_and_evaluates_and_saves_at_another(folder, tmp_path, capsys):
    data = build_datasets(str(folder), resolution=72, val_resolution=96, crop_pct=0.8)
    assert data.train[0][0].shape == (3, 72, 72) and data.val[0][0].shape == (3, 96, 96)
    assert data.model_meta()["input_size"] == [3, 96, 96]
    out = tmp_path / "run"
    assert main(["train", *DIGITS, "--val-resolution", "24", "--out", str(out)]) == 0
    model = load_model(out / "best.safetensors")
    assert model.meta["input_size"] == [1, 24, 24]  # what eval, export and predict will feed
    capsys.readouterr()
    assert main(["eval", "--weights", str(out / "best.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 360
    seed = ["train", *DIGITS, "--model", "seed", "--val-resolution", "24", "--out",
            str(tmp_path / "seed")]
    assert main(seed) == 2
    assert "fixes its input size" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Repeated augmentation (torchvision's --ra-sampler)


def test_repeated_augmentation_puts_copies_side_by_side_across_processes():
    from mobilenetv2.data import ShardedBatchSampler

    n, reps = 24, 3
    single = ShardedBatchSampler(n, 12, shuffle=True, seed=1, repeats=reps)
    order = [i for batch in single.global_batches() for i in batch]
    assert len(order) == n  # an epoch keeps its length ...
    examples = [i % n for i in order]
    assert len(set(examples)) == n // reps  # ... and sees n / reps examples, each reps times
    for start in range(0, n, reps):  # copies 0, 1, 2 of one example in a row
        assert [i // n for i in order[start:start + reps]] == list(range(reps))
        assert len({i % n for i in order[start:start + reps]}) == 1
    shards = [list(ShardedBatchSampler(n, 12, rank, 3, shuffle=True, seed=1, repeats=reps))
              for rank in range(3)]
    for step in range(2):  # with 3 processes each takes one copy of every example in a batch
        assert {i % n for i in shards[0][step]} == {i % n for i in shards[2][step]}
        assert [i // n for i in shards[1][step]] == [1] * 4
    assert ShardedBatchSampler(n, 12, shuffle=True, seed=1).global_batches()[0] != \
        single.global_batches()[0]


def test_each_copy_of_an_image_is_augmented_afresh_and_copy_0_as_without_repeats(folder):
    data = build_datasets(str(folder), resolution=72, seed=0)
    n = len(data.train)
    first, copy1, copy2 = (data.train[3 + k * n] for k in range(3))
    assert first[1] == copy1[1] == copy2[1]  # the same example and label ...
    assert not torch.equal(first[0], copy1[0]) and not torch.equal(copy1[0], copy2[0])
    assert torch.equal(first[0], data.train[3][0])  # ... copy 0 is the plain index


def test_a_run_with_repeated_augmentation_trains_and_the_digits_refuse_it(folder, tmp_path,
                                                                          capsys):
    assert main(["train", "--data", str(folder), "--resolution", "32", "--model",
                 "mobilenet_v2_035", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--no-tensorboard", "--ra-reps", "2", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["ra_reps"] == 2
    assert main(["train", *DIGITS, "--ra-reps", "2", "--out", str(tmp_path / "digits")]) == 2
    assert "--ra-reps repeats per-image augmentations" in capsys.readouterr().err
