"""torch.distributed plumbing: torchrun environment, process group, gather with gradients.

Launch with `torchrun` (single node: `--nproc_per_node N`; multi-node: add `--nnodes`,
`--node_rank` or `--rdzv_backend c10d --rdzv_endpoint HOST:PORT`). Ranks come from the
environment (RANK, LOCAL_RANK, WORLD_SIZE), never from a `--local_rank` argument.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and outputs."""
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read the process layout that torchrun exports (1 process when absent)."""
    return DistEnv(rank=int(os.environ.get("RANK", 0)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)))


def resolve_device(requested: str, env: DistEnv) -> torch.device:
    """`auto` picks this process's GPU when CUDA is present, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available; "
                           "set device=cpu (or auto)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


# Rank 0 validates (and scores the reference selection) alone while the other ranks wait
# in a barrier: a large validation split (ActivityNet: 4,917 videos) outlasts the default
# 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def init_distributed(device: torch.device, env: DistEnv) -> None:
    """Join the process group: NCCL on GPUs, gloo on CPU. No-op for one process."""
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=COLLECTIVE_TIMEOUT)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this
    rank's slice (indexed by the global rank). Every rank computes the same global loss,
    and DDP averages parameter gradients over ranks, so the sum makes the result equal to
    the single-process gradient of the global batch (the reference returned the local
    slice only: 1/world_size of it, indexed by the local rank)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (identity for one process).
    Every rank must pass the same shape (the engine uses equal per-rank batches)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
