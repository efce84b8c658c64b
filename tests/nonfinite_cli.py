"""Run the mobilenetv2 CLI with a NaN training loss on one process at one step.

``NAN_RANK`` (the process, by RANK) and ``NAN_STEP`` (its training step, 1-based) say where;
the DDP tests use it to check that all processes skip or stop together.
"""

import os
import sys

import torch
import torch.nn.functional as F

from mobilenetv2.cli import main

_original, _calls = F.cross_entropy, [0]


def _cross_entropy(*args, **kwargs):
    loss = _original(*args, **kwargs)
    if torch.is_grad_enabled() and os.environ.get("RANK", "0") == os.environ["NAN_RANK"]:
        _calls[0] += 1
        if _calls[0] == int(os.environ["NAN_STEP"]):
            return loss * float("nan")
    return loss


F.cross_entropy = _cross_entropy

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
