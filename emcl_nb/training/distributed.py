"""torch.distributed plumbing: the torchrun environment, the process group, barriers. (The
gather of features with gradients belongs to the loss: emcl_nb.model.loss.gather_features.)

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


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
