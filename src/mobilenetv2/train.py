"""Training, start to finish: setup -> data -> model -> optimizer -> loop -> save.

``train(config)`` runs one process's share of a run; under ``torchrun`` every process runs it
and DistributedDataParallel keeps them in step. Rank 0 alone writes files and logs.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import platform
import signal
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, check_option_names
from .data import (
    BUILTIN_DATA,
    BatchMix,
    DataBundle,
    ShardedBatchSampler,
    build_datasets,
    data_fingerprint,
    dataset_labels,
    folder_layout,
    split_folders,
)
from .distributed import DistEnv
from .engine import ModelEma, StepState, evaluate, train_one_epoch
from .imagefolder import collate_skipping
from .registry import WEIGHT_TAGS, create_model
from .reporting import (
    LATER_METRIC_FIELDS,
    METRIC_FIELDS,
    Progress,
    RunLog,
    environment,
    log_to_stderr_unless_configured,
)
from .weights import (
    LoadedWeights,
    WeightsError,
    atomic_write,
    load_weights,
    read_weights,
    remove_stale_temporaries,
    save_weights,
)

log = logging.getLogger("mobilenetv2")


@dataclass
class TrainResult:
    """What a run left: its folder, and the metrics of its last epoch.

    ``final`` is the last row of ``OUT/metrics.csv`` (``val_top1``, ``val_top5``, ``val_loss``,
    ``train_loss``, ...; empty when the run stopped before finishing an epoch). ``int8`` is the
    report of :func:`fit`'s int8 step (``TrainConfig.int8``), ``None`` without one.
    """

    out: Path
    epochs: int
    best_top1: float
    final: dict[str, float]
    seconds: float
    interrupted: bool = False
    signal: int | None = None
    int8: dict[str, Any] | None = None

    @property
    def weights(self) -> Path:
        """The run's best weights (``OUT/best.safetensors``), for :func:`mobilenetv2.load_model`."""
        return self.out / "best.safetensors"


def fit(config: TrainConfig | None = None, *, recipe: str | None = None,
        config_file: str | Path | None = None, resume: str | Path | None = None,
        **options: Any) -> TrainResult:
    """Train from Python as ``mobilenetv2 train`` does from the command line, int8 step included.

        >>> result = mobilenetv2.fit(epochs=5, out="runs/digits")   # the embedded digits
        >>> result.best_top1, result.weights
        >>> model = mobilenetv2.load_model(result.weights)

    Args:
        config: a whole configuration (e.g. from :meth:`TrainConfig.from_recipe`); ``options``
            change fields of it.
        recipe: ``digits`` (default), ``paper``, ``torchvision``, ``torchvision-v2`` or ``cifar``;
            its values sit under ``config_file``'s and ``options``, as ``--recipe`` does.
        config_file: a YAML/JSON file of options, as ``--config``.
        resume: a run's folder to continue from its last checkpoint (``options`` may change
            what a checkpoint does not fix, e.g. ``epochs`` to train longer).
        **options: TrainConfig fields, named as the flags are (``batch_size=`` for
            ``--batch-size``).

    Log lines (one per epoch) go to stderr when logging is not set up, as the command's do. The
    caller's random number generators, deterministic-algorithms flag, signal handlers and
    logging are as they were when it returns.

    Raises:
        ValueError, FileNotFoundError: for data, weights or options that cannot work.
        NonFiniteLossError: when the loss diverges (the last good checkpoint is kept).
    """
    from .cli.common import require
    from .config import read_config_file, resolve_config, resumed_config

    with log_to_stderr_unless_configured():
        if resume is not None:
            if config is not None or recipe is not None or config_file is not None:
                raise ValueError("resume continues a run with the configuration it began with: give "
                                 "only the options to change (e.g. epochs=)")
            config = resumed_config(resume, options)
        elif config is not None:
            if recipe is not None or config_file is not None:
                raise ValueError("give either a TrainConfig or a recipe/config_file (its values "
                                 "come from TrainConfig.from_recipe)")
            check_option_names(options)
            config = replace(config, **options)
        else:
            config = resolve_config(recipe, read_config_file(config_file) if config_file else {},
                                    options)
        require(*int8_requirements(config), why="int8=True")  # before hours of training, not after
        result = train(config, resume=resume)
        if config.int8 and not result.interrupted and int(os.environ.get("RANK", "0")) == 0:
            result.int8 = quantize_run(config, result.out)
        return result


def int8_requirements(config: TrainConfig) -> tuple[str, ...]:
    """The packages ``config``'s int8 step imports (none without one)."""
    if not config.int8:
        return ()
    return ("executorch",) if config.int8_format == "executorch" else ("onnx", "onnxruntime")


def quantize_run(config: TrainConfig, out: Path) -> dict[str, Any]:
    """The int8 step of a finished run (``--int8``): ``OUT/model.onnx`` and
    ``OUT/model_int8.onnx`` (or ``.pte``), calibrated on its training images; the report of
    :func:`mobilenetv2.quantize.quantize_from_data` with ``fp32_path`` added."""
    from .quantize import quantize_from_data

    suffix = ".pte" if config.int8_format == "executorch" else ".onnx"
    fp32 = out / f"model{suffix}"
    report = quantize_from_data(out / "best.safetensors", config.data, out / f"model_int8{suffix}",
                                data_dir=config.data_dir, fp32_path=fp32,
                                pixel_input=config.pixel_input, strict=config.strict)
    return {**report, "fp32_path": str(fp32)}


def train(config: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train a model as ``config`` says; continue the run in ``resume`` if given.

    The lower-level step of :func:`fit`: ``config`` as it is (no recipe applied, no checks of a
    resume's changed options) and no int8 step.

    Raises:
        ValueError, FileNotFoundError: for data, weights or options that cannot work.
        NonFiniteLossError: when the loss diverges (the last good checkpoint is kept).
    """
    device = pick_device(config.device)
    if config.compile:
        check_compile(device)
    env = distributed.setup(device.type)
    # Process-wide state a run sets; restored so that a caller's later work is unaffected (the
    # run seeds torch's and Python's generators: a notebook's own draws go on as they would).
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    callers_rng = rng_state()
    out, created, lock = None, False, None
    try:
        resume = Path(resume) if resume else None
        out, created = _run_folder(config, env, resume)
        if env.is_main:
            lock = prepare_out_dir(out, resuming=resume is not None)
        return _train(config, env, device, out, resume)
    except Exception as e:
        if created and env.is_main and not isinstance(e, RunFolderInUse):
            discard_unused_run_folder(out)
        raise
    finally:
        if lock is not None:
            lock.release()
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
        set_rng_state(callers_rng)
        distributed.teardown()


def _run_folder(config: TrainConfig, env: DistEnv, resume: Path | None) -> tuple[Path, bool]:
    """The run's folder (rank 0's), and whether this run is the one creating it."""
    out = resume or (Path(config.out) if config.out else None)
    check_out_outside_data(out or Path("runs"), config.data)  # before anything is created
    created = False
    if out is None and env.is_main:
        try:
            out, created = new_run_folder(Path("runs")), True
        except OSError as e:  # a read-only working directory, as in many containers
            raise ValueError(f"cannot create the output folder runs/: {e.strerror or e}; pass "
                             "--out a folder that can be created") from None
    elif env.is_main and resume is None:
        created = not out.exists()
    return Path(distributed.broadcast_object(str(out), env)), created


def discard_unused_run_folder(out: Path | None) -> None:
    """Remove the folder a new run created when it failed before writing anything but its
    config.json and run.json (a wrong --data, a bad option): mistakes leave no empty runs
    behind."""
    if out is None:
        return
    with contextlib.suppress(OSError):
        if {path.name for path in out.iterdir()} <= {"config.json", "run.json"}:
            (out / "config.json").unlink(missing_ok=True)
            (out / "run.json").unlink(missing_ok=True)
            out.rmdir()


def _train(config: TrainConfig, env: DistEnv, device: torch.device, out: Path,
           resume: Path | None) -> TrainResult:
    start_time = time.perf_counter()
    if not env.is_main:
        log.setLevel(logging.WARNING)
    torch.manual_seed(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic

    def write_config() -> None:
        if env.is_main:
            text = config.to_json()  # atomic: a run killed here can still be resumed
            atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    if resume is None:
        write_config()
    elif config.data not in BUILTIN_DATA and not Path(config.data).is_dir():
        raise FileNotFoundError(f"--data {config.data} is not a folder (any more): resume the run "
                                f"in {out} with --data where its images are now")

    # Weights trained on other inputs than the data's usual normalisation (Keras' [-1, 1])
    # see their own: a frozen layer's BatchNorm statistics hold for those alone. A resumed run
    # keeps what it was trained with (a run begun by an earlier version: the data's own).
    # A --pretrained file is read once, for its normalisation, conventions and weights (a
    # missing one is named by build_model, with the hint a resume needs).
    pretrained: str | LoadedWeights | None = config.pretrained
    if pretrained and pretrained not in WEIGHT_TAGS and Path(pretrained).is_file():
        pretrained = read_weights(pretrained, use_ema=config.use_ema)
    channels = 1 if config.data == "digits" else 3
    if config.pretrained and resume is not None and (out / CHECKPOINT_NAME).exists():
        mean, std = run_normalization(out / CHECKPOINT_NAME, channels)
    else:
        mean, std = pretrained_normalization(pretrained, channels)
    # --download under torchrun: process 0 fetches the data while the others wait to read it.
    download_first = config.download and env.enabled
    if download_first and not env.is_main:
        distributed.barrier(env)
    data = build_datasets(config.data, resolution=config.resolution,
                          val_resolution=config.val_resolution, val_split=config.val_split,
                          root=config.data_dir, mean=mean, std=std,
                          download=config.download and env.is_main, seed=config.seed,
                          strict=config.strict, interpolation=config.interpolation,
                          crop_pct=config.crop_pct, auto_augment=config.auto_augment,
                          random_erase=config.random_erase)
    if download_first and env.is_main:
        distributed.barrier(env)
    # By data: recorded, so that a resume builds this network (whatever --resolution then);
    # the seed variant has no such adaptation, so nothing is recorded for it.
    if config.small_input is None and config.model != "seed":
        config = replace(config, small_input=data.small_input)
        if resume is None:
            write_config()
    resuming = resume is not None and (out / CHECKPOINT_NAME).exists()
    try:
        model = build_model(config, data, resuming=resuming, pretrained=pretrained)
    except FileNotFoundError as e:
        if resume is None or not config.pretrained:
            raise
        raise FileNotFoundError(f"{e} (the --pretrained file the run in {out} began with, which "
                                "gives the network its conventions): pass --pretrained with "
                                "where the file is now") from None
    model.meta.update(data.model_meta())
    try:
        teacher, teacher_info = build_teacher(config, data)
    except FileNotFoundError as e:
        if resume is None:
            raise
        raise FileNotFoundError(f"{e} (the teacher the run in {out} began with, as its "
                                "config.json names it): pass --teacher with where the file is now (its "
                                "SHA-256 is checked)") from None
    if teacher_info is not None:
        model.meta["distilled_from"] = teacher_info.meta()
    autocast, scaler = mixed_precision(config.amp, device)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device, memory_format=torch.channels_last if config.channels_last else None)
    if config.sync_bn and env.enabled:
        distributed.convert_sync_batchnorm(model, device.type)
    optimizer = build_optimizer(config, model)
    if config.ra_reps > 1 and not getattr(data.train, "repeatable", False):
        raise ValueError("--ra-reps repeats per-image augmentations (CIFAR, folders); the digits "
                         "are augmented by one affine warp per image and epoch")
    train_sampler = ShardedBatchSampler(len(data.train), config.batch_size, env.rank, env.world_size,
                                        shuffle=True, seed=config.seed, repeats=config.ra_reps)
    if config.grad_accum_steps > 1 and config.batch_size // env.world_size < 2 * config.grad_accum_steps:
        raise ValueError(f"--grad-accum-steps {config.grad_accum_steps} splits each process's "
                         f"{config.batch_size // env.world_size} images of a batch into micro-"
                         "batches of two images at least: it can be at most half that")
    steps_per_epoch = len(train_sampler.global_batches())
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(data.train)} images) is smaller than one step")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, steps_per_epoch=steps_per_epoch, config=config))
    ema = ModelEma(model, config.ema) if config.ema > 0 else None
    class_weights = (balanced_class_weights(dataset_labels(data.train), data.class_names).to(device)
                     if config.class_weights == "balanced" else None)
    mix = (BatchMix(data.num_classes, config.mixup_alpha, config.cutmix_alpha, config.seed)
           if config.mixup_alpha or config.cutmix_alpha else None)

    state, history, best_top1 = StepState(), [], -1.0
    if resume is not None and not (out / CHECKPOINT_NAME).exists():
        # Stopped before its first checkpoint: nothing was trained yet, so start over.
        log.info("%s holds no checkpoint yet: starting the run from the beginning", out)
    elif resume is not None:
        state, history, best_top1 = restore_run(
            out / CHECKPOINT_NAME, model, optimizer, scheduler, scaler, ema, rank=env.rank,
            teacher_sha256=teacher_info.sha256 if teacher_info is not None else None)
        if state.epoch >= config.epochs:
            log.info("%s has trained %s (--epochs %d): nothing is left to train (pass --epochs "
                     "N to train on)", out, plural(state.epoch, "epoch"), config.epochs)
        else:
            log.info("resuming %s at epoch %d, step %d", out, state.epoch + 1, state.step)
            # The checkpoint's optimizer holds the next rate of the schedule the run began
            # with; options given beside --resume (more --epochs stretch the cosine) may plan
            # another one, which then applies from this step on, and a jump is said.
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            then = optimizer.param_groups[0]["lr"]
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * factor
            now = optimizer.param_groups[0]["lr"]
            if env.is_main and not math.isclose(then, now, rel_tol=1e-6, abs_tol=1e-12):
                log.warning("warning: the resumed options change the learning-rate schedule "
                            "(%s over %d epochs, %g of warm-up): training goes on at lr %.4g, "
                            "where the run's own schedule was at %.4g", config.scheduler,
                            config.epochs, config.warmup_epochs, now, then)
    if resume is not None:  # only once the run takes the options: a refused resume changes nothing
        write_config()
    if env.is_main:
        # What trained the weights, in them: the software, the data's identity and the options
        # (not the folder or the time, so that the same run elsewhere writes the same bytes).
        software = environment()
        fingerprints = {"train": data_fingerprint(data.train, config.data),
                        "val": data_fingerprint(data.val, config.data)}
        model.meta["training"] = {**software, "data": fingerprints, "config": recorded_config(config)}
        record_session(out, {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "command": sys.argv, "resumed_at_epoch": state.epoch if resume else None,
                             **software, "host": platform.node(), "device": device_name(device),
                             "processes": env.world_size, "threads": torch.get_num_threads(),
                             "environment": {k: os.environ[k] for k in RECORDED_VARIABLES
                                             if k in os.environ},
                             "data": fingerprints}, new_run=resume is None)

    train_model: nn.Module = model
    if env.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    workers = config.workers if config.workers is not None else default_workers(data.train, device)
    train_loader = make_loader(data.train, train_sampler, workers, device, config.seed)
    val_loader = make_loader(
        data.val, ShardedBatchSampler(len(data.val), max(config.batch_size, env.world_size) * 2,
                                      env.rank, env.world_size, shuffle=False, drop_small=False),
        workers, device)
    run_log = RunLog(out, enabled=env.is_main, tensorboard=config.tensorboard)
    for warning in config_warnings(config) if env.is_main else ():
        log.warning("warning: %s", warning)
    stop = StopSignal(env, device)
    log.info("training %s on %s (%d train / %d val images, %d classes) for %s on %s%s, "
             "global batch %d, lr %.4g; writing to %s",
             model.config.get("name", "model"), data.name, len(data.train), len(data.val),
             data.num_classes, plural(config.epochs, "epoch"), device,
             f" x{env.world_size} processes" if env.enabled else "", config.batch_size,
             config.learning_rate(), out)
    if teacher is not None and state.global_step == 0 and not history:
        # Once, before training: a teacher that does not know this data (wrong classes,
        # preprocessing or file) shows here, not as a student that learns nothing.
        known = evaluate(teacher, val_loader, device=device, env=env,
                         channels_last=config.channels_last, autocast=autocast)
        log.info("teacher %s (%s, %s): top-1 %.2f%% on the %d validation images; distilling "
                 "with weight %g at temperature %g", teacher_info.path,
                 teacher_info.name + (", its EMA weights" if teacher_info.ema else ""),
                 teacher_info.classes, known["top1"], known["images"], distill_weight(config),
                 distill_temperature(config))
        chance = 100.0 / data.num_classes
        if env.is_main and known["top1"] < chance + 0.1 * (100.0 - chance):
            log.warning("warning: the teacher's top-1 is close to chance (%.1f%% for %d classes): "
                        "it has not learned these images as they reach it (other data, other "
                        "preprocessing, or a .pth of a small_input model, which carries no "
                        "such setting)%s", chance, data.num_classes,
                        "" if config.teacher_model else "; check it with mobilenetv2 eval")

    # What to type to continue this run, for the messages that end it early (quoted: a path
    # with a space, as Windows' and macOS' home folders often have, is one argument).
    resume_command = distributed.relaunch_command(
        f"train --resume {distributed.shell_quote(out)}", env)

    def save(best: bool = False) -> None:
        # Each process draws its own dropout masks, so each one's RNG state is saved (a
        # collective: every process comes here at the same step).
        rngs = [rng_state()]
        if env.enabled:
            rngs = [None] * env.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if not env.is_main:
            return
        eval_model = ema.module if ema is not None else model
        if "training" in model.meta:  # (the EMA copy's meta is the model's as it was then)
            eval_model.meta["training"] = {**model.meta["training"], "epoch": state.epoch}
        # Weights first, checkpoint last: a crash in between resumes from the previous
        # checkpoint and redoes the same steps, which rewrite the same weights.
        try:
            save_weights(eval_model, out / "last.safetensors")
            if best:
                save_weights(eval_model, out / "best.safetensors")
            save_checkpoint(out / CHECKPOINT_NAME, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "state": vars(state).copy(), "history": history, "best_top1": best_top1,
                "rng": rngs[0], "rng_per_rank": rngs, "config": config.to_dict(),
                "model_config": model.config, "model_meta": model.meta,
            })
        except OSError as e:
            if (out / CHECKPOINT_NAME).exists():
                then = f"the previous checkpoint is intact (resume with {resume_command})"
            else:  # the first save: nothing to resume from
                then = "there was no checkpoint yet (run the command again)"
            raise OSError(f"cannot save the checkpoint to {out}: {e.strerror or e}; {then}") from e

    def pause_due() -> bool:
        stopping = stop()
        return stopping or bool(config.save_every and state.global_step % config.save_every == 0)

    if history and (state.epoch >= config.epochs or patience_ran_out(history, config.patience)
                    ) and state.step == 0:  # finished; it may have died before writing its logs
        run_log.write(history)
    stop.install()
    try:
        # (An epoch a mid-epoch checkpoint began is finished before patience is asked.)
        while state.epoch < config.epochs and (state.step > 0 or
                                               not patience_ran_out(history, config.patience)):
            data.train.set_epoch(state.epoch)
            while True:  # an epoch, possibly in parts: each pause saves a mid-epoch checkpoint
                train_sampler.set_epoch(state.epoch, start=state.step)
                progress = Progress(steps_per_epoch, f"epoch {state.epoch + 1}/{config.epochs}",
                                    enabled=env.is_main, log_every=config.log_every,
                                    initial=state.step)
                state = train_one_epoch(
                    train_model, train_loader, optimizer, scheduler, state,
                    global_batch_sizes=[len(b) for b in train_sampler.global_batches()],
                    device=device, env=env, label_smoothing=config.label_smoothing,
                    class_weights=class_weights, accum_steps=config.grad_accum_steps,
                    autocast=autocast, scaler=scaler, ema=ema, ema_source=model,
                    channels_last=config.channels_last, skip_nonfinite=config.skip_nonfinite,
                    grad_clip=config.grad_clip, mix=mix, teacher=teacher,
                    distill_weight=distill_weight(config),
                    distill_temperature=distill_temperature(config), should_stop=pause_due,
                    progress=progress,
                    input_shape=(data.in_channels, data.resolution, data.resolution))
                if not state.interrupted:
                    break
                state.interrupted = False
                save()
                if stop.requested is not None:
                    log.info("stopped by %s at epoch %d, step %d; checkpoint saved. Resume with: "
                             "%s", signal.Signals(stop.requested).name, state.epoch + 1, state.step,
                             resume_command)
                    return TrainResult(out, state.epoch, best_top1, {}, time.perf_counter() - start_time,
                                       interrupted=True, signal=stop.requested)
            val_start = time.perf_counter()
            val = evaluate(ema.module if ema is not None else model, val_loader, device=device,
                           env=env, channels_last=config.channels_last, autocast=autocast)
            run_before = (history[-1].get("wall_seconds", sum(r["seconds"] for r in history))
                          if history else 0.0)  # (older runs' rows have no wall_seconds)
            row = epoch_row(state, val, last_lr(scheduler), wall_seconds=run_before + state.seconds
                            + time.perf_counter() - val_start)
            history.append(row)
            improved = val["top1"] > best_top1
            best_top1 = max(best_top1, val["top1"])
            # (The counts are every process's; the files were named by the process that read them.)
            if env.is_main and (state.skipped or val["skipped"]):
                log.warning("warning: skipped %d unreadable training and %d validation images in "
                            "epoch %d (each named once, above)", state.skipped, val["skipped"],
                            row["epoch"])
            if env.is_main and state.nonfinite:
                log.warning("warning: skipped %d steps whose loss was NaN or infinite in epoch %d "
                            "(--skip-nonfinite)", state.nonfinite, row["epoch"])
            state = StepState(epoch=state.epoch + 1, global_step=state.global_step)
            save(best=improved)
            run_log.write(history)
            log.info("epoch %d/%d  train loss %.4f top-1 %.2f%%  val loss %.4f top-1 %.2f%% "
                     "top-5 %.2f%%  %s img/s  %.1f s", row["epoch"], config.epochs,
                     row["train_loss"], row["train_top1"], row["val_loss"], row["val_top1"],
                     row["val_top5"], f"{row['images_per_second']:,.0f}", row["seconds"])
        if state.epoch < config.epochs and history:  # stopped early (--patience)
            best = _first_best(history)
            log.info("no better validation top-1 for %s: stopped early after epoch %d of "
                     "%d; best top-1 %.2f%% at epoch %d (best.safetensors)",
                     plural(config.patience, "epoch"),
                     state.epoch, config.epochs, history[best]["val_top1"], history[best]["epoch"])
    finally:
        stop.restore()
        run_log.close()
        close_loaders(train_loader, val_loader)
    final = history[-1] if history else {}
    return TrainResult(out, state.epoch, best_top1, final, time.perf_counter() - start_time)


# The options that name a file or a folder (or a tag: "digits", "imagenet").
PATH_OPTIONS = ("data", "data_dir", "pretrained", "teacher")


def recorded_config(config: TrainConfig) -> dict[str, Any]:
    """The run's options as its weights record them (``meta["training"]["config"]``): all but
    ``out``, and files and folders by their last part only (``photos``, not
    ``/home/alice/clients/acme/photos``). Weights and their exports are shared, on a model hub
    or inside an app, and a path tells of the machine, its user and their projects; the data
    is known by its fingerprint, and ``run.json``, which stays in the run's folder, keeps the
    command as typed."""
    options = {k: v for k, v in config.to_dict().items() if k != "out"}
    for key in PATH_OPTIONS:
        if isinstance(options.get(key), str):
            options[key] = Path(options[key]).name or options[key]
    return options


# Set by a user or a scheduler, they change what a run computes or where.
RECORDED_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                      "CUBLAS_WORKSPACE_CONFIG", "TORCHELASTIC_RESTART_COUNT")


def record_session(out: Path, session: dict[str, Any], new_run: bool) -> None:
    """Add ``session`` to ``out/run.json``: one entry per invocation that trained in the
    folder (the first, then each resume), so a model can be traced to the software, machine,
    command and data of every part of its training. A ``new_run`` starts the file afresh (an
    attempt killed before its first checkpoint left nothing it describes)."""
    path = out / "run.json"
    sessions: list[Any] = []
    if path.is_file() and not new_run:
        try:
            sessions = list(json.loads(path.read_text(encoding="utf-8"))["sessions"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # (too nested)
            log.warning("warning: %s cannot be read (%s): it is started afresh with this session",
                        path, str(e)[:200])
    text = json.dumps({"sessions": [*sessions, session]}, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``: which accelerator, for the records."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def config_warnings(config: TrainConfig) -> list[str]:
    """Options that run but are likely a mistake, said once before training."""
    warnings = []
    if config.optimizer == "adamw" and config.lr is None and config.learning_rate() > 0.01:
        warnings.append(
            f"--optimizer adamw at the {config.recipe} recipe's learning rate "
            f"{config.learning_rate():.4g}, which is set for SGD/RMSProp: AdamW's steps are about "
            "the rate in size, so it is usually run near 1e-3 (pass --lr)")
    return warnings


def patience_ran_out(history: list[dict[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` epochs of ``history`` all failed to beat the best
    validation top-1 before them (``--patience``; 0: never). Read from the history alone, so a
    resumed run decides as the uninterrupted one would have."""
    if not patience or not history:
        return False
    return len(history) - 1 - _first_best(history) >= patience


def _first_best(history: list[dict[str, Any]]) -> int:
    """The index of the first epoch with the highest validation top-1."""
    return max(range(len(history)), key=lambda i: (history[i]["val_top1"], -i))


def block_prefixes(model: nn.Module) -> list[str]:
    """The state_dict prefixes of a mobilenet_v2 model's inverted residual blocks, in order."""
    return [f"stages.{i}.{j}." for i, stage in enumerate(model.stages) for j in range(len(stage))]


def restore_run(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    ema: ModelEma | None = None,
    rank: int = 0,
    teacher_sha256: str | None = None,
) -> tuple[StepState, list[dict[str, Any]], float]:
    """Load the checkpoint at ``path`` into a run's objects: (position, history, best top-1).

    Process ``rank`` takes its own RNG state where the checkpoint has one per process.
    ``teacher_sha256``: the run's teacher file now, refused if the run began with another.

    Raises:
        FileNotFoundError: when there is no checkpoint.
        WeightsError: for a damaged or unsafe file, or one from another model or optimizer.
    """
    checkpoint = load_checkpoint(path)
    meta = checkpoint.get("model_meta") if isinstance(checkpoint.get("model_meta"), dict) else {}
    then, now = meta.get("class_names"), getattr(model, "meta", {}).get("class_names")
    if isinstance(then, list) and isinstance(now, list) and then != now:
        added, gone = [c for c in now if c not in then], [c for c in then if c not in now]
        change = "; ".join(f"{what}: {', '.join(map(str, names[:5]))}{' ...' * (len(names) > 5)}"
                           for what, names in (("new", added), ("gone", gone)) if names)
        raise ValueError(f"the data's classes changed since {path.parent} began ({len(then)} "
                         f"then, {len(now)} now; {change or 'in another order'}): resume with "
                         f"the data it began with, or start a new run (--out) from its weights "
                         f"with --pretrained {path.parent / 'last.safetensors'}")
    before = meta.get("distilled_from")
    if (teacher_sha256 is not None and isinstance(before, dict)
            and before.get("sha256") != teacher_sha256):
        raise ValueError(f"the teacher file is not the one {path.parent} began with "
                         f"({before.get('file')}, sha256 {str(before.get('sha256'))[:12]}...): "
                         "pass that file with --teacher, or start a new run (--out)")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:  # load_state_dict does not check the buffers
            for param in group["params"]:
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                        raise ValueError("its optimizer state has other shapes than the model")
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None and checkpoint.get("ema"):
            ema.load_state_dict(checkpoint["ema"])
        state = StepState(**checkpoint["state"])
        history, best_top1 = list(checkpoint["history"]), float(checkpoint["best_top1"])
        rngs = checkpoint.get("rng_per_rank")
        set_rng_state(rngs[rank] if isinstance(rngs, list) and rank < len(rngs)
                      else checkpoint["rng"])
        if not all(isinstance(getattr(state, k), int) and getattr(state, k) >= 0
                   for k in ("epoch", "step", "global_step")):
            raise ValueError(f"its position is not a count of steps: {vars(state)}")
        if not all(isinstance(row, dict) and all(isinstance(row.get(k), (int, float))
                                                 for k in METRIC_FIELDS
                                                 if k in row or k not in LATER_METRIC_FIELDS)
                   for row in history):  # (an older run's rows lack the later columns)
            raise ValueError("its metrics history is not a list of epoch rows")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError,
            ArithmeticError) as e:  # what the loaders raise on a damaged state (found by fuzzing)
        raise WeightsError(f"{path} does not fit this run: {' '.join(str(e).split())[:300]}; "
                           "resume with the model and options it was saved with") from None
    return state, history, best_top1


def last_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the last step used (the first parameter group's): the optimizer
    already holds the next step's, as torchvision's reference logs it during the step."""
    step = max(scheduler.last_epoch - 1, 0)
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step)


def epoch_row(state: StepState, val: dict[str, float], lr: float,
              wall_seconds: float = 0.0) -> dict[str, Any]:
    """A row of metrics.csv. ``seconds`` is the epoch's training time; ``wall_seconds`` the
    run's training and evaluation time up to the end of this epoch, over every resume (time
    while the run was stopped not counted): the x axis of a time-to-accuracy plot."""
    seen = max(state.seen, 1)
    return {
        "epoch": state.epoch + 1,
        "train_loss": state.loss_sum / seen,
        "train_top1": 100.0 * state.correct / seen,
        "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
        "lr": lr,
        "images_per_second": state.seen / max(state.seconds, 1e-9),
        "seconds": state.seconds,
        "wall_seconds": wall_seconds,
    }


# --------------------------------------------------------------------------------------------
# Building blocks


def distill_weight(config: TrainConfig) -> float:
    """The teacher's share of the loss (``--distill-weight``; default 0.5)."""
    return 0.5 if config.distill_weight is None else config.distill_weight


def distill_temperature(config: TrainConfig) -> float:
    """The softmax temperature of distillation (``--distill-temperature``; default 1)."""
    return 1.0 if config.distill_temperature is None else config.distill_temperature


def build_teacher(config: TrainConfig, data: DataBundle) -> tuple[nn.Module | None, Any]:
    """(the teacher, what to say and record about it) for ``--teacher``; (None, None) without."""
    if config.teacher is None:
        return None, None
    from .distill import load_teacher

    return load_teacher(config.teacher, class_names=data.class_names, mean=data.mean,
                        std=data.std, in_channels=data.in_channels,
                        resolutions={data.resolution, data.val_resolution}, data=data.name,
                        folders=folder_layout(config.data) is not None,
                        model_name=config.teacher_model, use_ema=config.teacher_use_ema)


def pick_device(name: str, mps: bool = False) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) where there are GPUs, else the CPU.

    ``mps``: whether the caller runs on Apple's GPUs (``predict`` does: inference only).
    Training and evaluation do not: their metrics add up in float64, which MPS lacks, so a
    Mac user is told so in one line rather than by a traceback after the data has loaded.

    Raises:
        ValueError: a device that is not one, that this machine lacks, or that is not supported.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = f"cuda:{local_rank}"
    supported = "auto, cpu, cuda, cuda:N" + (" or mps" if mps else "")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use {supported}") from None
    if device.type == "mps":
        if not mps:
            raise ValueError("--device mps: Apple's GPUs are not supported for training and "
                             "evaluation (their metrics add up in float64, which MPS lacks): "
                             "pass --device cpu")
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps was asked for, but MPS is not available (it needs "
                             "an Apple-silicon Mac and a PyTorch built with MPS): pass --device cpu")
    elif device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported here: use {supported}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for, but no CUDA GPU is available: "
                             "pass --device cpu, or leave --device out")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"GPU {device.index} was asked for, but this machine has {torch.cuda.device_count()}: "
                "start at most one process per GPU (torchrun --nproc_per_node), or pass --device cpu")
    return device


def check_compile(device: torch.device) -> None:
    """Refuse ``--compile`` where torch.compile cannot build code: its Inductor backend
    compiles C++ for the CPU (Windows' ``cl`` from Visual Studio's Build Tools, which most
    Windows machines lack; a Mac's ``clang++`` from Xcode's command line tools) and Triton
    kernels for CUDA GPUs (no official Triton wheels for Windows). Without them the run
    failed at its first step, after loading the data, in a 100-line traceback.

    Raises:
        ValueError: the compiler ``--compile`` needs on ``device`` is missing.
    """
    try:  # torch's private helpers: where they moved, torch.compile itself says what it lacks
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch.utils._triton import has_triton
    except ImportError:
        return
    if device.type == "cuda":
        if not has_triton():
            raise ValueError("--compile on a GPU needs Triton, which is not installed here "
                             "(pip install triton; Windows has no official build): drop --compile")
        return
    try:
        get_cpp_compiler()
    except (RuntimeError, OSError) as e:
        from .runtime import one_line

        raise ValueError(
            f"--compile on the CPU needs a C++ compiler, and none works here ({one_line(e)}): "
            "install one (Windows: Visual Studio's Build Tools, then run from their developer "
            "prompt; macOS: xcode-select --install), or drop --compile") from None


def build_model(config: TrainConfig, data: DataBundle, resuming: bool = False,
                pretrained: str | LoadedWeights | None = None) -> nn.Module:
    """The model for this data: classes and channels from the data, the rest from the config.
    ``resuming``: a checkpoint will replace the weights, so a ``--pretrained`` tag is not
    fetched (a file is still read, for the conventions it was trained with). ``pretrained``:
    ``config.pretrained``'s weights when the caller has read them already."""
    from .model import MobileNetV2

    # A file is read once, for its conventions and its weights; a tag is fetched when loading.
    pretrained = pretrained if pretrained is not None else config.pretrained
    if pretrained and isinstance(pretrained, str) and pretrained not in WEIGHT_TAGS:
        pretrained = read_weights(pretrained, use_ema=config.use_ema)
    if config.model == "seed":
        if (config.width_mult is not None or config.drop_path or config.grad_checkpointing
                or not config.linear_bottleneck or not config.use_residual):
            raise ValueError("--width-mult, --drop-path, --no-linear-bottleneck, "
                             "--no-use-residual and --grad-checkpointing do not apply to the "
                             "seed variant: drop them, or pick a mobilenet_v2_* model")
        if data.val_resolution != data.resolution:
            raise ValueError("the seed variant's classifier fixes its input size: drop "
                             "--val-resolution, or pick a mobilenet_v2_* model")
        if data.resolution < 32 or data.resolution % 32:  # the digits' default 16 px, say
            raise ValueError(
                f"the seed variant takes images whose side is a multiple of 32 (its final Linear "
                f"layer sees the whole side/32 map), not {data.resolution} px: pass --resolution "
                f"{max(32, round(data.resolution / 32) * 32)}")
        model = create_model("seed", input_width=data.resolution, num_classes=data.num_classes,
                             in_channels=data.in_channels)
    else:
        kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels,
                  "dropout": config.dropout, "drop_path_rate": config.drop_path,
                  "linear_bottleneck": config.linear_bottleneck,
                  "use_residual": config.use_residual,
                  "small_input": data.small_input if config.small_input is None else config.small_input}
        if pretrained:  # Keras' weights need TensorFlow's padding and BatchNorm epsilon
            kwargs |= pretrained_conventions(pretrained)
        if config.width_mult is not None:
            if config.pretrained in WEIGHT_TAGS:
                raise ValueError(f"--pretrained {config.pretrained} names the weights of a "
                                 "registered model: pick it with --model, not --width-mult")
            model = MobileNetV2(width_mult=config.width_mult, **kwargs)
            model.config["name"] = f"mobilenet_v2 (width {config.width_mult})"
        else:
            model = create_model(config.model, **kwargs)
    if pretrained and not (resuming and config.pretrained in WEIGHT_TAGS):
        load_pretrained(model, pretrained, name=config.model)
    if config.grad_checkpointing:
        model.set_grad_checkpointing()
    if config.freeze is not None:
        freeze_layers(model, config.freeze)
    return model


def freeze_layers(model: nn.Module, part: int | str) -> list[str]:
    """Freeze ``part`` of ``model`` for fine-tuning: ``"backbone"`` (everything but the
    classifier) or ``N`` (the stem and the first N inverted residual blocks). Frozen parameters
    stop requiring gradients; :func:`mobilenetv2.engine.train_mode` runs the modules they make
    up as at inference. Returns the frozen parameters' names.

    Raises:
        ValueError: for N beyond the model's blocks, or N on the seed variant.
    """
    if part == "backbone":
        keep = {id(p) for p in model.get_classifier().parameters()}
        frozen = [name for name, p in model.named_parameters() if id(p) not in keep]
    else:
        if model.config.get("arch") != "mobilenet_v2":
            raise ValueError("--freeze N counts the blocks of a mobilenet_v2_* model; the seed "
                             "variant takes --freeze backbone")
        blocks = block_prefixes(model)
        if part > len(blocks):
            raise ValueError(f"--freeze {part}: the model has {len(blocks)} blocks (--freeze "
                             "backbone also freezes the head conv)")
        prefixes = ("stem.", *blocks[:part])
        frozen = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    total = sum(p.numel() for p in parameters.values())
    trained = sum(p.numel() for p in parameters.values() if p.requires_grad)
    log.info("--freeze %s: training %s of %s parameters", part, f"{trained:,}", f"{total:,}")
    return frozen


def pretrained_conventions(source: str | LoadedWeights) -> dict[str, Any]:
    """The constructor options (``tf_padding``, ``bn_eps``) that the weights in ``source``
    were trained with, where its file says so; none for torchvision's and timm's."""
    from .keras_weights import KERAS_CONFIG, KERAS_TAGS
    from .weights import _CONVENTIONS

    if isinstance(source, str) and source in WEIGHT_TAGS:
        return dict(KERAS_CONFIG) if source in KERAS_TAGS else {}
    stored = read_weights(source).config or {}
    return {k: stored[k] for k in _CONVENTIONS if k in stored}


def pretrained_normalization(source: str | LoadedWeights | None,
                             channels: int) -> tuple[Any, Any]:
    """The mean and std that ``--pretrained`` weights were trained with, for ``channels``
    (RGB statistics averaged for grayscale, as the stem is summed): Keras' (mean and std 0.5,
    its ``preprocess_input``), and those a run of ours stored; (None, None), the data's own,
    for torchvision's and timm's (ImageNet's) and for weights that record none."""
    from .keras_weights import KERAS_META, KERAS_TAGS

    meta: Any = None
    if isinstance(source, str) and source in KERAS_TAGS:
        meta = KERAS_META
    elif isinstance(source, LoadedWeights) or (
            source and source not in WEIGHT_TAGS and Path(source).is_file()):
        loaded = read_weights(source)  # (one already read is taken as it is)
        # (a model saved before training has placeholder statistics and no dataset)
        if loaded.format == "keras" or (loaded.meta or {}).get("dataset"):
            meta = loaded.meta
    return _normalization(meta, channels)


def run_normalization(checkpoint: Path, channels: int) -> tuple[Any, Any]:
    """The mean and std that the run of ``checkpoint`` has trained with, which its resume
    keeps; (None, None) where it records none for ``channels``."""
    meta = load_checkpoint(checkpoint).get("model_meta")
    return _normalization(meta if isinstance(meta, dict) else None, channels)


def _normalization(meta: dict[str, Any] | None, channels: int) -> tuple[Any, Any]:
    mean, std = (list((meta or {}).get(key) or ()) for key in ("mean", "std"))
    if len(mean) == len(std) == 3 and channels == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    if not mean or len(mean) != channels or len(std) != channels:
        return None, None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def pretrained_model_name(source: str, use_ema: bool = False) -> str | None:
    """The registered model whose network a ``--pretrained`` file holds (its width and
    depth), or None for a tag, a missing file, or a network no name builds."""
    if source in WEIGHT_TAGS or not Path(source).is_file():
        return None  # a tag picks --model's weights; a missing file is named when loading
    return _network_name(read_weights(source, use_ema=use_ema))


def _network_name(loaded: LoadedWeights) -> str | None:
    from .registry import name_for
    from .weights import infer_config

    try:
        return name_for(infer_config(loaded))
    except (KeyError, IndexError, ValueError, TypeError, ArithmeticError):
        return None  # not a network this package reads off shapes: loading says what is wrong


def load_pretrained(model: nn.Module, source: str | LoadedWeights,
                    name: str = "mobilenet_v2_100") -> None:
    """Start from other weights (fine-tuning): a fresh classifier when the classes differ, and
    the stem summed over colours when the data is grayscale and the weights are RGB
    (:func:`mobilenetv2.weights.adapt_state_dict`, timm's rule).

    ``source`` is a file or a tag of :data:`WEIGHT_TAGS`, which picks the ImageNet weights
    of model ``name``."""
    from .registry import name_for, pretrained_source
    from .weights import adapt_state_dict, convert_state_dict

    if isinstance(source, str) and source in WEIGHT_TAGS:
        if name == "seed":
            raise ValueError(f"--pretrained {source}: there are no ImageNet weights for the "
                             "seed variant; pick a mobilenet_v2_* model")
        reference = create_model(name, **pretrained_conventions(source))  # their 1000 classes
        loaded = read_weights(pretrained_source(reference.config["name"], source, reference))
    else:
        loaded = read_weights(source)
        found, wanted = _network_name(loaded), name_for(getattr(model, "config", {}))
        if found and wanted and found != wanted and "seed" not in (found, wanted):
            # (loading would blame "state_dict" and suggest the file's conventions away)
            raise ValueError(f"--pretrained {loaded.source} holds {found}'s weights, but the "
                             f"model is {wanted}: pass --model {found}, or leave --model out "
                             "to build the file's network")
    own = model.state_dict()
    state, fresh = adapt_state_dict(convert_state_dict(loaded, model), own)
    # The fresh classifier keeps its own initialisation (adapt_state_dict said so); whatever
    # else the file lacks (a backbone's file has no head) load_weights names in the log.
    load_weights(model, state | {k: own[k] for k in fresh}, strict=False)
    log.info("starting from %s", source if isinstance(source, str) else source.source)


def balanced_class_weights(labels: list[int], class_names: list[str]) -> torch.Tensor:
    """``N / (K * n_c)`` for each class c with n_c of the N training examples (K: the classes
    that have any), scikit-learn's ``compute_class_weight("balanced")``, which Keras users pass
    as ``class_weight``: every class then weighs as much in the loss as any other, and the
    weights average 1 over the examples. A class without examples gets 0 (it never appears)."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(class_names))
    present = counts > 0
    weights = torch.where(present, len(labels) / (int(present.sum()) * counts.clamp(min=1)), 0.0)
    low, high = int(weights.masked_fill(~present, math.inf).argmin()), int(weights.argmax())
    log.info("--class-weights balanced: from %.3g (%s, %d images) to %.3g (%s, %d images)",
             weights[low], class_names[low], counts[low], weights[high], class_names[high],
             counts[high])
    return weights.to(torch.get_default_dtype())


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv and linear weights only, as timm regularises them; none on BN
    parameters and biases unless ``decay_norm_and_bias`` (torchvision's reference), and none on
    depthwise filters without ``decay_depthwise`` (TF-Slim's MobileNets). With ``layer_decay``, one group per depth (see :func:`layer_depths`)
    whose learning rate is ``lr * layer_decay ** (deepest - depth)``, the deepest first."""
    lr = config.learning_rate()
    depths = layer_depths(model) if config.layer_decay else {}
    deepest = max(depths.values(), default=0)
    depthwise = set() if config.decay_depthwise else {
        id(m.weight) for m in model.modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels}
    grouped: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen layers (--freeze) are not optimised
            decays = (p.ndim > 1 or config.decay_norm_and_bias) and id(p) not in depthwise
            grouped.setdefault((depths.get(name, deepest), decays), []).append(p)
    groups = [{"params": params, "weight_decay": config.weight_decay if decays else 0.0,
               "lr": lr * (config.layer_decay or 1.0) ** (deepest - depth)}
              for (depth, decays), params in sorted(grouped.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    if config.optimizer == "rmsprop":
        # TF's RMSProp adds eps inside the square root (sqrt(v + eps)); torch's outside
        # (sqrt(v) + eps). With eps = 1.0 both damp steps while v is small.
        return torch.optim.RMSprop(groups, lr=lr, alpha=config.rmsprop_decay,
                                   eps=config.rmsprop_eps, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth for layer-wise lr decay, as timm's ``param_groups_layer_decay``
    counts it from ``group_matcher``: the stem 0, the inverted residual blocks 1 to N in
    order, the head conv N as well (timm's grouping puts it with the last block), the
    classifier N + 1."""
    prefixes = block_prefixes(model)
    blocks = len(prefixes)

    def depth(name: str) -> int:
        if name.startswith("stem."):
            return 0
        if name.startswith("head."):
            return blocks
        return next((k + 1 for k, prefix in enumerate(prefixes) if name.startswith(prefix)),
                    blocks + 1)

    return {name: depth(name) for name, _ in model.named_parameters()}


def lr_factor(step: int, *, steps_per_epoch: int, config: TrainConfig) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up, then the
    schedule (cosine to zero, ``lr_decay_rate`` every ``lr_decay_epochs``, or constant)."""
    epoch = step / steps_per_epoch
    warmup = config.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if config.scheduler == "cosine":
        progress = (epoch - warmup) / max(config.epochs - warmup, 1e-9)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if config.scheduler == "step":
        return config.lr_decay_rate ** math.floor((epoch - warmup) / config.lr_decay_epochs + 1e-9)
    return 1.0


def mixed_precision(mode: str, device: torch.device):
    """(autocast context, GradScaler or None): bf16 where the GPU has it, fp16 with a scaler
    on older GPUs, full precision on CPUs (bf16 autocast is slower there: see BENCHMARKS.md)."""
    if mode == "auto":
        mode = "off"
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "off":
        return nullcontext(), None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU; use --amp bf16 or off on CPUs")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return autocast, scaler


def workers_would_rerun_the_script() -> bool:
    """Whether worker processes would fail to start, so that none are started by default
    (a warning says why, once): where they start with spawn (macOS, Windows), each runs the
    main script again, and a script that calls mobilenetv2 outside an ``if __name__ ==
    "__main__":`` block starts workers again from the worker, which Python refuses; a
    student's five-line script ended in a 190-line traceback ("DataLoader worker exited
    unexpectedly"). Notebooks, ``python -m`` and the ``mobilenetv2`` command are not scripts
    run again, or have the block."""
    import ast

    import torch.multiprocessing

    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if torch.multiprocessing.get_start_method() == "fork" or not path:
        return False
    unguarded = _UNGUARDED_SCRIPTS.get(path)
    if unguarded is None:
        try:
            body = ast.parse(Path(path).read_bytes()).body
        except (OSError, SyntaxError, ValueError):  # not Python source: a frozen app, say
            body = None
        unguarded = body is not None and not any(
            isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) for node in body)
        _UNGUARDED_SCRIPTS[path] = unguarded
        if unguarded:
            log.warning("warning: images are decoded in this process, not in worker processes: "
                        "on macOS and Windows each worker runs %s again, which calls "
                        "mobilenetv2 outside an 'if __name__ == \"__main__\":' block; put the "
                        "calls in one for parallel decoding", Path(path).name)
    return unguarded


_UNGUARDED_SCRIPTS: dict[str, bool] = {}  # main script -> unguarded (said once)


def default_workers(dataset: Any, device: torch.device, batches: int | None = None) -> int:
    """DataLoader processes that decode ``dataset``'s images while the model runs, when
    ``--workers`` is not given: none for data in memory, else up to 8 per GPU process (of
    LOCAL_WORLD_SIZE on this machine), or on a CPU up to 4, one CPU left to the model's
    threads.

    ``batches``: the loader's, for one pass (``eval``). Where workers start with spawn
    (macOS, Windows), each imports torch again before its first batch, seconds that a few
    batches do not repay: there, one worker per four batches, as ``predict`` starts them.
    """
    if getattr(dataset, "in_memory", False):
        return 0  # in memory already: worker processes would only add start-up and copies
    if workers_would_rerun_the_script():
        return 0
    import torch.multiprocessing

    from .runtime import usable_cpus

    cpus = usable_cpus()  # within a container's CPU quota
    per_process = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    workers = min(8, per_process) if device.type == "cuda" else min(4, max(1, per_process - 1))
    if batches is not None and torch.multiprocessing.get_start_method() != "fork":
        workers = min(workers, batches // 4)
    return workers


def make_loader(dataset, batch_sampler, workers: int, device: torch.device, seed: int = 0):
    # The loader's own generator: otherwise every new iterator draws from the global RNG, and
    # a resumed epoch would see other dropout masks than the uninterrupted one. Persistent
    # workers keep the copy of the dataset they were started with: one whose set_epoch does
    # not reach those copies (the digits' epoch of warped images) gets new workers each epoch.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers,
        collate_fn=collate_skipping, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0 and (not hasattr(dataset, "set_epoch")
                                            or getattr(dataset, "epoch_in_shared_memory", False)),
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=leave_stop_signals_to_the_main_process if workers > 0 else None)
    if workers > 0:
        _WORKER_LOADERS.add(loader)
    return loader


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker ignores SIGINT and SIGTERM: the training process handles them (it
    saves a checkpoint and shuts its loaders down, which ends the workers). A batch scheduler
    (SLURM's preemption, ``kill -- -PGID``, a terminal's Ctrl-C) signals every process of the
    job, and a worker killed by it ended the run in a traceback, with no checkpoint. A worker
    whose training process dies still ends: it watches its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Loaders whose workers ignore SIGTERM. Python ends the worker processes still alive at exit
# with SIGTERM and waits for them: a loader kept alive until then (a reference cycle, a
# caller's traceback) would hang the interpreter's exit. Each is shut down when its run ends,
# and any left at exit before multiprocessing's own hook runs (atexit: last in, first out).
_WORKER_LOADERS: weakref.WeakSet = weakref.WeakSet()


def close_loaders(*loaders: torch.utils.data.DataLoader) -> None:
    """Stop the persistent worker processes of ``loaders`` (all of make_loader's if none)."""
    for loader in loaders or list(_WORKER_LOADERS):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None
        _WORKER_LOADERS.discard(loader)


atexit.register(close_loaders)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``; ``nouns`` for another plural (``class``, ``classes``)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def new_run_folder(parent: Path) -> Path:
    """``parent/<YYYYmmdd-HHMMSS>``, created here, with ``-2``, ``-3`` ... when a run started
    in the same second has it: two runs never share a folder."""
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    parent.mkdir(parents=True, exist_ok=True)
    out, n = parent / stamp, 1
    while True:
        try:
            out.mkdir()  # atomic: of two runs, one gets it
            return out
        except FileExistsError:
            n += 1
            out = parent / f"{stamp}-{n}"


def check_out_outside_data(out: Path, data: str) -> None:
    """Refuse an output folder among the images: inside a folder of class folders, or
    inside the train/ or val/ of a folder of splits, it would become a class of the data."""
    layout = folder_layout(data)
    if layout is None:
        return
    folders = split_folders(Path(data)) if layout == "split" else [Path(data)]
    for folder in folders:
        if out.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"--out {out} is inside {folder}, whose folders are the classes: "
                             "write the run somewhere else")


# What a run writes besides checkpoint.pt and config.json; a new run never overwrites them.
RUN_FILES = ("best.safetensors", "last.safetensors", "metrics.csv")


class RunFolderInUse(ValueError):
    """Another process is training in the run's folder."""


class RunFolderLock:
    """The lock of :func:`lock_run_folder`, until :meth:`release` or the process's end."""

    # Forked processes (DataLoader workers) would share a lock and keep it for seconds after a
    # SIGKILL of this one, refusing the resume that follows: they close their copies (one hook
    # for the process, not one per run).
    held: set[int] = set()

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        RunFolderLock.held.add(fd)

    @staticmethod
    def close_copies() -> None:
        for fd in RunFolderLock.held:
            with contextlib.suppress(OSError):
                os.close(fd)
        RunFolderLock.held.clear()

    def release(self) -> None:
        if self.fd is not None:
            RunFolderLock.held.discard(self.fd)
            os.close(self.fd)
            self.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=RunFolderLock.close_copies)


def lock_run_folder(out: Path) -> RunFolderLock | None:
    """Lock the folder ``out`` for this process (``flock``, held until it is released, or the
    process dies, even by SIGKILL): two processes that resume one run, or start one --out at
    once (a job requeued while its first instance still saves), would train twice and write
    each other's files. None where the file system has no locks (some NFS and Lustre mounts):
    best effort, as before.

    Raises:
        RunFolderInUse: another process holds it.
    """
    try:
        import fcntl
        fd = os.open(out, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderInUse(f"{out} is in use by another training process: wait until it has "
                             "ended (then --resume it), or pass another --out") from None
    except OSError:
        os.close(fd)
        return None
    return RunFolderLock(fd)


def prepare_out_dir(out: Path, resuming: bool) -> RunFolderLock | None:
    """Create the output folder and lock it (:func:`lock_run_folder`, whose lock it returns);
    refuse to mix a new run into an old run's files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out}: {e.strerror or e}; pass --out "
                         "a folder that can be created") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"the output folder {out} is not writable: pass --out to another folder")
    lock = lock_run_folder(out)
    try:
        _check_out_dir(out, resuming)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _check_out_dir(out: Path, resuming: bool) -> None:
    if resuming:
        for tmp in remove_stale_temporaries(out):
            log.info("removed %s, left half-written by a process that was killed", tmp)
        return
    if (out / CHECKPOINT_NAME).exists():
        raise ValueError(f"{out} already holds a run: pass --resume "
                         f"{distributed.shell_quote(out)} to continue it, or another --out")
    # A run without its checkpoint (deleted to save space) still has weights worth keeping.
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise ValueError(f"{out} already holds a run's {', '.join(found)}: pass another --out, "
                         "or move them away first")


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: the run stops where it is (its last checkpoint stays), and
    the command exits with 128 + ``signum``, the signal's own code."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignal:
    """SIGINT/SIGTERM ask the run to stop at the next step, save and exit; all processes agree
    on the step (a collective every few steps), and a second signal stops at once. A repeat
    within ``REPEAT_WINDOW`` seconds is the same request, not a second one: a batch scheduler
    and the launcher that forwards its signal (SLURM's slurmstepd and srun) send SIGTERM twice
    within milliseconds, and stopping at once would lose the steps since the last checkpoint."""

    CHECK_EVERY = 10
    REPEAT_WINDOW = 1.0

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.env, self.device = env, device
        self.requested: int | None = None
        self.requested_at = 0.0
        self.calls = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            if time.monotonic() - self.requested_at < self.REPEAT_WINDOW:
                return  # the same request, sent twice
            raise StoppedAtOnce(signum)
        self.requested, self.requested_at = signum, time.monotonic()
        log.info("%s received: stopping after this step (send again to stop at once)",
                 signal.Signals(signum).name)

    def __call__(self) -> bool:
        if not self.env.enabled:
            return self.requested is not None
        self.calls += 1
        if self.calls % self.CHECK_EVERY:
            return False
        flag = torch.tensor([0 if self.requested is None else self.requested], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.requested is None:
            self.requested = int(flag.item())
        return bool(flag.item())
