"""Train EMCL-Net: `python -m emcl_nb.train --params params/<name>.yaml --set key=value ...`

Several processes (GPUs, or CPU processes with gloo):
    torchrun --nproc_per_node 8 -m emcl_nb.train --params params/msrvtt.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint HOST:29500 -m emcl_nb.train --params params/msrvtt.yaml
From a notebook: `emcl_nb.train.train(load_params("msvd"))`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from emcl_nb import distributed
from emcl_nb.checkpoint import read_checkpoint
from emcl_nb.engine import FitResult, check_resumable, fit
from emcl_nb.params import REUSE_FIELDS, Params, load_params


def train(params: Params, *, resume: bool = True, on_log=None) -> FitResult:
    """Prepare the data (generating the synthetic set when asked), then train.
    Each epoch is validated on a split that is not the test set where the layout has one;
    with params.reference_selection the reference's step-wise selection runs too."""
    from emcl_nb.data.annotations import load_annotations
    from emcl_nb.data.dataset import TrainDataset, shutdown_workers
    from emcl_nb.data.prepare import ensure_data
    from emcl_nb.validation import make_reference_validator, make_validator

    env = distributed.env_from_torchrun()
    distributed.init_distributed(distributed.resolve_device(params.device, env), env)
    if env.is_main:
        ensure_data(params)
    distributed.barrier()
    train_set = TrainDataset(load_annotations(params, "train"), params, train=True)
    try:
        validate = make_validator(params)
        return fit(params, train_set, validate=validate,
                   reference=make_reference_validator(params, validate), resume=resume, on_log=on_log)
    finally:
        shutdown_workers()          # no loader worker outlives train(), even on an error
        distributed.cleanup()


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
    """Run this module under torchrun as a subprocess (from a notebook); a failed launch raises.
    One node: `--standalone` (a free local port, no port clash between runs). Multi-node: call
    it on every node with the same `rdzv_endpoint` (HOST:PORT, c10d rendezvous)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
               f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ValueError("a multi-node launch needs rdzv_endpoint=HOST:PORT (the same on every node)")
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    else:
        command.append("--standalone")
    command += ["-m", "emcl_nb.train", "--params", dataset, "--set", *overrides.split()]
    print("$", " ".join(command))
    subprocess.run(command, check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="synthetic",
                        help="a dataset name (params/<name>.yaml) or a path to a YAML file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override parameters, e.g. --set epochs=2 batch_size=64")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if the run folder has a checkpoint")
    args = parser.parse_args(argv)
    result = train(load_params(args.params, args.set), resume=not args.no_resume)
    if distributed.env_from_torchrun().is_main:
        print(f"[emcl_nb] checkpoints in {result.last_checkpoint.parent}")


if __name__ == "__main__":
    main()
