"""Weights in and out: safetensors with the model's configuration, and the peers' formats.

``save_weights`` writes safetensors whose metadata holds everything ``load_model`` needs to
rebuild the network (variant, width, classes, input size, normalisation, class names).
``load_weights`` reads our files and, converting on the way, torchvision's and timm's MobileNetV2
state_dicts (the official ``mobilenet_v2-b0353104.pth`` among them), Keras' HDF5 weights (see
keras_weights.py), the walk-through's checkpoints, and state_dicts saved from DDP (``module.``)
or ``torch.compile`` (``_orig_mod.``).

Nothing here unpickles arbitrary objects: safetensors holds only tensors, and ``.pth`` files go
through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain types.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import (
    INVERTED_RESIDUAL_SETTING,
    MobileNetV2,
    MobileNetV2Features,
    tap_rows,
)
from .runtime import damaged_meta, is_executorch_program, is_onnx_model

FORMAT_NAME = "mobilenetv2"
FORMAT_VERSION = "1"
PEER_FORMATS = ("torchvision", "timm")
# Containers that training scripts wrap a state_dict in: ours, torchvision's and timm's.
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the moving average of the weights beside the raw ones: timm's
# train.py (state_dict_ema, what its validate.py --use-ema loads), torchvision's reference
# scripts (model_ema: an AveragedModel's state_dict, keys module.-prefixed, with its n_averaged
# counter) and ours (ema: ModelEma.state_dict(), the average under "module").
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
# safetensors' header is JSON behind an 8-byte length; bound it so a forged length is refused.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file that cannot be read safely, or does not fit the model."""


class LoadedWeights:
    """A state_dict with what its file says about the model: ``config`` and ``meta``."""

    def __init__(
        self,
        state_dict: dict[str, torch.Tensor],
        config: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        source: str = "state_dict",
        format: str | None = None,
    ) -> None:
        self.state_dict = state_dict
        self.config = config
        self.meta = meta
        self.source = source
        # Keras files are converted to our layout as they are read, and keep their name here.
        self.format = format or detect_format(state_dict, source)


# --------------------------------------------------------------------------------------------
# Saving


def save_weights(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s weights and configuration to a safetensors file, atomically.

    Args:
        model: a model made by this package (it has ``config`` and ``meta``).
        path: the ``.safetensors`` file to write; its folder must exist.

    ``model.meta`` is stored as plain JSON: NumPy arrays and tuples become lists, and class
    names given as integers (scikit-learn's ``target_names``, a ``LabelEncoder``'s
    ``classes_``) become their strings, as ``predict`` prints them.

    Raises:
        ValueError: for a model this package did not build, or a ``meta`` that ``load_model``
            would refuse (``class_names`` of another count than the classes, a non-positive
            ``std`` ...): refused here, not when the file is loaded.
        OSError: when the file cannot be written; an existing file at ``path`` is left intact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    config, meta = getattr(model, "config", None), getattr(model, "meta", None)
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise ValueError(
            "save_weights needs a model built by mobilenetv2 (create_model or MobileNetV2)"
        )
    act = config.get("act_layer")
    if act is not None:
        from .layers import ACTIVATIONS

        if act not in ACTIVATIONS:
            raise ValueError(f"the model's activation {act} has no name load_model knows, so the "
                             f"file could not rebuild it: build the model with act_layer= one of "
                             f"{', '.join(ACTIVATIONS)}, or save model.state_dict() yourself")
    stored_meta = _meta_to_store(meta, getattr(_unwrap_module(model), "num_classes", 0))
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap_module(model).state_dict().items()}
    stored_config = json.dumps({key: _plain(value) for key, value in config.items()})
    _check_rebuilds(stored_config, state)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": stored_config,
        "meta": stored_meta,
    }

    def write(tmp: str) -> None:
        try:
            save_file(state, tmp, metadata=metadata)
        except SafetensorError as e:  # its writer's I/O errors, e.g. "(os error 28)": an OSError
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from e
        _sort_metadata_in_place(tmp, metadata)

    atomic_write(path, write)


def _sort_metadata_in_place(path: str, metadata: dict[str, str]) -> None:
    """Put the safetensors header's metadata in the order of its keys. safetensors writes it
    in a hash map's order, which changes from one process to the next: the same weights made
    files of other bytes (other SHA-256s, a change for DVC or an artifact store) on every run.
    The reordered text has the same length; a header not as expected is left as it is."""
    prefix = '{"__metadata__":'
    with open(path, "rb+") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size).decode("utf-8")
        if not header.startswith(prefix):
            return
        written, end = json.JSONDecoder().raw_decode(header, len(prefix))
        dumped = json.dumps(dict(sorted(written.items())), separators=(",", ":"), ensure_ascii=False)
        if written == metadata and len(dumped.encode()) == len(header[len(prefix):end].encode()):
            f.seek(8 + len(prefix.encode()))
            f.write(dumped.encode("utf-8"))


def _check_rebuilds(stored_config: str, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse to save a model whose layers no longer match the config the file stores (a
    classifier assigned by hand, as torchvision's are replaced): load_model, which builds the
    network that config describes, would refuse the file.

    Raises:
        ValueError: naming the tensors that differ, and reset_classifier for the classifier.
    """
    expected = _config_shapes(stored_config)
    # A frozen BatchNorm (timm's freeze_batch_norm_2d) has no num_batches_tracked; load_model
    # rebuilds it as a BatchNorm whose counter starts at 0, as _fitting_state_dict allows.
    differ = sorted(k for k in set(expected) ^ set(state)
                    if not k.endswith(".num_batches_tracked")) + [
        f"{k} {list(state[k].shape)} (the config builds {list(expected[k])})"
        for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if not differ:
        return
    config = json.loads(stored_config)
    hint = ("; replace the classifier with model.reset_classifier(num_classes), which keeps the "
            "config in step, rather than by assigning a layer"
            if all(k.startswith("classifier.") for k in differ) else "")
    raise ValueError(f"the model's layers no longer match its config "
                     f"(num_classes={config.get('num_classes')}), so load_model could not "
                     f"rebuild it from the file: {', '.join(differ[:4])}{hint}")


@functools.lru_cache(maxsize=8)
def _config_shapes(stored_config: str) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of the network a stored config builds, as load_model builds it.

    Cached: training saves the same model twice an epoch, and building it, even on the meta
    device (no memory), takes tens of milliseconds, more than writing a small model's file.
    The dict is shared between calls: read it, do not change it.
    """
    from .registry import build_from_config

    with torch.device("meta"):
        model = build_from_config(json.loads(stored_config))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _temporary(path: Path, pid: int | str) -> Path:
    """atomic_write's temporary file for ``path``: ``.NAME.tmp-PID`` beside it."""
    return path.with_name(f".{path.name}.tmp-{pid}")


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete the half-written temporaries of atomic_write in ``folder`` whose writer is gone.

    atomic_write removes its temporary file on any error it lives through, but not after a
    SIGKILL or a power cut; a file whose writer is still alive here is left alone. One named
    with this process's own PID is a killed process's too (call this before writing there): in
    a container, a run restarted after a kill often gets the PID its predecessor had (1, or the
    same small number), which a liveness check would take for a writer still at work.

    Returns:
        The files deleted.
    """
    removed = []
    for tmp in Path(folder).glob(_temporary(Path("*"), "*").name):
        pid = tmp.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _process_alive(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (or may be: when in doubt, its file is kept)."""
    if sys.platform == "win32":
        # Not os.kill(pid, 0): there signal 0 is CTRL_C_EVENT, which os.kill sends as a Ctrl-C
        # to the console's processes (this run among them) instead of testing anything.
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    """``_process_alive`` on Windows: open the process to read its exit code, sending nothing."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.OpenProcess.restype = wintypes.HANDLE  # a pointer: the default int would cut it
    kernel32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
    kernel32.GetExitCodeProcess.restype = wintypes.BOOL
    kernel32.CloseHandle.argtypes = (wintypes.HANDLE,)
    query_limited_information, still_active, access_denied = 0x1000, 259, 5
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:  # no such process, or one this user may not look at (alive, then)
        return ctypes.get_last_error() == access_denied
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def check_output_file(path: PathLike, name: str = "--out", writable: bool = True) -> None:
    """Fail fast, in one line, when ``path`` cannot be written as a file (``name``: the option
    that named it, or "" for none); ``writable``: also when its folder cannot be written (a
    read-only file system), before the work whose result it is to hold.

    Raises:
        FileNotFoundError: ``path`` is a folder, or its folder is missing or is a file.
        PermissionError: its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        problem = "it is a folder"
    elif not path.parent.exists():
        problem = f"the folder {path.parent} does not exist"
    elif not path.parent.is_dir():
        problem = f"{path.parent} is a file, not a folder"
    elif writable and not os.access(path.parent, os.W_OK):
        raise PermissionError(f"cannot write {name + ' ' if name else ''}{path}: the folder "
                              f"{path.parent} is not writable (or on a read-only file system)")
    else:
        return
    raise FileNotFoundError(f"cannot write {name + ' ' if name else ''}{path}: {problem}")


def atomic_write(path: PathLike, write: Any) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename it over ``path``.

    A crash or a full disk at any moment leaves either the old file or the new one, never a
    half-written file under the real name.
    """
    path = Path(path)
    check_output_file(path, name="", writable=False)  # the write itself says why it fails
    tmp = _temporary(path, os.getpid())
    # The writers open the temporary by name and follow links: a link planted under its name
    # (the name is predictable, and a folder may be shared or prepared by someone else) would
    # have the file it points to overwritten. Whatever is there goes, and the temporary is
    # created here, as a new file that is no link.
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600))
    try:
        write(str(tmp))
        # The permissions of any new file (0644 under the usual umask 022): some writers
        # (safetensors' save_file) create theirs 0600, unreadable to a server's other users.
        # Best effort: FAT file systems refuse chmod, and the contents are what matter.
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def replace_file(source: PathLike, target: PathLike, seconds: float = 1.0) -> None:
    """``os.replace``, tried again for up to ``seconds`` on Windows while it is refused.

    Windows refuses to replace a file that another process has open without delete sharing:
    an antivirus scanner or the search indexer reading the file just written, for a moment
    (pip retries its own replaces for a second for the same reason). A file held open for
    longer (a metrics.csv open in Excel) is still refused, by the last try's error.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if sys.platform != "win32" or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _umask() -> int:
    """The process's umask: from /proc on Linux, else by setting it and setting it back (which
    another thread creating a file at that instant could notice)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def peer_state_dict(model: nn.Module, peer: str) -> dict[str, torch.Tensor]:
    """``model``'s state_dict in torchvision's or timm's key layout, to load into their models.

    Args:
        model: a :class:`MobileNetV2`, or its ``features_only`` backbone, whose keys are
            those of timm's ``features_only`` model for the rows it keeps (timm's builds every
            row whatever ``out_indices`` asks: load with ``strict=False`` when ours stop
            early).
        peer: ``"torchvision"`` or ``"timm"``.
    """
    model = _unwrap_module(model)
    if not isinstance(model, (MobileNetV2, MobileNetV2Features)):
        kind = ("the seed variant has no peer" if getattr(model, "config", {}).get("arch") == "seed"
                else f"got {type(model).__name__}")
        raise ValueError(f"peer_state_dict needs a MobileNetV2 or its backbone ({kind})")
    if peer == "keras":
        raise ValueError("Keras loads HDF5 files, not a state_dict: write one with "
                         "save_keras_weights(model, path)")
    if peer not in PEER_FORMATS:
        raise ValueError(f"peer must be one of {PEER_FORMATS}, got {peer!r}")
    ours_to_peer = _peer_prefixes(model, peer)
    return {_rename(k, ours_to_peer): v for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Reading


def read_weights(source: PathLike | Mapping[str, Any] | LoadedWeights, *,
                 use_ema: bool = False) -> LoadedWeights:
    """Read a weights file (or take a state_dict) without building a model.

    Accepts our safetensors, any safetensors state_dict, ``torch.save`` files of a
    state_dict or of a training checkpoint that holds one (under ``model``, ``state_dict`` ...),
    and Keras' MobileNetV2 weights (``.h5``, ``.weights.h5``, ``.keras``).

    Args:
        source: a file, a state_dict or a checkpoint dict (a ``LoadedWeights`` is returned
            as it is).
        use_ema: take the exponential moving average of the weights that a training
            checkpoint keeps beside them, as timm's ``load_checkpoint(use_ema=True)`` and
            ``validate.py --use-ema`` do: timm's ``state_dict_ema``, torchvision's reference
            scripts' ``model_ema``, our ``checkpoint.pt``'s ``ema``. Our safetensors of a run
            with ``--ema`` are that average already, and are taken as they are. Without it, a
            checkpoint's raw weights are read, and a log line says it has EMA weights too.

    Raises:
        FileNotFoundError: when the file does not exist.
        WeightsError: for anything that is not a readable MobileNetV2 state_dict, including
            pickles that hold code or objects other than tensors, and, with ``use_ema``, for
            a file without EMA weights.
    """
    if isinstance(source, LoadedWeights):
        return source
    if isinstance(source, nn.Module):
        raise TypeError("weights must be a file or a state_dict, not a model: pass "
                        "model.state_dict()")
    if isinstance(source, Mapping):
        state, config, meta = _unwrap_container(source, "the state_dict", use_ema)
        _check_meta(meta, "the state_dict")
        return LoadedWeights(state, config, meta)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a file path or a state_dict, got "
                        f"{type(source).__name__} {source!r}")
    path, head = _open_weights_file(source)
    from .keras_weights import HDF5_SIGNATURE, is_keras_archive, read_keras

    fmt = None  # read off the keys, except for Keras files (converted to our keys as read)
    if head[:8] == HDF5_SIGNATURE or (head[:4] == b"PK\x03\x04" and is_keras_archive(path)):
        try:
            state, config, meta = read_keras(path)
        except ValueError as e:
            raise WeightsError(str(e)) from None
        fmt = "keras"
    elif is_safetensors(head):
        state, config, meta = _read_safetensors(path)
    elif is_torch_save(head):
        state, config, meta = _read_torch(path, use_ema)
    elif is_onnx_model(path):
        raise WeightsError(
            f"{path} is an ONNX model, not a PyTorch state_dict: pass it to eval, predict or "
            "bench, which run ONNX files with ONNX Runtime"
        )
    elif is_executorch_program(path):
        raise WeightsError(
            f"{path} is an ExecuTorch program, not a PyTorch state_dict: pass it to eval or "
            "predict, which run it with ExecuTorch"
        )
    else:
        raise WeightsError(
            f"{path} is neither safetensors, a torch.save file nor Keras HDF5: expected "
            ".safetensors, .pth, .pt or .h5 weights"
        )
    if use_ema and not is_torch_save(head):
        _check_is_ema(path, meta)
    _check_meta(meta, str(path))
    return LoadedWeights(state, config, meta, source=str(path), format=fmt)


def _check_is_ema(path: Path, meta: dict[str, Any] | None) -> None:
    """Let ``use_ema`` through for a safetensors file of a run with ``--ema`` (its weights
    are the average); refuse it for any other file that holds one set of weights."""
    training = (meta or {}).get("training")
    config = training.get("config") if isinstance(training, dict) else None
    decay = config.get("ema") if isinstance(config, dict) else None
    if isinstance(decay, (int, float)) and decay > 0:
        log.info("%s holds the EMA weights already (trained with --ema %s)", path, decay)
        return
    why = "was trained without --ema" if isinstance(decay, (int, float)) else "holds one set of weights"
    raise WeightsError(f"{path} {why}, no EMA weights: drop use_ema=True (--use-ema, "
                       "--teacher-use-ema), or pass the training checkpoint that holds them")


def read_state_dict(source: PathLike, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or ``torch.save`` file of any network (a state_dict, or a
    training checkpoint holding one), read as :func:`read_weights` reads them (never
    unpickling code, ``use_ema`` alike), without asking which network they belong to.

    Raises:
        FileNotFoundError: when the file does not exist.
        WeightsError: for a file that is neither, is damaged, or holds objects besides tensors.
    """
    path, head = _open_weights_file(source)
    if is_safetensors(head):
        state, _, meta = _read_safetensors(path)
        if use_ema:
            _check_is_ema(path, meta)
        return state
    if is_torch_save(head):
        return _read_torch(path, use_ema)[0]
    raise WeightsError(f"{path} is neither safetensors nor a torch.save file: expected "
                       ".safetensors, .pth or .pt weights")


def _open_weights_file(source: PathLike) -> tuple[Path, bytes]:
    """(path, its first 16 bytes) of an existing weights file."""
    path = Path(source)
    if path.is_dir():
        # `runs/` (the folder of runs) is as natural a mistake as `runs/<run>/`: name a file
        # that is there, the newest run's, not one that is not.
        try:
            runs = [path] + sorted((p for p in path.iterdir() if p.is_dir()),
                                   key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:  # unreadable: the usual name will do
            runs = [path]
        best = next((r / "best.safetensors" for r in runs if (r / "best.safetensors").is_file()),
                    path / "best.safetensors")
        raise FileNotFoundError(f"{path} is a folder: pass the weights file in it, e.g. {best}")
    if not path.is_file():
        from .registry import PRETRAINED, WEIGHT_TAGS

        if str(source) in PRETRAINED:  # reached by load_weights / read_weights
            raise FileNotFoundError(f"{source!s} is torchvision's tag, not a file: "
                                    f"load_model({str(source)!r}) or create_model(NAME, "
                                    f"weights={str(source)!r}) download its weights")
        if str(source) in WEIGHT_TAGS:  # timm's and Keras' tags name weights of many widths
            raise FileNotFoundError(f"the {source!s} tag names weights of several widths: in "
                                    f"Python create_model(NAME, weights={str(source)!r}); here, "
                                    "the downloaded file (or imagenet / imagenet-v2, "
                                    "torchvision's mobilenet_v2_100)")
        if not path.suffix and len(path.parts) == 1:  # a word: a tag, not a file, was meant
            raise FileNotFoundError(f"weights {str(source)!r} are neither a file nor a tag: pass "
                                    f"a file or one of {', '.join(WEIGHT_TAGS)}")
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        return path, f.read(16)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Any, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise WeightsError(f"{path} is a damaged safetensors file: its header is cut short")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise WeightsError(f"{path} is a damaged safetensors file: {e}"[:500]) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is a damaged safetensors file: its header is not a table")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise WeightsError(f"{path} is a damaged safetensors file: {e}") from None
    metadata = header.get("__metadata__") or {}
    config = meta = None
    if isinstance(metadata, dict) and metadata.get("format") == FORMAT_NAME:
        try:
            config, meta = json.loads(metadata["config"]), json.loads(metadata["meta"])
        except (KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:
            # RecursionError: JSON nested thousands deep (forged), which json cannot parse.
            raise WeightsError(f"{path} has damaged mobilenetv2 metadata: {e}"[:500]) from None
        if not isinstance(config, dict) or not isinstance(meta, dict):
            raise WeightsError(f"{path} has damaged mobilenetv2 metadata")
    return state, config, meta


def is_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes are safetensors': an 8-byte header length, then JSON."""
    return len(head) >= 9 and head[8:9] == b"{" and head[:4] != b"PK\x03\x04"


def is_torch_save(head: bytes) -> bool:
    """Whether a file's first bytes are ``torch.save``'s: a zip archive or a legacy pickle.

    A safetensors header length can begin with the pickle opcode ``\\x80`` too (one file in
    256); its JSON at byte 8 tells them apart. (torch.load reads such a file, but drops the
    metadata that holds the model's configuration and preprocessing.)"""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and not is_safetensors(head))


def _read_torch(path: Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], Any, Any]:
    program = _torch_program(path)
    if program:
        raise WeightsError(f"{path} is {program}, not weights: pass the .safetensors it was "
                           "exported from, or an .onnx or .pte export (eval, predict and bench "
                           "run those)")
    return _unwrap_container(torch_load(path), str(path), use_ema)


def _torch_program(path: Path) -> str | None:
    """What kind of program a torch zip archive holds, if it is one rather than weights:
    ``export --format exported`` (.pt2) or ``torchscript`` (.pt) files."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # noqa: BLE001 - not a readable zip (legacy torch.save, or damaged, with
        return None    # any of zipfile's errors): torch_load reads it, or says what is wrong
    if any(n.endswith(("/archive_format", "/models/model.json")) for n in names):
        return "a torch.export program (load it with torch.export.load)"
    if any("/code/__torch__/" in n for n in names):
        return "a TorchScript program (load it with torch.jit.load)"
    return None


def torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code.

    One class is allowed besides: ``argparse.Namespace``, in which the training checkpoints of
    torchvision's reference scripts (``checkpoint.pth``, ``model_N.pth``) and timm's
    ``train.py`` (``model_best.pth.tar``) keep their command-line arguments. It is plain data:
    unpickling makes an empty one and fills its ``__dict__`` with values that are themselves
    held to the same rules, so nothing runs.

    Raises:
        WeightsError: for a pickle that holds anything else, and for a damaged file.
    """
    import argparse

    try:
        # Quantized tensors (torchvision's int8 weights) are rebuilt through APIs torch
        # deprecates; each would print a warning.
        # (torch.serialization.safe_globals arrived in torch 2.5; before it, Namespace is refused.)
        allow = getattr(torch.serialization, "safe_globals", None)
        with warnings.catch_warnings(), allow([argparse.Namespace]) if allow else nullcontext():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"refused to load {path}: it holds objects other than tensors, and loading it could "
            f"run code ({first[:200]}). Only load files you trust, and re-save them as "
            "safetensors"
        ) from None
    except Exception as e:  # torch.load raises a dozen types on damaged files (found by fuzzing)
        raise WeightsError(f"{path} is a damaged or unsupported torch file: {e}"[:500]) from None


def _unwrap_container(obj: Any, name: str,
                      use_ema: bool = False) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """Find the state_dict in a checkpoint (``use_ema``: its EMA's), check it holds tensors,
    strip wrapper prefixes."""
    config = meta = None
    ema = _ema_entry(obj)
    if isinstance(obj, Mapping):
        config = obj.get("model_config") if isinstance(obj.get("model_config"), dict) else None
        meta = obj.get("model_meta") if isinstance(obj.get("model_meta"), dict) else None
    if use_ema and ema is None and not _is_averaged_model(obj):
        raise WeightsError(f"{name} holds no EMA weights (none of {', '.join(_EMA_KEYS)}, where "
                           "timm's, torchvision's and mobilenetv2's training checkpoints keep "
                           "them): drop use_ema=True (--use-ema, --teacher-use-ema)")
    if use_ema and ema is not None:
        obj = ema[1]
    elif isinstance(obj, Mapping):
        if ema is not None:  # as timm's validate.py without --use-ema, but not silently
            _say_it_holds_ema_weights(name, ema[0])
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    # An AveragedModel's state_dict (torchvision's EMA) counts its updates beside the weights.
    averaged = _is_averaged_model(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{name} holds no state_dict (expected a mapping of names to tensors)")
    from .quantize import is_torchvision_int8

    if is_torchvision_int8(obj):
        raise WeightsError(
            f"{name} is torchvision's int8 (quantized) MobileNetV2, which runs in ONNX Runtime: "
            f"convert it with `mobilenetv2 quantize --weights {name} --out model_int8.onnx` "
            "(no --data: its calibration is in the file), then eval or predict the .onnx file")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if averaged and key == "n_averaged":
            continue
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"{name} is not a state_dict: entry {key!r} is a {type(value).__name__}, "
                "not a tensor"
            )
        if value.layout != torch.strided or value.is_quantized:
            raise WeightsError(f"{name} holds a sparse or quantized tensor ({key}): expected "
                               "the dense float weights of a MobileNetV2")
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        state[key] = value
    return state, config, meta


def _ema_entry(obj: Any) -> tuple[str, Mapping[str, Any]] | None:
    """(key, state_dict) of the EMA weights a training checkpoint keeps, or None."""
    if not isinstance(obj, Mapping):
        return None
    for key in _EMA_KEYS:
        value = obj.get(key)
        if key == "ema" and isinstance(value, Mapping) and "updates" in value:
            value = value.get("module")  # ours: {"module": state_dict, "updates": n}
        if isinstance(value, Mapping) and value:
            return key, value
    return None


@functools.lru_cache(maxsize=32)
def _say_it_holds_ema_weights(name: str, key: str) -> None:
    """The notice that raw weights are loaded beside EMA ones, once per file: train reads a
    --pretrained file more than once (for its network's name, then its weights)."""
    log.info("%s holds EMA weights too (%s): these are its raw weights; use_ema=True "
             "(--use-ema, --teacher-use-ema) loads the EMA's", name, key)


def _is_averaged_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.optim.swa_utils.AveragedModel``'s state_dict."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("n_averaged"), torch.Tensor)
            and any(isinstance(k, str) and k.startswith("module.") for k in obj))


def _check_meta(meta: dict[str, Any] | None, name: str) -> None:
    """Refuse preprocessing metadata that eval, predict or export could not use safely."""
    damaged = damaged_meta(meta)
    if damaged:
        raise WeightsError(f"{name} has damaged mobilenetv2 metadata: {'; '.join(damaged)}; "
                           "re-save the weights")


def _plain(value: Any) -> Any:
    """NumPy and torch arrays and scalars, and tuples, as JSON's lists and numbers."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _meta_to_store(meta: dict[str, Any], num_classes: int) -> str:
    """``meta`` as the JSON text save_weights stores, checked as load_model checks it.

    Raises:
        ValueError: for values load_model would refuse, or that JSON cannot hold.
    """
    meta = {key: _plain(value) for key, value in meta.items()}
    names = meta.get("class_names")
    if isinstance(names, list) and all(
            isinstance(n, str) or (isinstance(n, int) and not isinstance(n, bool)) for n in names):
        meta["class_names"] = names = [str(n) for n in names]  # digits' target_names: 0 ... 9
    if isinstance(names, list) and num_classes and len(names) != num_classes:
        raise ValueError(f"model.meta['class_names'] has {len(names)} names for the model's "
                         f"{num_classes} classes: give one name per class, in the order of the "
                         "classifier's outputs (or None); for a new classifier, "
                         "model.reset_classifier(num_classes) first")
    damaged = damaged_meta(meta)
    if damaged:
        raise ValueError(f"model.meta has values load_model would refuse: {'; '.join(damaged)}")
    try:
        return json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.meta cannot be saved as JSON ({e}): keep its values to "
                         "strings, numbers, lists and dicts") from None


def detect_format(state_dict: Mapping[str, torch.Tensor], name: str = "the state_dict") -> str:
    """Which implementation a state_dict comes from: mobilenetv2, torchvision, timm or seed."""
    markers = {
        "mobilenetv2": "stem.conv.weight",
        "torchvision": "features.0.0.weight",
        "timm": "conv_stem.weight",
        "seed": "preliminary.0.weight",
    }
    for fmt, key in markers.items():
        if key in state_dict:
            return fmt
    sample = ", ".join(list(state_dict)[:3])
    raise WeightsError(
        f"{name} is not a MobileNetV2 state_dict this package knows (keys start {sample}); "
        "it reads mobilenetv2, torchvision, timm and walk-through (seed) weights"
    )


# --------------------------------------------------------------------------------------------
# Loading into a model


def load_weights(
    model: nn.Module,
    source: PathLike | Mapping[str, Any] | LoadedWeights,
    *,
    strict: bool = True,
    adapt: bool | Sequence[str] = False,
    use_ema: bool = False,
) -> nn.Module:
    """Load weights of any supported format into ``model``, converting keys as needed.

    Args:
        model: a model from :func:`create_model` (faithful, features-only or seed).
        source: a file path, a state_dict, or a checkpoint dict that holds one.
        strict: refuse missing or unexpected keys (shapes must always agree).
        adapt: fit weights made for other ``"classes"`` or input ``"channels"`` (True: both),
            as timm does when it loads pretrained weights into ``create_model(...,
            num_classes=k, in_chans=c)``: a classifier for other classes is left freshly
            initialised, RGB stem filters are adapted to ``c`` channels
            (:func:`adapt_input_conv`). Every other tensor must still fit. ``create_model``
            adapts the classes when ``num_classes`` is passed, the channels when ``in_channels``
            (or ``in_chans``) is.
        use_ema: load the EMA weights a training checkpoint keeps beside its raw ones
            (see :func:`read_weights`).

    Returns:
        ``model``, with the weights loaded and, where the file has them, its preprocessing
        and class names in ``model.meta``.

    Raises:
        FileNotFoundError: when the file does not exist.
        WeightsError: when the file cannot be read or does not fit the model; the message names
            the missing, unexpected and wrongly shaped keys and the likely cause.
    """
    loaded = read_weights(source, use_ema=use_ema)
    target = _unwrap_module(model)
    state = _fitting_state_dict(loaded, target, strict, adapt)
    if not strict:  # what strict=False let through, logged as timm's load_pretrained does
        expected = target.state_dict()
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        if missing:
            log.info("%d tensors of the model keep their initialisation (not in %s): %s",
                     len(missing), loaded.source, _key_list(missing))
        if unexpected:
            log.warning("%d tensors of %s fit nothing in the model and were not loaded: %s",
                        len(unexpected), loaded.source, _key_list(unexpected))
    _load_state(target, loaded, state)
    return model


def _key_list(keys: Sequence[str], shown: int = 6) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


# Where each layout keeps the first convolution and the classifier.
_STEM_KEYS = ("stem.conv.weight", "preliminary.0.weight")
_CLASSIFIER_PREFIXES = ("classifier.", "final.2.")


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB stem filters (O, 3, kH, kW) for ``in_channels`` inputs, by timm's rule
    (``timm.models.adapt_input_conv``): summed over the colours for one channel, so a gray
    image gives the response the RGB filters give to that gray in all three channels; for
    other counts tiled (R, G, B, R, ...) and scaled by ``3 / in_channels``, so a constant
    image gives the same response.

    Raises:
        WeightsError: for filters that do not take three channels.
    """
    if weight.shape[1] == in_channels:
        return weight
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise WeightsError(f"only RGB stem filters adapt to other channel counts; these take "
                           f"{weight.shape[1]} channels, the model {in_channels}")
    dtype, weight = weight.dtype, weight.float()
    if in_channels == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_channels / 3)
        adapted = weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (3 / in_channels)
    return adapted.to(dtype)


def adapt_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    adapt: bool | Sequence[str] = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (in the model's layout) fitted to another head and input: a classifier for
    another number of classes than ``expected``'s is dropped (``"classes"`` in ``adapt``), RGB
    stem filters are adapted to the model's channels (``"channels"``). Returns the fitted state
    and the model's keys that it leaves to their fresh initialisation."""
    kinds = ("classes", "channels") if adapt is True else tuple(adapt or ())
    state = dict(state)
    for key in _STEM_KEYS if "channels" in kinds else ():
        # (only the input channels: a stem of another width is refused when loading)
        if key in state and key in expected and state[key].shape[1:2] != expected[key].shape[1:2]:
            state[key] = adapt_input_conv(state[key], expected[key].shape[1])
            log.info("adapted the stem's RGB filters to %d input channels", expected[key].shape[1])
    head = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES)] if "classes" in kinds else []
    # Only other classes make a new classifier: one that takes other features (the seed
    # variant at another input width) is a mismatch to report, not to paper over.
    if any(k in expected and state[k].shape[0] != expected[k].shape[0] for k in head):
        for key in head:
            del state[key]
        log.info("the classifier starts afresh: the weights were made for other classes")
    fresh = [k for k in expected if k.startswith(_CLASSIFIER_PREFIXES) and k not in state]
    return state, fresh


def _load_state(target: nn.Module, loaded: LoadedWeights, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (already checked to fit) into ``target``, and ``loaded``'s metadata."""
    try:
        target.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WeightsError(f"{loaded.source} does not load: {' '.join(str(e).split())[:300]}") from None
    _update_meta(target, loaded)


def _fitting_state_dict(loaded: LoadedWeights, target: nn.Module, strict: bool,
                        adapt: bool | Sequence[str] = False) -> dict[str, torch.Tensor]:
    """``loaded``'s tensors under ``target``'s names; refuses what does not fit ``target``."""
    _check_conventions(loaded, target)
    state = convert_state_dict(loaded, target)
    expected = target.state_dict()
    if isinstance(target, MobileNetV2Features):  # a backbone takes a classifier's weights
        state = {k: v for k, v in state.items() if k in expected}
    # A frozen BatchNorm (torchvision's FrozenBatchNorm2d, what timm's freeze_batch_norm_2d
    # puts in) counts no batches: its own loader drops the counter, and so do we.
    state = {k: v for k, v in state.items()
             if k in expected or not k.endswith(".num_batches_tracked")}
    fresh: list[str] = []
    if adapt:
        state, fresh = adapt_state_dict(state, expected, adapt)
    missing = [
        k for k in expected
        if k not in state and k not in fresh and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    # Casting float16 to float32 is harmless; integer, bool or complex weights in a float
    # layer (a quantized or foreign file) would load as nonsense.
    wrong_dtype = [
        (k, state[k].dtype, expected[k].dtype)
        for k in state
        if k in expected and (state[k].is_floating_point() != expected[k].is_floating_point()
                              or state[k].is_complex())
    ]
    if wrong_shape or wrong_dtype or (strict and (missing or unexpected)):
        raise WeightsError(_mismatch_message(loaded, target, missing, unexpected, wrong_shape,
                                             wrong_dtype))
    return state


# Constructor options that change the function without changing any tensor's shape.
_CONVENTIONS = {"tf_padding": False, "bn_eps": 1e-5, "act_layer": "relu6",
                "linear_bottleneck": True, "use_residual": True}


def _check_conventions(loaded: LoadedWeights, target: nn.Module) -> None:
    """Refuse weights trained with TensorFlow's padding or BatchNorm epsilon (Keras) in a model
    built with PyTorch's, or the other way round: every shape fits, the outputs would not."""
    if not loaded.config or not isinstance(target, (MobileNetV2, MobileNetV2Features)):
        return
    differs = {k: loaded.config.get(k, default) for k, default in _CONVENTIONS.items()
               if loaded.config.get(k, default) != target.config.get(k, default)}
    if differs:
        wanted = ", ".join(f"{k}={v!r}" for k, v in differs.items())
        raise WeightsError(
            f"{loaded.source} ({loaded.format}) was made for a model built with {wanted}: build "
            f"it so (create_model(name, {wanted})), or let load_model(path) build it"
        )


def convert_state_dict(loaded: LoadedWeights, model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``loaded``'s keys into ``model``'s layout (no copy of the tensors)."""
    from .seed import SeedMobileNetV2

    fmt, state = loaded.format, loaded.state_dict
    if isinstance(model, SeedMobileNetV2):
        if fmt != "seed":
            raise WeightsError(
                f"{loaded.source} holds {fmt} MobileNetV2 weights, which the walk-through's "
                "variant cannot take: build create_model('mobilenet_v2_100', ...) instead"
            )
        return dict(state)
    if not isinstance(model, (MobileNetV2, MobileNetV2Features)):
        raise WeightsError(f"load_weights needs a mobilenetv2 model, got {type(model).__name__}")
    if fmt == "seed":
        raise WeightsError(
            f"{loaded.source} holds the walk-through's (seed) weights, whose architecture differs "
            "from the paper's: build create_model('seed', input_width=..., num_classes=...)"
        )
    if fmt in ("mobilenetv2", "keras"):  # Keras files are converted as they are read
        return dict(state)
    peer_to_ours = {v: k for k, v in _peer_prefixes(model, fmt).items()}
    return {_rename(k, peer_to_ours): v for k, v in state.items()}


def _peer_prefixes(model: MobileNetV2 | MobileNetV2Features, peer: str) -> dict[str, str]:
    """Our module paths -> the peer's, derived from the network's own structure."""
    if peer == "torchvision":
        names = {"stem.conv": "features.0.0", "stem.bn": "features.0.1"}
    else:
        names = {"stem.conv": "conv_stem", "stem.bn": "bn1"}
    flat = 1  # torchvision numbers the blocks consecutively after the stem
    for si, stage in enumerate(model.stages):
        for bi, block in enumerate(stage):
            ours = f"stages.{si}.{bi}"
            has_expand = not isinstance(block.expand, nn.Identity)
            if peer == "torchvision":
                q, j = f"features.{flat}.conv", int(has_expand)
                if has_expand:
                    names[f"{ours}.expand.conv"], names[f"{ours}.expand.bn"] = f"{q}.0.0", f"{q}.0.1"
                names[f"{ours}.depthwise.conv"] = f"{q}.{j}.0"
                names[f"{ours}.depthwise.bn"] = f"{q}.{j}.1"
                names[f"{ours}.project.conv"] = f"{q}.{j + 1}"
                names[f"{ours}.project.bn"] = f"{q}.{j + 2}"
            else:
                q = f"blocks.{si}.{bi}"
                if has_expand:  # timm's InvertedResidual
                    names[f"{ours}.expand.conv"], names[f"{ours}.expand.bn"] = f"{q}.conv_pw", f"{q}.bn1"
                    dw_bn, pw_conv, pw_bn = "bn2", "conv_pwl", "bn3"
                else:  # timm's DepthwiseSeparableConv (the t = 1 row)
                    dw_bn, pw_conv, pw_bn = "bn1", "conv_pw", "bn2"
                names[f"{ours}.depthwise.conv"] = f"{q}.conv_dw"
                names[f"{ours}.depthwise.bn"] = f"{q}.{dw_bn}"
                names[f"{ours}.project.conv"] = f"{q}.{pw_conv}"
                names[f"{ours}.project.bn"] = f"{q}.{pw_bn}"
            flat += 1
    if peer == "torchvision":
        names.update({"head.conv": f"features.{flat}.0", "head.bn": f"features.{flat}.1",
                      "classifier": "classifier.1"})
    else:
        names.update({"head.conv": "conv_head", "head.bn": "bn2", "classifier": "classifier"})
    return names


def _rename(key: str, prefixes: Mapping[str, str]) -> str:
    module, _, param = key.rpartition(".")
    return f"{prefixes[module]}.{param}" if module in prefixes else key


# The constructor arguments that change the network a state_dict fits (or what it computes),
# at their defaults; and those a registered model's name fixes.
CONFIG_DEFAULTS: dict[str, Any] = {
    "num_classes": 1000, "in_channels": 3, "small_input": False, "output_stride": 32,
    "global_pool": "avg", "tf_padding": False, "bn_eps": 1e-5, "act_layer": "relu6",
    "width_mult": 1.0, "depth_mult": 1.0, "fix_stem_head": False,
    "linear_bottleneck": True, "use_residual": True,
}
NAMED_BY_MODEL = ("width_mult", "depth_mult", "fix_stem_head")


def create_call(name: str, arguments: Mapping[str, Any]) -> str:
    """``create_model('NAME', weights=FILE, k=v, ...)``: the call a hint tells the user to make."""
    extra = "".join(f", {k}={v!r}" for k, v in arguments.items())
    return f"create_model({name!r}, weights=FILE{extra})"


def _mismatch_message(
    loaded: LoadedWeights,
    model: nn.Module,
    missing: list[str],
    unexpected: list[str],
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    wrong_dtype: Sequence[tuple[str, torch.dtype, torch.dtype]] = (),
) -> str:
    config = getattr(model, "config", {})
    hints = []
    try:
        found = infer_config(loaded)
    except (KeyError, IndexError, ValueError, TypeError, ArithmeticError):
        found = {}
    differ = {key: value for key, value in found.items()
              if key in config and config[key] != value and key not in ("arch", "name")}
    if found.get("arch", "mobilenet_v2") == config.get("arch", "mobilenet_v2") == "mobilenet_v2":
        differ |= {key: found.get(key, default) for key, default in CONFIG_DEFAULTS.items()
                   if found.get(key, default) != config.get(key, default)}
    from .registry import name_for

    name = found.get("name") or name_for(found)
    network = {k: v for k, v in differ.items() if k in NAMED_BY_MODEL}
    if found.get("features_only"):  # no head conv, no classifier: no classes, no pooling
        differ = {k: v for k, v in differ.items() if k not in ("num_classes", "global_pool")}
    other_network = bool(name and name != config.get("name") and network)
    if found.get("features_only") and (other_network or not config.get("features_only")):
        # A backbone's weights: only a backbone takes them whole, so the call says
        # features_only=True (and the rows the file has, when not the default ones).
        built = {k: v for k, v in differ.items()
                 if k not in (*NAMED_BY_MODEL, "out_indices", "out_rows")}
        # (files of version 0.1.0 stored the rows as out_indices)
        rows = found.get("out_rows", found.get("out_indices"))
        taps = _backbone_rows(len(INVERTED_RESIDUAL_SETTING))
        if rows is not None and rows != taps:
            if all(row in taps for row in rows):
                built["out_indices"] = [taps.index(row) for row in rows]
            else:
                built["out_rows"] = rows
        call = create_call(name or config.get("name") or "NAME", {"features_only": True, **built})
        if other_network:
            which = ", ".join(f"{k}={v!r}" for k, v in network.items())
            hints.append(f"they are {name}'s backbone ({which}): build that ({call}), or let "
                         "load_model(FILE) read the model off the file")
        else:
            hints.append(f"they are a features_only backbone's, without the head conv and "
                         f"classifier: build one ({call}) or let load_model(FILE) rebuild it; "
                         "for a classifier on them, load_weights(model, FILE, strict=False) "
                         "leaves the layers they lack freshly initialised")
        differ = {}
    elif other_network:
        # Another network (width, depth): a named model fixes those, so name the file's, with
        # whatever else it was built with.
        others = {k: v for k, v in differ.items() if k not in NAMED_BY_MODEL}
        which = ", ".join(f"{k}={v!r}" for k, v in network.items())
        hints.append(f"they are {name}'s ({which}): build that ({create_call(name, others)}), "
                     "or let load_model(FILE) read the model off the file")
        differ = {}
    for key, value in differ.items():
        if key == "num_classes":
            hints.append(f"build the model with num_classes={value}, or pass num_classes to "
                         "create_model(name, weights=...), which starts a classifier for "
                         "other classes afresh")
        else:
            hints.append(f"pass {key}={value!r}")
    cause = ""
    shape_of = {k: (got, want) for k, got, want in wrong_shape}
    for key in ("classifier.weight", "final.2.weight"):
        if key in shape_of and shape_of[key][0][0] != shape_of[key][1][0]:
            cause = (
                f"the checkpoint has {shape_of[key][0][0]} classes, the model "
                f"{shape_of[key][1][0]}; "
            )
    parts = [f"weights in {loaded.source} ({loaded.format}) do not fit the model: {cause}"
             + (" and ".join(hints) if hints else "check the model name and arguments")]

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    if missing:
        parts.append(f"missing: {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected: {listed(unexpected)}")
    if wrong_shape:
        parts.append("wrong shape: " + listed(
            [f"{k} {list(got)} vs the model's {list(want)}" for k, got, want in wrong_shape]))
    if wrong_dtype:
        parts.append("wrong dtype: " + listed(
            [f"{k} {got} vs the model's {want}" for k, got, want in wrong_dtype]))
    return "; ".join(parts)


def _update_meta(model: nn.Module, loaded: LoadedWeights) -> None:
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict):
        return
    if loaded.meta:
        for key in ("mean", "std", "input_size", "class_names", "interpolation", "crop_pct",
                    "val_split", "dataset", "training"):
            if key in loaded.meta:
                meta[key] = loaded.meta[key]
    elif loaded.format in PEER_FORMATS:
        from .registry import official_preprocessing

        # An official file by its name (the download's): evaluated as its publisher did; a
        # timm file from the Hugging Face Hub by the config.json beside it.
        meta.update(official_preprocessing(Path(loaded.source).name)
                    or (loaded.format == "timm" and timm_hub_preprocessing(loaded.source)) or {})
        if getattr(model, "num_classes", 0) == 1000:
            meta["class_names"] = imagenet_categories()
    # Weights adapted to another head or input (load_weights(adapt=True)) keep their
    # preprocessing, fitted to the model's channels, but not their class names, nor the
    # record of the run that trained them (they are other weights now).
    channels = getattr(model, "config", {}).get("in_channels")
    stored = loaded.config or {}
    if (stored.get("num_classes", getattr(model, "num_classes", None)) != getattr(model, "num_classes", None)
            or stored.get("in_channels", channels) != channels):
        meta.pop("training", None)
    size = meta.get("input_size")
    if channels and isinstance(size, list) and size and size[0] != channels:
        meta["input_size"] = [channels, *size[1:]]
        for key in ("mean", "std"):
            values = [float(v) for v in meta.get(key) or ()]
            if len(values) == 3:  # RGB statistics: averaged for gray, tiled as the filters are
                meta[key] = ([sum(values) / 3] if channels == 1
                             else [values[i % 3] for i in range(channels)])
    names = meta.get("class_names")
    if names is not None and len(names) != getattr(model, "num_classes", len(names)):
        meta["class_names"] = None


def timm_hub_preprocessing(source: str) -> dict[str, Any]:
    """The preprocessing that the ``config.json`` beside a timm weights file gives, as the
    Hugging Face Hub keeps timm's weights (``model.safetensors`` or ``pytorch_model.bin``
    beside the ``config.json`` whose ``pretrained_cfg`` timm's ``create_model`` and
    ``local-dir:`` read; ``timm.models.push_to_hf_hub`` writes the same): ``interpolation``,
    ``crop_pct``, ``mean``, ``std`` and ``input_size``, those that are valid. Empty where
    there is no such file, or it is not a timm MobileNetV2's."""
    from .runtime import INTERPOLATIONS, MAX_INPUT_SIDE

    config = Path(source).parent / "config.json"
    try:
        if not config.is_file() or config.stat().st_size > 1 << 20:
            return {}
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # (JSON nested beyond parsing)
        return {}
    if not isinstance(cfg, dict) or not str(cfg.get("architecture", "")).startswith("mobilenetv2"):
        return {}
    pretrained = cfg.get("pretrained_cfg", cfg)  # timm's older configs are that dict alone
    if not isinstance(pretrained, dict):
        return {}

    def numbers(value: Any, count: int) -> bool:
        return (isinstance(value, list) and len(value) == count
                and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) for v in value))

    checks = {
        "interpolation": lambda v: v in INTERPOLATIONS,
        "crop_pct": lambda v: isinstance(v, (int, float)) and 0.05 <= v <= 1,
        "mean": lambda v: numbers(v, 3),
        "std": lambda v: numbers(v, 3) and all(x > 0 for x in v),
        # The file comes from anyone: eval and predict resize to it (a side of 60,000 asked
        # for 43 GB), so it is held to a weights file's bounds.
        "input_size": lambda v: numbers(v, 3) and all(
            isinstance(x, int) and 0 < x <= MAX_INPUT_SIDE for x in v),
    }
    return {key: pretrained[key] for key, valid in checks.items()
            if key in pretrained and valid(pretrained[key])}


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file, read a megabyte at a time: which weights a run used, whatever
    the file is called now."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet-1k class names, from torchvision's bundled list (no download)."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------------------------
# Rebuilding a model from a file


def infer_config(loaded: LoadedWeights) -> dict[str, Any]:
    """The constructor arguments a state_dict implies: stored ones, or read off tensor shapes.

    Strides leave no trace in weights, so ``small_input`` can only come from our metadata.
    A state_dict with neither head conv nor classifier is a backbone's (``features_only``).
    """
    if loaded.config:
        return dict(loaded.config)
    state, fmt = loaded.state_dict, loaded.format
    if fmt == "seed":
        linear = state["final.2.weight"]
        side = math.isqrt(max(linear.shape[1] // 1280, 1))
        return {
            "arch": "seed",
            "input_width": 32 * side,
            "num_classes": int(linear.shape[0]),
            "in_channels": int(state["preliminary.0.weight"].shape[1]),
        }
    stem_key, head_key, cls_key = {
        "mobilenetv2": ("stem.conv.weight", "head.conv.weight", "classifier.weight"),
        "torchvision": ("features.0.0.weight", None, "classifier.1.weight"),
        "timm": ("conv_stem.weight", "conv_head.weight", "classifier.weight"),
    }[fmt]
    if head_key is None:  # torchvision's head is the last numbered feature
        last = max(int(k.split(".")[1]) for k in state if k.startswith("features."))
        head_key = f"features.{last}.0.weight"
    stem, head = state[stem_key], state.get(head_key)
    config: dict[str, Any] = {"arch": "mobilenet_v2", "in_channels": int(stem.shape[1])}
    config["num_classes"] = int(state[cls_key].shape[0]) if cls_key in state else 0
    depths = _stage_depths(state, fmt)
    if head is not None:
        config.update(_infer_width_and_depth(
            int(stem.shape[0]), int(head.shape[1]), int(head.shape[0]), depths))
        if cls_key in state and state[cls_key].shape[1] == 2 * head.shape[0]:
            config["global_pool"] = "catavgmax"  # timm's: avg and max side by side
    elif cls_key not in state and depths and len(depths) <= len(INVERTED_RESIDUAL_SETTING):
        # No head conv and no classifier: a backbone's state_dict (timm's features_only
        # model's, or our MobileNetV2Features' saved with torch.save). Its width is read off
        # the last row it has; it rebuilds as the backbone of those rows.
        last = _last_block_channels(state, fmt, len(depths) - 1, depths[-1] - 1)
        config.update(_infer_width_and_depth(int(stem.shape[0]), last, None, depths))
        config.update(features_only=True, out_rows=_backbone_rows(len(depths)))
    return config


def _last_block_channels(state: Mapping[str, torch.Tensor], fmt: str, row: int, block: int) -> int:
    """The output channels of block ``block`` of row ``row`` (its linear projection)."""
    if fmt == "mobilenetv2":
        keys = [f"stages.{row}.{block}.project.conv.weight"]
    else:  # timm: InvertedResidual's conv_pwl, or DepthwiseSeparableConv's conv_pw (t = 1)
        keys = [f"blocks.{row}.{block}.conv_pwl.weight", f"blocks.{row}.{block}.conv_pw.weight"]
    for key in keys:
        if key in state:
            return int(state[key].shape[0])
    raise KeyError(f"{keys[0]} (the last block of the last row) is missing")


def _backbone_rows(rows: int) -> list[int]:
    """The rows a default backbone of the paper's first ``rows`` rows returns: the last row at
    each reduction (strides leave no trace in weights: the paper's are assumed)."""
    reductions, reduction = [], 2
    for _, _, _, stride in INVERTED_RESIDUAL_SETTING[:rows]:
        reduction *= stride
        reductions.append({"reduction": reduction})
    return tap_rows(reductions)


def _stage_depths(state: Mapping[str, torch.Tensor], fmt: str) -> list[int] | None:
    """Blocks per row of the table, for layouts that number blocks by stage (ours, timm's)."""
    prefix = {"mobilenetv2": "stages", "timm": "blocks"}.get(fmt)
    depths: dict[int, int] = {}
    for key in state:
        parts = key.split(".")
        if parts[0] == prefix and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit():
            depths[int(parts[1])] = max(depths.get(int(parts[1]), 0), int(parts[2]) + 1)
    return [depths[i] for i in sorted(depths)] if depths else None


def _infer_width_and_depth(stem_channels: int, last_channels: int, head_channels: int | None,
                           depths: list[int] | None) -> dict[str, Any]:
    """The multipliers (and timm's ``fix_stem_head``) that build these channel and block counts.

    ``last_channels`` are the last row's outputs; without a head (``head_channels`` None, a
    backbone's weights) the last row is the last of ``depths``, which may stop early."""
    from .layers import make_divisible

    paper = [row[2] for row in INVERTED_RESIDUAL_SETTING]
    rows = len(depths) if depths and head_channels is None else len(paper)
    last_c = INVERTED_RESIDUAL_SETTING[rows - 1][1]
    widths = sorted({0.35, 0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4} | {last_channels / last_c})
    for fix in (False, True):
        for width in widths:
            if make_divisible(last_c * width) != last_channels or head_channels not in (
                    None, 1280 if fix else make_divisible(1280 * max(1.0, width))):
                continue
            if stem_channels != (32 if fix else make_divisible(32 * width)):
                continue
            found: dict[str, Any] = {"width_mult": width}
            if fix:
                found["fix_stem_head"] = True
            if depths is None or depths == paper[:rows]:
                return found
            if len(depths) != rows:
                break
            for depth in [1.2, 1.4, *(k / 10 for k in range(1, 41))]:
                scaled = [n if fix and i in (0, len(paper) - 1) else math.ceil(n * depth)
                          for i, n in enumerate(paper)]
                if scaled[:rows] == depths:
                    return found | {"depth_mult": depth}
    # Not a multiplier of the paper's network: the nearest width; loading names what differs.
    return {"width_mult": round(last_channels / last_c, 4)}


def load_model(
    source: PathLike | Mapping[str, Any] | LoadedWeights, *, use_ema: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build the model a weights file describes and load it: ``load_model("best.safetensors")``.

    ``"imagenet"`` and ``"imagenet-v2"`` (torchvision's ImageNet weights, which name one
    network) build ``mobilenet_v2_100`` with them, downloaded once, as ``create_model`` does.

    Our safetensors carry their configuration; for torchvision, timm and walk-through files
    the configuration is read off the tensor shapes. ``overrides`` (e.g. ``small_input=True``)
    replace inferred arguments. ``use_ema``: a training checkpoint's EMA weights rather than
    its raw ones, as timm's ``validate.py --use-ema`` (see :func:`read_weights`).

    Raises:
        FileNotFoundError: when the file does not exist.
        WeightsError: when it cannot be read or does not make a model.
    """
    from .registry import PRETRAINED, build_from_config, create_model, name_for, ours_for_timms

    if (isinstance(source, (str, os.PathLike)) and str(source) in PRETRAINED
            and not Path(source).is_file()):  # a folder named imagenet (the data) is no file
        # torchvision's tags name one network: eval/predict/export --weights imagenet work.
        return create_model("mobilenet_v2_100", weights=str(source), use_ema=use_ema, **overrides)
    loaded = read_weights(source, use_ema=use_ema)
    overrides = ours_for_timms(overrides)  # timm's spellings, as create_model takes them
    stored = infer_config(loaded) if "in_channels" in overrides else {}
    if overrides.get("in_channels", stored.get("in_channels")) != stored.get("in_channels"):
        name = stored.get("name") or name_for(stored) or "NAME"
        # The call that adapts the stem, with whatever else the file's network was built with.
        built = {k: stored[k] for k, default in CONFIG_DEFAULTS.items()
                 if k not in NAMED_BY_MODEL and k in stored and stored[k] != default}
        call = create_call(name, {**built, "in_channels": overrides["in_channels"]})
        raise WeightsError(f"{loaded.source} takes {stored['in_channels']}-channel images and "
                           f"load_model builds the file's network as it is: to adapt its stem, "
                           f"{call}")
    try:
        config = {**infer_config(loaded), **overrides}
        _check_sizes(config, loaded)
        # Built on the meta device first: a configuration that does not match the tensors
        # (damaged, or forged to ask for a billion classes) is refused before any memory is
        # allocated for it.
        with torch.device("meta"):
            skeleton = build_from_config(config)
    except (KeyError, IndexError, ValueError, TypeError, ArithmeticError, RuntimeError) as e:
        raise WeightsError(f"{loaded.source} does not describe a model this package builds: "
                           f"{' '.join(str(e).split())[:300]}") from None
    state = _fitting_state_dict(loaded, skeleton, strict=True)  # the real model has its keys
    model = build_from_config(config)
    _load_state(model, loaded, state)
    return model


def _check_sizes(config: dict[str, Any], loaded: LoadedWeights) -> None:
    """Refuse a configuration that asks for more than the file's tensors can fill, before
    anything is built: a network's Python objects grow with its channels and blocks, even on
    the meta device."""
    shapes = infer_config(LoadedWeights(loaded.state_dict, source=loaded.source))
    if config.get("in_channels", shapes["in_channels"]) != shapes["in_channels"]:
        raise ValueError(f"it says in_channels={config['in_channels']!r}, but its first layer "
                         f"takes {shapes['in_channels']}")
    weights = sum(t.numel() for t in loaded.state_dict.values())

    def numbers(value: Any) -> list[float]:
        if isinstance(value, (list, tuple)):
            return [v for item in value for v in numbers(item)]
        return [value] if isinstance(value, (int, float)) else []

    if any(abs(v) > weights for v in numbers(list(config.values()))):
        raise ValueError(f"it declares sizes beyond its {weights:,} weights")
    setting = config.get("inverted_residual_setting") or ()
    if sum(int(row[2]) for row in setting) > len(loaded.state_dict):
        raise ValueError("it asks for more blocks than the file has tensors")


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside a DDP or torch.compile wrapper."""
    while True:
        for name in ("module", "_orig_mod"):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model
