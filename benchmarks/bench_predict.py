"""``mobilenetv2 predict`` on a folder of photos: this tree against an earlier commit's.

Writes ``--images`` JPEGs of ``--size`` pixels (smooth colour waves plus noise: about 75 kB at
500x375, 3.4 MB at 4032x3024, as photos are) and ``mobilenet_v2_100`` weights with 10 classes
to a temporary folder, then runs the whole command, ``python -m mobilenetv2 predict --weights W FOLDER --json``, as a user
would: in a fresh process each time, start-up and model loading included. The contenders
alternate in a rotating order; each one's speed is the median over rounds of its ratio to the
baseline's time in the same round (``interleaved.ratio_line``)::

    python benchmarks/bench_predict.py --baseline dca3757 --rounds 11 --workers auto,0
    python benchmarks/bench_predict.py --baseline dca3757 --rounds 7 --images 160 --size 4032x3024
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from interleaved import ratio_line

ROOT = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, count: int, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = width / 25  # waves of the same look at every size
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        waves = np.stack([128 + 100 * np.sin(xx / (scale * (1 + c / 4)) + yy / (scale * 1.5 * (1 + c / 4))
                                             + phase[c]) for c in range(3)], axis=-1)
        pixels = np.clip(waves + rng.normal(0, 12, waves.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="the git revision to compare with")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="500x375", metavar="WxH",
                        help="the photos' size (4032x3024: a 12-megapixel phone camera's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", default="auto,0,2",
                        help="this tree's --workers values to time (auto: the default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        baseline = tmp_path / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        sys.path.insert(0, str(ROOT / "src"))
        from mobilenetv2 import create_model, save_weights

        save_weights(create_model("mobilenet_v2_100", num_classes=10), tmp_path / "w.safetensors")
        width, height = (int(v) for v in args.size.split("x"))
        write_photos(tmp_path / "photos", args.images, width, height)
        command = [sys.executable, "-m", "mobilenetv2", "predict", "--weights",
                   str(tmp_path / "w.safetensors"), str(tmp_path / "photos"), "--json"]
        contenders = {f"baseline ({args.baseline})": (baseline / "src", [])}
        for workers in args.workers.split(","):
            contenders[f"this tree, --workers {workers}"] = (
                ROOT / "src", [] if workers == "auto" else ["--workers", workers])

        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                src, extra = contenders[name]
                env = dict(os.environ, PYTHONPATH=str(src))
                start = time.perf_counter()
                subprocess.run([*command, *extra], env=env, check=True, stdout=subprocess.DEVNULL)
                seconds[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()),
                  file=sys.stderr)

    reference = seconds[names[0]]
    print(f"{args.images} JPEGs of {args.size}, mobilenet_v2_100, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name}: median {median:.2f} s ({args.images / median:.1f} img/s); "
              f"vs baseline {ratio_line(times, reference)}")


if __name__ == "__main__":
    main()
