"""Export: every format matches eager, BatchNorm is folded, metadata travels, errors are one line."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import randomize_batchnorm, refused_by_onnx_runtime_1_16

from mobilenetv2 import WeightsError, create_model, list_models, load_model, save_weights
from mobilenetv2.cli import main
from mobilenetv2.export import (
    ExportConfig,
    ExportVerificationError,
    export_model,
    fold_batchnorm,
    real_images,
    stamp_oldest_versions,
)
from mobilenetv2.layers import PadSame
from mobilenetv2.runtime import Predictor


def _model(name: str, generator: torch.Generator, **kwargs):
    extra = {"input_width": 64} if name == "seed" else {}
    model = create_model(name, num_classes=kwargs.pop("num_classes", 10), **extra, **kwargs)
    model = randomize_batchnorm(model, generator)
    if name != "seed":  # the classifier's 0.01-std init gives logits too small to compare
        with torch.no_grad():
            model.get_classifier().weight.normal_(0, 0.5, generator=generator)
    return model.eval()


def test_fold_batchnorm_keeps_outputs_and_leaves_no_batchnorm(generator):
    model = _model("mobilenet_v2_050", generator)
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original intact


def test_frozen_batchnorm_is_folded_too(generator):
    # A backbone trained with timm's freeze_batch_norm_2d (small-batch segmentation) has
    # torchvision's FrozenBatchNorm2d: it was left in, a Mul and an Add per layer in the ONNX.
    from timm.layers import freeze_batch_norm_2d
    from torchvision.ops import FrozenBatchNorm2d

    model = freeze_batch_norm_2d(_model("mobilenet_v2_050", generator))
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list_models())
def test_onnx_export_of_every_variant_matches_eager_without_batchnorm(name, tmp_path, generator):
    model = _model(name, generator)
    report = export_model(model, tmp_path / "m.onnx", ExportConfig(resolution=64))
    assert max(report.max_abs_diff.values()) <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.opset_import[0].version >= 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.onnx"]  # no temporary file left


@pytest.mark.parametrize("fmt", ["onnx", "exported", "torchscript"])
@pytest.mark.parametrize("side", [64, 65])
def test_tensorflow_padding_is_exported_as_constants(fmt, side, tmp_path, generator):
    # Traced as computed from the input's shape, PadSame became Shape/Gather/arithmetic nodes
    # that ONNX Runtime cannot fold (1.6x slower); exports fix the image size, so the padding
    # is frozen to constants first, and must still match eager at even and odd sizes.
    model = _model("mobilenet_v2_035", generator, tf_padding=True, bn_eps=1e-3)
    path = tmp_path / f"m.{fmt}"
    report = export_model(model, path, ExportConfig(format=fmt, resolution=side))
    assert max(report.max_abs_diff.values()) <= 1e-4
    assert any(isinstance(m, PadSame) for m in model.modules())  # the model itself is untouched
    if fmt == "onnx":
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert "Shape" not in ops and "Pad" in ops


@pytest.mark.parametrize("fmt, kind", [("exported", "a torch.export program"),
                                       ("torchscript", "a TorchScript program")])
def test_a_torch_program_passed_as_weights_is_named_not_called_damaged(fmt, kind, tmp_path, capsys):
    # Our own .pt2 / .pt exports were "damaged or unsupported torch files", with torch's advice
    # to load them with weights_only=False and a warning besides.
    path = tmp_path / f"m.{fmt}"
    export_model(create_model("mobilenet_v2_035", num_classes=3), path,
                 ExportConfig(format=fmt, resolution=32))
    with pytest.raises(WeightsError, match=f"is {kind} .*, not weights: pass the .safetensors"):
        load_model(path)
    assert main(["eval", "--weights", str(path), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights_only" not in err


@pytest.mark.parametrize("fmt, name, kwargs", [
    ("exported", "mobilenet_v2_035", {"small_input": True, "in_channels": 1}),
    ("torchscript", "seed", {}),
])
def test_torch_formats_match_eager_at_another_batch_size(fmt, name, kwargs, tmp_path, generator):
    model = _model(name, generator, **kwargs)
    path = tmp_path / f"m.{fmt}"
    report = export_model(model, path, ExportConfig(format=fmt))
    assert report.max_abs_diff["random"] <= 1e-4 and report.max_abs_diff["real"] <= 1e-4
    assert report.input_shape[0] == "batch"


def test_onnx_metadata_round_trips_through_the_runtime(tmp_path, generator):
    model = _model("mobilenet_v2_035", generator, num_classes=3)
    model.meta.update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], class_names=["a", "b", "c"],
                      crop_pct=0.9)
    report = export_model(model, tmp_path / "m.onnx", ExportConfig(resolution=96))
    predictor = Predictor(tmp_path / "m.onnx")
    for key in ("mean", "std", "class_names", "crop_pct", "resize", "resize_mode", "config"):
        assert predictor.meta[key] == report.metadata[key]
    assert predictor.meta["input_size"] == [3, 96, 96]
    assert predictor.meta["resize_mode"] == "shorter" and predictor.meta["resize"] == int(96 / 0.9)
    assert predictor.meta["config"]["name"] == "mobilenet_v2_035"
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(stored["class_names"]) == ["a", "b", "c"]  # JSON strings in the file


def test_an_exported_model_says_what_trained_its_weights(tmp_path, generator):
    # A deployed .onnx named its package version and nothing of the run its weights came from.
    model = _model("mobilenet_v2_035", generator)
    training = {"mobilenetv2": "0.1.0", "torch": "2.9.0", "epoch": 3, "config": {"seed": 0},
                "data": {"train": {"images": 48, "sha256": "ab" * 32}}}
    model.meta["training"] = training
    save_weights(model, tmp_path / "w.safetensors")  # as export --weights reads them
    loaded = load_model(tmp_path / "w.safetensors")
    assert loaded.meta["training"] == training
    export_model(loaded, tmp_path / "m.onnx", ExportConfig(resolution=32))
    stored = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(stored["training"]) == training
    assert Predictor(tmp_path / "m.onnx").meta["training"] == training
    from mobilenetv2.cli.summary import describe_exported, exported_contract  # summary shows it

    contract = exported_contract(tmp_path / "m.onnx")
    assert contract["training"] == training
    assert describe_exported(contract).splitlines()[-1] == (
        "trained by: mobilenetv2 0.1.0, torch 2.9.0; epoch 3, seed 0; "
        "train 48 images (sha256 abababababab)")
    # Weights fine-tuned from these (another head) are not what that run trained.
    tuned = create_model("mobilenet_v2_035", weights=str(tmp_path / "w.safetensors"), num_classes=3)
    assert "training" not in tuned.meta


def test_static_batch_export_has_a_fixed_batch_dimension(tmp_path, generator):
    model = _model("mobilenet_v2_035", generator)
    export_model(model, tmp_path / "m.onnx",
                 ExportConfig(resolution=64, dynamic_batch=False, batch_size=2))
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 64, 64]
    predictor = Predictor(tmp_path / "m.onnx")
    assert predictor.batch_size == 2
    assert predictor.run(real_images(3, (3, 64, 64), model.meta).numpy()).shape == (3, 10)


def test_failed_verification_raises_and_leaves_no_file(tmp_path, generator):
    model = _model("mobilenet_v2_035", generator)
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(ExportVerificationError, match="does not match the eager model"):
        export_model(model, tmp_path / "m.onnx", ExportConfig(resolution=64, atol=1e-12))
    assert (tmp_path / "m.onnx").read_bytes() == b"old"  # the old file is left intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.slow
def test_dynamo_onnx_exporter_also_matches_eager(tmp_path, generator):
    model = _model("mobilenet_v2_035", generator)
    report = export_model(model, tmp_path / "m.onnx",
                          ExportConfig(resolution=64, onnx_exporter="dynamo"))
    assert max(report.max_abs_diff.values()) <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}
    assert refused_by_onnx_runtime_1_16(proto) == []  # the exporter stamps IR 10
    assert not any(node.metadata_props for node in proto.graph.node)  # its stack traces


def test_onnx_files_are_stamped_with_the_oldest_versions_their_graph_needs():
    """The dynamo exporter stamps IR 10 on an opset-18 graph, and ONNX Runtime's quantization
    pre-processing imports ai.onnx.ml 5 and seven more domains no node uses: ONNX Runtime 1.16
    and 1.17, which boards and distributions still run, refuse both."""
    from onnx import TensorProto, helper

    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    conv.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="/home/me/model.py")
    contrib = helper.make_node("Gelu", ["y"], ["z"], domain="com.microsoft")
    graph = helper.make_graph(
        [conv, contrib], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])])
    proto = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 5),
        helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("com.microsoft.nchwc", 1)])
    assert refused_by_onnx_runtime_1_16(proto) == ["IR version 10", "ai.onnx.ml opset 5"]
    stamp_oldest_versions(proto)
    assert refused_by_onnx_runtime_1_16(proto) == []
    assert proto.ir_version == 8
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18), ("com.microsoft", 1)]
    assert not proto.graph.node[0].metadata_props  # IR 8 has no field for them
    onnx.checker.check_model(proto)


# --------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def weights(tmp_path, generator):
    path = tmp_path / "model.safetensors"
    save_weights(_model("mobilenet_v2_035", generator, small_input=True), path)
    return path


def test_export_command_writes_a_verified_file(weights, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "onnx" and out.is_file()
    assert report["input_shape"] == ["batch", 3, 32, 32]


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "unknown export format 'tflite'"),
    (["--weights", "missing.safetensors"], "not found"),
    (["--out", "{tmp}/no/such/folder/m.onnx"], "does not exist"),
    (["--out", "{tmp}"], "it is a folder"),
    (["--out", "{tmp}/a-file/m.onnx"], "is a file, not a folder"),
    (["--out", "{tmp}/m.bin"], "cannot tell the format"),
])
def test_export_command_errors_are_one_line_and_exit_2(args, message, weights, tmp_path, capsys):
    base = {"--weights": str(weights), "--out": str(tmp_path / "m.onnx")}
    (tmp_path / "a-file").write_text("not a folder")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for flag in list(base):
        if flag in extra:
            del base[flag]
    argv = ["export", *[x for pair in base.items() for x in pair], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_seed_export_with_another_resolution_is_one_clear_error(tmp_path, generator, capsys):
    path = tmp_path / "seed.safetensors"
    save_weights(create_model("seed", input_width=64, num_classes=10), path)
    code = main(["export", "--weights", str(path), "--out", str(tmp_path / "s.onnx"),
                 "--resolution", "96"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--resolution 64" in err
    assert not (tmp_path / "s.onnx").exists()


# --------------------------------------------------------------------------------------------
# features_only backbones: one output per feature map


@pytest.mark.parametrize("fmt", ["onnx", "exported", "torchscript"])
def test_a_features_only_backbone_exports_every_feature_map(fmt, tmp_path, generator):
    model = randomize_batchnorm(create_model("mobilenet_v2_050", features_only=True,
                                             out_rows=(1, 3, 6)), generator).eval()
    path = tmp_path / f"backbone{ {'onnx': '.onnx', 'exported': '.pt2', 'torchscript': '.pt'}[fmt]}"
    report = export_model(model, path, ExportConfig(format=fmt, resolution=64))
    assert max(report.max_abs_diff.values()) < 1e-4
    assert report.metadata["output"] == "features"
    assert report.metadata["feature_info"] == [
        {"num_chs": 16, "reduction": 4}, {"num_chs": 32, "reduction": 16},
        {"num_chs": 160, "reduction": 32}]
    if fmt == "onnx":
        assert [o.name for o in onnx.load(path).graph.output] == [
            "features_0", "features_1", "features_2"]


def test_the_runtime_returns_a_backbones_feature_maps_and_refuses_to_classify(tmp_path,
                                                                              generator):
    model = randomize_batchnorm(create_model("mobilenet_v2_035", features_only=True),
                                generator).eval()
    export_model(model, tmp_path / "b.onnx", ExportConfig(resolution=64))
    predictor = Predictor(tmp_path / "b.onnx")
    images = real_images(3, (3, 64, 64), model.meta)
    with torch.no_grad():
        expected = model(images)
    got = predictor.features(images.numpy())
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    assert all(torch.allclose(torch.from_numpy(g), e, atol=1e-4)
               for g, e in zip(got, expected, strict=True))
    assert predictor.is_feature_extractor and predictor.num_classes is None
    with pytest.raises(ValueError, match="feature extractor"):
        predictor.run(images.numpy())


def test_backbone_commands_export_and_bench_it_and_eval_says_why_not(tmp_path, capsys):
    from PIL import Image

    save_weights(create_model("mobilenet_v2_035", features_only=True), tmp_path / "b.safetensors")
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    assert main(["export", "--weights", str(tmp_path / "b.safetensors"), "--out",
                 str(tmp_path / "b.onnx"), "--resolution", "64"]) == 0
    assert main(["bench", "--weights", str(tmp_path / "b.safetensors"), "--resolution", "64",
                 "--batch-sizes", "1", "--backends", "eager,ort", "--no-references",
                 "--rounds", "1", "--round-time", "0.05", "--warmup", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["results"]
    assert {r["backend"] for r in rows} == {"eager", "ort"}
    for args in (["eval", "--weights", str(tmp_path / "b.safetensors"), "--data", "digits"],
                 ["eval", "--weights", str(tmp_path / "b.onnx"), "--data", "digits"],
                 ["predict", "--weights", str(tmp_path / "b.onnx"), str(tmp_path / "x.png")],
                 ["quantize", "--weights", str(tmp_path / "b.safetensors"), "--data", "digits",
                  "--out", str(tmp_path / "q.onnx")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "feature extractor (features_only)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("fmt", "output_stride"), [("onnx", 16), ("exported", 32)])
def test_a_backbone_exported_with_a_dynamic_size_takes_images_of_any_size(
        fmt, output_stride, tmp_path, generator):
    # Detection and segmentation feed images of many sizes: the file must not be tied to one.
    model = randomize_batchnorm(create_model("mobilenet_v2_035", features_only=True,
                                             output_stride=output_stride, out_indices=[2, 4]),
                                generator).eval()
    path = tmp_path / ("b.onnx" if fmt == "onnx" else "b.pt2")
    report = export_model(model, path, ExportConfig(format=fmt, resolution=64, dynamic_size=True))
    assert report.input_shape == ("batch", 3, "height", "width")
    assert set(report.max_abs_diff) == {"random", "real", "other_size"}
    images = torch.rand(1, 3, 100, 130, generator=generator)
    with torch.no_grad():
        expected = model(images)
    if fmt == "onnx":
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
        got = Predictor(path).features(images.numpy())
        with pytest.raises(ValueError, match=r"expected a \(N, 3, H, W\) batch, got \(1, 1, 64, 64\)"):
            Predictor(path).features(torch.zeros(1, 1, 64, 64).numpy())
    else:
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(images)
    last = (7, 9) if output_stride == 16 else (4, 5)
    assert [tuple(g.shape) for g in got] == [(1, 16, 13, 17), (1, 112, *last)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), e, atol=1e-4, rtol=0)


def test_summary_says_a_dynamic_size_file_takes_any_height_and_width(tmp_path, capsys):
    model = create_model("mobilenet_v2_035", features_only=True)
    export_model(model, tmp_path / "b.onnx", ExportConfig(resolution=64, dynamic_size=True))
    assert main(["summary", "--json", "--weights", str(tmp_path / "b.onnx")]) == 0
    put = json.loads(capsys.readouterr().out)["input"]
    assert put["shape"] == [None, 3, None, None] and put["image_size"] == [64, 64]
    assert main(["summary", "--weights", str(tmp_path / "b.onnx")]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("input 'input': float32 (N, 3, H, W), channels first: resize the "
                           "whole image to 64x64")
    assert line.endswith("; any batch size N; any height H and width W (exported with "
                         "--dynamic-size)")


def test_a_dynamic_size_is_refused_where_the_file_would_take_one_size(tmp_path, capsys):
    for fmt in ("torchscript", "executorch"):
        with pytest.raises(ValueError, match="a dynamic image size is for ONNX and .pt2 files"):
            ExportConfig(format=fmt, dynamic_size=True)
    with pytest.raises(ValueError, match="tf_padding model .* exports only at a fixed size"):
        export_model(create_model("mobilenet_v2_035", tf_padding=True), tmp_path / "t.onnx",
                     ExportConfig(resolution=64, dynamic_size=True))
    save_weights(create_model("seed", input_width=64), tmp_path / "s.safetensors")
    assert main(["export", "--weights", str(tmp_path / "s.safetensors"), "--out",
                 str(tmp_path / "s.onnx"), "--dynamic-size"]) == 2
    err = capsys.readouterr().err
    assert "seed variant takes only 64x64 inputs" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_a_batch_size_beside_a_dynamic_batch_is_refused_not_ignored():
    with pytest.raises(ValueError, match="batch_size=8 fixes the batch only with dynamic_batch=False"):
        ExportConfig(batch_size=8)
    assert ExportConfig(batch_size=8, dynamic_batch=False).batch_size == 8
    assert ExportConfig(format="executorch", batch_size=8).batch_size == 8  # always fixed
