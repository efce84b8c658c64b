"""Fine-tuning speed with frozen layers (``train --freeze``) against full fine-tuning.

Each contender takes training steps of MobileNetV2 1.0 (10 classes) on the same batch of
real images (the digits as 3-channel images at --resolution) with our trainer's pieces:
``freeze_layers``, ``train_mode`` and ``build_optimizer`` (SGD, weight decay), channels_last.
Rounds are interleaved, in an order that rotates, so a noisy, shared machine slows every
contender alike; each row reports the median images per second and the median over rounds
of its ratio to full fine-tuning in the same round.

    python benchmarks/bench_freeze.py                  # CPU, 224x224, batch 32
    python benchmarks/bench_freeze.py --parts none,backbone,12,6 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mobilenetv2 import create_model
from mobilenetv2.config import TrainConfig
from mobilenetv2.engine import train_mode
from mobilenetv2.export import real_images
from mobilenetv2.train import build_optimizer, freeze_layers


def contender(part: str, device: torch.device):
    """(model, optimizer) fine-tuning with ``part`` frozen ("none": nothing)."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_100", num_classes=10).to(device)
    model.to(memory_format=torch.channels_last)
    if part != "none":
        freeze_layers(model, part if part == "backbone" else int(part))
    return model, build_optimizer(TrainConfig(lr=0.01, weight_decay=4e-5), model)


def steps(model, optimizer, images, labels, count: int) -> float:
    """Seconds for ``count`` training steps."""
    train_mode(model)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--parts", default="none,backbone,12",
                        help="comma-separated --freeze values; none: full fine-tuning (the reference)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round and contender")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    parts = ["none", *dict.fromkeys(p for p in args.parts.split(",") if p != "none")]
    meta = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    images = real_images(args.batch_size, (3, args.resolution, args.resolution), meta).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.batch_size, device=device) % 10
    runs = {part: contender(part, device) for part in parts}
    for model, optimizer in runs.values():  # warm-up: allocator, kernels, optimizer state
        steps(model, optimizer, images, labels, 1)
    seconds: dict[str, list[float]] = {part: [] for part in parts}
    for r in range(args.rounds):
        order = parts[r % len(parts):] + parts[:r % len(parts)]
        for part in order:
            seconds[part].append(steps(*runs[part], images, labels, args.steps))
    images_per_round = args.steps * args.batch_size
    rows = []
    for part in parts:
        trained = sum(p.numel() for p in runs[part][0].parameters() if p.requires_grad)
        rows.append({
            "freeze": part,
            "trainable_parameters": trained,
            "images_per_second": images_per_round / statistics.median(seconds[part]),
            "vs_full": statistics.median(full / own for full, own
                                         in zip(seconds["none"], seconds[part], strict=True)),
        })
    report = {"device": str(device), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "resolution": args.resolution,
              "batch_size": args.batch_size, "rounds": args.rounds, "steps": args.steps,
              "torch": torch.__version__, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return
    print(f"fine-tuning mobilenet_v2_100 at {args.resolution}x{args.resolution}, batch "
          f"{args.batch_size}, on {device} ({report['threads']} threads), {args.rounds} "
          f"interleaved rounds of {args.steps} steps")
    print(f"{'--freeze':<10} {'trained params':>14} {'img/s':>8} {'vs full':>8}")
    for row in rows:
        print(f"{row['freeze']:<10} {row['trainable_parameters']:>14,} "
              f"{row['images_per_second']:>8.1f} {row['vs_full']:>7.2f}x")


if __name__ == "__main__":
    main()
