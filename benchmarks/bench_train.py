"""Training throughput: our trainer against a plain PyTorch loop over torchvision's model.

Every contender trains MobileNetV2 1.0 (10 classes) on the same real data (the digits as
3-channel images at --resolution, since torchvision's model takes RGB and has no small_input),
with the same batch, optimizer (SGD, momentum 0.9, nesterov, weight decay) and loss. Rounds
are interleaved, in an order that rotates, so a noisy, shared machine slows every contender
alike; each row reports the median images per second and the median over rounds of its ratio
to the plain loops in the same round.

Contenders:
    plain NCHW          torchvision.models.mobilenet_v2 in the loop a user writes first
    plain channels_last the same loop with NHWC tensors
    plain channels_last (our model)
                        our model in that loop: separates the model's share of a gap
                        from the trainer's
    ours                mobilenetv2's trainer (engine.train_one_epoch: sharded sampler,
                        DataLoader, batches copied ahead on a side CUDA stream, on-device
                        metrics, LR schedule) with its defaults
    timm (GPU only)     timm's mobilenetv2_100 in the plain loop, with the same AMP/layout

    python benchmarks/bench_train.py                       # CPU, 32x32, batch 128
    python benchmarks/bench_train.py --device cuda --resolution 224 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from mobilenetv2 import create_model
from mobilenetv2.config import TrainConfig
from mobilenetv2.data import ShardedBatchSampler, build_datasets
from mobilenetv2.distributed import DistEnv
from mobilenetv2.engine import StepState, train_one_epoch
from mobilenetv2.train import lr_factor, make_loader, mixed_precision


def plain_loop(model, optimizer, batches, device, channels_last: bool, autocast,
               scaler: torch.amp.GradScaler | None = None) -> int:
    """The loop from the PyTorch tutorials: no sampler, no metrics, no schedule; with fp16
    autocast, the tutorials' GradScaler (its own per model), as our trainer has."""
    model.train()
    seen = 0
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        seen += labels.numel()
    return seen


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgd(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def profile(contenders: dict, device: torch.device, out: Path) -> None:
    """One round of each contender under torch.profiler; its op table (self time) to ``out``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, run in contenders.items():
        with torch_profile(activities=activities) as prof:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        (out / f"{slug}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round and contender")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--amp", default="auto", help="auto: bf16/fp16 on GPUs, off on CPUs")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader processes for every contender (default: 0 on CPU, 6 on GPUs)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after the rounds, one more round of each contender under torch.profiler: "
                        "an op table per contender in DIR (where the time of ours and the plain loop "
                        "differs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"

    data = build_datasets("digits", resolution=args.resolution, in_channels=3)
    n = args.steps * args.batch_size
    subset = torch.utils.data.Subset(data.train, list(range(min(n, len(data.train)))))
    while len(subset) < n:  # the digits hold 1,437 training images: repeat them for big runs
        subset = torch.utils.data.ConcatDataset([subset, subset])
    subset = torch.utils.data.Subset(subset, list(range(n)))
    autocast, scaler = mixed_precision(args.amp, device)
    lr = 0.1 * args.batch_size / 128
    # On a GPU, one process collating 224x224 batches would be the bottleneck of every contender.
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)

    # The plain loops read the same examples from a standard DataLoader.
    plain_loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=True,
                                               drop_last=True, pin_memory=device.type == "cuda",
                                               num_workers=workers, persistent_workers=workers > 0)

    def own_scaler() -> torch.amp.GradScaler | None:
        """fp16 (GPUs without bf16): every plain loop scales its loss as ours does, each with
        its own scale; without one it would skip the scaler's work and its per-step sync."""
        return torch.amp.GradScaler(device.type) if scaler is not None else None

    contenders = {}
    tv = torchvision.models.mobilenet_v2(num_classes=10).to(device)
    contenders["plain NCHW (torchvision)"] = partial(plain_loop, tv, sgd(tv, lr), plain_loader,
                                                     device, False, autocast, own_scaler())
    tv_cl = torchvision.models.mobilenet_v2(num_classes=10).to(device, memory_format=torch.channels_last)
    contenders["plain channels_last (torchvision)"] = partial(
        plain_loop, tv_cl, sgd(tv_cl, lr), plain_loader, device, True, autocast, own_scaler())

    mine = create_model("mobilenet_v2_100", num_classes=10).to(device, memory_format=torch.channels_last)
    contenders["plain channels_last (our model)"] = partial(
        plain_loop, mine, sgd(mine, lr), plain_loader, device, True, autocast, own_scaler())

    ours = create_model("mobilenet_v2_100", num_classes=10).to(device, memory_format=torch.channels_last)
    config = TrainConfig(epochs=100, batch_size=args.batch_size, lr=lr, warmup_epochs=0)
    optimizer = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sampler = ShardedBatchSampler(len(subset), args.batch_size, shuffle=True, drop_last=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, steps_per_epoch=args.steps, config=config))
    loader = make_loader(subset, sampler, workers, device)
    sizes = [args.batch_size] * args.steps

    def our_trainer() -> int:
        sampler.set_epoch(0)
        state = train_one_epoch(ours, loader, optimizer, scheduler, StepState(),
                                global_batch_sizes=sizes, device=device, env=DistEnv(),
                                autocast=autocast, scaler=scaler, channels_last=True)
        return int(state.seen)

    contenders["ours (mobilenetv2 trainer)"] = our_trainer
    if device.type == "cuda":
        import timm

        tm = timm.create_model("mobilenetv2_100", num_classes=10).to(device, memory_format=torch.channels_last)
        contenders["plain channels_last (timm mobilenetv2_100)"] = partial(
            plain_loop, tm, sgd(tm, lr), plain_loader, device, True, autocast, own_scaler())

    for run in contenders.values():  # warm-up: allocator, cuDNN autotuning, first-call costs
        run()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            seen = contenders[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(seen / (time.perf_counter() - start))

    if args.profile:
        profile(contenders, device, args.profile)

    def paired(name: str, reference: str) -> float:
        """Median over rounds of the two contenders' ratio in each round: they ran seconds
        apart there, so a slow patch of a shared machine mostly cancels out."""
        return statistics.median(a / b for a, b in zip(rates[name], rates[reference], strict=True))

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
        "rounds": args.rounds, "workers": workers, "amp": str(getattr(autocast, "fast_dtype", "off")),
        "rows": [{"name": name, "images_per_second": statistics.median(v),
                  "vs_plain_nchw": paired(name, names[0]),
                  "vs_plain_channels_last": paired(name, names[1]),
                  "rounds_images_per_second": v} for name, v in rates.items()],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {result['device']}, {result['threads']} threads, torch {torch.__version__}, "
          f"{args.resolution}x{args.resolution}, batch {args.batch_size}, {args.rounds} rounds x "
          f"{args.steps} steps, {workers} loader workers, amp {result['amp']}")
    print("| contender | img/s (median) | vs plain NCHW | vs plain channels_last |")
    print("|---|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['name']} | {row['images_per_second']:,.0f} | {row['vs_plain_nchw']:.2f}x | "
              f"{row['vs_plain_channels_last']:.2f}x |")


if __name__ == "__main__":
    main()
