"""The paper's ablations as one grid (notebook 04).

Settings that only change the scoring (number of bases, EM iterations, λ, β, block size,
the basis initialisation) re-score the cached test features of the run's trained model.
Settings that change training (the baselines, the non-collapsing bases, momentum) train
their own run beside it (`<run>-<name>`; a finished run is reused if it was trained on the
same data with the same recipe, train.ensure_trained), at `ablation_epochs` each, with
EMCL-Net itself trained at the same budget. EMCL as an inference-only module is scored on
each model trained without EMCL. `baseline_table` compares, on the same data and budget,
CLIP4Clip meanP, meanP + EMCL at inference (the EMCL block of the reference inference module), text pooling
without EMCL, and EMCL-Net.
"""
from __future__ import annotations

from emcl_nb.attention import em_block
from emcl_nb.emcl import effective_rank
from emcl_nb.evaluate import load_split
from emcl_nb.io import atomic_write_json, atomic_write_text
from emcl_nb.params import Params
from emcl_nb.scoring import evaluate_features, scoring_setup

# Re-scoring only: each value is scored on the same cached features.
SCORING_GRID = {
    "emcl_bases": (1, 4, 16, 32, 64),
    "emcl_stages": (1, 3, 9, 15),
    "emcl_lamd": (0.1, 1.0, 10.0),
    "emcl_beta": (0.0, 1.0, 3.0, 6.0),
    "block_size": (8, 32, 128),
    "emcl_init": ("reference", "distinct"),
}
# Trained variants: run-name suffix -> (label, parameter changes).
REFERENCE_VARIANT = {"reference": ("EMCL-Net (the reference recipe)", {})}
TRAINED_VARIANTS = {
    "meanp": ("CLIP4Clip meanP (mean pooling, no temporal module, no EMCL)",
              {"pooling": "mean", "agg_module": "None", "emcl": "off"}),
    "emcl-off": ("text pooling, no EMCL", {"emcl": "off"}),
    "distinct": ("EMCL, distinct (non-collapsing) bases", {"emcl_init": "distinct"}),
    "momentum-0.5": ("EMCL, momentum 0.5", {"emcl_momentum": 0.5}),
}


def _row(kind: str, setting: str, value, measured: tuple[dict, int | None]) -> dict:
    metrics, rank = measured
    return {"kind": kind, "setting": setting, "value": value,
            "t2v_R1": metrics["t2v"]["R1"], "t2v_R5": metrics["t2v"]["R5"],
            "t2v_MnR": metrics["t2v"]["MnR"], "v2t_R1": metrics["v2t"]["R1"], "rank": rank}


def correction_rank(features, model, scoring) -> int | None:
    """Effective rank of the EMCL correction β·R actually added on the first evaluation block
    (0 when β = 0; None without EMCL)."""
    if scoring.emcl_module is None:
        return None
    first = range(min(scoring.block_size, features.n_texts, features.n_videos))
    block = em_block(model, features, first, first, scoring=scoring)
    return int(effective_rank(block.beta * block.recon))


def measure(features, model, params: Params, emcl_mode: str | None = None,
            **overrides) -> tuple[dict, int | None]:
    """(metrics, rank of the EMCL correction) of one scoring setting, set up once."""
    scoring = scoring_setup(model.eval(), params, emcl_mode, **overrides)
    metrics = evaluate_features(features, params, model, scoring=scoring, **overrides)
    return metrics, correction_rank(features, model, scoring)


def _load_run(params: Params):
    """Train `params`' run if it has no checkpoint; (model, run params, test features) of its
    last checkpoint."""
    from emcl_nb.train import ensure_trained
    model, run_params, _, features = load_split(ensure_trained(params), params, "test")
    return model, run_params, features


def scoring_ablations(params: Params, grid: dict = SCORING_GRID) -> list[dict]:
    """Re-score the run's trained model on its cached test features for every grid value."""
    model, run_params, features = _load_run(params)
    rows = [_row("trained", "EMCL (trained setting)", run_params.emcl,
                 measure(features, model, run_params)),
            _row("trained", "EMCL switched off at test", "off",
                 measure(features, model, run_params, "off"))]
    for setting, values in grid.items():
        for value in values:
            overrides = {setting: value}
            rows.append(_row("scoring", setting, value,
                             measure(features, model, run_params, "on", **overrides)))
    return rows


# The rows of `baseline_table`, in order (values of the trained rows).
BASELINES = ("meanp", "meanp+inference", "emcl-off", "reference")


def trained_ablations(params: Params, variants: dict = TRAINED_VARIANTS) -> list[dict]:
    """Train each variant as its own run (`ablation_epochs` each) and score its test split.
    EMCL-Net (the reference recipe) comes first, at the same budget: the main run when the
    budgets agree, else its own run. Each model trained without EMCL is also scored with
    EMCL as an inference-only module (docs/method.md §7): with mean pooling that is the reference
    inference module, with text pooling our extension (row value "<suffix>+inference").
    Only the last checkpoints are scored, so the variants' own runs skip the reference
    selection."""
    epochs = params.ablation_epochs or params.epochs
    rows = []
    for suffix, (label, changes) in {**REFERENCE_VARIANT, **variants}.items():
        own_run = changes or epochs != params.epochs
        variant = (params.replace(run=f"{params.run}-{suffix}", epochs=epochs,
                                  reference_selection=False, **changes)
                   if own_run else params)           # the main run, trained as notebook 02 trains it
        model, run_params, features = _load_run(variant)
        rows.append(_row("trained", f"{label} ({epochs} epochs)", suffix,
                         measure(features, model, run_params)))
        if run_params.emcl == "off":
            pooled = ("meanP + EMCL at inference (the reference inference module's EMCL block)"
                      if run_params.pooling == "mean" else
                      "text pooling + EMCL at inference (A·V rows per block, our extension)")
            rows.append(_row("trained", f"{pooled} ({epochs} epochs)", f"{suffix}+inference",
                             measure(features, model, run_params, "inference")))
    return rows


def baseline_table(rows: list[dict]) -> str:
    """The baselines on the same data and budget (notebook 04): CLIP4Clip meanP, meanP +
    EMCL at inference, text pooling without EMCL, EMCL-Net; from `trained_ablations` rows."""
    by_value = {row["value"]: row for row in rows if row["kind"] == "trained"}
    return ablation_table([by_value[value] for value in BASELINES if value in by_value])


def ablation_table(rows: list[dict]) -> str:
    """Markdown table of the rows (effective rank of the EMCL correction in the last column)."""
    lines = ["| setting | value | T2V R@1 | T2V R@5 | T2V MnR | V2T R@1 | rank of β·R |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        rank = "" if row["rank"] is None else str(row["rank"])
        lines.append(f"| {row['setting']} | {row['value']} | {row['t2v_R1']:.1f} | {row['t2v_R5']:.1f} "
                     f"| {row['t2v_MnR']:.1f} | {row['v2t_R1']:.1f} | {rank} |")
    return "\n".join(lines)


def run_ablations(params: Params, *, grid: dict = SCORING_GRID,
                  variants: dict = TRAINED_VARIANTS) -> list[dict]:
    """Both parts of the grid; writes out_dir/ablations.json and ablations.md."""
    rows = scoring_ablations(params, grid) + trained_ablations(params, variants)
    atomic_write_json(params.out_dir / "ablations.json", rows)
    atomic_write_text(params.out_dir / "ablations.md", ablation_table(rows) + "\n")
    return rows
