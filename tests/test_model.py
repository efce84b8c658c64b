"""The architecture: shapes, gradients, the inverted residual block, sizes, backbones, tracing."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.fx
import torchinfo
import torchvision
from conftest import (
    FAITHFUL_MODELS,
    SEED,
    TIMM_NAMES,
    assert_same_outputs,
    build,
    feature_side,
    num_parameters,
    randomize_batchnorm,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torchvision.models._utils import _make_divisible as torchvision_make_divisible

from mobilenetv2 import (
    ConvNormAct,
    InvertedResidual,
    MobileNetV2,
    MobileNetV2Features,
    create_model,
    list_models,
    make_divisible,
)

# Odd sizes check the "same" padding; the seed variant takes only multiples of 32.
RESOLUTIONS = {name: (32, 64, 97) for name in FAITHFUL_MODELS} | {SEED: (32, 64)}
SHAPE_CASES = [
    pytest.param(name, resolution, id=f"{name}-{resolution}")
    for name in list_models()
    for resolution in RESOLUTIONS.get(name, (32, 64, 97))
]


def inverted_residuals(model: nn.Module) -> list[InvertedResidual]:
    return [m for m in model.modules() if isinstance(m, InvertedResidual)]


def block_in_channels(block: InvertedResidual) -> int:
    first = block.depthwise if isinstance(block.expand, nn.Identity) else block.expand
    return first.conv.in_channels


# --------------------------------------------------------------------------------------------
# Shapes and the model contract


def test_list_models_names_every_width_and_the_seed_variant() -> None:
    assert list_models() == sorted(list_models())
    for width in ("035", "050", "075", "100", "140"):
        assert f"mobilenet_v2_{width}" in list_models()
    assert SEED in list_models()


def test_list_models_takes_timms_filter_patterns() -> None:
    # timm.list_models("mobilenetv2_1*") is how its users look for widths.
    assert list_models("mobilenet_v2_1*") == ["mobilenet_v2_100", "mobilenet_v2_110d",
                                              "mobilenet_v2_120d", "mobilenet_v2_130",
                                              "mobilenet_v2_140"]
    assert list_models("mobilenetv2_1*") == list_models("mobilenet_v2_1*")  # timm's spelling
    assert list_models(["*035", SEED]) == ["mobilenet_v2_035", SEED]
    assert list_models("mobilenet_v2") == ["mobilenet_v2_100"]  # torchvision's name
    assert list_models("resnet*") == []
    assert list_models("") == list_models()


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("mobilenet_v2", "mobilenet_v2_100"), ("mobilenetv2_050", "mobilenet_v2_050")],
)
def test_torchvision_and_timm_spellings_build_the_same_variant(alias: str, canonical: str) -> None:
    model = create_model(alias, num_classes=3)
    assert model.config["name"] == canonical
    assert num_parameters(model) == num_parameters(create_model(canonical, num_classes=3))


@pytest.mark.parametrize(("name", "resolution"), SHAPE_CASES)
def test_forward_gives_one_logit_per_class_at_each_resolution(name: str, resolution: int) -> None:
    model = build(name, resolution, num_classes=7).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    side = feature_side(model, resolution)
    assert features.shape == (2, model.num_features, side, side)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("in_channels", [1, 3, 4])
@pytest.mark.parametrize("name", list_models())
def test_in_channels_sets_the_image_channels_the_model_takes(name: str, in_channels: int) -> None:
    model = build(name, 64, num_classes=5, in_channels=in_channels).eval()
    assert model.meta["input_size"][0] == in_channels
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 64, 64)).shape == (1, 5)
    wrong = 2 if in_channels != 2 else 1
    with pytest.raises(RuntimeError):
        model(torch.randn(1, wrong, 64, 64))


@pytest.mark.parametrize("name", list_models())
def test_num_classes_zero_returns_pooled_features(name: str) -> None:
    if name == SEED:  # the walk-through's Linear is its head; it cannot be left out
        with pytest.raises(ValueError, match="num_classes"):
            build(name, 64, num_classes=0)
        return
    model = build(name, 64, num_classes=0).eval()
    assert isinstance(model.classifier, nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        pooled = model.forward_features(x).mean(dim=(2, 3))
    assert out.shape == (2, model.num_features)
    torch.testing.assert_close(out, pooled)


@pytest.mark.parametrize("name", list_models())
def test_forward_is_forward_head_of_forward_features(name: str, generator) -> None:
    model = randomize_batchnorm(build(name, 64, num_classes=6), generator).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        out = model(x)
    torch.testing.assert_close(logits, out)
    classifier_input = model.final[2].in_features if name == SEED else model.num_features
    assert pre_logits.shape == (2, classifier_input)
    assert logits.shape == (2, 6)


@pytest.mark.parametrize("num_classes", [5, 0])
@pytest.mark.parametrize("name", FAITHFUL_MODELS)
def test_reset_classifier_replaces_the_output_layer(name: str, num_classes: int) -> None:
    model = create_model(name, num_classes=1000).eval()
    model.meta["class_names"] = [str(i) for i in range(1000)]
    model.reset_classifier(num_classes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    want = num_classes or model.num_features
    assert out.shape == (2, want)
    assert model.num_classes == num_classes
    assert model.config["num_classes"] == num_classes
    assert model.meta["class_names"] is None
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name", list_models())
def test_backward_reaches_every_parameter(name: str) -> None:
    model = build(name, 64, num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient reaches {no_grad}"
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert len(zero) <= len(list(model.parameters())) // 20, f"zero gradient: {zero}"


# --------------------------------------------------------------------------------------------
# The inverted residual block (paper, section 3)


@pytest.mark.parametrize("small_input", [False, True])
@pytest.mark.parametrize("name", FAITHFUL_MODELS)
def test_shortcut_exists_exactly_where_stride_is_1_and_channels_match(
    name: str, small_input: bool
) -> None:
    model = create_model(name, small_input=small_input)
    blocks = inverted_residuals(model)
    depths = [len(stage) for stage in model.stages]
    assert len(blocks) == sum(depths)  # 17 for the paper's table
    for block in blocks:
        in_channels = block_in_channels(block)
        out_channels = block.project.conv.out_channels
        stride = block.depthwise.conv.stride
        assert block.use_residual == (stride == (1, 1) and in_channels == out_channels)
    if not small_input:  # one shortcut per repeated block (n - 1 per row): 0+1+2+3+2+2+0 = 10
        assert sum(block.use_residual for block in blocks) == sum(n - 1 for n in depths)


def test_residual_block_adds_its_input_and_other_blocks_do_not() -> None:
    model = create_model("mobilenet_v2_100").eval()
    for block in inverted_residuals(model):
        with torch.no_grad():  # the projection now outputs zeros: what is left is the shortcut
            block.project.bn.weight.zero_()
            block.project.bn.bias.zero_()
        x = torch.randn(1, block_in_channels(block), 8, 8)
        with torch.no_grad():
            out = block(x)
        expected = x if block.use_residual else torch.zeros_like(out)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_a_printed_block_shows_its_expansion_stride_and_shortcut() -> None:
    model = create_model("mobilenet_v2_100")
    first_line = {(row, i): repr(model.stages[row][i]).splitlines()[1].strip()
                  for row, i in ((0, 0), (1, 0), (1, 1))}
    assert first_line == {
        (0, 0): "expand_ratio=1, stride=1, use_residual=False",  # row 1: t = 1, 32 -> 16
        (1, 0): "expand_ratio=6, stride=2, use_residual=False",  # row 2's first block
        (1, 1): "expand_ratio=6, stride=1, use_residual=True",
    }


def test_papers_ablations_relu6_after_the_projection_and_no_shortcut(tmp_path) -> None:
    # Section 6.4, Figure 6: the same tensors, another function; saved and refused as such.
    from mobilenetv2 import load_model, load_weights, save_keras_weights, save_weights
    from mobilenetv2.weights import WeightsError

    paper = create_model("mobilenet_v2_035", num_classes=3)
    relu6 = create_model("mobilenet_v2_035", num_classes=3, linear_bottleneck=False)
    plain = create_model("mobilenet_v2_035", num_classes=3, use_residual=False)
    assert paper.state_dict().keys() == relu6.state_dict().keys() == plain.state_dict().keys()
    assert all(isinstance(b.project.act, nn.ReLU6) for b in inverted_residuals(relu6))  # 17
    assert sum(isinstance(m, nn.ReLU6) for m in relu6.modules()) == 35 + 17
    assert sum(b.use_residual for b in inverted_residuals(relu6)) == 10
    assert not any(b.use_residual for b in inverted_residuals(plain))
    block = relu6.stages[1][1].eval()  # 8 -> 48 -> 8, with a shortcut
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        thin = block.project.bn(block.project.conv(block.depthwise(block.expand(x))))
        torch.testing.assert_close(block(x), torch.clamp(thin, 0, 6) + x, atol=0, rtol=0)
        torch.testing.assert_close(plain.stages[1][1].eval()(x), plain.stages[1][1].project(
            plain.stages[1][1].depthwise(plain.stages[1][1].expand(x))), atol=0, rtol=0)
    for model, key in ((relu6, "linear_bottleneck"), (plain, "use_residual")):
        assert model.config[key] is False and key not in paper.config  # default files unchanged
        save_weights(model, tmp_path / f"{key}.safetensors")
        loaded = load_model(tmp_path / f"{key}.safetensors")
        assert loaded.config[key] is False
        with torch.no_grad():
            model.eval(), loaded.eval()
            images = torch.randn(2, 3, 32, 32)
            torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
        with pytest.raises(WeightsError, match=f"built with {key}=False"):
            load_weights(create_model("mobilenet_v2_035", num_classes=3),
                         tmp_path / f"{key}.safetensors")
    keras_like = {"tf_padding": True, "bn_eps": 1e-3}
    with pytest.raises(ValueError, match="use_residual=True"):
        save_keras_weights(create_model("mobilenet_v2_035", use_residual=False, **keras_like),
                           tmp_path / "x.h5")


@pytest.mark.parametrize("name", FAITHFUL_MODELS)
def test_t1_row_has_no_expansion_and_projection_is_linear(name: str) -> None:
    model = create_model(name)
    blocks = inverted_residuals(model)
    assert isinstance(blocks[0].expand, nn.Identity)
    for block in blocks[1:]:
        assert isinstance(block.expand, ConvNormAct)
        assert block.expand.conv.kernel_size == (1, 1)
        assert isinstance(block.expand.act, nn.ReLU6)
        assert block.expand.conv.out_channels == 6 * block.expand.conv.in_channels
    for block in blocks:
        assert block.depthwise.conv.groups == block.depthwise.conv.in_channels
        assert isinstance(block.depthwise.act, nn.ReLU6)
        assert not hasattr(block.project, "act")  # linear bottleneck
        assert [type(m) for m in block.project] == [nn.Conv2d, nn.BatchNorm2d]
    assert isinstance(model.stem.act, nn.ReLU6)
    assert isinstance(model.head.act, nn.ReLU6)
    activations = {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))}
    assert activations == {nn.ReLU6}


# --------------------------------------------------------------------------------------------
# Sizes (paper, Table 4) against torchvision and timm


def test_mobilenet_v2_100_has_torchvision_parameter_count() -> None:
    count = num_parameters(create_model("mobilenet_v2_100"))
    assert count == 3_504_872
    assert count == num_parameters(torchvision.models.mobilenet_v2())


@pytest.mark.parametrize("name", [n for n in FAITHFUL_MODELS if not n.endswith("d")])
def test_width_variant_has_torchvision_parameter_count(name: str) -> None:
    model = create_model(name)
    peer = torchvision.models.mobilenet_v2(width_mult=model.config["width_mult"])
    assert num_parameters(model) == num_parameters(peer)


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_width_variant_has_timm_parameter_count(name: str) -> None:
    peer = timm.create_model(TIMM_NAMES[name], pretrained=False)
    assert num_parameters(create_model(name)) == num_parameters(peer)


@pytest.mark.parametrize(
    ("name", "stem", "head"),
    [
        ("mobilenet_v2_035", 16, 1280),
        ("mobilenet_v2_050", 16, 1280),
        ("mobilenet_v2_075", 24, 1280),
        ("mobilenet_v2_100", 32, 1280),
        ("mobilenet_v2_130", 40, 1664),
        ("mobilenet_v2_140", 48, 1792),
    ],
)
def test_stem_and_head_channels_follow_the_width(name: str, stem: int, head: int) -> None:
    model = create_model(name)
    assert model.stem.conv.out_channels == stem
    assert model.head.conv.out_channels == head
    assert model.num_features == head
    assert model.classifier.in_features == head


@pytest.mark.parametrize(
    ("name", "depths", "stem", "head"),
    [
        ("mobilenet_v2_100", [1, 2, 3, 4, 3, 3, 1], 32, 1280),
        ("mobilenet_v2_110d", [1, 3, 4, 5, 4, 4, 1], 32, 1280),  # ceil(n * 1.2), rows 1, 7 fixed
        ("mobilenet_v2_120d", [1, 3, 5, 6, 5, 5, 1], 32, 1280),  # ceil(n * 1.4)
    ],
)
def test_depth_variants_repeat_blocks_and_keep_stem_and_head(
    name: str, depths: list[int], stem: int, head: int
) -> None:
    model = create_model(name)
    assert [len(stage) for stage in model.stages] == depths
    assert (model.stem.conv.out_channels, model.num_features) == (stem, head)


def test_depth_mult_without_fix_stem_head_scales_every_row() -> None:
    model = create_model("mobilenet_v2_100", depth_mult=1.5)
    assert [len(stage) for stage in model.stages] == [2, 3, 5, 6, 5, 5, 2]
    with pytest.raises(ValueError, match="depth_mult"):
        create_model("mobilenet_v2_100", depth_mult=0)
    with pytest.raises(ValueError, match="fixes depth_mult"):
        create_model("mobilenet_v2_110d", depth_mult=1.0)


@pytest.mark.parametrize(("side", "before", "after"), [(8, 0, 1), (7, 1, 1), (64, 0, 1), (65, 1, 1)])
def test_tf_padding_pads_strided_convolutions_as_tensorflow_same(
    side: int, before: int, after: int
) -> None:
    # TensorFlow pads a stride-2 3x3 window 0 before and 1 after on even sides; PyTorch 1 and 1.
    model = create_model("mobilenet_v2_035", tf_padding=True, bn_eps=1e-3).eval()
    assert model.stem.bn.eps == 1e-3 and model.stem.conv.padding == (0, 0)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        expected = nn.functional.conv2d(nn.functional.pad(x, [before, after] * 2),
                                        model.stem.conv.weight, stride=2)
        torch.testing.assert_close(model.stem.conv(model.stem.pad(x)), expected)
    # Stride-1 layers pad 1 on both sides either way, and torch.fx (int8) traces the padding.
    assert model.stages[0][0].depthwise.conv.padding == (1, 1)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", ["mobilenet_v2_100", "mobilenet_v2_110d"])
def test_drop_path_rates_rise_with_depth_as_in_timm(name: str) -> None:
    ours = create_model(name, drop_path_rate=0.2)
    peer = timm.create_model(TIMM_NAMES[name], drop_path_rate=0.2)
    rates = [getattr(block.drop_path, "p", 0.0) for block in inverted_residuals(ours)]
    # timm gives every block a rate but applies it only where there is a shortcut.
    expected = [block.drop_path.drop_prob if getattr(block, "has_skip", False) else 0.0
                for stage in peer.blocks for block in stage]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert max(rates) > 0.15  # block i of N: 0.2 * i / N, where block i has a shortcut


def test_drop_path_acts_in_training_only(generator: torch.Generator) -> None:
    # No dropout before the classifier: the drops are the only randomness in training.
    plain = randomize_batchnorm(create_model("mobilenet_v2_050", num_classes=5, dropout=0.0),
                                generator)
    dropping = create_model("mobilenet_v2_050", num_classes=5, dropout=0.0, drop_path_rate=0.5)
    dropping.load_state_dict(plain.state_dict())
    assert dropping.config["drop_path_rate"] == 0.5
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x), plain.eval()(x))  # eval: no drop
        plain.train(), dropping.train()
        for m in [*plain.modules(), *dropping.modules()]:  # same BN behaviour, only drops differ
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        torch.manual_seed(0)
        first = dropping(x)
        torch.manual_seed(1)
        assert (dropping(x) - first).abs().max() > 1e-3  # other samples dropped
        torch.testing.assert_close(plain(x), plain(x))  # the control: no drops, no change
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("mobilenet_v2_050", drop_path_rate=1.0)


@given(
    value=st.floats(min_value=0.1, max_value=5000, allow_nan=False),
    divisor=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_make_divisible_rounds_to_a_multiple_never_below_90_percent(
    value: float, divisor: int
) -> None:
    rounded = make_divisible(value, divisor)
    assert rounded % divisor == 0
    assert rounded >= divisor
    assert rounded >= 0.9 * value
    assert rounded <= max(divisor, value + divisor)
    assert rounded == torchvision_make_divisible(value, divisor)


def test_make_divisible_examples_and_bad_divisor() -> None:
    assert make_divisible(32 * 0.35) == 16  # 8 would lose more than 10%
    assert make_divisible(3) == 8  # at least one multiple of 8
    assert make_divisible(1280 * 1.4) == 1792
    assert make_divisible(17, min_value=32) == 32
    with pytest.raises(ValueError, match="divisor"):
        make_divisible(10, 0)


def test_mobilenet_v2_100_has_300_8_million_multiply_adds_at_224() -> None:
    stats = torchinfo.summary(
        create_model("mobilenet_v2_100"), input_size=(1, 3, 224, 224), verbose=0, device="cpu"
    )
    assert 300.7e6 < stats.total_mult_adds < 300.9e6


# --------------------------------------------------------------------------------------------
# Backbones (features_only)


def test_features_only_default_gives_five_maps_at_strides_2_to_32() -> None:
    model = create_model("mobilenet_v2_100", features_only=True).eval()
    assert isinstance(model, MobileNetV2Features)
    with torch.no_grad():
        features = model(torch.randn(1, 3, 224, 224))
    assert [f.shape[1] for f in features] == [16, 24, 32, 96, 320]
    assert [224 // f.shape[-1] for f in features] == [2, 4, 8, 16, 32]
    assert [info["num_chs"] for info in model.feature_info] == [16, 24, 32, 96, 320]
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8, 16, 32]


@pytest.mark.parametrize(
    "name", ["mobilenet_v2_035", "mobilenet_v2_100", "mobilenet_v2_120d", "mobilenet_v2_140"]
)
def test_features_only_matches_timm_channels_and_reductions(name: str) -> None:
    ours = create_model(name, features_only=True)
    peer = timm.create_model(TIMM_NAMES[name], pretrained=False, features_only=True)
    assert [info["num_chs"] for info in ours.feature_info] == peer.feature_info.channels()
    assert [info["reduction"] for info in ours.feature_info] == peer.feature_info.reduction()
    with torch.no_grad():
        features = ours.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == peer.feature_info.channels()
    assert [64 // f.shape[-1] for f in features] == peer.feature_info.reduction()


def test_features_only_returns_the_taps_in_out_indices_or_the_rows_in_out_rows() -> None:
    model = create_model("mobilenet_v2_100", features_only=True, out_indices=[3, 0, -1]).eval()
    assert model.out_indices == [0, 3, 4] and model.out_rows == [0, 4, 6]
    assert len(model.stages) == 7
    rows = create_model("mobilenet_v2_100", features_only=True, out_rows=[3, 0, -1]).eval()
    assert rows.out_rows == [0, 3, 6] and rows.out_indices is None  # row 3 is no tap
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        features, between = model(x), rows(x)
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 32), (96, 4, 4), (320, 2, 2)]
    assert [tuple(f.shape[1:]) for f in between] == [(16, 32, 32), (64, 4, 4), (320, 2, 2)]
    with pytest.raises(ValueError, match="out_indices .* or out_rows .*, not both"):
        create_model("mobilenet_v2_100", features_only=True, out_indices=[1], out_rows=[1])
    with pytest.raises(ValueError, match=r"out_rows must be .* in \[0, 6\]"):
        create_model("mobilenet_v2_100", features_only=True, out_rows=[7])

    shallow = create_model("mobilenet_v2_100", features_only=True, out_indices=[1])
    assert len(shallow.stages) == 2  # the stages after the last one asked for are dropped


def test_features_only_with_small_input_gives_strides_1_to_8() -> None:
    model = create_model("mobilenet_v2_100", features_only=True, small_input=True).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 32, 32))
    assert [32 // f.shape[-1] for f in features] == [1, 2, 4, 8]
    assert [info["reduction"] for info in model.feature_info] == [1, 2, 4, 8]


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["mobilenet_v2_100", "mobilenet_v2_120d"])
def test_output_stride_dilates_exactly_as_timm(name: str, output_stride: int) -> None:
    # DeepLabv3's MobileNetV2 (paper, section 6.3): the strides past the output stride become
    # dilations. timm's output_stride is the reference, classifier and backbone alike.
    peer = randomize_batchnorm(timm.create_model(TIMM_NAMES[name], output_stride=output_stride),
                               torch.Generator().manual_seed(output_stride)).eval()
    peer_features = timm.create_model(TIMM_NAMES[name], output_stride=output_stride,
                                      features_only=True).eval()
    peer_features.load_state_dict(peer.state_dict(), strict=False)
    ours = create_model(name, output_stride=output_stride, weights=peer.state_dict()).eval()
    backbone = create_model(name, output_stride=output_stride, features_only=True,
                            weights=peer.state_dict()).eval()
    assert [i["reduction"] for i in backbone.feature_info] == peer_features.feature_info.reduction()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert_same_outputs(peer(x), ours(x))
        assert_same_outputs(peer_features(x), backbone(x))
        assert ours.forward_features(x).shape[-1] == 96 // output_stride


def test_output_stride_keeps_the_weights_and_is_saved(tmp_path) -> None:
    from mobilenetv2 import load_model, save_weights

    dense = create_model("mobilenet_v2_035", num_classes=4)
    atrous = randomize_batchnorm(create_model("mobilenet_v2_035", num_classes=4, output_stride=8),
                                 torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in dense.state_dict().items()} == {
        k: v.shape for k, v in atrous.state_dict().items()}
    assert [(i["reduction"], i["dilation"]) for i in atrous.row_info] == [
        (2, 1), (4, 1), (8, 1), (8, 2), (8, 2), (8, 4), (8, 4)]
    assert [i["stage"] for i in atrous.feature_info] == [1, 2, 3, 5, 7]  # timm's taps still
    assert atrous.pretrained_cfg["pool_size"] == (28, 28)
    save_weights(atrous, tmp_path / "os8.safetensors")
    again = load_model(tmp_path / "os8.safetensors")
    assert again.config["output_stride"] == 8 and "output_stride" not in dense.config
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert_same_outputs(atrous.eval().forward_features(x), again.eval().forward_features(x))
    with pytest.raises(ValueError, match="output_stride must be a power of 2 from 2"):
        create_model("mobilenet_v2_035", output_stride=1)
    with pytest.raises(ValueError, match="output_stride must be"):
        create_model("mobilenet_v2_035", output_stride=12)
    small = create_model("mobilenet_v2_035", small_input=True, output_stride=4, features_only=True)
    assert [i["reduction"] for i in small.feature_info] == [1, 2, 4, 4]


@pytest.mark.parametrize("out_indices", [[], [5], [7], [-6], [0, 9], 0, 6])
def test_features_only_rejects_out_of_range_out_indices(out_indices: list[int]) -> None:
    with pytest.raises(ValueError, match="out_indices"):
        create_model("mobilenet_v2_050", features_only=True, out_indices=out_indices)


@pytest.mark.parametrize("out_indices", [3, (1, 2, 3, 4), (0, -1)])
def test_out_indices_mean_timms_taps(out_indices) -> None:
    # Before 0.2 they were rows of the table: timm's common (1, 2, 3, 4) gave strides
    # 4, 8, 16, 16 here and 4, 8, 16, 32 in timm, with no error; an int was refused.
    ours = create_model("mobilenet_v2_050", features_only=True, out_indices=out_indices)
    peer = timm.create_model("mobilenetv2_050", features_only=True, out_indices=out_indices)
    assert ours.feature_info.channels() == peer.feature_info.channels()
    assert ours.feature_info.reduction() == peer.feature_info.reduction()
    assert [i["index"] for i in ours.feature_info] == [i["index"] for i in peer.feature_info.get_dicts()]


def test_num_classes_must_be_a_whole_number() -> None:
    import numpy as np

    for bad in (None, 2.0, True, -1):  # None was a TypeError from a comparison
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            create_model("mobilenet_v2_035", num_classes=bad)
    model = create_model("mobilenet_v2_035", num_classes=np.int64(7))  # len(np.unique(labels))
    assert type(model.config["num_classes"]) is int and model.classifier.out_features == 7


def test_reset_classifier_takes_numpy_counts_and_refuses_others_leaving_the_model_whole(
        tmp_path) -> None:
    import numpy as np

    import mobilenetv2

    # np.int64 (labels.max() + 1) was stored in the config, and save_weights then failed in
    # json.dumps; a float or bool failed inside nn.Linear after num_classes, the config and
    # the class names had already been changed.
    model = create_model("mobilenet_v2_035", num_classes=3)
    model.meta["class_names"] = ["a", "b", "c"]
    for bad in (2.0, True, -1, torch.tensor(2.0)):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            model.reset_classifier(bad)
        assert model.num_classes == model.config["num_classes"] == 3
        assert model.meta["class_names"] == ["a", "b", "c"]
    for count in (np.int64(7), torch.tensor(7)):
        model.reset_classifier(count)
        assert type(model.config["num_classes"]) is int and model.classifier.out_features == 7
    mobilenetv2.save_weights(model, tmp_path / "m.safetensors")
    seed = create_model("seed", input_width=32, num_classes=3)
    seed.reset_classifier(np.int64(4))
    assert type(seed.config["num_classes"]) is int
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        seed.reset_classifier(0)


def test_out_indices_without_features_only_is_refused() -> None:
    with pytest.raises(ValueError, match="features_only"):
        create_model("mobilenet_v2_050", out_indices=[1, 2])


def test_features_only_is_refused_for_the_seed_variant() -> None:
    with pytest.raises(ValueError, match="seed"):
        create_model(SEED, input_width=64, features_only=True)


# --------------------------------------------------------------------------------------------
# TorchScript, FX and torch.export give the eager outputs


def _scripted(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.jit.script(model)


def _traced(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.jit.trace(model, x, check_trace=False)


def _fx(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.fx.symbolic_trace(model)


def _exported(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.export.export(model, (x,)).module()


GRAPH_BUILDERS = {
    "torchscript": _scripted,
    "trace": _traced,
    "fx": _fx,
    "export": _exported,
}
GRAPH_MODELS = {
    "faithful": lambda: create_model("mobilenet_v2_035", num_classes=10),
    "features_only": lambda: create_model("mobilenet_v2_035", features_only=True),
    "seed": lambda: create_model(SEED, input_width=64, num_classes=10),
}


@pytest.mark.parametrize("kind", list(GRAPH_MODELS))
@pytest.mark.parametrize("builder", list(GRAPH_BUILDERS))
def test_graph_capture_gives_the_eager_outputs(builder: str, kind: str, generator) -> None:
    model = randomize_batchnorm(GRAPH_MODELS[kind](), generator).eval()
    x = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings
        captured = GRAPH_BUILDERS[builder](model, x)
        with torch.no_grad():
            actual = captured(x)
    assert_same_outputs(expected, actual)


@pytest.mark.parametrize("kind", list(GRAPH_MODELS))
def test_torch_jit_script_warns_of_nothing_in_our_code(kind: str) -> None:
    # torchvision's models script silently; a UserWarning about our __init__ is noise to users
    # (and an error under -W error). Only torch's own deprecation of torch.jit may speak.
    model = GRAPH_MODELS[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(model)


# --------------------------------------------------------------------------------------------
# Arguments that cannot make a network


def test_unknown_model_name_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="mobilenet_v2_999") as error:
        create_model("mobilenet_v2_999")
    for name in list_models():
        assert name in str(error.value)


@pytest.mark.parametrize("name", [None, 100, MobileNetV2])
def test_a_model_name_that_is_not_a_string_is_a_type_error_that_lists_the_names(name) -> None:
    # create_model(args.model) with the flag unset said "'NoneType' object has no attribute
    # 'partition'" (an AttributeError from inside create_model).
    with pytest.raises(TypeError, match="takes a model name, one of mobilenet_v2_035"):
        create_model(name)


@pytest.mark.parametrize("width_mult", [0, -0.5, float("inf"), float("nan")])
def test_width_mult_must_be_positive(width_mult: float) -> None:
    with pytest.raises(ValueError, match="width_mult"):
        MobileNetV2(width_mult=width_mult)


def test_num_classes_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mobilenet_v2_100", num_classes=-1)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_zero_one(dropout: float) -> None:
    with pytest.raises(ValueError, match="dropout"):
        create_model("mobilenet_v2_100", dropout=dropout)


def test_unknown_keyword_argument_is_named() -> None:
    with pytest.raises(ValueError, match="num_clases"):
        create_model("mobilenet_v2_100", num_clases=10)


def test_width_mult_is_refused_for_a_named_width() -> None:
    with pytest.raises(ValueError, match="width_mult"):
        create_model("mobilenet_v2_050", width_mult=0.75)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"round_nearest": 0}, "round_nearest"),
        ({"inverted_residual_setting": [(6, 24, 2, 3)]}, r"s in \(1, 2\)"),
        ({"inverted_residual_setting": [(6, 24, 2)]}, "inverted_residual_setting"),
    ],
    ids=["in_channels", "round_nearest", "stride-3", "short-row"],
)
def test_other_bad_constructor_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MobileNetV2(**kwargs)


@pytest.mark.parametrize(
    "build_positionally",
    [
        # torchvision's MobileNetV2(num_classes, width_mult, inverted_residual_setting, ...)
        lambda: MobileNetV2(10, 1.0, [(1, 16, 1, 1), (6, 24, 2, 2)]),
        # torchvision's InvertedResidual(inp, oup, stride, expand_ratio, norm_layer)
        lambda: InvertedResidual(16, 16, 1, 6, nn.BatchNorm2d),
        # torchvision's Conv2dNormActivation(in, out, kernel_size, stride, padding, groups)
        lambda: ConvNormAct(8, 8, 3, 1, 1, 8),
    ],
    ids=["MobileNetV2", "InvertedResidual", "ConvNormAct"],
)
def test_torchvisions_positional_calls_are_refused_by_keyword_only_arguments(
    build_positionally,
) -> None:
    # Their later arguments are not ours: the call must fail at the call, not deep inside.
    with pytest.raises(TypeError, match=r"positional arguments? but \d+ were given"):
        build_positionally()


def test_custom_table_builds_the_rows_it_is_given() -> None:
    model = MobileNetV2(num_classes=4, inverted_residual_setting=[(1, 16, 1, 1), (4, 24, 2, 2)])
    assert model.num_features == 1280
    assert [len(stage) for stage in model.stages] == [1, 2]
    assert model.config["inverted_residual_setting"] == [[1, 16, 1, 1], [4, 24, 2, 2]]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (8, 8)


def test_every_public_name_resolves_lazily_and_is_listed() -> None:
    import mobilenetv2

    assert sorted(mobilenetv2.__all__) == sorted(mobilenetv2._EXPORTS)
    for name in mobilenetv2.__all__:
        assert getattr(mobilenetv2, name) is not None


# --------------------------------------------------------------------------------------------
# Gradient checkpointing


@pytest.mark.parametrize("name", ["mobilenet_v2_050", "mobilenet_v2_110d"])
def test_grad_checkpointing_trains_to_the_same_weights_and_batchnorm_statistics(name):
    """Recomputing a block must neither change the gradients (drop path draws the same masks)
    nor fold the batch into BatchNorm's running statistics a second time, as timm's
    checkpointing does (its blocks' num_batches_tracked reads 2 after one step)."""
    import copy

    torch.manual_seed(0)
    plain = create_model(name, num_classes=10, drop_path_rate=0.2, dropout=0.2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    expected, got = plain.state_dict(), checkpointed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert int(got["stages.1.0.expand.bn.num_batches_tracked"]) == 2


def test_grad_checkpointing_under_torch_compile_gives_eagers_gradients_and_statistics():
    # Dynamo could not trace the checkpoint's context_fn (an internal error until stop 19);
    # compiled, the checkpoint is part of the graph, whose recomputation writes no buffers.
    import copy

    torch.manual_seed(0)
    plain = create_model("mobilenet_v2_035", num_classes=10, dropout=0.0).double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x, y = torch.randn(8, 3, 64, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    torch._dynamo.reset()
    for model in (plain, torch.compile(checkpointed, backend="aot_eager")):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    expected, got = plain.state_dict(), checkpointed.state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-12, msg=key)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-12, msg=name)
    assert int(got["stages.1.0.expand.bn.num_batches_tracked"]) == 1


def test_grad_checkpointing_leaves_inference_and_export_alone(tmp_path):
    from mobilenetv2.export import ExportConfig, export_model

    model = create_model("mobilenet_v2_035", num_classes=10)
    model.set_grad_checkpointing()
    export_model(model, tmp_path / "m.onnx", ExportConfig(resolution=64))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)
