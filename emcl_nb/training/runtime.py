"""Runtime set-up shared by training and evaluation: seeds, torch threads and determinism,
autocast precision, moving batches to the device."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

from emcl_nb.params import Params


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_torch(params: Params) -> None:
    """Threads, denormals and determinism: the same parameters give the same numbers.

    Denormal floats (below 1.2e-38) flush to zero: the EM softmax produces many, and CPU
    arithmetic on them is slow (README, "Benchmark notes"); no value above float32
    resolution changes.

    Deterministic mode would also fill every new tensor with NaN (a debugging aid against
    reading uninitialised memory): ~1,000 extra full passes per training step, a third of
    a CPU step. It is turned off; the algorithms stay deterministic.
    """
    torch.set_flush_denormal(True)
    keep_freed_memory()
    if params.num_threads > 0:
        torch.set_num_threads(params.num_threads)
    if params.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False


# glibc's mallopt options (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Keep freed blocks up to `limit` bytes in the process for reuse (glibc only; True if set).

    glibc hands every block over 32 MiB straight back to the OS when it is freed, so each
    training step faults the pages of its large tensors (frames, activations, the token
    embedding's gradient) in again: ~50,000 page faults and ~0.1 s of kernel time per CPU
    step of the reference configuration. With the thresholds raised they are reused; the
    cost is that the process keeps its peak heap.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, limit) and libc.mallopt(M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):   # not glibc (musl, ...): leave malloc as it is
        return False


def autocast_dtype(device: torch.device, precision: str,
                   clip_storage: torch.dtype = torch.float32) -> torch.dtype | None:
    """The dtype CLIP computes in under autocast (None: fp32). A CLIP stored in fp16
    (clip_dtype=fp16) computes in fp16, as the reference's; fp32 master weights autocast to
    bf16 on CUDA (fp16 where bf16 is missing) with precision=auto, or as `precision` says."""
    if clip_storage == torch.float16:
        return torch.float16
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def grad_scaler(device: torch.device, dtype: torch.dtype | None, clip_dtype: str) -> torch.amp.GradScaler:
    """Loss scaling where fp32 master weights train under fp16 autocast; none otherwise: an
    fp16 CLIP (clip_dtype=fp16) is trained as the reference trains it, without."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and clip_dtype == "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, platform's guess elsewhere): what a
    reader needs beside a timing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """CPU model, cores, torch version: what a reader needs to compare timings."""
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
