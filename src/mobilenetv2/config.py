"""Training configuration: one frozen dataclass, the named recipes, and config files.

A run's configuration is resolved in this order, each step overriding the last:
dataclass defaults < the recipe (``--recipe``) < a YAML/JSON file (``--config``) < command-line
flags. The resolved whole is written to ``OUT/config.json`` and is what ``--resume`` reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import reprlib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .runtime import INTERPOLATIONS  # resampling for resizes, as a model's meta names it

log = logging.getLogger("mobilenetv2")

# Each recipe sets only what differs from the defaults below.
RECIPES: dict[str, dict[str, Any]] = {
    # Ours, for the embedded digits: fits the 3-minute budget on a 2-core laptop CPU.
    "digits": {},
    # The paper / TF-Slim: RMSProp (decay 0.9, momentum 0.9, eps 1.0), lr 0.045 per 96-image
    # batch (each of 16 workers'; TF-Slim scales it by the clones: 0.72 at 16 x 96), x0.98 per
    # epoch, wd 4e-5 but none on depthwise filters (TF-Slim's mobilenet.training_scope; the
    # MobileNetV1 paper: "very little or no weight decay"); label smoothing and EMA as
    # TF-Slim's README adds. Neither gives a number of epochs: 300 is torchvision's.
    "paper": {
        "model": "mobilenet_v2_100", "data": "imagenet", "epochs": 300, "batch_size": 1536,
        "optimizer": "rmsprop", "lr_base": 0.045, "lr_base_batch": 96, "momentum": 0.9,
        "rmsprop_decay": 0.9, "rmsprop_eps": 1.0, "weight_decay": 4e-5, "decay_depthwise": False,
        "scheduler": "step", "lr_decay_rate": 0.98, "lr_decay_epochs": 1.0, "warmup_epochs": 0.0,
        "label_smoothing": 0.1, "ema": 0.9999,
    },
    # torchvision's reference: SGD, lr 0.045 at a global batch of 256, StepLR(1, 0.98), 300 epochs
    # (71.878% top-1 on ImageNet); its train.py decays every parameter, BatchNorm's included.
    "torchvision": {
        "model": "mobilenet_v2_100", "data": "imagenet", "epochs": 300, "batch_size": 256,
        "optimizer": "sgd", "lr_base": 0.045, "lr_base_batch": 256, "momentum": 0.9,
        "nesterov": False, "weight_decay": 4e-5, "decay_norm_and_bias": True,
        "scheduler": "step", "lr_decay_rate": 0.98,
        "lr_decay_epochs": 1.0, "warmup_epochs": 0.0, "label_smoothing": 0.0, "ema": 0.0,
    },
    # torchvision's newer recipe, which made its IMAGENET1K_V2 weights (72.154% top-1; pytorch/vision
    # PR 5560): SGD lr 0.5 at a global batch of 1024, 5 warm-up epochs, cosine over 600 epochs,
    # wd 2e-5 (none on BatchNorm), label smoothing 0.1, TrivialAugmentWide, random erasing 0.1,
    # MixUp 0.2 / CutMix 1.0, EMA, repeated augmentation x4, training at 176 and evaluation at
    # 224 after a resize to 232.
    # Their EMA (decay 0.99998 every 32 steps, scaled by batch x 32 / epochs) is 0.999966 per step.
    "torchvision-v2": {
        "model": "mobilenet_v2_100", "data": "imagenet", "epochs": 600, "batch_size": 1024,
        "optimizer": "sgd", "lr_base": 0.5, "lr_base_batch": 1024, "momentum": 0.9,
        "nesterov": False, "weight_decay": 2e-5, "scheduler": "cosine", "warmup_epochs": 5.0,
        "label_smoothing": 0.1, "ema": 0.999966, "resolution": 176,
        "val_resolution": 224, "crop_pct": 224 / 232, "auto_augment": "ta_wide",
        "random_erase": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "ra_reps": 4,
    },
    # CIFAR: SGD nesterov 0.1 at batch 128, wd 5e-4, cosine over 200 epochs, the small_input model
    # (93.8-94.7% on CIFAR-10 reported). No recipe sets small_input: the network follows the
    # images (CIFAR's 32 px get small_input), whatever data a recipe is used on.
    "cifar": {
        "model": "mobilenet_v2_100", "data": "cifar10", "epochs": 200, "batch_size": 128,
        "optimizer": "sgd", "lr_base": 0.1, "lr_base_batch": 128, "momentum": 0.9,
        "nesterov": True, "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 0.0,
        "label_smoothing": 0.0, "ema": 0.0,
    },
}
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
INT8_FORMATS = ("onnx", "executorch")
CLASS_WEIGHTS = ("none", "balanced")
SCHEDULERS = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
# How a wrong value from a config file is quoted in the error: a few items and characters of
# it. YAML's aliases let a 1 KB file hold a list of a billion items ("billion laughs"), whose
# full repr ran out of memory.
_SHORT_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 2, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
# --auto-augment policies, named as torchvision's reference scripts name them: RandAugment,
# TrivialAugmentWide, AugMix, and AutoAugment's three learned policies.
AUTO_AUGMENTS = ("ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")


def check_augments(interpolation: str, crop_pct: float, auto_augment: str | None,
                   random_erase: float) -> None:
    """Refuse image-preparation options no transform can apply (one ValueError line)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    if not 0.05 <= crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in [0.05, 1], got {crop_pct}")
    if auto_augment is not None and auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"--auto-augment must be one of {', '.join(AUTO_AUGMENTS)}, "
                         f"got {auto_augment!r}")
    if not 0 <= random_erase <= 1:
        raise ValueError(f"--random-erase must be a probability in [0, 1], got {random_erase}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; validated on construction.

    ``lr`` is absolute when given; otherwise ``lr_base`` is scaled linearly with the global
    batch: ``lr_base * batch_size / lr_base_batch``.

    ``recipe`` records which recipe the values came from; the constructor does not apply it
    (``TrainConfig(recipe="cifar")`` holds the defaults). :meth:`from_recipe` does, as
    ``mobilenetv2 train --recipe`` does.
    """

    # data
    data: str = "digits"
    data_dir: str = "data"
    download: bool = False
    resolution: int | None = None
    val_resolution: int | None = None
    val_split: float | None = None  # held out of a folder of class folders (default 0.2)
    strict: bool = False
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    auto_augment: str | None = None
    random_erase: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ra_reps: int = 1
    # model
    model: str = "mobilenet_v2_050"
    width_mult: float | None = None
    small_input: bool | None = None  # None: by data (on for images of at most 64 px)
    dropout: float = 0.2
    drop_path: float = 0.0
    linear_bottleneck: bool = True  # False: the paper's "ReLU6 in bottleneck" ablation (Fig. 6a)
    use_residual: bool = True  # False: the paper's "no residual" ablation (Fig. 6b)
    pretrained: str | None = None
    use_ema: bool = False  # --pretrained's EMA weights (of a training checkpoint)
    freeze: int | str | None = None  # "backbone", or the stem and the first N blocks
    # knowledge distillation (mobilenetv2.distill): a trained model's outputs as soft targets
    teacher: str | None = None
    teacher_model: str | None = None  # its architecture, when not a MobileNetV2 (torchvision, timm:NAME)
    teacher_use_ema: bool = False  # --teacher's EMA weights (of a training checkpoint)
    distill_weight: float | None = None  # the teacher's share of the loss (default 0.5)
    distill_temperature: float | None = None  # softmax temperature of both (default 1)
    # optimisation
    recipe: str = "digits"
    epochs: int = 30
    batch_size: int = 64
    grad_accum_steps: int = 1  # each process's batch in this many micro-batches, one step
    optimizer: str = "sgd"
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_batch: int = 128
    momentum: float = 0.9
    nesterov: bool = True
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1.0
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # weight decay on BatchNorm and biases too (torchvision's)
    decay_depthwise: bool = True  # on depthwise filters too (TF-Slim's MobileNets: none)
    layer_decay: float | None = None
    label_smoothing: float = 0.1
    class_weights: str = "none"  # or "balanced": each class's loss weighted by N / (K * n_class)
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    lr_decay_rate: float = 0.98
    lr_decay_epochs: float = 1.0
    ema: float = 0.0
    grad_clip: float | None = None
    patience: int = 0  # stop after this many epochs without a better val top-1 (0: off)
    skip_nonfinite: bool = False
    # runtime
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_checkpointing: bool = False
    workers: int | None = None
    sync_bn: bool = False
    out: str | None = None
    tensorboard: bool | None = None
    log_every: int = 50
    save_every: int = 0
    int8: bool = False  # after training: OUT/model.onnx and OUT/model_int8.onnx
    int8_format: str = "onnx"  # or "executorch": OUT/model.pte and OUT/model_int8.pte
    pixel_input: bool = False  # --int8's models take uint8 pixels (N, H, W, C)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        # Types first (a config file can hold anything), so the checks below compare numbers.
        for name, hint in typing.get_type_hints(type(self)).items():
            kinds = typing.get_args(hint) or (hint,)  # e.g. (int, NoneType) for int | None
            if str in kinds and isinstance(getattr(self, name), os.PathLike):  # out=Path(...)
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
            allowed = {*kinds, int} if float in kinds else set(kinds)
            value = getattr(self, name)
            # YAML 1.1 reads 1e-3 (no dot) as text: say how to write it as a number.
            yaml_hint = ("; YAML reads exponents without a dot as text: write 1.0e-3 or 0.001"
                         if float in kinds and isinstance(value, str) and _is_number(value) else "")
            need(type(value) in allowed, f"{name} must be "
                 f"{' or '.join(k.__name__ for k in kinds if k is not type(None))}, got "
                 f"{_SHORT_REPR.repr(value)} ({type(value).__name__}){yaml_hint}")

        need(self.recipe in RECIPES, f"unknown recipe {self.recipe!r}; choose one of: "
             f"{', '.join(RECIPES)}")
        need(self.int8_format in INT8_FORMATS, f"--int8-format must be one of "
             f"{', '.join(INT8_FORMATS)}, got {self.int8_format!r}")
        need(self.int8 or self.int8_format == "onnx",
             f"--int8-format {self.int8_format} chooses the files --int8 writes: add --int8")
        need(self.int8 or not self.pixel_input,
             "--pixel-input chooses the input of the models --int8 writes: add --int8")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.grad_accum_steps == 1 or 1 <= self.grad_accum_steps <= self.batch_size // 2,
             f"--grad-accum-steps must be between 1 and half the --batch-size ({self.batch_size}: "
             f"micro-batches of two images at least), got {self.grad_accum_steps}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
             f"got {self.optimizer!r}")
        need(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, "
             f"got {self.scheduler!r}")
        need(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        need(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
             f"--lr must be a finite number > 0, got {self.lr}")
        need(self.lr_base > 0 and self.lr_base_batch >= 1, "lr_base and lr_base_batch must be > 0")
        need(0 <= self.weight_decay < math.inf,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        need(self.layer_decay is None or 0 < self.layer_decay < 1,
             f"--layer-decay must be in (0, 1), got {self.layer_decay}")
        need(self.layer_decay is None or self.model != "seed",
             "--layer-decay does not apply to the seed variant: pick a mobilenet_v2_* model")
        need(self.class_weights in CLASS_WEIGHTS, f"--class-weights must be one of "
             f"{', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}")
        need(0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0 <= self.warmup_epochs < math.inf,
             f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        need(0 <= self.ema < 1, f"--ema must be in [0, 1) (0 turns it off), got {self.ema}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}")
        need(self.width_mult is None or (self.width_mult > 0 and math.isfinite(self.width_mult)),
             f"--width-mult must be a finite number > 0, got {self.width_mult}")
        need(self.resolution is None or 8 <= self.resolution <= 8192,
             f"--resolution must be from 8 to 8192, got {self.resolution}")
        need(self.val_resolution is None or 8 <= self.val_resolution <= 8192,
             f"--val-resolution must be from 8 to 8192, got {self.val_resolution}")
        need(self.val_split is None or 0 < self.val_split < 1,
             f"--val-split must be a fraction in (0, 1), got {self.val_split}")
        need(self.freeze is None or self.freeze == "backbone"
             or (isinstance(self.freeze, int) and self.freeze >= 0),
             f"--freeze must be backbone or a number of blocks >= 0, got {self.freeze!r}")
        need(not (self.model == "seed" and isinstance(self.freeze, int)),
             "--freeze N counts the blocks of a mobilenet_v2_* model; the seed variant takes "
             "--freeze backbone")
        need(not self.use_ema or self.pretrained is not None,
             "--use-ema starts from the EMA weights of a --pretrained training checkpoint: "
             "pass --pretrained FILE (to keep an EMA of this run's weights: --ema DECAY)")
        from .registry import WEIGHT_TAGS

        need(not self.use_ema or self.pretrained not in WEIGHT_TAGS,
             f"--pretrained {self.pretrained} names one set of weights, with no EMA weights "
             "beside them: drop --use-ema")
        need(self.freeze is None or self.pretrained is not None,
             "--freeze keeps layers as the starting weights have them: pass --pretrained WEIGHTS")
        need(self.teacher is not None or (self.distill_weight is None
                                           and self.distill_temperature is None),
             "--distill-weight and --distill-temperature shape the loss of a teacher: add "
             "--teacher WEIGHTS")
        need(self.teacher is not None or self.teacher_model is None,
             "--teacher-model names the architecture of a teacher's weights: add --teacher WEIGHTS")
        need(self.teacher is not None or not self.teacher_use_ema,
             "--teacher-use-ema takes the EMA weights of a --teacher training checkpoint: add "
             "--teacher WEIGHTS")
        need(self.distill_weight is None or 0 < self.distill_weight <= 1,
             f"--distill-weight must be in (0, 1] (the teacher's share of the loss), got "
             f"{self.distill_weight}")
        need(self.distill_temperature is None or (self.distill_temperature > 0
                                                   and math.isfinite(self.distill_temperature)),
             f"--distill-temperature must be a finite number > 0, got {self.distill_temperature}")
        need(self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(0 < self.lr_decay_rate <= 1 and 0 < self.lr_decay_epochs < math.inf,
             "lr_decay_rate must be in (0, 1] and lr_decay_epochs a finite number > 0")
        need(self.log_every >= 1 and self.save_every >= 0, "log_every >= 1 and save_every >= 0")
        need(self.patience >= 0, f"--patience must be >= 0 (0: off), got {self.patience}")
        need(self.grad_clip is None or 0 < self.grad_clip < math.inf,
             f"--grad-clip must be a finite number > 0, got {self.grad_clip}")
        check_augments(self.interpolation, self.crop_pct, self.auto_augment, self.random_erase)
        need(self.ra_reps >= 1, f"--ra-reps must be >= 1 (1: off), got {self.ra_reps}")
        need(0 <= self.mixup_alpha < math.inf and 0 <= self.cutmix_alpha < math.inf,
             f"--mixup-alpha and --cutmix-alpha must be finite numbers >= 0 (0: off), got "
             f"{self.mixup_alpha} and {self.cutmix_alpha}")

    @classmethod
    def from_recipe(cls, recipe: str = "digits", config_file: str | Path | None = None,
                    **options: Any) -> TrainConfig:
        """A recipe's configuration with a YAML/JSON file's values and ``options`` over it, as
        ``mobilenetv2 train --recipe RECIPE --config FILE --OPTION VALUE`` resolves it.

            >>> TrainConfig.from_recipe("cifar", epochs=50).optimizer
            'sgd'

        Raises:
            ValueError: for an unknown recipe or option, or values that cannot work together.
        """
        file_values = read_config_file(config_file) if config_file is not None else {}
        return resolve_config(recipe, file_values, options)

    def learning_rate(self) -> float:
        """The peak learning rate for this run's global batch."""
        return self.lr if self.lr is not None else self.lr_base * self.batch_size / self.lr_base_batch

    def to_dict(self) -> dict[str, Any]:
        """Every field by name: what ``config.json`` holds and ``TrainConfig(**d)`` rebuilds."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The text of ``OUT/config.json``, which ``--config`` reads back."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file of TrainConfig fields (``batch-size`` or ``batch_size``).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a file that does not parse, or keys that are not fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # json and yaml raise several types; all mean "does not parse"
        raise ValueError(f"config file {path} does not parse: {' '.join(str(e).split())[:200]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    check_option_names(values, f"config file {path} has unknown keys")
    return values


# --pretrained tags of torchvision's ImageNet weights (mobilenetv2.registry.PRETRAINED), which
# exist for mobilenet_v2_100 only: without --model, they pick it (and a file, its network).
TORCHVISION_TAGS = ("imagenet", "imagenet-v2")


def check_seed_flags(flag_values: dict[str, Any]) -> None:
    """Refuse the options the seed variant has no part for (new runs and resumes alike)."""
    if flag_values.get("dropout"):
        raise ValueError("--dropout: the seed variant has no dropout layer (docs/seed.md, "
                         "departure h); drop it, or pick a mobilenet_v2_* model")
    if flag_values.get("small_input"):
        raise ValueError("--small-input does not apply to the seed variant (it has no 32x32 "
                         "adaptation): drop it, or pick a mobilenet_v2_* model")


def check_option_names(names: Any, what: str = "unknown options") -> None:
    """Refuse names that are not TrainConfig fields, with the nearest field for a typo."""
    unknown = sorted(set(names) - set(field_names()))
    if unknown:
        close = difflib.get_close_matches(unknown[0], field_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{what}: {', '.join(unknown)}{hint}; valid names are the train "
                         "options (TrainConfig's fields), e.g. epochs, batch_size, lr, optimizer")


def resolve_config(recipe: str | None, file_values: dict[str, Any],
                   flag_values: dict[str, Any]) -> TrainConfig:
    """Merge recipe < file < flags into a validated TrainConfig, as ``mobilenetv2 train`` does.

    ``recipe`` is the default when neither ``file_values`` nor ``flag_values`` name one.

    Raises:
        ValueError: for an unknown recipe or option, or values that cannot work together.
    """
    check_option_names(flag_values)
    recipe = flag_values.get("recipe") or file_values.get("recipe") or recipe or "digits"
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    given = {**file_values, **flag_values}
    # A run's config.json holds both (width_mult null, or the recipe's model beside a width):
    # only a model named in flag_values, or another model than the recipe's in the file,
    # conflicts with a width.
    recipe_model = RECIPES[recipe].get("model", TrainConfig.model)
    named = flag_values.get("model") or (given.get("model") if given.get("model") != recipe_model
                                         else None)
    if given.get("width_mult") is not None and named not in (None, "seed"):
        raise ValueError(f"give either --model or --width-mult: {named} fixes the "
                         "width (--width-mult builds MobileNetV2 of any width)")
    values = {**RECIPES[recipe], **given, "recipe": recipe}
    if values.get("model") == "seed":
        check_seed_flags(flag_values)
        # recorded as the network is (an earlier version's config.json says otherwise)
        values["dropout"], values["small_input"] = 0.0, None
    if values.get("pretrained") in TORCHVISION_TAGS and "model" not in values:
        # torchvision's weights exist for one model, as its mobilenet_v2(weights=...) builds
        values["model"] = "mobilenet_v2_100"
    elif values.get("pretrained") and "model" not in values and "width_mult" not in values:
        from .train import pretrained_model_name

        # a file's network (Keras' 0.35, the first run of a two-step fine-tune), not the default
        name = pretrained_model_name(values["pretrained"], use_ema=bool(values.get("use_ema")))
        if name:
            values["model"] = name
    try:
        return TrainConfig(**values)
    except TypeError as e:  # a wrong type in a config file
        raise ValueError(f"bad configuration value: {e}") from None


# What a checkpoint fixes: its optimizer's learning rates, momentum and weight decay, and the
# step it stopped at (steps per epoch come from the batch size). Changed beside a resume they
# would be written to config.json and not used.
FIXED_ON_RESUME = ("recipe", "batch_size", "optimizer", "lr", "lr_base", "lr_base_batch",
                   "momentum", "nesterov", "rmsprop_decay", "rmsprop_eps", "weight_decay",
                   "decay_norm_and_bias", "decay_depthwise", "layer_decay")


def resumed_config(resume: str | Path, flag_values: dict[str, Any]) -> TrainConfig:
    """The configuration that continues the run in ``resume``: its ``config.json`` with the
    options in ``flag_values`` changed (``epochs`` to train longer, ``workers``, ``device``...).

    Raises:
        FileNotFoundError: when ``resume`` holds no run.
        ValueError: for an option the checkpoint fixes (its optimizer, batch, split) or an
            ``out`` elsewhere.
    """
    from .data import DEFAULT_VAL_SPLIT

    resume = Path(resume)
    check_option_names(flag_values)
    config_path = resume / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{resume} holds no run to resume (no config.json)")
    stored = read_config_file(config_path)
    if flag_values.get("int8") is False:  # --no-int8 drops the choices of what --int8 writes
        stored = {k: v for k, v in stored.items()
                  if k not in ("int8_format", "pixel_input") or k in flag_values}
    # (a key an earlier version did not write holds the default, which the run then had)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = {k: v for k, v in flag_values.items() if stored.get(k, defaults.get(k)) != v}
    if "out" in changed and Path(changed["out"]).resolve() != resume.resolve():
        raise ValueError(f"--out: a resumed run goes on in {resume}; to continue it "
                         f"elsewhere, copy the folder and resume the copy")
    fixed = [k for k in changed if k in FIXED_ON_RESUME]
    if fixed:
        raise ValueError(
            f"{', '.join('--' + k.replace('_', '-') for k in fixed)} cannot change when "
            f"resuming {resume}: the checkpoint's optimizer, schedule and place in the "
            "epoch hold what the run began with; start a new run from its weights instead "
            f"(--pretrained {resume / 'last.safetensors'} --out NEW)")
    if "val_split" in changed and (stored.get("val_split") or DEFAULT_VAL_SPLIT) != changed["val_split"]:
        raise ValueError(f"--val-split cannot change when resuming {resume}: images the run "
                         "held out would be trained on; start a new run (--out) instead")
    if {**stored, **flag_values}.get("model") == "seed":
        check_seed_flags(changed)
    if changed:
        log.info("resuming with changed options: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
    try:
        return TrainConfig(**{**stored, **flag_values, "out": str(resume)})
    except TypeError as e:  # a wrong type in a hand-edited config.json
        raise ValueError(f"bad configuration value: {e}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
