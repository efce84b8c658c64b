"""Knowledge distillation (``train --teacher``): the loss, the teacher's inputs and classes, the
trainer's step, and the command end to end."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from mobilenetv2 import create_model, save_weights
from mobilenetv2.cli import main
from mobilenetv2.distill import Teacher, distillation_loss, load_teacher
from mobilenetv2.distributed import DistEnv
from mobilenetv2.engine import StepState, train_one_epoch
from mobilenetv2.weights import WeightsError, file_sha256

TINY = ["--resolution", "16", "--model", "mobilenet_v2_035", "--batch-size", "128", "--epochs", "1",
        "--seed", "0", "--no-tensorboard", "--device", "cpu", "--deterministic"]


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def digits_like(path, *, classes=None, mean=(0.5,), std=(0.25,), channels=1, seed=0, **kwargs):
    """Untrained weights shaped like a digits run's, with the given metadata."""
    torch.manual_seed(seed)
    classes = classes or [str(i) for i in range(10)]
    model = create_model("mobilenet_v2_035", num_classes=len(classes), in_channels=channels,
                         small_input=True, **kwargs)
    model.meta.update(mean=list(mean), std=list(std), input_size=[channels, 16, 16],
                      class_names=list(classes))
    save_weights(model, path)
    return path


def test_the_loss_is_t_squared_times_the_kl_divergence_summed_over_the_batch():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (1.0, 4.0):
        p = F.softmax(teacher / t, dim=1)
        by_hand = (p * (p.log() - F.log_softmax(student / t, dim=1))).sum() * t * t
        torch.testing.assert_close(distillation_loss(student, teacher, t), by_hand)
    assert distillation_loss(teacher, teacher, 2.0).abs() < 1e-6
    # low precision logits (autocast) are taken in float32
    half = distillation_loss(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert half.dtype == torch.float32


def test_the_teacher_sees_the_pixels_the_student_sees_in_its_own_normalisation(tmp_path):
    # The teacher was trained on [-1, 1] inputs (Keras' convention), the data is normalised with
    # mean 0.5 / std 0.25: the same pixels must reach the teacher as its own preprocessing.
    path = digits_like(tmp_path / "t.safetensors", mean=(0.5,), std=(0.5,))
    teacher, info = load_teacher(path, class_names=[str(i) for i in range(10)], mean=(0.4,),
                                 std=(0.25,), in_channels=1)
    pixels = torch.rand(4, 1, 16, 16)
    reference = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    reference.load_state_dict(load_file(path))
    reference.eval()
    expected = reference((pixels - 0.5) / 0.5)
    torch.testing.assert_close(teacher((pixels - 0.4) / 0.25), expected, rtol=1e-4, atol=1e-5)
    assert info.sha256 == file_sha256(path) and info.classes == "the same classes"
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training  # always as at inference


def test_the_teachers_classes_pair_with_the_datas_by_name_and_may_be_more(tmp_path):
    names = ["cat", "dog", "fox", "owl"]
    path = digits_like(tmp_path / "t.safetensors", classes=names)
    teacher, info = load_teacher(path, class_names=["Owl", "cat"], mean=(0.5,), std=(0.25,),
                                 in_channels=1)
    images = torch.randn(3, 1, 16, 16)
    all_outputs = teacher.model(images)
    torch.testing.assert_close(teacher(images), all_outputs[:, [3, 0]])
    assert info.classes == "classes paired by name, ignoring case"
    with pytest.raises(ValueError, match="1 of the 2 classes of the data are not classes of "
                                         "--teacher"):
        load_teacher(path, class_names=["cat", "zebra"], mean=(0.5,), std=(0.25,), in_channels=1)


def test_a_teacher_that_cannot_teach_this_data_is_refused_in_one_line(tmp_path):
    good = dict(class_names=[str(i) for i in range(10)], mean=(0.5,), std=(0.25,), in_channels=1)
    with pytest.raises(FileNotFoundError, match="--teacher: weights file not found"):
        load_teacher(tmp_path / "none.safetensors", **good)
    rgb = digits_like(tmp_path / "rgb.safetensors", channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ValueError, match="takes 3-channel images but the data has 1"):
        load_teacher(rgb, **good)
    seed = create_model("seed", input_width=32, num_classes=10, in_channels=1)
    save_weights(seed, tmp_path / "seed.safetensors")
    with pytest.raises(ValueError, match="seed variant built for 32x32 images, but this run's "
                                         "are 16: pass --resolution 32"):
        load_teacher(tmp_path / "seed.safetensors", resolutions={16}, **good)
    features = create_model("mobilenet_v2_035", features_only=True, in_channels=1)
    save_weights(features, tmp_path / "features.safetensors")
    with pytest.raises(ValueError, match="feature extractor"):
        load_teacher(tmp_path / "features.safetensors", **good)
    (tmp_path / "junk.safetensors").write_bytes(b"not weights at all")
    with pytest.raises(WeightsError):
        load_teacher(tmp_path / "junk.safetensors", **good)


def test_a_teacher_of_probabilities_teaches_their_logarithms():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1))
    teacher = Teacher(model, probabilities=True)
    x = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(F.softmax(teacher(x), dim=1), model(x))


def test_one_step_takes_the_gradient_of_the_mixed_loss(tmp_path):
    """train_one_epoch's step equals one SGD step on (1 - w) CE + w T^2 KL, by hand."""
    torch.manual_seed(0)
    student = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True,
                           dropout=0.0)
    teacher = Teacher(create_model("mobilenet_v2_050", num_classes=10, in_channels=1,
                                   small_input=True))
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    w, t, lr = 0.7, 3.0, 0.5

    by_hand = copy.deepcopy(student).train()
    logits = by_hand(images)
    soft = F.softmax(teacher(images) / t, dim=1)
    kd = (soft * (soft.log() - F.log_softmax(logits / t, dim=1))).sum(1).mean() * t * t
    ((1 - w) * F.cross_entropy(logits, labels) + w * kd).backward()
    with torch.no_grad():
        for p in by_hand.parameters():
            p -= lr * p.grad

    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loader = [(images, labels, 0)]
    train_one_epoch(student, loader, optimizer, scheduler, StepState(), global_batch_sizes=[8],
                    device=torch.device("cpu"), env=DistEnv(), teacher=teacher,
                    distill_weight=w, distill_temperature=t)
    for (name, a), b in zip(student.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_distillation_from_the_command_line_records_the_teacher_and_resumes_to_the_bit(
        tmp_path, capsys, teacher_file):
    teacher = tmp_path / "teacher"  # a copy: the test replaces the file and puts it back
    teacher.mkdir()
    shutil.copy(teacher_file, teacher / "best.safetensors")
    distill = [*TINY, "--teacher", teacher / "best.safetensors", "--distill-weight", "0.8",
               "--distill-temperature", "2"]
    capsys.readouterr()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli("train", *distill, "--epochs", "2", "--out", whole) == 0
    err = capsys.readouterr().err
    assert "(mobilenet_v2_050, the same classes): top-1" in err
    assert "distilling with weight 0.8 at temperature 2" in err
    config = json.loads((whole / "config.json").read_text())
    assert (config["teacher"], config["distill_weight"], config["distill_temperature"]) == (
        str(teacher / "best.safetensors"), 0.8, 2.0)
    with safe_open(whole / "best.safetensors", "pt") as f:
        recorded = json.loads(f.metadata()["meta"])["distilled_from"]
    assert recorded == {"file": "best.safetensors", "model": "mobilenet_v2_050",
                        "sha256": file_sha256(teacher / "best.safetensors")}

    # Stopped after epoch 1 and resumed: the same weights as the uninterrupted run. The
    # teacher draws no random numbers and runs as at inference.
    assert run_cli("train", *distill, "--out", parts) == 0
    assert run_cli("train", "--resume", parts, "--epochs", "2") == 0
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    # The teacher is part of the run: another file under its name is refused on resume.
    original = (teacher / "best.safetensors").read_bytes()
    digits_like(teacher / "best.safetensors", seed=1)
    capsys.readouterr()
    assert run_cli("train", "--resume", parts, "--epochs", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: the teacher file is not the one" in err[-1] and "Traceback" not in err, err
    assert json.loads((parts / "config.json").read_text())["epochs"] == 2  # nothing changed
    (teacher / "best.safetensors").write_bytes(original)
    assert run_cli("train", "--resume", parts, "--epochs", "3") == 0


def test_the_student_learns_the_teachers_answers_over_the_labels():
    """With the whole loss on the teacher (weight 1), the student answers as the teacher does,
    even where every label says otherwise: here the teacher tells bright images (class 1)
    from dark ones (class 2), and every label is class 0."""
    class Brightness(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(m), 6 * m, -6 * m], dim=1)

    def batch(g, n=32):
        sign = torch.randint(0, 2, (n, 1, 1, 1), generator=g) * 2.0 - 1
        return sign + 0.5 * torch.randn(n, 1, 16, 16, generator=g)

    g = torch.Generator().manual_seed(0)
    teacher = Teacher(Brightness())
    student = create_model("mobilenet_v2_035", num_classes=3, in_channels=1, small_input=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # 80 steps: at 40, whether the student had learnt yet depended on its initialisation and
    # on the CPU (0.51-1.0 agreement over four seeds on an AMD EPYC; it had passed on others).
    loader = [(batch(g), torch.zeros(32, dtype=torch.long), 0) for _ in range(80)]
    train_one_epoch(student, loader, optimizer, scheduler, StepState(),
                    global_batch_sizes=[32] * len(loader), device=torch.device("cpu"),
                    env=DistEnv(), teacher=teacher, distill_weight=1.0)
    images = batch(g, 256)
    agree = (student.eval()(images).argmax(1) == teacher(images).argmax(1)).float().mean()
    assert agree > 0.95


@pytest.mark.parametrize("args, needle", [
    (["--distill-weight", "0.5"], "shape the loss of a teacher: add --teacher WEIGHTS"),
    (["--teacher", "{t}", "--distill-weight", "1.5"], "--distill-weight must be in (0, 1]"),
    (["--teacher", "{t}", "--distill-temperature", "0"], "--distill-temperature"),
    (["--teacher", "{t}", "--distill-temperature", "inf"], "--distill-temperature must be a finite"),
    (["--teacher", "{none}"], "--teacher: weights file not found"),
    (["--teacher-model", "resnet50"], "--teacher-model names the architecture of a teacher's "
                                      "weights: add --teacher WEIGHTS"),
    (["--teacher-use-ema"], "--teacher-use-ema takes the EMA weights of a --teacher training "
                            "checkpoint: add --teacher WEIGHTS"),
    (["--teacher", "{t}", "--teacher-use-ema"], "holds one set of weights, no EMA weights: drop "
                                                "use_ema=True (--use-ema, --teacher-use-ema)"),
])
def test_bad_distillation_options_are_one_line_and_exit_2(args, needle, tmp_path, capsys):
    t = digits_like(tmp_path / "t.safetensors")
    args = [a.format(t=t, none=tmp_path / "none.safetensors") for a in args]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit from within
        raise SystemExit(run_cli("train", *TINY, *args, "--out", tmp_path / "run"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and needle in err.splitlines()[-1], err


def test_a_folder_of_classes_pairs_with_an_imagenet_teacher_by_wordnet_id(tmp_path, capsys):
    # ImageNet-1k weights (here untrained, with ImageNet's names) teach a two-class subset
    # whose folders are named by WordNet id, as Imagenette's are.
    from mobilenetv2.data import imagenet_synsets
    from mobilenetv2.weights import imagenet_categories

    model = create_model("mobilenet_v2_035", num_classes=1000)
    model.meta["class_names"] = imagenet_categories()
    save_weights(model, tmp_path / "imagenet.safetensors")
    synsets = imagenet_synsets()
    for split in ("train", "val"):
        for c, wnid in enumerate((synsets[7], synsets[3])):
            folder = tmp_path / "data" / split / wnid
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (30 * c + i, 60, 90)).save(folder / f"{i}.png")
    assert run_cli("train", "--data", tmp_path / "data", "--resolution", "32", "--model",
                   "mobilenet_v2_035", "--batch-size", "4", "--epochs", "1", "--no-tensorboard",
                   "--workers", "0", "--teacher", tmp_path / "imagenet.safetensors",
                   "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "(mobilenet_v2_035, classes paired by WordNet id): top-1" in err


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert run_cli("train", *TINY, "--model", "mobilenet_v2_050", "--out", out) == 0
    return out / "best.safetensors"


def test_teacher_use_ema_teaches_with_the_ema_weights_of_a_training_checkpoint(
        teacher_file, tmp_path, capsys):
    # A checkpoint as our checkpoint.pt keeps it: raw weights (the classifier's rows rolled) and
    # an EMA, here the teacher's own weights.
    from mobilenetv2 import load_model

    trained = load_model(teacher_file)
    raw = {k: v.clone() for k, v in trained.state_dict().items()}
    raw["classifier.weight"], raw["classifier.bias"] = (
        raw["classifier.weight"].roll(1, 0), raw["classifier.bias"].roll(1, 0))
    torch.save({"model": raw, "ema": {"module": trained.state_dict(), "updates": 10},
                "model_config": trained.config, "model_meta": trained.meta}, tmp_path / "t.pt")

    def train_err(*flags: object) -> str:
        capsys.readouterr()
        out = tmp_path / f"run{len(flags)}"
        assert run_cli("train", *TINY, "--teacher", tmp_path / "t.pt", *flags, "--out", out) == 0
        return capsys.readouterr().err

    # (first: the notice is logged once per file and process)
    assert "holds EMA weights too (ema): these are its raw weights" in train_err()
    assert "(mobilenet_v2_050, its EMA weights, the same classes): top-1" in train_err(
        "--teacher-use-ema")
    with safe_open(tmp_path / "run1" / "best.safetensors", "pt") as f:
        assert json.loads(f.metadata()["meta"])["distilled_from"]["weights"] == "ema"
    assert json.loads((tmp_path / "run1" / "config.json").read_text())["teacher_use_ema"] is True

    digits = {"class_names": [str(i) for i in range(10)], "mean": tuple(trained.meta["mean"]),
              "std": tuple(trained.meta["std"]), "in_channels": 1}
    for use_ema, want in ((False, raw), (True, trained.state_dict())):
        teacher, info = load_teacher(tmp_path / "t.pt", use_ema=use_ema, **digits)
        got = teacher.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want) and info.ema is use_ema


def test_teacher_use_ema_reads_timms_state_dict_ema_for_a_teacher_of_another_architecture(tmp_path):
    from test_weights import timm_train_checkpoint

    path, model, ema = timm_train_checkpoint(tmp_path)  # written by timm's CheckpointSaver
    for use_ema, want in ((False, model), (True, ema)):
        teacher, info = load_teacher(path, class_names=[str(i) for i in range(10)], mean=(0.5,) * 3,
                                     std=(0.5,) * 3, in_channels=3, model_name="timm:mobilenetv2_035",
                                     use_ema=use_ema)
        got, want = teacher.model.state_dict(), want.state_dict()
        assert got.keys() == want.keys() and info.ema is use_ema
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     ema.state_dict().values(), strict=True))


def test_a_run_stopped_mid_epoch_with_mixup_ema_and_accumulation_resumes_to_the_bit(
        teacher_file, tmp_path, monkeypatch):
    from mobilenetv2 import train as train_module

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*TINY, "--epochs", "2", "--batch-size", "256", "--teacher", teacher_file,
              "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--ema", "0.9",
              "--grad-accum-steps", "2", "--distill-temperature", "2"]
    assert run_cli("train", *common, "--out", whole) == 0
    original = train_module.StopSignal.__call__

    def stop_at_step_2(self):
        if getattr(self, "_steps", 0) == 2:
            self.requested = signal.SIGTERM
        self._steps = getattr(self, "_steps", 0) + 1
        return original(self)

    monkeypatch.setattr(train_module.StopSignal, "__call__", stop_at_step_2)
    assert run_cli("train", *common, "--out", parts) == 128 + signal.SIGTERM
    monkeypatch.setattr(train_module.StopSignal, "__call__", original)
    assert run_cli("train", "--resume", parts) == 0
    a, b = load_file(whole / "last.safetensors"), load_file(parts / "last.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_teacher_missing_on_resume_is_named_as_the_run_stored_it(teacher_file, tmp_path, capsys):
    copy = tmp_path / "t.safetensors"
    copy.write_bytes(teacher_file.read_bytes())
    assert run_cli("train", *TINY, "--teacher", copy, "--out", tmp_path / "run") == 0
    copy.unlink()
    capsys.readouterr()
    assert run_cli("train", "--resume", tmp_path / "run", "--epochs", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "config.json" in err[-1] and "pass --teacher" in err[-1], err[-1]


def test_metadata_without_statistics_and_a_teachers_own_advice(tmp_path):
    classes = [str(i) for i in range(10)]
    model = create_model("mobilenet_v2_035", num_classes=10, in_channels=1, small_input=True)
    model.meta.update(mean=None, std=None, class_names=classes)  # allowed by the loader
    save_weights(model, tmp_path / "nomean.safetensors")
    teacher, _ = load_teacher(tmp_path / "nomean.safetensors", class_names=classes, mean=(0.5,),
                              std=(0.25,), in_channels=1)
    assert teacher.scale is None  # taken as the data's statistics
    model.meta["class_names"] = list("abcdefghij")
    save_weights(model, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="use a teacher trained on these classes"):
        load_teacher(tmp_path / "other.safetensors", class_names=classes, mean=(0.5,),
                     std=(0.25,), in_channels=1, folders=False)


def two_class_folder(root: Path, names: tuple[str, str] = ("0", "1")) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * c + i, 60, 90)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("kind", ["torchvision .pth", "Keras .h5", "seed variant of probabilities"])
def test_every_kind_of_weights_file_teaches(kind, tmp_path, capsys):
    import torchvision

    from mobilenetv2 import MobileNetV2, save_keras_weights

    data = two_class_folder(tmp_path / "data")
    resolution = "32"
    if kind == "torchvision .pth":  # no class names: paired by position
        teacher = tmp_path / "tv.pth"
        torch.save(torchvision.models.mobilenet_v2(num_classes=2).state_dict(), teacher)
        expected = "classes paired by position"
    elif kind == "Keras .h5":  # TensorFlow's padding; [-1, 1] inputs
        teacher = tmp_path / "k.h5"
        save_keras_weights(MobileNetV2(width_mult=0.35, num_classes=2, tf_padding=True,
                                       bn_eps=1e-3), teacher)
        expected = "classes paired by position"
    else:  # the walk-through's softmax outputs
        teacher = tmp_path / "seed.safetensors"
        seed = create_model("seed", input_width=32, num_classes=2, return_probs=True)
        seed.meta["class_names"] = ["0", "1"]
        save_weights(seed, teacher)
        expected = "the same classes"
    assert run_cli("train", "--data", data, "--resolution", resolution, "--model",
                   "mobilenet_v2_035", "--batch-size", "4", "--epochs", "1", "--no-tensorboard",
                   "--workers", "0", "--device", "cpu", "--teacher", teacher,
                   "--out", tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert f"{expected}): top-1" in err
    # untrained teachers: no better than chance, which the run says
    assert "warning: the teacher's top-1 is close to chance (50.0% for 2 classes)" in err


def test_two_gloo_processes_distil_as_one(teacher_file, tmp_path):
    """torchrun: every process has the teacher, and the global batch's loss is the same."""
    def train(out: Path, processes: int) -> dict[str, torch.Tensor]:
        args = [str(Path(__file__).with_name("float64_cli.py")), "train", "--resolution", "8",
                "--model", "mobilenet_v2_035", "--epochs", "1", "--batch-size", "250", "--lr",
                "0.002", "--dropout", "0", "--seed", "0", "--deterministic", "--device", "cpu",
                "--no-tensorboard", "--sync-bn", "--distill-weight", "0.7",
                "--distill-temperature", "3", "--teacher", str(teacher_file), "--out", str(out)]
        if processes > 1:
            args = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={processes}", *args]
        result = subprocess.run([sys.executable, *args], env=dict(os.environ, OMP_NUM_THREADS="1"),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(out / "last.safetensors")

    one, two = train(tmp_path / "one", 1), train(tmp_path / "two", 2)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-9, msg=key)


def test_the_distillation_benchmark_runs_and_reports_against_the_plain_student(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "benchmarks" / "bench_distill.py"
    result = subprocess.run([sys.executable, str(script), "--teacher-epochs", "1", "--epochs", "1",
                             "--seeds", "0", "--settings", "0.5:2", "--out", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=600, check=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.loads(result.stdout)
    assert list(report["rows"]) == ["plain", "W 0.5, T 2"]
    assert report["rows"]["plain"]["time_vs_plain"] == 1.0
    config = json.loads((tmp_path / "w0.5-t2-0" / "config.json").read_text())
    assert (config["distill_weight"], config["distill_temperature"]) == (0.5, 2.0)
    assert config["teacher"] == str(tmp_path / "teacher" / "best.safetensors")


@pytest.mark.parametrize("model_name, reference", [
    ("shufflenet_v2_x0_5", "torchvision"),
    ("squeezenet1_1", "torchvision"),  # classifies with a 1x1 convolution
    ("timm:tf_mobilenetv3_small_minimal_100.in1k", "timm"),  # inputs normalised to [-1, 1]
])
def test_a_teacher_of_another_architecture_runs_as_its_own_module(model_name, reference, tmp_path):
    if reference == "timm":
        import timm

        name = model_name.removeprefix("timm:")
        model = timm.create_model(name, num_classes=3)
        mean = std = torch.tensor(model.pretrained_cfg["mean"])
        assert mean.tolist() == [0.5] * 3
        torch.save(model.state_dict(), tmp_path / "t.pth")
    else:
        import torchvision

        model = torchvision.models.get_model(model_name, num_classes=3)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        # as torchvision's reference scripts save it: a checkpoint holding the state_dict
        torch.save({"model": model.state_dict(), "epoch": 9}, tmp_path / "t.pth")
    teacher, info = load_teacher(tmp_path / "t.pth", class_names=["a", "b", "c"], mean=(0.4,) * 3,
                                 std=(0.3,) * 3, in_channels=3, model_name=model_name)
    assert (info.name, info.classes) == (model_name, "classes paired by position")
    pixels = torch.rand(2, 3, 64, 64)
    expected = model.eval()((pixels - mean[:, None, None]) / std[:, None, None])
    torch.testing.assert_close(teacher((pixels - 0.4) / 0.3), expected, rtol=1e-4, atol=1e-5)


def test_a_teacher_of_another_architecture_from_the_command_line(tmp_path, capsys):
    import torchvision

    data = two_class_folder(tmp_path / "data")
    torch.save(torchvision.models.shufflenet_v2_x0_5(num_classes=2).state_dict(), tmp_path / "t.pth")
    assert run_cli("train", "--data", data, "--resolution", "32", "--model", "mobilenet_v2_035",
                   "--batch-size", "4", "--epochs", "1", "--no-tensorboard", "--workers", "0",
                   "--teacher", tmp_path / "t.pth", "--teacher-model", "shufflenet_v2_x0_5",
                   "--out", tmp_path / "run") == 0
    assert "(shufflenet_v2_x0_5, classes paired by position): top-1" in capsys.readouterr().err
    with safe_open(tmp_path / "run" / "best.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["distilled_from"]["model"] == "shufflenet_v2_x0_5"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["teacher_model"] == (
        "shufflenet_v2_x0_5")
    # Each mistake in one line: the wrong architecture, an unknown one, none for such a file.
    for flags, needle in (
            (["--teacher-model", "resnet18"], "does not hold resnet18's weights (120 of its "
                                              "tensors missing, e.g. conv1.weight"),
            (["--teacher-model", "resnet999"], "torchvision has no classification model 'resnet999'"),
            (["--teacher-model", "timm:nope"], "timm has no model 'nope'"),
            ([], "for a teacher of another architecture, name it with --teacher-model")):
        assert run_cli("train", "--data", data, "--resolution", "32", "--epochs", "1",
                       "--teacher", tmp_path / "t.pth", *flags, "--out", tmp_path / "bad") == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and err.count("\n") == 0, err


def test_a_named_teacher_is_built_as_its_weights_say(tmp_path):
    import timm
    import torchvision

    from mobilenetv2.distill import named_teacher

    # timm builds a grayscale teacher; torchvision's models are RGB, and the line says so
    gray = timm.create_model("resnet18", in_chans=1, num_classes=10)
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    model, meta, classes = named_teacher("timm:resnet18", tmp_path / "gray.pth")
    assert (meta["input_size"][0], classes) == (1, 10)
    rgb_only = torchvision.models.resnet18(num_classes=4)
    rgb_only.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(rgb_only.state_dict(), tmp_path / "r.pth")
    with pytest.raises(WeightsError, match="first convolution takes 1-channel images; "
                                           "torchvision's resnet18 takes RGB"):
        named_teacher("resnet18", tmp_path / "r.pth")
    # GoogLeNet without its auxiliary classifiers, as torchvision's pretrained file ships
    googlenet = torchvision.models.googlenet(aux_logits=False, init_weights=False, num_classes=3)
    torch.save(googlenet.state_dict(), tmp_path / "g.pth")
    model, _, classes = named_teacher("googlenet", tmp_path / "g.pth")
    assert classes == 3 and not model.aux_logits
