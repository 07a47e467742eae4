"""Checkpoints: one file holds everything needed to resume a run exactly.

A checkpoint is a dict with the model and optimiser states, the schedule, the loss scaler,
the epoch and step it was taken after, the parameters of the run and the RNG states.
It is written atomically, so a killed run never leaves a truncated file.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from emcl_nb.io import atomic_torch_save

FORMAT = "emcl-nb/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be used; the message says what to do."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, model, optimizer=None, scheduler=None, scaler=None,
                    epoch: int, step: int, params: dict, metrics: dict | None = None) -> None:
    """Write a resumable checkpoint atomically. `epoch` counts completed epochs."""
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "params": params,
        "metrics": metrics or {},
        "rng": rng_state(),
    }
    atomic_torch_save(state, Path(path))


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint file on the CPU, with a clear error when it is missing or broken."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Train first (python -m emcl_nb.train "
            f"--params params/<dataset>.yaml) or pass the path of an existing .pt file.")
    try:
        # Our checkpoints hold plain Python state (RNG tuples, params): trusted local files.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"checkpoint {path} cannot be read ({error}); "
                              f"the file is corrupt or not a torch checkpoint") from error
