"""`make ablations`: the seeded ablation grid, trained where needed, scored, summarised.

    python -m emcl_nb.ablations [--params synthetic-ablations] [--seeds 0 1 2] [--set key=value ...]

Writes docs/results/ablations.json (what notebook 04 shows) and the README's ablation
section. The grid is emcl_nb.analysis.ablations.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from emcl_nb.analysis.ablations import (
    GRID_DATASET,
    GRID_RUN,
    RESULTS,
    SEEDS,
    questions_table,
    readme_markdown,
    run_grid,
)
from emcl_nb.analysis.readme import update_readme


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=GRID_DATASET, help="a dataset name (params/<name>.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="training seeds")
    parser.add_argument("--run", default=GRID_RUN, help="run-name prefix of the grid's runs")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file to write")
    parser.add_argument("--no-readme", action="store_true", help="leave the README's section alone")
    args = parser.parse_args(argv)
    results = run_grid(args.params, args.seeds, args.set, run=args.run, results_path=args.results)
    print(questions_table(results))
    if not args.no_readme:
        update_readme("ablations", readme_markdown(results))
        print("[emcl_nb] rewrote the ablation section of README.md")
    print(f"[emcl_nb] grid done in {results['timing']['invocation_seconds']:.0f} s")


if __name__ == "__main__":
    main()
