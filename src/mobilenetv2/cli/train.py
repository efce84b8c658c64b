"""``mobilenetv2 train`` and ``eval`` (and the weights loading that ``predict`` shares)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..registry import list_models
from ..runtime import json_text
from .common import (
    add_json_arg,
    add_use_ema_arg,
    image_side,
    model_name,
    non_negative_int,
    positive_float,
    positive_int,
    printable,
    require,
)

log = logging.getLogger("mobilenetv2")
BOOL = argparse.BooleanOptionalAction


def freeze_spec(text: str) -> int | str:
    """``--freeze``: ``backbone`` or a number of blocks."""
    if text == "backbone":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected backbone or a number of blocks >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)


# --------------------------------------------------------------------------------------------
# train


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    from ..config import (
        AMP_MODES,
        AUTO_AUGMENTS,
        CLASS_WEIGHTS,
        INTERPOLATIONS,
        OPTIMIZERS,
        RECIPES,
        SCHEDULERS,
        TrainConfig,
    )

    digits = TrainConfig  # the digits recipe's values: its fields' defaults

    parser = subparsers.add_parser(
        "train", help="train a model (default: the embedded digits, in 1-2 minutes on 2 CPU cores)",
        description="Train MobileNetV2. With no arguments: the digits recipe on scikit-learn's "
        "bundled handwritten digits. Options override the recipe, which --config can override "
        "too; the resolved configuration is written to OUT/config.json. Defaults shown as "
        "'digits:' are the digits recipe's; the other recipes set their own (--print-config "
        "shows them).",
    )
    # Every default is None: only options given on the command line override recipe and file.
    parser.set_defaults(func=run_train)
    add = parser.add_argument
    add("--recipe", choices=list(RECIPES), default=None,
        help=f"{', '.join(RECIPES)} (default: digits)")
    add("--config", type=Path, default=None, metavar="FILE", help="YAML or JSON file of options")
    add("--out", default=None, metavar="DIR", help="output folder (default runs/<timestamp>)")
    add("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR")
    add("--resume-existing", action="store_true",
        help="with --out DIR: continue the run DIR holds, if it holds one, else start it (a "
        "retried pipeline step runs the same command)")
    add("--print-config", action="store_true",
        help="print the resolved configuration (recipe < --config < flags, or the run that "
        "--resume would continue) as the JSON of OUT/config.json, and exit without training")
    add("--json", action="store_true",
        help="at the end, print exactly one JSON object on stdout (the run's folder, weights, "
        "final and best top-1, and --int8's report) instead of the result lines")

    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None,
                       help="digits, cifar10, cifar100, a folder with train/ and val/, or a "
                       "folder of class folders (part of each class held out: --val-split)")
    group.add_argument("--data-dir", default=None, metavar="DIR", help="where CIFAR lives (default ./data)")
    group.add_argument("--download", action=BOOL, default=None, help="download CIFAR if missing")
    group.add_argument("--resolution", type=image_side, default=None, metavar="R",
                       help="training size (and evaluation size, unless --val-resolution)")
    group.add_argument("--val-resolution", type=image_side, default=None, metavar="R",
                       help="evaluate, and save the model for, this size (FixRes: train smaller)")
    group.add_argument("--val-split", type=positive_float, default=None, metavar="F",
                       help="a folder of class folders: hold out this fraction of each class "
                       "for validation (default 0.2; the same images on every machine)")
    group.add_argument("--strict", action=BOOL, default=None, help="fail on an unreadable image instead of skipping it")
    group.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                       help="data loader processes (default: auto)")

    group = parser.add_argument_group("augmentation (off by default, as in torchvision's references)")
    group.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                       help="how resizes resample (default bilinear; stored with the weights)")
    group.add_argument("--crop-pct", type=positive_float, default=None, metavar="P",
                       help="evaluation above 64 px: resize to R/P, crop the center R (default "
                       "0.875: 256 -> 224)")
    group.add_argument("--auto-augment", choices=AUTO_AUGMENTS, default=None, metavar="POLICY",
                       help="ra (RandAugment), ta_wide (TrivialAugmentWide), augmix, or "
                       "AutoAugment's imagenet, cifar10 or svhn policy; image files only")
    group.add_argument("--random-erase", type=float, default=None, metavar="P",
                       help="erase a random rectangle of each training image with probability P")
    group.add_argument("--mixup-alpha", type=float, default=None, metavar="A",
                       help="MixUp with Beta(A, A) mixing weights (0: off)")
    group.add_argument("--cutmix-alpha", type=float, default=None, metavar="A",
                       help="CutMix with Beta(A, A) areas (0: off); with --mixup-alpha, one of "
                       "the two per batch")
    group.add_argument("--ra-reps", type=positive_int, default=None, metavar="N",
                       help="repeated augmentation: each image N times per batch, augmented "
                       "differently (torchvision's --ra-sampler; 1: off)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", type=model_name, default=None, metavar="NAME",
                       help=f"a registered model: {', '.join(list_models())} (digits: "
                       f"{digits.model})")
    group.add_argument("--width-mult", type=positive_float, default=None, metavar="W", help="any width multiplier")
    group.add_argument("--small-input", action=BOOL, default=None, help="the 32x32 adaptation (default: by data)")
    group.add_argument("--dropout", type=float, default=None, metavar="P",
                       help=f"dropout probability before the classifier (default {digits.dropout})")
    group.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                       help="stochastic depth: the last block drops its residual branch with "
                       "this probability, earlier ones less (timm's drop_path_rate; default 0)")
    group.add_argument("--linear-bottleneck", action=BOOL, default=None,
                       help="no activation after each block's projection, as in the paper "
                       "(default); --no-linear-bottleneck adds a ReLU6 there: the paper's "
                       "ablation, Figure 6a")
    group.add_argument("--use-residual", action=BOOL, default=None,
                       help="the shortcuts between bottlenecks, as in the paper (default); "
                       "--no-use-residual leaves them out: the paper's ablation, Figure 6b")
    group.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                       help="start from these weights: a file (its network, without --model), "
                       "or imagenet / imagenet-v2 (torchvision's, for mobilenet_v2_100, which they pick without --model), "
                       "timm, or keras / keras-96 / -128 / -160 / -192 (Keras', trained at that "
                       "size) for --model's ImageNet weights; the classifier is replaced when "
                       "the classes differ")
    group.add_argument("--use-ema", action="store_true", default=None,
                       help="start from the EMA weights of the --pretrained training checkpoint "
                       "(timm's state_dict_ema, torchvision's model_ema, our checkpoint.pt's "
                       "ema) rather than its raw ones; not --ema, which keeps an EMA of this run")
    group.add_argument("--freeze", type=freeze_spec, default=None, metavar="PART",
                       help="fine-tune only the rest: backbone (train the classifier alone) or "
                       "N (the stem and the first N blocks); frozen layers run as at inference, "
                       "BatchNorm with its running statistics (as Keras' trainable=False)")

    group = parser.add_argument_group("knowledge distillation")
    group.add_argument("--teacher", default=None, metavar="WEIGHTS",
                       help="learn from this trained classifier's outputs as well as the labels "
                       "(any weights file eval takes but ONNX/.pte: a wider MobileNetV2 you "
                       "trained, torchvision's, timm's, Keras'); its classes pair with the "
                       "data's by name, and the images are re-normalised to its mean and std")
    group.add_argument("--teacher-model", default=None, metavar="NAME",
                       help="the architecture of --teacher WEIGHTS when it is not a MobileNetV2: "
                       "a torchvision classification model (resnet50, efficientnet_b0, ...) or "
                       "timm:NAME (timm's, as its --kd-model-name), trained on these classes or "
                       "on ImageNet-1k; normalised with ImageNet's mean and std (timm: its "
                       "pretrained_cfg's)")
    group.add_argument("--teacher-use-ema", action="store_true", default=None,
                       help="the EMA weights of the --teacher training checkpoint (timm's "
                       "state_dict_ema, torchvision's model_ema, our checkpoint.pt's ema) "
                       "rather than its raw ones, as --use-ema for --pretrained")
    group.add_argument("--distill-weight", type=positive_float, default=None, metavar="W",
                       help="the teacher's share of the loss, in (0, 1]: (1-W) x labels' loss + "
                       "W x T^2 x KL(teacher || student) at temperature T (default 0.5)")
    group.add_argument("--distill-temperature", type=positive_float, default=None, metavar="T",
                       help="softmax temperature of teacher and student (default 1)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                       help=f"passes over the training images (digits: {digits.epochs})")
    group.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                       help=f"global batch size, over every process (digits: {digits.batch_size})")
    group.add_argument("--grad-accum-steps", type=positive_int, default=None, metavar="K",
                       help="run each --batch-size batch as K micro-batches and step once "
                       "(gradient accumulation; unlike timm's flag, the batch is split, not "
                       "multiplied): about 1/K of the activation memory; BatchNorm sees "
                       "micro-batches (default 1)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                       help=f"digits: {digits.optimizer}")
    group.add_argument("--lr", type=positive_float, default=None,
                       help="peak learning rate (default: the recipe's, scaled with the batch size)")
    group.add_argument("--momentum", type=float, default=None, metavar="M",
                       help=f"SGD's and RMSProp's momentum, in [0, 1) (digits: {digits.momentum})")
    group.add_argument("--nesterov", action=BOOL, default=None,
                       help="Nesterov momentum for SGD (digits: on)")
    group.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                       help=f"L2 penalty on the weights (digits: {digits.weight_decay:g})")
    group.add_argument("--decay-norm-and-bias", action=BOOL, default=None,
                       help="apply --weight-decay to BatchNorm parameters and biases too, as "
                       "torchvision's reference scripts do (default: convolution and linear "
                       "weights only, as TF-Slim and timm; on in the torchvision recipe)")
    group.add_argument("--decay-depthwise", action=BOOL, default=None,
                       help="apply --weight-decay to the depthwise filters too (default: on; "
                       "off in the paper recipe, as TF-Slim trains MobileNets)")
    group.add_argument("--layer-decay", type=positive_float, default=None, metavar="D",
                       help="layer-wise lr decay for fine-tuning, as timm's: the classifier takes "
                       "--lr, the head and last block D times it, each block below D times the "
                       "one above, the stem least")
    group.add_argument("--label-smoothing", type=float, default=None, metavar="S",
                       help=f"in [0, 1): mix each one-hot target with the uniform one in this "
                       f"share, as torch's label_smoothing (digits: {digits.label_smoothing})")
    group.add_argument("--class-weights", choices=CLASS_WEIGHTS, default=None,
                       help="balanced: weigh each class's loss by N / (K * its training images), "
                       "scikit-learn's 'balanced' class_weight, for classes of unequal size "
                       "(default none)")
    group.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                       help=f"the learning rate after warm-up: cosine to 0, step (x --lr-decay-rate "
                       f"every --lr-decay-epochs) or constant (digits: {digits.scheduler})")
    group.add_argument("--warmup-epochs", type=float, default=None, metavar="E",
                       help=f"raise the learning rate linearly from 0 over E epochs (digits: "
                       f"{digits.warmup_epochs:g})")
    group.add_argument("--lr-decay-rate", type=float, default=None, help="step schedule: factor per decay")
    group.add_argument("--lr-decay-epochs", type=float, default=None, help="step schedule: epochs per decay")
    group.add_argument("--ema", type=float, default=None, metavar="DECAY", help="weight EMA decay (0: off)")
    group.add_argument("--grad-clip", type=positive_float, default=None, metavar="NORM",
                       help="scale the gradient down to this global L2 norm when above it "
                       "(default: off)")
    group.add_argument("--patience", type=non_negative_int, default=None, metavar="EPOCHS",
                       help="stop when the validation top-1 has not improved for EPOCHS epochs "
                       "(early stopping; best.safetensors keeps the best; default 0: off)")
    group.add_argument("--skip-nonfinite", action=BOOL, default=None,
                       help="skip steps whose loss is NaN/inf instead of stopping")

    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=None, metavar="N",
                       help=f"seeds the initial weights, the data order and the augmentations "
                       f"(default {digits.seed}; with --deterministic, the same N trains the same "
                       "weights)")
    group.add_argument("--deterministic", action=BOOL, default=None,
                       help="deterministic kernels: bit-identical reruns and resumes")
    group.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    group.add_argument("--amp", choices=AMP_MODES, default=None,
                       help="mixed precision (auto: bf16/fp16 on GPUs, off on CPUs)")
    group.add_argument("--channels-last", action=BOOL, default=None, help="NHWC memory format (default on)")
    group.add_argument("--compile", action=BOOL, default=None, help="torch.compile the model")
    group.add_argument("--grad-checkpointing", action=BOOL, default=None,
                       help="recompute each block's activations in the backward pass: less "
                       "memory, about a third more compute, the same weights")
    group.add_argument("--sync-bn", action=BOOL, default=None, help="BatchNorm over the global batch under torchrun")
    group.add_argument("--tensorboard", action=BOOL, default=None, help="TensorBoard logs (default: if installed)")
    group.add_argument("--log-every", type=positive_int, default=None, metavar="STEPS",
                       help="log a line every STEPS steps when not on a terminal")
    group.add_argument("--save-every", type=non_negative_int, default=None, metavar="STEPS",
                       help="also save a checkpoint every STEPS steps")

    group = parser.add_argument_group("deployment")
    group.add_argument("--int8", action=BOOL, default=None,
                       help="after training, export best.safetensors to OUT/model.onnx and "
                       "quantize it to OUT/model_int8.onnx (static int8 calibrated on the "
                       "training images, as mobilenetv2 quantize), reporting both accuracies")
    group.add_argument("--int8-format", default=None, choices=["onnx", "executorch"],
                       help="onnx (default: model.onnx, model_int8.onnx for ONNX Runtime) or "
                       "executorch (model.pte, model_int8.pte for ExecuTorch's XNNPACK on "
                       "phones)")
    group.add_argument("--pixel-input", action=BOOL, default=None,
                       help="--int8's models take uint8 pixels (N, H, W, C) and normalise them "
                       "themselves, as mobilenetv2 export --pixel-input")


# Flags that are not TrainConfig fields.
_NOT_CONFIG = {"command", "func", "config", "resume", "resume_existing", "print_config", "json"}


def run_train(args: argparse.Namespace) -> int:
    from ..config import read_config_file, resolve_config, resumed_config
    from ..train import int8_requirements, plural, quantize_run, train

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    resume = args.resume
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if args.resume_existing and (resume is not None or not args.out):
        raise ValueError("--resume-existing continues the run in --out DIR if there is one: give "
                         "--out DIR (and not --resume)")
    if resume is None and (restarts > 0 or args.resume_existing) and args.out and (
            Path(args.out) / "config.json").is_file():
        # torchrun --max-restarts started this job again after a worker died, or a pipeline
        # retried the step: continue the run (from its last checkpoint, or from the start if
        # it had none) instead of refusing OUT.
        resume = Path(args.out)
        log.info("%s: resuming %s", f"restart {restarts} of this job" if restarts > 0
                 else "--resume-existing", resume)
    if resume is not None:
        if args.config is not None and args.resume is not None:  # (a torchrun restart: the same)
            raise ValueError("--config sets up a new run: beside --resume, give the options to "
                             "change as flags (e.g. --epochs)")
        config = resumed_config(resume, flags)
    else:
        config = resolve_config(None, read_config_file(args.config) if args.config else {}, flags)
    if args.print_config:
        print(config.to_json(), end="")
        return 0
    require(*int8_requirements(config), why="--int8")  # before hours of training, not after
    result = train(config, resume=resume)
    if result.interrupted:
        return 128 + (result.signal or 2)
    if int(os.environ.get("RANK", "0")) != 0:  # the run's result is rank 0's to print
        return 0
    final = result.final
    # The built-in datasets validate on their test split (CIFAR's official 10,000 images).
    held_out = "test" if config.data in ("digits", "cifar10", "cifar100") else "val"
    # The run's time over all its sessions (a resumed run's), else this session's.
    seconds = final.get("wall_seconds") or result.seconds
    summary = {"out": str(result.out), "weights": str(result.out / "best.safetensors"),
               "split": held_out, "epochs": result.epochs, "top1": final["val_top1"],
               "top5": final["val_top5"], "loss": final["val_loss"],
               "best_top1": result.best_top1, "seconds": seconds}
    if not args.json:
        took = f"{result.seconds:.0f} s"
        if resume is not None and final.get("wall_seconds"):
            took = f"{seconds:.0f} s of training and evaluation over its sessions"
        print(f"{held_out} accuracy: top-1 {final['val_top1']:.2f}% "
              f"top-5 {final['val_top5']:.2f}% (best top-1 {result.best_top1:.2f}%) after "
              f"{plural(result.epochs, 'epoch')} in {took}; weights: {summary['weights']}")
    if config.int8:  # one process: the run is over
        from ..quantize import describe_report

        summary["int8"] = report = quantize_run(config, result.out)
        if not args.json:
            print(f"{describe_report(report, config.data)}; fp32 "
                  f"{'ExecuTorch' if config.int8_format == 'executorch' else 'ONNX'}: "
                  f"{report['fp32_path']}")
    if args.json:
        print(json_text(summary))
    return 0


# --------------------------------------------------------------------------------------------
# eval


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    from ..config import INTERPOLATIONS

    parser = subparsers.add_parser(
        "eval", help="top-1/top-5 accuracy and loss of weights on a dataset",
        description="Evaluate weights (safetensors, torchvision/timm/walk-through .pth, or ONNX) "
        "on the validation split of DATA.",
    )
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE",
                        help="the weights to evaluate: any file load_model reads, a tag such as "
                        "imagenet, an ONNX file or an ExecuTorch program (.pte)")
    parser.add_argument("--data", default=None,
                        help="digits, cifar10, cifar100, a folder with val/<class>/ (train/ "
                        "is not needed), or a folder of class folders (default: the built-in "
                        "dataset the weights were trained on)")
    parser.add_argument("--val-split", type=float, default=None, metavar="F",
                        help="a folder of class folders: evaluate the fraction F of each class "
                        "that training with --val-split F held out (default: the split the "
                        "weights were trained with, if any; 0: every image)")
    parser.add_argument("--data-dir", default="data", metavar="DIR", help="where CIFAR lives")
    parser.add_argument("--batch-size", type=positive_int, default=256, metavar="B",
                        help="images per batch (default 256)")
    parser.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                        help="data loader processes (default: auto)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--small-input", action=BOOL, default=None,
                        help="for .pth files without our metadata: the 32x32 adaptation")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an unreadable image instead of skipping it (and counting "
                        "it as 'unreadable')")
    group = parser.add_argument_group(
        "preprocessing (default: the weights'; as timm's validate.py --img-size, --crop-pct, "
        "--interpolation)")
    group.add_argument("--resolution", type=image_side, default=None, metavar="R",
                       help="evaluate at R x R (a test resolution above the training one often "
                       "scores higher: FixRes); PyTorch weights only, an export takes its own size")
    group.add_argument("--crop-pct", type=positive_float, default=None, metavar="P",
                       help="above 64 px: resize the shorter side to R/P and crop the center R "
                       "(1: no margin)")
    group.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                       help="how the resize resamples")
    parser.add_argument("--per-class", action="store_true",
                        help="also each class's images, top-1 (recall), precision and the class "
                        "it is most often taken for; with --json, 'per_class' and the "
                        "'confusion' matrix (row: true class, column: prediction)")
    parser.add_argument("--only-data-classes", action="store_true",
                        help="data with fewer classes than the model (class folders named as "
                        "the model's classes, by ImageNet WordNet id or by class index): score "
                        "only the outputs of the data's classes, as ImageNet-A and -R are "
                        "scored (timm's --valid-labels); default: all of the model's outputs")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: score the mean of each image's class "
                        "probabilities and its left-right mirror's (for classes that mirroring "
                        "does not change; not digits or text)")
    add_use_ema_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_weights

    metrics, data = evaluate_weights(
        args.weights, args.data, data_dir=args.data_dir, batch_size=args.batch_size,
        workers=args.workers, device=args.device, small_input=args.small_input,
        strict=args.strict, resolution=args.resolution, crop_pct=args.crop_pct,
        interpolation=args.interpolation, val_split=args.val_split, per_class=args.per_class,
        only_data_classes=args.only_data_classes, tta=args.tta, use_ema=args.use_ema)
    if args.json:
        print(json_text(metrics))
        return 0
    unreadable = metrics.get("unreadable", 0)
    skipped = f", {unreadable} unreadable skipped" if unreadable else ""
    print(f"{args.weights} on {data}: top-1 {metrics['top1']:.2f}%  top-5 "
          f"{metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  ({metrics['images']} images"
          f"{skipped}, {metrics['images_per_second']:,.0f} img/s)")
    if args.per_class:
        print_per_class(metrics["per_class"])
    return 0


def print_per_class(rows: list[dict]) -> None:
    """The per-class table of ``eval --per-class``."""
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}%"

    # Class names come from the weights' metadata or folder names: printable, whatever they hold.
    names = {r["class"]: printable(r["class"]) for r in rows}
    width = min(max(len("class"), *(len(n) for n in names.values())), 30)
    print(f"{'class':<{width}}  {'images':>6}  {'top-1':>6}  {'precision':>9}  most often taken for")
    for r in rows:
        taken = (f"{printable(r['confused_with'])[:30]} ({r['confused']})" if r["confused"]
                 else "-")
        print(f"{names[r['class']][:width]:<{width}}  {r['images']:>6}  {percent(r['top1']):>6}  "
              f"{percent(r['precision']):>9}  {taken}")
