"""Run the mobilenetv2 CLI (in float64, as float64_cli.py) with one process's whole share of
one training batch unreadable.

``EMPTY_RANK`` of ``EMPTY_WORLD`` processes (``all``: every one) loses every image of its share
of training batch ``EMPTY_STEP`` (1-based, counted over the run). Under torchrun that process's
batch arrives empty, as ``collate_skipping`` gives a batch of unreadable files; in a single
process the same images (the share is ``global_batch[rank::world]``) are left out of that
batch, so the two runs see the same images and should end with the same weights.
"""

import os
import sys

import torch

torch.set_default_dtype(torch.float64)

from mobilenetv2 import train  # noqa: E402  (after the dtype is set)
from mobilenetv2.cli import main  # noqa: E402

_original, _batches = train.train_one_epoch, [0]


def _emptied(loader):
    rank, world = os.environ["EMPTY_RANK"], int(os.environ["EMPTY_WORLD"])
    for images, labels, dropped in loader:
        _batches[0] += 1
        if _batches[0] == int(os.environ["EMPTY_STEP"]):
            if int(os.environ.get("WORLD_SIZE", "1")) == world or rank == "all":
                if rank in ("all", os.environ.get("RANK", "0")):
                    images, labels, dropped = None, None, dropped + len(labels)
            else:
                keep = torch.ones(len(labels), dtype=torch.bool)
                keep[int(rank)::world] = False
                images, labels, dropped = images[keep], labels[keep], dropped + int((~keep).sum())
        yield images, labels, dropped


def _train_one_epoch(model, loader, *args, **kwargs):
    return _original(model, _emptied(loader), *args, **kwargs)


train.train_one_epoch = _train_one_epoch

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
