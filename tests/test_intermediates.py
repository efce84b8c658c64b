"""timm 1.x's backbone contract: forward_intermediates, prune_intermediate_layers, global_pool.

Parity is checked against timm's own modules (random initialisation, BatchNorm randomised, the
same weights copied into ours): the outputs must be identical, not merely close.
"""

from __future__ import annotations

import warnings

import onnx
import pytest
import timm
import torch
import torch.fx
from conftest import TIMM_NAMES, randomize_batchnorm
from packaging.version import Version
from torch import nn

from mobilenetv2 import MobileNetV2Features, create_model, load_model, load_weights, save_weights
from mobilenetv2.export import ExportConfig, export_model
from mobilenetv2.model import GLOBAL_POOLS, tap_rows

PARITY_MODELS = ["mobilenet_v2_100", "mobilenet_v2_050", "mobilenet_v2_110d"]
# timm 1.0.31 prunes the head with the rows and updates num_features, num_classes and
# head_hidden_size where pruning and pooling change them, as we do; 1.0.29 and 1.0.30 kept the
# head convolution, its 1280 and a 2560-wide classifier's 1280 (seen on a GPU machine's image).
TIMM_UPDATES_WIDTHS = Version(timm.__version__) >= Version("1.0.31")

# timm's forward_intermediates index (into its 5 taps) -> ours (into our 7 rows).
TIMM_TO_OURS = [0, 1, 2, 4, 6]


def pair(name: str, generator: torch.Generator, **kwargs) -> tuple[nn.Module, nn.Module]:
    """timm's model and ours, in eval mode, with the same (random) weights."""
    peer = timm.create_model(TIMM_NAMES[name], pretrained=False, **kwargs)
    peer = randomize_batchnorm(peer, generator).eval()
    if isinstance(peer.get_classifier(), nn.Linear):  # 0.01-std logits would all be near zero
        with torch.no_grad():
            peer.get_classifier().weight.normal_(0, 0.5, generator=generator)
    ours = load_weights(create_model(name, **kwargs), peer.state_dict()).eval()
    return peer, ours


def assert_identical(actual, expected) -> None:
    actual = list(actual) if isinstance(actual, (list, tuple)) else [actual]
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------------
# forward_intermediates


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_forward_intermediates_equals_timms_for_the_default_taps(
    name: str, images: torch.Tensor, generator: torch.Generator
) -> None:
    peer, ours = pair(name, generator)
    assert [info["stage"] - 1 for info in ours.feature_info] == TIMM_TO_OURS
    keys = ("stage", "num_chs", "reduction")
    assert ([{k: info[k] for k in keys} for info in ours.feature_info]
            == [{k: info[k] for k in keys} for info in peer.feature_info])
    with torch.no_grad():
        want_final, want = peer.forward_intermediates(images)
        final, got = ours.forward_intermediates(images)
        assert_identical(got, want)
        assert_identical(final, want_final)
        assert_identical(final, ours.forward_features(images))  # the head conv's output
        assert_identical(ours.forward_intermediates(images, intermediates_only=True), want)


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_the_same_indices_give_timms_maps(
    name: str, images: torch.Tensor, generator: torch.Generator
) -> None:
    # Before 0.2 our indices named rows of the table, timm's its taps: (1, 3) gave other maps.
    peer, ours = pair(name, generator)
    with torch.no_grad():
        for indices in ([1, 3], [-1], 2, [0, 4]):
            assert_identical(
                ours.forward_intermediates(images, indices=indices, intermediates_only=True),
                peer.forward_intermediates(images, indices=indices, intermediates_only=True))


def test_indices_pick_taps_and_extra_blocks_every_row(images: torch.Tensor) -> None:
    # The control against an off-by-one: every row has its own channel count at width 1.0.
    model = create_model("mobilenet_v2_100").eval()
    channels = [info["num_chs"] for info in model.row_info]
    assert channels == [16, 24, 32, 64, 96, 160, 320]
    assert tap_rows(model.row_info) == [0, 1, 2, 4, 6]
    with torch.no_grad():
        for row, want in enumerate(channels):
            (tap,) = model.forward_intermediates(images, indices=[row + 1], extra_blocks=True,
                                                 intermediates_only=True)
            assert tap.shape[1] == want
            assert 64 // tap.shape[-1] == model.row_info[row]["reduction"]
        default = model.forward_intermediates(images, intermediates_only=True)
        last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
        unordered = model.forward_intermediates(images, indices=[3, 0, -1, 3],
                                                intermediates_only=True)
    assert [t.shape[1] for t in default] == [16, 24, 32, 96, 320]
    assert [t.shape[1] for t in last_two] == [96, 320]  # an int n: the last n taps
    assert [t.shape[1] for t in unordered] == [16, 96, 320]  # network order, no repeats


def test_forward_intermediates_are_the_features_only_backbones_maps(
    images: torch.Tensor, generator: torch.Generator
) -> None:
    model = randomize_batchnorm(create_model("mobilenet_v2_035"), generator).eval()
    with torch.no_grad():
        assert_identical(model.forward_intermediates(images, indices=[0, 3, 4],
                                                     intermediates_only=True),
                         MobileNetV2Features(model, [0, 3, 4])(images))
        assert_identical(model.forward_intermediates(images, indices=[1, 4, 6], extra_blocks=True,
                                                     intermediates_only=True),
                         MobileNetV2Features(model, out_rows=[0, 3, 5])(images))


@pytest.mark.parametrize("indices", [[1, 3], [4], None])
def test_stop_early_gives_the_same_intermediates_and_timms_final_map(
    indices: list[int] | None, images: torch.Tensor, generator: torch.Generator
) -> None:
    peer, ours = pair("mobilenet_v2_100", generator)
    with torch.no_grad():
        full_final, full = ours.forward_intermediates(images, indices=indices)
        final, early = ours.forward_intermediates(images, indices=indices, stop_early=True)
        want_final, want = peer.forward_intermediates(images, indices=indices, stop_early=True)
    assert_identical(early, full)
    assert_identical(early, want)
    assert_identical(final, want_final)
    if indices != [1, 3]:  # the last row was reached: the head conv ran
        assert_identical(final, full_final)
    else:  # stopped before the head: the final map is the last row's output
        assert_identical(final, early[-1])
        assert final.shape[1] != ours.num_features


@pytest.mark.parametrize("indices", [None, 3, [0, 4, 7], [-1]])
@pytest.mark.parametrize("stop_early", [False, True])
def test_extra_blocks_give_the_stem_and_every_row_as_timm(
    indices, stop_early: bool, images: torch.Tensor, generator: torch.Generator
) -> None:
    # timm's extra_blocks=True: index 0 is the stem's output, 1 to 7 the rows'.
    peer, ours = pair("mobilenet_v2_100", generator)
    with torch.no_grad():
        final, maps = ours.forward_intermediates(images, indices=indices, extra_blocks=True,
                                                 stop_early=stop_early)
        want_final, want = peer.forward_intermediates(images, indices=indices, extra_blocks=True,
                                                      stop_early=stop_early)
    assert_identical(maps, want)
    assert_identical(final, want_final)
    assert len(maps) == (8 if indices is None else indices if isinstance(indices, int)
                         else len(indices))


def test_backbone_feature_info_has_timms_accessors(generator: torch.Generator) -> None:
    ours = create_model("mobilenet_v2_100", features_only=True, out_indices=[1, 3, 4])
    peer = timm.create_model("mobilenetv2_100", features_only=True, out_indices=(1, 3, 4))
    info, want = ours.feature_info, peer.feature_info
    assert info.channels() == want.channels() == [24, 96, 320]
    assert info.reduction() == want.reduction() == [4, 16, 32]
    assert info.channels(-1) == 320 and info.reduction([0, 1]) == [4, 16]
    assert info.module_name() == ["stages.1", "stages.4", "stages.6"]
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": c} for c in (24, 96, 320)]
    assert [i["index"] for i in info] == [i["index"] for i in want.get_dicts()] == [1, 3, 4]
    assert [i["stage"] for i in info] == [i["stage"] for i in want.get_dicts()] == [2, 5, 7]
    assert len(info) == 3  # still the list it was
    full = create_model("mobilenet_v2_100")
    assert full.default_cfg == full.pretrained_cfg  # timm < 0.9's name, still read by some code
    assert ours.default_cfg == ours.pretrained_cfg


def test_checkpointed_backbone_and_intermediates_give_the_same_gradients(images, monkeypatch):
    import copy

    import mobilenetv2.model as model_module

    calls = []  # so the test cannot pass by not checkpointing at all
    real = model_module.checkpoint_blocks
    monkeypatch.setattr(model_module, "checkpoint_blocks",
                        lambda stages, x: calls.append(1) or real(stages, x))
    for features_only in (True, False):
        torch.manual_seed(0)
        plain = create_model("mobilenet_v2_035", features_only=features_only).train()
        checkpointed = copy.deepcopy(plain)
        checkpointed.set_grad_checkpointing()
        calls.clear()
        for model in (plain, checkpointed):
            maps = (model(images) if features_only
                    else model.forward_intermediates(images, intermediates_only=True))
            sum(m.square().mean() for m in maps).backward()
        assert len(calls) == len(checkpointed.stages)  # one call per row, checkpointed only
        for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
        expected, got = plain.state_dict(), checkpointed.state_dict()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
        calls.clear()
        with torch.no_grad():
            checkpointed.eval()(images)
        assert calls == []  # in eval mode nothing is recomputed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"indices": [5]}, r"indices must be .* in \[0, 4\]"),
        ({"indices": [-6]}, "indices"),
        ({"indices": []}, "indices"),
        ({"indices": 0}, r"int must be in \[1, 5\]"),
        ({"indices": 6}, "indices"),
        ({"output_fmt": "NHWC"}, "output_fmt"),
    ],
)
def test_forward_intermediates_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    model = create_model("mobilenet_v2_035")
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), **kwargs)


def test_norm_is_accepted_and_changes_nothing(images: torch.Tensor) -> None:
    model = create_model("mobilenet_v2_035").eval()
    with torch.no_grad():
        assert_identical(model.forward_intermediates(images, norm=True),
                         model.forward_intermediates(images))


# --------------------------------------------------------------------------------------------
# prune_intermediate_layers


@pytest.mark.skipif(not TIMM_UPDATES_WIDTHS, reason="timm's pruning contract as of 1.0.31")
@pytest.mark.parametrize(
    ("name", "indices", "kwargs"),
    [
        ("mobilenet_v2_100", [1, 3], {}),
        ("mobilenet_v2_050", [0, 2], {"prune_head": False}),  # rows go, so the head goes too
        ("mobilenet_v2_110d", 1, {}),  # timm's default: the last tap, the head conv pruned
    ],
)
def test_prune_intermediate_layers_keeps_what_timm_keeps(
    name: str, indices, kwargs: dict, images: torch.Tensor, generator: torch.Generator
) -> None:
    peer, ours = pair(name, generator)
    timm_kept = peer.prune_intermediate_layers(indices, **kwargs)
    kept = ours.prune_intermediate_layers(indices, **kwargs)
    assert kept == timm_kept
    assert (ours.num_features, ours.num_classes) == (peer.num_features, peer.num_classes)
    assert ours.pool.pool_type == peer.global_pool.pool_type == ""
    assert isinstance(ours.head, nn.Identity) and isinstance(ours.classifier, nn.Identity)
    assert len(ours.stages) == len(ours.row_info) == TIMM_TO_OURS[kept[-1]] + 1
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    with torch.no_grad():
        want_final, want = peer.forward_intermediates(images, indices=timm_kept)
        final, got = ours.forward_intermediates(images, indices=kept)
        assert_identical(got, want)
        assert_identical(final, want_final)
        assert_identical(ours(images), peer(images))  # the last kept row's map, unpooled


def test_prune_head_false_keeping_every_row_changes_nothing(images: torch.Tensor) -> None:
    model = create_model("mobilenet_v2_035", num_classes=5).eval()
    config = dict(model.config)
    with torch.no_grad():
        before = model(images)
        assert model.prune_intermediate_layers([2, -1], prune_head=False) == [2, 4]
        assert_identical(model(images), before)
    assert model.config == config and model.num_classes == 5


def test_pruned_model_saves_as_the_backbone_of_its_rows(
    tmp_path, images: torch.Tensor, generator: torch.Generator
) -> None:
    model = randomize_batchnorm(create_model("mobilenet_v2_050", num_classes=4), generator).eval()
    kept = model.prune_intermediate_layers([1, 3])
    save_weights(model, tmp_path / "pruned.safetensors")
    loaded = load_model(tmp_path / "pruned.safetensors").eval()
    assert isinstance(loaded, MobileNetV2Features) and loaded.out_indices == kept
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert_identical(loaded(images),
                         model.forward_intermediates(images, indices=kept, intermediates_only=True))
    with pytest.raises(ValueError, match="pruned"):  # the file could not rebuild a classifier
        model.reset_classifier(10, "avg")


# --------------------------------------------------------------------------------------------
# global_pool


@pytest.mark.parametrize(("global_pool", "num_classes"),
                         [("avg", 1000), ("max", 1000), ("avgmax", 1000), ("catavgmax", 1000),
                          ("", 0)])
def test_global_pool_matches_timms(
    global_pool: str, num_classes: int, images: torch.Tensor, generator: torch.Generator
) -> None:
    peer, ours = pair("mobilenet_v2_100", generator, global_pool=global_pool,
                      num_classes=num_classes)
    with torch.no_grad():
        want, got = peer(images), ours(images)
        pre_logits = ours.forward_head(ours.forward_features(images), pre_logits=True)
    assert_identical(got, want)
    assert ours.head_hidden_size == (2560 if global_pool == "catavgmax" else 1280)
    if TIMM_UPDATES_WIDTHS:
        assert ours.head_hidden_size == peer.head_hidden_size
    if global_pool == "":  # unpooled, as Keras' include_top=False, pooling=None
        assert got.shape == (2, 1280, 2, 2)
    else:
        assert pre_logits.shape == (2, ours.head_hidden_size)
        assert ours.classifier.in_features == (2560 if global_pool == "catavgmax" else 1280)


@pytest.mark.parametrize("name", ["mobilenet_v2_100", "mobilenet_v2_050"])
def test_a_timm_catavgmax_state_dict_loads_with_its_pooling(
    name: str, images: torch.Tensor, generator: torch.Generator
) -> None:
    """The classifier's doubled input is the only trace of catavgmax in a state_dict."""
    peer, _ = pair(name, generator, global_pool="catavgmax", num_classes=7)
    ours = load_model(peer.state_dict()).eval()
    assert ours.config["global_pool"] == "catavgmax"
    with torch.no_grad():
        assert_identical(ours(images), peer(images))
    assert "global_pool" not in load_model(pair(name, generator, num_classes=7)[0].state_dict()).config


def test_avg_pooling_is_bit_identical_to_adaptive_avg_pool(images: torch.Tensor) -> None:
    model = create_model("mobilenet_v2_035").eval()
    with torch.no_grad():
        features = model.forward_features(images)
        expected = torch.flatten(nn.AdaptiveAvgPool2d(1)(features), 1)
        assert torch.equal(model.forward_head(features, pre_logits=True), expected)


def test_global_pool_leaves_the_state_dict_and_default_config_unchanged() -> None:
    default = create_model("mobilenet_v2_035", num_classes=0)
    assert "global_pool" not in default.config  # files written before the option: unchanged
    for pool in GLOBAL_POOLS:
        model = create_model("mobilenet_v2_035", num_classes=0, global_pool=pool)
        assert model.state_dict().keys() == default.state_dict().keys()
        assert [n for n, _ in model.named_modules()] == [n for n, _ in default.named_modules()]
        assert model.config.get("global_pool", "avg") == pool


@pytest.mark.parametrize(("global_pool", "num_classes"), [("catavgmax", 5), ("max", 5), ("", 0)])
def test_global_pool_survives_save_and_load_model(
    global_pool: str, num_classes: int, tmp_path, images: torch.Tensor, generator
) -> None:
    model = create_model("mobilenet_v2_035", num_classes=num_classes, global_pool=global_pool)
    model = randomize_batchnorm(model, generator).eval()
    save_weights(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").eval()
    assert loaded.config["global_pool"] == global_pool
    with torch.no_grad():
        assert_identical(loaded(images), model(images))


def test_reset_classifier_changes_or_keeps_the_pooling(images: torch.Tensor) -> None:
    model = create_model("mobilenet_v2_035", num_classes=10).eval()
    model.reset_classifier(3, "catavgmax")
    assert model.classifier.in_features == 2 * model.num_features
    assert model.config["global_pool"] == "catavgmax"
    model.reset_classifier(7)  # None keeps the pooling
    assert model.pool.pool_type == "catavgmax" and model.classifier.in_features == 2560
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(images).shape == (2, model.num_features, 2, 2)
    model.reset_classifier(4, "avg")
    assert "global_pool" not in model.config
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, "")
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, "mean")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"global_pool": "mean"}, "'avg', 'max', 'avgmax', 'catavgmax' or ''"),
     ({"global_pool": "", "num_classes": 10}, "num_classes=0")],
)
def test_bad_global_pool_is_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        create_model("mobilenet_v2_035", **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("global_pool", [p for p in GLOBAL_POOLS if p])
def test_every_global_pool_traces_with_fx_and_torch_export(
    global_pool: str, images: torch.Tensor, generator: torch.Generator
) -> None:
    model = create_model("mobilenet_v2_035", num_classes=10, global_pool=global_pool)
    model = randomize_batchnorm(model, generator).eval()
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), expected)
        if global_pool == "catavgmax":  # one torch.export is enough: the others differ in one op
            exported = torch.export.export(model, (images,)).module()
            torch.testing.assert_close(exported(images), expected)


def test_max_pooling_model_exports_to_onnx_and_matches_eager(tmp_path, generator) -> None:
    model = create_model("mobilenet_v2_035", num_classes=10, global_pool="max")
    model = randomize_batchnorm(model, generator).eval()
    with torch.no_grad():
        model.get_classifier().weight.normal_(0, 0.5, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model(model, tmp_path / "m.onnx", ExportConfig(resolution=64))
    assert max(report.max_abs_diff.values()) <= 1e-4
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ops & {"GlobalMaxPool", "MaxPool", "ReduceMax"} and "GlobalAveragePool" not in ops


# --------------------------------------------------------------------------------------------
# group_matcher: timm's layer-wise learning-rate decay


@pytest.mark.parametrize("name", ["mobilenet_v2_100", "mobilenet_v2_110d"])
@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_groups_parameters_as_timm_does(name, coarse):
    from timm.models import group_parameters

    from mobilenetv2.weights import _peer_prefixes, _rename

    ours = create_model(name)
    theirs = timm.create_model(TIMM_NAMES[name])
    to_timm = _peer_prefixes(ours, "timm")
    ours_grouped = {group: [_rename(n, to_timm) for n in names] for group, names in
                    group_parameters(ours, ours.group_matcher(coarse=coarse)).items()}
    assert ours_grouped == dict(group_parameters(theirs, theirs.group_matcher(coarse=coarse)))
    assert len(ours_grouped) == (9 if coarse else 2 + sum(len(s) for s in ours.stages))


def test_timm_optimizer_factory_gives_our_model_timms_layer_decay():
    from timm.optim import create_optimizer_v2

    from mobilenetv2.weights import _peer_prefixes, _rename

    def lr_scales(model: nn.Module, rename=lambda n: n) -> dict[str, float]:
        optimizer = create_optimizer_v2(model, "sgd", lr=1.0, layer_decay=0.5)
        names = {id(p): rename(n) for n, p in model.named_parameters()}
        return {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}

    ours = create_model("mobilenet_v2_050")
    scales = lr_scales(ours, lambda n: _rename(n, _peer_prefixes(ours, "timm")))
    assert scales == lr_scales(timm.create_model("mobilenetv2_050"))
    assert scales["classifier.weight"] == 1.0 and scales["conv_stem.weight"] == 0.5 ** 18


# --------------------------------------------------------------------------------------------
# pretrained_cfg: timm's data pipeline prepares images as ours does


@pytest.mark.parametrize("name, kwargs, meta, mode", [
    ("mobilenet_v2_100", {}, {"interpolation": "bicubic", "crop_pct": 0.875}, "RGB"),  # timm's
    ("mobilenet_v2_100", {}, {"interpolation": "bilinear", "crop_pct": 224 / 232}, "RGB"),
    ("mobilenet_v2_050", {"small_input": True, "in_channels": 1},
     {"input_size": [1, 16, 16], "mean": [0.5], "std": [0.25]}, "L"),  # the digits model
])
def test_timm_transforms_from_our_pretrained_cfg_equal_our_eval_transform(name, kwargs, meta,
                                                                          mode):
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from mobilenetv2 import eval_transform

    model = create_model(name, **kwargs)
    model.meta.update(meta)
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    theirs = create_transform(**resolve_model_data_config(model))(image)
    torch.testing.assert_close(theirs, eval_transform(model)(image), atol=1e-5, rtol=0)
    assert model.pretrained_cfg["first_conv"] == "stem.conv"
    features = create_model(name, features_only=True, **kwargs)
    features.meta.update(meta)
    assert resolve_model_data_config(features) == resolve_model_data_config(model)


# --------------------------------------------------------------------------------------------
# Taps inside a row: torchvision's feature extraction by module name


def test_create_feature_extractor_gives_the_ssdlite_taps_as_on_torchvisions_model(
        generator: torch.Generator) -> None:
    # SSDLite (paper, section 6.2) takes the expansion of layer 15 (the first block of row 6,
    # 576 channels at stride 16) and the head conv's output (1280 at stride 32): taps inside
    # a row, which features_only does not give; torchvision's FX extractor takes our names.
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    from mobilenetv2 import peer_state_dict

    ours = randomize_batchnorm(create_model("mobilenet_v2_100"), generator).eval()
    peer = torchvision.models.mobilenet_v2().eval()
    peer.load_state_dict(peer_state_dict(ours, "torchvision"))
    taps = create_feature_extractor(ours, {"stages.5.0.expand": "c4", "head": "c5"})
    peer_taps = create_feature_extractor(peer, {"features.14.conv.0": "c4", "features.18": "c5"})
    x = torch.randn(1, 3, 96, 96, generator=generator)
    with torch.no_grad():
        got, want = taps(x), peer_taps(x)
    assert [tuple(t.shape[1:]) for t in got.values()] == [(576, 6, 6), (1280, 3, 3)]
    assert_identical(list(got.values()), list(want.values()))
