"""The README's performance table, generated from the benchmark results in docs/results.

    python bench/report.py            # rewrite README.md between the perf-results markers
    python bench/report.py --check    # exit 1 if README.md is not what the files give

Each `docs/results/*.json` is the output of `bench/reference_side_by_side.py --json` (two
rows: the reference code and this project, timed in alternating rounds), of
`bench/train_step.py --json` (one row: this project alone), of `bench/data_loading.py
--cache --json` (the loader table; its files without --cache are in neither table), of
`bench/search.py --json` (the search table), or a
"quoted" file: figures measured another way (the reference code, run by an earlier
session), with their provenance and one row per measurement, the row marked `baseline`
being the reference they compare with.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from emcl_nb.analysis.readme import write_or_check

ROOT = Path(__file__).resolve().parents[1]


def load_results(folder: Path) -> list[dict]:
    """The result files, in name order (a stable table)."""
    return [json.loads(path.read_text()) | {"file": path.name} for path in sorted(folder.glob("*.json"))]


def table_rows(results: list[dict]) -> list[dict]:
    """Rows (label, clips/s, runs, x reference, ms, memory, machine, command or how, source).
    Rows of a side-by-side or quoted file divide by the reference measured with them;
    standalone runs by the side-by-side measurement's reference without anomaly mode where
    there is one, else by the quoted baseline."""
    side_by_side = [r for r in results if r.get("benchmark") == "reference_side_by_side"]
    quoted = [r for r in results if r.get("kind") == "quoted"]
    quoted_baseline = next((statistics.median(row["clips_per_s_runs"]) for result in quoted
                            for row in result["rows"] if row.get("baseline")), None)
    plain = [r for r in side_by_side if not r["configuration"]["reference_anomaly_mode"]]
    baseline = plain[0]["reference_clips_per_s"] if plain else quoted_baseline
    rows = []
    for result in side_by_side:
        load = result["load_average_1min"]
        machine = f"{result['machine']}, {result['threads']} threads (load {load[0]}-{load[1]})"
        reference = result["reference_clips_per_s"]
        anomaly = "on (as it ships)" if result["configuration"]["reference_anomaly_mode"] else "off"
        for side, label in (("reference", f"reference code, anomaly mode {anomaly}, alternating with ours"),
                            ("ours", "this project, alternating with the reference")):
            clips = result[f"{side}_clips_per_s"]
            rows.append({"label": label, "clips_per_s": clips, "runs": [r[side] for r in result["rounds"]],
                         "ratio": clips / reference, "ms": None, "memory": None, "machine": machine,
                         "command": f"`{result['command']}`", "source": f"measured: {result['file']}"})
    for result in quoted:
        for row in result["rows"]:
            runs = row["clips_per_s_runs"]
            rows.append({"label": row["label"], "clips_per_s": statistics.median(runs), "runs": runs,
                         "ratio": statistics.median(runs) / quoted_baseline if quoted_baseline else None,
                         "ms": None, "memory": None,
                         "machine": result["machine"], "command": row["how"], "source": f"quoted: {result['file']}"})
    for result in results:
        if result.get("benchmark") == "train_step" and result.get("kind") != "quoted":
            device = result["machine"] + (f", {result['threads']} threads" if result.get("threads") else "")
            load = result.get("load_average_1min")
            compiled = (f", compile=true (first step {result['first_step_seconds']:.0f} s, "
                        f"{result.get('compile_cache', 'cold')} compile cache)" if result.get("compile") else "")
            rows.append({"label": f"this project, preset {result['preset']}{compiled}",
                         "clips_per_s": result["clips_per_s"], "runs": result["clips_per_s_windows"],
                         "ratio": result["clips_per_s"] / baseline if baseline else None, "ms": result["ms_per_step"],
                         "memory": f"{result['peak_memory_gib']:.2f} GiB {result['peak_memory_kind']}",
                         "machine": device + (f" (load {load[0]}-{load[1]})" if load else ""),
                         "command": f"`{result['command']}`", "source": f"measured: {result['file']}"})
    return rows


def render(folder: Path) -> str:
    """The markdown between the markers."""
    results = load_results(folder)
    rows = table_rows(results)
    intro = ("Training step, CPU reference configuration (tiny CLIP width 128, 2 layers, patch 32; "
             "224 px, 12 frames, batch 16, 32 words, seqTransf 2 layers, fp32, 2 threads). "
             "clips/s is the median of the runs listed, in whole clips/s (the runs vary by more). "
             "x reference divides by the reference code without its anomaly mode as measured with the "
             "row: alternating rounds in the same session for the side-by-side rows "
             "(`bench/reference_side_by_side.py`), the earlier session's figures for the quoted rows, "
             "and the side-by-side reference for standalone runs. Quoted rows were measured on the "
             "reference code by an earlier session, not by this repository's scripts. The machine is "
             "shared and its speed drifts by tens of percent within minutes: compare rows measured together.")
    lines = [intro, "",
             "| what | clips/s | runs | x reference | ms/step | peak memory | machine | command | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['ratio']:.1f}" if row["ratio"] is not None else ""
        runs = ", ".join(f"{r:.0f}" for r in row["runs"])
        lines.append(f"| {row['label']} | {row['clips_per_s']:.0f} | {runs} | {ratio} | "
                     f"{'' if row['ms'] is None else round(row['ms'])} | {row['memory'] or ''} | "
                     f"{row['machine']} | {row['command']} | {row['source']} |")
    lines += loader_table(results)
    lines += search_table(results)
    lines.append("")
    lines.append("Generated by `python bench/report.py` from docs/results/*.json.")
    return "\n".join(lines)


def loader_table(results: list[dict]) -> list[str]:
    """Lines of the loader table: `bench/data_loading.py --cache --json` files (clips/s per loader)."""
    loaders = [r for r in results if r.get("benchmark") == "data_loading_cache"]
    if not loaders:
        return []
    title = ("Training loader: decoding with decord vs reading the decoded-frame cache; with the reference "
             "RandAugment, augmenting in the loader workers (PIL) vs on the device (median of alternating rounds):")
    lines = ["", title, "",
             "| loader | clips/s | rounds | settings | machine | command | source |", "|---|---|---|---|---|---|---|"]
    ratios = []
    for result in loaders:
        machine, settings = result["machine"], result["settings"]
        where = (f"{machine['cpu']}, {machine['cores']} cores (load {machine['load_average_1min']}), "
                 f"torch {machine['torch']}")
        what = (f"{settings['frames']} frames of {settings['image_size']} px, batch {settings['batch']}, "
                f"{settings['workers']} workers" + (", reference RandAugment" if settings.get("augment") else ""))
        for name, rate in result["clips_per_s"].items():
            rounds = ", ".join(f"{r:.0f}" for r in result["rounds"][name])
            label = name + (f" (on {settings['device_augmentation_on']}, in the training process)"
                            if name == "device augmentation" and "device_augmentation_on" in settings else "")
            lines.append(f"| {label} | {rate:.0f} | {rounds} | {what} | {where} | `{result['command']}` | "
                         f"measured: {result['file']} |")
        if "cache_over_decord" in result:
            ratios.append(f"Cache over decord: {result['cache_over_decord']:.1f}x ({result['file']}).")
        else:
            ratios.append(f"Device augmentation over loader augmentation: "
                          f"{result['device_over_loader_augmentation']:.2f}x ({result['file']}).")
    return lines + [line for ratio in ratios for line in ("", ratio)]


def search_table(results: list[dict]) -> list[str]:
    """Lines of the search table: `bench/search.py --json` files (one query over an index)."""
    searches = [r for r in results if r.get("benchmark") == "search"]
    if not searches:
        return []
    lines = ["", "One search query over an index of random features at ViT-B/32 sizes (`bench/search.py`: "
                 "query_similarity + top-k, EMCL blocks of 1 text x 32 videos; the text encoder not timed):", "",
             "| device | videos | blocks per call | median ms | runs (ms) | machine | command | source |",
             "|---|---|---|---|---|---|---|---|"]
    for result in searches:
        load = result["load_average_1min"]
        for run in result["results"]:
            lines.append(f"| {run['device']} | {result['videos']:,} | first query after mapping the index | "
                         f"{run['first_query_s'] * 1000:.0f} | | {result['machine']}, {result['threads']} threads "
                         f"(load {load[0]:.2f}-{load[1]:.2f}) | `{result['command']}` | measured: {result['file']} |")
            for setting, figures in run["settings"].items():
                runs = ", ".join(f"{s * 1000:.0f}" for s in figures["runs_s"])
                median = figures["median_s"] * 1000
                lines.append(f"| {run['device']} | {result['videos']:,} | {setting} | {median:.0f} | {runs} | "
                             f"{result['machine']}, {result['threads']} threads (load {load[0]:.2f}-{load[1]:.2f}) | "
                             f"`{result['command']}` | "
                             f"measured: {result['file']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
    args = parser.parse_args()
    body = render(args.results)
    write_or_check("perf-results", body, args.readme, check=args.check)


if __name__ == "__main__":
    main()
