"""Weights in and out: parity with torchvision and timm, our safetensors, and refused files."""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from conftest import TIMM_NAMES, assert_same_outputs, randomize_batchnorm
from torch import nn

from mobilenetv2 import (
    MobileNetV2,
    WeightsError,
    create_model,
    load_model,
    load_weights,
    peer_state_dict,
    read_weights,
    save_weights,
)

# The three ways a user brings a peer's file into our model.
LOADERS: dict[str, Callable[[str, Path], nn.Module]] = {
    "load_weights": lambda name, path: load_weights(create_model(name), path),
    "create_model": lambda name, path: create_model(name, weights=path),
    "load_model": lambda name, path: load_model(path),
}


def eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def torchvision_peer() -> nn.Module:
    """torchvision's mobilenet_v2, randomly initialised, with non-trivial BatchNorm."""
    torch.manual_seed(1)
    return randomize_batchnorm(torchvision.models.mobilenet_v2(), torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def peer_input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def timm_peer(name: str, generator: torch.Generator) -> nn.Module:
    return randomize_batchnorm(timm.create_model(TIMM_NAMES[name], pretrained=False), generator)


# --------------------------------------------------------------------------------------------
# Parity: the peers' files load into ours and compute the same function


@pytest.mark.parametrize("loader", list(LOADERS))
def test_torchvision_checkpoint_gives_identical_outputs(
    loader: str, torchvision_peer: nn.Module, peer_input: torch.Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision_peer.state_dict(), path)
    ours = LOADERS[loader]("mobilenet_v2_100", path)
    assert isinstance(ours, MobileNetV2)
    assert_same_outputs(eval_outputs(torchvision_peer, peer_input), eval_outputs(ours, peer_input))


def test_unloaded_model_differs_from_the_peer(
    torchvision_peer: nn.Module, peer_input: torch.Tensor
) -> None:
    # The control for the parity tests: two random models do not agree by accident.
    ours = eval_outputs(create_model("mobilenet_v2_100"), peer_input)
    assert (ours - eval_outputs(torchvision_peer, peer_input)).abs().max() > 1e-2


def test_torchvision_width_is_read_off_the_checkpoint(
    peer_input: torch.Tensor, generator: torch.Generator, tmp_path: Path
) -> None:
    peer = randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.5), generator)
    torch.save(peer.state_dict(), tmp_path / "half.pth")
    ours = load_model(tmp_path / "half.pth")
    assert ours.config["width_mult"] == 0.5
    assert_same_outputs(eval_outputs(peer, peer_input), eval_outputs(ours, peer_input))


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_timm_checkpoint_gives_identical_outputs(
    name: str, peer_input: torch.Tensor, generator: torch.Generator, tmp_path: Path
) -> None:
    peer = timm_peer(name, generator)
    path = tmp_path / f"{name}.pth"
    torch.save(peer.state_dict(), path)
    ours = load_model(path)  # width and depth are read off the tensor shapes
    named = create_model(name).config
    for key in ("width_mult", "depth_mult", "fix_stem_head"):
        assert ours.config.get(key) == named.get(key), key
    assert_same_outputs(eval_outputs(peer, peer_input), eval_outputs(ours, peer_input))


@pytest.mark.parametrize(
    ("name", "loader"),
    [("mobilenet_v2_035", loader) for loader in LOADERS] + [("mobilenet_v2_140", "load_model")],
)
def test_timm_safetensors_gives_identical_outputs(
    name: str,
    loader: str,
    peer_input: torch.Tensor,
    generator: torch.Generator,
    tmp_path: Path,
) -> None:
    peer = timm_peer(name, generator)
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(peer.state_dict(), path)
    ours = LOADERS[loader](name, path)
    assert_same_outputs(eval_outputs(peer, peer_input), eval_outputs(ours, peer_input))


@pytest.mark.parametrize("side", [64, 65])
def test_tf_padding_matches_timms_tensorflow_same_padding(
    side: int, generator: torch.Generator
) -> None:
    # timm builds TensorFlow-ported models with pad_type="same" (its Conv2dSame) and BN eps
    # 1e-3: a second, independent check of our PadSame besides Keras (tests/test_keras.py).
    peer = randomize_batchnorm(
        timm.create_model("mobilenetv2_050", pad_type="same", bn_eps=1e-3), generator)
    ours = load_weights(create_model("mobilenet_v2_050", tf_padding=True, bn_eps=1e-3),
                        peer.state_dict())
    x = torch.randn(2, 3, side, side, generator=generator)
    assert_same_outputs(eval_outputs(peer, x), eval_outputs(ours, x))
    plain = load_weights(create_model("mobilenet_v2_050", bn_eps=1e-3), peer.state_dict())
    gap = (eval_outputs(plain, x) - eval_outputs(peer, x)).abs().max()
    if side % 2 == 0:  # PyTorch's padding shifts the windows by a pixel on even sides only
        assert gap > 1e-2
    else:
        assert gap < 1e-5


WRAPPERS: dict[str, Callable[[dict], dict]] = {
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compile": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp-compile": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "checkpoint-model": lambda sd: {"model": sd, "epoch": 3, "optimizer": {}},
    "checkpoint-state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "checkpoint-ddp": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    # What torchvision's reference scripts and timm's train.py save: their arguments ride along
    # as an argparse.Namespace.
    "torchvision-reference-checkpoint": lambda sd: {
        "model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.045, "params": [0]}]},
        "lr_scheduler": {"step_size": 1, "gamma": 0.98}, "epoch": 299,
        "args": argparse.Namespace(model="mobilenet_v2", lr=0.045, epochs=300, weights=None,
                                   lr_warmup_decay=0.01, output_dir="out")},
    "timm-train-checkpoint": lambda sd: {
        "epoch": 449, "arch": "mobilenetv2_100", "state_dict": sd, "optimizer": {}, "version": 2,
        "args": argparse.Namespace(model="mobilenetv2_100", lr=0.064, smoothing=0.1,
                                   mean=None, aa="rand-m9-mstd0.5"), "metric": 72.97},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_state_dicts_load(
    wrapper: str, torchvision_peer: nn.Module, peer_input: torch.Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save(WRAPPERS[wrapper](torchvision_peer.state_dict()), path)
    ours = load_weights(create_model("mobilenet_v2_100"), path)
    assert_same_outputs(eval_outputs(torchvision_peer, peer_input), eval_outputs(ours, peer_input))


# --------------------------------------------------------------------------------------------
# EMA weights inside training checkpoints: timm's, torchvision's reference scripts', ours


def _stepped(model: nn.Module) -> nn.Module:
    """``model`` after a fake optimizer step: the raw weights move away from their average."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def timm_train_checkpoint(folder: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A checkpoint written by timm's own CheckpointSaver, as timm's train.py --model-ema
    writes it: (file, the raw model, its EMA model)."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = randomize_batchnorm(timm.create_model("mobilenetv2_035", num_classes=10),
                                torch.Generator().manual_seed(3))
    ema = ModelEmaV3(model, decay=0.5)
    ema.update(_stepped(model), step=10)
    _stepped(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model="mobilenetv2_035"),
                            model_ema=ema, checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=50.0)
    return folder / "last.pth.tar", model, ema.module


class _ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision's references/classification/utils.py ExponentialMovingAverage."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, "cpu", ema_avg, use_buffers=True)


def torchvision_reference_checkpoint(folder: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A checkpoint as torchvision's references/classification/train.py --model-ema saves it."""
    model = randomize_batchnorm(torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10),
                                torch.Generator().manual_seed(4))
    ema = _ExponentialMovingAverage(model, decay=0.5)
    ema.update_parameters(_stepped(model))
    _stepped(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": {}, "epoch": 1,
                  "args": argparse.Namespace(model="mobilenet_v2", model_ema=True),
                  "model_ema": ema.state_dict()}
    torch.save(checkpoint, folder / "checkpoint.pth")
    return folder / "checkpoint.pth", model, ema.module


def our_train_checkpoint(folder: Path) -> tuple[Path, nn.Module, nn.Module]:
    """A checkpoint.pt with the entries train() writes for a run with --ema."""
    from mobilenetv2.checkpoint import save_checkpoint
    from mobilenetv2.engine import ModelEma

    model = randomize_batchnorm(create_model("mobilenet_v2_035", num_classes=10),
                                torch.Generator().manual_seed(5))
    ema = ModelEma(model, 0.5)
    ema.update(_stepped(model))
    _stepped(model)
    save_checkpoint(folder / "checkpoint.pt", {
        "model": model.state_dict(), "ema": ema.state_dict(), "model_config": model.config,
        "model_meta": model.meta})
    return folder / "checkpoint.pt", model, ema.module


TRAIN_CHECKPOINTS = {"timm": timm_train_checkpoint, "torchvision": torchvision_reference_checkpoint,
                     "mobilenetv2": our_train_checkpoint}


@pytest.mark.parametrize("writer", list(TRAIN_CHECKPOINTS))
def test_use_ema_loads_the_ema_weights_of_a_training_checkpoint(
        writer: str, peer_input: torch.Tensor, tmp_path: Path) -> None:
    path, raw, ema = TRAIN_CHECKPOINTS[writer](tmp_path)
    assert (eval_outputs(raw, peer_input) - eval_outputs(ema, peer_input)).abs().max() > 1e-3
    assert_same_outputs(eval_outputs(ema, peer_input),
                        eval_outputs(load_model(path, use_ema=True), peer_input))
    assert_same_outputs(eval_outputs(ema, peer_input), eval_outputs(
        load_weights(create_model("mobilenet_v2_035", num_classes=10), path, use_ema=True),
        peer_input))
    # Fine-tuning from them (a new 3-class head) starts from the EMA's features.
    tuned = create_model("mobilenet_v2_035", weights=path, num_classes=3, use_ema=True)
    averaged = load_model(path, use_ema=True)
    features = [k for k in averaged.state_dict() if not k.startswith("classifier.")]
    assert all(torch.equal(averaged.state_dict()[k], tuned.state_dict()[k]) for k in features)


def test_use_ema_is_what_timms_load_checkpoint_loads(peer_input: torch.Tensor,
                                                     tmp_path: Path) -> None:
    from timm.models import load_checkpoint

    path, _, _ = timm_train_checkpoint(tmp_path)
    for use_ema in (False, True):
        theirs = timm.create_model("mobilenetv2_035", num_classes=10)
        load_checkpoint(theirs, str(path), use_ema=use_ema)
        assert_same_outputs(eval_outputs(theirs, peer_input),
                            eval_outputs(load_model(path, use_ema=use_ema), peer_input))


@pytest.mark.parametrize("writer", list(TRAIN_CHECKPOINTS))
def test_raw_weights_of_a_checkpoint_with_ema_are_loaded_with_a_notice(
        writer: str, peer_input: torch.Tensor, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path, raw, _ = TRAIN_CHECKPOINTS[writer](tmp_path)
    with caplog.at_level("INFO", logger="mobilenetv2.weights"):
        model = load_model(path)
    assert_same_outputs(eval_outputs(raw, peer_input), eval_outputs(model, peer_input))
    notices = [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()]
    assert len(notices) == 1 and str(path) in notices[0] and "use_ema=True" in notices[0]


def test_an_averaged_models_own_state_dict_loads(peer_input: torch.Tensor, tmp_path: Path) -> None:
    _, _, ema = torchvision_reference_checkpoint(tmp_path)
    averaged = _ExponentialMovingAverage(ema, decay=0.5)  # module.-prefixed, with n_averaged
    torch.save(averaged.state_dict(), tmp_path / "ema.pth")
    for use_ema in (False, True):
        assert_same_outputs(eval_outputs(ema, peer_input), eval_outputs(
            load_model(tmp_path / "ema.pth", use_ema=use_ema), peer_input))


def test_use_ema_on_weights_without_ema_is_refused_in_one_line(tmp_path: Path) -> None:
    model = create_model("mobilenet_v2_035", num_classes=10)
    torch.save({"model": model.state_dict(), "ema": None}, tmp_path / "no_ema.pt")
    torch.save(model.state_dict(), tmp_path / "state_dict.pth")
    save_weights(model, tmp_path / "plain.safetensors")
    model.meta["training"] = {"config": {"ema": 0.0}, "epoch": 3}
    save_weights(model, tmp_path / "no_ema.safetensors")
    for name in ("no_ema.pt", "state_dict.pth", "plain.safetensors", "no_ema.safetensors"):
        with pytest.raises(WeightsError, match="no EMA weights.*drop use_ema=True"):
            load_model(tmp_path / name, use_ema=True)
    with pytest.raises(WeightsError, match="trained without --ema"):
        read_weights(tmp_path / "no_ema.safetensors", use_ema=True)
    with pytest.raises(ValueError, match="no EMA weights beside them"):
        create_model("mobilenet_v2_100", weights="imagenet", use_ema=True)


def test_use_ema_takes_the_safetensors_of_a_run_with_ema_as_they_are(tmp_path: Path) -> None:
    model = create_model("mobilenet_v2_035", num_classes=10)
    model.meta["training"] = {"config": {"ema": 0.999}, "epoch": 3}
    save_weights(model, tmp_path / "best.safetensors")
    loaded = load_model(tmp_path / "best.safetensors", use_ema=True)
    assert torch.equal(loaded.stem.conv.weight, model.stem.conv.weight)


@pytest.mark.parametrize("name", ["mobilenet_v2_035", "mobilenet_v2_100", "mobilenet_v2_140"])
@pytest.mark.parametrize("peer_name", ["torchvision", "timm"])
def test_peer_state_dict_loads_strictly_into_the_peer(
    peer_name: str, name: str, peer_input: torch.Tensor, generator: torch.Generator
) -> None:
    ours = randomize_batchnorm(create_model(name), generator)
    if peer_name == "torchvision":
        peer = torchvision.models.mobilenet_v2(width_mult=ours.config["width_mult"])
    else:
        peer = timm.create_model(TIMM_NAMES[name], pretrained=False)
    peer.load_state_dict(peer_state_dict(ours, peer_name), strict=True)
    assert_same_outputs(eval_outputs(ours, peer_input), eval_outputs(peer, peer_input))


def test_peer_state_dict_refuses_an_unknown_peer_and_the_seed_variant() -> None:
    with pytest.raises(ValueError, match="torchvision"):
        peer_state_dict(create_model("mobilenet_v2_050"), "tensorflow")
    with pytest.raises(ValueError, match="save_keras_weights"):
        peer_state_dict(create_model("mobilenet_v2_050"), "keras")
    with pytest.raises(ValueError, match="seed"):
        peer_state_dict(create_model("seed", input_width=32, num_classes=2), "torchvision")


def test_torchvision_1000_class_checkpoint_brings_imagenet_class_names(
    torchvision_peer: nn.Module, tmp_path: Path
) -> None:
    torch.save(torchvision_peer.state_dict(), tmp_path / "imagenet.pth")
    model = create_model("mobilenet_v2_100", weights=tmp_path / "imagenet.pth")
    names = model.meta["class_names"]
    assert names == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(names) == 1000
    assert names[0] == "tench"
    assert load_model(tmp_path / "imagenet.pth").meta["class_names"] == names


def test_peer_checkpoint_with_other_classes_brings_no_class_names(
    generator: torch.Generator, tmp_path: Path
) -> None:
    peer = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35)
    torch.save(peer.state_dict(), tmp_path / "ten.pth")
    model = load_model(tmp_path / "ten.pth")
    assert model.num_classes == 10
    assert model.meta["class_names"] is None


@pytest.mark.parametrize("features_only", [False, True])
def test_weights_load_into_a_model_with_frozen_batchnorm(
    features_only: bool, torchvision_peer: nn.Module, peer_input: torch.Tensor, tmp_path: Path
) -> None:
    # Small-batch segmentation freezes BatchNorm with timm's freeze_batch_norm_2d
    # (torchvision's FrozenBatchNorm2d, which has no num_batches_tracked): loading weights
    # into such a model was refused for the counters, "unexpected: ...num_batches_tracked".
    from timm.layers import freeze_batch_norm_2d

    state = torchvision_peer.state_dict()
    build = {"features_only": features_only, "dropout": 0.0}  # train mode: no dropout either
    frozen = freeze_batch_norm_2d(create_model("mobilenet_v2_100", **build))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    load_weights(frozen, state)
    reference = create_model("mobilenet_v2_100", weights=state, **build)
    with torch.no_grad():  # in train mode too: the statistics are the loaded ones
        assert_same_outputs(reference.eval()(peer_input), frozen.train()(peer_input))
    save_weights(frozen, tmp_path / "frozen.safetensors")  # rebuilt with plain BatchNorm
    assert_same_outputs(eval_outputs(reference, peer_input),
                        eval_outputs(load_model(tmp_path / "frozen.safetensors"), peer_input))


def test_norm_layer_builds_the_frozen_backbone_torchvisions_detection_builders_build(
    torchvision_peer: nn.Module, peer_input: torch.Tensor, tmp_path: Path
) -> None:
    # torchvision's detection builders pass norm_layer=FrozenBatchNorm2d with pretrained
    # weights; create_model refused it ("takes no argument norm_layer").
    from torchvision.ops import FrozenBatchNorm2d

    state = torchvision_peer.state_dict()
    backbone = create_model("mobilenet_v2_100", weights=state, features_only=True,
                            norm_layer=FrozenBatchNorm2d)
    norms = [m for m in backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == 51 and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    peer = torchvision.models.mobilenet_v2(norm_layer=FrozenBatchNorm2d)
    peer.load_state_dict(state)
    with torch.no_grad():  # in train mode: the statistics stay the loaded ones
        assert_same_outputs(peer.train().features[:18](peer_input),
                            backbone.train()(peer_input)[-1])
    assert create_model("mobilenet_v2_035", bn_eps=1e-3,
                        norm_layer=FrozenBatchNorm2d).stem.bn.eps == 1e-3
    save_weights(backbone, tmp_path / "frozen.safetensors")  # BatchNorm's tensors, as before
    reloaded = load_model(tmp_path / "frozen.safetensors")
    assert isinstance(reloaded.stem.bn, nn.BatchNorm2d)
    assert_same_outputs(eval_outputs(backbone, peer_input), eval_outputs(reloaded, peer_input))


@pytest.mark.parametrize("loader", ["load_weights", "create_model"])
@pytest.mark.parametrize("source", ["ours-10-classes", "timm-1000-classes"])
def test_classifier_weights_load_into_a_features_only_model(
    source: str, loader: str, generator: torch.Generator, tmp_path: Path
) -> None:
    # A backbone has no classifier, so a checkpoint's class count must not matter to it.
    if source == "ours-10-classes":
        classifier = create_model("mobilenet_v2_050", num_classes=10)
        path = tmp_path / "classifier.safetensors"
        save_weights(randomize_batchnorm(classifier, generator), path)
    else:
        classifier = create_model("mobilenet_v2_050")
        path = tmp_path / "timm.pth"
        torch.save(peer_state_dict(randomize_batchnorm(classifier, generator), "timm"), path)
    if loader == "load_weights":
        backbone = load_weights(create_model("mobilenet_v2_050", features_only=True), path)
    else:
        backbone = create_model("mobilenet_v2_050", features_only=True, weights=path)
    x = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = classifier.eval().stages(classifier.stem(x))
    assert_same_outputs(expected, eval_outputs(backbone, x)[-1])


# --------------------------------------------------------------------------------------------
# Our safetensors files


@pytest.fixture
def cifar_like_model(generator: torch.Generator) -> MobileNetV2:
    model = create_model("mobilenet_v2_050", num_classes=10, in_channels=1, small_input=True)
    model.meta.update(class_names=[f"digit {i}" for i in range(10)], mean=[0.5], std=[0.25])
    return randomize_batchnorm(model, generator).eval()


def test_save_then_load_model_gives_identical_outputs_config_and_meta(
    cifar_like_model: MobileNetV2, tmp_path: Path
) -> None:
    path = tmp_path / "digits.safetensors"
    save_weights(cifar_like_model, path)
    loaded = load_model(path)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(eval_outputs(cifar_like_model, x), eval_outputs(loaded, x))
    assert loaded.config == cifar_like_model.config
    assert loaded.config["small_input"] is True
    assert loaded.config["in_channels"] == 1
    assert loaded.config["num_classes"] == 10
    assert loaded.meta == cifar_like_model.meta
    assert loaded.meta["class_names"][3] == "digit 3"


def test_saved_file_metadata_is_json(cifar_like_model: MobileNetV2, tmp_path: Path) -> None:
    path = tmp_path / "digits.safetensors"
    save_weights(cifar_like_model, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["format"] == "mobilenetv2"
    assert json.loads(metadata["config"]) == cifar_like_model.config
    assert json.loads(metadata["meta"]) == cifar_like_model.meta
    assert keys == set(cifar_like_model.state_dict())
    assert read_weights(path).config == cifar_like_model.config


def test_features_only_model_round_trips(generator: torch.Generator, tmp_path: Path) -> None:
    model = create_model("mobilenet_v2_035", features_only=True, out_indices=[1, 4])
    randomize_batchnorm(model, generator)
    save_weights(model, tmp_path / "backbone.safetensors")
    loaded = load_model(tmp_path / "backbone.safetensors")
    assert loaded.out_indices == [1, 4]
    x = torch.randn(1, 3, 64, 64)
    for want, got in zip(eval_outputs(model, x), eval_outputs(loaded, x), strict=True):
        assert torch.equal(want, got)


@pytest.mark.parametrize("source", ["timm-mobilenetv2_050", "timm-mobilenetv2_120d", "ours-rows-0-4"])
def test_a_backbones_state_dict_rebuilds_as_that_backbone(
    source: str, generator: torch.Generator, tmp_path: Path
) -> None:
    # Found by a segmentation review: a headless state_dict (timm's features_only model's, or
    # our backbone's saved with torch.save) was read as width 1.0 and refused shape by shape.
    if source.startswith("timm"):
        backbone = timm.create_model(source[5:], features_only=True)
    else:
        backbone = create_model("mobilenet_v2_075", features_only=True, out_indices=[1, 3])
    torch.save(randomize_batchnorm(backbone, generator).state_dict(), tmp_path / "backbone.pth")
    loaded = load_model(tmp_path / "backbone.pth")
    assert loaded.config["features_only"] is True
    x = torch.randn(1, 3, 64, 64, generator=generator)
    want, got = eval_outputs(backbone, x), eval_outputs(loaded, x)
    if source.startswith("timm"):  # timm's default taps are ours
        assert loaded.feature_info.channels() == backbone.feature_info.channels()
        assert_same_outputs(want, got)
    else:  # a state_dict does not say which rows were taken: the default taps of its rows
        assert loaded.out_indices == [0, 1, 2, 3]
        assert_same_outputs(want[-1], got[-1])


def test_a_headless_state_dict_without_its_last_block_is_refused_in_one_line() -> None:
    state = {k: v for k, v in create_model("mobilenet_v2_050").state_dict().items()
             if k.startswith(("stem.", "stages.0.0.depthwise."))}
    with pytest.raises(WeightsError, match=r"stages\.0\.0\.project\.conv\.weight .* is missing"):
        load_model(state)


@pytest.mark.parametrize("saved", ["safetensors", "timm-state-dict", "pruned"])
def test_backbone_weights_into_a_classifier_name_the_backbone_call(saved: str,
                                                                   tmp_path: Path) -> None:
    # The hint was "build the model with num_classes=1000" (or num_classes=0, or width 1.0):
    # calls that fail again. A backbone has no head conv: the hint names one that works.
    path = tmp_path / "backbone.safetensors"
    if saved == "safetensors":
        save_weights(create_model("mobilenet_v2_050", features_only=True, output_stride=16), path)
    elif saved == "timm-state-dict":
        path = tmp_path / "backbone.pth"
        torch.save(timm.create_model("mobilenetv2_050", features_only=True).state_dict(), path)
    else:
        pruned = create_model("mobilenet_v2_050")
        pruned.prune_intermediate_layers([2, 4])
        save_weights(pruned, path)
    with pytest.raises(WeightsError, match="features_only backbone's") as error:
        create_model("mobilenet_v2_050", weights=path, num_classes=21)
    assert "num_classes=" not in str(error.value)
    call = re.search(r"build one \((create_model\(.*?\))\)", str(error.value)).group(1)
    built = eval(call.replace("weights=FILE", "weights=path"),  # the hint's call runs
                 {"create_model": create_model, "path": path})
    rebuilt = load_model(path)
    assert built.feature_info == rebuilt.feature_info  # rows, channels, strides, dilations
    assert built.state_dict().keys() == rebuilt.state_dict().keys()
    with pytest.raises(WeightsError, match=r"mobilenet_v2_050's backbone \(width_mult=0.5\): "
                       r"build that \(create_model\('mobilenet_v2_050', weights=FILE, "
                       r"features_only=True"):
        create_model("mobilenet_v2_100", features_only=True, weights=path)
    # A classifier on the backbone's rows: the hint's strict=False leaves the rest fresh.
    classifier = load_weights(create_model("mobilenet_v2_050", num_classes=21,
                                           output_stride=built.config.get("output_stride", 32)),
                              path, strict=False)
    assert torch.equal(classifier.stem.conv.weight, built.stem.conv.weight)


@pytest.mark.parametrize("act_layer", [torch.nn.SiLU, "hard_swish", torch.nn.GELU, torch.nn.PReLU])
def test_the_activation_is_saved_by_name(act_layer, generator: torch.Generator, tmp_path: Path):
    # It was not saved until stop 19: load_model rebuilt ReLU6 under SiLU-trained weights.
    model = create_model("mobilenet_v2_035", num_classes=5, act_layer=act_layer)
    randomize_batchnorm(model, generator).eval()
    save_weights(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert type(loaded.stem.act) is type(model.stem.act) is not torch.nn.ReLU6
    assert loaded.config["act_layer"] == model.config["act_layer"]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(eval_outputs(model, x), eval_outputs(loaded, x))
    assert "act_layer" not in create_model("mobilenet_v2_035").config  # files unchanged
    assert type(create_model("mobilenet_v2_035", act_layer="relu6").stem.act) is torch.nn.ReLU6


def test_weights_of_another_activation_are_refused_not_loaded_silently(tmp_path: Path):
    # Docs suggest act_layer="silu" for experiments: the tensors fit a ReLU6 model exactly,
    # the function does not, so loading them there (or fine-tuning from them) must say so.
    from mobilenetv2 import save_keras_weights
    from mobilenetv2.train import pretrained_conventions

    save_weights(create_model("mobilenet_v2_035", num_classes=3, act_layer="silu"),
                 tmp_path / "silu.safetensors")
    with pytest.raises(WeightsError, match="built with act_layer='silu'"):
        load_weights(create_model("mobilenet_v2_035", num_classes=3), tmp_path / "silu.safetensors")
    load_weights(create_model("mobilenet_v2_035", num_classes=3, act_layer="silu"),
                 tmp_path / "silu.safetensors")  # built so, it loads
    assert pretrained_conventions(str(tmp_path / "silu.safetensors"))["act_layer"] == "silu"
    with pytest.raises(ValueError, match="act_layer='relu6'"):
        save_keras_weights(create_model("mobilenet_v2_035", act_layer="silu", tf_padding=True,
                                        bn_eps=1e-3), tmp_path / "x.h5")


def test_an_activation_without_a_name_is_refused_by_save_weights(tmp_path: Path) -> None:
    class Custom(torch.nn.ReLU):
        pass

    model = create_model("mobilenet_v2_035", act_layer=Custom)
    with pytest.raises(ValueError, match="activation .*Custom has no name load_model knows"):
        save_weights(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="unknown act_layer 'swishy'; choose one of: relu6"):
        create_model("mobilenet_v2_035", act_layer="swishy")


def test_saved_files_get_the_umasks_permissions_not_0600(tmp_path: Path) -> None:
    # safetensors' save_file creates 0600 files: a service running as another user could not
    # read the weights a training job wrote. Every file the package writes follows the umask.
    import stat

    old = os.umask(0o022)
    try:
        save_weights(create_model("mobilenet_v2_035"), tmp_path / "m.safetensors")
        mask = 0o027
        os.umask(mask)
        save_weights(create_model("mobilenet_v2_035"), tmp_path / "g.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.safetensors").stat().st_mode) == 0o640
    # Where chmod is refused (FAT file systems: EPERM), the file is written all the same.
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "chmod", refuse)
        save_weights(create_model("mobilenet_v2_035"), tmp_path / "usb.safetensors")
    assert load_model(tmp_path / "usb.safetensors").config["name"] == "mobilenet_v2_035"


def test_save_leaves_only_the_file_and_replaces_an_old_one(
    cifar_like_model: MobileNetV2, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"an older file")
    save_weights(cifar_like_model, path)
    save_weights(cifar_like_model, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert load_model(path).config == cifar_like_model.config


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(
    cifar_like_model: MobileNetV2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the previous weights")

    def write_half_then_fail(state: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_weights(cifar_like_model, path)
    assert path.read_bytes() == b"the previous weights"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_save_into_a_missing_folder_raises_os_error_and_writes_nothing(
    cifar_like_model: MobileNetV2, tmp_path: Path
) -> None:
    # save_weights documents OSError for a file it cannot write (the CLI turns OSErrors such
    # as FileNotFoundError into one line, not a traceback).
    with pytest.raises(OSError):
        save_weights(cifar_like_model, tmp_path / "missing" / "model.safetensors")
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_on_windows_are_found_without_sending_a_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On Windows signal 0 is CTRL_C_EVENT: os.kill(pid, 0) would Ctrl-C the console (the
    # resuming run among it) and never raise ProcessLookupError, so nothing was ever removed.
    import mobilenetv2.weights as weights_module

    def no_signals(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {sig}) on Windows")

    monkeypatch.setattr(weights_module.sys, "platform", "win32")
    monkeypatch.setattr(weights_module.os, "kill", no_signals)
    monkeypatch.setattr(weights_module, "_windows_process_alive", lambda pid: pid == 4242)
    gone, alive = tmp_path / ".last.safetensors.tmp-4141", tmp_path / ".best.safetensors.tmp-4242"
    gone.write_bytes(b"half a file")
    alive.write_bytes(b"in progress")
    assert weights_module.remove_stale_temporaries(tmp_path) == [gone]
    assert not gone.exists() and alive.exists()


def test_save_weights_refuses_a_model_it_did_not_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mobilenetv2"):
        save_weights(torchvision.models.mobilenet_v2(width_mult=0.35), tmp_path / "tv.safetensors")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Weights that do not fit the model


@pytest.mark.parametrize("source", ["ours", "torchvision"])
def test_checkpoint_with_other_classes_names_its_num_classes(source: str, tmp_path: Path) -> None:
    if source == "ours":
        path = tmp_path / "ten.safetensors"
        save_weights(create_model("mobilenet_v2_035", num_classes=10), path)
    else:
        path = tmp_path / "ten.pth"
        peer = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35)
        torch.save(peer.state_dict(), path)
    with pytest.raises(WeightsError, match="num_classes=10") as error:
        create_model("mobilenet_v2_035", weights=path)
    assert "classifier.weight" in str(error.value)


def test_checkpoint_of_another_width_names_its_width(tmp_path: Path) -> None:
    torch.save(create_model("mobilenet_v2_050").state_dict(), tmp_path / "half.pth")
    with pytest.raises(WeightsError, match="width_mult=0.5"):
        load_weights(create_model("mobilenet_v2_100"), tmp_path / "half.pth")


def test_hints_name_a_call_that_works(tmp_path: Path) -> None:
    # Found by a review of the Python API: each hint used to name an argument the call refuses.
    weights = tmp_path / "w.safetensors"
    save_weights(create_model("mobilenet_v2_100", num_classes=10, small_input=True,
                              output_stride=8), weights)

    def hinted_call(call):  # the hint's own call, run: "create_model('NAME', weights=FILE, ...)"
        return eval(call.replace("weights=FILE", "weights=weights"),
                    {"create_model": create_model, "weights": weights})

    with pytest.raises(WeightsError, match=r"they are mobilenet_v2_100's \(width_mult=1.0\): "
                       r"build that \((create_model\(.*\))\), or let load_model") as error:
        create_model("mobilenet_v2_050", weights=weights)
    call = re.search(r"build that \((create_model\(.*?\))\), or", str(error.value)).group(1)
    assert call == ("create_model('mobilenet_v2_100', weights=FILE, num_classes=10, "
                    "small_input=True, output_stride=8)")
    assert hinted_call(call).config == load_model(weights).config  # the file's network
    with pytest.raises(WeightsError, match="or pass num_classes to create_model"):
        load_model(weights, num_classes=3)
    with pytest.raises(WeightsError, match=r"takes 3-channel images and load_model builds the "
                       r"file's network as it is: to adapt its stem, (create_model\(.*\))$"
                       ) as error:
        load_model(weights, in_chans=1)
    call = re.search(r"stem, (create_model\(.*\))$", str(error.value)).group(1)
    assert hinted_call(call).stem.conv.in_channels == 1  # a call that works
    assert load_model(weights, drop_rate=0.5).dropout.p == 0.5  # timm's name
    assert create_model("mobilenet_v2_035", pretrained=False, drop_rate=0.3).dropout.p == 0.3
    with pytest.raises(ValueError, match="name the weights: weights='imagenet'"):
        create_model("mobilenet_v2_100", pretrained=True)
    with pytest.raises(ValueError, match="name the weights"):
        create_model("mobilenet_v2_100", weights=True)
    with pytest.raises(ValueError, match=r"create_model\('mobilenetv2_100', weights='timm'\) "
                       "for timm's ra_in1k"):
        create_model("mobilenetv2_100.ra_in1k")
    with pytest.raises(FileNotFoundError, match="'IMAGENET' are neither a file nor a tag: pass a "
                       "file or one of imagenet, imagenet-v2, timm"):
        create_model("mobilenet_v2_100", weights="IMAGENET")  # (torchvision's DEFAULT is taken)
    model = create_model("mobilenet_v2_035")
    with pytest.raises(TypeError, match="not a model: pass model.state_dict()"):
        load_weights(model, create_model("mobilenet_v2_035"))
    with pytest.raises(TypeError, match="a file path or a state_dict, got int 3"):
        load_model(3)


@pytest.mark.parametrize("timm_name, ours", [("mobilenetv2_050", "mobilenet_v2_050"),
                                             ("mobilenetv2_120d", "mobilenet_v2_120d")])
def test_a_peers_state_dict_gets_the_name_of_its_width(timm_name: str, ours: str) -> None:
    # It was "mobilenet_v2" (the 1.0 model's alias) whatever the width.
    model = load_model(timm.create_model(timm_name).state_dict())
    assert model.config["name"] == model.pretrained_cfg["architecture"] == ours
    assert create_model(model.config["name"]).config == model.config
    from mobilenetv2.registry import name_for

    assert name_for({"width_mult": 1.0, "inverted_residual_setting": [[1, 16, 1, 1]]}) is None
    assert name_for({"width_mult": 1.0, "last_channel": 1024}) is None  # no name builds them


def test_a_backbone_converts_to_timms_features_only_keys(generator: torch.Generator) -> None:
    ours = randomize_batchnorm(create_model("mobilenet_v2_100", features_only=True), generator)
    peer = timm.create_model("mobilenetv2_100", features_only=True)
    peer.load_state_dict(peer_state_dict(ours, "timm"))  # strict: every key pairs
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(ours.eval()(x), peer.eval()(x), strict=True):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"needs a MobileNetV2 or its backbone \(the seed variant"):
        peer_state_dict(create_model("seed"), "timm")


def test_checkpoint_missing_keys_is_refused_unless_not_strict(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = create_model("mobilenet_v2_035").state_dict()
    del state["head.bn.running_mean"]
    with pytest.raises(WeightsError, match=r"missing: head\.bn\.running_mean"):
        load_weights(create_model("mobilenet_v2_035"), state)
    # strict=False loads the rest and says what it left out, as timm's load_pretrained does:
    # the missing at INFO (expected when adapting a model), the unused at WARNING.
    state["extra.weight"] = torch.zeros(3)
    with caplog.at_level("INFO", logger="mobilenetv2.weights"):
        load_weights(create_model("mobilenet_v2_035"), state, strict=False)
    levels = {r.getMessage(): r.levelname for r in caplog.records}
    assert levels == {
        "1 tensors of the model keep their initialisation (not in state_dict): "
        "head.bn.running_mean": "INFO",
        "1 tensors of state_dict fit nothing in the model and were not loaded: "
        "extra.weight": "WARNING"}


def test_weights_error_is_a_value_error() -> None:
    assert issubclass(WeightsError, ValueError)


# --------------------------------------------------------------------------------------------
# Files that are not weights, or are unsafe to unpickle


class _NotATensor:
    pass


class _WritesAMarkerWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_pickle_of_a_non_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pth"
    torch.save({"stem.conv.weight": torch.zeros(1), "a": _NotATensor()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_weights(create_model("mobilenet_v2_035"), path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused_without_running_it(writer: str, tmp_path: Path) -> None:
    def write(payload: object, path: Path) -> None:
        if writer == "torch.save":
            torch.save({"stem.conv.weight": payload}, path)
        else:
            path.write_bytes(pickle.dumps({"stem.conv.weight": payload}, protocol=2))

    # The control: a plain unpickler really runs this payload.
    live = tmp_path / "live-marker"
    write(_WritesAMarkerWhenUnpickled(live), tmp_path / "live.pth")
    if writer == "torch.save":
        unpickled = torch.load(tmp_path / "live.pth", weights_only=False)
    else:
        unpickled = pickle.loads((tmp_path / "live.pth").read_bytes())
    unpickled["stem.conv.weight"].close()
    assert live.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    write(_WritesAMarkerWhenUnpickled(marker), path)
    with pytest.raises(WeightsError):
        load_weights(create_model("mobilenet_v2_035"), path)
    with pytest.raises(WeightsError):
        load_model(path)
    assert not marker.exists()


def test_before_torch_2_5_arguments_are_refused_and_plain_files_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = create_model("mobilenet_v2_035")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)},
               tmp_path / "reference.pth")
    monkeypatch.delattr(torch.serialization, "safe_globals")  # as in torch 2.2-2.4
    load_model(tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="refused to load"):
        load_model(tmp_path / "reference.pth")


def test_code_inside_a_training_scripts_arguments_is_still_refused(tmp_path: Path) -> None:
    # argparse.Namespace is let through for the arguments peers' checkpoints carry; what it
    # holds is held to the same rules.
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pth"
    torch.save({"model": {"stem.conv.weight": torch.zeros(1)},
                "args": argparse.Namespace(lr=_WritesAMarkerWhenUnpickled(marker))}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_onnx_file_is_refused_with_a_pointer_to_onnx_runtime(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    for name in ("model.onnx", "model.bin"):
        onnx.save(helper.make_model(graph), tmp_path / name)
        with pytest.raises(WeightsError, match="ONNX"):
            load_weights(create_model("mobilenet_v2_035"), tmp_path / name)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_refused(seed: int, tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(WeightsError):
        load_weights(create_model("mobilenet_v2_035"), path)


@pytest.mark.parametrize("prefix", [b"\x80\x02", b"PK\x03\x04"])
def test_damaged_torch_file_is_refused(prefix: bytes, tmp_path: Path) -> None:
    path = tmp_path / "damaged.pth"
    path.write_bytes(prefix + random.Random(0).randbytes(512))
    with pytest.raises(WeightsError):
        load_weights(create_model("mobilenet_v2_035"), path)


def test_safetensors_whose_header_length_looks_like_a_pickle_keep_their_metadata(
    tmp_path: Path,
) -> None:
    # One file in 256 has a header length whose first byte is 0x80, pickle's first opcode.
    # torch.load reads such a file too, without the metadata: it was once read so, and the
    # model lost its small_input, preprocessing and class names (found by eval disagreeing
    # with the trainer on a digits run).
    path = tmp_path / "m.safetensors"
    model = create_model("mobilenet_v2_035", num_classes=3, small_input=True)
    for length in range(300):
        model.meta["class_names"] = ["a" * length, "b", "c"]
        save_weights(model, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no class name length gave a header length starting with 0x80")
    loaded = load_model(path)
    assert loaded.config["small_input"] is True
    assert loaded.meta["class_names"] == model.meta["class_names"]
    assert read_weights(path).format == "mobilenetv2" and read_weights(path).meta is not None


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors_is_refused(keep: float, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(create_model("mobilenet_v2_035"), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match="damaged"):
        load_weights(create_model("mobilenet_v2_035"), path)


def test_state_dict_of_another_network_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(WeightsError, match="not a MobileNetV2"):
        load_weights(create_model("mobilenet_v2_035"), tmp_path / "linear.pth")


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(create_model("mobilenet_v2_035"), missing)
    with pytest.raises(FileNotFoundError):
        load_model(missing)
    with pytest.raises(FileNotFoundError):
        create_model("mobilenet_v2_035", weights=missing)


# --------------------------------------------------------------------------------------------
# ImageNet weights by tag (downloads replaced by the peers' own state_dicts)


@pytest.fixture
def fake_hub(monkeypatch) -> SimpleNamespace:
    """torch.hub's download, answering with a freshly built peer's state_dict for the URL:
    ``calls`` records (url, check_hash), ``served`` the state_dicts handed out."""
    hub = SimpleNamespace(calls=[], served=[], progress=[])

    def load_state_dict_from_url(url: str, *args, check_hash: bool = False,
                                 progress: bool = True, **kwargs):
        hub.calls.append((url, check_hash))
        hub.progress.append(progress)
        name = url.rsplit("/", 1)[1]
        if name.startswith("mobilenet_v2-"):  # torchvision's
            state = torchvision.models.mobilenet_v2().state_dict()
        else:
            state = timm.create_model(name.split("-")[0].removesuffix("_ra")).state_dict()
        hub.served.append(state)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load_state_dict_from_url)
    return hub


def test_torchvisions_tags_stand_for_weights_files_in_every_command(
    fake_hub: SimpleNamespace, tmp_path: Path, capsys, monkeypatch
) -> None:
    # eval/predict/export --weights imagenet said "weights file not found" while quantize took
    # its imagenet-int8 tag; torchvision's tags name one network, so they load as files do.
    from PIL import Image

    from mobilenetv2.cli import main

    monkeypatch.chdir(tmp_path)  # no file named imagenet here; a data folder of that name
    (tmp_path / "imagenet" / "val").mkdir(parents=True)  # is no weights file either
    assert load_model("imagenet").config["name"] == "mobilenet_v2_100"
    model = load_model("imagenet-v2")
    assert model.config["name"] == "mobilenet_v2_100" and len(model.meta["class_names"]) == 1000
    assert fake_hub.calls[-1][0].endswith("mobilenet_v2-7ebf99e0.pth")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["predict", "--weights", "imagenet", str(tmp_path / "red.png"), "--top-k", "2",
                 "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)["predictions"]
    assert len(item["top_k"]) == 2 and fake_hub.calls[-1][0].endswith("mobilenet_v2-b0353104.pth")
    assert main(["export", "--weights", "imagenet", "--out", str(tmp_path / "m.onnx"),
                 "--resolution", "64"]) == 0
    with pytest.raises(FileNotFoundError, match="imagenet-v2 is torchvision's tag, not a file: "
                       "load_model"):
        load_weights(create_model("mobilenet_v2_100"), "imagenet-v2")
    # timm's and Keras' tags name several widths: the line says what to pass instead.
    assert main(["eval", "--weights", "timm"]) == 2
    assert "the timm tag names weights of several widths" in capsys.readouterr().err


def test_a_resumed_run_does_not_fetch_its_pretrained_tag_again(
    fake_hub: SimpleNamespace, tmp_path: Path
) -> None:
    # The checkpoint replaces the weights: resuming offline must not need the download.
    from mobilenetv2.cli import main

    args = ["train", "--data", "digits", "--resolution", "8", "--pretrained", "timm", "--model",
            "mobilenet_v2_050", "--batch-size", "256", "--no-tensorboard", "--out",
            str(tmp_path / "run")]
    assert main([*args, "--epochs", "1"]) == 0
    calls = len(fake_hub.calls)
    assert calls == 1
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 0
    assert len(fake_hub.calls) == calls


@pytest.mark.parametrize(
    ("name", "tag", "file", "interpolation"),
    [
        ("mobilenet_v2_100", "imagenet", "mobilenet_v2-b0353104.pth", "bilinear"),
        ("mobilenet_v2_100", "imagenet-v2", "mobilenet_v2-7ebf99e0.pth", "bilinear"),
        ("mobilenet_v2_110d", "timm", "mobilenetv2_110d_ra-77090ade.pth", "bicubic"),
        ("mobilenet_v2_050", "timm", "mobilenetv2_050-3d30d450.pth", "bicubic"),
    ],
)
def test_weight_tags_download_the_official_file_with_its_hash_checked(
    name: str, tag: str, file: str, interpolation: str, fake_hub: SimpleNamespace
) -> None:
    model = create_model(name, weights=tag)
    [(url, check_hash)] = fake_hub.calls
    assert url.endswith("/" + file) and check_hash
    assert model.meta["interpolation"] == interpolation
    assert len(model.meta["class_names"]) == 1000


def test_progress_false_silences_the_download_as_torchvisions_builders_do(
    fake_hub: SimpleNamespace,
) -> None:
    create_model("mobilenet_v2_100", weights="imagenet")
    create_model("mobilenet_v2_100", weights="imagenet", progress=False)
    assert fake_hub.progress == [True, False]


@pytest.mark.parametrize(("file", "resize", "interpolation"), [
    ("mobilenet_v2-7ebf99e0.pth", 232, "bilinear"),   # torchvision's IMAGENET1K_V2
    ("mobilenet_v2-b0353104.pth", 256, "bilinear"),   # IMAGENET1K_V1
    ("mobilenetv2_100_ra-b33bc2c4.pth", 256, "bicubic"),  # timm's
    ("my_copy.pth", None, None),                      # unknown: the defaults
])
def test_official_files_loaded_by_path_bring_their_publishers_preprocessing(
    tmp_path: Path, file: str, resize: int | None, interpolation: str | None
) -> None:
    peer = timm.create_model("mobilenetv2_100") if "_ra-" in file else torchvision.models.mobilenet_v2()
    torch.save(peer.state_dict(), tmp_path / file)
    for model in (load_model(tmp_path / file), create_model("mobilenet_v2_100", weights=tmp_path / file)):
        assert model.meta.get("interpolation") == interpolation
        assert model.meta.get("crop_pct") == (224 / resize if resize else None)
        assert len(model.meta["class_names"]) == 1000
    if resize:  # eval and predict then resize the shorter side as the publisher did
        from mobilenetv2 import eval_transform

        assert f"Resize(size=[{resize}]" in repr(eval_transform(model))


def test_timm_files_from_the_hub_bring_the_preprocessing_of_the_config_beside_them(
    tmp_path: Path,
) -> None:
    # timm's weights come from the Hugging Face Hub as model.safetensors (or
    # pytorch_model.bin) beside a config.json whose pretrained_cfg timm evaluates with:
    # bicubic. Known by file name only, they were evaluated bilinear.
    from timm.models import save_for_hf

    peer = timm.create_model("mobilenetv2_100.ra_in1k")
    save_for_hf(peer, str(tmp_path / "hub"), safe_serialization="both")
    for file in ("model.safetensors", "pytorch_model.bin"):
        model = load_model(tmp_path / "hub" / file)
        assert (model.meta["interpolation"], model.meta["crop_pct"]) == ("bicubic", 0.875)
        assert len(model.meta["class_names"]) == 1000
    # Without it, or beside a config of something else, the defaults as before.
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**config, "architecture": "resnet50"}))
    assert "interpolation" not in load_model(tmp_path / "hub" / "model.safetensors").meta
    (tmp_path / "hub" / "config.json").write_text("[1, 2")
    assert "interpolation" not in load_model(tmp_path / "hub" / "model.safetensors").meta


def test_weight_tags_refuse_models_they_have_no_weights_for(fake_hub: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="mobilenet_v2_100 only"):
        create_model("mobilenet_v2_050", weights="imagenet")
    with pytest.raises(ValueError, match="not for mobilenet_v2_035"):
        create_model("mobilenet_v2_035", weights="timm")
    assert fake_hub.calls == []


def _no_network(*args, **kwargs):
    from urllib.error import URLError

    raise URLError(OSError(-2, "Name or service not known"))


def test_a_failed_download_says_which_weights_from_where_why_and_what_to_do(
    monkeypatch, tmp_path: Path, capsys
) -> None:
    from urllib.error import HTTPError

    from mobilenetv2.cli import main

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
    assert main(["train", "--data", "digits", "--pretrained", "timm", "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 1  # the run failed, not its arguments
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mobilenetv2 train: error: could not download timm's ImageNet "
                           "weights for mobilenet_v2_050 ([Errno -2] Name or service not known)")
    assert f"curl -LO {url}mobilenetv2_050-3d30d450.pth" in line
    assert "--pretrained FILE" in line and "weights=FILE" in line
    assert str(tmp_path / "hub" / "checkpoints" / "mobilenetv2_050-3d30d450.pth") in line
    assert "urlopen" not in line

    # Keras' files come through download_url_to_file, torchvision's int8 ones for quantize.
    def not_found(url, *args, **kwargs):
        raise HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(torch.hub, "download_url_to_file", not_found)
    with pytest.raises(OSError, match=r"Keras' ImageNet weights for mobilenet_v2_035 \(HTTP "
                       r"Error 404: Not Found\).*storage.googleapis.com"):
        create_model("mobilenet_v2_035", weights="keras")
    assert main(["quantize", "--weights", "imagenet-int8", "--out", str(tmp_path / "q.onnx")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "could not download torchvision's int8 ImageNet weights" in line
    assert "quantize --weights FILE" in line


def test_a_damaged_download_or_cached_copy_says_what_to_do(monkeypatch, tmp_path: Path, capsys):
    from email.message import Message

    from mobilenetv2.cli import main

    class Response(io.BytesIO):  # what urlopen returns, serving bytes whose hash is wrong
        def info(self) -> Message:
            return Message()

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "urlopen", lambda request: Response(b"not the weights"))
    args = ["train", "--data", "digits", "--pretrained", "imagenet", "--model", "mobilenet_v2_100",
            "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after torch.hub's progress bar
    assert "train: error: the download of torchvision's imagenet weights for mobilenet_v2_100 arrived damaged " \
           "(invalid hash value" in line and "run again" in line
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert not cached.exists()  # torch.hub keeps no damaged download
    # A copy in the cache that is cut short (a disk filled up, a copy by hand) is never
    # checked against its hash again: it cannot be loaded, and the line says to delete it.
    cached.write_bytes(b"PK\x03\x04 cut short")
    assert main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{cached}, the cached copy of torchvision's imagenet weights for mobilenet_v2_100, " \
           "cannot be read (" in line and "delete it and run again" in line


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_fine_tuning_weights_are_adapted_exactly_as_timm_adapts_them(
    tmp_path: Path, in_chans: int
) -> None:
    # timm's own loader (pretrained=True from a local file) is the reference: it drops a
    # classifier of another size and adapts the RGB stem (timm.models.adapt_input_conv).
    peer = randomize_batchnorm(timm.create_model("mobilenetv2_100"), torch.Generator().manual_seed(3))
    torch.save(peer.state_dict(), tmp_path / "timm.pth")
    theirs = timm.create_model("mobilenetv2_100", pretrained=True, in_chans=in_chans, num_classes=7,
                               pretrained_cfg_overlay={"file": str(tmp_path / "timm.pth")}).eval()
    ours = create_model("mobilenet_v2_100", weights=tmp_path / "timm.pth", in_chans=in_chans,
                        num_classes=7).eval()
    assert ours.config["in_channels"] == ours.meta["input_size"][0] == in_chans
    assert ours.meta["class_names"] is None  # ImageNet's names do not fit 7 classes
    assert len(ours.meta["mean"]) == len(ours.meta["std"]) == in_chans
    fresh = create_model("mobilenet_v2_100", num_classes=7).classifier.weight
    assert ours.classifier.weight.shape == fresh.shape
    assert not torch.equal(ours.classifier.weight[:, :5], peer.classifier.weight[:7, :5])
    ours.classifier.load_state_dict(theirs.classifier.state_dict())  # both start afresh
    x = torch.randn(2, in_chans, 64, 64)
    with torch.no_grad():
        assert_same_outputs(theirs(x), ours(x))


def test_a_stem_of_another_width_is_not_reported_as_adapted(caplog) -> None:
    # The stem of a 1.0 file beside a 0.35 model's: both take RGB, so nothing is adapted (the
    # log said "adapted the stem's RGB filters to 3 input channels"); loading then refuses it.
    from mobilenetv2.weights import adapt_state_dict

    wide = create_model("mobilenet_v2_100").state_dict()
    narrow = create_model("mobilenet_v2_035").state_dict()
    with caplog.at_level("INFO", logger="mobilenetv2"):
        state, _ = adapt_state_dict(wide, narrow, ("channels",))
    assert "adapted" not in caplog.text
    assert state["stem.conv.weight"] is wide["stem.conv.weight"]


def test_fine_tuning_from_a_tag_starts_a_fresh_classifier(fake_hub: SimpleNamespace) -> None:
    model = create_model("mobilenet_v2_100", weights="imagenet", num_classes=10, in_chans=1)
    served = fake_hub.served[0]
    assert torch.equal(model.stem.conv.weight, served["features.0.0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.head.conv.weight, served["features.18.0.weight"])
    assert model.classifier.weight.shape == (10, 1280)
    assert model.meta["interpolation"] == "bilinear" and model.meta["class_names"] is None
    # Only classes or channels asked for are adapted: a plain call keeps refusing.
    kept = create_model("mobilenet_v2_100", weights="imagenet", in_chans=3)
    assert len(kept.meta["class_names"]) == 1000


def test_weights_that_do_not_fit_are_refused_unless_adaptation_is_asked_for(tmp_path: Path) -> None:
    ten = create_model("mobilenet_v2_035", num_classes=10)
    save_weights(ten, tmp_path / "ten.safetensors")
    with pytest.raises(WeightsError, match="build the model with num_classes=10"):
        create_model("mobilenet_v2_035", weights=tmp_path / "ten.safetensors")
    with pytest.raises(WeightsError, match="build the model with num_classes=10"):
        load_weights(create_model("mobilenet_v2_035"), tmp_path / "ten.safetensors")
    with pytest.raises(WeightsError, match="build the model with num_classes=10"):  # channels say nothing of classes
        create_model("mobilenet_v2_035", weights=tmp_path / "ten.safetensors", in_channels=3)
    two = create_model("mobilenet_v2_035", weights=tmp_path / "ten.safetensors", num_classes=2)
    assert torch.equal(two.head.conv.weight, ten.head.conv.weight)
    gray = create_model("mobilenet_v2_035", num_classes=10, in_channels=1)
    save_weights(gray, tmp_path / "gray.safetensors")
    with pytest.raises(WeightsError, match="only RGB stem filters adapt"):
        create_model("mobilenet_v2_035", weights=tmp_path / "gray.safetensors", in_channels=3)
    with pytest.raises(ValueError, match="disagree"):
        create_model("mobilenet_v2_035", in_chans=1, in_channels=3)


def test_train_pretrained_tag_fetches_the_weights_of_the_chosen_model(
    fake_hub: SimpleNamespace,
) -> None:
    from mobilenetv2.train import load_pretrained

    model = create_model("mobilenet_v2_120d", num_classes=10, in_channels=1)
    load_pretrained(model, "timm", name="mobilenet_v2_120d")
    assert fake_hub.calls[0][0].endswith("/mobilenetv2_120d_ra-5987e2ed.pth")
    served = fake_hub.served[0]
    assert torch.equal(model.head.conv.weight, served["conv_head.weight"])
    assert torch.equal(model.stem.conv.weight, served["conv_stem.weight"].sum(1, keepdim=True))
    with pytest.raises(ValueError, match="no ImageNet weights for the seed"):
        load_pretrained(create_model("seed", input_width=32, num_classes=2), "timm", name="seed")


def test_unknown_interpolation_in_the_metadata_is_refused(tmp_path: Path) -> None:
    model = create_model("mobilenet_v2_035", num_classes=3)
    model.meta["interpolation"] = "lanczos"  # no runtime resamples so; eval would fail late
    with pytest.raises(ValueError, match="load_model would refuse: interpolation"):
        save_weights(model, tmp_path / "m.safetensors")
    # A file written by hand (or by another program) is refused when it is read.
    safetensors.torch.save_file(model.state_dict(), tmp_path / "m.safetensors", metadata={
        "format": "mobilenetv2", "format_version": "1", "config": json.dumps(model.config),
        "meta": json.dumps(model.meta)})
    with pytest.raises(WeightsError, match="damaged mobilenetv2 metadata: interpolation"):
        load_model(tmp_path / "m.safetensors")


def test_class_names_from_numpy_and_integers_are_saved_as_strings(tmp_path: Path) -> None:
    # What a notebook has at hand: scikit-learn's digits.target_names (an int array), a
    # LabelEncoder's classes_ (a str array). They failed in json.dumps, or (ints in a list)
    # were written into a file that load_model then refused as damaged.
    np = pytest.importorskip("numpy")
    for names, want in [(np.arange(3), ["0", "1", "2"]), ([0, 1, 2], ["0", "1", "2"]),
                        (np.array(["cat", "dog", "fox"]), ["cat", "dog", "fox"]),
                        (("cat", "dog", "fox"), ["cat", "dog", "fox"])]:
        model = create_model("mobilenet_v2_035", num_classes=3)
        model.meta.update(class_names=names, mean=np.array([0.5, 0.5, 0.5], dtype=np.float32))
        save_weights(model, tmp_path / "m.safetensors")
        loaded = load_model(tmp_path / "m.safetensors")
        assert loaded.meta["class_names"] == want
        assert loaded.meta["mean"] == [0.5, 0.5, 0.5]


def test_a_model_built_with_numpy_arguments_saves(tmp_path: Path) -> None:
    # in_channels=images.shape[1] of a NumPy array is an np.int64: json.dumps refused the config.
    np = pytest.importorskip("numpy")
    model = create_model("mobilenet_v2_035", num_classes=2, in_channels=np.int64(1),
                         dropout=np.float32(0.25))
    save_weights(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").config["in_channels"] == 1


def test_save_weights_refuses_class_names_that_do_not_fit_the_classes(tmp_path: Path) -> None:
    # They were saved, and load_model then dropped them without a word.
    model = create_model("mobilenet_v2_035", num_classes=3)
    model.meta["class_names"] = ["cat", "dog"]
    with pytest.raises(ValueError, match="has 2 names for the model's 3 classes"):
        save_weights(model, tmp_path / "m.safetensors")
    model.meta["class_names"] = [None, "dog", "fox"]
    with pytest.raises(ValueError, match="class_names \\(a list of strings\\)"):
        save_weights(model, tmp_path / "m.safetensors")
    model.meta.update(class_names=None, notes={1, 2})
    with pytest.raises(ValueError, match="cannot be saved as JSON"):
        save_weights(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_weights_refuses_a_classifier_assigned_by_hand(tmp_path: Path) -> None:
    # torchvision's habit, model.classifier = nn.Linear(..., 5), left config["num_classes"] at
    # 1000: the file was written, and load_model refused it ("the checkpoint has 5 classes").
    model = create_model("mobilenet_v2_035")
    model.classifier = nn.Linear(model.head_hidden_size, 5)
    with pytest.raises(ValueError, match=r"classifier.weight \[5, 1280\].*reset_classifier"):
        save_weights(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    model.reset_classifier(5)  # the way that keeps the config in step
    save_weights(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").num_classes == 5


def test_the_same_weights_are_saved_as_the_same_bytes(tmp_path: Path) -> None:
    # safetensors writes its metadata in a hash map's order, new with every file: a run
    # repeated bit for bit gave weights files of other SHA-256s (DVC, artifact stores, audits).
    model = create_model("mobilenet_v2_035", num_classes=3)
    model.meta["class_names"] = ["a", "b", "c"]
    files = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for path in files:
        save_weights(model, path)
    assert len({path.read_bytes() for path in files}) == 1
    header = files[0].read_bytes()[8:8 + int.from_bytes(files[0].read_bytes()[:8], "little")]
    assert list(json.loads(header)["__metadata__"]) == ["config", "format", "format_version", "meta"]
    assert load_model(files[0]).meta["class_names"] == ["a", "b", "c"]


def test_saving_the_same_model_again_does_not_build_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Training saves last.safetensors (and best) every epoch. The check that the file rebuilds
    # built the whole network each time, on the meta device: 30-40 ms, more than the save
    # itself for a small model. The same config is now built once.
    import mobilenetv2.registry as registry
    import mobilenetv2.weights as weights_module

    weights_module._config_shapes.cache_clear()  # (another test may have saved this network)
    builds = []
    build = registry.build_from_config
    monkeypatch.setattr(registry, "build_from_config",
                        lambda config: builds.append(config) or build(config))
    model = create_model("mobilenet_v2_035", num_classes=7, in_channels=2)
    for epoch in range(3):
        model.meta["epoch"] = epoch  # what changes between saves: the weights, not the network
        save_weights(model, tmp_path / "last.safetensors")
    assert len(builds) == 1
    model.reset_classifier(4)  # another network: checked anew
    save_weights(model, tmp_path / "last.safetensors")
    assert len(builds) == 2 and load_model(tmp_path / "last.safetensors").num_classes == 4


def test_torchvisions_names_for_its_weights_are_taken_as_its_builder_takes_them(
    fake_hub: SimpleNamespace,
) -> None:
    from torchvision.models import MobileNet_V2_Weights

    v1, v2 = "mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"
    for weights, file in [("IMAGENET1K_V1", v1), ("IMAGENET1K_V2", v2), ("DEFAULT", v2),
                          ("MobileNet_V2_Weights.IMAGENET1K_V1", v1),
                          (MobileNet_V2_Weights.IMAGENET1K_V2, v2),
                          (MobileNet_V2_Weights.DEFAULT, v2)]:
        model = create_model("mobilenet_v2", weights=weights)
        assert fake_hub.calls[-1][0].endswith(file), weights
        assert len(model.meta["class_names"]) == 1000
    from torchvision.models import ResNet18_Weights

    with pytest.raises(ValueError, match="not a torchvision MobileNetV2 weights file"):
        create_model("mobilenet_v2_100", weights=ResNet18_Weights.DEFAULT)


def test_a_backbone_saved_by_version_0_1_loads_with_the_rows_it_had(tmp_path: Path) -> None:
    # 0.1.0 stored the rows of the table as out_indices, which now count timm's taps.
    from safetensors import safe_open
    from safetensors.torch import save_file

    backbone = create_model("mobilenet_v2_035", features_only=True, out_rows=[1, 3, 5])
    save_weights(backbone, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(metadata["config"])
    config["out_indices"] = config.pop("out_rows")
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={**metadata, "config": json.dumps(config)})
    for name in ("new", "old"):
        loaded = load_model(tmp_path / f"{name}.safetensors")
        assert loaded.out_rows == [1, 3, 5] and loaded.feature_info.channels() == [8, 24, 56]


def test_a_folder_of_runs_as_weights_names_the_newest_runs_file_that_exists(tmp_path):
    # `--weights runs/` is as natural a first mistake as `--weights runs/<run>/`; the line
    # suggested runs/best.safetensors, which is not there.
    runs = tmp_path / "runs"
    for name, mtime in (("20260101-090000", 1_000_000), ("20260102-090000", 2_000_000),
                        ("notes", 3_000_000)):
        (runs / name).mkdir(parents=True)
        if name != "notes":
            (runs / name / "best.safetensors").write_bytes(b"")
        os.utime(runs / name, (mtime, mtime))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"is a folder: pass the weights file in it, e.g. {runs / '20260102-090000' / 'best.safetensors'}")):
        load_model(runs)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"e.g. {runs / '20260101-090000' / 'best.safetensors'}")):
        read_weights(runs / "20260101-090000")
    with pytest.raises(FileNotFoundError, match=re.escape(f"e.g. {runs / 'notes' / 'best.safetensors'}")):
        load_model(runs / "notes")  # no run in it: the name a run's weights have
