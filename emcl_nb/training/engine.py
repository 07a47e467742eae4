"""Training engine: `train_step` (one update), `train_one_epoch` (one pass over the loader)
and `fit`, which reads as the run's steps: set up, resume or start, then for each epoch its
updates and what follows them (validate, select, save).

`fit(params, train_set)` trains in-process (a notebook calls it through
`emcl_nb.training.run.train`) and under `torchrun` (one process per GPU, or gloo processes on
CPU). Only rank 0 writes files; when each checkpoint is written is `checkpoint.RunCheckpoints`'s
rule, the step log is `run_log.StepLog`.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emcl_nb.data.dataset import build_loader
from emcl_nb.data.device_augment import augment_batch
from emcl_nb.data.identity import data_identity
from emcl_nb.io import atomic_write_json, folder_lock, removed_on_failure, sweep_temp_files
from emcl_nb.model.loss import EMCLLoss
from emcl_nb.params import Params, repo_relative, save_params
from emcl_nb.progress import Stopwatch, note, progress_bar, timing_line
from emcl_nb.training import distributed
from emcl_nb.training.build import build_model
from emcl_nb.training.checkpoint import RunCheckpoints, read_checkpoint, set_rng_state
from emcl_nb.training.checks import (
    chance_signs,
    check_resumable,
    check_same_data,
    check_setup,
    collapse_signs,
)
from emcl_nb.training.optim import build_optimizer
from emcl_nb.training.run_log import StepLog, model_scalars, truncate_log
from emcl_nb.training.runtime import (
    autocast,
    autocast_dtype,
    configure_torch,
    grad_scaler,
    seed_everything,
    to_device,
)

# What training writes in the run folder besides checkpoints/ (evaluation writes there too).
TRAINING_FILES = ("params.yaml", "history.json", "log.jsonl", "reference.json")


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


# ---------------------------------------------------------------------------------------
# One update, one epoch
# ---------------------------------------------------------------------------------------

def train_step(model: nn.Module, batch: dict, optimizer, scheduler, scaler, *, dtype: torch.dtype | None,
               grad_clip: float, loss_fn: EMCLLoss | None = None) -> torch.Tensor:
    """One update on a batch already on the model's device: the loss (`loss_fn`, default
    EMCLLoss()) under autocast, backward through the loss scaler, unscale, clip the global
    gradient norm, optimiser and schedule steps, clamp logit_scale. Returns the loss (on the
    device: no host sync)."""
    loss_fn = loss_fn or EMCLLoss()
    with autocast(unwrap(model).device, dtype):
        loss = loss_fn(unwrap(model), *model(batch))
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


def device_augmented(batch: dict, device: torch.device) -> dict:
    """The batch on `device`, its clips augmented there where the loader shipped their
    RandAugment draws (params.augment_on == "device"). The draws stay on the host: the
    grouping by op reads them without a device sync."""
    draws = batch.get("augment")
    on_device = to_device({key: value for key, value in batch.items() if key != "augment"}, device)
    if draws is not None:
        on_device["video"] = augment_batch(on_device["video"], draws)
    return on_device


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, step_log: StepLog, *,
                    epoch: int, step: int, dtype: torch.dtype | None, grad_clip: float,
                    loss_fn: EMCLLoss | None = None, world_size: int = 1,
                    after_step: Callable[[int, int], None] | None = None, stop_at: int | None = None,
                    progress: bool = True, desc: str = "") -> tuple[int, int]:
    """One pass over `loader` from global step `step` (ended early once the global step reaches
    `stop_at`): `train_step` on each batch, its loss and learning rates into `step_log`, then
    `after_step(epoch, step)`.
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
        loss = train_step(model, device_augmented(batch, device), optimizer, scheduler, scaler, dtype=dtype,
                          grad_clip=grad_clip, loss_fn=loss_fn)
        step_log.add(step, epoch, loss, lrs)
        step += 1
        if after_step is not None:
            after_step(epoch, step)
        if not step_log.pending and progress:     # just flushed: shows the logged value
            bar.set_postfix(loss=f"{step_log.last_record['loss']:.4f}")
        if stop_at is not None and step >= stop_at:
            break
    step_log.flush()
    return step, skipped


# ---------------------------------------------------------------------------------------
# A run: what it trains with, and the steps of `fit`
# ---------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a run carries from epoch to epoch (and from a checkpoint when it resumes)."""
    epoch: int = 0                   # completed epochs
    step: int = 0
    history: list = field(default_factory=list)
    best_score: float = -math.inf   # best validation T2V R@1 so far
    selection: dict = field(default_factory=dict)   # the reference selection's record

    def metrics(self) -> dict:
        return {"history": self.history, "best_score": self.best_score, "reference": self.selection}


@dataclass
class Training:
    """Everything `fit` trains with, made once by `set_up`."""
    params: Params
    env: distributed.DistEnv
    device: torch.device
    model: nn.Module                 # the plain EMCLNet (`wrap` gives what trains: DDP, compiled)
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: EMCLLoss
    dtype: torch.dtype | None        # autocast dtype of CLIP (None: fp32)
    total_steps: int
    checkpoints: RunCheckpoints
    step_log: StepLog
    run: RunState
    data: dict = field(default_factory=dict)        # the identity of the data (data_identity)
    collapse_warned: bool = False
    chance_warned: bool = False
    stopwatch: Stopwatch = field(default_factory=Stopwatch)   # wall time by part of the run

    @property
    def out_dir(self) -> Path:
        return self.params.out_dir

    @property
    def finished(self) -> bool:
        """All epochs trained, or the max_steps updates."""
        return self.run.epoch >= self.params.epochs or self.run.step >= self.total_steps

    def save_state(self) -> dict:
        """The arguments of a checkpoint write: the run's parameters, metrics and data identity."""
        return {"params": self.params.to_dict(), "metrics": self.run.metrics(), "data": self.data}


def set_up(params: Params, train_set, env: distributed.DistEnv, on_log) -> Training:
    """Device, process group and threads; then, seeded by params.seed, the model, the loader,
    the optimiser, the schedule and the loss scaler."""
    device = distributed.resolve_device(params.device, env)
    distributed.init_distributed(device, env)
    if device.type == "cpu" and params.clip_dtype == "fp16" and env.is_main:
        note("clip_dtype=fp16 on a CPU: CLIP computes in fp16, which CPUs run many times slower than "
             "fp32 (the reference's regime is a GPU regime); clip_dtype=fp32 for a trial on a CPU")
    configure_torch(params)
    seed_everything(params.seed)
    model = build_model(params).to(device)
    loader = build_loader(train_set, params, train=True, rank=env.rank, world_size=env.world_size)
    total_steps = len(loader) * params.epochs
    if params.max_steps:                 # a smoke test: the schedule fitted to its updates
        total_steps = min(total_steps, params.max_steps)
    optimizer, scheduler = build_optimizer(model, params, total_steps)
    dtype = autocast_dtype(device, params.precision, model.clip.dtype)
    every = params.reference_interval if params.reference_selection else 0
    return Training(
        params=params, env=env, device=device, model=model, loader=loader, optimizer=optimizer,
        scheduler=scheduler, scaler=grad_scaler(device, dtype, params.clip_dtype),
        loss_fn=EMCLLoss(params.ddp_gradients), dtype=dtype, total_steps=total_steps,
        checkpoints=RunCheckpoints(params.out_dir / "checkpoints"),
        step_log=StepLog(params.out_dir / "log.jsonl" if env.is_main else None, params.log_every,
                         params.batch_size, on_log if env.is_main else None),
        run=RunState(selection={"split": params.reference_split, "every": every, "evaluations": [],
                                "best": None}),
        data=data_identity(params))


def sweep_killed_writes(training: Training) -> None:
    """Remove the temporary files of writes a killed run left in the run folder."""
    for stale in (sweep_temp_files(training.out_dir, TRAINING_FILES)
                  + sweep_temp_files(training.checkpoints.folder)):
        print(f"[emcl_nb] removed {repo_relative(stale)}, left by a write that was killed")


def resume_from_last(training: Training) -> None:
    """Continue from last.pt: the model, optimiser, schedule, scaler and RNG states loaded and
    the run state restored; rank 0 makes the run folder agree with the checkpoint."""
    last, params = training.checkpoints.last, training.params
    state = read_checkpoint(last)
    check_resumable(params, state["params"], last)
    check_same_data(state.get("data"), training.data, last)
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    training.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    metrics = state["metrics"]
    training.run = RunState(epoch=state["epoch"], step=state["step"], history=metrics.get("history", []),
                            best_score=metrics.get("best_score", -math.inf),
                            selection=metrics.get("reference", training.run.selection))
    if not training.env.is_main:
        return
    training.checkpoints.promote_reference(training.run.step)
    truncate_log(training.step_log.path, training.run.step)
    atomic_write_json(training.out_dir / "history.json", training.run.history)   # killed before it was written
    if training.finished:
        print(f"[emcl_nb] run {params.run} is complete: {training.run.epoch}/{params.epochs} epochs, "
              f"{training.run.step}/{training.total_steps} steps; train with --no-resume to retrain "
              f"(the earlier checkpoints are kept aside)")
    else:
        print(f"[emcl_nb] resuming {repo_relative(last)} after epoch {training.run.epoch} "
              f"(step {training.run.step} of {training.total_steps})")


def start_new_run(training: Training) -> None:
    """A fresh run folder (rank 0): the checkpoints and logs of an earlier run in it are moved
    aside (`RunCheckpoints.set_aside`: never deleted, never taken for this run's), and the
    parameters written."""
    training.out_dir.mkdir(parents=True, exist_ok=True)
    aside = training.checkpoints.set_aside(*(training.out_dir / name for name in TRAINING_FILES
                                             if name != "params.yaml"))
    if aside is not None:
        print(f"[emcl_nb] a new run in {repo_relative(training.out_dir)}: the earlier run's checkpoints "
              f"and logs are kept in {repo_relative(aside)}")
    save_params(training.params, training.out_dir / "params.yaml")


def wrap(training: Training) -> nn.Module:
    """What trains: the model in DistributedDataParallel with several processes, compiled
    with params.compile."""
    model = training.model
    if training.env.world_size > 1:
        device = training.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if training.params.compile else model


class StepHooks:
    """What runs after every update: the time of the first (compiling) step with compile=true,
    and the reference's step-wise selection after update 1 and every
    params.reference_interval updates (scored by `reference` on rank 0 alone)."""

    def __init__(self, training: Training, model: nn.Module, reference: Callable[[nn.Module], dict] | None):
        self.training, self.model, self.reference = training, model, reference
        self.first_step, self.started = training.run.step + 1, time.perf_counter()
        self.estimated = False

    def estimate_cost(self, step: int, seconds: float) -> None:
        """Print what the rest of the reference's selection will cost, from one evaluation."""
        training, every = self.training, self.training.run.selection["every"]
        remaining = training.total_steps // every - step // every
        print(f"[emcl_nb] reference_selection: scoring {training.params.reference_split} took {seconds:.0f} s; "
              f"it runs after update 1 and every {every} updates: {remaining} more time(s), about "
              f"{remaining * seconds / 60:.0f} min on this device (reference_selection=false skips it)")
        self.estimated = True

    def __call__(self, epoch: int, step: int) -> None:
        training = self.training
        if training.params.compile and step == self.first_step and training.env.is_main:
            print(f"[emcl_nb] compile=true: the first step took {time.perf_counter() - self.started:.1f} s "
                  f"(torch.compile compiling the forward and backward, and the loader's first batch)")
        every = training.run.selection["every"]
        if every and (step == 1 or step % every == 0):
            if self.reference is not None and training.env.is_main:
                self.select(epoch, step)
            distributed.barrier()

    def select(self, epoch: int, step: int) -> None:
        """One evaluation of the reference's selection; the best so far (ties go to the later
        step, as the reference's `best_score <= R1`) is saved as the pending candidate. The
        first one says what the selection will cost on this device."""
        self.model.eval()
        with self.training.stopwatch.part("reference selection"):
            started = time.perf_counter()
            r1 = self.reference(unwrap(self.model))["t2v"]["R1"]
            seconds = time.perf_counter() - started
        self.model.train()
        if not self.estimated:
            self.estimate_cost(step, seconds)
        record, selection = {"step": step, "epoch": epoch + 1, "t2v_R1": r1}, self.training.run.selection
        selection["evaluations"].append(record)
        if selection["best"] is None or r1 >= selection["best"]["t2v_R1"]:
            selection["best"] = record
            self.training.checkpoints.save_reference_candidate(
                unwrap(self.model), epoch=epoch, step=step, params=self.training.params.to_dict(), record=record,
                data=self.training.data)


def train_epoch(training: Training, model: nn.Module, epoch: int, hooks: StepHooks) -> dict:
    """The updates of epoch `epoch` (0-based); returns its record (epoch, step, last loss,
    samples skipped, logit_scale, the EM correction's rank: run_log.model_scalars)."""
    params = training.params
    training.run.step, skipped = train_one_epoch(
        model, training.loader, training.optimizer, training.scheduler, training.scaler, training.step_log,
        epoch=epoch, step=training.run.step, dtype=training.dtype, grad_clip=params.grad_clip,
        loss_fn=training.loss_fn, world_size=training.env.world_size, after_step=hooks,
        stop_at=training.total_steps, progress=params.progress and training.env.is_main,
        desc=f"epoch {epoch + 1}/{params.epochs}")
    return {"epoch": epoch + 1, "step": training.run.step, "loss": training.step_log.last_record["loss"],
            "skipped_samples": skipped, **model_scalars(unwrap(model))}


def validate_epoch(training: Training, model: nn.Module, record: dict,
                   validate: Callable[[nn.Module], dict] | None) -> bool:
    """Rank 0 validates (adding "val" to `record`, warning once about signs of collapse and
    once about a run still at chance);
    returns whether this epoch is the best so far (ties go to the later epoch, as in the
    reference's `best_score <= R1`)."""
    if validate is None or not training.env.is_main:
        return False
    model.eval()
    record.update(validate(unwrap(model)))
    signs = collapse_signs(record["val"]) if "val" in record else None
    if signs and not training.collapse_warned:
        warnings.warn(f"epoch {record['epoch']}: {signs}. Check lr (a negative or too large "
                      f"one), the data and the loss curve.", stacklevel=3)
        training.collapse_warned = True
    at_chance = chance_signs(record, training.params.batch_size) if not training.chance_warned else None
    if at_chance:
        warnings.warn(f"epoch {record['epoch']}: {at_chance}. Check lr (too small, or 0), coef_lr, the "
                      f"captions and videos (do they match?) and the loss curve.", stacklevel=3)
        training.chance_warned = True
    improved = "val" in record and record["val"]["t2v"]["R1"] >= training.run.best_score
    if improved:
        training.run.best_score = record["val"]["t2v"]["R1"]
    return improved


def save_epoch(training: Training, model: nn.Module, record: dict, improved: bool) -> None:
    """Rank 0 writes the epoch's checkpoints (RunCheckpoints' order), history and the
    reference selection's scores, and prints the epoch's line."""
    run, params = training.run, training.params
    training.checkpoints.save_epoch(unwrap(model), training.optimizer, training.scheduler, training.scaler,
                                    epoch=record["epoch"], step=run.step, improved=improved,
                                    **training.save_state())
    atomic_write_json(training.out_dir / "history.json", run.history)
    if run.selection["every"]:
        atomic_write_json(training.out_dir / "reference.json", run.selection)
    print(f"[emcl_nb] epoch {record['epoch']}/{params.epochs}: loss {record['loss']:.4f}"
          + (f", val t2v R@1 {record['val']['t2v']['R1']:.1f}" if "val" in record else ""))


def timing_summary(training: Training) -> str:
    """One line: where this call of `fit` spent its time (updates without the reference
    selection run between them)."""
    seconds = dict(training.stopwatch.seconds)
    selection = seconds.pop("reference selection", 0.0)
    seconds["updates"] = seconds.get("updates", 0.0) - selection
    if selection:
        seconds["reference selection"] = selection
    return timing_line("training", seconds)


def fit(params: Params, train_set, *, validate: Callable[[nn.Module], dict] | None = None,
        reference: Callable[[nn.Module], dict] | None = None, resume: bool = True,
        on_log: Callable[[list], None] | None = None,
        on_epoch_end: Callable[[dict], None] | None = None) -> FitResult:
    """Train `params.epochs` epochs on `train_set` (a dataset of batch dicts).

    `validate(model) -> {"val": {"t2v": {"R1": ...}, ...}}` runs after each epoch on rank 0;
    the best epoch by validation (never test) text-to-video R@1 is kept as `best.pt`.
    `reference(model) -> metrics` of params.reference_split, with params.reference_selection:
    the reference's selection, run on rank 0 after update 1 and every
    params.reference_interval updates; the best (ties: the later) is kept as `reference.pt`
    and the scores in `reference.json`. With `resume`, an existing `last.pt` is continued.
    Rank 0 holds the run folder's lock throughout: a second run into it fails at once. A new
    run that fails before it has logged a step leaves no run folder behind.
    """
    env = distributed.env_from_torchrun()
    check_setup(params, len(train_set), env.world_size)
    with (removed_on_failure(params.out_dir) if env.is_main else contextlib.nullcontext(),
          folder_lock(params.out_dir) if env.is_main else contextlib.nullcontext()):
        training = set_up(params, train_set, env, on_log)
        if env.is_main:
            sweep_killed_writes(training)
        if resume and training.checkpoints.last.exists():
            resume_from_last(training)
        elif env.is_main:
            start_new_run(training)
        model = wrap(training)
        hooks = StepHooks(training, model, reference)
        for epoch in range(training.run.epoch, params.epochs):
            if training.finished:                      # max_steps reached
                break
            with training.stopwatch.part("updates"):
                record = train_epoch(training, model, epoch, hooks)
            with training.stopwatch.part("validation"):
                improved = validate_epoch(training, model, record, validate)
            training.run.history.append(record)
            if env.is_main:
                with training.stopwatch.part("checkpoints"):
                    save_epoch(training, model, record, improved)
            distributed.barrier()
            if on_epoch_end is not None:
                on_epoch_end(record)
        if env.is_main and training.stopwatch.seconds:
            print(timing_summary(training))
    checkpoints = training.checkpoints
    return FitResult(out_dir=params.out_dir, last_checkpoint=checkpoints.last,
                     best_checkpoint=checkpoints.best if checkpoints.best.exists() else None,
                     history=training.run.history, log_path=training.step_log.path or params.out_dir / "log.jsonl")
