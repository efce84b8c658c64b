"""What gradient checkpointing costs and saves in a training step (BENCHMARKS.md).

    python benchmarks/grad_checkpointing.py [--rounds 3] [--batch-size 48] [--resolution 224]

Runs training steps of mobilenet_v2_100 (channels_last, SGD, 1000 classes) on the CPU without
and with ``set_grad_checkpointing()``, each in its own process so that its peak resident memory
is its own, alternating the two for ``--rounds`` rounds. Prints each one's peak RSS and median
step time, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def step_process(checkpointing: bool, batch_size: int, resolution: int, threads: int) -> dict:
    import torch

    import mobilenetv2

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mobilenetv2.create_model("mobilenet_v2_100").train()
    model.to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, resolution, resolution).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch_size,))
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(step_process(args.worker == "checkpointed", args.batch_size,
                                      args.resolution, args.threads)))
        return
    results: dict[str, list[dict]] = {"plain": [], "checkpointed": []}
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
    for kind, values in summary.items():
        print(f"  {kind:13s} step {values['seconds']:.2f} s   peak RSS {values['peak_mb']:,.0f} MB")
    plain, checkpointed = summary["plain"], summary["checkpointed"]
    print(f"  checkpointed / plain: step time {checkpointed['seconds'] / plain['seconds']:.2f}x, "
          f"peak memory {checkpointed['peak_mb'] / plain['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
