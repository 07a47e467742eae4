"""Evaluating a run: its checkpoints scored on a split, and the report.

`evaluate_run` loads each checkpoint (`load_for_evaluation`), encodes the split through the
feature cache (emcl_nb.evaluation.encode), scores it (emcl_nb.evaluation.scoring) and writes
`out_dir/metrics.json` and `out_dir/metrics.md` beside the published numbers; the command
line is `python -m emcl_nb.evaluate`. `load_split` is what the evaluation, ablation and EM
notebooks start from.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from emcl_nb.data.annotations import NO_CAPTIONS
from emcl_nb.data.identity import data_differences, data_identity
from emcl_nb.evaluation.encode import Features, load_or_encode
from emcl_nb.evaluation.scoring import evaluate_model
from emcl_nb.io import atomic_write_json, atomic_write_text
from emcl_nb.model.metrics import QBNORM, TIE_RULE, format_table
from emcl_nb.params import MODEL_FIELDS, REPO_ROOT, REUSE_FIELDS, SYNTHETIC_FIELDS, Params, repo_relative
from emcl_nb.progress import Stopwatch, note, timed
from emcl_nb.training.build import build_model
from emcl_nb.training.checkpoint import (
    FORMAT,
    CheckpointError,
    LoadReport,
    clip_from_weights,
    load_model_weights,
    model_weights,
    read_checkpoint,
)
from emcl_nb.training.checks import OtherDataError
from emcl_nb.training.distributed import DistEnv, resolve_device
from emcl_nb.training.runtime import configure_torch

REFERENCE_PROTOCOL = "reference protocol"
# The recipe a run was trained with (REUSE_FIELDS), apart from the synthetic set's parameters,
# which are data: the run's data record checks those.
RECIPE_FIELDS = tuple(name for name in REUSE_FIELDS if name not in SYNTHETIC_FIELDS)


def trained_checkpoint(params: Params) -> Path:
    """The run's last checkpoint, for what evaluates a run (the evaluation CLI, notebooks 03,
    05, 06): evaluation never trains, so a run without one is an error saying how to train it."""
    last = params.out_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise CheckpointError(
            f"run {params.run!r} has no checkpoint ({repo_relative(last)}) and evaluation does not "
            f"train: train it first (notebook 02 with run={params.run!r}, or python -m emcl_nb.train "
            f"--params {params.dataset} --set run={params.run}), or name a trained run (run=...) "
            f"or a checkpoint file")
    return last


def recipe_differences(params: Params, trained: dict) -> str:
    """'name: trained -> now, ...' for the recipe settings `params` states otherwise than the
    run was trained with ('' when none): evaluation notes them and evaluates the weights as
    trained."""
    return ", ".join(f"{name}: {trained[name]!r} -> {getattr(params, name)!r}" for name in RECIPE_FIELDS
                     if name in trained and trained[name] != getattr(params, name))


def load_for_evaluation(path: str | Path, params: Params, device: torch.device):
    """(model, params, load report) for a checkpoint file. Our checkpoints carry their model
    config (older ones: their run's parameters): the model is built with its MODEL_FIELDS (a
    note says where they differ from `params`); a reference checkpoint is built from `params`
    as given. CLIP is built from the checkpoint's own `clip.*` weights, so the CLIP file the
    run was trained from is not needed; only a file without them reads params.clip_weights.
    With clip_dtype=fp16, CLIP is stored (and computes) in fp16 on CUDA as the reference's, in
    fp32 elsewhere."""
    path = Path(path)
    state = read_checkpoint(path)
    weights, layout = model_weights(state, str(path))
    clip_model = clip_from_weights(weights, str(path))
    trained = (state.get("model_config") or state.get("params")) if layout == FORMAT else None
    changes = {name: trained[name] for name in MODEL_FIELDS
               if trained and name in trained and trained[name] != getattr(params, name)}
    if clip_model is None:
        note(f"{path.name} holds no whole CLIP: it is read from clip_weights={params.clip_weights!r}")
        changes.pop("clip_weights", None)          # a file is needed: the one given now wins
    for name, value in changes.items():
        if name != "clip_weights":                 # CLIP itself comes from the checkpoint
            note(f"{path.name} was trained with {name}={value!r}; using it "
                 f"(params say {getattr(params, name)!r})")
    if params.clip_dtype == "fp16" and device.type != "cuda":
        # an fp16 CLIP computes in fp16, which CPUs without fp16 units do many times slower
        note(f"clip_dtype=fp16: on the {device.type} CLIP computes in fp32 from the same (fp16) weights; "
             f"on CUDA in fp16, as the reference")
        changes["clip_dtype"] = "fp32"
    differences = recipe_differences(params, state.get("params") or {}) if layout == FORMAT else ""
    if differences:
        note(f"{path.name} was trained with other settings than the parameters given now ({differences}); "
             f"it is evaluated as trained")
    params = params.replace(**changes)
    model = build_model(params, clip_model)
    report = load_model_weights(model, state, source=str(path))
    return model.to(device).eval(), params, report


class LoadedSplit(NamedTuple):
    """A checkpoint ready to score one split: the model, the parameters it was built with,
    its load report and the split's features (from the feature cache)."""
    model: torch.nn.Module
    params: Params
    report: object
    features: Features


def load_split(path: str | Path, params: Params, split: str = "test") -> LoadedSplit:
    """Load a checkpoint on params.device and encode `split` through the feature cache (what
    the evaluation, ablation and attention notebooks start from)."""
    device = resolve_device(params.device, DistEnv())
    model, run_params, report = load_for_evaluation(path, params, device)
    return LoadedSplit(model, run_params, report, load_or_encode(model, run_params, split, device))


def reference_protocol_label(out_dir: Path) -> str | None:
    """The row label of the run's reference-protocol checkpoint (checkpoints/reference.pt),
    naming the split and step it was selected on; None when the run has none."""
    path = out_dir / "reference.json"
    if not (out_dir / "checkpoints" / "reference.pt").is_file() or not path.is_file():
        return None
    selection = json.loads(path.read_text())
    return (f"{REFERENCE_PROTOCOL} (selected on {selection['split']} every {selection['every']} "
            f"steps: step {selection['best']['step']})")


def qbnorm_label(bank: dict) -> str:
    """The QB-Norm row's label, naming its bank: size and split, and beta."""
    return f"QB-Norm ({bank['bank']} {bank['split']} queries, β {bank['beta']:g})"


def _table_rows(results: dict, split: str) -> dict:
    """{row label: {"t2v", "v2t"}} with a DSL row (naming the `split` whose query bank it
    uses) after each plain row that has one, then its QB-Norm row (text-to-video only)."""
    rows = {}
    for label, result in results.items():
        rows[label] = {"t2v": result["t2v"], "v2t": result["v2t"]}
        if "dsl_t2v" in result:
            rows[f"{label} + DSL (whole {split} query bank)"] = {"t2v": result["dsl_t2v"],
                                                             "v2t": result["dsl_v2t"]}
        if "qbnorm_t2v" in result:
            rows[f"{label} + {qbnorm_label(result['qbnorm'])}"] = {"t2v": result["qbnorm_t2v"]}
    return rows


def dropped_statement(result: dict, split: str) -> str:
    """How many of the split's queries (texts) were scored, and why the others were not.
    Listed videos without captions are counted apart: they are videos, not queries."""
    dropped = dict(result.get("dropped_queries") or {})
    uncaptioned = dropped.pop(NO_CAPTIONS, 0)
    total = result["n_texts"] + sum(dropped.values())
    if not dropped:
        statement = f"all {total} {split} queries scored, none dropped"
    else:
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        statement = (f"{result['n_texts']} of {total} {split} queries scored; {sum(dropped.values())} "
                     f"dropped ({reasons}; see the warnings of the run for the ids)")
    if uncaptioned:
        statement += f"; {uncaptioned} listed video(s) without captions left out"
    return statement


def _report_markdown(params: Params, split: str, results: dict, table: str) -> str:
    first = next(iter(results.values()))
    lines = [f"# {params.dataset} / {params.run}: {split} split", "", table, "",
             f"- {first['n_texts']} texts, {first['n_videos']} videos ({first['protocol']}); "
             f"chance R@1 = {first['chance_R1']:.2f} %.",
             f"- {dropped_statement(first, split)}",
             f"- {TIE_RULE}.",
             f"- '+ DSL' rows: dsl (uses the whole {split} query bank, transductive); reported beside "
             f"the plain numbers, never instead of them."]
    bank = first.get("qbnorm")
    if bank:
        lines.append(f"- '+ QB-Norm' rows: {QBNORM}, text-to-video only; the bank: {bank['bank']} "
                     f"of the {bank['available']} {bank['split']} captions (drawn with seed {params.seed}), "
                     f"scored against the {split} videos as the {split} queries are; β {bank['beta']:g}. "
                     f"Not transductive: no {split} query normalises another.")
    if any(label.startswith(REFERENCE_PROTOCOL) for label in results):
        lines.append(f"- '{REFERENCE_PROTOCOL}': the checkpoint the reference code keeps (best "
                     "T2V R@1 at step 1 and every 3 * n_display steps); selected on test for "
                     "MSR-VTT, ActivityNet and DiDeMo, so optimistic: only for comparing with the paper.")
    for label, result in results.items():
        lines += [f"- {label}: {text}" for text in result.get("notes", [])]
        if "n_texts" in result and result.get("dropped_queries") != first.get("dropped_queries"):
            lines.append(f"- {label}: {dropped_statement(result, split)}")
    return "\n".join(lines) + "\n"


def check_evaluation_data(report: LoadReport, params: Params) -> None:
    """A run's checkpoint is scored on the data it was trained on: other data (its recorded
    data identity differs) are an OtherDataError naming what changed, or with
    params.allow_other_data a warning. A checkpoint that records none gets a note."""
    if report.data is None:
        note(f"{report.source} does not record the identity of its data (an earlier version wrote it): "
             f"it cannot be checked that these are the data it was trained on")
        return
    differences = data_differences(report.data, data_identity(params))
    if not differences:
        return
    changed = f"{'; '.join(differences)} changed since"
    if not params.allow_other_data:
        raise OtherDataError(
            f"{report.source} was trained on other data than params point at: {changed}. Its scores "
            f"would not be this run's. Point anno_path / video_path (or the synthetic_* settings) at "
            f"the data it was trained on (a synthetic set is regenerated by training), or set "
            f"allow_other_data=true to score it on these data.")
    warnings.warn(f"allow_other_data=true: {report.source} is scored on other data than it was "
                  f"trained on ({changed})", stacklevel=2)


def _why_no_best(params: Params) -> str:
    """Why the run has no best.pt, from its last.pt's history: the run validated (the file was
    deleted or moved), or no epoch was validated."""
    last = params.out_dir / "checkpoints" / "last.pt"
    history = read_checkpoint(last, mmap=True)["metrics"].get("history", []) if last.is_file() else []
    validated = [record["epoch"] for record in history if "val" in record]
    if validated:
        return (f"the run validated epochs {', '.join(map(str, validated))}, so the file was deleted or "
                f"moved; restore it, or train again")
    if history:
        return "the run validated no epoch (no validation split, or eval_every_epoch=false)"
    return "no validation split selected a best epoch"


def _checkpoint_path(entry: str | Path, params: Params) -> Path:
    """out_dir/checkpoints/<entry>.pt for "best" / "last" / "reference"; otherwise the path
    given, a relative one taken from the repository root (as params paths are)."""
    if entry in ("best", "last", "reference"):
        return params.out_dir / "checkpoints" / f"{entry}.pt"
    path = Path(entry).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def evaluate_run(params: Params, checkpoints=("best", "last"), *, split: str = "test",
                 emcl_mode: str | None = None, name: str = "metrics", cache: bool = True,
                 **overrides) -> dict:
    """Evaluate a run's checkpoints on `split` and write out_dir/<name>.json and .md.

    `checkpoints`: "best" / "last" (out_dir/checkpoints/<name>.pt; a missing best.pt is
    skipped) or paths (ours or reference-code files; relative ones from the repository
    root). The first row is the headline: best on validation where a validation split
    exists, else the last epoch. When the run kept a reference-protocol checkpoint
    (params.reference_selection), it is scored too, as the labelled row
    "reference protocol (selected on <split> every <n> steps: step <s>)", key
    "reference_protocol", but only when every checkpoint asked for is this run's own
    (out_dir/checkpoints): the row describes this run. `overrides`: SCORING_FIELDS, see `score`.
    """
    if "last" in checkpoints:
        trained_checkpoint(params)
    stopwatch = Stopwatch()
    with stopwatch.running():
        results, rows = _score_checkpoints(params, checkpoints, split, emcl_mode=emcl_mode, cache=cache,
                                           **overrides)
        published = params.published if split == "test" else {}
        table = format_table(_table_rows(rows, split), published)
        summary = {"dataset": params.dataset, "run": params.run, "split": split,
                   "emcl_mode": emcl_mode or "trained setting", "overrides": overrides,
                   "results": results, "published": published, "table": table}
        with timed("write"):
            atomic_write_json(params.out_dir / f"{name}.json", summary)
            atomic_write_text(params.out_dir / f"{name}.md", _report_markdown(params, split, rows, table))
    print(stopwatch.summary("evaluation"))
    return summary


def _score_checkpoints(params: Params, checkpoints, split: str, **scoring) -> tuple[dict, dict]:
    """(results by key, results by table label) of evaluate_run's checkpoints, the run's
    reference-protocol checkpoint added when every one asked for is the run's own."""
    configure_torch(params)
    device = resolve_device(params.device, DistEnv())
    results, rows = {}, {}
    own_folder = (params.out_dir / "checkpoints").resolve()
    foreign = [str(path) for path in (_checkpoint_path(entry, params) for entry in checkpoints)
               if path.resolve().parent != own_folder]
    reference_label = reference_protocol_label(params.out_dir)
    if reference_label is not None and foreign:
        note(f"no '{REFERENCE_PROTOCOL}' row: it belongs to run {params.run!r}, and "
             f"{', '.join(foreign)} is not one of that run's checkpoints")
    elif reference_label is not None:
        checkpoints = (*checkpoints, "reference")
    for entry in checkpoints:
        path = _checkpoint_path(entry, params)
        if entry == "best" and not path.is_file():
            note(f"no {path} ({_why_no_best(params)}); evaluating last only")
            continue
        with timed("load checkpoints"):
            model, run_params, report = load_for_evaluation(path, params, device)
        if path.resolve().parent == own_folder:
            check_evaluation_data(report, params)
        result = evaluate_model(model, run_params, split, device=device, qbnorm=True, **scoring)
        result.update(checkpoint=str(path), epoch=report.epoch, layout=report.layout,
                      recreated_emcl_bases=report.recreated)
        if entry == "reference":
            results["reference_protocol"], rows[reference_label] = result, result
            continue
        key = entry if entry in ("best", "last") else path.name
        label = {"best": "best on val", "last": "last"}.get(entry, path.name)
        results[key] = result
        rows[label + (f" (epoch {report.epoch})" if report.epoch is not None else "")] = result
    if not results:
        raise CheckpointError(f"no checkpoint to evaluate among {list(checkpoints)}")
    return results, rows
