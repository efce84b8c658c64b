"""Interleaved timing for the comparison scripts in this folder (BENCHMARKS.md).

Every contender runs once per round, in turn, so the shared machine's drift hits them alike;
each row's speed is then read as its per-round ratio to a reference measured in the same round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_seconds(runs: dict[str, Callable[[], object]], rounds: int,
                        repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, one entry per round (after two warm-up calls)."""
    for run in runs.values():
        run()
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            seconds[name].append((time.perf_counter() - start) / repeats)
    return seconds


def ratio_line(times: list[float], reference: list[float]) -> str:
    """``1.23x (rounds 1.10-1.40)``: the median of the per-round speedups over the reference."""
    ratios = [ref / t for ref, t in zip(reference, times, strict=True)]
    return (f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})")
