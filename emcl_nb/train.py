"""Train EMCL-Net: `python -m emcl_nb.train --params <name|yaml> --set key=value ...`

Several processes (GPUs, or CPU processes with gloo):
    torchrun --nproc_per_node 8 -m emcl_nb.train --params msrvtt
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m emcl_nb.train --params msrvtt
From a notebook: `emcl_nb.training.run.train(load_params("msvd"))` (notebook 02).

The CLIP weights, the annotation files and the video folder are checked first, before torch
loads: every missing one is named in a single error.
"""
from __future__ import annotations

import argparse

from emcl_nb.cli import add_traceback_flag, run_command
from emcl_nb.data.inputs import check_inputs
from emcl_nb.params import Params, load_params


def train_command(params: Params, resume: bool) -> None:
    check_inputs(params)
    # Imported here, after the check: torch and the training machinery take seconds to load,
    # and a missing file should be named before that.
    from emcl_nb.training.distributed import env_from_torchrun
    from emcl_nb.training.run import train

    result = train(params, resume=resume)
    if env_from_torchrun().is_main:
        print(f"[emcl_nb] checkpoints in {result.last_checkpoint.parent}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="synthetic",
                        help="a dataset name (params/<name>.yaml) or a path to a YAML file")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override parameters, e.g. --set epochs=2 batch_size=64")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if the run folder has a checkpoint")
    add_traceback_flag(parser)
    args = parser.parse_args(argv)
    run_command(lambda: train_command(load_params(args.params, args.set), resume=not args.no_resume),
                traceback=args.traceback)


if __name__ == "__main__":
    main()
