"""ExecuTorch programs (``.pte``): PyTorch's own on-device runtime, through its XNNPACK backend.

ExecuTorch runs a ``torch.export`` program on phones (Android, iOS) and microcontrollers without
PyTorch; XNNPACK is its CPU backend for ARM and x86, the same kernels TensorFlow Lite uses.
MobileNetV2 is ExecuTorch's own first example, so this is the path a PyTorch user takes to a
phone. A ``.pte`` file made here:

* is our BatchNorm-folded model (:func:`mobilenetv2.export.fold_batchnorm`), exported with
  ``torch.export`` and lowered with ``to_edge_transform_and_lower(..., XnnpackPartitioner())``:
  every convolution, ReLU6, add, pooling and the classifier are delegated to XNNPACK;
* or int8 (:func:`mobilenetv2.quantize.quantize_executorch`): PT2E post-training quantization
  with ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric int8 weights, int8 activations
  calibrated on real images), the recipe of ExecuTorch's MobileNetV2 example;
* carries the preprocessing: a constant method ``mobilenetv2_metadata`` returns the same JSON
  object the ONNX export keeps in its metadata (:func:`mobilenetv2.export.deployment_metadata`),
  so :class:`mobilenetv2.runtime.Predictor` (hence ``eval`` and ``predict``) reads it, and an app
  can call it with ExecuTorch's ``Module.execute("mobilenetv2_metadata")``;
* has a fixed batch size (1 by default): ExecuTorch 1.5 plans the memory of a dynamic batch for
  an upper bound of its own (15 for MobileNetV2, whatever bound the export declared), and a
  phone classifies one image at a time.

ExecuTorch is an optional dependency (``pip install 'mobilenetv2[executorch]'``; wheels for
Linux x86_64 and macOS arm64). Its native code logs CPU probing lines to stderr when a program
is loaded; :func:`native_stderr_to` keeps them off the user's terminal and keeps them for error
messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

METADATA_METHOD = "mobilenetv2_metadata"
# The program's SHA-256, computed with these 64 characters as zeros, written into the metadata
# string after serialisation (flatbuffers store strings verbatim): checked before ExecuTorch
# sees the bytes, whose loader is not built for damaged files (see PteSession).
CHECKSUM_KEY = "content_sha256"
_CHECKSUM_MARK = f'"{CHECKSUM_KEY}": "'.encode()
# ExecuTorch's thread pool is the process's, and every loaded program keeps a pointer to it:
# it is sized before the first program is loaded and never again (see _size_thread_pool).
_EXECUTORCH_LOCK = threading.RLock()
_pool = {"fixed": False}
INSTALL_HINT = ("ExecuTorch is not installed here: pip install 'mobilenetv2[executorch]' (wheels "
                "for Linux x86_64 and macOS arm64), or write ONNX instead (.onnx)")
# What the int8 .pte file says about its quantization (our ONNX files carry the same key).
INT8_SCHEME = {"format": "XNNPACK", "weights": "int8", "per_channel": True,
               "activations": "int8"}


def require_executorch() -> None:
    """Fail with one clear line when ExecuTorch or its XNNPACK backend cannot be imported.

    Raises:
        ModuleNotFoundError: (``name="executorch"``) when ExecuTorch is not installed.
        ValueError: when it is installed but does not load (a release made for another torch).
    """
    if importlib.util.find_spec("executorch") is None:
        raise ModuleNotFoundError(INSTALL_HINT, name="executorch")
    try:
        with quiet_imports():
            import executorch.exir  # noqa: F401
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (  # noqa: F401
                XnnpackPartitioner,
            )
    except (ImportError, OSError, RuntimeError) as e:
        version = importlib.metadata.version("executorch")
        raise ValueError(f"ExecuTorch {version} is installed but does not load with torch "
                         f"{torch.__version__} ({type(e).__name__}: {e}); install the ExecuTorch "
                         "release made for this torch, or write ONNX (.onnx)") from None


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """torchao, imported by ExecuTorch's quantizer, warns through torch's pytree logger about an
    Enum it registers; nothing a user can act on."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def native_stderr_to(captured: list[str]) -> Iterator[None]:
    """Keep what ExecuTorch logs off the terminal and in ``captured`` (one string): XNNPACK's CPU
    probing logs five lines on every program load, and ExecuTorch logs its errors before
    raising a bare error code. Its Python bindings print through ``sys.stderr``, its native
    code writes to file descriptor 2: both are redirected, for the whole process, so callers
    hold ``_EXECUTORCH_LOCK`` (two overlapping redirections would restore each other's)."""
    import io
    import sys

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    python = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(python))
        sink = saved = None
        with contextlib.suppress(OSError):
            sink = stack.enter_context(tempfile.TemporaryFile(mode="w+b"))
            saved = os.dup(2)
        if sink is None or saved is None:  # no descriptor 2 (embedded) or no temporary file
            try:
                yield
            finally:
                captured.append(python.getvalue())
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(python.getvalue() + sink.read().decode("utf-8", "replace"))


def last_error_line(text: str) -> str:
    """The most telling line of ExecuTorch's native log: the last one that is not CPU probing
    or thread pool news, without its ``[source.cpp:line]`` tag."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith(("[cpuinfo", "[threadpool"))]
    return lines[-1].split("] ", 1)[-1][:300] if lines else ""


def program_bytes(folded: nn.Module, example: torch.Tensor, metadata: dict[str, Any],
                  allow_cast: bool = False) -> bytes:
    """The ``.pte`` file of a BatchNorm-folded model, lowered to XNNPACK.

    Args:
        folded: :func:`mobilenetv2.export.fold_batchnorm` of the model, padding frozen; or
            the int8 module of :func:`mobilenetv2.quantize.quantize_executorch`.
        example: an input of the fixed shape the program takes, (N, C, H, W) (or uint8
            (N, H, W, C) for a pixel-input model).
        metadata: what the constant method :data:`METADATA_METHOD` returns (as JSON).
        allow_cast: a pixel-input model (:class:`mobilenetv2.export.PixelInput`): its
            uint8 -> float cast, which XNNPACK does not take, may run on a portable kernel.

    Raises:
        ValueError: when XNNPACK does not take every operator.
    """
    require_executorch()
    with quiet_imports():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        with torch.no_grad():
            program = torch.export.export(folded, (example,))
            edge = to_edge_transform_and_lower(
                program, partitioner=[XnnpackPartitioner()],
                constant_methods={METADATA_METHOD: json.dumps({**metadata,
                                                               CHECKSUM_KEY: "0" * 64})})
            left = [op for op in undelegated_ops(edge.exported_program().graph_module)
                    if not (allow_cast and op in CAST_OPS)]
            if left:
                raise ValueError(f"XNNPACK did not take {', '.join(left[:4])}: the program would "
                                 "run them on ExecuTorch's slow portable kernels")
            return seal(bytes(edge.to_executorch().buffer))


def _checksum_span(data: bytes) -> tuple[int, int] | None:
    start = data.find(_CHECKSUM_MARK)
    if start < 0:
        return None
    start += len(_CHECKSUM_MARK)
    return start, start + 64


def _digest(data: bytes, start: int, end: int) -> bytes:
    """SHA-256 of ``data`` with ``data[start:end]`` (the checksum's place) as zeros, in hex."""
    return hashlib.sha256(data[:start] + b"0" * (end - start) + data[end:]).hexdigest().encode()


def seal(data: bytes) -> bytes:
    """Write the program's SHA-256 (with its own 64 characters as zeros) into its metadata."""
    span = _checksum_span(data)
    if span is None or data.count(_CHECKSUM_MARK) != 1:
        raise ValueError("the serialised program does not hold exactly one checksum field")
    start, end = span
    return data[:start] + _digest(data, start, end) + data[end:]


def checksum_matches(data: bytes) -> bool | None:
    """Whether a program's bytes are the ones :func:`seal` sealed; None for a program without a
    checksum (written by something else: it is handed to ExecuTorch as it is)."""
    span = _checksum_span(data)
    return None if span is None else data[span[0]:span[1]] == _digest(data, *span)


# How a dtype cast appears in an edge program (ExecuTorch 1.x, and the older name).
CAST_OPS = ("dim_order_ops._to_dim_order_copy.default", "aten._to_copy.default")


def undelegated_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    """Operators of a lowered program that XNNPACK did not take (besides the bookkeeping ones)."""
    bookkeeping = ("executorch_call_delegate", "getitem", "alloc")
    return sorted({str(getattr(node.target, "__name__", node.target))
                   for node in graph_module.graph.nodes if node.op == "call_function"
                   and not any(name in str(node.target) for name in bookkeeping)})


def _size_thread_pool(portable_lib: Any, threads: int | None) -> str | None:
    """Give XNNPACK's process-wide thread pool ``threads`` threads (None: the physical cores),
    if no program was loaded yet; when one was and ``threads`` asks for another count, return
    the warning to log (outside :func:`native_stderr_to`, which swallows it).

    ``_unsafe_reset_threadpool`` frees the pool and makes a new one, but each program already
    loaded keeps running on the freed one: resizing it after a load crashed the process
    (segmentation fault in the next run of the earlier program, in CI's fresh-clone run). So
    the first load fixes the size, and a later program that asks for another size gets the
    pool as it is, with a warning.
    """
    from .runtime import default_threads

    current = portable_lib._threadpool_get_thread_count()
    fixed, _pool["fixed"] = _pool["fixed"], True
    wanted = threads or default_threads()
    if wanted == current or (fixed and threads is None):
        return None
    if fixed:
        return (f"ExecuTorch's thread pool already has {current} threads in this process and "
                f"cannot be resized once a program is loaded; running with {current}, not "
                f"{threads}")
    portable_lib._unsafe_reset_threadpool(int(wanted))
    return None


class PteSession:
    """An ExecuTorch program behind the part of ``onnxruntime.InferenceSession``'s interface that
    :class:`mobilenetv2.runtime.Predictor` uses: ``get_inputs``, ``get_outputs``,
    ``get_modelmeta`` and ``run``.

    ExecuTorch's loader trusts its input: of 40 randomly damaged copies of a program (bit flips,
    truncations, overwritten spans), one aborted the whole process (its log bridge to Python
    met a corrupted name that was not UTF-8) instead of raising. So the files
    :func:`program_bytes` writes carry their SHA-256 in the metadata, and a file whose bytes do
    not match it is refused here before ExecuTorch reads it. Programs written by other tools
    have no checksum and are handed over as they are.

    Args:
        path: a ``.pte`` file.
        threads: XNNPACK's threads (default: the physical cores). The thread pool is the
            process's, shared by every program, and sized by the first program loaded; a later,
            different count is ignored with a warning (see :func:`_size_thread_pool`). Loads
            and runs take turns under one lock.

    Raises:
        ImportError: without ExecuTorch.
        ValueError: for a damaged file, one ExecuTorch cannot load, or one without a ``forward``
            method.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        require_executorch()
        with quiet_imports():
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

        data = Path(path).read_bytes()
        if checksum_matches(data) is False:
            raise ValueError(f"{path} is damaged: its bytes no longer match the checksum it was "
                             "written with (truncated or modified?); export it again")
        log: list[str] = []
        try:
            with _EXECUTORCH_LOCK, native_stderr_to(log):
                warning = _size_thread_pool(portable_lib, threads)
                program = Runtime.get().load_program(data)
                if "forward" not in program.method_names:
                    raise ValueError("it has no forward method")
                self._forward = program.load_method("forward")
                self._metadata = {}
                if METADATA_METHOD in program.method_names:
                    stored = program.load_method(METADATA_METHOD).execute([])[0]
                    self._metadata = json.loads(stored)
        # (another tool's metadata: not text, or JSON nested beyond parsing)
        except (RuntimeError, ValueError, TypeError, RecursionError) as e:
            detail = last_error_line("".join(log)) or str(e)
            raise ValueError(f"{path} is not a program ExecuTorch can run here: {detail}") from None
        if warning:
            logging.getLogger(__name__).warning("%s: %s", path, warning)
        meta = self._forward.metadata
        self._inputs = [_Node("input", list(meta.input_tensor_meta(0).sizes()))]
        count = meta.num_outputs()
        names = ([f"features_{i}" for i in range(count)]
                 if self._metadata.get("output") == "features" else
                 ["logits"] + [f"output_{i}" for i in range(1, count)])  # others' programs
        self._outputs = [_Node(name, list(meta.output_tensor_meta(i).sizes()))
                         for i, name in enumerate(names)]
        self._program = program  # the method needs its program alive

    def get_inputs(self) -> list[_Node]:
        return self._inputs

    def get_outputs(self) -> list[_Node]:
        return self._outputs

    def get_modelmeta(self) -> _Meta:
        return _Meta({key: json.dumps(value) for key, value in self._metadata.items()})

    def run(self, names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """Outputs (NumPy) of one call; ``names`` picks among them, as ONNX Runtime's does."""
        (batch,) = feeds.values()
        try:  # Predictor has checked the shape; ExecuTorch logs nothing on a good call
            with _EXECUTORCH_LOCK:
                outputs = self._forward.execute([torch.from_numpy(batch)])
        except RuntimeError as e:
            raise ValueError(f"ExecuTorch could not run the batch: {e}") from None
        arrays = {node.name: out.numpy() for node, out in zip(self._outputs, outputs, strict=True)}
        return [arrays[name] for name in (names or list(arrays))]


class _Node:
    """An input or output: its name and shape, as ONNX Runtime's NodeArg has them."""

    def __init__(self, name: str, shape: list[int]) -> None:
        self.name, self.shape = name, shape


class _Meta:
    def __init__(self, custom_metadata_map: dict[str, str]) -> None:
        self.custom_metadata_map = custom_metadata_map
