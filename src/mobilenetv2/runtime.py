"""Torch-free inference on exported models: ONNX Runtime, NumPy and Pillow, nothing else.

This file is self-contained on purpose: it imports only the standard library, NumPy,
onnxruntime and (when it decodes images) Pillow, and nothing from the rest of this package. So it
can be used three ways:

* inside the package: ``from mobilenetv2.runtime import Predictor`` (the package imports its
  torch-based modules lazily, so this imports no torch either);
* on a device without torch: copy this one file next to the ``.onnx`` model and
  ``import runtime`` (or load it with ``importlib.util.spec_from_file_location``);
* as a command: ``python runtime.py model.onnx cat.jpg dog.png photos/ --top-k 3`` (one JSON
  line per image; see :func:`main`).

ExecuTorch programs (``.pte``) run here too, through :class:`mobilenetv2.pte.PteSession`, which
needs torch, ExecuTorch and the package: on a phone they run in ExecuTorch's own runtime.

The preprocessing travels in the ONNX file's metadata (written by :mod:`mobilenetv2.export`):
resize the shorter side, center-crop to the input size, scale to [0, 1], normalise with the
model's mean and std, grayscale or RGB by the model's input channels -- torchvision's evaluation
transform, in NumPy and Pillow.

    >>> predictor = Predictor("model.onnx")
    >>> predictor.predict(["cat.jpg"], top_k=3)
    [[('tabby', 0.61), ('tiger_cat', 0.22), ('Egyptian_cat', 0.09)]]
    >>> logits = predictor.run(batch)            # (N, C, H, W) float32, already normalised
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

# What a model without our metadata is assumed to want: ImageNet preprocessing at 224x224.
DEFAULT_META: dict[str, Any] = {
    "input_format": "normalized",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "input_size": [3, 224, 224],
    "class_names": None,
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "output": "logits",
}
# Where a .pte file meets this file without the package (copied onto a device).
PTE_NEEDS_EXECUTORCH = ("{path} is an ExecuTorch program: .pte programs need the ExecuTorch "
                        "runtime, which comes with torch and this package: pip install "
                        "'mobilenetv2[executorch]' (or export the model to ONNX for this file)")
# Images this small (CIFAR, digits) are resized whole: a center crop would cut off the object.
SMALL_IMAGE = 64
# What a folder's images are called (torchvision's suffixes: no GIF); training and predict
# walk folders with list_images too.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folders that operating systems and NAS boxes leave beside images (macOS' zip leftovers,
# Synology's thumbnails, Windows' bin); read as classes they would shift every label.
SYSTEM_FOLDERS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}
# Files Windows' Explorer leaves in photo folders (thumbnail caches, folder settings), in any
# case: not images, but not worth the "left out N files" warning either, as macOS' .DS_Store
# and ._x.jpg (hidden by their dot) are not.
SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini"}

# How resizes resample (config.INTERPOLATIONS, which --interpolation takes, is this tuple).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Far above any MobileNetV2 input; eval, predict and export allocate images of this side.
MAX_INPUT_SIDE = 8192
# How many times a center crop's pixels an image may be resized to before the crop is taken;
# a longer image has only the region the crop keeps resized (see resize_center_crop).
MAX_RESIZE_OVER_CROP = 16
# What an exported model's metadata may say it takes and returns (see export's
# deployment_metadata).
INPUT_FORMATS = ("normalized", "pixels")
OUTPUTS = ("logits", "probabilities", "features")

log = logging.getLogger(__name__)


def resize_policy(size: int, crop_pct: float | None = None) -> tuple[str, int]:
    """How an evaluation image is brought to ``size`` x ``size``: ``(mode, side)``.

    ``("exact", size)``: resize the whole image to size x size (images of at most 64 px);
    ``("shorter", side)``: resize the shorter side to ``floor(size / crop_pct)`` (256 for 224)
    and center-crop. This is the evaluation transform of
    :func:`mobilenetv2.data.image_transforms`, so ONNX Runtime sees what eager PyTorch sees.
    """
    if size <= SMALL_IMAGE:
        return "exact", size
    return "shorter", int(size / float(crop_pct or DEFAULT_META["crop_pct"]))


def channel_stats(values: Sequence[float], channels: int) -> list[float]:
    """Per-channel mean or std for ``channels`` channels.

    One value is repeated; three values for a one-channel (grayscale) model are averaged, as a
    grayscale image's statistics are roughly the mean of its colour channels'.

    Raises:
        ValueError: for a count that fits neither.
    """
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise ValueError(f"{len(values)} normalisation values do not fit {channels} input channels")


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Logical CPUs this process may use: its affinity (``taskset``, cpusets), capped by a
    container's CPU quota (``docker --cpus 2``, a Kubernetes limit), which the affinity does
    not show: a 2-CPU container on a 64-core host is 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(cpus, quota) if quota else cpus)


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU limit of this process's cgroup, rounded up (cgroup v2's ``cpu.max``, v1's
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None without one."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # "200000 100000", "max ..."
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: no limit
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return -(-quota_us // period_us) if quota_us > 0 and period_us > 0 else None


def default_threads() -> int:
    """Threads for inference when none are asked for: ``OMP_NUM_THREADS`` when set (as torch
    follows it), else the physical cores, within the container's CPU quota."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return min(physical_cores(), usable_cpus())


def sysctl(name: str) -> str:
    """A macOS ``sysctl`` value, "" where there is none."""
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's units)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        if sys.platform == "darwin":  # Apple's M chips have no hyper-threads: halving lost half
            cores = sysctl("hw.physicalcpu")
            if cores.isdigit() and int(cores) > 0:
                return int(cores)
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def damaged_meta(meta: dict[str, Any] | None) -> list[str]:
    """The keys of a model's metadata (a weights file's ``meta``, or an exported model's
    ``metadata_props``) that eval, predict or export could not use safely, each with what it
    must be. Files can come from anyone: a forged ``input_size`` or ``resize`` would make the
    preprocessing allocate images of any size, and forged types end in tracebacks."""
    if meta is None:
        return []

    def numbers(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
        items = value if isinstance(value, list) else [value]
        return bool(items) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
            for v in items)

    def one_of(key: str, choices: Sequence[str]) -> bool:
        return meta.get(key) is None or (isinstance(meta[key], str) and meta[key] in choices)

    size, names, resize = meta.get("input_size"), meta.get("class_names"), meta.get("resize")
    fine = {
        f"input_size (3 integer sides in 1..{MAX_INPUT_SIDE})":
            size is None or (isinstance(size, list) and len(size) == 3
                             and all(type(v) is int for v in size)
                             and numbers(size, 1, MAX_INPUT_SIDE)),
        "mean (numbers)": meta.get("mean") is None or numbers(meta["mean"]),
        "std (numbers > 0)": meta.get("std") is None or numbers(meta["std"], 1e-12),
        "crop_pct (in [0.05, 1])": meta.get("crop_pct") is None
            or numbers(meta["crop_pct"], 0.05, 1.0),
        # The side an image is resized to before the crop: input side / crop_pct at most.
        f"resize (an integer in 1..{20 * MAX_INPUT_SIDE})":
            resize is None or (type(resize) is int and numbers(resize, 1, 20 * MAX_INPUT_SIDE)),
        "resize_mode (exact or shorter)": one_of("resize_mode", ("exact", "shorter")),
        "val_split (in (0, 1))": meta.get("val_split") is None
            or (not isinstance(meta["val_split"], list)
                and numbers(meta["val_split"], 1e-9, 1 - 1e-9)),
        f"interpolation (one of {', '.join(INTERPOLATIONS)})":
            one_of("interpolation", INTERPOLATIONS),
        f"input_format (one of {', '.join(INPUT_FORMATS)})": one_of("input_format", INPUT_FORMATS),
        f"output (one of {', '.join(OUTPUTS)})": one_of("output", OUTPUTS),
        "dataset (a string)": meta.get("dataset") is None or isinstance(meta["dataset"], str),
        "class_names (a list of strings)": names is None or (
            isinstance(names, list) and all(isinstance(n, str) for n in names)),
    }
    return [key for key, ok in fine.items() if not ok]


def read_metadata(session: ort.InferenceSession, name: str = "the model") -> dict[str, Any]:
    """The preprocessing a session's model carries, with defaults for what it lacks.

    Raises:
        ValueError: for metadata the preprocessing could not use safely (:func:`damaged_meta`),
            saying so of ``name``.
    """
    stored = session.get_modelmeta().custom_metadata_map
    meta = dict(DEFAULT_META)
    for key, text in stored.items():
        try:
            meta[key] = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # text, or JSON nested beyond parsing
            meta[key] = text
    damaged = damaged_meta(meta)
    side = max(meta["input_size"][1:]) if not damaged else 0
    if "resize" in stored and meta.get("resize_mode") != "exact" and meta["resize"] < side:
        # Here resize is what the preprocessing resizes to (a weights file's is a record, left
        # by the weights a run started from): below the crop, the crop reaches past the image.
        damaged.append(f"resize (at least the input side, {side})")
    if damaged:
        raise ValueError(f"{name} has damaged mobilenetv2 metadata: {'; '.join(damaged)}; "
                         "export it again")
    shape = session.get_inputs()[0].shape
    if "input_size" not in stored and len(shape) == 4 and all(isinstance(d, int)
                                                              for d in shape[1:]):
        meta["input_size"] = list(shape[1:])
    if "resize" not in stored:
        meta["resize_mode"], meta["resize"] = resize_policy(int(meta["input_size"][-1]),
                                                            meta.get("crop_pct"))
    return meta


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has the VNNI int8 dot-product instructions (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def int8_weights_saturate() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels may saturate here: an x86 CPU without VNNI.

    There the multiply-add (AVX2 ``vpmaddubsw``) sums pairs of products in int16, which
    overflows when the weights use all 8 bits; 7-bit weights (``reduce_range``) or uint8
    weights are exact. With VNNI (``vpdpbusd`` sums in int32) and on ARM nothing saturates.
    """
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return x86 and not cpu_has_vnni()


def full_range_int8_weights(meta: dict[str, Any]) -> bool:
    """Whether a model's metadata says it holds int8 weights that use all 8 bits: the
    weights :func:`int8_weights_saturate` CPUs compute wrongly."""
    quantization = meta.get("quantization")
    return (isinstance(quantization, dict) and quantization.get("weights") == "int8"
            and not quantization.get("reduce_range", False))


def is_executorch_program(path: str | os.PathLike[str]) -> bool:
    """Whether a file is an ExecuTorch program: a ``.pte`` name, or the FlatBuffers identifier
    ``ET`` + two digits at bytes 4-8 that every ``.pte`` file has."""
    if Path(path).suffix.lower() == ".pte":
        return True
    head = _file_head(path, 8)
    return len(head) == 8 and head[4:6] == b"ET" and head[6:8].isdigit()


def _file_head(path: str | os.PathLike[str], size: int) -> bytes:
    """The first ``size`` bytes of a file (fewer for a shorter one; none for one that cannot
    be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


# An ONNX file is a protobuf ModelProto, whose fields are written in the order of their numbers:
# ir_version (field 1, a varint: tag 0x08, a small number) first, then producer_name (2),
# producer_version (3), domain (4), model_version (5), doc_string (6), graph (7) or opset_import
# (8). These are the tags of fields 2-8.
_MODEL_PROTO_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})


def is_onnx_model(path: str | os.PathLike[str]) -> bool:
    """Whether a file is an ONNX model: an ``.onnx`` or ``.ort`` name, or under any name the
    bytes an ONNX ModelProto starts with (``ir_version``, then another of its fields)."""
    if Path(path).suffix.lower() in (".onnx", ".ort"):
        return True
    head = _file_head(path, 9)
    # A safetensors file starts with its header's length and then "{": its first bytes could
    # read as ONNX's only for a header of megabytes, but "{" at byte 8 settles it.
    return (len(head) == 9 and head[0] == 0x08 and 0 < head[1] < 0x80
            and head[2] in _MODEL_PROTO_TAGS and head[8:9] != b"{")


def runs_in_runtime(path: str | os.PathLike[str]) -> bool:
    """Whether :class:`Predictor` runs this file rather than ``load_model``: an ONNX or ONNX
    Runtime (``.onnx``, ``.ort``) model, or an ExecuTorch program, known by its bytes whatever
    its name."""
    return is_onnx_model(path) or is_executorch_program(path)


def _ort_session(path: Path, threads: int | None,
                 providers: Sequence[str] | None) -> ort.InferenceSession:
    import onnxruntime as ort  # here: to_mode alone (the training data uses it) needs none

    providers = list(providers or ["CPUExecutionProvider"])
    unknown = [p for p in providers if p not in ort.get_available_providers()]
    if unknown:
        raise ValueError(f"ONNX Runtime here has no {', '.join(unknown)}; available: "
                         f"{', '.join(ort.get_available_providers())}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or default_threads()
    # One model, one request at a time: parallelism inside the ops, none between them.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for bad files
        raise ValueError(f"{path} is not a model ONNX Runtime can load: "
                         f"{str(e).strip().splitlines()[0][:300]}") from None


def printable(text: str) -> str:
    """Text as it fits one line of a terminal: what is not printable in it (a line break or an
    escape character in a file name or a class name, a byte that is not UTF-8) is written as
    Python escapes it (``\\n``, ``\\x1b``, ``\\udcff``). So each image stays one line,
    stdout can encode it, and a weights file's class names or a folder's file names cannot
    send the terminal escape sequences (retitle it, clear it, rewrite what it shows) or fake
    output lines. JSON output keeps the text as it is (JSON escapes control characters)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def one_line(error: BaseException) -> str:
    """An exception as the one line the CLI prints: no traceback, no line breaks, nothing
    that is not :func:`printable` (the paths and names it quotes may hold anything)."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return printable(f"{error.strerror}: {error.filename}")
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:  # raised in a DataLoader worker: keep the error line only
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return printable(" ".join(text.split()))


def json_text(value: Any) -> str:
    """``value`` as strict JSON: a float that is NaN or infinite (a loss or a probability of
    weights that diverged) becomes null, where ``json.dumps`` writes ``NaN``, which JSON
    parsers (jq, JavaScript, Go) refuse."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_classes(outputs: np.ndarray, top_k: int,
                probabilities: bool = False) -> list[list[tuple[int, float]]]:
    """Each row's ``top_k`` most likely classes as ``(index, probability)``, most likely first.

    Args:
        outputs: (N, num_classes) logits, or probabilities when ``probabilities`` is true (a
            model that ends in a softmax: another one would flatten them).
        top_k: classes per row, at most ``num_classes``; equal probabilities rank the lower
            index first.
    """
    probs = np.asarray(outputs, dtype=np.float32)
    probs = probs if probabilities else softmax(probs)
    k = min(top_k, probs.shape[-1])
    return [[(int(i), float(row[i])) for i in np.argsort(-row, kind="stable")[:k]]
            for row in probs]


def class_name(names: Sequence[str] | None, index: int) -> str:
    """A class's stored name, or ``class_<index>`` for a model that stores none."""
    return names[index] if names and index < len(names) else f"class_{index}"


class Predictor:
    """An exported model with its preprocessing: images in, top-k class names out.

    Args:
        model_path: an ``.onnx`` (or ONNX Runtime ``.ort``) file, or an ExecuTorch ``.pte``
            program from :mod:`mobilenetv2.export` (that one needs torch, ExecuTorch and this
            package: :class:`mobilenetv2.pte.PteSession`).
        threads: intra-op threads; default: the physical cores (hyper-threads slow it down).
        providers: ONNX Runtime execution providers, in order of preference; default CPU only.

    Attributes:
        meta: ``input_format`` (``"normalized"``, or ``"pixels"`` for a model exported with
            ``pixel_input``: it takes uint8 (N, H, W, C) and normalises itself),
            ``mean``, ``std``, ``input_size`` [C, H, W], ``class_names`` (or None),
            ``resize``, ``crop_pct``, ``interpolation``, ``output`` and, for our exports,
            ``config``: everything :func:`mobilenetv2.data.eval_transform` would need.
        batch_size: the model's fixed batch size, or None when it takes any.

    Raises:
        FileNotFoundError: when ``model_path`` does not exist.
        ValueError: when it is not a model ONNX Runtime (or ExecuTorch) can load, or a provider
            is unknown.
        ImportError: for a ``.pte`` file where ExecuTorch (or torch and this package, for this
            file copied alone) is not installed.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        executorch = is_executorch_program(path)
        if executorch:
            if providers:
                raise ValueError(f"{path} is an ExecuTorch program: it runs on XNNPACK, "
                                 "not on ONNX Runtime's execution providers")
            try:
                from mobilenetv2.pte import PteSession  # needs torch and ExecuTorch
            except ImportError:  # this file copied alone onto a device: no package, no torch
                raise ImportError(PTE_NEEDS_EXECUTORCH.format(path=path)) from None

            self.session: Any = PteSession(path, threads=threads)  # None: physical cores
        else:
            self.session = _ort_session(path, threads, providers)
        self.path = path
        self.meta = read_metadata(self.session, str(path))
        if (not executorch and full_range_int8_weights(self.meta)
                and int8_weights_saturate()):
            log.warning("%s has int8 weights that use all 8 bits; ONNX Runtime's int8 kernels "
                        "saturate on x86 CPUs without VNNI, as this one seems to be, and its "
                        "outputs may be wrong: quantize it again with 7-bit weights (the "
                        "default of mobilenetv2 quantize --data), or for torchvision's int8 "
                        "weights with --weight-type uint8", path)
        node = self.session.get_inputs()[0]
        self._check_input(node)
        outputs = self.session.get_outputs()
        self.input_name, self.output_name = node.name, outputs[0].name
        self.output_names = [output.name for output in outputs]
        self.batch_size: int | None = node.shape[0] if isinstance(node.shape[0], int) else None
        self.input_size = tuple(int(v) for v in self.meta["input_size"])
        # Exported with a dynamic image size (export --dynamic-size): a batch of any height and
        # width goes in as it is; input_size is then only what preprocess resizes images to.
        pixels = self.meta.get("input_format") == "pixels"
        sides = list(node.shape)[1:3] if pixels else list(node.shape)[2:4]
        self.any_size = len(node.shape) == 4 and not any(isinstance(d, int) for d in sides)
        # A features_only export returns feature maps, not classes.
        self.is_feature_extractor = self.meta.get("output") == "features"
        # A model from elsewhere says nothing about its outputs: it may be either, and
        # features() gives it all of them.
        self._says_classifier = (not self.is_feature_extractor and "output"
                                 in self.session.get_modelmeta().custom_metadata_map)
        self.pixel_input = self.meta.get("input_format") == "pixels"
        self.num_classes = None if self.is_feature_extractor else outputs[0].shape[-1]

    def _check_input(self, node: Any) -> None:
        """Refuse metadata that disagrees with the model's own input (an edited or forged
        file): the preprocessing would make batches ONNX Runtime refuses, with a traceback."""
        pixels = self.meta.get("input_format") == "pixels"
        channels, height, width = (int(v) for v in self.meta["input_size"])
        wanted = [height, width, channels] if pixels else [channels, height, width]
        dims = list(node.shape)[1:]
        kind = getattr(node, "type", None)  # ExecuTorch's inputs say none; ONNX Runtime's do
        dtype = "tensor(uint8)" if pixels else "tensor(float)"
        if (len(dims) == 3 and any(isinstance(d, int) and d != v
                                   for d, v in zip(dims, wanted, strict=True))
                or kind not in (None, dtype)):
            raise ValueError(f"{self.path}'s metadata says it takes {dtype} (N, "
                             f"{', '.join(map(str, wanted))}), but the model takes "
                             f"{kind or 'tensor'} {list(node.shape)}: export it again")

    def __repr__(self) -> str:
        return (f"Predictor({str(self.path)!r}, input_size={list(self.input_size)}, "
                f"batch_size={self.batch_size or 'any'})")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (or the model's probabilities) for a preprocessed batch.

        Args:
            batch: (N, C, H, W) float32, already normalised. A pixel-input model
                (``meta["input_format"] == "pixels"``) takes (N, H, W, C) uint8 pixels, or such
                a normalised batch, which is turned back into its pixels
                (:func:`normalized_to_pixels`). A model exported with a fixed batch size gets
                it in chunks, the last one padded.

        Returns:
            (N, num_classes) float32.

        Raises:
            ValueError: for a batch of the wrong shape, or a feature extractor (use
                :meth:`features`).
        """
        self._refuse_feature_extractor()
        return self._outputs(batch, [self.output_name])[0]

    def features(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output for a preprocessed batch: a ``features_only`` export's feature maps,
        finest first (``meta["feature_info"]`` has their channels and strides). A model without
        our metadata gets all its outputs, whatever they are.

        Raises:
            ValueError: for a batch of the wrong shape, or a classifier (its metadata says it
                returns logits or probabilities): it has no feature maps to give.
        """
        if self._says_classifier:
            raise ValueError(f"{self.path} is a classifier: it returns {self.meta['output']}, "
                             "not feature maps; call run(batch) for them, or export a backbone "
                             "(create_model(..., features_only=True)) for feature maps")
        return self._outputs(batch, self.output_names)

    def _refuse_feature_extractor(self) -> None:
        if self.is_feature_extractor:
            raise ValueError(f"{self.path} is a feature extractor (features_only): it returns "
                             "feature maps, not classes; call features(batch) for them")

    def _outputs(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        batch = model_input(batch, self.meta)
        expected = self.input_size
        if self.pixel_input:
            expected = (*self.input_size[1:], self.input_size[0])
            pixels = f"uint8 pixels, (N, {', '.join(map(str, expected))})"
            if batch.dtype != np.uint8 and batch.ndim == 4 and tuple(batch.shape[1:]) == expected:
                raise ValueError(f"{self.path} takes {pixels}, not {batch.dtype}")
            if batch.dtype != np.uint8:
                # A normalised (N, C, H, W) batch of the right size was turned into pixels by
                # model_input: this one is of another size, whatever its type.
                raise ValueError(f"expected a (N, {', '.join(map(str, self.input_size))}) "
                                 f"batch (or {pixels}), got {tuple(batch.shape)}")
        channel = -1 if self.pixel_input else 1
        free = self.any_size and batch.ndim == 4 and batch.shape[channel] == self.input_size[0]
        if batch.ndim != 4 or (tuple(batch.shape[1:]) != expected and not free):
            dims = list(map(str, expected))
            if self.any_size:  # the sides are free: only the channels must agree
                dims[slice(0, 2) if self.pixel_input else slice(1, 3)] = ["H", "W"]
            raise ValueError(f"expected a (N, {', '.join(dims)}) batch, got {tuple(batch.shape)}")
        if self.batch_size is None:
            return self.session.run(names, {self.input_name: batch})
        chunks = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outs = self.session.run(names, {self.input_name: chunk})
            chunks.append([out[: self.batch_size - pad] for out in outs])
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    def preprocess(self, image: Any) -> np.ndarray:
        """One image (a path, a PIL image or an HxW / HxWxC uint8 array) -> what the model
        takes for it: (C, H, W) float32, or (H, W, C) uint8 for a pixel-input model:
        :func:`preprocess_image` with this model's metadata."""
        return preprocess_image(image, self.meta)

    def predict(
        self, images: Iterable[Any], top_k: int = 5, batch_size: int = 32
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most likely classes of each image, with their probabilities.

        Args:
            images: one image or several: paths, PIL images, uint8 arrays (HxW, HxWxC), or
                an NxHxWxC uint8 array of N images.
            top_k: classes per image (at most the number of classes).
            batch_size: images per ONNX Runtime call.

        Returns:
            One list per image of ``(class_name, probability)``, most likely first; classes
            without a stored name are called ``class_<i>``.
        """
        if top_k < 1 or batch_size < 1:
            raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
        self._refuse_feature_extractor()
        if (isinstance(images, (str, os.PathLike)) or hasattr(images, "getpixel")
                or (isinstance(images, np.ndarray) and images.ndim <= 3)):
            images = [images]  # one image: not the characters of a path, the rows of an array
        names = self.meta.get("class_names")
        probabilities = self.meta.get("output") == "probabilities"
        results: list[list[tuple[str, float]]] = []
        pending: list[np.ndarray] = []

        def flush() -> None:
            for row in top_classes(self.run(np.stack(pending)), top_k, probabilities):
                results.append([(class_name(names, i), p) for i, p in row])
            pending.clear()

        for image in images:
            pending.append(self.preprocess(image))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        return results


def model_input(batch: Any, meta: dict[str, Any]) -> np.ndarray:
    """``batch`` as a model with ``meta`` takes it, contiguous: float32, or for a pixel-input
    model (``meta["input_format"] == "pixels"``) uint8, a normalised (N, C, H, W) batch being
    turned back into its pixels (:func:`normalized_to_pixels`). Shapes are not checked."""
    batch = np.asarray(batch)
    if meta.get("input_format") != "pixels":
        return np.ascontiguousarray(batch, dtype=np.float32)
    size = tuple(int(v) for v in meta["input_size"])
    if batch.dtype != np.uint8 and batch.ndim == 4 and tuple(batch.shape[1:]) == size:
        return normalized_to_pixels(batch, meta["mean"], meta["std"])
    return np.ascontiguousarray(batch)


def normalized_to_pixels(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]
                         ) -> np.ndarray:
    """The uint8 pixels, (N, H, W, C), that a normalised float batch (N, C, H, W) was made
    from: ``round((x * std + mean) * 255)`` (exact where the pipeline resized 8-bit images;
    the nearest pixel values where it resized floats). For feeding pixel-input models from a
    pipeline that normalises (evaluation, calibration)."""
    channels = batch.shape[1]
    mean_a = np.asarray(channel_stats(mean, channels), dtype=np.float32).reshape(1, -1, 1, 1)
    std_a = np.asarray(channel_stats(std, channels), dtype=np.float32).reshape(1, -1, 1, 1)
    pixels = np.rint((np.asarray(batch, dtype=np.float32) * std_a + mean_a) * 255.0)
    return np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def preprocess_image(image: Any, meta: dict[str, Any]) -> np.ndarray:
    """One image (a path, a PIL image or an HxW / HxWxC uint8 array) -> (C, H, W) float32.

    Small inputs (<= 64 px) are resized whole; larger ones have the shorter side resized to
    ``meta["resize"]`` and are center-cropped (see :func:`resize_policy`). Then scale to
    [0, 1] and normalise: the evaluation transform of :mod:`mobilenetv2.data`. For a
    pixel-input model (``meta["input_format"] == "pixels"``), the resized and cropped pixels
    instead: (H, W, C) uint8. ``meta`` is a
    :class:`Predictor`'s (plain data, so a worker process can take it where the session cannot
    go).

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for a file that is not a readable image (corrupt, truncated, or a
            decompression bomb: more than twice Pillow's ``MAX_IMAGE_PIXELS``).
    """
    import warnings

    from PIL import Image  # imported here so run() alone never pays for it

    channels, height, width = (int(v) for v in meta["input_size"])
    if channels not in (1, 3):
        raise ValueError(f"images can only feed 1- or 3-channel models, not {channels}")
    if isinstance(image, (str, os.PathLike)):
        try:
            with warnings.catch_warnings():
                # Pillow refuses more than twice MAX_IMAGE_PIXELS (179 MP): a bomb. Below,
                # it only warns, as for a 108 MP phone photo: read, as torchvision reads it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(image) as opened:
                    image = to_mode(opened, channels)
        except FileNotFoundError:
            raise missing_image(image) from None
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise unreadable_image(image, e) from None
    else:
        if isinstance(image, np.ndarray):
            image = image_from_array(image)
        image = to_mode(image, channels)
    resample = {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC}.get(
        str(meta.get("interpolation")), Image.BILINEAR)
    if meta.get("resize_mode") == "exact":
        image = image.resize((width, height), resample)
    else:
        image = resize_center_crop(image, int(meta.get("resize") or max(height, width)),
                                   (width, height), resample)
    if meta.get("input_format") == "pixels":
        # A copy: np.asarray would give a read-only view of Pillow's buffer, which torch warns
        # about when the batch is made a tensor (predict's workers).
        return np.array(image, dtype=np.uint8).reshape(height, width, channels)
    array = np.asarray(image, dtype=np.float32).reshape(height, width, channels) / 255.0
    mean = np.asarray(channel_stats(meta["mean"], channels), dtype=np.float32)
    std = np.asarray(channel_stats(meta["std"], channels), dtype=np.float32)
    return ((array - mean) / std).transpose(2, 0, 1)


def missing_image(path: str | os.PathLike[str]) -> FileNotFoundError:
    """The error for an image path that names nothing. A broken link says where it points:
    ``ls`` lists the link, so "no such file" alone would read as wrong."""
    if os.path.islink(path):
        return FileNotFoundError(f"{path} is a broken link: {os.readlink(path)} does not exist")
    return FileNotFoundError(f"image file not found: {path}")


def unreadable_image(path: str | os.PathLike[str], error: BaseException) -> ValueError:
    """The error for a file that is not a readable image, with Pillow's reason; an empty file
    (a download or copy that failed) said to be one, where Pillow only "cannot identify" it."""
    try:
        empty = os.stat(path).st_size == 0
    except OSError:
        empty = False
    why = "an empty file: 0 bytes" if empty else f"{type(error).__name__}: {error}"
    return ValueError(f"{path} is not a readable image ({why})")


def resize_center_crop(image: Any, short: int, crop: tuple[int, int], resample: int) -> Any:
    """torchvision's ``Resize(short)`` then ``CenterCrop`` to ``crop`` (width, height), on a
    PIL image, in memory bounded by the crop's size.

    Resizing first makes the shorter side ``short`` and the longer one follow, so a long strip
    grows without bound: a 1 x 100,000 PNG (a few hundred bytes, far below Pillow's
    decompression-bomb limit) would become 256 x 25,600,000, over 20 GB, to keep 224 x 224 of it.
    Past :data:`MAX_RESIZE_OVER_CROP` times the crop's pixels, only the region the crop keeps
    is resized (Pillow's ``box``: the same sampling positions, with values that may differ by
    one step of 255); below, the two steps run as torchvision runs them, bit for bit.
    """
    w, h = image.size
    width, height = crop
    # torchvision's Resize(int): the shorter side becomes `short`, the longer follows.
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left = int(round((size[0] - width) / 2.0))
    top = int(round((size[1] - height) / 2.0))
    if (size[0] * size[1] > MAX_RESIZE_OVER_CROP * width * height
            and size[0] >= width and size[1] >= height):  # (a crop past the edges pads)
        scale_x, scale_y = w / size[0], h / size[1]
        box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
        return image.resize((width, height), resample, box=box)
    return image.resize(size, resample).crop((left, top, left + width, top + height))


def to_mode(image: Any, channels: int) -> Any:
    """Any PIL image (palette, RGBA, CMYK, 16-bit, float, ...) in L or RGB, as training saw it.

    16-bit grayscale (PNG and TIFF open as ``I;16``, PGM as ``I``, both scaled to 0..65535 by
    Pillow) is scaled to 8 bits by 65535, rounding; 32-bit integers beyond 65535 by 2^31 - 1;
    float images (``F``) are taken as 0..1. Transparent pixels become white, whether an alpha
    band or a transparent colour (PNG's tRNS, in L, RGB and palette images) says so. The
    training data (:mod:`mobilenetv2.data`) uses this function too, so both prepare an image
    alike.
    """
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0
        else:
            scale = 255.0 / (65535.0 if array.size == 0 or array.max() <= 65535 else 2147483647.0)
        image = Image.fromarray(np.rint(array * scale).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("L" if channels == 1 else "RGB")


def image_from_array(array: np.ndarray) -> Any:
    """A PIL image of an image array: uint8, HxW, HxWx1 (squeezed), HxWx3 or HxWx4 (RGBA).

    Raises:
        ValueError: for another dtype (floats are refused rather than guessed at) or shape.
    """
    from PIL import Image

    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255), got {array.dtype}: scale floats "
                         "in [0, 1] by 255 and convert with .astype(np.uint8)")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    return Image.fromarray(array)


def _positive_int(text: str) -> int:
    """An argparse type: so that ``--top-k 0`` is refused by its own name, not by the
    ``predict`` argument it ends up in (this file cannot use the package's CLI helpers)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def is_hidden(relative: Path) -> bool:
    """Whether a path inside a data folder is hidden or system clutter: any part that starts
    with a dot (``.ipynb_checkpoints``, macOS' ``._x.jpg`` and ``.DS_Store``) or is one of
    SYSTEM_FOLDERS or SYSTEM_FILES (Windows' ``Thumbs.db``)."""
    return any(map(_hidden_name, relative.parts))


def _hidden_name(name: str) -> bool:
    """Whether one file or folder name is hidden or system clutter (see :func:`is_hidden`)."""
    return name.startswith(".") or name in SYSTEM_FOLDERS or name.lower() in SYSTEM_FILES


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(images, others)``: the files under ``folder``, walked recursively and sorted, that are
    images by their suffix (:data:`IMAGE_EXTENSIONS`) and those that are not. Hidden and system
    files (:func:`is_hidden`) are in neither. Links to folders are followed, as torchvision's
    ImageFolder follows them (each folder walked once, so a link to a folder above ends), and
    a broken link is listed, so that reading it says what is missing.

    The walk takes each entry's type from the directory listing (``os.scandir``), as
    torchvision's ``os.walk`` does: a regular file costs no ``stat``, which on a network or
    slow disk is most of the time of listing a million images. Links are stat'ed, to follow
    them; FIFOs and devices are left out (opening one would block).
    """
    files: list[Path] = []
    walked: set[str] = set()
    pending = [os.fspath(folder)]
    while pending:  # depth first, in name order, so which of two links to a folder is walked is fixed
        top = pending.pop()
        real = os.path.realpath(top)
        if real in walked:
            continue
        walked.add(real)
        try:
            with os.scandir(top) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:  # unreadable or gone, as os.walk skips it
            continue
        folders = []
        for entry in entries:
            if _hidden_name(entry.name):  # a name, not a path: no Path to build per file
                continue
            if entry.is_dir():  # follows links, as os.walk(followlinks=True)
                folders.append(entry.path)
            elif entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path)):
                files.append(Path(entry.path))
        pending += reversed(folders)
    files.sort()
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def left_out_line(others: Sequence[Path], folder: Path) -> str:
    """What a folder walk says of the files it left out as not images: how many, of which
    suffixes, and one of them, so that a count of images is never silently short. The
    suffixes tell 5,000 iPhone photos (``.heic``) from a few stray notes, where one example
    would not."""
    from collections import Counter

    one = len(others) == 1
    kinds = Counter(p.suffix.lower() or "(no suffix)" for p in others).most_common()
    counts = "" if one else ": " + ", ".join(
        f"{count} {suffix}" for suffix, count in kinds[:5]) + ", ..." * (len(kinds) > 5)
    return (f"left out {len(others)} {'file' if one else 'files'} in {folder} that "
            f"{'is not an image' if one else 'are not images'} "
            f"({', '.join(IMAGE_EXTENSIONS)}){counts}, e.g. {others[0]}")


def image_files(paths: Iterable[str | os.PathLike[str]],
                warn: Callable[[str], Any] = log.warning) -> list[str]:
    """The image files named, as given, and those in the folders named (walked recursively and
    sorted, by :func:`list_images`): what ``mobilenetv2 predict`` takes too.

    A folder's files that are not images by their suffix are left out with one ``warn`` line
    that says how many; a file named is taken whatever it is.

    Raises:
        FileNotFoundError: for a path that does not exist or a folder that holds no images.
    """
    files: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found, others = list_images(path)
            if not found:
                raise FileNotFoundError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            if others:
                warn(left_out_line(others, path))
            files += [str(f) for f in found]
        elif path.is_file():
            files.append(os.fspath(given))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def classify_files(predictor: Predictor, files: Sequence[str], top_k: int = 5,
                   batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """Each image file's prediction, in order, as the command prints it: ``{"image": path,
    "top_k": [[class_name, probability], ...]}``, most likely first, or ``{"image": path,
    "top_k": [], "error": why}`` for a file that cannot be read (corrupt, not an image, gone):
    it costs its own prediction, and the others are still classified, ``batch_size`` at a
    time.

    Raises:
        ValueError: for ``top_k`` or ``batch_size`` below 1, or a feature extractor.
    """
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    predictor._refuse_feature_extractor()
    names = predictor.meta.get("class_names")
    probabilities = predictor.meta.get("output") == "probabilities"
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for index, file in enumerate(chunk):
            try:
                images[index] = predictor.preprocess(file)
            except (ValueError, OSError) as e:
                errors[index] = " ".join(str(e).split())  # one line, whatever Pillow said
        ranked = iter(top_classes(predictor.run(np.stack(list(images.values()))), top_k,
                                  probabilities) if images else [])
        for index, file in enumerate(chunk):
            if index in errors:
                yield {"image": file, "top_k": [], "error": errors[index]}
            else:
                yield {"image": file, "top_k": [[class_name(names, i), round(p, 6)]
                                                for i, p in next(ranked)]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python runtime.py MODEL IMAGE_OR_FOLDER... [--top-k K] [--threads T] [--batch-size B]``:
    one JSON line per image (:func:`classify_files`). An image that cannot be read gets a
    warning on stderr and a line with its ``error``, and the others are still classified; the
    exit code is then 2. Any other mistake (a missing path, a model that does not load) is one
    error line and exit code 2."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, as every other mistake here
            self.exit(2, f"runtime: error: {message} (for usage: python runtime.py -h)\n")

    parser = OneLineParser(description="Classify images with an exported MobileNetV2 "
                           "(ONNX Runtime, no torch): one JSON line per image.")
    parser.add_argument("model", help="an .onnx or .ort file exported by mobilenetv2")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files or folders (walked recursively)")
    parser.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                        help="classes per image, most probable first (default 5)")
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="T",
                        help="ONNX Runtime's intra-op threads (default: OMP_NUM_THREADS, else "
                             "the physical cores)")
    # ONNX Runtime keeps the memory of its largest batch: 32 fp32 224x224 images peak at about
    # 4x the memory of one, too much for a board with 512 MB to 1 GB.
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="B",
                        help="images per ONNX Runtime call (default 32); fewer use less "
                             "memory, 1 the least")
    args = parser.parse_args(argv)

    def warn(line: str) -> None:
        print(f"runtime: warning: {printable(line)}", file=sys.stderr, flush=True)

    unreadable = 0
    try:
        files = image_files(args.images, warn)
        predictor = Predictor(args.model, threads=args.threads)
        for item in classify_files(predictor, files, top_k=args.top_k,
                                   batch_size=args.batch_size):
            if "error" in item:
                unreadable += 1
                warn(item["error"])
            print(json_text(item), flush=True)  # a pipe sees each image as it is done
    except (ValueError, OSError, ImportError) as e:  # ImportError: .pte without ExecuTorch
        print(f"runtime: error: {printable(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    return 2 if unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
