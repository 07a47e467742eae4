"""How many DataLoader worker processes a loader starts: params.num_workers, capped at the
cores this process may use (a dataset file written for a GPU host asks for 8; on a laptop
more workers than cores only compete for them and their memory)."""
from __future__ import annotations

import functools
import os

from emcl_nb.params import Params
from emcl_nb.progress import note


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(params: Params) -> int:
    """params.num_workers, or the usable cores when there are fewer (said once)."""
    cores = usable_cores()
    if params.num_workers > cores:
        _note_cap(params.num_workers, cores)
        return cores
    return params.num_workers


@functools.cache
def _note_cap(asked: int, cores: int) -> None:
    note(f"num_workers={asked} is more than the {cores} core(s) this process may use: "
         f"{cores} loader worker(s)")
