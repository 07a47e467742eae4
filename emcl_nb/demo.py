"""`make demo`: run notebooks 01 -> 05 headlessly with papermill on one dataset.

    python -m emcl_nb.demo [--dataset synthetic] [--run demo] [--set key=value ...]
    python -m emcl_nb.demo --refresh      # `make notebooks`: also store the executed
                                          # notebooks in notebooks/, train the seed study
                                          # and rewrite the README's results section

Executed notebooks go to outputs/<dataset>/<run>/notebooks/; only `--refresh` copies them
into notebooks/ (without papermill's injected cell and metadata), so that the committed
notebooks show what the demo shows. The kernels' printed lines stream to this terminal.

Progress bars are off unless `--set progress=true`: in a headless kernel every bar update
is a message the CPU cores pay for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from emcl_nb import stats
from emcl_nb.io import atomic_write_json, atomic_write_text
from emcl_nb.params import REPO_ROOT, load_params, repo_relative
from emcl_nb.runtime import cpu_model

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
README = REPO_ROOT / "README.md"
# The README section `--refresh` rewrites.
RESULTS_BEGIN, RESULTS_END = "<!-- demo-results:begin -->", "<!-- demo-results:end -->"
# What a stored notebook declares: JupyterLab writes this kernelspec on opening, so any
# other value would mark every opened notebook modified.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
STUDY_SEEDS = (0, 1, 2)


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("0*.ipynb"))


def run_notebooks(dataset: str = "synthetic", run: str = "demo", overrides: str = "",
                  names: list[str] | None = None) -> Path:
    """Execute the numbered notebooks in order (those in `names`, or all) with papermill;
    returns the output folder, whose timings.json keeps the seconds of each notebook's
    latest run. A failing cell stops the run (papermill raises, naming the notebook and cell)."""
    import papermill

    params = load_params(dataset, f"run={run} {overrides}")
    out_dir = params.out_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_path = out_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if names and timings_path.is_file() else {}
    for path in notebooks():
        if names and path.stem not in names:
            continue
        start = time.perf_counter()
        print(f"[emcl_nb] running {path.name} ...", flush=True)
        papermill.execute_notebook(str(path), str(out_dir / path.name), cwd=str(NOTEBOOK_DIR),
                                   parameters={"dataset": dataset, "run": run, "overrides": overrides},
                                   progress_bar=False, stdout_file=sys.stdout)
        timings[path.stem] = time.perf_counter() - start
        print(f"[emcl_nb] {path.name} done in {timings[path.stem]:.0f} s", flush=True)
    atomic_write_json(timings_path, dict(sorted(timings.items())))
    return out_dir


def headline(dataset: str, run: str, overrides: str = "") -> str:
    """One line with the run's test retrieval numbers (from metrics.json)."""
    params = load_params(dataset, f"run={run} {overrides}")
    summary = json.loads((params.out_dir / "metrics.json").read_text())
    result = summary["results"].get("best") or summary["results"]["last"]
    return (f"test set: {result['n_videos']} videos; text->video R@1 {result['t2v']['R1']:.1f} %, "
            f"video->text R@1 {result['v2t']['R1']:.1f} % (chance {result['chance_R1']:.1f} %)")


# ---------------------------------------------------------------------------------------
# `--refresh`: the committed notebooks and the README's results come from one demo run
# ---------------------------------------------------------------------------------------

def clean_notebook(notebook: dict) -> dict:
    """An executed notebook as it is committed: papermill's injected-parameters cell and
    its metadata dropped, JupyterLab's kernelspec, nothing that only a live kernel can
    display (widget views would reopen as "model not found")."""
    cells = [cell for cell in notebook["cells"]
             if "injected-parameters" not in cell.get("metadata", {}).get("tags", [])]
    for cell in cells:
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        for output in cell.get("outputs", []):
            if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                raise ValueError("a widget output cannot be stored: it needs a live kernel")
    metadata = {key: value for key, value in notebook["metadata"].items() if key != "papermill"}
    metadata["kernelspec"] = KERNELSPEC
    return {**notebook, "cells": cells, "metadata": metadata}


def store_notebooks(executed_dir: Path) -> list[Path]:
    """Copy the executed notebooks of `executed_dir` over notebooks/, cleaned."""
    stored = []
    for path in notebooks():
        executed = json.loads((executed_dir / path.name).read_text())
        atomic_write_text(path, json.dumps(clean_notebook(executed), indent=1, ensure_ascii=False) + "\n")
        stored.append(path)
    return stored


def seed_study(dataset: str, run: str, overrides: str, seeds=STUDY_SEEDS) -> dict:
    """Test metrics of the run trained with each training seed (the data stay the same):
    seed 0 is `run` itself (with `seed=0`), the others `<run>-seed<S>`, trained here when
    they have no checkpoint (a run there must have this recipe) and evaluated when they have
    no metrics yet. Written to <run>/seeds.json."""
    from emcl_nb.evaluate import evaluate_run
    from emcl_nb.train import ensure_trained

    per_seed = {}
    for seed in seeds:
        name = run if seed == 0 else f"{run}-seed{seed}"
        params = load_params(dataset, f"{overrides} run={name} seed={seed}")
        ensure_trained(params)          # trains it, or checks that the run there used this recipe
        if not (params.out_dir / "metrics.json").is_file():
            evaluate_run(params)
        summary = json.loads((params.out_dir / "metrics.json").read_text())
        per_seed[seed] = {key: summary["results"][key] for key in ("best", "last")
                          if key in summary["results"]}
    study = {"dataset": dataset, "run": run, "seeds": per_seed}
    atomic_write_json(load_params(dataset, f"{overrides} run={run}").out_dir / "seeds.json", study)
    return study


def machine() -> str:
    """CPU model, cores, torch version: what a reader needs to compare timings."""
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _spread(values: list[float]) -> str:
    """mean ± std over seeds, then each seed's value, at the precision they repeat to (whole
    points)."""
    each = ", ".join(f"{value:.0f}" for value in values)
    if len(values) < 2:
        return each
    spread = stats.spread(values)
    return f"{stats.format_spread(spread.mean, spread.std, len(values), 0)} ({each})"


def results_markdown(run_dir: Path, study: dict, timings: dict[str, float]) -> str:
    """The README's synthetic results: the demo run's test metrics (seed 0), the spread of
    the same row over the training seeds, and the time of each notebook."""
    from emcl_nb.evaluate import reference_protocol_label

    summary = json.loads((run_dir / "metrics.json").read_text())
    results = summary["results"]
    first = next(iter(results.values()))
    labels = {"best": "best on validation", "last": "last epoch",
              "reference_protocol": reference_protocol_label(run_dir)}
    seeds = study["seeds"]
    lines = [f"Test split: {first['n_videos']} videos, {first['n_texts']} captions "
             f"(chance R@1 {first['chance_R1']:.0f} %). Seed 0 is the demo run; "
             f"the last columns are mean ± std over training seeds {', '.join(map(str, seeds))}.",
             "",
             "| checkpoint | T2V R@1 | T2V R@5 | V2T R@1 | T2V R@1 over seeds | V2T R@1 over seeds |",
             "|---|---|---|---|---|---|"]
    for key, label in labels.items():
        if key not in results:
            continue
        result = results[key]
        epoch = f" (epoch {result['epoch']})" if key != "reference_protocol" else ""
        over = [seed_results[key] for seed_results in seeds.values() if key in seed_results]
        spread = (f"{_spread([r['t2v']['R1'] for r in over])} | {_spread([r['v2t']['R1'] for r in over])}"
                  if key in ("best", "last") else " | ")
        lines.append(f"| {label}{epoch} | {result['t2v']['R1']:.0f} | {result['t2v']['R5']:.0f} | "
                     f"{result['v2t']['R1']:.0f} | {spread} |")
    total = sum(timings.values())
    lines += ["", f"Wall time of `make demo` after set-up: {total / 60:.0f} min ("
              + ", ".join(f"{name[:2]}: {seconds:.0f} s" for name, seconds in timings.items())
              + f"), on {machine()}. Produced by `make notebooks`, which writes this section "
              f"from {repo_relative(run_dir / 'metrics.json')} and {repo_relative(run_dir / 'seeds.json')}."]
    return "\n".join(lines)


def update_readme(section: str, readme: Path = README,
                  markers: tuple[str, str] = (RESULTS_BEGIN, RESULTS_END)) -> None:
    """Replace the text between the README's `markers` (default: the results section) with
    `section`."""
    begin, end = markers
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no {begin} ... {end} section to rewrite")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(readme, f"{head}{begin}\n{section}\n{end}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--refresh", action="store_true",
                        help="store the executed notebooks in notebooks/, run the seed study and "
                             "rewrite the README's results section")
    args = parser.parse_args(argv)
    overrides = " ".join(["progress=false", *args.set])     # later keys win
    start = time.perf_counter()
    out_dir = run_notebooks(args.dataset, args.run, overrides)
    run_dir = out_dir.parent
    print(f"\n[emcl_nb] demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  executed notebooks: {repo_relative(out_dir)}")
    print(f"  metrics:            {repo_relative(run_dir / 'metrics.md')}")
    print(f"  ablations:          {repo_relative(run_dir / 'ablations.md')}")
    print(f"  figures:            {repo_relative(run_dir / 'figures')}")
    print(f"  {headline(args.dataset, args.run, overrides)}")
    if args.refresh:
        stored = store_notebooks(out_dir)
        print(f"[emcl_nb] stored {len(stored)} notebooks in {repo_relative(NOTEBOOK_DIR)}")
        study = seed_study(args.dataset, args.run, overrides)
        timings = json.loads((out_dir / "timings.json").read_text())
        update_readme(results_markdown(run_dir, study, timings))
        print(f"[emcl_nb] rewrote the results section of {repo_relative(README)}")
        from emcl_nb import ablations
        if ablations.RESULTS.is_file():        # the stored grid notebook 04 showed
            ablations.update_readme(ablations.load_results())


if __name__ == "__main__":
    main()
