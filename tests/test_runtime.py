"""The torch-free runtime: no torch import, eager-equal predictions, lean memory, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_batchnorm
from PIL import Image

import mobilenetv2.runtime as runtime_module
from mobilenetv2 import create_model
from mobilenetv2.export import ExportConfig, export_model
from mobilenetv2.runtime import Predictor, channel_stats, resize_policy, softmax

RUNTIME_FILE = Path(runtime_module.__file__)


def _image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A smooth, photo-like test image (gradients plus noise), saved as PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """A 3-channel model at 96x96 (resize + center crop), the same resized bicubically (as
    timm's weights are), and a 1-channel one at 32 (resize)."""
    folder = tmp_path_factory.mktemp("runtime")
    generator = torch.Generator().manual_seed(0)
    models = {}
    for key, kwargs, resolution in (("rgb96", {}, 96), ("bicubic96", {}, 96),
                                    ("gray32", {"small_input": True, "in_channels": 1}, None)):
        model = randomize_batchnorm(create_model("mobilenet_v2_035", num_classes=4, **kwargs),
                                    generator).eval()
        with torch.no_grad():
            model.classifier.weight.normal_(0, 0.5, generator=generator)
        model.meta["class_names"] = ["cat", "dog", "emu", "yak"] if key == "rgb96" else None
        if key == "bicubic96":
            model.meta["interpolation"] = "bicubic"
        if key == "gray32":
            model.meta.update(mean=[0.3], std=[0.4])
        export_model(model, folder / f"{key}.onnx", ExportConfig(resolution=resolution))
        models[key] = (folder / f"{key}.onnx", model)
    return models


def test_runtime_file_imports_without_torch(onnx_models, tmp_path):
    path, _ = onnx_models["rgb96"]
    image = _image(tmp_path / "a.png", (120, 90), seed=1)
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("runtime", {str(RUNTIME_FILE)!r})
        runtime = sys.modules["runtime"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runtime)
        top = runtime.Predictor({str(path)!r}).predict([{str(image)!r}], top_k=2)
        print(json.dumps({{"top": top, "torch": "torch" in sys.modules,
                          "mobilenetv2": any(m.startswith("mobilenetv2") for m in sys.modules)}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)
    report = json.loads(result.stdout)
    assert report["torch"] is False and report["mobilenetv2"] is False
    assert len(report["top"][0]) == 2 and report["top"][0][0][0] in {"cat", "dog", "emu", "yak"}


def test_the_copied_file_given_a_pte_program_without_executorch_says_what_to_install(tmp_path):
    # A device with onnxruntime, NumPy and Pillow only: torch and the package cannot be imported.
    (tmp_path / "m.pte").write_bytes(b"\0\0\0\0ET12")
    image = _image(tmp_path / "a.png", (40, 40), seed=0)
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["torch"] = sys.modules["mobilenetv2"] = None  # import fails, as on a device
        sys.argv = ["runtime.py", {str(tmp_path / "m.pte")!r}, {str(image)!r}]
        runpy.run_path({str(RUNTIME_FILE)!r}, run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert ".pte programs need the ExecuTorch runtime" in result.stderr
    assert "pip install 'mobilenetv2[executorch]'" in result.stderr


def test_the_package_runtime_import_does_not_import_torch(onnx_models, tmp_path):
    path, _ = onnx_models["rgb96"]
    code = textwrap.dedent(f"""
        import json, sys
        from mobilenetv2.runtime import Predictor
        Predictor({str(path)!r}).run(__import__("numpy").zeros((1, 3, 96, 96), "float32"))
        print(json.dumps({{"torch": "torch" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)
    assert json.loads(result.stdout) == {"torch": False}


@pytest.mark.parametrize("key, size, mode", [
    ("rgb96", (130, 97), "RGB"),   # shorter side to 109, center crop 96
    ("rgb96", (80, 150), "RGBA"),  # portrait, transparency composited on white
    ("bicubic96", (130, 97), "RGB"),  # timm's weights are resized bicubically
    ("gray32", (50, 41), "L"),     # small model: resized whole
    ("gray32", (40, 40), "RGB"),   # colour image into a grayscale model
])
def test_preprocessing_matches_the_eager_evaluation_transform(key, size, mode, onnx_models,
                                                             tmp_path):
    from mobilenetv2.data import eval_transform, open_image

    path, model = onnx_models[key]
    predictor = Predictor(path)
    image = _image(tmp_path / "x.png", size, seed=2, mode=mode)
    channels = model.meta["input_size"][0]
    expected = eval_transform(predictor.meta)(open_image(image, channels)).numpy()
    np.testing.assert_allclose(predictor.preprocess(image), expected, atol=1e-5)


def _pgm16(path: Path, pixels: np.ndarray) -> Path:
    path.write_bytes(f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n65535\n".encode()
                     + pixels.astype(">u2").tobytes())
    return path


@pytest.mark.parametrize("key", ["rgb96", "gray32"])
@pytest.mark.parametrize("kind", ["png16", "pgm16", "tiff_float"])
def test_16_bit_and_float_images_are_prepared_as_training_prepares_them(key, kind, onnx_models,
                                                                      tmp_path):
    # Pillow opens these as I;16, I and F; the runtime once clipped them all to white.
    from mobilenetv2.data import eval_transform, open_image

    path, model = onnx_models[key]
    levels = np.linspace(0, 65535, 70 * 60).reshape(60, 70)
    if kind == "png16":
        Image.fromarray(levels.astype(np.uint16)).save(image := tmp_path / "x.png")
    elif kind == "pgm16":
        image = _pgm16(tmp_path / "x.pgm", levels.astype(np.uint16))
    else:
        Image.fromarray((levels / 65535).astype(np.float32), "F").save(image := tmp_path / "x.tif")
    predictor = Predictor(path)
    channels = model.meta["input_size"][0]
    expected = eval_transform(predictor.meta)(open_image(image, channels)).numpy()
    np.testing.assert_allclose(predictor.preprocess(image), expected, atol=1e-5)
    gray = np.asarray(open_image(image, 1), dtype=np.float64)
    np.testing.assert_allclose(gray, np.rint(levels / 65535 * 255), atol=1)  # full 8-bit range


def test_a_dark_16_bit_image_stays_dark(tmp_path):
    from mobilenetv2.data import open_image

    # Scaled by 65535, not by its own brightest pixel (which made PGM files full-bright).
    dark = np.full((8, 8), 1000, np.uint16)
    dark[0, 0] = 2000
    Image.fromarray(dark).save(tmp_path / "dark.png")
    for image in (_pgm16(tmp_path / "dark.pgm", dark), tmp_path / "dark.png"):
        assert np.asarray(open_image(image, 1))[1, 1] == round(1000 / 65535 * 255)


def test_predict_takes_one_image_or_a_list_and_refuses_float_arrays(onnx_models):
    path, _ = onnx_models["rgb96"]
    predictor = Predictor(path)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    one = predictor.predict(pixels, top_k=2)
    assert len(one) == 1 and one == predictor.predict([pixels], top_k=2)  # not one per row
    assert predictor.predict(Image.fromarray(pixels), top_k=2) == one
    assert predictor.predict(np.stack([pixels, pixels]), top_k=2) == one * 2  # N images
    gray = pixels[..., :1]
    np.testing.assert_allclose(predictor.preprocess(gray), predictor.preprocess(gray[..., 0]))
    with pytest.raises(ValueError, match="must be uint8"):
        predictor.predict(pixels / 255.0)
    with pytest.raises(ValueError, match="HxW, HxWx1, HxWx3 or HxWx4"):
        predictor.preprocess(np.zeros((4, 4, 2), np.uint8))


def test_predict_gives_the_eager_models_top_k(onnx_models, tmp_path):
    from mobilenetv2.data import eval_transform, open_image

    path, model = onnx_models["rgb96"]
    predictor = Predictor(path, threads=1)
    images = [_image(tmp_path / f"{i}.png", (100 + 10 * i, 110), seed=i) for i in range(3)]
    top = predictor.predict(images, top_k=3, batch_size=2)
    batch = torch.stack([eval_transform(model.meta | {"input_size": [3, 96, 96]})(
        open_image(p, 3)) for p in images])
    with torch.no_grad():
        probs = model(batch).softmax(1)
    for row, expected in zip(top, probs, strict=True):
        assert [name for name, _ in row] == [model.meta["class_names"][i]
                                             for i in expected.argsort(descending=True)[:3]]
        np.testing.assert_allclose([p for _, p in row], expected.sort(descending=True).values[:3],
                                   atol=1e-4)


def test_unnamed_classes_fall_back_to_class_index(onnx_models):
    path, _ = onnx_models["gray32"]
    predictor = Predictor(path)
    top = predictor.predict([np.full((20, 20), 128, np.uint8)], top_k=10)
    assert len(top[0]) == 4  # at most the number of classes
    assert all(name.startswith("class_") for name, _ in top[0])
    assert sum(p for _, p in top[0]) == pytest.approx(1.0, abs=1e-5)


def test_run_checks_the_batch_shape(onnx_models):
    predictor = Predictor(onnx_models["gray32"][0])
    assert predictor.run(np.zeros((5, 1, 32, 32), np.float32)).shape == (5, 4)
    with pytest.raises(ValueError, match=r"expected a \(N, 1, 32, 32\) batch"):
        predictor.run(np.zeros((5, 3, 32, 32), np.float32))


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory) -> Path:
    """A 3-class model at 32x32 that takes uint8 pixels, (N, 32, 32, 3)."""
    path = tmp_path_factory.mktemp("pixels") / "pixels.onnx"
    model = create_model("mobilenet_v2_035", num_classes=3, small_input=True).eval()
    export_model(model, path, ExportConfig(pixel_input=True))
    return path


def test_run_on_a_pixel_model_names_the_size_of_a_float_batch_of_the_wrong_size(pixel_model):
    predictor = Predictor(pixel_model)
    assert predictor.run(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 3)  # normalised
    assert predictor.run(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 3)  # pixels
    with pytest.raises(ValueError, match=r"expected a \(N, 3, 32, 32\) batch \(or uint8 pixels, "
                       r"\(N, 32, 32, 3\)\), got \(2, 3, 64, 64\)"):
        predictor.run(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"takes uint8 pixels, \(N, 32, 32, 3\), not float32"):
        predictor.run(np.zeros((2, 32, 32, 3), np.float32))  # the right pixels, the wrong type


def test_features_of_a_classifier_is_an_error_not_its_logits(onnx_models):
    predictor = Predictor(onnx_models["gray32"][0])
    with pytest.raises(ValueError, match=r"is a classifier: it returns logits, not feature maps; "
                       r"call run\(batch\)"):
        predictor.features(np.zeros((2, 1, 32, 32), np.float32))


def test_features_of_a_model_without_our_metadata_are_all_its_outputs(onnx_models, tmp_path):
    import onnx

    # Exported elsewhere, it does not say whether it classifies: features() does not guess.
    model = onnx.load(onnx_models["gray32"][0])
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "plain.onnx")
    batch = np.zeros((2, 1, 32, 32), np.float32)
    (outputs,) = Predictor(tmp_path / "plain.onnx").features(batch)
    np.testing.assert_allclose(outputs, Predictor(onnx_models["gray32"][0]).run(batch), atol=1e-6)


def test_runtime_command_prints_one_json_line_per_image(onnx_models, tmp_path, capsys):
    path, _ = onnx_models["rgb96"]
    images = [str(_image(tmp_path / f"{i}.png", (100, 100), seed=i)) for i in range(2)]
    assert runtime_module.main([str(path), *images, "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images and len(lines[0]["top_k"]) == 2
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert runtime_module.main([str(path), str(tmp_path / "broken.png")]) == 2
    assert "is not a readable image" in capsys.readouterr().err


def test_runtime_command_sends_at_most_batch_size_images_per_call(onnx_models, tmp_path,
                                                                  capsys, monkeypatch):
    """ONNX Runtime keeps the memory of its largest batch (a folder of 224x224 images at the
    default 32: 4x one image's peak), too much for a small board: --batch-size bounds it."""
    path, _ = onnx_models["gray32"]
    images = [str(_image(tmp_path / f"{i}.png", (40, 40), seed=i)) for i in range(5)]
    calls = []
    run = runtime_module.Predictor.run
    monkeypatch.setattr(runtime_module.Predictor, "run",
                        lambda self, batch: calls.append(len(batch)) or run(self, batch))
    assert runtime_module.main([str(path), *images]) == 0
    everything = capsys.readouterr().out
    assert calls == [5]
    calls.clear()
    assert runtime_module.main([str(path), *images, "--batch-size", "2"]) == 0
    assert calls == [2, 2, 1]
    assert capsys.readouterr().out == everything  # the same lines, in the same order


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--threads", "0"), ("--top-k", "x"),
                                         ("--batch-size", "0")])
def test_runtime_command_refuses_a_bad_option_by_its_own_name(flag, value, onnx_models,
                                                              tmp_path, capsys):
    image = _image(tmp_path / "a.png", (40, 40), seed=0)
    with pytest.raises(SystemExit) as exit_info:
        runtime_module.main([str(onnx_models["gray32"][0]), str(image), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # deploy.md: one error line, no usage text
    assert err.startswith(f"runtime: error: argument {flag}: must be a positive integer, got {value}")
    assert "batch_size" not in err  # the command has no such option


def test_runtime_command_classifies_every_readable_image_past_an_unreadable_one(
        onnx_models, tmp_path, capsys):
    path, _ = onnx_models["gray32"]
    (tmp_path / "notimage.jpg").write_bytes(b"not an image")
    good = [str(_image(tmp_path / f"{i}.png", (40, 40), seed=i)) for i in range(2)]
    bad = str(tmp_path / "notimage.jpg")
    assert runtime_module.main([str(path), good[0], bad, good[1], "--top-k", "2"]) == 2
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == [good[0], bad, good[1]]  # in the order given
    assert [len(line["top_k"]) for line in lines] == [2, 0, 2]
    assert "error" not in lines[0] and "error" not in lines[2]
    assert lines[1]["error"].startswith(f"{bad} is not a readable image")
    assert err.splitlines() == [f"runtime: warning: {lines[1]['error']}"]  # one line, no traceback
    assert runtime_module.main([str(path), *good]) == 0


def test_runtime_command_names_a_missing_image_file(onnx_models, tmp_path, capsys):
    image = _image(tmp_path / "a.png", (40, 40), seed=0)
    missing = tmp_path / "missing.png"
    assert runtime_module.main([str(onnx_models["gray32"][0]), str(image), str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"runtime: error: no such file or folder: {missing}\n"
    # One that goes between listing and reading is an unreadable image like any other.
    with pytest.raises(FileNotFoundError, match=f"image file not found: {missing}"):
        Predictor(onnx_models["gray32"][0]).preprocess(missing)


def test_runtime_command_walks_folders_for_images(onnx_models, tmp_path, capsys):
    path, _ = onnx_models["gray32"]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    images = [_image(folder / "b.png", (40, 40), seed=0), _image(folder / "sub" / "a.jpg",
                                                               (40, 40), seed=1)]
    _image(folder / ".hidden" / "c.png", (40, 40), seed=2)
    (folder / "notes.txt").write_text("not an image")
    assert runtime_module.main([str(path), str(folder)]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(p) for p in images]
    assert err.count("\n") == 1 and "left out 1 file in " in err and "notes.txt" in err
    (tmp_path / "empty").mkdir()
    assert runtime_module.main([str(path), str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_missing_or_broken_model_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Predictor(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a model ONNX Runtime can load"):
        Predictor(tmp_path / "bad.onnx")


def test_helpers():
    assert channel_stats([0.5], 3) == [0.5, 0.5, 0.5]
    assert channel_stats([0.2, 0.4, 0.6], 1) == pytest.approx([0.4])
    with pytest.raises(ValueError):
        channel_stats([0.1, 0.2], 3)
    assert resize_policy(32) == ("exact", 32) and resize_policy(224) == ("shorter", 256)
    assert resize_policy(224, 224 / 232) == ("shorter", 232)
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])


def _peak_rss_mb(code: str) -> float:
    script = code + "\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    return int(out.split()[-2]) / 1024


def _median_peak_rss_mb(code: str) -> float:
    return sorted(_peak_rss_mb(code) for _ in range(3))[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_runtime_peak_memory_is_within_10_percent_of_bare_onnxruntime(tmp_path):
    import torchvision

    model = torchvision.models.mobilenet_v2().eval()
    model.meta = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "input_size": [3, 224, 224], "class_names": None}
    model.config = {"name": "torchvision_mobilenet_v2"}
    export_model(model, tmp_path / "tv.onnx")
    image = _image(tmp_path / "x.png", (300, 260), seed=0)
    # The reference does what any user of a bare session does to classify a file: decode it
    # with Pillow (5 MB of the peak; without it the margin was the runs' own spread of 4-5 MB,
    # and the test failed on loaded machines). The median of three runs each.
    bare = _median_peak_rss_mb(textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        from PIL import Image
        pixels = np.asarray(Image.open({str(image)!r}).convert("RGB").resize((224, 224)))
        s = ort.InferenceSession({str(tmp_path / 'tv.onnx')!r}, providers=["CPUExecutionProvider"])
        s.run(None, {{"input": (pixels.transpose(2, 0, 1)[None] / 255).astype(np.float32)}})"""))
    ours = _median_peak_rss_mb(textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("runtime", {str(RUNTIME_FILE)!r})
        runtime = sys.modules["runtime"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runtime)
        runtime.Predictor({str(tmp_path / 'tv.onnx')!r}).predict([{str(image)!r}])"""))
    assert ours <= 1.1 * bare, f"runtime {ours:.0f} MB vs bare onnxruntime {bare:.0f} MB"


def test_ort_format_conversion_for_onnx_runtime_mobile_keeps_model_and_metadata(onnx_models,
                                                                                  tmp_path):
    path, model = onnx_models["gray32"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.onnx").write_bytes(path.read_bytes())
    subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                    str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                    "--optimization_style", "Fixed"], check=True, capture_output=True, timeout=600)
    onnx_predictor, ort_predictor = Predictor(path), Predictor(tmp_path / "out" / "m.ort")
    assert ort_predictor.meta == onnx_predictor.meta
    batch = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(ort_predictor.run(batch), onnx_predictor.run(batch), atol=1e-5)


def test_fixing_the_batch_for_nnapi_and_coreml_keeps_model_and_metadata(onnx_models, tmp_path):
    """docs/deploy.md's step for ONNX Runtime's NNAPI / CoreML providers (which take no
    dynamic dimension): ONNX Runtime's make_dynamic_shape_fixed on our file."""
    path, _ = onnx_models["gray32"]
    subprocess.run([sys.executable, "-m", "onnxruntime.tools.make_dynamic_shape_fixed",
                    "--dim_param", "batch", "--dim_value", "1", str(path), str(tmp_path / "b1.onnx")],
                   check=True, capture_output=True, timeout=600)
    dynamic, fixed = Predictor(path), Predictor(tmp_path / "b1.onnx")
    assert (dynamic.batch_size, fixed.batch_size) == (None, 1)
    assert fixed.meta == dynamic.meta
    batch = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(fixed.run(batch), dynamic.run(batch), atol=1e-5)


def test_cpus_and_threads_follow_a_containers_quota_and_omp_num_threads(tmp_path, monkeypatch):
    # A pipeline's container (docker --cpus 2 on a 64-core host) saw every core of the host:
    # worker counts and ONNX Runtime's threads ignored its quota and OMP_NUM_THREADS.
    from mobilenetv2 import runtime

    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    none.mkdir()
    assert (runtime.cpu_quota(v2), runtime.cpu_quota(v1), runtime.cpu_quota(none)) == (2, 1, None)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert runtime.cpu_quota(v2) is None
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert runtime.usable_cpus(v1) == 1 and runtime.usable_cpus(none) == 64
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert runtime.default_threads() == min(runtime.physical_cores(), runtime.usable_cpus())


def test_inference_threads_on_a_mac_are_its_cores_not_half_of_them(monkeypatch):
    # macOS has no sched_getaffinity: physical_cores() halved os.cpu_count() as if every core
    # had two hyper-threads, so ONNX Runtime ran on 4 of an M2's 8 cores. sysctl counts them.
    from mobilenetv2 import runtime

    answers = {"hw.physicalcpu": "8\n"}

    def run(command, **kwargs):
        value = answers.get(command[-1]) if command[0] == "sysctl" else None
        return subprocess.CompletedProcess(command, 0 if value else 1, value or "", "")

    monkeypatch.delattr(runtime.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    monkeypatch.setattr(subprocess, "run", run)
    assert runtime.physical_cores() == 8
    answers.clear()  # no sysctl answer: the old guess, half the logical CPUs
    assert runtime.physical_cores() == 4
    monkeypatch.setattr(runtime.sys, "platform", "win32")
    answers["hw.physicalcpu"] = "8\n"  # only asked on a Mac
    assert runtime.physical_cores() == 4


def test_the_runtimes_json_lines_are_strict_json(tmp_path, capsys, monkeypatch):
    # runtime.py's lines used json.dumps: a diverged model's NaN probability printed NaN,
    # which jq, JavaScript and Go refuse; --json of the CLI already wrote null.
    from mobilenetv2 import runtime

    assert runtime.json_text({"top_k": [{"probability": float("nan")}], "x": 1.5}) == (
        '{"top_k": [{"probability": null}], "x": 1.5}')
    monkeypatch.setattr(runtime, "Predictor", lambda model, threads=None: object())
    monkeypatch.setattr(runtime, "classify_files", lambda predictor, files, top_k, batch_size: [
        {"path": "a.png", "top_k": [{"class": "x", "probability": float("inf")}]}])
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert runtime.main(["model.onnx", str(image)]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": "a.png",
                                                    "top_k": [{"class": "x", "probability": None}]}
