"""The paper's ablations over training seeds, with error bars (`make ablations`, notebook 04).

    python -m emcl_nb.ablations [--params synthetic-ablations] [--seeds 0 1 2] [--set key=value ...]

The grid trains, for each training seed (the synthetic set stays the same), EMCL-Net (the
reference recipe of the parameter file) and each variant of `TRAINED_VARIANTS` that differs
from it, every one at the file's full schedule, as its own run `<run>-seed<S>-<variant>`.
It scores each run's last checkpoint on the test split: with its trained setting; the runs
trained without EMCL also with EMCL as an inference-only module; EMCL-Net also with EMCL
switched off and with each re-scoring setting of `SCORING_GRID` (same checkpoint, no
re-encoding). Each question of `QUESTIONS` compares two of these scored arms on the same
seeds and queries (emcl_nb.analysis.stats: mean ± std over seeds, paired bootstrap 95 % interval).

Resumable and cheap to repeat: a run that is complete (all epochs) with this recipe is not
trained again, an unfinished one is resumed, and each run's scores (with its per-query hits)
are cached in its folder beside the checkpoint they came from, so a rerun on a finished grid
only reads files. The one results file (`RESULTS`, docs/results/ablations.json) is what
the README section and notebook 04 show.
Over 300 lines: the grid, its per-run score cache and the tables read one results format.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from emcl_nb.analysis import stats
from emcl_nb.analysis.em_step import em_block
from emcl_nb.evaluation.run import load_split
from emcl_nb.evaluation.scoring import score_with, scoring_setup
from emcl_nb.io import atomic_write_json, atomic_write_text
from emcl_nb.model.metrics import PLAIN, evaluate_similarity, query_recall
from emcl_nb.params import REPO_ROOT, RESUME_FIELDS, SCORING_FIELDS, Params, load_params, repo_relative
from emcl_nb.training.checkpoint import read_checkpoint
from emcl_nb.training.checks import check_resumable
from emcl_nb.training.run import ensure_trained, train
from emcl_nb.training.runtime import machine

GRID_DATASET = "synthetic-ablations"
GRID_RUN = "grid"
SEEDS = (0, 1, 2)
RESULTS = REPO_ROOT / "docs" / "results" / "ablations.json"
SCORES_FILE = "ablation-scores.json"
SCORES_VERSION = 2               # bump when what is cached per setting changes (2: rank)
METRIC = "t2v_R1"                # what the per-query hits, the spread and the intervals measure

# Trained variants: name -> (label, changes to the reference recipe). A variant whose changes
# the recipe already has (e.g. K = 32 when the file says 32) is the reference run itself.
TRAINED_VARIANTS = {
    "emcl-off": ("text pooling, EMCL off", {"emcl": "off"}),
    # CLIP4Clip's recipe: no augmentation (the synthetic grid has none anyway)
    "meanp": ("CLIP4Clip meanP (mean pooling, no temporal module, no EMCL)",
              {"pooling": "mean", "agg_module": "None", "emcl": "off", "train_augment": False}),
    "distinct": ("EMCL, distinct (non-collapsing) bases", {"emcl_init": "distinct"}),
    "bases-8": ("EMCL, K = 8 bases", {"emcl_bases": 8}),
    "beta-1": ("EMCL, β = 1", {"emcl_beta": 1.0}),
    "momentum-0.5": ("EMCL, momentum 0.5", {"emcl_momentum": 0.5}),
}
REFERENCE = "reference"
# Settings re-scored on EMCL-Net's checkpoint (values equal to the trained one are skipped).
SCORING_GRID = {
    "emcl_bases": (1, 4, 8, 16, 64),
    "emcl_stages": (1, 3, 15),
    "emcl_lamd": (0.1, 10.0),
    "emcl_beta": (0.0, 1.0, 6.0),
    "block_size": (8, 128),
    "emcl_init": ("reference", "distinct"),
}
# The questions the grid answers: (question, variant arm, baseline arm).
QUESTIONS = (
    ("EMCL vs EMCL off", REFERENCE, "emcl-off"),
    ("EMCL at inference only vs EMCL off", "emcl-off+inference", "emcl-off"),
    ("meanP + EMCL at inference vs meanP", "meanp+inference", "meanp"),
    ("distinct bases vs EMCL-Net", "distinct", REFERENCE),
    ("K = 8 vs EMCL-Net", "bases-8", REFERENCE),
    ("β = 1 vs EMCL-Net", "beta-1", REFERENCE),
    ("momentum 0.5 vs EMCL-Net", "momentum-0.5", REFERENCE),
)


# ---------------------------------------------------------------------------------------
# The arms: which run, scored how
# ---------------------------------------------------------------------------------------

def setting_key(mode: str | None, overrides: dict) -> str:
    """Name of a scoring setting: "trained", "off", "inference", "on emcl_bases=8"."""
    return " ".join([mode or "trained", *(f"{k}={v}" for k, v in sorted(overrides.items()))])


def trained_variants(base: Params, variants: dict = TRAINED_VARIANTS) -> dict[str, tuple[str, dict]]:
    """EMCL-Net first, then each variant whose changes differ from `base` (the others are
    EMCL-Net itself)."""
    kept = {REFERENCE: ("EMCL-Net (the reference recipe)", {})}
    for name, (label, changes) in variants.items():
        if base.replace(**changes) != base:
            kept[name] = (label, changes)
    return kept


def grid_arms(base: Params, variants: dict = TRAINED_VARIANTS, grid: dict = SCORING_GRID) -> dict:
    """{arm: (label, variant run, scoring mode, scoring overrides)} of the whole grid."""
    arms = {}
    for name, (label, changes) in trained_variants(base, variants).items():
        arms[name] = (label, name, None, {})
        if base.replace(**changes).emcl == "off":
            arms[f"{name}+inference"] = (f"{label} + EMCL at inference", name, "inference", {})
    arms.update(rescoring_arms(base, grid))
    return arms


def rescoring_arms(base: Params, grid: dict = SCORING_GRID, run: str = REFERENCE) -> dict:
    """EMCL switched off at test and each grid value that differs from the trained setting,
    all on `run`'s checkpoint."""
    arms = {f"{run}@off": ("EMCL switched off at test", run, "off", {})}
    for field, values in grid.items():
        for value in values:
            if value != getattr(base, field):
                arms[f"{run}@{field}={value}"] = (f"re-scored with {field} = {value}", run, "on", {field: value})
    return arms


def rescoring_questions(arms: dict, run: str = REFERENCE) -> list[tuple[str, str, str]]:
    """One question per re-scoring arm of `run`: the setting vs the trained one, same checkpoint."""
    return [(f"{label} vs as trained", arm, run) for arm, (label, variant, mode, _) in arms.items()
            if variant == run and mode is not None]


# ---------------------------------------------------------------------------------------
# Runs: trained once, scored once (cached)
# ---------------------------------------------------------------------------------------

def ensure_complete(params: Params) -> tuple[Path, float | None]:
    """(last checkpoint, seconds spent training here or None) of a run trained for all of
    params.epochs with exactly this recipe (RESUME_FIELDS, seed and model included): a
    complete run is reused, an unfinished one resumed, a missing one trained. A run with
    another recipe is a TrainingSetupError naming the differences."""
    last = params.out_dir / "checkpoints" / "last.pt"
    if last.is_file():
        saved = read_checkpoint(last, mmap=True)
        check_resumable(params, saved["params"], last, RESUME_FIELDS)
        if saved["epoch"] >= params.epochs:
            return last, None
    start = time.perf_counter()
    train(params)
    return last, time.perf_counter() - start


def _checkpoint_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"checkpoint": repo_relative(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def correction_rank(features, model, scoring) -> int | None:
    """Effective rank of the EMCL correction β·R actually added on the first evaluation block
    (0 when β = 0; None without EMCL): the reference init collapses it whatever K is."""
    if scoring.emcl_module is None:
        return None
    first = range(min(scoring.block_size, features.n_texts, features.n_videos))
    block = em_block(model, features, first, first, scoring=scoring)
    # effective_rank's threshold is relative to the largest singular value: scaling R by a
    # nonzero β leaves its rank unchanged, so β·R has R's rank (block.rank), or none at β = 0
    return 0 if block.beta == 0 else block.rank


def score_setting(features, model, params: Params, mode: str | None, overrides: dict) -> dict:
    """Plain test metrics of one scoring setting, the per-query T2V R@1 hits (tie rule of
    emcl_nb.model.metrics) and the rank of its EMCL correction."""
    scoring = scoring_setup(model.eval(), params, mode, **overrides)               # its notes print once
    sim = score_with(features, model, scoring)                                     # [A, V]
    text_video = None if features.single_sentence else features.text_video
    metrics = evaluate_similarity(sim, text_video, dsl_temps=None)[PLAIN]
    return {"t2v": metrics["t2v"], "v2t": metrics["v2t"], "rank": correction_rank(features, model, scoring),
            "hits": query_recall(sim, 1, features.text_video).tolist()}


def run_scores(params: Params, settings: dict[str, tuple[str | None, dict]]) -> dict:
    """{"scores": {setting key: score_setting(...)}, "train_seconds"} of the run, complete.
    Cached in out_dir/SCORES_FILE for the checkpoint they came from (its size and mtime) and
    the scoring parameters; only settings not cached there load the model and score. The
    training time stays with its checkpoint when the scores are made again."""
    last, trained_seconds = ensure_complete(params)
    path = params.out_dir / SCORES_FILE
    checkpoint = _checkpoint_stamp(last)
    stamp = {"version": SCORES_VERSION, **checkpoint,
             "scoring": {name: getattr(params, name) for name in ("seed", *SCORING_FIELDS)}}
    cached = json.loads(path.read_text()) if path.is_file() else {"stamp": {}}
    same_checkpoint = all(cached["stamp"].get(key) == value for key, value in checkpoint.items())
    if trained_seconds is None and same_checkpoint:
        trained_seconds = cached.get("train_seconds")
    if cached["stamp"] != stamp:
        cached = {"stamp": stamp, "scores": {}}
    cached["train_seconds"] = trained_seconds
    missing = {key: setting for key, setting in settings.items() if key not in cached["scores"]}
    if missing:
        cached["scores"].update(score_checkpoint(last, params, missing))
        atomic_write_json(path, cached)
    return cached


def score_checkpoint(path: Path, params: Params, settings: dict[str, tuple[str | None, dict]]) -> dict:
    """{setting key: score_setting(...)} of one checkpoint's test split (features encoded once)."""
    model, run_params, _, features = load_split(path, params, "test")
    return {key: score_setting(features, model, run_params, *setting) for key, setting in settings.items()}


# ---------------------------------------------------------------------------------------
# The grid and its summary
# ---------------------------------------------------------------------------------------

def variant_params(base: Params, variant: str, changes: dict, seed: int, run: str) -> Params:
    return base.replace(run=f"{run}-seed{seed}-{variant}", seed=seed, **changes)


def run_grid(dataset: str = GRID_DATASET, seeds=SEEDS, overrides="", *, run: str = GRID_RUN,
             variants: dict = TRAINED_VARIANTS, grid: dict = SCORING_GRID,
             results_path: Path | None = RESULTS) -> dict:
    """Train (or reuse) and score every run of the grid over `seeds`, summarise it
    (`summarise`) and write the results to `results_path` (None: not written)."""
    start = time.perf_counter()
    seeds = tuple(int(seed) for seed in seeds)
    base = load_params(dataset, overrides)
    arms = grid_arms(base, variants, grid)
    trained = trained_variants(base, variants)               # runs and their settings: any seed's
    settings_of = {variant: {arm: (mode, extra) for arm, (_, name, mode, extra) in arms.items()
                             if name == variant} for variant in trained}
    scores, train_seconds = {}, {}
    for seed in seeds:
        for variant, (_, changes) in trained.items():
            params = variant_params(base, variant, changes, seed, run)
            settings = settings_of[variant]
            print(f"[emcl_nb] grid: seed {seed}, {variant} ({repo_relative(params.out_dir)})", flush=True)
            cached = run_scores(params, {setting_key(*s): s for s in settings.values()})
            train_seconds[params.run] = cached["train_seconds"]
            for arm, setting in settings.items():
                scores[seed, arm] = cached["scores"][setting_key(*setting)]
    questions = [*[q for q in QUESTIONS if q[1] in arms and q[2] in arms], *rescoring_questions(arms)]
    results = summarise(arms, questions, scores, seeds)
    timed = [s for s in train_seconds.values() if s is not None]
    results.update(
        dataset=base.dataset, params_file=f"params/{base.dataset}.yaml", overrides=str(overrides),
        command="make ablations", machine=machine(),
        timing={"train_seconds": sum(timed), "runs": len(train_seconds), "runs_timed": len(timed),
                "invocation_seconds": time.perf_counter() - start})
    if results_path is not None:
        _keep_training_times(results, results_path)
        atomic_write_json(results_path, results)
        print(f"[emcl_nb] wrote {repo_relative(results_path)}")
    return results


def _keep_training_times(results: dict, results_path: Path) -> None:
    """Runs trained by an earlier invocation keep the training time it recorded (a run
    reused here has no time of its own)."""
    if not results_path.is_file():
        return
    earlier = json.loads(results_path.read_text()).get("timing", {})
    timing = results["timing"]
    if timing["runs_timed"] < timing["runs"] and earlier.get("runs_timed", 0) > timing["runs_timed"]:
        timing.update(train_seconds=earlier["train_seconds"], runs_timed=earlier["runs_timed"])


def _record(result) -> dict:
    """A stats dataclass as it reads back from JSON (tuples as lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(result).items()}


def summarise(arms: dict, questions, scores: dict, seeds) -> dict:
    """{"seeds", "n_queries", "metric", "bootstrap", "arms": {arm: label, run, setting,
    per-seed metrics, spread}, "questions": [paired differences with sentence and verdict]}.
    `scores`: (seed, arm) -> score_setting result."""
    summary_arms = {}
    for arm, (label, variant, mode, overrides) in arms.items():
        per_seed = {seed: scores[seed, arm] for seed in seeds}
        summary_arms[arm] = {
            "label": label, "run": variant, "setting": setting_key(mode, overrides),
            "per_seed": {str(seed): {"t2v_R1": s["t2v"]["R1"], "t2v_R5": s["t2v"]["R5"],
                                     "t2v_MnR": s["t2v"]["MnR"], "v2t_R1": s["v2t"]["R1"],
                                     "rank": s["rank"]}
                         for seed, s in per_seed.items()},
            **{key: _record(stats.spread(s[direction]["R1"] for s in per_seed.values()))
               for key, direction in (("t2v_R1", "t2v"), ("v2t_R1", "v2t"))}}
    summary_questions = []
    for question, arm, baseline in questions:
        difference = stats.paired_bootstrap([scores[seed, arm]["hits"] for seed in seeds],
                                            [scores[seed, baseline]["hits"] for seed in seeds])
        summary_questions.append({"question": question, "arm": arm, "baseline": baseline,
                                  **_record(difference), "verdict": stats.verdict(difference),
                                  "sentence": stats.sentence(question, difference)})
    n_queries = len(next(iter(scores.values()))["hits"])
    return {"seeds": list(seeds), "metric": METRIC, "n_queries": n_queries,
            "bootstrap": {"samples": stats.BOOTSTRAP_SAMPLES, "confidence": stats.CONFIDENCE,
                          "seed": stats.BOOTSTRAP_SEED, "seeds_pooled": "per-seed differences "
                          "averaged under the same resampled test queries"},
            "arms": summary_arms, "questions": summary_questions}


# ---------------------------------------------------------------------------------------
# What notebook 04 and the README show
# ---------------------------------------------------------------------------------------

def load_results(path: Path = RESULTS) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no ablation results at {repo_relative(path)}: run `make ablations` "
                                f"(or notebook 04 with seeds='0,1,2') to train and score the grid")
    return json.loads(path.read_text())


def show_grid(seeds: str = "", dataset: str = GRID_DATASET) -> dict:
    """Notebook 04's grid: the stored results (`RESULTS`) when `seeds` is empty, else the grid
    over those training seeds ("0,1,2"), trained where needed, which rewrites `RESULTS`.
    Prints which one it shows."""
    if not seeds.strip():
        results = load_results()
        print(f"showing the stored grid {repo_relative(RESULTS)} (made by `make ablations`): {describe(results)}")
        return results
    results = run_grid(dataset, seeds.replace(",", " ").split())
    print(f"showing the grid trained and scored now: {describe(results)}")
    return results


def describe(results: dict) -> str:
    """One line saying which grid the results are."""
    seeds = results["seeds"]
    return (f"{results['dataset']} ({results['params_file']}), {len(seeds)} training seed(s) "
            f"{', '.join(map(str, seeds))}, {results['n_queries']} test queries")


def _pm(spread: dict) -> str:
    """"mean ± std" over seeds of a stored `stats.spread`; the mean alone for one seed."""
    return stats.format_spread(spread["mean"], spread["std"], len(spread["values"]))


def arms_table(results: dict) -> str:
    """Markdown: each arm's T2V and V2T R@1, mean ± std over seeds, with each seed's value,
    and the effective rank of its EMCL correction β·R on the first block, per seed."""
    lines = ["| arm | run, scoring | T2V R@1 | V2T R@1 | T2V R@1 per seed | rank of β·R per seed |",
             "|---|---|---|---|---|---|"]
    for arm in results["arms"].values():
        each = ", ".join(f"{value:.1f}" for value in arm["t2v_R1"]["values"])
        ranks = [seed["rank"] for seed in arm["per_seed"].values() if seed["rank"] is not None]
        lines.append(f"| {arm['label']} | {arm['run']}, {arm['setting']} | {_pm(arm['t2v_R1'])} "
                     f"| {_pm(arm['v2t_R1'])} | {each} | {', '.join(map(str, ranks))} |")
    return "\n".join(lines)


def questions_table(results: dict) -> str:
    """Markdown: each question's T2V R@1 difference (mean ± std over seeds), its paired
    bootstrap interval and verdict."""
    confidence = f"{results['bootstrap']['confidence'] * 100:.0f} % CI"
    n_seeds = len(results["seeds"])
    over = "one seed" if n_seeds == 1 else "mean ± std over seeds"
    lines = [f"| question | Δ T2V R@1 ({over}) | {confidence} | verdict |",
             "|---|---|---|---|"]
    for q in results["questions"]:
        lines.append(f"| {q['question']} | {stats.format_spread(q['diff'], q['std'], n_seeds, signed=True)} | "
                     f"{q['low']:+.1f} to {q['high']:+.1f} | {q['verdict']} |")
    return "\n".join(lines)


def sentences(results: dict) -> list[str]:
    return [q["sentence"] for q in results["questions"]]


def readme_markdown(results: dict) -> str:
    """The README's ablation section: what the grid found, how it was made, in what time."""
    timing = results["timing"]
    trained = (f"{timing['train_seconds'] / 60:.0f} min of training over {timing['runs_timed']} runs"
               + (f" ({timing['runs'] - timing['runs_timed']} runs' times not recorded)"
                  if timing["runs_timed"] < timing["runs"] else ""))
    significant = [q["question"] for q in results["questions"] if q["significant"]]
    lines = [(f"Grid: {describe(results)}. Differences are T2V R@1 points, variant minus "
              f"baseline on the same seeds; the interval is a paired bootstrap over test queries "
              f"({results['bootstrap']['samples']} resamples, {results['bootstrap']['seeds_pooled']})."),
             "", questions_table(results), "",
             ("Significant on this task: " + "; ".join(significant) + ". Every other question: "
              "no significant effect." if significant else
              "No question shows a significant effect on this task."),
             *_seed_caveat(results),
             "", arms_table(results), "",
             (f"Made by `{results['command']}` on {results['machine']}: {trained} (the cores "
              f"shared with other jobs). Its latest invocation took {timing['invocation_seconds']:.0f} s: "
              f"a finished grid is only read back (checkpoints checked, cached scores).")]
    return "\n".join(lines)


def _seed_caveat(results: dict) -> list[str]:
    """The questions whose interval excludes 0 while their per-seed differences spread at
    least as far as their mean: the interval covers the test queries, not the training seed."""
    spread = [q["question"] for q in results["questions"] if q["significant"] and q["std"] >= abs(q["diff"])]
    if not spread:
        return []
    return ["", "The interval covers the choice of test queries for the trained models, not the "
                "training seed (the ± is the seed-to-seed spread of the difference). Significant, but "
                "with a seed spread at least as large as the difference, so more seeds are needed before "
                "reading it as an effect of the setting: " + "; ".join(spread) + "."]


# ---------------------------------------------------------------------------------------
# The demo run: re-scoring only (one seed)
# ---------------------------------------------------------------------------------------

def rescore_run(params: Params, grid: dict = SCORING_GRID) -> dict:
    """The re-scoring questions on one trained run (the demo's), summarised like the grid
    (one seed: the intervals are over test queries only). Trains the run if it has no
    checkpoint (train.ensure_trained); writes out_dir/ablations.json and ablations.md."""
    arms = {params.run: ("as trained", params.run, None, {}), **rescoring_arms(params, grid, run=params.run)}
    settings = {setting_key(mode, extra): (mode, extra) for _, _, mode, extra in arms.values()}
    scored = score_checkpoint(ensure_trained(params), params, settings)
    scores = {(params.seed, arm): scored[setting_key(mode, extra)] for arm, (_, _, mode, extra) in arms.items()}
    results = summarise(arms, rescoring_questions(arms, run=params.run), scores, (params.seed,))
    results.update(dataset=params.dataset, params_file=f"params/{params.dataset}.yaml")
    atomic_write_json(params.out_dir / "ablations.json", results)
    atomic_write_text(params.out_dir / "ablations.md",
                      arms_table(results) + "\n\n" + questions_table(results) + "\n")
    return results
