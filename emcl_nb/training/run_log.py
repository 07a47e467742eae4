"""The run's per-step log, `log.jsonl`: one JSON line per update (step, epoch, loss, learning
rates, clips/s), written in one host sync every `log_every` steps, which is also when a
non-finite loss stops the run; `model_scalars`, what an epoch record keeps of the model."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from emcl_nb.io import atomic_write_text, naming_full_disk
from emcl_nb.model.emcl import effective_rank
from emcl_nb.progress import note
from emcl_nb.training.checks import TrainingSetupError


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


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


def model_scalars(model) -> dict:
    """What an epoch record keeps of the model's state: logit_scale (the parameter, ln of the
    InfoNCE inverse temperature) and, when training uses EMCL, the effective rank of the EM
    correction R of its latest training call (the epoch's last update)."""
    scalars = {"logit_scale": float(model.clip.logit_scale.detach())}
    state = model.emcl.last_training if model.training_emcl is not None else None
    if state is not None:
        scalars["emcl_rank"] = int(effective_rank(state.recon))
    return scalars


def truncate_log(path: Path, steps_done: int) -> None:
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
