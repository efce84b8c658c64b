"""What gradient checkpointing and gradient accumulation cost and save in a training step
(BENCHMARKS.md).

    python benchmarks/grad_checkpointing.py [--rounds 3] [--batch-size 48] [--resolution 224]
    python benchmarks/grad_checkpointing.py --kinds plain,checkpointed,accum4

Runs training steps of mobilenet_v2_100 (channels_last, SGD, 1000 classes) on the CPU: plain,
with ``set_grad_checkpointing()``, and as K micro-batches of the same batch (``accumK``, the
trainer's ``--grad-accum-steps K``), each in its own process so that its peak resident memory
is its own, alternating them for ``--rounds`` rounds. Prints each one's peak RSS and median
step time, and the ratios to plain; and the minor page faults and system time of the whole
worker process (model creation and 3 steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def step_process(kind: str, batch_size: int, resolution: int, threads: int) -> dict:
    import torch

    import mobilenetv2

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mobilenetv2.create_model("mobilenet_v2_100").train()
    model.to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(kind == "checkpointed")
    chunks = int(kind[5:]) if kind.startswith("accum") else 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, resolution, resolution).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch_size,))
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        optimizer.zero_grad()
        for part, part_labels in zip(images.tensor_split(chunks), labels.tensor_split(chunks),
                                     strict=True):
            loss = torch.nn.functional.cross_entropy(model(part), part_labels, reduction="sum")
            (loss / batch_size).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": statistics.median(seconds), "peak_mb": usage.ru_maxrss / 1024,
            "minor_faults": usage.ru_minflt, "system_seconds": usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default="plain,checkpointed",
                        help="plain (the reference), checkpointed, accumK (K micro-batches)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(step_process(args.worker, args.batch_size, args.resolution,
                                      args.threads)))
        return
    kinds = ["plain", *dict.fromkeys(k for k in args.kinds.split(",") if k != "plain")]
    for kind in kinds:
        if kind not in ("plain", "checkpointed") and not (
                kind.startswith("accum") and kind[5:].isdigit() and int(kind[5:]) >= 1):
            parser.error(f"--kinds: {kind!r} is not plain, checkpointed or accumK")
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in results:
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--batch-size",
                                  str(args.batch_size), "--resolution", str(args.resolution),
                                  "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            results[kind].append(json.loads(out.strip().splitlines()[-1]))
    summary = {kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for kind, runs in results.items()}
    print(f"mobilenet_v2_100, batch {args.batch_size}, {args.resolution}x{args.resolution}, "
          f"{args.threads} threads, {args.rounds} rounds")
    plain = summary["plain"]
    for kind, values in summary.items():
        print(f"  {kind:13s} step {values['seconds']:.2f} s ({values['seconds'] / plain['seconds']:.2f}x)"
              f"   peak RSS {values['peak_mb']:,.0f} MB ({values['peak_mb'] / plain['peak_mb']:.2f}x)"
              f"   page faults {values['minor_faults'] / 1e6:.1f} M, system {values['system_seconds']:.1f} s")


if __name__ == "__main__":
    main()
