"""TensorBoard event files of a training run (`tensorboard=true`), in <run>/tensorboard/.

Fed by the two hooks training already has: the step log's `on_log` (loss, learning rates,
clips/s of every update, written when log.jsonl is) and the engine's `on_epoch_end` (the
epoch's validation R@K, logit_scale and the effective rank of the EM correction, from the
epoch record). Only the main process writes. A resumed run writes from its resume step on
and drops the events a killed run had logged after its checkpoint (purge_step).
Watch a run with `tensorboard --logdir outputs/<dataset>/<run>/tensorboard` (README).

TensorBoard is an optional dependency (`pip install "emcl-nb[tensorboard]"`); asking for
it without the package is a TrainingSetupError before any work.
"""
from __future__ import annotations

from pathlib import Path

from emcl_nb.training.checks import TrainingSetupError

FOLDER = "tensorboard"
RECALLS = ("R1", "R5", "R10", "MdR", "MnR")


def summary_writer_class():
    """torch's SummaryWriter, or a TrainingSetupError saying how to install TensorBoard."""
    try:
        # Imported here: tensorboard is an optional dependency, needed only with tensorboard=true.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise TrainingSetupError(
            f"tensorboard=true needs the tensorboard package ({error}); install it with "
            f"pip install \"emcl-nb[tensorboard]\" (or pip install tensorboard), or set tensorboard=false"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """`on_log` and `on_epoch_end` callbacks for `engine.fit` that write event files under
    `folder`; the writer opens at the first record (its step purges later events of a
    killed run) and `close()` flushes it."""

    def __init__(self, folder: Path):
        self.folder, self.writer_class, self.writer = Path(folder), summary_writer_class(), None

    def _writer(self, step: int):
        if self.writer is None:
            self.writer = self.writer_class(str(self.folder), purge_step=step)
        return self.writer

    def on_log(self, records: list[dict]) -> None:
        """Step records of the step log: loss, learning rates (lr_<group>), clips/s."""
        writer = self._writer(records[0]["step"])
        for record in records:
            step = record["step"]
            writer.add_scalar("train/loss", record["loss"], step)
            writer.add_scalar("train/clips_per_s", record["clips_per_s"], step)
            for key, value in record.items():
                if key.startswith("lr_"):
                    writer.add_scalar(f"lr/{key.removeprefix('lr_')}", value, step)

    def on_epoch_end(self, record: dict) -> None:
        """An epoch record: validation R@K / MdR / MnR both ways, logit_scale, the EM
        correction's effective rank, at the epoch's last step."""
        writer, step = self._writer(record["step"]), record["step"]
        writer.add_scalar("train/epoch", record["epoch"], step)
        for key, tag in (("logit_scale", "model/logit_scale"), ("emcl_rank", "model/emcl_correction_rank")):
            if record.get(key) is not None:
                writer.add_scalar(tag, record[key], step)
        for direction in ("t2v", "v2t"):
            for metric in RECALLS:
                value = record.get("val", {}).get(direction, {}).get(metric)
                if value is not None:
                    writer.add_scalar(f"val/{direction}_{metric}", value, step)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
