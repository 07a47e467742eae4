"""Training engine: `train_step` (one update), `train_one_epoch` (one pass over the loader)
and `fit`, which orchestrates them: device, model, resume, DDP, validation and model
selection, checkpoints.

`fit(params, train_set)` trains in-process (a notebook calls it directly) and under
`torchrun` (one process per GPU, or gloo processes on CPU). Only rank 0 writes files.
Over 300 lines: the step log and the resume checks stay beside the loop whose state they keep.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emcl_nb import distributed
from emcl_nb.checkpoint import read_checkpoint, save_checkpoint, set_rng_state
from emcl_nb.io import atomic_write_json, atomic_write_text, folder_lock, naming_full_disk, sweep_temp_files
from emcl_nb.optim import build_optimizer
from emcl_nb.params import RESUME_FIELDS, SYNTHETIC_FIELDS, Params, repo_relative, save_params
from emcl_nb.progress import note, progress_bar
from emcl_nb.runtime import autocast, autocast_dtype, configure_torch, seed_everything, to_device

# What training writes in the run folder besides checkpoints/ (evaluation writes there too).
TRAINING_FILES = ("params.yaml", "history.json", "log.jsonl", "reference.json")

# Validation T2V and V2T R@1 further apart than this (points) suggest a collapsed model.
COLLAPSE_GAP = 25.0

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class TrainingSetupError(ValueError):
    """A configuration that cannot train, detected before any work starts."""


@dataclass
class FitResult:
    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: list = field(default_factory=list)     # one dict per epoch
    log_path: Path | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The EMCLNet inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)           # torch.compile
    return model.module if isinstance(model, DistributedDataParallel) else model


def _set_epoch(loader, epoch: int) -> None:
    """Reshuffle the sampler and re-seed the augmentation for this epoch."""
    for owner in (loader.sampler, loader.dataset, getattr(loader, "batch_sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)


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


class StepLog:
    """Per-step losses kept on the device and written in one host sync every `every` steps,
    as JSON lines (step, epoch, loss, learning rates, clips/s)."""

    def __init__(self, path: Path | None, every: int, clips_per_step: int,
                 on_log: Callable[[list], None] | None):
        self.path, self.every, self.clips_per_step, self.on_log = path, max(1, every), clips_per_step, on_log
        self.pending: list[tuple[int, int, torch.Tensor, dict]] = []
        self.last_flush = time.perf_counter()
        self.last_record: dict | None = None

    def add(self, step: int, epoch: int, loss: torch.Tensor, lrs: dict) -> None:
        self.pending.append((step, epoch, loss.detach(), lrs))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss for _, _, loss, _ in self.pending]).float().cpu().tolist()
        now = time.perf_counter()
        rate = self.clips_per_step * len(self.pending) / max(now - self.last_flush, 1e-9)
        records = [{"step": step, "epoch": epoch, "loss": loss, **lrs, "clips_per_s": rate}
                   for (step, epoch, _, lrs), loss in zip(self.pending, losses)]
        self.pending, self.last_flush = [], now
        for record in records:
            if not math.isfinite(record["loss"]):
                raise NonFiniteLossError(
                    f"the loss became {record['loss']} at step {record['step']} "
                    f"(epoch {record['epoch'] + 1}); training stopped and the last good "
                    f"checkpoint is kept. Lower lr, check the data, or set precision=fp32.")
        self.last_record = records[-1]
        if self.path is not None:
            with naming_full_disk(self.path), open(self.path, "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
        if self.on_log is not None:
            self.on_log(records)


def _truncate_log(path: Path, steps_done: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (steps are numbered from 0).
    A torn last line (the run was killed while appending it) is dropped with a note."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise TrainingSetupError(
                    f"{path} line {number} is not JSON ({error}); it is only the step log: "
                    f"delete that line (or the file) and resume") from error
            note(f"dropped the torn last line {number} of {path} (the run stopped while writing it)")
            continue
        if record["step"] < steps_done:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


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
            f"nor used for these. Use another run name (run=...), or delete its run folder "
            f"(or train with --no-resume) to start over.")


def _reference_step(reference, model, params: Params, selection: dict, path: Path,
                    epoch: int, step: int) -> None:
    """One evaluation of the reference's selection; saves the model to `path` when it is the
    best so far (ties go to the later step, as the reference's `best_score <= R1`)."""
    model.eval()
    r1 = reference(unwrap(model))["t2v"]["R1"]
    model.train()
    record = {"step": step, "epoch": epoch + 1, "t2v_R1": r1}
    selection["evaluations"].append(record)
    if selection["best"] is None or r1 >= selection["best"]["t2v_R1"]:
        selection["best"] = record
        save_checkpoint(path, model=unwrap(model), epoch=epoch, step=step,
                        params=params.to_dict(), metrics={"reference": record})


def _promote_reference(pending: Path, reference: Path, saved_step: int) -> None:
    """Make the selection's pending best reference.pt once last.pt (at `saved_step`) has
    saved the epoch it came from; drop it when it came from an epoch that was not saved."""
    if not pending.exists():
        return
    if read_checkpoint(pending, mmap=True)["step"] <= saved_step:
        os.replace(pending, reference)
    else:
        pending.unlink()


def train_step(model: nn.Module, batch: dict, optimizer, scheduler, scaler, *,
               dtype: torch.dtype | None, grad_clip: float) -> torch.Tensor:
    """One update on a batch already on the model's device: the loss under autocast,
    backward through the loss scaler, unscale, clip the global gradient norm, optimiser and
    schedule steps, clamp logit_scale. Returns the loss (on the device: no host sync)."""
    with autocast(unwrap(model).device, dtype):
        loss = model(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:                                                # 0: no clipping, as BertAdam reads it
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)   # frozen ones have no gradient
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    unwrap(model).clamp_logit_scale()
    return loss


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, step_log: StepLog, *,
                    epoch: int, step: int, dtype: torch.dtype | None, grad_clip: float,
                    world_size: int = 1, after_step: Callable[[int, int], None] | None = None,
                    progress: bool = True, desc: str = "") -> tuple[int, int]:
    """One pass over `loader` from global step `step`: `train_step` on each batch, its loss
    and learning rates into `step_log`, then `after_step(epoch, step)`.
    Returns (the global step after the pass, training samples skipped as unreadable)."""
    device = unwrap(model).device
    model.train()
    _set_epoch(loader, epoch)
    step_log.last_flush = time.perf_counter()
    bar = progress_bar(loader, desc=desc, leave=False, disable=not progress)
    skipped = 0
    for batch in bar:
        skipped += len(batch["skipped"])
        if len(batch["skipped"]) and world_size > 1:
            raise RuntimeError(
                "a clip failed to decode during multi-process training (the warning above "
                "names the file): ranks need equal batches. Fix or remove the file.")
        lrs = {f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}  # this step's
        loss = train_step(model, to_device(batch, device), optimizer, scheduler, scaler,
                          dtype=dtype, grad_clip=grad_clip)
        step_log.add(step, epoch, loss, lrs)
        step += 1
        if after_step is not None:
            after_step(epoch, step)
        if not step_log.pending and progress:     # just flushed: shows the logged value
            bar.set_postfix(loss=f"{step_log.last_record['loss']:.4f}")
    step_log.flush()
    return step, skipped


def fit(params: Params, train_set, *, validate: Callable[[nn.Module], dict] | None = None,
        reference: Callable[[nn.Module], dict] | None = None, resume: bool = True,
        on_log: Callable[[list], None] | None = None,
        on_epoch_end: Callable[[dict], None] | None = None) -> FitResult:
    """Train `params.epochs` epochs on `train_set` (a dataset of batch dicts).

    `validate(model) -> {"val": {"t2v": {"R1": ...}, ...}}` runs after each epoch on rank 0;
    the best epoch by validation (never test) text-to-video R@1 is kept as `best.pt`,
    written before `last.pt` so that every resume point has its best.
    `reference(model) -> metrics` of params.reference_split, with params.reference_selection:
    the reference's selection, run on rank 0 after update 1 and every
    params.reference_interval updates; the best (ties: the later) is kept as `reference.pt`
    and the scores in `reference.json`. With `resume`, an existing `last.pt` is continued.
    Rank 0 holds the run folder's lock throughout: a second run into it fails at once.
    """
    env = distributed.env_from_torchrun()
    check_setup(params, len(train_set), env.world_size)
    with folder_lock(params.out_dir) if env.is_main else contextlib.nullcontext():
        return _fit(params, train_set, env, validate, reference, resume, on_log, on_epoch_end)


@dataclass
class _RunState:
    """What a run carries from epoch to epoch (and from a checkpoint when it resumes)."""
    epoch: int = 0                   # completed epochs
    step: int = 0
    history: list = field(default_factory=list)
    best_score: float = -math.inf   # best validation T2V R@1 so far
    selection: dict = field(default_factory=dict)   # the reference selection's record

    def metrics(self) -> dict:
        return {"history": self.history, "best_score": self.best_score, "reference": self.selection}


def _resume(params: Params, state: dict, path: Path, model, optimizer, scheduler, scaler,
            run: _RunState) -> _RunState:
    """Load a `last.pt` state into the training objects; the run state it saved."""
    check_resumable(params, state["params"], path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    metrics = state["metrics"]
    return _RunState(epoch=state["epoch"], step=state["step"], history=metrics.get("history", []),
                     best_score=metrics.get("best_score", -math.inf),
                     selection=metrics.get("reference", run.selection))


def _fit(params: Params, train_set, env, validate, reference, resume, on_log,
         on_epoch_end) -> FitResult:
    """`fit` once the run folder is locked."""
    from emcl_nb.data.dataset import build_loader
    from emcl_nb.model import build_model

    device = distributed.resolve_device(params.device, env)
    distributed.init_distributed(device, env)
    configure_torch(params)

    out_dir = params.out_dir
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path, log_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt", out_dir / "log.jsonl"
    # The reference selection's best of an epoch waits in reference.pending.pt until last.pt
    # has saved the epoch: reference.pt never holds a model of an epoch a resume redoes.
    reference_path, pending_reference = ckpt_dir / "reference.pt", ckpt_dir / "reference.pending.pt"
    reference_every = params.reference_interval if params.reference_selection else 0
    if env.is_main:
        for stale in sweep_temp_files(out_dir, TRAINING_FILES) + sweep_temp_files(ckpt_dir):
            print(f"[emcl_nb] removed {repo_relative(stale)}, left by a write that was killed")

    seed_everything(params.seed)
    model = build_model(params).to(device)
    loader = build_loader(train_set, params, train=True, rank=env.rank, world_size=env.world_size)
    total_steps = len(loader) * params.epochs
    optimizer, scheduler = build_optimizer(model, params, total_steps)
    dtype = autocast_dtype(device, params.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    run = _RunState(selection={"split": params.reference_split, "every": reference_every,
                               "evaluations": [], "best": None})
    if resume and last_path.exists():
        run = _resume(params, read_checkpoint(last_path), last_path, model, optimizer, scheduler,
                      scaler, run)
        if env.is_main:
            _promote_reference(pending_reference, reference_path, run.step)
            _truncate_log(log_path, run.step)
            atomic_write_json(out_dir / "history.json", run.history)   # killed before it was written
            if run.epoch >= params.epochs:
                print(f"[emcl_nb] run {params.run} is complete: {run.epoch}/{params.epochs} epochs; "
                      f"delete {repo_relative(out_dir)} (or train with --no-resume) to retrain")
            else:
                print(f"[emcl_nb] resuming {repo_relative(last_path)} after epoch {run.epoch} "
                      f"(step {run.step} of {total_steps})")
    elif env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (log_path, reference_path, pending_reference, out_dir / "reference.json"):  # of an earlier run
            stale.unlink(missing_ok=True)
        save_params(params, out_dir / "params.yaml")

    if env.world_size > 1:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if params.compile:
        model = torch.compile(model)
    step_log = StepLog(log_path if env.is_main else None, params.log_every,
                       params.batch_size, on_log if env.is_main else None)
    first_step, started = run.step + 1, time.perf_counter()

    def after_step(epoch: int, step: int) -> None:
        if params.compile and step == first_step and env.is_main:
            print(f"[emcl_nb] compile=true: the first step took {time.perf_counter() - started:.1f} s "
                  f"(torch.compile compiling the forward and backward, and the loader's first batch)")
        select(epoch, step)

    def select(epoch: int, step: int) -> None:
        """The reference's step-wise selection, after update 1 and every reference_every."""
        if reference_every and (step == 1 or step % reference_every == 0):
            if reference is not None and env.is_main:
                _reference_step(reference, model, params, run.selection, pending_reference, epoch, step)
            distributed.barrier()

    collapse_warned = False
    for epoch in range(run.epoch, params.epochs):
        run.step, skipped = train_one_epoch(
            model, loader, optimizer, scheduler, scaler, step_log, epoch=epoch, step=run.step,
            dtype=dtype, grad_clip=params.grad_clip, world_size=env.world_size, after_step=after_step,
            progress=params.progress and env.is_main, desc=f"epoch {epoch + 1}/{params.epochs}")
        last_loss = step_log.last_record["loss"]

        record = {"epoch": epoch + 1, "step": run.step, "loss": last_loss, "skipped_samples": skipped}
        if validate is not None and env.is_main:
            model.eval()
            record.update(validate(unwrap(model)))
            signs = collapse_signs(record["val"]) if "val" in record else None
            if signs and not collapse_warned:
                warnings.warn(f"epoch {epoch + 1}: {signs}. Check lr (a negative or too large "
                              f"one), the data and the loss curve.", stacklevel=2)
                collapse_warned = True
        # ties go to the later epoch, as in the reference (`best_score <= R1`)
        improved = "val" in record and record["val"]["t2v"]["R1"] >= run.best_score
        if improved:
            run.best_score = record["val"]["t2v"]["R1"]
        run.history.append(record)
        if env.is_main:
            # best first: a run killed in between resumes before this epoch and redoes it
            if improved:
                save_checkpoint(best_path, model=unwrap(model), epoch=epoch + 1, step=run.step,
                                params=params.to_dict(), metrics=run.metrics())
            save_checkpoint(last_path, model=unwrap(model), optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler, epoch=epoch + 1, step=run.step,
                            params=params.to_dict(), metrics=run.metrics())
            _promote_reference(pending_reference, reference_path, run.step)
            atomic_write_json(out_dir / "history.json", run.history)
            if reference_every:
                atomic_write_json(out_dir / "reference.json", run.selection)
            print(f"[emcl_nb] epoch {epoch + 1}/{params.epochs}: loss {last_loss:.4f}"
                  + (f", val t2v R@1 {record['val']['t2v']['R1']:.1f}" if "val" in record else ""))
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(record)

    return FitResult(out_dir=out_dir, last_checkpoint=last_path,
                     best_checkpoint=best_path if best_path.exists() else None,
                     history=run.history, log_path=log_path)
