"""One training epoch and one evaluation pass: explicit arguments, no argparse inside.

Metrics are accumulated on the device and read back only when the progress display refreshes
and at the end, so a GPU never waits on the host between steps. Under DDP each process adds
up counts (examples, correct, summed loss) that are all-reduced once at the end.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distill import distillation_loss
from .distributed import DistEnv, all_reduce_sum
from .reporting import Progress


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class StepState:
    """Where training is, and the running sums of the epoch so far (saved on interrupt)."""

    epoch: int = 0
    step: int = 0  # steps done in this epoch
    global_step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    skipped: int = 0  # unreadable images
    nonfinite: int = 0  # steps left out by skip_nonfinite
    seconds: float = 0.0
    interrupted: bool = False


class ModelEma:
    """Exponential moving average of a model's weights and BatchNorm statistics (TF-Slim
    evaluates these).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, as in
    TF's ``ExponentialMovingAverage(num_updates=...)``, so short runs are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0
        # BatchNorm's running statistics are averaged with the weights, as TF-Slim (its
        # moving_average_variables), torchvision's reference (use_buffers=True) and timm's
        # ModelEmaV2/V3 average them: statistics of the current weights would not fit the
        # averaged ones. Integer buffers (num_batches_tracked) are copied. Which is which is
        # fixed, so it is sorted once (load_state_dict copies into these same tensors).
        tensors = [*self.module.parameters(), *self.module.buffers()]
        self._is_float = [t.is_floating_point() for t in tensors]
        self._floats = [t for t, f in zip(tensors, self._is_float, strict=True) if f]
        self._others = [t for t, f in zip(tensors, self._is_float, strict=True) if not f]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        new = [*model.parameters(), *model.buffers()]
        floats = [t.detach() for t, f in zip(new, self._is_float, strict=True) if f]
        torch._foreach_lerp_(self._floats, floats, 1 - decay)
        if self._others:
            others = [t for t, f in zip(new, self._is_float, strict=True) if not f]
            torch._foreach_copy_(self._others, others)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


Batch = tuple[torch.Tensor | None, torch.Tensor | None, int]


def device_batches(loader: Iterable[Batch], device: torch.device, channels_last: bool = False):
    """The loader's ``(images, labels, dropped)`` batches on ``device``, images in the model's
    memory format (``images`` is ``None`` where every image of a batch was unreadable).

    On a GPU the next batch is copied (and converted to channels_last) on a side stream while
    the current one trains, as timm's ``PrefetchLoader`` and apex's ``data_prefetcher`` do.
    Copied on the compute stream, as ``tensor.to(device, non_blocking=True)`` in a plain loop
    does, each step would first wait for its own copy: about 150 MB for 256 RGB images at
    224x224, several milliseconds of an otherwise busy GPU.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type != "cuda":
        for images, labels, dropped in loader:
            if images is not None:
                images = images.to(device).contiguous(memory_format=memory_format)
                labels = labels.to(device)
            yield images, labels, dropped
        return
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)
    pending: tuple[Batch, torch.cuda.Event | None] | None = None
    for images, labels, dropped in loader:
        copied = None
        if images is not None:
            with torch.cuda.stream(copy_stream):
                images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(copy_stream)
        if pending is not None:
            yield _hand_over(*pending, compute_stream)
        pending = (images, labels, dropped), copied
    if pending is not None:
        yield _hand_over(*pending, compute_stream)


def _hand_over(batch: Batch, copied: torch.cuda.Event | None, stream: torch.cuda.Stream) -> Batch:
    """Make a batch copied on the side stream safe to use on ``stream``."""
    images, labels, dropped = batch
    if copied is not None:
        stream.wait_event(copied)  # this batch's copy only, not the next one's
        # Memory allocated on the side stream: not to be reused before ``stream`` is done with it.
        images.record_stream(stream)
        labels.record_stream(stream)
    return images, labels, dropped


# A diverged run is noticed within this many steps (one host sync, a collective under torchrun).
NONFINITE_CHECK_STEPS = 20


def _any_process(flag: torch.Tensor, env: DistEnv) -> bool:
    """Whether ``flag`` (a boolean scalar) is set on any process; the same answer on all."""
    count = flag.to(torch.float32).reshape(1)
    return bool(all_reduce_sum(count, env).item() > 0)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The summed cross-entropy of a batch; ``targets`` are class indices or (mixed) class
    probabilities.

    With ``class_weights``, each example's whole loss, label smoothing included, is multiplied
    by its class's weight (a mixed example's by its classes' weights, mixed alike), as Keras
    applies ``class_weight`` and scikit-learn ``sample_weight``. Not torch's ``weight=``, which
    also weighs the smoothing every example spreads over the other classes by *their* weights:
    with 10:1 classes and smoothing 0.1, that pulls every common-class image towards the rare
    class, and past about 19:1 the common class is no longer predicted at all.
    """
    if class_weights is None:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")
    losses = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    weights = (class_weights[targets] if targets.ndim == 1
               else targets.to(class_weights.dtype) @ class_weights)
    return (losses * weights.to(losses.dtype)).sum()


def _empty_batch(input_shape: Sequence[int], device: torch.device,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of no images (and no labels) of (C, H, W) ``input_shape``, for a process
    whose whole share was unreadable (a model of one input size, the seed variant, a
    fixed-size teacher, still checks the size of an empty batch)."""
    images = torch.empty(0, *input_shape, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.empty(0, dtype=torch.int64, device=device)


def train_mode(model: nn.Module) -> None:
    """``model.train()``, except for modules whose parameters are all frozen (``--freeze``):
    they run as at inference, BatchNorm normalising with its running statistics and leaving
    them as they are, as Keras runs layers with ``trainable=False`` and timm's
    ``freeze_batch_norm_2d`` leaves them."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: StepState,
    *,
    global_batch_sizes: list[int],
    device: torch.device,
    env: DistEnv,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    accum_steps: int = 1,
    autocast: AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: ModelEma | None = None,
    ema_source: nn.Module | None = None,
    channels_last: bool = False,
    skip_nonfinite: bool = False,
    grad_clip: float | None = None,
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 1.0,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
    input_shape: Sequence[int] = (3, 224, 224),
) -> StepState:
    """Train for the rest of epoch ``state.epoch``, from step ``state.step``.

    The loss of each process is its summed loss over the *global* batch size times the world
    size, so DDP's gradient averaging yields the gradient of the global batch mean even when
    the last batch is split unevenly; one process and N processes then take the same steps.

    ``class_weights`` (one per class, on ``device``) weighs each example's loss by its class's
    weight (see :func:`classification_loss`).

    ``accum_steps`` > 1 runs each batch as that many micro-batches, one after another, and
    steps once (gradient accumulation): the same gradient as the whole batch's, but for
    BatchNorm, which normalises each micro-batch by its own statistics, and dropout masks,
    drawn per micro-batch.

    ``mix`` (a :class:`~mobilenetv2.data.BatchMix`) turns each batch and its labels into mixed
    images and class probabilities; the training accuracy then counts the dominant class.

    ``teacher`` (a :class:`~mobilenetv2.distill.Teacher`) turns the loss into knowledge
    distillation's: ``(1 - distill_weight)`` times the labels' loss plus ``distill_weight``
    times :func:`~mobilenetv2.distill.distillation_loss` against the teacher's outputs for the
    same (augmented, mixed) images.

    ``input_shape``: (C, H, W) of the training images, for the empty batch with which a
    process whose whole share of a step was unreadable takes the step under DDP.

    Returns:
        ``state``, advanced; ``state.interrupted`` is set when ``should_stop()`` ended it early.

    Raises:
        NonFiniteLossError: when the loss is NaN or infinite (unless ``skip_nonfinite``).
    """
    train_mode(model)
    autocast = autocast or nullcontext()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    nonfinite = torch.zeros((), device=device, dtype=torch.bool)
    seen = skipped = 0
    start_time = time.perf_counter()
    for images, labels, dropped in device_batches(loader, device, channels_last):
        skipped += dropped
        if images is None:  # every image of this process's share was unreadable
            if env.world_size == 1:
                state.step += 1
                continue
            # The other processes wait for this one in the step's collectives (DDP's gradient
            # all-reduce, synchronised BatchNorm's): it takes part with an empty batch, which
            # adds nothing to the gradient and leaves BatchNorm's running statistics alone.
            images, labels = _empty_batch(input_shape, device, channels_last)
        scale = env.world_size / global_batch_sizes[state.step]
        targets = labels
        if mix is not None and labels.numel():
            images, targets = mix(images, labels, state.epoch, state.step)
            labels = targets.argmax(1)
        optimizer.zero_grad(set_to_none=True)
        # The batch in accum_steps micro-batches, one after another; each loss is scaled by
        # the whole global batch, so their gradients add up to the batch's. Under DDP only
        # the last backward all-reduces. Every process runs the same number of micro-batches
        # (SyncBatchNorm's collectives pair them), of two images at least (BatchNorm cannot
        # train on one image's 1x1 map), counted from the global batch, not this process's
        # share: a share that lost images to unreadable files may leave some micro-batches
        # empty, and an empty one, like an empty share, adds nothing.
        chunks = min(accum_steps, max(1, global_batch_sizes[state.step] // env.world_size // 2))
        loss = torch.zeros((), device=device)
        batch_correct = torch.zeros((), device=device, dtype=torch.float64)
        no_sync = getattr(model, "no_sync", None)
        for i, (part, part_targets, part_labels) in enumerate(zip(
                images.tensor_split(chunks), targets.tensor_split(chunks),
                labels.tensor_split(chunks), strict=True)):
            with nullcontext() if i == chunks - 1 or no_sync is None else no_sync():
                with autocast:
                    logits = model(part)
                    part_loss = classification_loss(_full_precision(logits), part_targets,
                                                     label_smoothing, class_weights)
                    if teacher is not None:
                        part_loss = ((1 - distill_weight) * part_loss + distill_weight
                                     * distillation_loss(logits, teacher(part), distill_temperature))
                    part_loss = part_loss * scale
                (scaler.scale(part_loss) if scaler is not None else part_loss).backward()
            loss = loss + part_loss.detach()
            batch_correct += (logits.detach().argmax(1) == part_labels).sum()
        finite = torch.isfinite(loss)
        # Skip only when every process skips: one that stepped alone would take a different
        # optimizer step from the others. (A host sync per step, a collective under torchrun.)
        if skip_nonfinite and _any_process(~finite, env):
            optimizer.zero_grad(set_to_none=True)
            state.nonfinite += 1
            state.step += 1
            continue
        nonfinite |= ~finite
        if scaler is not None:
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used: what is shown
        if scaler is None:
            scheduler.step()
        else:
            # fp16's first steps overflow until the scaler has lowered its scale, and it skips
            # the optimizer's step for them; PyTorch then warns that the schedule was stepped
            # "before optimizer.step()", which is not so. The schedule advances, as in
            # torchvision's reference scripts.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`",
                                        UserWarning)
                scheduler.step()
        if ema is not None:
            ema.update(ema_source or model)
        loss_sum += loss / scale
        correct += batch_correct
        seen += labels.numel()
        state.step += 1
        state.global_step += 1
        # Every process checks at the same steps, so all stop at the same one.
        if state.step % NONFINITE_CHECK_STEPS == 0 and _any_process(nonfinite, env):
            break
        if progress is not None and progress.due():
            progress.update(state.step, loss=float(loss_sum) / max(seen, 1),
                            acc=100 * float(correct) / max(seen, 1),
                            img_s=seen * env.world_size / (time.perf_counter() - start_time),
                            lr=lr)
        if should_stop():
            state.interrupted = True
            break
    if _any_process(nonfinite, env):
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite in epoch {state.epoch + 1}: lower --lr, "
            "add --grad-clip, or pass --skip-nonfinite to skip such steps; the last good "
            "checkpoint is kept"
        )
    totals = all_reduce_sum(
        torch.tensor([float(loss_sum), float(correct), float(seen), float(skipped)],
                     dtype=torch.float64, device=device), env).tolist()
    state.loss_sum += totals[0]
    state.correct += totals[1]
    state.seen += totals[2]
    state.skipped += int(totals[3])
    state.seconds += time.perf_counter() - start_time
    if progress is not None:
        progress.close()
    return state


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device | str = "cpu",
    env: DistEnv | None = None,
    channels_last: bool = False,
    autocast: AbstractContextManager | None = None,
    progress: Progress | None = None,
    confusion_classes: int = 0,
    probabilities: bool = False,
    label_map: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (percent), mean loss, image count and throughput over ``loader``.

    ``model`` may be any callable from an image batch to logits (an ONNX session wrapper, say).
    Under DDP every process evaluates its shard and the counts are summed. With
    ``confusion_classes=C`` the result also holds ``"confusion"``: a C x C list of counts, row =
    true class, column = top-1 prediction. ``probabilities``: the model returns softmax
    probabilities (the walk-through's ``return_probs``), not logits; the loss is then their
    negative log-likelihood. ``label_map``: the model's class for each of the data's labels
    (see :func:`mobilenetv2.data.match_classes`), for data whose classes are named or ordered
    otherwise than the model's, or are fewer.
    """
    env = env or DistEnv()
    device = torch.device(device)
    if label_map is not None:
        label_map = torch.as_tensor(label_map, dtype=torch.int64, device=device)
    if isinstance(model, nn.Module):
        model.eval()
    autocast = autocast or nullcontext()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, n, skipped
    classes = confusion_classes
    matrix = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    start = time.perf_counter()
    for step, (images, labels, dropped) in enumerate(device_batches(loader, device, channels_last), 1):
        totals[4] += dropped
        if images is None:
            continue
        if label_map is not None:
            labels = label_map[labels]
        with autocast:
            logits = model(images)
        logits = _full_precision(torch.as_tensor(logits, device=device))
        if probabilities:
            totals[0] += F.nll_loss(logits.clamp_min(1e-12).log(), labels, reduction="sum")
        else:
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        k = min(5, logits.shape[1])
        # Ties (exact in int8 logits) go to the lower class index, as argmax and predict's
        # ranking break them; topk's order among equals is unspecified.
        top = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
        hits = top == labels[:, None]
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
        if classes:
            matrix += torch.bincount(labels * classes + top[:, 0], minlength=classes * classes)
        if progress is not None and progress.due():
            progress.update(step, acc=100 * float(totals[1]) / max(float(totals[3]), 1))
    # On a GPU the loop only queues the work: the last batches may still be running. The clock
    # stops once their counts are read back, as train_one_epoch's does, not when the last
    # batch was queued (which overstated img/s, the more the fewer the batches).
    loss, top1, top5, n, skipped = all_reduce_sum(totals, env).tolist()
    seconds = time.perf_counter() - start
    if progress is not None:
        progress.close()
    if n == 0:
        raise ValueError("the evaluation data holds no readable images")
    extra = {}
    if classes:
        extra["confusion"] = all_reduce_sum(matrix, env).view(classes, classes).tolist()
    return {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "loss": loss / n,
        "images": int(n),
        "images_per_second": n / seconds if seconds > 0 else math.inf,
        "skipped": int(skipped),
        **extra,
    }


def per_class_metrics(confusion: list[list[int]], class_names: list[str]) -> list[dict[str, Any]]:
    """Each class's row of a confusion matrix (see :func:`evaluate`) read out: its images,
    ``top1`` (the share of them predicted right: recall, percent), ``precision`` (the share of
    predictions of it that were right, percent; None if never predicted), and
    ``confused_with``: the wrong class its images were most often taken for, with ``confused``
    images (None and 0 when none were)."""
    rows = []
    for i, counts in enumerate(confusion):
        images, right = sum(counts), counts[i]
        predicted = sum(row[i] for row in confusion)
        others = [(c, j) for j, c in enumerate(counts) if j != i]
        wrong = max(others, key=lambda cj: (cj[0], -cj[1]), default=(0, i))  # ties: first class
        rows.append({
            "class": class_names[i],
            "images": images,
            "top1": 100.0 * right / images if images else None,
            "precision": 100.0 * right / predicted if predicted else None,
            "confused_with": class_names[wrong[1]] if wrong[0] else None,
            "confused": wrong[0],
        })
    return rows


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32, whatever precision autocast computed the logits in."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
