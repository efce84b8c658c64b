"""Keras' MobileNetV2: its weights files load into ours and compute the same function, and ours
load back into Keras. Keras runs here on its PyTorch backend (no TensorFlow needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported anywhere

import h5py
import keras
import numpy as np
import pytest
import torch
from conftest import assert_same_outputs, randomize_batchnorm

from mobilenetv2 import (
    WeightsError,
    create_model,
    load_model,
    load_weights,
    read_weights,
    save_keras_weights,
    save_weights,
)
from mobilenetv2.cli import main

# Logits of size ~4 after 52 float32 layers that Keras computes in another order: about 2e-5
# apart. A misplaced padding moves them by more than 0.1 (see the control below).
KERAS_ATOL = 1e-4


def keras_model(alpha: float, side: int, seed: int = 0, **kwargs) -> keras.Model:
    """Keras' MobileNetV2 with random weights whose signal survives all 52 layers (He-scaled
    kernels), and non-trivial BatchNorm statistics."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(input_shape=(side, side, 3), alpha=alpha, weights=None,
                                           classifier_activation=None, **kwargs)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n),
                               rng.normal(0, 0.2, n), rng.uniform(0.5, 2.0, n)])
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            kernel = layer.get_weights()[0]  # (kh, kw, in, out) or (kh, kw, channels, 1)
            fan_in = np.prod(kernel.shape[:2]) * (
                1 if isinstance(layer, keras.layers.DepthwiseConv2D) else kernel.shape[2])
            layer.set_weights([rng.normal(0, np.sqrt(2 / fan_in), kernel.shape)])
    return model


def keras_outputs(model: keras.Model, images: torch.Tensor) -> torch.Tensor:
    """Keras' outputs for NCHW images (Keras takes NHWC)."""
    out = model(images.permute(0, 2, 3, 1).numpy(), training=False)
    out = torch.as_tensor(np.asarray(out.detach().cpu() if hasattr(out, "detach") else out))
    return out.permute(0, 3, 1, 2) if out.ndim == 4 else out


def ours(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


SAVERS = {
    # Keras 2's layout, as the official files and model.save_weights("x.h5") write it.
    "keras2.h5": lambda model, path: _save_legacy(model, path),
    # A whole model in Keras 2's format (public API; the weights under model_weights/).
    "model.h5": lambda model, path: model.save(path),
    # Keras 3's layout, by class and position.
    "keras3.weights.h5": lambda model, path: model.save_weights(path),
    "model.keras": lambda model, path: model.save(path),
}


def _save_legacy(model: keras.Model, path: Path) -> None:
    """Keras 2's weights file, as the official downloads are laid out: one group per layer at
    the top. Written through public API only: model.save("x.h5") puts exactly that under
    model_weights/, which is copied up a level."""
    whole = path.with_name(path.stem + "-model.h5")
    model.save(whole)
    with h5py.File(whole, "r") as src, h5py.File(path, "w") as dst:
        weights = src["model_weights"]
        for name in weights:
            weights.copy(weights[name], dst, name=name)
        for key, value in weights.attrs.items():
            dst.attrs[key] = value
    whole.unlink()


@pytest.mark.parametrize("fmt", list(SAVERS))
@pytest.mark.parametrize(("alpha", "side"), [(0.35, 64), (1.0, 65), (1.4, 64)])
def test_keras_weights_give_identical_outputs(alpha: float, side: int, fmt: str,
                                              tmp_path: Path) -> None:
    peer = keras_model(alpha, side)
    path = tmp_path / fmt
    SAVERS[fmt](peer, path)
    model = load_model(path)
    assert model.config["width_mult"] == alpha
    assert (model.config["tf_padding"], model.config["bn_eps"]) == (True, 1e-3)
    images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    expected = keras_outputs(peer, images)
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the outputs depend on the image
    assert_same_outputs(expected, ours(model, images), atol=KERAS_ATOL)


@pytest.mark.parametrize(("alpha", "name"), [(0.35, "mobilenet_v2_035"), (0.5, "mobilenet_v2_050"),
                                           (0.75, "mobilenet_v2_075"), (1.0, "mobilenet_v2_100"),
                                           (1.3, "mobilenet_v2_130"), (1.4, "mobilenet_v2_140")])
def test_every_keras_width_is_the_registered_model_of_that_width(alpha: float, name: str,
                                                                 tmp_path: Path) -> None:
    # Keras rounds int(c * alpha) where we round c * alpha: the same channels at every width.
    peer = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=alpha, weights=None)
    peer.save_weights(tmp_path / "k.weights.h5")
    model = create_model(name, weights=tmp_path / "k.weights.h5", tf_padding=True, bn_eps=1e-3)
    trainable = sum(int(np.prod(w.shape)) for w in peer.trainable_weights)
    assert sum(p.numel() for p in model.parameters()) == trainable


def test_tensorflow_padding_is_what_makes_them_agree(tmp_path: Path) -> None:
    # The control: the same tensors in a model padded as PyTorch pads give other outputs.
    peer = keras_model(0.35, 64)
    _save_legacy(peer, tmp_path / "k.h5")
    plain = create_model("mobilenet_v2_035", bn_eps=1e-3)
    plain.load_state_dict(read_weights(tmp_path / "k.h5").state_dict, strict=False)
    images = torch.randn(2, 3, 64, 64)
    assert (ours(plain, images) - keras_outputs(peer, images)).abs().max() > 0.1


def test_keras_weights_refuse_a_model_built_with_pytorch_conventions(tmp_path: Path) -> None:
    _save_legacy(keras_model(0.5, 64), tmp_path / "k.h5")
    with pytest.raises(WeightsError, match=r"tf_padding=True, bn_eps=0\.001"):
        create_model("mobilenet_v2_050", weights=tmp_path / "k.h5")
    model = create_model("mobilenet_v2_050", tf_padding=True, bn_eps=1e-3)
    load_weights(model, tmp_path / "k.h5")  # built so, it loads
    torch.testing.assert_close(model.head.bn.running_var,
                               load_model(tmp_path / "k.h5").head.bn.running_var)


def test_our_weights_load_into_keras_and_compute_the_same(generator: torch.Generator,
                                                           tmp_path: Path) -> None:
    model = randomize_batchnorm(create_model("mobilenet_v2_075", tf_padding=True, bn_eps=1e-3),
                                generator)
    save_keras_weights(model, tmp_path / "ours.h5")
    peer = keras_model(0.75, 64, seed=3)
    peer.load_weights(tmp_path / "ours.h5")
    images = torch.randn(2, 3, 64, 64)
    assert_same_outputs(ours(model, images), keras_outputs(peer, images), atol=KERAS_ATOL)


def test_save_keras_weights_refuses_what_keras_cannot_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tf_padding=True, bn_eps=0\.001"):
        save_keras_weights(create_model("mobilenet_v2_100"), tmp_path / "x.h5")
    with pytest.raises(ValueError, match="paper's depths"):
        save_keras_weights(create_model("mobilenet_v2_110d", tf_padding=True, bn_eps=1e-3),
                           tmp_path / "x.h5")
    keras_like = {"tf_padding": True, "bn_eps": 1e-3}
    with pytest.raises(ValueError, match="global_pool='avg'"):
        save_keras_weights(create_model("mobilenet_v2_100", global_pool="max", **keras_like),
                           tmp_path / "x.h5")
    pruned = create_model("mobilenet_v2_100", **keras_like)
    pruned.prune_intermediate_layers(indices=[2])
    with pytest.raises(ValueError, match="pruned rows"):
        save_keras_weights(pruned, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()
    # Without a classifier the pooling has no weights: Keras' include_top=False takes any.
    save_keras_weights(create_model("mobilenet_v2_100", num_classes=0, global_pool="max",
                                    **keras_like), tmp_path / "x.h5")
    assert (tmp_path / "x.h5").exists()


def test_keras_file_carries_keras_preprocessing_and_imagenet_classes(tmp_path: Path) -> None:
    # Official files are named ..._<alpha>_<resolution>.h5; the resolution is the input size.
    path = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96.h5"
    _save_legacy(keras_model(0.35, 96), path)
    model = load_model(path)
    assert model.meta["mean"] == [0.5] * 3 and model.meta["std"] == [0.5] * 3
    assert model.meta["input_size"] == [3, 96, 96]
    assert len(model.meta["class_names"]) == 1000 and model.meta["class_names"][0] == "tench"


def test_a_keras_file_without_top_makes_a_backbone(tmp_path: Path) -> None:
    peer = keras_model(0.5, 64, include_top=False)
    _save_legacy(peer, tmp_path / "no_top.h5")
    model = load_model(tmp_path / "no_top.h5")
    assert model.num_classes == 0
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.eval().forward_features(images)
    assert_same_outputs(keras_outputs(peer, images), features, atol=KERAS_ATOL)


def test_an_hdf5_file_of_another_network_is_one_clear_error(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_group("dense_1").attrs["weight_names"] = np.array([b"dense_1/kernel:0"])
        f["dense_1"].create_dataset("dense_1/kernel:0", data=np.zeros((3, 4)))
    with pytest.raises(WeightsError, match="not a Keras MobileNetV2 weights file: it has no layer Conv1"):
        read_weights(tmp_path / "other.h5")


def test_weights_keras_downloads_the_official_file_once(monkeypatch, tmp_path: Path) -> None:
    fixture = tmp_path / "fixture.h5"
    _save_legacy(keras_model(0.35, 64), fixture)
    urls = []

    def download(url: str, dst: str, *args, **kwargs) -> None:
        urls.append(url)
        Path(dst).write_bytes(fixture.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for _ in range(2):
        model = create_model("mobilenet_v2_035", weights="keras")
    assert urls == ["https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
                    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224.h5"]
    assert model.config["tf_padding"] and model.meta["mean"] == [0.5] * 3
    with pytest.raises(ValueError, match="not for mobilenet_v2_110d"):
        create_model("mobilenet_v2_110d", weights="keras")
    # train --pretrained keras: the run's model gets Keras' conventions and the cached file.
    from mobilenetv2.train import load_pretrained, pretrained_conventions

    assert pretrained_conventions("keras") == {"tf_padding": True, "bn_eps": 1e-3}
    tuned = create_model("mobilenet_v2_035", num_classes=10, **pretrained_conventions("keras"))
    load_pretrained(tuned, "keras", name="mobilenet_v2_035")
    torch.testing.assert_close(tuned.head.conv.weight, model.head.conv.weight)
    assert len(urls) == 1  # downloaded once
    # Keras' weights trained at 160x160: another file, and the model's input size says so.
    smaller = create_model("mobilenet_v2_035", weights="keras-160")
    assert urls[-1].endswith("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_160.h5")
    assert smaller.meta["input_size"] == [3, 160, 160] and smaller.config["tf_padding"]
    assert model.meta["input_size"] == [3, 224, 224]


def test_keras_file_predicts_exports_and_fine_tunes_from_the_command_line(tmp_path: Path,
                                                                         capsys) -> None:
    from PIL import Image

    path = tmp_path / "keras.h5"
    _save_legacy(keras_model(0.35, 64), path)
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "gray.png")
    assert main(["predict", "--weights", str(path), str(tmp_path / "gray.png"), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top_k"]
    assert len(top) == 5 and all(isinstance(p["class"], str) for p in top)
    # The export is checked against the eager model (TensorFlow's padding included).
    assert main(["export", "--weights", str(path), "--format", "onnx",
                 "--out", str(tmp_path / "k.onnx"), "--resolution", "64"]) == 0
    # Fine-tuning starts from a model built with the conventions the weights need.
    out = tmp_path / "run"
    assert main(["train", "--pretrained", str(path), "--model", "mobilenet_v2_035",
                 "--resolution", "16", "--epochs", "1", "--batch-size", "128", "--seed", "0",
                 "--no-tensorboard", "--out", str(out)]) == 0
    saved = load_model(out / "last.safetensors")
    assert (saved.config["tf_padding"], saved.config["bn_eps"]) == (True, 1e-3)
    # The digits were scaled to [-1, 1] as Keras' weights expect, not by their own statistics.
    assert (saved.meta["mean"], saved.meta["std"]) == ([0.5], [0.5])


def _built_on_mobilenetv2(nested: bool) -> keras.Model:
    """A model of Keras' transfer-learning recipe: MobileNetV2 without its top, then layers of
    one's own, here two Dense layers (a classifier MobileNetV2 cannot hold)."""
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                          include_top=False)
    inputs = keras.Input((32, 32, 3)) if nested else base.input
    x = keras.layers.GlobalAveragePooling2D()(base(inputs) if nested else base.output)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(8)(x)))


@pytest.mark.parametrize("fmt", ["keras2.h5", "keras3.weights.h5"])
@pytest.mark.parametrize("nested", [False, True], ids=["on_top", "nested"])
def test_a_model_built_on_keras_mobilenetv2_is_refused_not_read_in_part(
        fmt: str, nested: bool, tmp_path: Path) -> None:
    # Its extra layers were dropped unseen (Keras 2's layout: a backbone; Keras 3's: the first
    # Dense taken as an 8-class classifier), or it was called no MobileNetV2 at all (nested).
    SAVERS[fmt](_built_on_mobilenetv2(nested), tmp_path / fmt)
    expected = "a model inside its model" if nested else r"does not have \(dense"
    with pytest.raises(WeightsError, match=expected):
        read_weights(tmp_path / fmt)


@pytest.mark.parametrize("name", ["ours.weights.h5", "ours.keras", "ours.safetensors"])
def test_save_keras_weights_refuses_a_name_keras_would_read_another_way(name: str,
                                                                        tmp_path: Path) -> None:
    # Keras 3 reads x.weights.h5 and x.keras as its own layout, whatever they hold: our file
    # under such a name failed in load_weights ("105 objects could not be loaded").
    model = create_model("mobilenet_v2_035", num_classes=0, tf_padding=True, bn_eps=1e-3)
    with pytest.raises(ValueError, match=rf"name it, e\.g\., ours\.h5, not {name}"):
        save_keras_weights(model, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_a_cut_short_keras_archive_is_named_a_damaged_keras_file(tmp_path: Path) -> None:
    # It was taken for a torch.save zip: "a damaged or unsupported torch file:
    # PytorchStreamReader failed reading zip archive ... internal miniz error".
    keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                   include_top=False).save(tmp_path / "whole.keras")
    data = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.keras is a damaged Keras weights file: it is "
                                           "not a readable zip archive"):
        read_weights(tmp_path / "cut.keras")
    assert main(["summary", "--weights", str(tmp_path / "cut.keras")]) == 2


def test_train_pretrained_file_without_model_builds_the_files_network(tmp_path: Path) -> None:
    # --pretrained FILE without --model built the default mobilenet_v2_050 and failed on every
    # tensor; docs/training.md's second step (--pretrained runs/<first>/best.safetensors
    # --freeze 10) gives no --model either.
    from mobilenetv2.config import resolve_config

    _save_legacy(keras_model(0.35, 32), tmp_path / "k.h5")
    assert resolve_config(None, {}, {"pretrained": str(tmp_path / "k.h5")}).model == "mobilenet_v2_035"
    given = resolve_config(None, {}, {"pretrained": str(tmp_path / "k.h5"), "model": "mobilenet_v2_100"})
    assert given.model == "mobilenet_v2_100"  # --model still chooses (and loading says it differs)
    wide = resolve_config(None, {}, {"pretrained": str(tmp_path / "k.h5"), "width_mult": 0.35})
    assert wide.width_mult == 0.35 and wide.model == "mobilenet_v2_050"
    assert resolve_config(None, {}, {"pretrained": "keras"}).model == "mobilenet_v2_050"  # a tag


def test_train_pretrained_file_of_another_width_than_model_is_one_line(tmp_path: Path,
                                                                        capsys) -> None:
    # It said "weights in state_dict (mobilenetv2) do not fit the model ... create_model(
    # 'mobilenet_v2_035', weights=FILE, num_classes=0, tf_padding=False, bn_eps=1e-05)": not
    # the file, and conventions that Keras' weights do not have.
    _save_legacy(keras_model(0.35, 32), tmp_path / "k.h5")
    assert main(["train", "--pretrained", str(tmp_path / "k.h5"), "--model", "mobilenet_v2_050",
                 "--resolution", "16", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        f"--pretrained {tmp_path / 'k.h5'} holds mobilenet_v2_035's weights, but the model is "
        "mobilenet_v2_050: pass --model mobilenet_v2_035") in err, err


def test_fine_tuning_keras_weights_normalises_the_data_as_keras_does(tmp_path: Path) -> None:
    # The data was normalised with ImageNet's mean and std (about 2.2x Keras' [-1, 1] scale),
    # which the frozen BatchNorm statistics of --freeze do not hold for.
    from mobilenetv2.train import pretrained_normalization

    _save_legacy(keras_model(0.35, 32), tmp_path / "k.h5")
    assert pretrained_normalization(str(tmp_path / "k.h5"), 3) == ((0.5,) * 3, (0.5,) * 3)
    assert pretrained_normalization(str(tmp_path / "k.h5"), 1) == ((0.5,), (0.5,))
    assert pretrained_normalization("keras-160", 3) == ((0.5,) * 3, (0.5,) * 3)
    for others in ("imagenet", "timm", None):  # ImageNet's statistics: the data's default
        assert pretrained_normalization(others, 3) == (None, None)
    # A run started from them keeps [-1, 1] for the next (docs/training.md's two steps); a
    # model never trained holds placeholder statistics, and the data keeps its own.
    tuned = create_model("mobilenet_v2_035", weights=tmp_path / "k.h5", num_classes=3,
                         tf_padding=True, bn_eps=1e-3)
    tuned.meta["dataset"] = "photos"
    save_weights(tuned, tmp_path / "first.safetensors")
    assert pretrained_normalization(str(tmp_path / "first.safetensors"), 3) == ((0.5,) * 3, (0.5,) * 3)
    save_weights(create_model("mobilenet_v2_035"), tmp_path / "untrained.safetensors")
    assert pretrained_normalization(str(tmp_path / "untrained.safetensors"), 3) == (None, None)


@pytest.mark.parametrize("fmt", ["model.keras", "model.h5"])
def test_a_saved_keras_model_gives_its_input_size(fmt: str, tmp_path: Path) -> None:
    # A whole model's file records its input layer: eval, predict and export took 224x224
    # for a model built (and fine-tuned) at 48x48 unless the name ended _48.h5.
    SAVERS[fmt](keras_model(0.35, 48), tmp_path / fmt)
    assert load_model(tmp_path / fmt).meta["input_size"] == [3, 48, 48]
    SAVERS["keras3.weights.h5"](keras_model(0.35, 48), tmp_path / "w.weights.h5")
    assert load_model(tmp_path / "w.weights.h5").meta["input_size"] == [3, 224, 224]  # no record


def test_deploy_md_keras_block_builds_keras_at_the_models_size_with_its_labels(
        generator: torch.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/deploy.md's TensorFlow Lite block, run as written on a 96x96 model: it built Keras'
    model at 224x224 whatever the model was trained for, and left the class names behind."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text(encoding="utf-8")
    block = re.search(r"### Or TensorFlow Lite.*?```python\n(.*?)```", text, re.S).group(1)
    model = randomize_batchnorm(create_model("mobilenet_v2_050", num_classes=3, tf_padding=True,
                                             bn_eps=1e-3), generator)
    model.meta.update(input_size=[3, 96, 96], class_names=["bird", "chat noir", "猫"])
    (tmp_path / "runs" / "x").mkdir(parents=True)
    save_weights(model, tmp_path / "runs" / "x" / "best.safetensors")
    monkeypatch.chdir(tmp_path)
    def windows_open(file, mode="r", *args, encoding=None, **kwargs):  # its ANSI code page
        if "b" not in mode and encoding is None:  # (Python before 3.15, no UTF-8 mode)
            encoding = "cp1252"
        return open(file, mode, *args, encoding=encoding, **kwargs)

    scope: dict = {"open": windows_open}
    exec(compile(block, "deploy.md", "exec"), scope)
    peer = scope["peer"]
    assert tuple(peer.input_shape[1:]) == (96, 96, 3)
    # UTF-8, as TFLite's metadata writers read labels, whatever the platform's code page
    assert (tmp_path / "labels.txt").read_bytes().decode("utf-8") == "bird\nchat noir\n猫\n"
    images = torch.randn(2, 3, 96, 96)
    assert_same_outputs(ours(model, images), keras_outputs(peer, images), atol=KERAS_ATOL)
