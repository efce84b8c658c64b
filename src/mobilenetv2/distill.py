"""Knowledge distillation: a student learns from a trained teacher's outputs as well as the labels.

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): the student's loss is

    (1 - w) * cross_entropy(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per image, where ``w`` is ``--distill-weight`` and ``T`` ``--distill-temperature`` (T^2 keeps
the teacher's share of the gradient independent of T). The teacher sees exactly the images the
student sees, augmentations and MixUp included (Beyer et al. 2022, "Knowledge distillation: A
good teacher is patient and consistent", call this function matching). It runs as at inference
(BatchNorm's running statistics, no dropout), so it draws no random numbers and a distilled run
resumes to the bit like any other.

The teacher is any file ``load_model`` reads (a wider or deeper MobileNetV2 trained by
``mobilenetv2 train``, torchvision's, timm's or Keras' weights), or, with ``model_name``
(``--teacher-model``), the weights of another architecture: one of torchvision's classification
models (``resnet50``, the classic teacher of MobileNetV2 in the distillation literature) or
timm's (``timm:NAME``), as timm's ``--kd-model-name`` takes any timm model. It may have been trained with
other normalisation statistics (Keras' weights take [-1, 1]): the student's images are
re-normalised for it. Its classes are paired with the data's by name, as ``eval`` pairs them
(ImageNet-1k teachers also by WordNet id), and may be more: the teacher's outputs for the
data's classes are kept, and its softmax is taken over those alone.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("mobilenetv2")


class Teacher(nn.Module):
    """A frozen classifier whose logits, for the data's classes, are the student's soft targets.

    Args:
        model: the teacher network, from an image batch to logits (or softmax probabilities,
            with ``probabilities=True``: the walk-through's ``return_probs``).
        scale, shift: per-channel ``x * scale + shift`` turning the student's normalised
            images into the teacher's; None when both normalise alike.
        indices: the teacher's output for each of the data's classes, in the data's order;
            None when its outputs are the data's classes in the data's order.
    """

    def __init__(self, model: nn.Module, scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, indices: list[int] | None = None,
                 probabilities: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("scale", None if scale is None else scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("indices", None if indices is None else torch.tensor(indices),
                             persistent=False)
        self.probabilities = probabilities

    def train(self, mode: bool = True) -> Teacher:  # always as at inference
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        out = self.model(images)
        if self.probabilities:  # log-probabilities are logits: softmax gives the same back
            out = out.float().clamp_min(1e-30).log()
        return out if self.indices is None else out.index_select(1, self.indices)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """The summed ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` of a batch.

    Summed, not averaged, as :func:`mobilenetv2.engine.classification_loss`, so that the
    trainer's scaling by the global batch applies to both alike.
    """
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(student, teacher, reduction="sum", log_target=True) * (t * t)


@dataclass
class TeacherInfo:
    """What the trainer says about a teacher, and records with the student's weights."""

    path: str
    sha256: str
    name: str
    classes: str  # how its classes pair with the data's: "the same classes", "classes paired by ..."
    ema: bool = False  # the EMA weights of a training checkpoint (--teacher-use-ema)

    def meta(self) -> dict[str, str]:
        meta = {"file": Path(self.path).name, "sha256": self.sha256, "model": self.name}
        return {**meta, "weights": "ema"} if self.ema else meta


def load_teacher(path: str | Path, *, class_names: list[str], mean: tuple[float, ...],
                 std: tuple[float, ...], in_channels: int, resolutions: set[int] | None = None,
                 data: str = "the data", folders: bool = True,
                 model_name: str | None = None, use_ema: bool = False) -> tuple[Teacher, TeacherInfo]:
    """The teacher in ``path`` for data with these classes, normalisation, channels and
    image sizes (``resolutions``: training and validation; checked for the seed variant,
    whose classifier fixes its input size). ``model_name``: another architecture than
    MobileNetV2 (see :func:`named_teacher`). ``use_ema``: the EMA weights of a training
    checkpoint (see :func:`mobilenetv2.weights.read_weights`).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: (WeightsError among them) for a file that is not a classifier of these
            classes and channels, in one line.
    """
    from .data import match_classes
    from .runtime import runs_in_runtime
    from .weights import WeightsError, file_sha256, load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--teacher: weights file not found: {path}")
    if runs_in_runtime(path):
        raise ValueError(f"--teacher {path}: an ONNX or ExecuTorch file cannot teach (it runs "
                         "outside PyTorch); pass the weights it was exported from")
    if model_name is not None:
        model, meta, num_classes = named_teacher(model_name, path, use_ema=use_ema)
        config = {"name": model_name}
        channels = meta["input_size"][0]
    else:
        try:
            model = load_model(path, use_ema=use_ema)
        except WeightsError as e:
            if "not a MobileNetV2 state_dict" not in str(e):
                raise
            raise WeightsError(f"--teacher {e}; for a teacher of another architecture, name it "
                               "with --teacher-model (e.g. resnet50)") from None
        if model.config.get("features_only"):
            raise ValueError(f"--teacher {path} is a feature extractor (features_only): a "
                             "teacher must output classes")
        meta, config, num_classes = model.meta, model.config, int(model.num_classes)
        channels = int((meta.get("input_size") or [config.get("in_channels", 3)])[0])
    if channels != in_channels:
        raise ValueError(f"--teacher {path} takes {channels}-channel images but {data} has "
                         f"{in_channels}: use a teacher trained on images like these")
    match = match_classes(meta.get("class_names"), num_classes, class_names,
                          weights=f"--teacher {path}", data=data, folders=folders,
                          advice="use a teacher trained on these classes")
    width = config.get("input_width")  # the seed variant's one input size
    if width is not None and resolutions and set(resolutions) != {width}:
        raise ValueError(f"--teacher {path} is the seed variant built for {width}x{width} "
                         f"images, but this run's are {' and '.join(map(str, sorted(resolutions)))}"
                         f": pass --resolution {width}, or another teacher")
    scale = shift = None
    teacher_mean = tuple(float(m) for m in meta.get("mean") or mean)
    teacher_std = tuple(float(s) for s in meta.get("std") or std)
    if (teacher_mean, teacher_std) != (tuple(mean), tuple(std)):
        # student's normalised x: (pixel - mean) / std; the teacher's: (pixel - tm) / ts
        m, s = torch.tensor(mean), torch.tensor(std)
        tm, ts = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        scale, shift = s / ts, (m - tm) / ts
    teacher = Teacher(model, scale, shift, match.indices,
                      probabilities=bool(config.get("return_probs")))
    paired = ("the same classes" if match.indices is None and match.how == "name"
              else f"classes paired by {match.how}")
    info = TeacherInfo(str(path), file_sha256(path), str(config.get("name", "model")), paired,
                       ema=use_ema)
    return teacher, info


def named_teacher(model_name: str, path: Path, use_ema: bool = False) -> tuple[nn.Module, dict, int]:
    """(model, preprocessing meta, class count): torchvision's classification model
    ``model_name``, or timm's for ``timm:NAME``, holding the weights in ``path``.

    ``path`` is a safetensors file or a ``torch.save`` file (read with ``weights_only=True``)
    of a state_dict, or of a training checkpoint holding one under ``model`` or
    ``state_dict``. The class count is read from the weights of the model's classifier;
    1000 classes are ImageNet-1k's. Images are normalised with ImageNet's statistics
    (torchvision's) or the model's ``pretrained_cfg`` (timm's: the tag of ``NAME.TAG`` picks it).
    """
    from .model import IMAGENET_MEAN, IMAGENET_STD
    from .weights import WeightsError, imagenet_categories, read_state_dict

    def build(**kwargs: Any) -> nn.Module:
        if model_name.startswith("timm:"):
            try:
                import timm
            except ImportError:
                raise ValueError(f"--teacher-model {model_name} needs timm: pip install timm") from None
            name = model_name[len("timm:"):]
            if not timm.is_model(name):
                raise ValueError(f"--teacher-model: timm has no model {name!r} (timm.list_models() "
                                 "lists them)")
            return timm.create_model(name, pretrained=False, **kwargs)
        from torchvision import models

        if model_name not in models.list_models(module=models):
            raise ValueError(f"--teacher-model: torchvision has no classification model "
                             f"{model_name!r} (e.g. resnet50, efficientnet_b0, convnext_tiny; "
                             "timm's models as timm:NAME)")
        with warnings.catch_warnings():  # its weights are loaded next, whatever the init
            warnings.filterwarnings("ignore", message="The default weight initialization")
            return models.get_model(model_name, weights=None, **kwargs)

    model = build()
    state = read_state_dict(path, use_ema=use_ema)
    # What the weights say about the model's options: the classifier's outputs (the last
    # linear layer; SqueezeNet's is a 1x1 convolution), the first convolution's input channels
    # (timm builds any; torchvision's models take RGB), and whether the auxiliary classifiers
    # of GoogLeNet and Inception v3 are there (torchvision's pretrained files ship without).
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)] or convs
    head = state.get(f"{layers[-1]}.weight") if layers else None
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.ndim >= 2 else 1000
    stem = state.get(f"{convs[0]}.weight") if convs else None
    channels = int(stem.shape[1]) if isinstance(stem, torch.Tensor) and stem.ndim == 4 else 3
    options: dict[str, Any] = {"num_classes": num_classes} if num_classes != 1000 else {}
    if channels != 3:
        if not model_name.startswith("timm:"):
            raise WeightsError(f"--teacher {path}: its first convolution takes {channels}-channel "
                               f"images; torchvision's {model_name} takes RGB (timm's models, as "
                               "timm:NAME, take any)")
        options["in_chans"] = channels
    if getattr(model, "aux_logits", False) and not any(k.startswith(("aux", "AuxLogits"))
                                                       for k in state):
        options["aux_logits"] = False
    if options:
        model = build(**options)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    wrong = [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in (
        (missing, "of its tensors missing"), (unexpected, "not its own"),
        (reshaped, "of other shapes")) if keys]
    if wrong:
        raise WeightsError(f"--teacher {path} does not hold {model_name}'s weights "
                           f"({'; '.join(wrong)}): pass --teacher-model the architecture it "
                           "was trained as")
    model.load_state_dict(state)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    meta = {"mean": list(cfg.get("mean") or IMAGENET_MEAN), "std": list(cfg.get("std") or IMAGENET_STD),
            "input_size": [first.in_channels, *(cfg.get("input_size") or (3, 224, 224))[1:]],
            "class_names": imagenet_categories() if num_classes == 1000 else None}
    return model, meta, num_classes
