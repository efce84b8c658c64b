"""Run the mobilenetv2 CLI with float64 as the default dtype (for the DDP equality test).

In float32, the rounding differences between one process and two (sums in another order)
grow by about 30x per step when training from a random initialisation, so two correct runs
part ways within a few steps; in float64 they stay below 1e-8 and the comparison tests the
arithmetic of the distributed path itself.
"""

import sys

import torch

torch.set_default_dtype(torch.float64)

from mobilenetv2.cli import main  # noqa: E402  (after the dtype is set)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
