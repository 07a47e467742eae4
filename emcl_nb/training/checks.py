"""Checks of a training run: the set-ups refused before any work starts (a batch that does not
fit, a run folder trained with other parameters or on other data) and the signs of a
collapsed model, or of one still at chance, that training warns about."""
from __future__ import annotations

import math
from pathlib import Path

from emcl_nb.data.identity import data_differences
from emcl_nb.params import RESUME_FIELDS, SYNTHETIC_FIELDS, Params

# Validation T2V and V2T R@1 further apart than this (points) suggest a collapsed model.
COLLAPSE_GAP = 25.0
# A run still at chance after this many epochs is warned about.
CHANCE_EPOCHS = 2


class TrainingSetupError(ValueError):
    """A configuration that cannot train, detected before any work starts."""


def check_setup(params: Params, num_samples: int, world_size: int) -> None:
    if params.batch_size % world_size:
        raise TrainingSetupError(
            f"batch_size={params.batch_size} is not divisible by the number of processes "
            f"({world_size}); set batch_size to a multiple of {world_size}")
    if num_samples < params.batch_size:
        raise TrainingSetupError(
            f"the training set has {num_samples} samples, fewer than one batch "
            f"(batch_size={params.batch_size}); lower batch_size or add data")
    if params.epochs < 1:
        raise TrainingSetupError(f"epochs={params.epochs} must be at least 1")


def check_resumable(params: Params, saved: dict, path: Path, fields=RESUME_FIELDS) -> None:
    """A TrainingSetupError naming every one of `fields` that `params` changes from the
    `saved` parameters of the run at `path` (synthetic_* fields only for synthetic data).
    A field the run did not record (it was trained by an earlier version, before the field
    existed) counts as changed: its recipe is not known to be this one."""
    unrecorded = "(not recorded)"
    changed = {key: (saved.get(key, unrecorded), getattr(params, key)) for key in fields
               if saved.get(key, unrecorded) != getattr(params, key)
               and (params.synthetic or key not in SYNTHETIC_FIELDS)}
    if changed:
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise TrainingSetupError(
            f"{path} was trained with other parameters ({listed}); it can neither be continued "
            f"nor used for these. Use another run name (run=...), or train with --no-resume "
            f"to start over in this folder.")


class OtherDataError(TrainingSetupError):
    """A run resumed (or evaluated) on other data than it was trained on."""


def check_same_data(recorded: dict | None, current: dict, path: Path) -> None:
    """An OtherDataError naming what changed when the data identity `recorded` in the
    checkpoint at `path` differs from the `current` one; a checkpoint of an earlier version
    (nothing recorded) passes with a note."""
    if recorded is None:
        print(f"[emcl_nb] note: {path} does not record the identity of its data (an earlier "
              f"version wrote it); it is not checked")
        return
    differences = data_differences(recorded, current)
    if differences:
        raise OtherDataError(
            f"{path} was trained on other data: {'; '.join(differences)} changed since. It cannot "
            f"continue on these data. Point anno_path / video_path (or the synthetic_* settings) back "
            f"at its data, or use another run name (run=...), or train with --no-resume.")


def collapse_signs(val: dict) -> str | None:
    """Why validation metrics (`evaluate_features` output) look like a collapsed model, or
    None: every text scores all videos alike, or T2V and V2T R@1 disagree wildly."""
    if val.get("constant_rows") and val["constant_rows"] == val.get("n_texts"):
        return "every validation text scores all videos alike (the embeddings have collapsed)"
    t2v, v2t = ((val.get(direction) or {}).get("R1") for direction in ("t2v", "v2t"))
    if t2v is not None and v2t is not None and abs(t2v - v2t) > COLLAPSE_GAP:
        return (f"validation T2V R@1 {t2v:.1f} and V2T R@1 {v2t:.1f} differ by more than "
                f"{COLLAPSE_GAP:g} points (one side of the model may have collapsed)")
    return None


def chance_signs(record: dict, batch_size: int) -> str | None:
    """Why an epoch's record (with "val") looks like a model that learned nothing, or None:
    after CHANCE_EPOCHS epochs, validation T2V R@1 within 3 standard errors of chance and
    the loss within 5 % of ln(batch_size), what InfoNCE gives when every pair scores alike."""
    val = record.get("val") or {}
    if record["epoch"] < CHANCE_EPOCHS or "chance_R1" not in val or not val.get("n_texts"):
        return None
    chance, r1, loss = val["chance_R1"], val["t2v"]["R1"], record["loss"]
    p = chance / 100
    bound = 100 * (p + 3 * math.sqrt(p * (1 - p) / val["n_texts"]))
    uniform = math.log(batch_size)
    if r1 > bound or abs(loss - uniform) > 0.05 * uniform:
        return None
    return (f"after {record['epoch']} epochs validation T2V R@1 is {r1:.1f} (chance {chance:.1f}, "
            f"within 3 standard errors: {bound:.1f}) and the loss {loss:.3f} is ln(batch_size) = "
            f"{uniform:.3f}: the model is still at chance")
