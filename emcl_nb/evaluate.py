"""Evaluate a run: `python -m emcl_nb.evaluate --params <name|yaml> [--checkpoint PATH]
[--split test] [--emcl on|off|inference] [--set key=value ...]`

Scores the run's best.pt (if any) and last.pt, or the checkpoints given (ours or the
reference code's), on the split, and writes metrics.json and metrics.md in the run folder
(emcl_nb.evaluation.run.evaluate_run). Scoring settings given with --set re-score cached
features without encoding again.
"""
from __future__ import annotations

import argparse

from emcl_nb.cli import add_traceback_flag, run_command
from emcl_nb.data.inputs import check_inputs
from emcl_nb.params import CHOICES, SCORING_FIELDS, load_params, parse_overrides


def evaluate_command(args) -> None:
    sets = parse_overrides(args.set, "--set")
    emcl_mode = args.emcl or sets.pop("emcl", None)
    overrides = {key: sets.pop(key) for key in list(sets) if key in SCORING_FIELDS}
    params = load_params(args.params, sets)
    check_inputs(params, weights=False, splits=(args.split,))   # the weights come from the checkpoint
    # Imported here, after the check: torch and the evaluation machinery take seconds to load.
    from emcl_nb.evaluation.run import evaluate_run

    summary = evaluate_run(params, args.checkpoint or ("best", "last"), split=args.split,
                           emcl_mode=emcl_mode, name=args.name, cache=not args.no_cache, **overrides)
    print(summary["table"])
    print(f"[emcl_nb] wrote {params.out_dir / (args.name + '.json')} and {args.name}.md")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="synthetic",
                        help="a dataset name (params/<name>.yaml) or a path to a YAML file")
    parser.add_argument("--checkpoint", action="append", metavar="PATH",
                        help="a checkpoint file to evaluate (ours or the reference code's; "
                             "a relative path is taken from the repository root); "
                             "repeatable. Default: the run's best.pt (if any) and last.pt")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--emcl", choices=CHOICES["emcl"], default=None,
                        help="scoring mode; default: the mode the model was trained with")
    parser.add_argument("--name", default="metrics", help="output file name in the run folder")
    parser.add_argument("--no-cache", action="store_true", help="encode without the feature cache")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"override parameters; scoring settings ({', '.join(SCORING_FIELDS)}) "
                             f"re-score cached features without encoding again")
    add_traceback_flag(parser)
    args = parser.parse_args(argv)
    run_command(lambda: evaluate_command(args), traceback=args.traceback)


if __name__ == "__main__":
    main()
