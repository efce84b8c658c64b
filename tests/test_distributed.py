"""Many processes: the sharded sampler, and a 2-process gloo run against a 1-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobilenetv2.data import ShardedBatchSampler


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_samples, batch_size", [(100, 8), (97, 16), (10, 4), (5, 4)])
def test_processes_together_take_each_example_exactly_once_per_epoch(world_size, num_samples, batch_size):
    samplers = [ShardedBatchSampler(num_samples, batch_size, rank, world_size, shuffle=True, seed=3,
                                    drop_small=False) for rank in range(world_size)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        seen = [i for s in samplers for batch in s for i in batch]
        assert sorted(seen) == list(range(num_samples))
        # step by step, the ranks' shares make up the single-process global batch
        single = ShardedBatchSampler(num_samples, batch_size, shuffle=True, seed=3, drop_small=False)
        single.set_epoch(epoch)
        for step, global_batch in enumerate(single):
            shares = [s.global_batches()[step][s.rank::world_size] for s in samplers]
            assert sorted(i for share in shares for i in share) == sorted(global_batch)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_with_repeated_augmentation_the_processes_still_take_the_single_process_batches(world_size):
    single = ShardedBatchSampler(50, 12, shuffle=True, seed=3, drop_small=False, repeats=4)
    samplers = [ShardedBatchSampler(50, 12, rank, world_size, shuffle=True, seed=3,
                                    drop_small=False, repeats=4) for rank in range(world_size)]
    for step, global_batch in enumerate(single):
        shares = [s.global_batches()[step][s.rank::world_size] for s in samplers]
        assert sorted(i for share in shares for i in share) == sorted(global_batch)
        assert [list(s)[step] for s in samplers if shares[s.rank]] == [x for x in shares if x]
    assert sum(len(b) for b in single) == 50  # copies i + r * 50: same indices, same pixels


def test_epochs_get_different_orders_and_a_resumed_epoch_skips_its_done_batches():
    sampler = ShardedBatchSampler(50, 10, shuffle=True, seed=0)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, start=2)
    assert list(sampler) == first[2:] and len(sampler) == 3


def test_a_training_batch_smaller_than_the_world_is_dropped_not_split_into_empty_steps():
    samplers = [ShardedBatchSampler(9, 4, rank, 2, shuffle=False) for rank in range(2)]
    assert [len(s) for s in samplers] == [2, 2]  # the last global batch (1 example) is dropped
    assert ShardedBatchSampler(9, 4, 0, 2, shuffle=False, drop_small=False).global_batches()[-1] == [8]


def test_global_batch_norm_gives_batch_norm_outside_a_process_group():
    from mobilenetv2.distributed import GlobalBatchNorm2d

    torch.manual_seed(0)
    reference, ours = torch.nn.BatchNorm2d(4), GlobalBatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_var, reference.running_var)


FLOAT64_CLI = Path(__file__).with_name("float64_cli.py")


def _run(out: Path, nproc: int, *extra: str, cli: Path = FLOAT64_CLI,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [str(cli), "train", "--resolution", "8", "--model", "mobilenet_v2_035",
            "--epochs", "1", "--batch-size", "250", "--lr", "0.002", "--dropout", "0", "--seed", "0",
            "--deterministic", "--device", "cpu", "--no-tensorboard", "--out", str(out), *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(out: Path, nproc: int, *extra: str, **kwargs) -> dict[str, torch.Tensor]:
    _run(out, nproc, *extra, **kwargs)
    return load_file(out / "last.safetensors")


def _worst_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-3)).item()
               for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The 1-process run (synchronised BatchNorm) that the 2-process runs are compared with."""
    out = tmp_path_factory.mktemp("one") / "run"
    return out, _train(out, 1, "--sync-bn")


def test_two_gloo_processes_reach_the_weights_of_one_process_with_the_same_global_batch(
        tmp_path, one_process):
    one_out, one = one_process
    two = _train(tmp_path / "two", 2, "--sync-bn")
    assert one.keys() == two.keys() and one["stem.conv.weight"].dtype == torch.float64
    assert _worst_difference(one, two) < 1e-6
    # only rank 0 wrote files
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in one_out.iterdir())
    # the check can fail: without synchronised BatchNorm each process normalises its own half
    local_bn = _train(tmp_path / "local", 2, "--no-sync-bn")
    assert _worst_difference(one, local_bn) > 1e-4


def test_grad_checkpointing_under_ddp_and_sync_bn_keeps_the_weights(tmp_path, one_process):
    # The recomputed blocks run SyncBatchNorm's collectives again on every process, and
    # must leave its running statistics as the first forward set them.
    _, one = one_process
    two = _train(tmp_path / "two", 2, "--sync-bn", "--grad-checkpointing")
    assert _worst_difference(one, two) < 1e-6


DOWNLOAD_CLI = Path(__file__).with_name("download_cli.py")


def test_under_torchrun_process_0_downloads_cifar_and_the_others_wait_for_it(tmp_path):
    # Found by a CIFAR review: only process 0 downloads, and the others looked for the data
    # at once, found none and ended the job ("cifar10 not found ...: pass --download").
    log = tmp_path / "downloads.txt"
    result = _run(tmp_path / "run", 2, "--data", "cifar10", "--data-dir", str(tmp_path / "data"),
                  "--download", "--workers", "0", cli=DOWNLOAD_CLI, env={"DOWNLOAD_LOG": str(log)})
    assert log.read_text() == "0\n"
    assert "on cifar10 (160 train / 32 val images, 10 classes)" in result.stderr


UNREADABLE_CLI = Path(__file__).with_name("unreadable_cli.py")


def test_a_process_whose_share_of_a_batch_is_all_unreadable_still_takes_the_step(
        tmp_path, one_process):
    # Process 1 loses all 125 images of its share of the 2nd batch; it must still join the
    # step's collectives (the gradient all-reduce, synchronised BatchNorm's), or process 0
    # would wait for it for ever. The single process leaves the same images out of the same
    # batch, and both end with the same weights.
    env = {"EMPTY_RANK": "1", "EMPTY_WORLD": "2", "EMPTY_STEP": "2"}
    one = _train(tmp_path / "one", 1, "--sync-bn", cli=UNREADABLE_CLI, env=env)
    result = _run(tmp_path / "two", 2, "--sync-bn", cli=UNREADABLE_CLI, env=env)
    two = load_file(tmp_path / "two" / "last.safetensors")
    assert _worst_difference(one, two) < 1e-6
    # the epoch's count (of both processes) and the result come once, from process 0
    assert result.stderr.count("warning: skipped 125 unreadable training and 0 validation") == 1
    assert result.stdout.count("test accuracy: top-1") == 1, result.stdout
    # the images really were left out: the run with them ends elsewhere
    assert _worst_difference(one, one_process[1]) > 1e-4
    # in micro-batches, and with DDP's own buffer broadcast instead of synchronised BatchNorm
    accumulated = _train(tmp_path / "accum", 2, "--no-sync-bn", "--grad-accum-steps", "2",
                         cli=UNREADABLE_CLI, env=env)
    assert all(torch.isfinite(t).all() for t in accumulated.values() if t.is_floating_point())


def test_a_batch_unreadable_everywhere_or_first_in_an_epoch_keeps_the_run_going(tmp_path):
    # Unreadable on every process, under synchronised BatchNorm: the statistics of no images
    # are 0, not 0/0 (a NaN that no --skip-nonfinite could undo), and the step is one of zero
    # gradient; likewise a micro-batch empty everywhere.
    weights = _train(tmp_path / "all", 2, "--sync-bn", "--grad-accum-steps", "2",
                     cli=UNREADABLE_CLI, env={"EMPTY_RANK": "all", "EMPTY_WORLD": "2",
                                              "EMPTY_STEP": "2"})
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    # The first batch of an epoch: the empty batch takes the data's size, which the seed
    # variant (one input size) checks even for no images.
    _train(tmp_path / "seed", 2, "--model", "seed", "--resolution", "32", cli=UNREADABLE_CLI,
           env={"EMPTY_RANK": "1", "EMPTY_WORLD": "2", "EMPTY_STEP": "1"})


NONFINITE_CLI = Path(__file__).with_name("nonfinite_cli.py")


def _torchrun_with_nan(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """2 gloo processes on the digits; process 1 alone gets a NaN loss at its 2nd step."""
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(NONFINITE_CLI),
            "train", "--resolution", "8", "--model", "mobilenet_v2_035", "--epochs", "1",
            "--batch-size", "250", "--seed", "0", "--device", "cpu", "--no-tensorboard",
            "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", NAN_RANK="1", NAN_STEP="2")
    # A process that skipped or stopped alone would leave the other waiting in a collective.
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_nan_on_one_process_is_skipped_by_all_with_skip_nonfinite(tmp_path):
    result = _torchrun_with_nan(tmp_path, "--skip-nonfinite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 steps whose loss was NaN or infinite" in result.stderr
    weights = load_file(tmp_path / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_nan_on_one_process_stops_every_process(tmp_path):
    result = _torchrun_with_nan(tmp_path)
    assert result.returncode != 0
    assert "NaN or infinite in epoch 1" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "last.safetensors").exists()


def test_cpu_sync_batchnorm_keeps_the_parameters_so_frozen_layers_stay_frozen():
    from mobilenetv2 import create_model
    from mobilenetv2.distributed import GlobalBatchNorm2d, convert_sync_batchnorm
    from mobilenetv2.engine import train_mode
    from mobilenetv2.train import freeze_layers

    model = create_model("mobilenet_v2_035", num_classes=10)
    freeze_layers(model, "backbone")
    weight = model.stem.bn.weight
    convert_sync_batchnorm(model, "cpu")
    assert isinstance(model.stem.bn, GlobalBatchNorm2d) and model.stem.bn.weight is weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight", "classifier.bias"]
    train_mode(model)  # frozen BatchNorm normalises with, and keeps, its running statistics
    assert not model.stem.bn.training and model.classifier.training


def test_gradient_accumulation_with_sync_bn_survives_an_uneven_last_batch(tmp_path):
    # 1,437 digits in batches of 717 end with 3 images: 2 on one process, 1 on the other.
    # SyncBatchNorm's collectives need the same number of micro-batches on both.
    weights = _train(tmp_path / "run", 2, "--sync-bn", "--grad-accum-steps", "2",
                     "--batch-size", "717")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_the_resume_hint_of_a_torchrun_job_is_a_torchrun_command(monkeypatch):
    from mobilenetv2.distributed import DistEnv, relaunch_command

    assert relaunch_command("train --resume r", DistEnv()) == "mobilenetv2 train --resume r"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert (relaunch_command("train --resume r", DistEnv(rank=1, world_size=4))
            == "torchrun --nproc_per_node=4 -m mobilenetv2 train --resume r")
    assert (relaunch_command("train --resume r", DistEnv(rank=5, world_size=8))
            == "torchrun --nnodes=2 --nproc_per_node=4 ... -m mobilenetv2 train --resume r")


def test_the_resume_hint_quotes_a_run_folder_with_a_space_for_the_shell_it_is_pasted_in(
        monkeypatch):
    # "Resume with: mobilenetv2 train --resume C:\Users\Jane Doe\runs\x" pasted as it was
    # gave --resume C:\Users\Jane and an unrecognised argument.
    import sys

    from mobilenetv2.distributed import shell_quote

    assert shell_quote("runs/20240101-120000") == "runs/20240101-120000"
    assert shell_quote("/Users/jane/Mobile Documents/run") == "'/Users/jane/Mobile Documents/run'"
    monkeypatch.setattr(sys, "platform", "win32")
    assert shell_quote("C:\\Users\\Jane Doe\\run") == '"C:\\Users\\Jane Doe\\run"'
    assert shell_quote("C:\\runs\\x") == "C:\\runs\\x"


def test_a_torchrun_job_warns_once_not_once_per_process(tmp_path):
    # The warnings said before training (AdamW at an SGD rate, a resume that changes the
    # schedule) were logged by every process, where the others' are process 0's alone.
    out = tmp_path / "run"
    common = ["--resolution", "8", "--model", "mobilenet_v2_035", "--batch-size", "250",
              "--optimizer", "adamw", "--warmup-epochs", "0", "--device", "cpu",
              "--no-tensorboard", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "mobilenetv2", "train", *common, "--epochs", "1",
                    "--out", str(out)], env=env, check=True, capture_output=True, timeout=600)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "mobilenetv2", "train", "--resume", str(out), "--epochs", "2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "learning-rate schedule" in warnings[0] and "--optimizer adamw" in warnings[1]
