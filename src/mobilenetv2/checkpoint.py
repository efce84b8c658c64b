"""Resumable training checkpoints: plain types only, written atomically.

``checkpoint.pt`` holds everything needed to continue a run exactly: model, optimizer,
scheduler, grad scaler, EMA, position (epoch, step in epoch, global step), the epoch's running
sums, the metrics history and the RNG states. It contains only tensors, numbers, strings, lists
and dicts, so ``torch.load(..., weights_only=True)`` reads it; a file that holds anything else
is refused.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import torch

from .weights import WeightsError, atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The RNG states a run draws on: torch (CPU and CUDA) and Python's ``random``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: the previous one survives any crash or full disk.

    Raises:
        OSError: when the file cannot be written (full disk, I/O error), with its cause.
    """
    state = {"version": CHECKPOINT_VERSION, **state}
    # Serialised in memory, then written by Python: torch.save's own file writer reports a
    # full disk as an opaque RuntimeError ("unexpected pos ..."); a Python write says ENOSPC.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: when there is no checkpoint.
        WeightsError: for a damaged file, or one holding anything but plain types.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"refused to load {path}: it holds objects other than plain types "
                           f"({' '.join(str(e).split())[:160]})") from None
    except Exception as e:  # torch.load raises many types on damaged files
        raise WeightsError(f"{path} is a damaged checkpoint: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(f"{path} is not a mobilenetv2 training checkpoint")
    return state
