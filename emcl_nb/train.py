"""Train EMCL-Net: `python -m emcl_nb.train --params <name|yaml> --set key=value ...`

Several processes (GPUs, or CPU processes with gloo):
    torchrun --nproc_per_node 8 -m emcl_nb.train --params msrvtt
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m emcl_nb.train --params msrvtt
From a notebook: `emcl_nb.training.run.train(load_params("msvd"))` (notebook 02).
"""
from __future__ import annotations

import argparse

from emcl_nb.params import load_params
from emcl_nb.training import distributed
from emcl_nb.training.run import train


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
