"""Knowledge distillation (``train --teacher``) on the embedded digits: accuracy and time of a
distilled student against the same student trained on the labels alone.

A teacher is trained once with the digits recipe; then, seed by seed, the student is trained
plainly and with each distillation setting (``W:T`` = ``--distill-weight W
--distill-temperature T``), one run after another, so a noisy, shared machine slows every
contender of a seed alike. Reported per setting: the final test top-1 of each seed, their mean,
and the median over seeds of the run's time relative to the plain run of the same seed.

    python benchmarks/bench_distill.py                          # 30 epochs, seeds 0-3
    python benchmarks/bench_distill.py --epochs 8 --seeds 0,1,2,3,4,5 --settings 0.5:1,0.5:4
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from mobilenetv2.config import resolve_config
from mobilenetv2.train import train


def run(out: Path, **options) -> tuple[float, float]:
    """(final test top-1, seconds) of one digits run with these options."""
    config = resolve_config("digits", {}, {"out": str(out), "tensorboard": False, **options})
    result = train(config)
    return result.final["val_top1"], result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-model", default="mobilenet_v2_100")
    parser.add_argument("--student-model", default="mobilenet_v2_035")
    parser.add_argument("--epochs", type=int, default=30, help="the students' epochs")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--settings", default="0.5:1,0.9:4",
                        help="distillation settings W:T, besides the plain run")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings.split(",")]
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_distill-"))

    teacher_top1, _ = run(root / "teacher", model=args.teacher_model, epochs=args.teacher_epochs)
    teacher = root / "teacher" / "best.safetensors"
    rows: dict[str, dict[str, list[float]]] = {"plain": {"top1": [], "ratio": []}}
    rows |= {f"W {w:g}, T {t:g}": {"top1": [], "ratio": []} for w, t in settings}
    for seed in seeds:
        plain, plain_s = run(root / f"plain{seed}", model=args.student_model, seed=seed,
                             epochs=args.epochs)
        rows["plain"]["top1"].append(plain)
        rows["plain"]["ratio"].append(1.0)
        for w, t in settings:
            top1, seconds = run(root / f"w{w:g}-t{t:g}-{seed}", model=args.student_model,
                                seed=seed, epochs=args.epochs, teacher=str(teacher),
                                distill_weight=w, distill_temperature=t)
            rows[f"W {w:g}, T {t:g}"]["top1"].append(top1)
            rows[f"W {w:g}, T {t:g}"]["ratio"].append(seconds / plain_s)

    report = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "teacher": args.teacher_model, "teacher_top1": teacher_top1,
        "student": args.student_model, "epochs": args.epochs, "seeds": seeds,
        "rows": {name: {"top1": row["top1"], "mean_top1": statistics.mean(row["top1"]),
                        "time_vs_plain": statistics.median(row["ratio"])}
                 for name, row in rows.items()},
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"teacher {args.teacher_model}: {teacher_top1:.2f}%; student {args.student_model}, "
          f"{args.epochs} epochs, seeds {args.seeds} (runs in {root})")
    print(f"{'student':<14} {'test top-1 per seed (%)':<40} {'mean':>6} {'time':>6}")
    for name, row in report["rows"].items():
        per_seed = ", ".join(f"{v:.2f}" for v in row["top1"])
        print(f"{name:<14} {per_seed:<40} {row['mean_top1']:>6.2f} {row['time_vs_plain']:>5.2f}x")


if __name__ == "__main__":
    main()
