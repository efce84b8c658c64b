"""Interleaved timing for the comparison scripts in this folder (BENCHMARKS.md).

Every contender runs once per round, in turn, so the shared machine's drift hits them alike;
each row's speed is then read as its per-round ratio to a reference measured in the same round.
The order rotates from round to round, as in ``mobilenetv2 bench`` and bench_train.py: in a fixed
order a contender always follows the same one, and a runtime's thread pool still spinning after
its last call (ONNX Runtime's, OpenVINO's) would slow the same contender's first calls in every
round (bench_pixel_input.py saw one ONNX Runtime session measure up to 1.8x when run right after
another).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_seconds(runs: dict[str, Callable[[], object]], rounds: int,
                        repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, one entry per round (after two warm-up calls), in an
    order that rotates each round, with a pause between contenders for the last one's threads
    to go idle."""
    for run in runs.values():
        run()
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(0.05)
            start = time.perf_counter()
            for _ in range(repeats):
                runs[name]()
            seconds[name].append((time.perf_counter() - start) / repeats)
    return seconds


def ratio_line(times: list[float], reference: list[float]) -> str:
    """``1.23x (rounds 1.10-1.40)``: the median of the per-round speedups over the reference."""
    ratios = [ref / t for ref, t in zip(reference, times, strict=True)]
    return (f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})")
