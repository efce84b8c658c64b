"""One code path for 1..N processes: torchrun's environment, DDP set-up, rank-0 helpers.

``torchrun --nproc_per_node=N -m mobilenetv2 train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE;
a plain ``mobilenetv2 train`` is the same program with a world of one. NCCL on GPUs, gloo on
CPUs.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> DistEnv:
    """Join the process group torchrun describes (a no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        timeout = datetime.timedelta(minutes=30)
        # torchrun --max-restarts keeps one store across attempts: without a prefix per attempt,
        # a restarted process can read a dead peer's address from the last attempt and never
        # connect (gloo: "connectFullMesh failed ... Connection refused").
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store),
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    return env


def relaunch_command(args: str, env: DistEnv) -> str:
    """The command line that runs ``mobilenetv2 ARGS`` as this job was run: under torchrun
    with its process counts (its rendezvous options elided), or alone."""
    if not env.enabled:
        return f"mobilenetv2 {args}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    nodes = env.world_size // max(per_node, 1)
    launcher = (f"torchrun --nproc_per_node={per_node}" if nodes <= 1 else
                f"torchrun --nnodes={nodes} --nproc_per_node={per_node} ...")
    return f"{launcher} -m mobilenetv2 {args}"


def shell_quote(path: str | os.PathLike[str]) -> str:
    """``path`` as a shell command line takes it, for a command to copy from a message: as it
    is when it needs no quotes; with a space (``C:\\Users\\Jane Doe\\runs``, macOS' iCloud
    ``Mobile Documents``) in double quotes on Windows (cmd.exe and PowerShell), else in single
    quotes."""
    if sys.platform == "win32":
        return subprocess.list2cmdline([str(path)])
    return shlex.quote(str(path))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor of counts over all processes (in place; returned for chaining)."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's value of ``obj`` on every rank."""
    if not env.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the whole global batch, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces per-channel sums with a
    differentiable all-reduce, so gradients flow through the global mean and variance too.
    Two passes (the mean, then the squared deviations from it) keep the variance as accurate
    as BatchNorm's own. Used for ``--sync-bn`` on CPUs (gloo); GPUs use SyncBatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        local_count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), local_count]))
        # Every process's batch may be empty (a step or micro-batch of unreadable images):
        # statistics of nothing are then 0, not 0/0, and the running ones are left alone.
        total = sums[-1].clamp_min(1)
        mean = sums[:-1] / total
        centered = x - mean[None, :, None, None]
        var = _AllReduceSum.apply((centered * centered).sum((0, 2, 3))) / total
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            m = torch.where(sums[-1] > 0, m, 0.0).to(x.dtype)
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * total / (total - 1).clamp_min(1), m)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centered * scale[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """Synchronise every BatchNorm2d across processes (``--sync-bn``)."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum)
            replacement.load_state_dict(child.state_dict())
            # The same Parameter objects, as torch's SyncBatchNorm conversion keeps them: a
            # frozen layer (--freeze) stays frozen, and references to them stay valid.
            replacement.weight, replacement.bias = child.weight, child.bias
            replacement.train(child.training)
            setattr(model, name, replacement)
        else:
            convert_sync_batchnorm(child, device)
    return model
