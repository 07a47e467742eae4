"""The demo (`make demo`, `python -m emcl_nb.demo`): notebooks 01 -> 06 run headlessly with
papermill on one dataset, and with `--refresh` (`make notebooks`) what the repository shows
made from that run: the executed notebooks stored in notebooks/, the seed study, the README's
results section.

Executed notebooks go to outputs/<dataset>/<run>/notebooks/; only the refresh copies them
into notebooks/ (without papermill's injected cell and metadata), so that the committed
notebooks show what the demo shows. The kernels' printed lines stream to the terminal.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import papermill

from emcl_nb.analysis import ablations, stats
from emcl_nb.analysis.readme import update_readme
from emcl_nb.evaluation.run import evaluate_run, reference_protocol_label
from emcl_nb.io import atomic_write_json, atomic_write_text
from emcl_nb.params import REPO_ROOT, load_params, repo_relative
from emcl_nb.training.run import ensure_trained
from emcl_nb.training.runtime import machine

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# What a stored notebook declares: JupyterLab writes this kernelspec on opening, so any
# other value would mark every opened notebook modified.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
STUDY_SEEDS = (0, 1, 2)


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("0*.ipynb"))


def run_notebooks(dataset: str = "synthetic", run: str = "default", overrides: str = "",
                  names: list[str] | None = None) -> Path:
    """Execute the numbered notebooks in order (those in `names`, or all) with papermill;
    returns the output folder, whose timings.json keeps the seconds of each notebook's
    latest run. A failing cell stops the run (papermill raises, naming the notebook and cell)."""
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


def refresh(dataset: str, run: str, overrides: str, executed_dir: Path) -> None:
    """`make notebooks` after the demo run in `executed_dir`: store its notebooks in
    notebooks/, train and evaluate the seed study, rewrite the README's demo results and
    its ablation section from the stored grid that notebook 04 showed."""
    stored = store_notebooks(executed_dir)
    print(f"[emcl_nb] stored {len(stored)} notebooks in {repo_relative(NOTEBOOK_DIR)}")
    study = seed_study(dataset, run, overrides)
    timings = json.loads((executed_dir / "timings.json").read_text())
    update_readme("demo-results", results_markdown(executed_dir.parent, study, timings))
    print("[emcl_nb] rewrote the demo results section of README.md")
    if ablations.RESULTS.is_file():
        update_readme("ablations", ablations.readme_markdown(ablations.load_results()))
