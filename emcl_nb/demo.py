"""`make demo`: run notebooks 01 -> 05 headlessly with papermill on one dataset.

    python -m emcl_nb.demo [--dataset synthetic] [--run demo] [--set key=value ...]

Executed notebooks go to outputs/<dataset>/<run>/notebooks/, never into notebooks/. The
kernels' printed lines (one per epoch while training) stream to this terminal.

Progress bars are off unless `--set progress=true`: in a headless kernel every bar update
is a message the CPU cores pay for (a synthetic epoch took 50 s with them, 33 s without).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from emcl_nb.params import REPO_ROOT, load_params

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("0*.ipynb"))


def run_notebooks(dataset: str = "synthetic", run: str = "demo", overrides: str = "",
                  names: list[str] | None = None) -> Path:
    """Execute the numbered notebooks in order with papermill; returns the output folder.
    A failing cell stops the run (papermill raises, naming the notebook and cell)."""
    import papermill

    params = load_params(dataset, f"run={run} {overrides}")
    out_dir = params.out_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in notebooks():
        if names and path.stem not in names:
            continue
        start = time.perf_counter()
        print(f"[emcl_nb] running {path.name} ...", flush=True)
        papermill.execute_notebook(str(path), str(out_dir / path.name), cwd=str(NOTEBOOK_DIR),
                                   parameters={"dataset": dataset, "run": run, "overrides": overrides},
                                   progress_bar=False, stdout_file=sys.stdout)
        print(f"[emcl_nb] {path.name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return out_dir


def headline(dataset: str, run: str, overrides: str = "") -> str:
    """One line with the run's test retrieval numbers (from metrics.json)."""
    params = load_params(dataset, f"run={run} {overrides}")
    summary = json.loads((params.out_dir / "metrics.json").read_text())
    result = summary["results"].get("best") or summary["results"]["last"]
    return (f"test set: {result['n_videos']} videos; text->video R@1 {result['t2v']['R1']:.1f} %, "
            f"video->text R@1 {result['v2t']['R1']:.1f} % (chance {result['chance_R1']:.1f} %)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = " ".join(["progress=false", *args.set])     # later keys win
    start = time.perf_counter()
    out_dir = run_notebooks(args.dataset, args.run, overrides)
    run_dir = out_dir.parent
    print(f"\n[emcl_nb] demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  executed notebooks: {os.path.relpath(out_dir)}")
    print(f"  metrics:            {os.path.relpath(run_dir / 'metrics.md')}")
    print(f"  ablations:          {os.path.relpath(run_dir / 'ablations.md')}")
    print(f"  figures:            {os.path.relpath(run_dir / 'figures')}")
    print(f"  {headline(args.dataset, args.run, overrides)}")


if __name__ == "__main__":
    main()
