"""Checkpoints: one file holds everything needed to resume a run exactly.

A checkpoint is a dict with the model and optimiser states, the schedule, the loss scaler,
the epoch and step it was taken after, the parameters of the run, the model's
`ModelConfig`, the identity of the run's data (emcl_nb.data.identity) and the RNG states.
It is written atomically, so a killed run never leaves a truncated file, and carries a CRC32
of its tensors (`tensor_checksum`), checked when it is read: a damaged file is an error, never
weights scored as they are.

Every checkpoint, ours and the reference code's, is read with `weights_only=True`: tensors,
plain containers and numbers, and the few globals in `CHECKPOINT_GLOBALS` (numpy's RNG
state); anything else is refused before it is unpickled, so a file cannot run code.
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from clip.model import CLIP

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:                                               # numpy 1.x
    from numpy.core.multiarray import _reconstruct

from emcl_nb.io import atomic_write
from emcl_nb.model.clip_backbone import InvalidWeightsError, clip_from_state_dict
from emcl_nb.model.emcl import seeded_emcl

FORMAT = "emcl-nb/1"
CHECKSUM = "checksum"        # the CRC32 of a checkpoint's tensors (tensor_checksum)


# The globals beyond torch's defaults that checkpoints may hold (the allow-list): what
# numpy.random.get_state() pickled to in checkpoints of earlier versions besides plain data,
# an ndarray of uint32, under numpy 2's module name or numpy 1's (a file keeps the name of the
# numpy that wrote it). New checkpoints hold none: their numpy RNG state is plain numbers.
CHECKPOINT_GLOBALS = [*((_reconstruct, f"{module}.multiarray._reconstruct")
                        for module in ("numpy._core", "numpy.core")),
                      np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be used; the message says what to do."""


def rng_state() -> dict:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),   # plain data
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensors(obj):
    """The tensors in `obj` (nested dicts, lists, tuples) in order; a checkpoint's "checksum"
    entry left out."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key != CHECKSUM:
                yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def tensor_checksum(obj) -> int:
    """CRC32 of the bytes of every tensor in `obj`, in order (what else the file holds is
    plain data that unpickling checks)."""
    crc = 0
    for tensor in _tensors(obj):
        crc = zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)  # [bytes]
    return crc


def verify_checksum(state, path: Path) -> None:
    """A CheckpointError when the tensors of `state` (read from `path`) are not those written
    (a checkpoint without a checksum, from an earlier version, passes)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT or CHECKSUM not in state:
        return
    if tensor_checksum(state) != state[CHECKSUM]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its tensors do not match the checksum written with "
            f"them (the file was changed or corrupted on disk). Use another checkpoint (last.pt, "
            f"best.pt, a copy) or train again (--no-resume).")


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save `obj` to `path` atomically (emcl_nb.io.atomic_write)."""
    atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def save_checkpoint(path: Path, *, model, optimizer=None, scheduler=None, scaler=None,
                    epoch: int, step: int, params: dict, metrics: dict | None = None,
                    data: dict | None = None) -> None:
    """Write a resumable checkpoint atomically. `epoch` counts completed epochs; `data` is
    the identity of the data the run trains on (data_identity)."""
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "params": params,
        "model_config": model.config.to_dict(),
        "metrics": metrics or {},
        "data": data,
        "rng": rng_state(),
    }
    state[CHECKSUM] = tensor_checksum(state)
    atomic_torch_save(state, Path(path))


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict:
    """Load a checkpoint file on the CPU, with a clear error when it is missing, broken or
    damaged (its checksum). `mmap` maps the tensors instead of reading them: cheap when only
    the metadata is needed (the checksum is then not checked)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Train first (python -m emcl_nb.train "
            f"--params params/<dataset>.yaml) or pass the path of an existing .pt file.")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        reason = (f"it holds Python objects besides tensors ({_listed(unsafe)})" if unsafe
                  else f"its pickle has content only code could rebuild ({_unpickler_reason(error)})")
        raise CheckpointError(
            f"checkpoint {path} was not loaded: {reason}. Checkpoints are read with "
            f"weights_only=True (tensors, numbers, strings, containers) so that a file cannot "
            f"run code. If you trust the file, re-save its tensors alone, e.g. "
            f"torch.save(model.state_dict(), 'weights.pt') in the code that made it.") from None
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"checkpoint {path} cannot be read ({error}); "
                              f"the file is corrupt or not a torch checkpoint") from error
    if not mmap:
        verify_checksum(state, path)
    return state


def _unpickler_reason(error: Exception) -> str:
    """The unpickler's own reason from torch's long weights-only message."""
    text = str(error)
    reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    return " ".join(reason.split())


def _unsafe_globals(path: Path) -> list[str]:
    """The globals in the file outside torch's and our allow-list, read without unpickling."""
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in CHECKPOINT_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the caller reports it as corrupt
        return []
    return [name for name in found if name not in allowed]


# ---------------------------------------------------------------------------------------
# Model weights for evaluation: our checkpoints and the reference code's
# ---------------------------------------------------------------------------------------
#
# Key mapping from a checkpoint published with the reference code (EMCL-Net / DRL /
# CLIP4Clip lineage: `torch.save(model.state_dict())`, possibly wrapped as
# {"state_dict": ...} and, when saved from DistributedDataParallel, prefixed "module."):
#
#   module.<key>                          -> <key>          (DDP prefix dropped)
#   clip.<...>                            -> clip.<...>     (the reference's CLIP module
#                                                            uses CLIP's own names)
#   frame_position_embeddings.weight      -> frame_position_embeddings.weight
#   transformerClip.resblocks.<i>.<...>   -> transformerClip.resblocks.<i>.<...>
#   lstm_visual.<...>                     -> lstm_visual.<...>   (agg_module=seqLSTM)
#   clip.input_resolution / context_length / vocab_size   dropped (TorchScript scalars)
#   (absent) emcl.basis_init / emcl.basis_directions  -> re-created from the seed, with a
#                                         warning: the reference keeps its EMCL bases in a
#                                         plain attribute that is never saved
#                                         (docs/reference-differences.md #2).

EMCL_BUFFERS = ("emcl.basis_init", "emcl.basis_directions")
DROPPED_KEYS = ("clip.input_resolution", "clip.context_length", "clip.vocab_size")
DDP_PREFIX = "module."


@dataclass
class LoadReport:
    """What `load_model_weights` did."""
    source: str
    layout: str                        # FORMAT (ours) or "reference"
    loaded: int                        # tensors loaded from the file
    recreated: list[str]               # EMCL buffers the file lacked, re-created from `seed`
    seed: int
    epoch: int | None = None           # epochs completed (our checkpoints only)
    params: dict | None = None         # the run's parameters (our checkpoints only)
    data: dict | None = None           # the identity of the run's data (our newer checkpoints)


def model_weights(state, source: str) -> tuple[dict, str]:
    """(model state dict, layout) of a loaded file: ours, or a reference state dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a checkpoint or a "
                              f"state dict (a mapping name -> tensor)")
    if "format" in state:
        if state["format"] != FORMAT:
            raise CheckpointError(f"{source} has checkpoint format {state['format']!r}; this "
                                  f"version reads {FORMAT!r}")
        return state["model"], FORMAT
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    not_tensors = [key for key, value in state.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise CheckpointError(f"{source} is neither an emcl-nb checkpoint nor a state dict: "
                              f"entries {not_tensors[:5]} are not tensors")
    state = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}
    return {key: value for key, value in state.items() if key not in DROPPED_KEYS}, "reference"


CLIP_PREFIX = "clip."


def clip_from_weights(weights: dict, source: str) -> CLIP | None:
    """The CLIP tower a model's weights hold (their `clip.*` tensors: every checkpoint of
    ours and of the reference code has them), built with the architecture read off the
    shapes, so that evaluating a checkpoint never needs the CLIP file it was trained from.
    None when they do not hold a whole CLIP."""
    clip_state = {key.removeprefix(CLIP_PREFIX): value for key, value in weights.items()
                  if key.startswith(CLIP_PREFIX)}
    try:
        return clip_from_state_dict(clip_state, source)
    except InvalidWeightsError:
        return None


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_model_weights(model, path_or_state, *, seed: int | None = None,
                       source: str | None = None) -> LoadReport:
    """Load an EMCLNet's weights from our checkpoint ({"format": FORMAT, "model": ...}) or
    from a reference-code state dict (key mapping above), given as a path or already loaded.

    EMCL bases the file lacks are re-created from `seed` (default: the model's config.seed)
    with a warning. Any other missing or unexpected key, or a shape that differs, is a
    `CheckpointError` naming a few of them.
    """
    if isinstance(path_or_state, (str, Path)):
        source = source or str(path_or_state)
        state = read_checkpoint(Path(path_or_state))
    else:
        source, state = source or "the given state dict", path_or_state
    weights, layout = model_weights(state, source)
    seed = model.config.seed if seed is None else seed

    expected = model.state_dict()
    missing = set(expected) - set(weights)
    recreated = sorted(missing & set(EMCL_BUFFERS))
    missing -= set(recreated)
    unexpected = set(weights) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: "
            + (f"missing {_listed(missing)}; " if missing else "")
            + (f"unexpected {_listed(unexpected)}; " if unexpected else "")
            + "set agg_module, num_hidden_layers and clip_weights to the values it was trained with")
    wrong_shape = {key: (tuple(weights[key].shape), tuple(expected[key].shape))
                   for key in weights if weights[key].shape != expected[key].shape}
    if wrong_shape:
        details = "; ".join(f"{key}: file {got}, model {want}"
                            for key, (got, want) in list(wrong_shape.items())[:5])
        raise CheckpointError(f"{source} has tensors of other shapes than this model ({details}); "
                              f"set clip_weights / tiny_* / emcl_bases / emcl_init to the trained values")

    if recreated:
        emcl = model.emcl
        fresh = seeded_emcl(seed, num_bases=emcl.num_bases, stage_num=emcl.stage_num,
                            momentum=emcl.momentum, lamd=emcl.lamd, beta=emcl.beta,
                            init=emcl.init, dim=model.embed_dim)
        weights = {**weights, **{f"emcl.{key}": value for key, value in fresh.state_dict().items()}}
        warnings.warn(
            f"{source} has no EMCL bases ({', '.join(recreated)}): the reference code never saves "
            f"them (docs/reference-differences.md #2), so they were re-created as the initial values drawn "
            f"from seed {seed}. Scores with EMCL on may differ from those of the run that wrote it.",
            stacklevel=2)
    model.load_state_dict(weights)
    return LoadReport(source=source, layout=layout, loaded=len(weights) - len(recreated),
                      recreated=recreated, seed=seed,
                      epoch=state.get("epoch") if layout == FORMAT else None,
                      params=state.get("params") if layout == FORMAT else None,
                      data=state.get("data") if layout == FORMAT else None)


# ---------------------------------------------------------------------------------------
# A run's checkpoints and the rules for writing them
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoints of one run folder (`<run>/checkpoints/`) and when each is written:

    - `last.pt` after every epoch, with everything a resume needs;
    - `best.pt` when validation improved, written *before* `last.pt`, so that a run killed
      in between resumes before that epoch (and redoes it) with its best in place;
    - `reference.pt`, the reference's step-wise selection: a candidate of an epoch waits in
      `reference.pending.pt` until `last.pt` has saved that epoch, so that `reference.pt`
      never holds a model of an epoch a resume will redo.
    Only the main process writes them.
    """
    folder: Path

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def reference(self) -> Path:
        return self.folder / "reference.pt"

    @property
    def pending_reference(self) -> Path:
        return self.folder / "reference.pending.pt"

    def set_aside(self, *also: Path) -> Path | None:
        """A new run in this folder: the earlier run's checkpoints (and the files `also`) are
        moved, never deleted, to a new `earlier-<n>/` beside them, so that no stale best.pt
        or reference.pt is taken for the new run's. Returns that folder (None: nothing to move)."""
        earlier = [path for path in (*self.folder.glob("*.pt"), *also) if path.is_file()]
        if not earlier:
            return None
        n = 1 + max((int(path.name.removeprefix("earlier-")) for path in self.folder.glob("earlier-*")
                     if path.name.removeprefix("earlier-").isdigit()), default=0)
        aside = self.folder / f"earlier-{n}"
        aside.mkdir()
        for path in earlier:
            os.replace(path, aside / path.name)
        return aside

    def save_reference_candidate(self, model, *, epoch: int, step: int, params: dict, record: dict,
                                 data: dict | None = None) -> None:
        """The reference selection's best so far, pending until its epoch is saved."""
        save_checkpoint(self.pending_reference, model=model, epoch=epoch, step=step, params=params,
                        metrics={"reference": record}, data=data)

    def promote_reference(self, saved_step: int) -> None:
        """Make the pending candidate `reference.pt` once `last.pt` (at `saved_step`) has saved
        the epoch it came from; drop it when it came from an epoch that was not saved."""
        if not self.pending_reference.exists():
            return
        if read_checkpoint(self.pending_reference, mmap=True)["step"] <= saved_step:
            os.replace(self.pending_reference, self.reference)
        else:
            self.pending_reference.unlink()

    def save_epoch(self, model, optimizer, scheduler, scaler, *, epoch: int, step: int, params: dict,
                   metrics: dict, improved: bool, data: dict | None = None) -> None:
        """After epoch `epoch` (completed epochs): best.pt when `improved`, then last.pt, then
        the reference candidate of this epoch promoted."""
        if improved:
            save_checkpoint(self.best, model=model, epoch=epoch, step=step, params=params, metrics=metrics,
                            data=data)
        save_checkpoint(self.last, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        epoch=epoch, step=step, params=params, metrics=metrics, data=data)
        self.promote_reference(step)
