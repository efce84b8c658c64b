"""Fuzzing the loaders: whatever the bytes, one clear exception, bounded memory, no hang.

Every case writes one file and hands it to the loaders a user reaches: ``read_weights``,
``load_model`` (which builds a network from the file's metadata), ``load_weights`` into a
model, and ``restore_run`` (what ``train --resume`` does with ``checkpoint.pt``). Each must
either load or raise :class:`WeightsError` (a ``ValueError``), nothing else; no case may grow
the peak resident memory by more than ``MEMORY_LIMIT_MB`` or take longer than ``DEADLINE``.

The inputs: truncations, bit flips, overwritten and deleted spans of valid safetensors,
``torch.save`` zip, legacy (non-zip) ``torch.save`` and ``checkpoint.pt`` files; safetensors
headers forged with huge lengths, shapes and offsets (up to 2**64 - 1), wrong or unknown
dtypes; forged model metadata (a billion classes, impossible widths, bad input sizes); random
bytes behind each format's magic. The default suite runs ``FAST`` cases per test; the ``slow``
variants run ``MANY`` (see docs/reliability.md for the counts of the last full run).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import resource
import struct
from collections import Counter
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from mobilenetv2 import (
    MobileNetV2,
    load_model,
    load_weights,
    read_weights,
    save_keras_weights,
    save_weights,
)
from mobilenetv2.checkpoint import rng_state, save_checkpoint
from mobilenetv2.config import TrainConfig
from mobilenetv2.engine import StepState
from mobilenetv2.reporting import METRIC_FIELDS
from mobilenetv2.train import build_optimizer, lr_factor, restore_run
from mobilenetv2.weights import WeightsError

# Damaged pickles make torch's unpickler warn (odd protocols, odd classes), and big cases make
# Hypothesis warn about its report: all expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:torch"),
              pytest.mark.filterwarnings("ignore:Generating overly large repr")]

FAST, MANY = 100, 3000
SIZES = [FAST, pytest.param(MANY, marks=pytest.mark.slow)]
MEMORY_LIMIT_MB = 200
DEADLINE = timedelta(seconds=5)  # a case takes milliseconds; this catches runaway work
CASES: Counter[str] = Counter()  # cases run per test in this session (printed at the end)
OUTCOMES: Counter[tuple[str, str]] = Counter()  # (test, "loaded" or "refused")


def small_model() -> MobileNetV2:
    """A MobileNetV2 of two blocks: its files are a few KB, so mutations hit the structure
    (headers, pickle opcodes, zip directories) as often as the tensor bytes."""
    return MobileNetV2(num_classes=3, width_mult=0.35, in_channels=1, small_input=True,
                       inverted_residual_setting=[[1, 8, 1, 1], [2, 8, 1, 2]], last_channel=16)


def _bytes_of(write) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def _safetensors_bytes(tmp: Path) -> bytes:
    save_weights(small_model(), tmp / "valid.safetensors")
    return (tmp / "valid.safetensors").read_bytes()


def _run_objects():
    model = small_model()
    config = TrainConfig(epochs=2)
    optimizer = build_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, steps_per_epoch=3, config=config))
    return model, optimizer, scheduler, config


def _checkpoint_bytes(tmp: Path) -> bytes:
    """A checkpoint.pt as train() writes it, after three real steps (momentum buffers set)."""
    model, optimizer, scheduler, config = _run_objects()
    for _ in range(3):
        loss = model(torch.randn(4, 1, 16, 16)).logsumexp(1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    row = dict.fromkeys(METRIC_FIELDS, 1.0) | {"epoch": 1}
    save_checkpoint(tmp / "checkpoint.pt", {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": None, "ema": None,
        "state": vars(StepState(epoch=1, global_step=3)), "history": [row], "best_top1": 1.0,
        "rng": rng_state(), "config": config.to_dict(), "model_config": model.config,
        "model_meta": model.meta,
    })
    return (tmp / "checkpoint.pt").read_bytes()


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("valid")
    model = small_model()
    # A training checkpoint's layout: the state_dict with what rebuilds the model.
    container = {"model": model.state_dict(), "model_config": model.config,
                 "model_meta": model.meta}
    files = {
        "safetensors": _safetensors_bytes(tmp),
        "torch zip": _bytes_of(partial(torch.save, container)),
        "torch legacy": _bytes_of(partial(torch.save, container,
                                          _use_new_zipfile_serialization=False)),
        "checkpoint": _checkpoint_bytes(tmp),
        "keras h5": _keras_bytes(tmp),
    }
    # The control: every valid file loads, so a refusal below is the mutation's doing.
    for name, data in files.items():
        (tmp / "f").write_bytes(data)
        if name == "checkpoint":
            restore_run(tmp / "f", *_run_objects()[:3])
        elif name == "keras h5":
            load_model(tmp / "f")
        else:
            load_weights(small_model(), load_model(tmp / "f").state_dict())
    return files


def _keras_bytes(tmp: Path) -> bytes:
    """Keras' HDF5 layout needs the paper's 52 layers: at width 0.1 without a classifier that
    is 86 K weights and a 0.7 MB file (half of it HDF5's own structure), so a case stays fast
    and mutations hit the structure often. Hypothesis holds on to each case's bytes, so a
    bigger file would cost gigabytes over the slow run's 3,000 cases."""
    model = MobileNetV2(width_mult=0.1, num_classes=0, in_channels=1, tf_padding=True,
                        bn_eps=1e-3)
    save_keras_weights(model, tmp / "keras.h5")
    return (tmp / "keras.h5").read_bytes()


# --------------------------------------------------------------------------------------------
# The property every case checks


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def bounded_memory(limit_mb: int = MEMORY_LIMIT_MB):
    """Fail if the block raises the process's peak resident memory by more than limit_mb."""
    try:  # Linux: reset the peak (VmHWM) to the current RSS, so each case is measured alone
        Path("/proc/self/clear_refs").write_text("5")
        before, peak = _status_kib("VmRSS:"), partial(_status_kib, "VmHWM:")
    except OSError:  # elsewhere: the process's lifetime peak, a weaker bound
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = partial(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    yield
    grown_mb = (peak() - before) / 1024
    assert grown_mb < limit_mb, f"a case raised the peak memory by {grown_mb:.0f} MB"


def loads_or_refuses(path: Path, data: bytes, kind: str = "weights") -> str:
    """The guarantee: the file loads, or the loader raises WeightsError; nothing else.

    Returns "refused" when the last loader refused the file, else "loaded".
    """
    path.write_bytes(data)
    with bounded_memory():
        loaders = ([lambda: restore_run(path, *_run_objects()[:3])] if kind == "checkpoint" else
                   [lambda: read_weights(path), lambda: load_model(path),
                    lambda: load_weights(small_model(), path)])
        outcome = "loaded"
        for load in loaders:
            try:
                load()
                outcome = "loaded"
            except WeightsError:
                outcome = "refused"
    return outcome


def fuzz(examples: int):
    """Hypothesis settings for a fuzz run of ``examples`` cases."""
    return settings(max_examples=examples, deadline=DEADLINE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def watchdog_and_report():
    """A case stuck in C code never reaches Hypothesis's deadline: dump and exit instead."""
    faulthandler.dump_traceback_later(30 * 60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    print("\nfuzz cases run:", dict(CASES), "total", sum(CASES.values()))


# --------------------------------------------------------------------------------------------
# Strategies


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, bit flips, overwritten, deleted and inserted spans of ``data``; positions
    favour the first and last 4 KB, where headers, pickles and zip directories live."""
    n = len(data)
    position = st.one_of(st.integers(0, min(n, 4096) - 1), st.integers(max(0, n - 4096), n - 1),
                         st.integers(0, n - 1))

    def flip(bits: list[int]) -> bytes:
        out = bytearray(data)
        for bit in bits:
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)

    return st.one_of(
        st.integers(0, n - 1).map(lambda k: data[:k]),
        st.lists(position.flatmap(lambda p: st.integers(8 * p, 8 * p + 7)), min_size=1,
                 max_size=8).map(flip),
        st.tuples(position, st.binary(min_size=1, max_size=64)).map(
            lambda t: data[:t[0]] + t[1] + data[t[0] + len(t[1]):]),
        st.tuples(position, st.integers(1, 256)).map(lambda t: data[:t[0]] + data[t[0] + t[1]:]),
        st.tuples(position, st.binary(min_size=1, max_size=64)).map(
            lambda t: data[:t[0]] + t[1] + data[t[0]:]),
    )


HUGE = [2**31, 2**32 + 1, 2**60, 2**63 - 1, 2**64 - 1]
SIZE = st.one_of(st.integers(0, 64), st.sampled_from([*HUGE, -1]))
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F8_E4M3",
          "F8_E5M2", "U64", "U32", "XX", ""]
KEYS = list(small_model().state_dict())


@st.composite
def forged_safetensors(draw) -> bytes:
    """A header of tensors with any dtype, shape and offsets, behind any declared length."""
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(DTYPES) | st.integers(),
        "shape": st.lists(SIZE, max_size=4),
        "data_offsets": st.lists(SIZE, min_size=2, max_size=2) | st.lists(SIZE, max_size=3),
    })
    header = draw(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), entry, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(
            st.sampled_from(["format", "config", "meta"]) | st.text(max_size=4),
            st.sampled_from(["mobilenetv2", "{}", "[]", "{\"arch\": \"seed\"}"]) | st.text(max_size=8)))
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text += b" " * draw(st.integers(0, 7))  # safetensors pads headers to 8 bytes
    declared = draw(st.sampled_from([len(text)] * 4 + [0, 1, len(text) - 1, len(text) + 1, *HUGE]))
    body = draw(st.binary(max_size=512))
    return struct.pack("<Q", declared % 2**64) + text + body


CONFIG_VALUES = st.one_of(
    st.integers(-2**70, 2**70), st.sampled_from([0, 1, 3, 10**9, 10**12, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.none(), st.booleans(),
    st.lists(st.integers(-1, 10**9), max_size=4),
    st.lists(st.lists(st.sampled_from([-1, 0, 1, 2, 8, 10**9]), min_size=4, max_size=4),
             max_size=3),
)
META_VALUES = st.one_of(
    CONFIG_VALUES, st.lists(st.integers(-1, 2**40), min_size=3, max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=4), st.lists(st.text(max_size=3), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def forged_metadata(draw) -> bytes:
    """Real tensors, with the configuration and preprocessing in the metadata changed."""
    model = small_model()
    config = dict(model.config)
    config.update(draw(st.dictionaries(
        st.sampled_from([*config, "features_only", "out_indices", "out_rows", "name", "bogus"]),
        CONFIG_VALUES, max_size=3)))
    meta = dict(model.meta)
    meta.update(draw(st.dictionaries(
        st.sampled_from(["input_size", "mean", "std", "class_names", "crop_pct", "interpolation"]),
        META_VALUES, max_size=3)))
    metadata = {"format": "mobilenetv2", "format_version": "1"}
    for key, value in (("config", config), ("meta", meta)):
        metadata[key] = draw(st.sampled_from([json.dumps(value)] * 6 + ["", "{", "[1]", "null"]))
    return save(model.state_dict(), metadata=metadata)


MAGIC = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x08\x07",
                         struct.pack("<Q", 2**60) + b"{", struct.pack("<Q", 16) + b"{"])


# --------------------------------------------------------------------------------------------
# The tests


# Hand-written worst cases, each checked on its own below; they also seed the header search.
HUGE_CASES = {
    "header length 2**60": struct.pack("<Q", 2**60) + b"{}",
    "header length 2**64-1": struct.pack("<Q", 2**64 - 1) + b"{" + bytes(64),
    "tensor of 2**60 bytes": (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps(
        {"stem.conv.weight": {"dtype": "U8", "shape": [2**60], "data_offsets": [0, 2**60]}}
    ).encode()),
    "shape overflowing int64": (lambda h: struct.pack("<Q", len(h)) + h + bytes(8))(json.dumps(
        {"stem.conv.weight": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}
    ).encode()),
    "deeply nested header": (lambda h: struct.pack("<Q", len(h)) + h)(
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
}


def run_fuzz(name: str, strategy: st.SearchStrategy[bytes], examples: int, path: Path,
             kind: str = "weights", explicit: tuple[bytes, ...] = ()) -> None:
    """Check ``loads_or_refuses`` on ``examples`` cases drawn from ``strategy``."""
    @fuzz(examples)
    @given(strategy)
    def check(data: bytes) -> None:
        CASES[name] += 1
        OUTCOMES[name, loads_or_refuses(path, data, kind)] += 1

    for data in explicit:
        check = example(data)(check)
    check()
    assert OUTCOMES[name, "refused"] > 0  # the cases reached the error paths


@pytest.mark.parametrize("examples", SIZES)
@pytest.mark.parametrize("kind", ["safetensors", "torch zip", "torch legacy", "keras h5"])
def test_mutated_weights_files_load_or_raise_weights_error(kind, examples, valid_files, tmp_path):
    run_fuzz(f"mutated {kind}", mutations(valid_files[kind]), examples, tmp_path / "fuzz.bin")


@pytest.mark.parametrize("examples", SIZES)
def test_mutated_checkpoints_resume_or_raise_weights_error(examples, valid_files, tmp_path):
    run_fuzz("mutated checkpoint.pt", mutations(valid_files["checkpoint"]), examples,
             tmp_path / "checkpoint.pt", kind="checkpoint")


@pytest.mark.parametrize("examples", SIZES)
def test_forged_safetensors_headers_are_refused_without_allocating(examples, tmp_path):
    run_fuzz("forged safetensors header", forged_safetensors(), examples,
             tmp_path / "fuzz.safetensors", explicit=tuple(HUGE_CASES.values()))


@pytest.mark.parametrize("examples", SIZES)
def test_forged_model_metadata_is_refused_before_building_the_model(examples, tmp_path):
    run_fuzz("forged metadata", forged_metadata(), examples, tmp_path / "fuzz.safetensors")


@pytest.mark.parametrize("examples", SIZES)
def test_random_bytes_behind_each_magic_are_refused(examples, tmp_path):
    data = st.tuples(MAGIC, st.binary(max_size=4096)).map(b"".join)
    run_fuzz("random bytes", data, examples, tmp_path / "fuzz.pth")
    run_fuzz("random bytes as checkpoint.pt", data, examples, tmp_path / "checkpoint.pt",
             kind="checkpoint")


@pytest.mark.parametrize("name", list(HUGE_CASES))
def test_huge_declared_sizes_are_refused_with_a_clear_error(name, tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(HUGE_CASES[name])
    with bounded_memory(), pytest.raises(WeightsError, match="huge.safetensors"):
        load_model(path)


def test_a_billion_classes_in_the_metadata_is_refused_before_allocating(tmp_path):
    model = small_model()
    config = dict(model.config, num_classes=10**9)
    path = tmp_path / "forged.safetensors"
    save_file(model.state_dict(), path, metadata={
        "format": "mobilenetv2", "format_version": "1", "config": json.dumps(config),
        "meta": json.dumps(model.meta)})
    with bounded_memory(), pytest.raises(WeightsError, match="classes"):
        load_model(path)


def test_integer_weights_in_a_float_layer_are_refused(tmp_path):
    state = {k: (v.to(torch.int8) if k == "stem.conv.weight" else v)
             for k, v in small_model().state_dict().items()}
    with pytest.raises(WeightsError, match=r"wrong dtype: stem\.conv\.weight torch\.int8"):
        load_weights(small_model(), state)
    half = {k: v.half() if v.is_floating_point() else v for k, v in small_model().state_dict().items()}
    load_weights(small_model(), half)  # a float16 checkpoint is fine: it is cast


def test_the_memory_bound_catches_a_large_allocation():
    """The control for bounded_memory: 300 MB really touched does fail it."""
    with pytest.raises(AssertionError, match="peak memory"), bounded_memory():
        torch.ones(300 * 2**20, dtype=torch.uint8)
