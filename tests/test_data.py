"""Data: CIFAR in its on-disk format, image folders with the files real folders hold, digits."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv2.cli import main
from mobilenetv2.data import (
    DIGITS_TEST_FRACTION,
    build_datasets,
    eval_transform,
    open_image,
)
from mobilenetv2.imagefolder import SafeImageFolder, collate_skipping

TINY = ["--model", "mobilenet_v2_035", "--epochs", "1", "--batch-size", "16", "--workers", "0",
        "--no-tensorboard", "--seed", "0"]


def write_cifar(root, name: str = "cifar10", per_split: tuple[int, int] = (40, 20)) -> None:
    """A tiny CIFAR-10/100 in torchvision's on-disk format (pickled batches, as distributed)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, label_key = root / "cifar-10-batches-py", "labels"
        classes = [f"class{i}" for i in range(10)]
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, meta_key = ["test_batch"], "batches.meta", "label_names"
    else:
        folder, label_key = root / "cifar-100-python", "fine_labels"
        classes = [f"fine{i}" for i in range(100)]
        train_files, test_files, meta_file, meta_key = ["train"], ["test"], "meta", "fine_label_names"
    folder.mkdir(parents=True)

    def dump(filename: str, n: int) -> None:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, len(classes), n).tolist()}
        (folder / filename).write_bytes(pickle.dumps(entry))

    for filename in train_files:
        dump(filename, per_split[0] // len(train_files))
    for filename in test_files:
        dump(filename, per_split[1])
    (folder / meta_file).write_bytes(pickle.dumps({meta_key: classes}))


@pytest.fixture
def cifar_without_checksums(monkeypatch):
    """Our fixture files cannot have the official MD5 sums; skip torchvision's check of them."""
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_in_its_on_disk_format_trains_and_evaluates(name, classes, tmp_path, capsys,
                                                          cifar_without_checksums):
    write_cifar(tmp_path / "data", name)
    data = build_datasets(name, root=tmp_path / "data")
    assert (data.num_classes, data.in_channels, data.resolution, data.small_input) == (classes, 3, 32, True)
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < classes
    out = tmp_path / "run"
    assert main(["train", "--data", name, "--data-dir", str(tmp_path / "data"), *TINY,
                 "--out", str(out)]) == 0
    # CIFAR's held-out images are its official test set, and the result line says so
    assert capsys.readouterr().out.startswith("test accuracy: top-1")
    assert main(["eval", "--weights", str(out / "last.safetensors"), "--data", name,
                 "--data-dir", str(tmp_path / "data"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 20


def test_the_seed_variant_on_cifar_records_no_small_input_and_refuses_one(
        tmp_path, capsys, cifar_without_checksums):
    # Found by a CIFAR review: the seed variant has no 32x32 adaptation, yet its config.json
    # said small_input: true (chosen by the data), and --small-input was silently ignored.
    write_cifar(tmp_path / "data")
    args = ["train", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), *TINY,
            "--model", "seed"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["small_input"] is None
    assert main([*args, "--small-input", "--out", str(tmp_path / "small")]) == 2
    assert "--small-input does not apply to the seed variant" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()


def test_missing_cifar_says_to_download_and_exits_2(tmp_path, capsys):
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--download" in err and len(err.strip().splitlines()) == 1


def test_missing_cifar_in_eval_points_at_train_download_which_eval_lacks(tmp_path, capsys):
    """eval has no --download: its line must not tell the user to pass one."""
    main(["train", "--data", "digits", *TINY, "--out", str(tmp_path / "run")])
    capsys.readouterr()
    assert main(["eval", "--weights", str(tmp_path / "run" / "best.safetensors"), "--data",
                 "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mobilenetv2 train --download" in err


def test_a_failed_cifar_download_is_one_line_naming_the_dataset_and_its_url(tmp_path, capsys,
                                                                             monkeypatch):
    import socket
    import urllib.error

    from torchvision.datasets import cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    assert main(["train", "--data", "cifar10", "--download", "--data-dir", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mobilenetv2 train: error: ")
    assert "could not download cifar10" in err and cifar.CIFAR10.url in err


def test_the_digits_split_is_fixed_stratified_and_documented():
    data = build_datasets("digits")
    assert (len(data.train), len(data.val)) == (1437, 360)
    assert len(data.val) == math.ceil(1797 * DIGITS_TEST_FRACTION)  # scikit-learn rounds up
    labels = torch.tensor([data.val[i][1] for i in range(len(data.val))])
    assert labels.bincount().min() >= 35  # every digit is in the test split in proportion
    again = build_datasets("digits")
    assert torch.equal(data.val.images, again.val.images)
    assert data.train[0][0].shape == (1, 16, 16)


def test_digits_augmentations_depend_only_on_seed_epoch_and_index():
    a, b = build_datasets("digits", seed=1).train, build_datasets("digits", seed=1).train
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a[5][0], b[5][0])
    b.set_epoch(4)
    assert not torch.equal(a[5][0], b[5][0])


# --------------------------------------------------------------------------------------------
# Image folders with the files real folders hold


def _save(path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def write_messy_folder(root) -> list[str]:
    """Two classes of mixed image modes plus the bad files users have; returns the bad names."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            for i in range(6):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                pixels[..., c] = 255  # something to learn
                _save(folder / f"rgb{i}.png", Image.fromarray(pixels))
            _save(folder / "gray.png", Image.fromarray(pixels[..., 0]))
            _save(folder / "rgba.png", Image.fromarray(pixels).convert("RGBA"))
            _save(folder / "palette.png", Image.fromarray(pixels).convert("P"))
            _save(folder / "cmyk.jpg", Image.fromarray(pixels).convert("CMYK"))
            _save(folder / "deep.png", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257))
        (root / split / "empty").mkdir()
    bad = root / "train" / "cat"
    (bad / "notes.txt").write_text("not an image")
    (bad / "random.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (bad / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    return ["random.png", "truncated.jpg"]


def test_every_image_mode_converts_to_rgb_or_gray(tmp_path):
    write_messy_folder(tmp_path)
    for name in ("gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep.png"):
        path = tmp_path / "val" / "dog" / name
        assert open_image(path, 3).mode == "RGB" and open_image(path, 1).mode == "L", name
    deep = np.asarray(open_image(tmp_path / "val" / "dog" / "deep.png", 1))
    assert deep.max() > 200  # 16-bit values are rescaled, not clipped to white


def test_a_transparent_colour_becomes_white_as_an_alpha_band_does(tmp_path):
    # PNG optimisers (optipng, oxipng) store an RGBA image whose alpha is 0 or 255 as RGB or
    # L with a transparent colour (tRNS): its background must not become that colour (black).
    gray = np.zeros((4, 8), np.uint8)
    gray[:, :4] = 128
    color = np.zeros((4, 8, 3), np.uint8)
    color[:, :4] = (200, 30, 30)
    _save(tmp_path / "l.png", Image.fromarray(gray), transparency=0)
    _save(tmp_path / "rgb.png", Image.fromarray(color), transparency=(0, 0, 0))
    _save(tmp_path / "rgba.png", Image.fromarray(np.dstack([color, (gray > 0) * 255]).astype(np.uint8)))
    for name in ("l.png", "rgb.png", "rgba.png"):
        pixels = np.asarray(open_image(tmp_path / name, 3))
        assert (pixels[:, 4:] == 255).all(), name  # the transparent half: white
        assert (pixels[:, :4] != 255).any(), name  # the opaque half: kept
    model_meta = {"input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1],
                  "resize_mode": "exact"}
    from mobilenetv2.runtime import preprocess_image

    assert (preprocess_image(tmp_path / "rgb.png", model_meta)[:, :, 4:] == 1).all()


def test_corrupt_truncated_and_non_image_files_are_skipped_with_warnings(tmp_path, caplog):
    bad = write_messy_folder(tmp_path)
    caplog.set_level(logging.WARNING)
    dataset = SafeImageFolder(tmp_path / "train")
    assert dataset.classes == ["cat", "dog", "empty"]
    assert "no images" in caplog.text and "left out 1 file in " in caplog.text  # notes.txt
    samples = [dataset[i] for i in range(len(dataset))]
    _, _, skipped = collate_skipping(
        [(None if image is None else torch.zeros(1), label) for image, label in samples])
    assert skipped == len(bad)
    for name in bad:
        assert name in caplog.text


def test_hidden_and_system_folders_are_neither_classes_nor_images(tmp_path):
    # torchvision's ImageFolder takes .ipynb_checkpoints for a class; a NAS's @eaDir or a zip's
    # __MACOSX would shift every label the same way, and their thumbnails are .jpg files.
    pixels = np.zeros((8, 8, 3), np.uint8)
    for folder in ("cat", "dog", ".ipynb_checkpoints", "__MACOSX", "@eaDir",
                   "cat/@eaDir/a.png", "cat/.thumbs", "dog/__MACOSX"):
        _save(tmp_path / folder / "x.png", Image.fromarray(pixels))
    dataset = SafeImageFolder(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p, _ in dataset.samples) == [
        "cat/x.png", "dog/x.png"]


def test_windows_thumbnail_caches_and_folder_settings_are_not_warned_about(tmp_path, caplog):
    # Explorer leaves Thumbs.db (any case) and desktop.ini in photo folders: every run warned
    # "left out N files ... that are not images, e.g. cat/Thumbs.db", which hid real strays.
    pixels = np.zeros((8, 8, 3), np.uint8)
    for folder in ("cat", "dog"):
        _save(tmp_path / folder / "x.png", Image.fromarray(pixels))
        for name in ("Thumbs.db", "desktop.ini", "ehthumbs.db"):
            (tmp_path / folder / name).write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "dog" / "THUMBS.DB").write_bytes(b"")
    (tmp_path / "desktop.ini").write_text("[.ShellClassInfo]")
    with caplog.at_level(logging.WARNING):
        dataset = SafeImageFolder(tmp_path)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 2
    assert "left out" not in caplog.text
    (tmp_path / "dog" / "notes.txt").write_text("a real stray")
    with caplog.at_level(logging.WARNING):
        SafeImageFolder(tmp_path)
    assert "left out 1 file in " in caplog.text


def test_the_files_left_out_as_not_images_are_counted_by_suffix(tmp_path, caplog):
    # "left out 1204 files ..., e.g. cat/a.gif" hid that 1,200 of them were iPhone photos
    # (.heic, which Pillow cannot read): the one example named was a stray GIF.
    pixels = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for name in ("cat/a.png", "dog/a.png"):
        _save(tmp_path / name, pixels)
    for name in ("cat/a.gif", "cat/IMG_1.HEIC", "dog/IMG_2.heic", "dog/IMG_3.heic", "dog/README"):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        SafeImageFolder(tmp_path)
    assert ".webp): 3 .heic, 1 .gif, 1 (no suffix), e.g. " in caplog.text


def test_what_a_spawned_worker_is_sent_pickles_and_reads_the_same_images(tmp_path):
    # Windows and macOS start DataLoader workers with spawn, which pickles the dataset and the
    # loader's functions (fork, Linux's default, pickles nothing): a lambda or a local function
    # among them works on Linux and fails there. (A real spawn run of train, eval and predict
    # with --workers 2 gave the fork run's weights and predictions, bit for bit.)
    from mobilenetv2.train import leave_stop_signals_to_the_main_process

    write_class_folder(tmp_path / "photos", {"cat": 4, "dog": 4})
    data = build_datasets(str(tmp_path / "photos"), resolution=16, val_split=0.5)
    sent = (data.train, data.val, collate_skipping, leave_stop_signals_to_the_main_process)
    train, val, collate, init = pickle.loads(pickle.dumps(sent))
    assert collate is collate_skipping and init is leave_stop_signals_to_the_main_process
    assert len(train) == len(data.train) and len(val) == len(data.val)
    torch.testing.assert_close(val[0][0], data.val[0][0], rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["photos", "digits"])
def test_worker_processes_augment_each_epoch_as_the_training_process_would(tmp_path, spec):
    # The training loader's workers were persistent: each kept the copy of the dataset it
    # was started with, so set_epoch in the training process never reached them and every
    # epoch got the first epoch's crops and flips (the default for folders and CIFAR: up to
    # 4 workers on a CPU, 8 per GPU), unlike --workers 0, and a resumed run's workers kept
    # the epoch they began at instead.
    from mobilenetv2.data import ShardedBatchSampler
    from mobilenetv2.train import close_loaders, make_loader

    if spec == "photos":
        write_class_folder(tmp_path / "photos", {"cat": 4, "dog": 4})
        data = build_datasets(str(tmp_path / "photos"), resolution=16, val_split=0.5, seed=3)
    else:
        data = build_datasets(spec, resolution=16, seed=3)
    sampler = ShardedBatchSampler(len(data.train), 256 if spec == "digits" else 4, 0, 1,
                                  shuffle=True, seed=3)

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = make_loader(data.train, sampler, workers, torch.device("cpu"), seed=3)
        images = []
        for epoch in range(2):
            data.train.set_epoch(epoch)
            sampler.set_epoch(epoch)
            images.append(torch.cat([batch[0] for batch in loader]))
        close_loaders(loader)
        return images

    in_process, in_workers = epochs(0), epochs(1)
    assert not torch.equal(in_process[0], in_process[1])  # the control: epochs differ
    for ours, theirs in zip(in_process, in_workers, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)


def test_images_beside_the_class_folders_are_named_as_left_out(tmp_path, caplog):
    # --data photos/dog, whose own photos lie beside its 2019/ and 2020/: the two subfolders
    # became the classes and the photos beside them were dropped without a word.
    write_class_folder(tmp_path / "dog", {"2019": 3, "2020": 3})
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "IMG_1.JPG")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "IMG_2.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        assert SafeImageFolder(tmp_path / "dog").classes == ["2019", "2020"]
    assert "left out 2 images directly in" in caplog.text and "IMG_1.JPG" in caplog.text


def test_linked_folders_are_followed_as_torchvision_follows_them(tmp_path):
    # torchvision's ImageFolder walks with followlinks=True; a class folder that gathers its
    # photos by links to other folders (or a predict folder of links) lost them without a word.
    pixels = np.zeros((8, 8, 3), np.uint8)
    for name in ("cat/a.png", "dog/a.png", "elsewhere/more/b.png", "elsewhere/more/c.png"):
        _save(tmp_path / name, Image.fromarray(pixels))
    data = tmp_path / "data"
    data.mkdir()
    (data / "cat").symlink_to(tmp_path / "cat")
    (data / "dog").symlink_to(tmp_path / "dog")
    (tmp_path / "dog" / "more").symlink_to(tmp_path / "elsewhere" / "more")
    (tmp_path / "dog" / "loop").symlink_to(tmp_path / "dog")  # walked once, not forever
    (tmp_path / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    dataset = SafeImageFolder(data)
    assert sorted(Path(p).relative_to(data).as_posix() for p, _ in dataset.samples) == [
        "cat/a.png", "dog/a.png", "dog/gone.png", "dog/more/b.png", "dog/more/c.png"]
    from mobilenetv2.runtime import image_files

    assert len(image_files([data])) == 5


def test_listing_a_folder_stats_links_but_no_regular_file(tmp_path, monkeypatch):
    # A stat per image (Path.is_file) made listing 20,000 files 21,701 stat calls where
    # torchvision's ImageFolder makes 501: on a network disk, at ~1 ms a call, minutes for
    # ImageNet. The directory listing already says which entries are files.
    import os

    from mobilenetv2.runtime import list_images

    for i in range(40):
        (tmp_path / "cat" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "cat" / f"{i}.jpg").write_bytes(b"")
    (tmp_path / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    stat, statted = os.stat, []
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: statted.append(
        str(path)) or stat(path, *args, **kwargs))
    images, others = list_images(tmp_path)
    assert len(images) == 41 and not others  # the broken link is still listed
    assert not [path for path in statted if not path.endswith("gone.jpg")]


def test_a_broken_link_is_named_as_one_when_read(tmp_path, caplog):
    # It warned "[Errno 2] No such file or directory: 'dog/gone.png'" (predict: "No such file
    # or directory: ..."), of a file that ls lists: the link, whose target is what is missing.
    from mobilenetv2.runtime import preprocess_image

    pixels = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for name in ("cat/a.png", "dog/a.png"):
        _save(tmp_path / name, pixels)
    (tmp_path / "dog" / "gone.png").symlink_to(tmp_path / "moved" / "b.png")
    dataset = SafeImageFolder(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert dataset[2][0] is None
    assert f"gone.png is a broken link: {tmp_path / 'moved' / 'b.png'} does not exist" in caplog.text
    meta = {"input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}
    with pytest.raises(FileNotFoundError, match="gone.png is a broken link: .*b.png does not"):
        preprocess_image(tmp_path / "dog" / "gone.png", meta)
    with pytest.raises(FileNotFoundError, match="image file not found: .*never.png"):
        preprocess_image(tmp_path / "never.png", meta)


def test_an_empty_file_is_named_as_one_when_read(tmp_path):
    # A failed download leaves a 0-byte x.jpg, which Pillow only "cannot identify".
    from mobilenetv2.runtime import preprocess_image

    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "y.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"x.jpg is not a readable image \(an empty file: 0 bytes\)$"):
        open_image(tmp_path / "x.jpg")
    meta = {"input_size": [3, 8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]}
    with pytest.raises(ValueError, match=r"x.jpg is not a readable image \(an empty file"):
        preprocess_image(tmp_path / "x.jpg", meta)
    with pytest.raises(ValueError, match=r"y.jpg is not a readable image \(UnidentifiedImageError"):
        open_image(tmp_path / "y.jpg")


def test_an_epoch_survives_bad_files_and_counts_them(tmp_path, capsys):
    write_messy_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--resolution", "32", *TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable training" in err
    assert "random.png" in err and "truncated.jpg" in err


def test_strict_fails_on_the_first_bad_image_naming_it(tmp_path, capsys):
    write_messy_folder(tmp_path)
    code = main(["train", "--data", str(tmp_path), "--resolution", "32", *TINY, "--strict",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and ("random.png" in err or "truncated.jpg" in err)
    assert "Traceback" not in err


def test_eval_counts_the_unreadable_images_it_skipped(tmp_path, capsys):
    # eval named each unreadable image but its result (text and --json) left them out: a
    # score over 10 of 12 images read as a score over the folder.
    from mobilenetv2 import create_model, save_weights

    data = write_class_folder(tmp_path / "photos", {"cat": 5, "dog": 5})
    model = create_model("mobilenet_v2_035", num_classes=2)
    model.meta["class_names"] = ["cat", "dog"]
    save_weights(model, tmp_path / "m.safetensors")
    args = ["eval", "--weights", str(tmp_path / "m.safetensors"), "--data", str(data),
            "--resolution", "32", "--workers", "0"]
    assert main([*args, "--json"]) == 0
    assert "unreadable" not in json.loads(capsys.readouterr().out)  # only when there are some
    (data / "cat" / "broken.png").write_bytes(b"not a png")
    (data / "dog" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["images"], result["unreadable"]) == (10, 2)
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "(10 images, 2 unreadable skipped," in out and "broken.png" in err
    # --strict, which the warning names, is eval's too: one line naming the file, exit 2,
    # from a worker process as well.
    assert main([*args, "--strict", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert ("broken.png" in err or "cut.jpg" in err) and "Traceback" not in err


def test_quantize_accepts_strict_which_its_skip_warning_names(tmp_path, capsys):
    # As eval's (ec00d95): quantize's warning for an unreadable calibration or evaluation image
    # said "skipped it (--strict stops instead)", and quantize --strict was an unknown option.
    from mobilenetv2 import create_model, save_weights

    data = write_class_folder(tmp_path / "photos", {"cat": 6, "dog": 6})
    (data / "cat" / "broken.png").write_bytes(b"not a png")
    model = create_model("mobilenet_v2_035", num_classes=2)
    model.meta.update(class_names=["cat", "dog"], input_size=[3, 32, 32])
    save_weights(model, tmp_path / "m.safetensors")
    args = ["quantize", "--weights", str(tmp_path / "m.safetensors"), "--data", str(data),
            "--out", str(tmp_path / "int8.onnx"), "--calibration-batches", "4",  # every image
            "--batch-size", "4"]
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "drop --strict" in err and "Traceback" not in err
    assert not (tmp_path / "int8.onnx").exists()
    assert main(args) == 0
    assert "broken.png" in capsys.readouterr().err


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="bomb.png"):
        open_image(path)


def test_a_photo_pillow_only_warns_about_is_read_as_torchvision_reads_it(tmp_path, monkeypatch):
    # Between MAX_IMAGE_PIXELS (89.5 MP) and twice it, Pillow warns: a 108 MP phone photo.
    # It was refused as a bomb (and skipped from training); torchvision and timm read it.
    from mobilenetv2.runtime import preprocess_image

    path = tmp_path / "phone.png"
    Image.new("RGB", (200, 200), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 40,000 pixels: a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and none reaches the user
        assert open_image(path).getpixel((0, 0)) == (10, 20, 30)
        meta = {"mean": [0, 0, 0], "std": [1, 1, 1], "input_size": [3, 32, 32]}
        assert preprocess_image(path, meta).shape == (3, 32, 32)


def test_folder_without_val_names_the_layout(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "val/" in capsys.readouterr().err


def test_eval_transform_follows_the_model_metadata():
    meta = {"mean": [0.5], "std": [0.25], "input_size": [1, 224, 224]}
    image = Image.new("RGB", (300, 400), (255, 0, 0))
    tensor = eval_transform(meta)(image)
    assert tensor.shape == (1, 224, 224)
    small = eval_transform({"mean": [0, 0, 0], "std": [1, 1, 1], "input_size": [3, 32, 32]})(image)
    assert small.shape == (3, 32, 32) and small[0].min() == 1.0


def test_eval_transform_resamples_as_the_metadata_says():
    """timm's weights were evaluated with bicubic resizing: their meta says so, and eval and
    predict must follow it (the torch-free runtime does; see test_runtime)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    meta = {"mean": [0.0] * 3, "std": [1.0] * 3, "input_size": [3, 224, 224]}
    bilinear, bicubic = (eval_transform(meta | {"interpolation": mode})(image)
                         for mode in ("bilinear", "bicubic"))
    expected = np.asarray(image.resize((256, 295), Image.BICUBIC).crop((16, 36, 240, 260)))
    np.testing.assert_allclose(bicubic.permute(1, 2, 0).numpy() * 255, expected, atol=1e-3)
    assert (bilinear - bicubic).abs().max() > 0.05
    with pytest.raises(ValueError, match="interpolation must be one of"):
        eval_transform(meta | {"interpolation": "lanczos"})


def test_the_public_eval_transform_takes_a_model_and_images_in_any_mode(tmp_path):
    """As torchvision's ``weights.transforms()``: the weights' own preprocessing, one call."""
    import mobilenetv2

    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=3, in_channels=1)
    model.meta.update(mean=[0.4], std=[0.3], input_size=[1, 72, 72], interpolation="bicubic")
    transform = mobilenetv2.eval_transform(model)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 100, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "x.png")
    expected = eval_transform(model.meta)(open_image(tmp_path / "x.png", channels=1))
    assert torch.equal(transform(rgba), expected)  # composited on white, then grayscale
    assert transform(rgba).shape == (1, 72, 72)
    assert mobilenetv2.eval_transform(model.meta)(rgba).shape == (1, 72, 72)


def test_eval_transform_takes_uint8_arrays_as_the_runtime_does_and_refuses_floats():
    # v2 transforms pass a NumPy array through untouched: the "transform" of an HxWx3 array was
    # that same array, with no error, and a model fed it failed far from the cause.
    import mobilenetv2

    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=3)
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    transform = mobilenetv2.eval_transform(model)
    want = transform(Image.fromarray(pixels))
    assert want.shape == (3, 224, 224)
    assert torch.equal(transform(pixels), want)
    assert torch.equal(transform(pixels[..., :1]), transform(Image.fromarray(pixels[..., 0])))
    with pytest.raises(ValueError, match="must be uint8"):
        transform(pixels / 255.0)


def test_eval_transform_of_a_weights_path_says_how_to_get_the_model():
    # It was AttributeError: 'str' object has no attribute 'meta'.
    with pytest.raises(ValueError, match=r"eval_transform\(mobilenetv2.load_model\(path\)\)"):
        eval_transform("best.safetensors")


# --------------------------------------------------------------------------------------------
# A folder of class folders: part of each class held out (--val-split)


def write_class_folder(root: Path, counts: dict[str, int], side: int = 12) -> Path:
    """``root/<class>/<i>.png``: a bright left half for the first class, right for the next."""
    for c, (label, count) in enumerate(counts.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.random.default_rng(i).integers(0, 60, (side, side, 3)).astype(np.uint8)
            half = slice(0, side // 2) if c % 2 == 0 else slice(side // 2, side)
            pixels[:, half] += 150
            Image.fromarray(pixels).save(root / label / f"{i:03d}.png")
    return root


def held_out_names(dataset: SafeImageFolder) -> set[str]:
    return {Path(p).relative_to(dataset.root).as_posix() for p, _ in dataset.samples}


def split_names(root: Path, fraction: float = 0.2) -> tuple[set[str], set[str]]:
    return tuple(held_out_names(side) for side in SafeImageFolder(root).split(fraction))


def test_the_split_holds_out_about_the_fraction_of_each_class_without_a_seed(tmp_path):
    write_class_folder(tmp_path / "a", {"cat": 400, "dog": 7, "eel": 2, "fox": 1})
    every = SafeImageFolder(tmp_path / "a")
    train, val = every.split(0.2)
    assert len(train) + len(val) == len(every) and not held_out_names(train) & held_out_names(val)
    assert train.targets == [label for _, label in train.samples] and train.classes == every.classes
    per_class = {name: (sum(1 for _, label in train.samples if every.classes[label] == name),
                        sum(1 for _, label in val.samples if every.classes[label] == name))
                 for name in every.classes}
    assert 0.15 < per_class["cat"][1] / 400 < 0.25
    assert min(per_class["dog"]) >= 1 and min(per_class["eel"]) == 1  # one each side at least
    assert per_class["fox"] == (1, 0)  # a class of one image is trained on
    # The same images wherever the folder lives (no seed, no absolute paths).
    write_class_folder(tmp_path / "elsewhere" / "b", {"cat": 400, "dog": 7, "eel": 2, "fox": 1})
    assert split_names(tmp_path / "elsewhere" / "b") == split_names(tmp_path / "a")
    with pytest.raises(ValueError, match="--val-split"):
        every.split(1.0)


def test_a_file_name_that_is_not_utf8_is_split_by_its_bytes(tmp_path):
    # A Windows zip unzipped on Linux leaves Latin-1 names (b"caf\xe9.jpg"): the split's
    # SHA-1 of the name raised UnicodeEncodeError, refusing the whole folder in a cryptic line.
    write_class_folder(tmp_path, {"cat": 3, "dog": 3})
    try:
        with open(bytes(tmp_path / "cat") + b"/caf\xe9.png", "wb") as file:
            file.write((tmp_path / "cat" / "000.png").read_bytes())
    except OSError:
        pytest.skip("this file system takes only UTF-8 names")
    train, val = SafeImageFolder(tmp_path).split(0.2)
    assert len(train) + len(val) == 7
    assert held_out_names(val) == held_out_names(SafeImageFolder(tmp_path).split(0.2)[1])
    assert "cat/caf\udce9.png" in held_out_names(train) | held_out_names(val)


def test_adding_images_never_moves_a_trained_on_image_into_validation(tmp_path):
    write_class_folder(tmp_path, {"cat": 30, "dog": 12, "eel": 5})
    before_train, before_val = split_names(tmp_path)
    write_class_folder(tmp_path, {"cat": 60, "dog": 40, "eel": 9})  # rewrites, then adds
    after_train, after_val = split_names(tmp_path)
    assert not before_train & after_val  # what old weights trained on is never evaluated
    cats = {name for name in before_val if name.startswith("cat/")}
    assert cats <= after_val  # and held-out images stay held out (but a class's fallback one)


def test_a_folder_of_class_folders_holds_out_part_of_each_class(tmp_path):
    write_class_folder(tmp_path, {"cat": 10, "dog": 10})
    held = {f: len(SafeImageFolder(tmp_path).split(f)[1]) for f in (0.2, 0.5)}
    data = build_datasets(str(tmp_path), resolution=16, seed=0)
    assert (len(data.train), len(data.val), data.class_names) == (20 - held[0.2], held[0.2],
                                                                   ["cat", "dog"])
    assert data.model_meta()["val_split"] == 0.2 and 2 <= held[0.2] < held[0.5] < 18
    data = build_datasets(str(tmp_path), resolution=16, seed=0, val_split=0.5)
    assert (len(data.train), len(data.val)) == (20 - held[0.5], held[0.5])
    # For evaluation: every image, unless a split is asked for.
    assert len(build_datasets(str(tmp_path), resolution=16, val_only=True).val) == 20
    assert len(build_datasets(str(tmp_path), resolution=16, val_only=True, val_split=0).val) == 20
    assert len(build_datasets(str(tmp_path), resolution=16, val_only=True,
                              val_split=0.2).val) == held[0.2]


def test_eval_takes_another_resolution_crop_and_interpolation_as_timm_validate(tmp_path, capsys):
    from torchvision.transforms import v2

    from mobilenetv2 import create_model, save_weights

    data = write_class_folder(tmp_path / "photos", {"cat": 3, "dog": 3}, side=90)
    # A model whose outputs tell inputs apart: BatchNorm statistics of real activations (a
    # fresh model's leave every image the same output), a classifier of unit-scale weights.
    model = create_model("mobilenet_v2_035", num_classes=2)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 72, 72))
        torch.nn.init.normal_(model.eval().classifier.weight)
    save_weights(model, tmp_path / "m.safetensors")
    files = sorted(data.rglob("*.png"))
    labels = torch.tensor([0 if f.parent.name == "cat" else 1 for f in files])

    def expected(resolution: int, crop_pct: float, interpolation: str) -> float:
        mode = v2.InterpolationMode(interpolation)
        prepare = v2.Compose([v2.Resize(math.floor(resolution / crop_pct), mode, antialias=True),
                              v2.CenterCrop(resolution), v2.PILToTensor(),
                              v2.ToDtype(torch.float32, scale=True),
                              v2.Normalize(model.meta["mean"], model.meta["std"])])
        with torch.no_grad():
            logits = model(torch.stack([prepare(Image.open(f).convert("RGB")) for f in files]))
        return torch.nn.functional.cross_entropy(logits, labels).item()

    def evaluated(weights: Path, *flags: str) -> float:
        # On the CPU: a GPU's TF32 convolutions move this model's large logits by percents.
        assert main(["eval", "--weights", str(weights), "--data", str(data), "--workers", "0",
                     "--device", "cpu", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["loss"]

    settings = {(): (224, 0.875, "bilinear"),
                ("--resolution", "72", "--crop-pct", "0.5", "--interpolation", "bicubic"):
                    (72, 0.5, "bicubic"),
                ("--resolution", "96", "--crop-pct", "1"): (96, 1.0, "bilinear")}
    losses = {flags: expected(*setting) for flags, setting in settings.items()}
    assert min(abs(a - b) for a, b in itertools.combinations(losses.values(), 2)) > 1e-3
    for flags, loss in losses.items():
        assert evaluated(tmp_path / "m.safetensors", *flags) == pytest.approx(loss, rel=1e-4)
    # An export takes its own size only, but its images may be prepared otherwise.
    assert main(["export", "--weights", str(tmp_path / "m.safetensors"), "--resolution", "72",
                 "--atol", "1e-3", "--out", str(tmp_path / "m.onnx")]) == 0  # logits of ~10
    capsys.readouterr()
    assert evaluated(tmp_path / "m.onnx", "--crop-pct", "0.5", "--interpolation",
                     "bicubic") == pytest.approx(expected(72, 0.5, "bicubic"), rel=1e-4)
    assert main(["eval", "--weights", str(tmp_path / "m.onnx"), "--data", str(data),
                 "--resolution", "96"]) == 2
    assert "exported for 72x72 inputs and takes no other size" in capsys.readouterr().err


def test_a_run_on_a_class_folder_evaluates_what_it_held_out(tmp_path, capsys, monkeypatch):
    from mobilenetv2 import quantize

    data = write_class_folder(tmp_path / "photos", {"cat": 10, "dog": 10})
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--resolution", "16", *TINY, "--batch-size", "4",
                 "--val-split", "0.3", "--out", str(out)]) == 0
    held = {f: len(SafeImageFolder(data).split(f)[1]) for f in (0.3, 0.5)}
    assert f"{held[0.3]} of its 20 images" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["val_split"] == 0.3
    weights = str(out / "best.safetensors")
    for extra, images in (([], held[0.3]), (["--val-split", "0"], 20),
                          (["--val-split", "0.5"], held[0.5])):
        assert main(["eval", "--weights", weights, "--data", str(data), "--workers", "0",
                     "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["images"] == images
    # Another folder of class folders is a test set, never seen in training: every image
    # counts (a review found it scored on the split's 30%).
    test_set = write_class_folder(tmp_path / "photos_test", {"cat": 3, "dog": 3})
    assert main(["eval", "--weights", weights, "--data", str(test_set), "--workers", "0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    # The training folder is known by its real name however it is named: ".", a trailing
    # slash, a link (a review found "." scoring every image, the trained ones included).
    (tmp_path / "latest").symlink_to(data)
    monkeypatch.chdir(data)
    from mobilenetv2.data import folder_name

    assert folder_name(".") == folder_name(tmp_path / "latest") == "photos"  # what training records
    for name in (".", f"{data}/", str(tmp_path / "latest")):
        assert main(["eval", "--weights", weights, "--data", name, "--workers", "0",
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["images"] == held[0.3], name
    monkeypatch.chdir(tmp_path)
    # Weights that do not say which folder (exports of earlier versions) keep the held-out part.
    from mobilenetv2 import load_model, save_weights

    unnamed = load_model(weights)
    del unnamed.meta["dataset"]
    save_weights(unnamed, tmp_path / "unnamed.safetensors")
    assert main(["eval", "--weights", str(tmp_path / "unnamed.safetensors"), "--data", str(data),
                 "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == held[0.3]
    # The ONNX export carries the split, and quantize calibrates on the training side only.
    assert main(["export", "--weights", weights, "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["eval", "--weights", str(tmp_path / "m.onnx"), "--data", str(data),
                 "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == held[0.3]
    captured = {}

    def capture(train, count, seed=0):
        captured["train"] = len(train)
        raise KeyboardInterrupt  # enough: the rest of quantization is tested elsewhere

    monkeypatch.setattr(quantize, "calibration_images", capture)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_from_data(weights, str(data), tmp_path / "q.onnx")
    assert captured["train"] == 20 - held[0.3]
    # Resuming with another split would train on held-out images: refused, the run intact.
    config = (out / "config.json").read_bytes()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--val-split", "0.5"]) == 2
    assert "--val-split cannot change when resuming" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == config


@pytest.mark.parametrize("args, message", [
    (["--data", "digits", "--val-split", "0.2"], "--val-split holds out part of a folder"),
    (["--val-split", "1.5"], "--val-split must be a fraction in (0, 1)"),
    (["--out", "{data}/run"], "inside"),
])
def test_bad_splits_and_runs_inside_the_data_are_refused_in_one_line(args, message, tmp_path,
                                                                    capsys):
    data = write_class_folder(tmp_path / "photos", {"cat": 4, "dog": 4})
    args = [a.replace("{data}", str(data)) for a in args]
    full = ["train", "--data", str(data), *TINY, "--out", str(tmp_path / "run"), *args]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (data / "run").exists()


def test_train_and_val_of_other_classes_are_refused_naming_the_classes_that_differ(tmp_path):
    # The message listed the first five classes of each, identical when the lists differ later.
    classes = {name: 2 for name in "abcdefg"}
    write_class_folder(tmp_path / "train", classes)
    write_class_folder(tmp_path / "val", {**{name: 1 for name in "abcdef"}, "h": 1})
    with pytest.raises(ValueError) as refused:
        build_datasets(str(tmp_path), resolution=16)
    assert str(refused.value) == (
        f"{tmp_path}/val has no folder for g; {tmp_path}/train has no folder for h: both need "
        "the same class folders (an empty one keeps a class that has no images there)")


def test_train_and_val_classes_spelt_alike_but_not_the_same_are_shown_apart(tmp_path):
    # train/ copied from a Mac names its folder "éclair" with a combining accent (NFD), val/
    # with a composed one (NFC): "val has no folder for éclair; train has no folder for éclair".
    write_class_folder(tmp_path / "train", {"cat": 1, "e\u0301clair": 1})
    write_class_folder(tmp_path / "val", {"cat": 1, "\u00e9clair": 1})
    with pytest.raises(ValueError, match=r"spell 1 class differently, e.g. 'e\\u0301clair' and "
                                         r"'\\xe9clair' \(accents composed"):
        build_datasets(str(tmp_path), resolution=16)


def test_a_split_with_a_stray_image_beside_its_classes_is_named(tmp_path):
    # It was refused as "has no val/ folder" beside the val/ folder the user was looking at.
    write_class_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    write_class_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "IMG_7.JPG")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'val'} holds 1 image directly \(e.g. "
                       r"IMG_7.JPG\), so it is not read as a split: move it into "):
        build_datasets(str(tmp_path), resolution=16)


def test_a_flat_imagenet_val_is_a_split_labelled_by_kaggles_file(tmp_path, caplog):
    # ILSVRC-2012's val/ unpacks unsorted; "holds 3 images directly ... move them into
    # val/<class>/" left the user to sort 50,000 images (on a cluster, often a read-only copy).
    write_class_folder(tmp_path / "train", {"n01440764": 2, "n01443537": 2})
    (tmp_path / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for n, synset in enumerate(["n01443537", "n01484850", "n01440764"], 1):
        Image.new("RGB", (12, 12)).save(tmp_path / "val" / f"ILSVRC2012_val_{n:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{n:08d},{synset} 1 2 10 11")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        bundle = build_datasets(str(tmp_path), resolution=16)
    assert bundle.class_names == ["n01440764", "n01443537"]
    # The image of a class train/ lacks (all 1,000 are in val/) is left out, in one line.
    assert [(Path(p).name, label) for p, label in bundle.val.dataset.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 1), ("ILSVRC2012_val_00000003.JPEG", 0)]
    assert "left out 1 of the 3 images" in caplog.text
    (tmp_path / "LOC_val_solution.csv").write_text("id,label\n")
    with pytest.raises(ValueError, match="is not Kaggle's LOC_val_solution.csv"):
        build_datasets(str(tmp_path), resolution=16)


def test_a_damaged_kaggle_label_file_is_refused_in_one_line(tmp_path, capsys):
    # A field beyond the csv module's limit (128 KB) raised _csv.Error, not a ValueError:
    # a traceback from eval, train and quantize.
    write_class_folder(tmp_path / "train", {"n01440764": 2, "n01443537": 2})
    (tmp_path / "val").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        f'ImageId,PredictionString\nILSVRC2012_val_00000001,"{"n" * 200_000}"\n')
    with pytest.raises(ValueError, match=r"is not Kaggle's LOC_val_solution.csv: line 2: field "):
        build_datasets(str(tmp_path), resolution=16)
    from mobilenetv2 import create_model, save_weights

    model = create_model("mobilenet_v2_035", num_classes=2)
    model.meta["class_names"] = ["n01440764", "n01443537"]
    save_weights(model, tmp_path / "w.safetensors")
    assert main(["eval", "--weights", str(tmp_path / "w.safetensors"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_split_layout_refuses_val_split_and_names_both_layouts(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="has its own train/ and val/"):
        build_datasets(str(tmp_path), val_split=0.2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="part of each class is held out"):
        build_datasets(str(tmp_path / "empty"))


def test_split_folders_are_told_by_name_and_content_whatever_their_case(tmp_path):
    from mobilenetv2.data import folder_layout

    # Kaggle's Training/ and Testing/ are splits, not two classes: refused by name, on every OS.
    for split in ("Training", "Testing"):
        write_class_folder(tmp_path / "kaggle" / split, {"cat": 3, "dog": 3})
    with pytest.raises(FileNotFoundError, match=r"has no train/ folder \(it has Testing/, Training/\)"):
        build_datasets(str(tmp_path / "kaggle"))
    # A class called train (of photos, not class folders) is a class.
    write_class_folder(tmp_path / "vehicles", {"bus": 4, "train": 4})
    assert folder_layout(tmp_path / "vehicles") == "classes"
    assert build_datasets(str(tmp_path / "vehicles"), resolution=16).class_names == ["bus", "train"]
    # The folder above a dataset names it; hidden folders are not looked into.
    write_class_folder(tmp_path / "above" / "flowers" / "train", {"rose": 2, "tulip": 2})
    with pytest.raises(ValueError, match="flowers holds dataset splits: pass --data"):
        build_datasets(str(tmp_path / "above"))
    write_class_folder(tmp_path / "hidden" / ".cache" / "train", {"rose": 2, "tulip": 2})
    write_class_folder(tmp_path / "hidden", {"rose": 3, "tulip": 3})
    assert build_datasets(str(tmp_path / "hidden"), resolution=16).class_names == ["rose", "tulip"]
    # Classes of one image each leave nothing to validate on: refused before training.
    write_class_folder(tmp_path / "ones", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match="no class of two or more images"):
        build_datasets(str(tmp_path / "ones"))


def test_class_folders_one_level_down_are_pointed_to(tmp_path):
    # An unzipped archive often adds a folder: photos/animals/{cat,dog} made one class.
    write_class_folder(tmp_path / "animals", {"cat": 2, "dog": 2})
    with pytest.raises(ValueError, match=r"one class folder only \(animals\).*if the folders in "
                       rf"animals/ are the classes, pass --data {tmp_path / 'animals'}\)$"):
        build_datasets(str(tmp_path), resolution=16)
    write_class_folder(tmp_path / "one", {"cat": 2})  # a single class of photos: no such advice
    with pytest.raises(ValueError, match="in a folder of its own$"):
        build_datasets(str(tmp_path / "one"), resolution=16)


def test_a_class_of_one_image_is_trained_on_with_a_warning(tmp_path, caplog):
    write_class_folder(tmp_path, {"cat": 6, "dog": 6, "eel": 1})
    with caplog.at_level(logging.WARNING):
        data = build_datasets(str(tmp_path), resolution=16)
    assert "class eel" in caplog.text and "never validated" in caplog.text
    assert 2 not in data.val.dataset.targets and data.train.dataset.targets.count(2) == 1
