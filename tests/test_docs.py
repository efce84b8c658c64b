"""The README's code runs as written, its command table names real flags, and the numbers
docs/architecture.md says it measured are the model's.

The first thing a user copies is the README's Python block; these tests run it (with stand-ins,
written here, for the files it loads: torchvision's, the walk-through's and Keras' weights, an
image) and check the results its comments promise.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import mobilenetv2
from mobilenetv2.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture
def readme_files(tmp_path, monkeypatch):
    """The files the README's Python block opens, written in the peers' own formats."""
    from mobilenetv2.keras_weights import save_keras_weights

    monkeypatch.chdir(tmp_path)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), "mobilenet_v2-b0353104.pth")
    torch.save(mobilenetv2.create_model("seed", input_width=224).state_dict(), "walkthrough.pth")
    keras_like = mobilenetv2.create_model("mobilenet_v2_100", tf_padding=True, bn_eps=1e-3)
    save_keras_weights(keras_like, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5")
    Image.new("RGB", (320, 240), (200, 120, 40)).save("cat.jpg")
    return tmp_path


def test_the_readme_python_block_runs_and_gives_what_its_comments_say(readme_files):
    (block,) = code_blocks(README.read_text(), "python")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 -- our own README
    assert namespace["logits"].shape == (2, 10)
    # The feature maps' strides, from the comment "strides 2, 4, 8, 16, 32".
    maps = namespace["features"](torch.randn(1, 3, 224, 224))
    assert [224 // m.shape[-1] for m in maps] == [2, 4, 8, 16, 32]
    assert namespace["x"].shape == (3, 224, 224)
    probs, top3 = namespace["probs"], namespace["top3"]  # (the stand-in's are all but equal)
    assert len(probs) == 1000 and abs(sum(probs) - 1) < 1e-4
    assert len(top3) == 3 and top3[0][0] == max(probs) and top3[2][0] <= top3[1][0] <= top3[0][0]
    assert all(name in namespace["tv"].meta["class_names"] for _, name in top3)
    assert len(namespace["same"].meta["class_names"]) == 1000
    listed = re.search(r"^mobilenetv2\.list_models\(\)\n((?:# .*\n)+)", block, flags=re.M)
    assert ast.literal_eval(" ".join(line[2:] for line in listed.group(1).splitlines())) == (
        mobilenetv2.list_models())
    assert namespace["keras"].config["tf_padding"] is True
    assert namespace["result"].epochs == 2 and len(namespace["mine"].meta["class_names"]) == 10
    (guess,) = namespace["guess"]
    assert guess["path"] == "cat.jpg" and len(guess["top_k"]) == 3


def test_every_flag_in_the_readme_command_table_exists(capsys):
    rows = [line for line in README.read_text().splitlines()
            if line.startswith("| `mobilenetv2 ")]
    assert len(rows) >= 8
    for row in rows:
        command = row.split("`")[1]
        subcommand = command.split()[1]
        with pytest.raises(SystemExit) as done:
            main([subcommand, "-h"])
        assert done.value.code == 0
        usage = capsys.readouterr().out
        for flag in re.findall(r"--[a-z][a-z0-9-]*", command):
            assert flag in usage, f"README's `{command}`: {subcommand} has no {flag}"


def test_the_readme_starts_with_the_two_commands():
    first = code_blocks(README.read_text(), "bash")[0].splitlines()
    commands = [line for line in first if line and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/mobilenetv2 train",
        'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest',
    ]


def test_torch_hub_loads_every_registered_model_from_the_repository():
    import importlib.util

    root = README.parent
    spec = importlib.util.spec_from_file_location("hubconf", root / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and n[0] != "_"]
    # torch.hub.list's rule; with torchvision's name, so its hub calls need only the repository
    assert entry_points == sorted([*mobilenetv2.list_models(), "mobilenet_v2"])
    model = torch.hub.load(str(root), "mobilenet_v2_050", source="local", num_classes=10,
                           small_input=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "create_model('mobilenet_v2_050'" in hubconf.mobilenet_v2_050.__doc__
    # torchvision's call: its name and its builder's progress= argument
    model = torch.hub.load(str(root), "mobilenet_v2", source="local", weights=None,
                           progress=False)
    assert model.config["name"] == "mobilenet_v2_100"


ARCHITECTURE = README.parent / "docs" / "architecture.md"
DEPLOY = README.parent / "docs" / "deploy.md"


def test_deploy_md_predictor_block_runs_and_names_the_classes_as_predict_does(tmp_path,
                                                                             monkeypatch):
    import numpy as np

    from mobilenetv2.export import ExportConfig, export_model
    from mobilenetv2.runtime import top_classes

    (block,) = [b for b in code_blocks(DEPLOY.read_text(), "python")
                if "predictor = Predictor(" in b]
    monkeypatch.chdir(tmp_path)
    model = mobilenetv2.create_model("mobilenet_v2_035", num_classes=3, small_input=True).eval()
    model.meta.update(input_size=[3, 32, 32], class_names=["bird", "cat", "dog"])
    export_model(model, "model_int8.onnx", ExportConfig())  # the block's name; fp32 will do
    Image.new("RGB", (40, 30), (200, 120, 40)).save("cat.jpg")
    Image.new("RGB", (30, 40), (20, 60, 240)).save("dog.png")
    namespace: dict = {}
    exec(compile(block, str(DEPLOY), "exec"), namespace)  # noqa: S102 -- our own docs
    assert namespace["batch"].shape == (2, 3, 32, 32) and namespace["batch"].dtype == np.float32
    assert namespace["logits"].shape == (2, 3)
    # top_classes' indices, named by the metadata, are predict's answers
    predicted = namespace["predictor"].predict(["cat.jpg", "dog.png"], top_k=3)
    names = namespace["predictor"].meta["class_names"]
    assert [[(names[i], p) for i, p in row] for row in top_classes(namespace["logits"], 3)] == (
        predicted)


def doc_table(heading: str) -> list[list[str]]:
    """The cells of the first table under ``heading`` in docs/architecture.md, header and
    separator left out."""
    section = ARCHITECTURE.read_text().split(heading, 1)[1]
    lines = re.search(r"^(\|.*\n)+", section, flags=re.M).group(0).splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def receptive_fields(model: mobilenetv2.MobileNetV2, side: int) -> list[int]:
    """How many input pixels across reach one central output of the stem and of each row,
    measured by autograd on a linear copy of the network with positive weights (so no path
    is cut by an activation and no two paths cancel)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1 / module.weight[0].numel())  # keeps values near 1
    model.eval()
    x = torch.zeros(1, 3, side, side, requires_grad=True)
    outputs = [model.stem(x)]
    for stage in model.stages:
        outputs.append(stage(outputs[-1]))
    fields = []
    for out in outputs:
        centre = out.shape[-1] // 2
        (grad,) = torch.autograd.grad(out[0, :, centre, centre].sum(), x, retain_graph=True)
        reached = grad[0].abs().sum(0).sum(0).nonzero().flatten()
        fields.append(int(reached.max() - reached.min() + 1))
    return fields


def test_architecture_md_receptive_fields_are_the_models():
    rows = doc_table("### Receptive field")
    assert [row[0] for row in rows] == ["stem"] + [f"row {i}" for i in range(1, 8)]
    # Width changes no field: the narrowest model is the cheapest to differentiate.
    linear = {"act_layer": torch.nn.Identity, "num_classes": 0}
    model = mobilenetv2.create_model("mobilenet_v2_035", **linear)
    assert [int(row[3]) for row in rows] == receptive_fields(model, 576)
    assert [int(row[2]) for row in rows[1:]] == [i["reduction"] for i in model.row_info]
    small = mobilenetv2.create_model("mobilenet_v2_035", small_input=True, **linear)
    assert [row[4] for row in rows] == [
        f"{stride}, {field}" for stride, field in zip(
            [1] + [i["reduction"] for i in small.row_info], receptive_fields(small, 160),
            strict=True)]
    dilated = mobilenetv2.create_model("mobilenet_v2_035", output_stride=16, **linear)
    assert receptive_fields(dilated, 576) == [int(row[3]) for row in rows]  # dilation keeps them


def test_architecture_md_compares_the_papers_numbers_with_the_models():
    import torchinfo

    rows = doc_table("### The paper's numbers and ours")
    assert [row[0] for row in rows] == ["`mobilenet_v2_100`", "`mobilenet_v2_140`"]
    for name, _, _, ours in rows:
        model = mobilenetv2.create_model(name.strip("`"))
        stats = torchinfo.summary(model, input_size=(1, 3, 224, 224), verbose=0, device="cpu")
        assert ours == f"{stats.total_mult_adds / 1e6:.1f} M, {stats.total_params:,}"
    assert rows[1][1] == "585 M, 6.9 M"  # Table 4's, which the text explains away
    # "17 blocks, not 19": Table 2's n column, and what the model builds.
    blocks = sum(n for _, _, n, _ in mobilenetv2.model.INVERTED_RESIDUAL_SETTING)
    assert blocks == 17 == sum(len(stage) for stage in mobilenetv2.create_model("mobilenet_v2_100").stages)
    assert "1 + 2 + 3 + 4 + 3 + 3 + 1 = 17" in ARCHITECTURE.read_text()


def test_architecture_md_names_the_summary_lines_as_the_summary_prints_them(capsys):
    # "Each line names its module as the table does: `A` under `B` is `stages.1`."
    sentence = ARCHITECTURE.read_text().split("Each line\nnames its module as the table does:")[1]
    quoted = re.findall(r"`([^`]+)`", sentence.split(".\n")[0])
    assert len(quoted) == 3 and quoted[2] == "stages.1"
    assert main(["summary", "--depth", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row, stages = (next(i for i, line in enumerate(lines) if f"─{name} " in line)
                   for name in quoted[:2])
    assert stages < row  # the row's line is under the stages' line


def test_architecture_md_block_walkthrough_runs_and_prints_what_it_says():
    (block,) = [b for b in code_blocks(ARCHITECTURE.read_text(), "python")
                if "block = model.stages[1][1]" in b]
    namespace: dict = {}
    exec(compile(block, str(ARCHITECTURE), "exec"), namespace)  # noqa: S102 -- our own docs
    assert namespace["wide"].shape == (1, 144, 56, 56)
    assert namespace["thin"].shape == (1, 24, 56, 56) and (namespace["thin"] < 0).any()
    assert "expand_ratio=6, stride=1, use_residual=True" in repr(namespace["block"])


def test_architecture_md_counts_table_7s_mobile_deeplab_as_the_paper_does():
    import torchinfo

    (block,) = [b for b in code_blocks(ARCHITECTURE.read_text(), "python")
                if "class DeepLabV3NoASPP" in b]
    namespace: dict = {}
    exec(compile(block, str(ARCHITECTURE), "exec"), namespace)  # noqa: S102 -- our own docs
    model = namespace["DeepLabV3NoASPP"]()
    stats = torchinfo.summary(model, input_size=(1, 3, 513, 513), verbose=0, device="cpu")
    (paper, ours) = doc_table("**The paper's Table 7, counted.**")
    assert paper[1:] == ["2.11 M", "2.75 B"]
    assert ours[1:] == [f"{stats.total_params:,}", f"{stats.total_mult_adds / 1e9:.2f} B"]
    assert model.eval()(torch.zeros(1, 3, 65, 65)).shape == (1, 21, 5, 5)  # 65 / 16, rounded up


def test_architecture_md_detection_block_trains_and_detects_with_torchvisions_detectors():
    from torchvision.models.detection import FasterRCNN, RetinaNet

    (block,) = [b for b in code_blocks(ARCHITECTURE.read_text(), "python")
                if "class MobileNetV2FPN" in b]
    namespace: dict = {}
    exec(compile(block, str(ARCHITECTURE), "exec"), namespace)  # noqa: S102 -- our own docs
    maps = namespace["backbone"](torch.zeros(1, 3, 128, 128))
    assert {name: tuple(m.shape[1:]) for name, m in maps.items()} == {
        "0": (256, 32, 32), "1": (256, 16, 16), "2": (256, 8, 8), "3": (256, 4, 4),
        "pool": (256, 2, 2)}
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
                "labels": torch.tensor([2, 1])}]
    for kind in (FasterRCNN, RetinaNet):  # one training step's losses, then detections
        detector = kind(namespace["MobileNetV2FPN"](64, norm_layer=namespace["FrozenBatchNorm2d"]),
                        num_classes=3, min_size=64, max_size=96)
        losses = detector.train()(images, targets)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        assert detector.backbone.body.stages[0][0].project.conv.weight.grad is not None
        with torch.no_grad():
            detections = detector.eval()(images)
        assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


def test_the_readmes_reading_path_names_code_that_exists():
    text = README.read_text()
    path = text[text.index("**Reading it beside the paper**"):].split("\n\n")[0]
    for target in re.findall(r"\]\(([^)#]+)\)", path):
        assert (README.parent / target).exists(), target
    for name in ("make_divisible", "ConvNormAct"):
        assert hasattr(mobilenetv2.layers, name)
    for name in ("InvertedResidual", "MobileNetV2", "INVERTED_RESIDUAL_SETTING"):
        assert hasattr(mobilenetv2.model, name)
    assert "mobilenetv2 summary --depth 2" in path


def _public_api() -> list[tuple[str, object]]:
    """Every name in ``mobilenetv2.__all__`` and the public methods its classes define."""
    import inspect

    items: list[tuple[str, object]] = []
    for name in mobilenetv2.__all__:
        obj = getattr(mobilenetv2, name)
        items.append((name, obj))
        if inspect.isclass(obj):
            items += [(f"{name}.{attr}", value) for attr, value in vars(obj).items()
                      if not attr.startswith("_") and callable(value)]
    return items


@pytest.mark.parametrize(("name", "obj"), _public_api(), ids=[n for n, _ in _public_api()])
def test_every_public_name_and_method_has_a_docstring(name: str, obj: object) -> None:
    # help(), IDEs and the docs show them: an undocumented public name is an unfinished API.
    import inspect

    assert inspect.getdoc(obj), f"{name} has no docstring"


def test_reliability_md_says_which_tests_the_default_run_selects() -> None:
    pyproject = (README.parent / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    selected = re.search(r"^addopts = .*-m '([^']+)'", pyproject, flags=re.M)
    text = (README.parent / "docs" / "reliability.md").read_text()
    assert f"(`pytest`, which means `-m '{selected.group(1)}'`)" in text


def test_the_version_is_written_once_and_packaging_reads_it() -> None:
    # A copy in pyproject.toml and another in __init__.py drift apart at the first release:
    # pip would say one version, `mobilenetv2 --version` and exported files another.
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(README.parent / "pyproject.toml", expand=True)["project"]
    assert "version" in project.get("dynamic", [])  # read from mobilenetv2.__version__
    assert project["version"] == mobilenetv2.__version__


def test_every_environment_variable_the_package_reads_or_sets_is_documented() -> None:
    # A container or a scheduler sets them: OMP_NUM_THREADS changes a --deterministic run's
    # weights, TORCH_HOME where the weights tags are found, TORCHELASTIC_RESTART_COUNT whether
    # --out resumes. None was listed anywhere.
    from mobilenetv2.train import RECORDED_VARIABLES

    source = README.parent / "src" / "mobilenetv2"
    used = set()
    for path in source.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r'environ(?:\.get|\.setdefault)?[(\[]"([A-Z_]+)"', text))
        used |= set(re.findall(r'environ, ([A-Z_]+)=', text))
    used |= set(RECORDED_VARIABLES) | {"TORCH_HOME"}  # (torch.hub's, for the tags)
    assert {"OMP_NUM_THREADS", "RANK", "TERM"} <= used  # the search finds them
    docs = (README.parent / "docs" / "training.md").read_text(encoding="utf-8")
    table = docs[docs.index("The environment variables mobilenetv2 reads or sets:"):]
    table = table[:table.index("\n\n", table.index("|"))]
    documented = set(re.findall(r"`([A-Z_]+)`", table))
    assert sorted(used - documented) == []


def test_export_json_keys_are_the_documented_ones(tmp_path, capsys) -> None:
    # README promises --json keys semantic versioning from 1.0; export's were written nowhere.
    from mobilenetv2 import create_model, save_weights

    model = create_model("mobilenet_v2_035", num_classes=2, small_input=True)
    model.meta["input_size"] = [3, 16, 16]
    save_weights(model, tmp_path / "w.safetensors")
    assert main(["export", "--weights", str(tmp_path / "w.safetensors"), "--out",
                 str(tmp_path / "m.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    deploy = (README.parent / "docs" / "deploy.md").read_text(encoding="utf-8")
    said = deploy[deploy.index("`--json` prints one JSON object instead: `path`"):]
    said = said[:said.index("\n\n")]
    assert set(report) | set(report["max_abs_diff"]) <= set(re.findall(r"`([a-z_]+)`", said))
