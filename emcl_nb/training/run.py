"""A training run: its data prepared, its datasets and validation hooks built, `engine.fit`.

`train(params)` is what `python -m emcl_nb.train` and notebook 02 call; `ensure_trained`
gives the evaluation and analysis notebooks a run's checkpoint, training it first when it
has none; `launch_torchrun` starts `python -m emcl_nb.train` under torchrun from a notebook.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import TrainDataset, shutdown_workers
from emcl_nb.data.prepare import ensure_data
from emcl_nb.evaluation.validation import make_reference_validator, make_validator
from emcl_nb.params import REUSE_FIELDS, Params
from emcl_nb.training import distributed
from emcl_nb.training.checkpoint import read_checkpoint
from emcl_nb.training.engine import FitResult, check_resumable, fit
from emcl_nb.training.tensorboard_log import FOLDER as TENSORBOARD
from emcl_nb.training.tensorboard_log import TensorBoardLog


def train(params: Params, *, resume: bool = True, on_log=None) -> FitResult:
    """Prepare the data (generating the synthetic set when asked), then train.
    Each epoch is validated on a split that is not the test set where the layout has one;
    with params.reference_selection the reference's step-wise selection runs too; with
    params.tensorboard the main process writes TensorBoard event files too."""
    env = distributed.env_from_torchrun()
    board = TensorBoardLog(params.out_dir / TENSORBOARD) if params.tensorboard and env.is_main else None
    distributed.init_distributed(distributed.resolve_device(params.device, env), env)
    if env.is_main:
        ensure_data(params)
    distributed.barrier()
    train_set = TrainDataset(load_annotations(params, "train"), params, train=True)
    try:
        validate = make_validator(params)
        return fit(params, train_set, validate=validate,
                   reference=make_reference_validator(params, validate), resume=resume,
                   on_log=_both(on_log, board and board.on_log), on_epoch_end=board and board.on_epoch_end)
    finally:
        shutdown_workers()          # no loader worker outlives train(), even on an error
        distributed.cleanup()
        if board is not None:
            board.close()


def _both(first, second):
    """One callback calling `first` then `second` (either may be None)."""
    if first is None or second is None:
        return first or second
    return lambda records: (first(records), second(records))


def ensure_trained(params: Params) -> Path:
    """The run's last checkpoint; trains the run first when it has none. A run that has one,
    finished or not, is used as it is if it was trained on this data with this recipe
    (params.REUSE_FIELDS; else a TrainingSetupError names the differences)."""
    last = params.out_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return train(params).last_checkpoint
    check_resumable(params, read_checkpoint(last, mmap=True)["params"], last, REUSE_FIELDS)
    return last


def launch_torchrun(dataset: str, overrides: str = "", *, nproc_per_node: int, nnodes: int = 1,
                    rdzv_endpoint: str = "") -> None:
    """Run `python -m emcl_nb.train` under torchrun as a subprocess (from a notebook); a failed
    launch raises. One node: `--standalone` (a free local port, no port clash between runs).
    Multi-node: call it on every node with the same `rdzv_endpoint` (HOST:PORT, c10d rendezvous)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
               f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a multi-node launch needs rdzv_endpoint=HOST:PORT (the same on every node)")
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        command.append("--standalone")
    command += ["-m", "emcl_nb.train", "--params", dataset, "--set", *shlex.split(overrides)]
    print("$", " ".join(command))
    subprocess.run(command, check=True)
