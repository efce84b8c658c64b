"""Untrusted files: a checkpoint crafted to run code is refused everywhere, and never runs.

Every entry point that reads weights or checkpoints (the library loaders, ``train --resume``,
``train --pretrained``, ``eval``, ``predict``, ``export``, ``quantize`` and ``bench``) is given
a real armed pickle, as a plain pickle and inside a ``torch.save`` zip. The control test shows
the payload does write its marker file when unpickled normally; every other test asserts that
the marker never appears and that the CLI says so in one line with exit code 2.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mobilenetv2 import create_model, load_model, load_weights, runtime, save_weights
from mobilenetv2.checkpoint import load_checkpoint
from mobilenetv2.cli import main
from mobilenetv2.weights import WeightsError, read_weights

WRITERS = ["pickle", "torch.save"]


class RunsCodeWhenUnpickled:
    """Unpickling this runs ``exec(code)``, which creates ``marker``: any code could run."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


def write_armed(path: Path, marker: Path, writer: str, checkpoint: bool = False) -> Path:
    """A weights file (or, with ``checkpoint``, a checkpoint.pt) whose unpickling runs code."""
    payload = RunsCodeWhenUnpickled(marker)
    if checkpoint:
        content = {"version": 1, "model": {"stem.conv.weight": payload}, "state": {}}
    else:
        content = {"model": {"stem.conv.weight": torch.zeros(1), "classifier.weight": payload}}
    if writer == "torch.save":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))
    return path


def digits_weights(path: Path) -> Path:
    """Weights shaped like a digits run's: 1 channel, 16x16, 10 classes (no training)."""
    model = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    model.meta.update(mean=[0.5], std=[0.25], input_size=[1, 16, 16],
                      class_names=[str(i) for i in range(10)])
    save_weights(model, path)
    return path


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("writer", WRITERS)
def test_the_armed_file_really_runs_code_when_unpickled_normally(writer, tmp_path):
    marker = tmp_path / "marker"
    path = write_armed(tmp_path / "armed.pth", marker, writer)
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("writer", WRITERS)
def test_library_loaders_refuse_an_armed_file_without_running_it(writer, tmp_path):
    marker = tmp_path / "marker"
    path = write_armed(tmp_path / "armed.pth", marker, writer)
    for load in (read_weights, load_model,
                 lambda p: load_weights(create_model("mobilenet_v2_035"), p),
                 lambda p: create_model("mobilenet_v2_035", weights=p)):
        with pytest.raises(WeightsError, match="refused"):
            load(path)
    checkpoint = write_armed(tmp_path / "checkpoint.pt", marker, writer, checkpoint=True)
    with pytest.raises(WeightsError, match="refused"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "digit.png"
    Image.new("L", (16, 16), 128).save(path)
    return path


COMMANDS = {
    "eval": ["eval", "--weights", "{weights}", "--data", "digits"],
    "predict": ["predict", "--weights", "{weights}", "{image}"],
    "export": ["export", "--weights", "{weights}", "--format", "onnx", "--out", "{out}/m.onnx"],
    "quantize": ["quantize", "--weights", "{weights}", "--data", "digits", "--out",
                 "{out}/m.onnx"],
    "bench": ["bench", "--weights", "{weights}", "--batch-sizes", "1", "--rounds", "1",
              "--no-references", "--backends", "eager"],
    "train --pretrained": ["train", "--pretrained", "{weights}", "--resolution", "16", "--model",
                           "mobilenet_v2_035", "--epochs", "1", "--out", "{out}/run"],
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_refuses_an_armed_weights_file_in_one_line_without_running_it(
        command, writer, image, tmp_path, capsys):
    marker = tmp_path / "marker"
    weights = write_armed(tmp_path / "armed.pth", marker, writer)
    args = [a.format(weights=weights, image=image, out=tmp_path) for a in COMMANDS[command]]
    assert run_cli(*args) == 2
    line = one_error_line(capsys)
    assert "refused to load" in line and "armed.pth" in line
    assert not marker.exists()
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_resume_refuses_an_armed_checkpoint_without_running_it(writer, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"resolution": 16, "model": "mobilenet_v2_035", "epochs": 1, "out": str(run)}))
    marker = tmp_path / "marker"
    write_armed(run / "checkpoint.pt", marker, writer, checkpoint=True)
    assert run_cli("train", "--resume", run) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "refused to load" in last and "checkpoint.pt" in last
    assert not marker.exists()


def test_an_armed_file_named_onnx_is_refused_by_onnx_runtime_without_running_it(
        image, tmp_path, capsys):
    marker = tmp_path / "marker"
    weights = write_armed(tmp_path / "armed.onnx", marker, "pickle")
    assert run_cli("eval", "--weights", weights, "--data", "digits") == 2
    one_error_line(capsys)
    assert run_cli("predict", "--weights", weights, image) == 2
    one_error_line(capsys)
    assert not marker.exists()


def test_the_package_never_unpickles_without_weights_only():
    """A static guard: every torch.load call passes weights_only=True; no pickle.load(s)."""
    import mobilenetv2

    calls = 0
    for path in Path(mobilenetv2.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = getattr(node.func.value, "id", None)
            assert not (owner == "pickle" and node.func.attr in ("load", "loads")), path
            if owner == "torch" and node.func.attr == "load":
                calls += 1
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, f"{path}:{node.lineno}"
    assert calls >= 2  # weights.py and checkpoint.py: the guard looks at real code


def test_a_digits_shaped_file_is_accepted_by_the_same_commands(image, tmp_path, capsys):
    """The control for the CLI tests above: the same commands accept honest weights."""
    weights = digits_weights(tmp_path / "honest.safetensors")
    assert run_cli("predict", "--weights", weights, image, "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 1


# --------------------------------------------------------------------------------------------
# Forged metadata: files whose JSON or values were written to break the reader.


def forge_metadata(source: Path, path: Path, **replace: str) -> Path:
    """A copy of safetensors ``source`` whose metadata entries ``replace`` say other things."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(source)), str(path), metadata={**metadata, **replace})
    return path


@pytest.mark.parametrize("key", ["meta", "config"])
def test_metadata_nested_too_deep_for_json_is_refused_in_one_line(key, image, tmp_path, capsys):
    honest = digits_weights(tmp_path / "honest.safetensors")
    forged = forge_metadata(honest, tmp_path / "deep.safetensors",
                            **{key: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(WeightsError, match="damaged mobilenetv2 metadata"):
        read_weights(forged)
    assert run_cli("predict", "--weights", forged, image) == 2
    assert "deep.safetensors has damaged mobilenetv2 metadata" in one_error_line(capsys)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A digits-shaped model exported to ONNX (1x16x16 input, 10 classes)."""
    from mobilenetv2.export import export_model

    folder = tmp_path_factory.mktemp("exported")
    path = folder / "model.onnx"
    export_model(load_model(digits_weights(folder / "w.safetensors")).eval(), path)
    return path


def forge_onnx_metadata(source: Path, path: Path, **replace: Any) -> Path:
    """A copy of ONNX ``source`` whose metadata_props ``replace`` say other things (values
    that are not text are written as JSON, as export writes them)."""
    import onnx

    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    props |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in replace.items()}
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


FORGED_ONNX = {  # what the metadata says -> what the error names
    "input_size of 10^10 pixels": ({"input_size": [1, 100_000, 100_000]}, "input_size"),
    "resize of a million": ({"resize": 10**6}, "resize"),
    "zero std": ({"std": [0.0]}, "std"),
    "mean as text": ({"mean": "x"}, "mean"),
    "class_names as a dict": ({"class_names": {"a": 1}}, "class_names"),
    "class_names as text": ({"class_names": "0123456789"}, "class_names"),
    "unknown interpolation": ({"interpolation": "lanczos"}, "interpolation"),
    "nested too deep": ({"crop_pct": "[" * 100_000 + "]" * 100_000}, "crop_pct"),
    "another size": ({"input_size": [1, 12, 12]}, "metadata says it takes"),
    "resize below the crop": ({"resize": 8, "resize_mode": "shorter"}, "resize"),
    "pixels to a float input": ({"input_format": "pixels"}, "tensor(uint8)"),
}


@pytest.mark.parametrize("forgery", list(FORGED_ONNX))
def test_forged_onnx_metadata_is_refused_in_one_line_before_any_image_is_read(
        forgery, exported, image, tmp_path, capsys):
    from mobilenetv2.runtime import Predictor

    replace, named = FORGED_ONNX[forgery]
    forged = forge_onnx_metadata(exported, tmp_path / "forged.onnx", **replace)
    with pytest.raises(ValueError, match=re.escape(named)):
        Predictor(forged)
    assert run_cli("predict", "--weights", forged, image) == 2
    line = one_error_line(capsys)
    assert "forged.onnx" in line and named in line and "export it again" in line


# --------------------------------------------------------------------------------------------
# Terminal output: class names (a weights file's metadata, a data folder's names) and file
# names are anyone's text; printed raw, an escape sequence retitles or clears the terminal,
# rewrites what it shows, and a line break fakes an output line.

ESCAPES = ["\x1b]0;owned\x07zero", "\x1b[2Jone", "two\nfake.png: cat 99.0%"]


def test_class_names_cannot_send_terminal_escapes_or_fake_lines(image, tmp_path, capsys):
    data = tmp_path / "data"  # folder names are class names too, and may hold escapes
    for name in ESCAPES:
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (16, 16), 60 * i).save(data / name / f"{i}.png")
    model = create_model("mobilenet_v2_035", num_classes=3, in_channels=1, small_input=True)
    model.meta.update(mean=[0.5], std=[0.25], input_size=[1, 16, 16], class_names=ESCAPES)
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights)
    for args in (["predict", "--weights", weights, image],
                 ["summary", "--weights", weights],
                 ["eval", "--weights", weights, "--data", data, "--per-class"]):
        assert run_cli(*args) == 0
        captured = capsys.readouterr()
        assert "\x1b" not in captured.out + captured.err and "\x07" not in captured.out, args
        assert "\\x1b" in captured.out, args  # escaped, as Python writes it
        assert "\nfake.png" not in captured.out, args
    assert run_cli("predict", "--weights", weights, image, "--json") == 0
    names = {p["class"] for p in json.loads(capsys.readouterr().out)["predictions"][0]["top_k"]}
    assert names == set(ESCAPES)  # --json keeps them as they are


def test_file_names_cannot_send_terminal_escapes_in_warnings_or_errors(tmp_path, capsys):
    weights = digits_weights(tmp_path / "w.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (16, 16)).save(folder / "fine.png")
    (folder / "\x1b[2Jbroken.png").write_bytes(b"not an image")
    assert run_cli("predict", "--weights", weights, folder) == 2  # one unreadable image
    err = capsys.readouterr().err
    assert "\\x1b[2Jbroken.png" in err and "\x1b" not in err
    assert run_cli("predict", "--weights", tmp_path / "\x1b]0;owned\x07.safetensors",
                   folder / "fine.png") == 2
    line = one_error_line(capsys)
    assert "\\x1b]0;owned\\x07.safetensors" in line and "\x1b" not in line
    exported = tmp_path / "m.onnx"
    assert run_cli("export", "--weights", weights, "--out", exported) == 0
    capsys.readouterr()
    assert runtime.main([str(exported), str(folder)]) == 2  # the torch-free command
    err = capsys.readouterr().err
    assert "\\x1b[2Jbroken.png" in err and "\x1b" not in err


# --------------------------------------------------------------------------------------------
# Images: a long strip is a tiny file far below Pillow's decompression-bomb limit, which
# resizing the shorter side first would blow up to gigapixels.


def test_a_long_strip_is_resized_only_where_the_crop_keeps_it(monkeypatch):
    """1 x 100,000 pixels (a PNG of 372 bytes) took over 20 GB in predict and eval: resized to
    256 x 25,600,000 to keep 224 x 224. Here 2 x 3000, whose whole resize is 30 MB."""
    import numpy as np

    from mobilenetv2.data import eval_transform
    from mobilenetv2.runtime import MAX_RESIZE_OVER_CROP, preprocess_image

    meta = {"input_size": [3, 72, 72], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875,
            "interpolation": "bilinear", "resize_mode": "shorter", "resize": 82,
            "input_format": "pixels"}
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2, 3000, 3), np.uint8))
    sizes = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    pixels = preprocess_image(strip, meta)  # ONNX and ExecuTorch files' preprocessing
    normalized = eval_transform(meta)(strip)  # PyTorch weights'
    monkeypatch.undo()
    assert max(w * h for w, h in sizes) <= MAX_RESIZE_OVER_CROP * 72 * 72, sizes
    # The same sampling positions as resizing it whole: the same values, to one step of 255.
    whole = strip.resize((123_000, 82), Image.BILINEAR).crop((61_464, 5, 61_536, 77))
    expected = np.asarray(whole, dtype=np.int16)
    assert np.abs(pixels.astype(np.int16) - expected).max() <= 1
    from_tensor = (normalized * 0.25 + 0.5).mul(255).round().permute(1, 2, 0).numpy()
    assert np.abs(from_tensor - expected).max() <= 1


def test_a_billion_laughs_config_is_refused_in_one_short_line(tmp_path, capsys):
    """YAML's aliases let a few hundred bytes hold millions of items (safe_load builds them
    as shared references); the type error quoted the value whole. Here 9^7 = 4.8 million
    items, a 33 MB line; 9^9, a few more bytes of YAML, ran out of memory."""
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    config = tmp_path / "laughs.yaml"
    config.write_text(f"epochs: [{', '.join(levels)}]\n")
    assert len(config.read_bytes()) < 1000
    assert run_cli("train", "--config", config, "--out", tmp_path / "run") == 2
    line = one_error_line(capsys)
    assert line.startswith("mobilenetv2 train: error: epochs must be int, got [[") and len(line) < 300
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# A Hugging Face Hub config.json beside timm's weights: read for the preprocessing, from anyone.


def test_a_forged_hub_config_beside_timm_weights_cannot_ask_for_huge_images_or_crash(tmp_path):
    """The config.json beside a model.safetensors gave eval and predict their input size
    unchecked: a side of 60,000 resized a 32 x 32 image to 68,571 px (43 GB, MemoryError);
    JSON nested too deep raised RecursionError through load_model. A value out of bounds is
    left out (the default, as without the file); a file that does not parse is ignored."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    state = timm.create_model("mobilenetv2_050").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "mobilenetv2_050", "pretrained_cfg": {
        "input_size": [3, 60_000, 60_000], "mean": [float("nan"), 0.5, 0.5],
        "interpolation": "bicubic"}}))
    meta = load_model(weights).meta
    assert meta["interpolation"] == "bicubic"  # the valid keys are kept
    assert meta["input_size"] == [3, 224, 224] and all(0 < m < 1 for m in meta["mean"])
    config.write_text("[" * 200_000)
    assert load_model(weights).meta["input_size"] == [3, 224, 224]


# --------------------------------------------------------------------------------------------
# Files written: atomic_write's temporary name (.NAME.tmp-PID) is predictable.


def test_a_link_planted_under_a_temporary_name_is_not_followed(tmp_path):
    """The writers open the temporary by name, following links: a link planted in a shared or
    prepared folder under the name of the next save (``--out`` of a new run, ``export --out``,
    ``predict --out``) had the file it points to overwritten with the save's bytes."""
    import os

    from mobilenetv2.weights import atomic_write

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / f".config.json.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text('{"epochs": 1}'))
    assert victim.read_text() == "precious"
    assert (folder / "config.json").read_text() == '{"epochs": 1}'
    assert not (folder / "config.json").is_symlink() and os.listdir(folder) == ["config.json"]
    # predict --out FILE writes FILE.partial first, a name known in advance.
    (folder / "predictions.csv.partial").symlink_to(victim)
    image = folder / "x.png"
    Image.new("RGB", (16, 16)).save(image)
    assert run_cli("predict", "--weights", digits_weights(tmp_path / "w.safetensors"), image,
                   "--out", folder / "predictions.csv") == 0
    assert victim.read_text() == "precious"
    assert (folder / "predictions.csv").read_text().startswith("path,class,probability")


@pytest.mark.parametrize("fmt", ["exported", "torchscript"])
def test_exported_programs_name_no_path_of_the_exporting_machine(fmt, tmp_path):
    """torch.export kept each op's Python stack and TorchScript its source ranges, both by the
    absolute paths of the installed code (``/home/alice/.venv/...``), in files shipped in apps
    (ONNX files already dropped their exporter's stack traces)."""
    import warnings
    import zipfile

    import mobilenetv2
    from mobilenetv2.export import EXTRA_FILE, ExportConfig, export_model

    model = create_model("mobilenet_v2_035", num_classes=3, small_input=True)
    path = tmp_path / f"m.{fmt}"
    export_model(model, path, ExportConfig(format=fmt, resolution=32))  # (verified against eager)
    installed = str(Path(mobilenetv2.__file__).parent.parent).encode()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert not [n for n in names if installed in archive.read(n)]
        assert [n for n in names if n.endswith(EXTRA_FILE)]  # the metadata stays
    if fmt == "torchscript":
        with warnings.catch_warnings():  # torch.jit's deprecation (a FutureWarning) is not ours
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path))
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_a_run_json_nested_too_deep_is_started_afresh_not_a_traceback(tmp_path, caplog):
    """train --resume reads OUT/run.json to add its session: JSON nested too deep raised
    RecursionError (a traceback, and a run that could not be resumed)."""
    import logging

    from mobilenetv2.train import record_session

    (tmp_path / "run.json").write_text('{"sessions": ' + "[" * 100_000)
    with caplog.at_level(logging.WARNING):
        record_session(tmp_path, {"started": "now"}, new_run=False)
    assert "cannot be read" in caplog.text and len(caplog.text) < 600
    assert json.loads((tmp_path / "run.json").read_text()) == {"sessions": [{"started": "now"}]}


def test_a_keras_archive_that_unpacks_to_a_bomb_is_refused_before_reading_it(tmp_path):
    """A .keras zip of 300 KB whose model.weights.h5 unpacks to 300 MB: read whole into memory
    (h5py seeks), as up to 1 GiB was (a 1 MB file of 1 GiB took 2.8 GB and 19 s). Keras'
    largest MobileNetV2 is 25 MB."""
    import time
    import zipfile

    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(
            "model.weights.h5", "w", force_zip64=True) as f:
        for _ in range(300):
            f.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="its weights unpack to more than 256 MiB"):
        load_model(path)
    assert time.perf_counter() - start < 1.0
