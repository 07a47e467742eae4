"""A trained checkpoint ready to use, as `clip.load` gives one: `emcl_nb.load`, its encoders
for strings and video paths, and the model's own scoring of a query against videos.

    import emcl_nb
    emcl_nb.available_models()                         # ['synthetic/default', ...]: runs with checkpoints
    model = emcl_nb.load("synthetic/default")          # a run name, a run folder or a .pt / .bin file
    text = model.encode_text(["a red circle moves left"])      # [1, D]
    videos = model.encode_videos(["a.mp4", "b.mp4"])           # VideoFeatures: [V, T, D] + frame masks
    model.score(text, videos)                                  # [1, V]: pooling + EMCL, as evaluated

Videos go through the test split's path (emcl_nb.data.dataset.VideoDataset): the same frame
sampling, decoding at the size sampling needs, the test transform; features come back on
the CPU in float32, like the evaluation's `Features`.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from emcl_nb.data.annotations import Annotations, Sample
from emcl_nb.data.dataset import VideoDataset
from emcl_nb.data.video import VideoReadError
from emcl_nb.data.workers import loader_workers
from emcl_nb.evaluation.encode import encode_captions
from emcl_nb.evaluation.run import load_for_evaluation
from emcl_nb.evaluation.scoring import Scoring, scoring_setup
from emcl_nb.model.emclnet import EMCLNet
from emcl_nb.model.similarity import query_similarity
from emcl_nb.params import FIELDS, REPO_ROOT, Params, load_params, parse_overrides
from emcl_nb.progress import progress_bar
from emcl_nb.training.checkpoint import (
    CLIP_PREFIX,
    FORMAT,
    CheckpointError,
    LoadReport,
    model_weights,
    read_checkpoint,
)
from emcl_nb.training.distributed import DistEnv, resolve_device
from emcl_nb.training.runtime import autocast, autocast_dtype

CHECKPOINT_NAMES = ("best.pt", "last.pt")      # a run's checkpoint: best on validation, else last


# ---------------------------------------------------------------------------------------
# Finding and loading a checkpoint
# ---------------------------------------------------------------------------------------

def _output_root(output_root: str | Path | None) -> Path:
    root = Path(output_root or Params().output_root).expanduser()
    return root if root.is_absolute() else REPO_ROOT / root


def _run_checkpoint(folder: Path) -> Path | None:
    """A run folder's best.pt, else its last.pt (in checkpoints/ or in the folder itself)."""
    for name in CHECKPOINT_NAMES:
        for place in (folder / "checkpoints", folder):
            if (place / name).is_file():
                return place / name
    return None


def available_models(output_root: str | Path | None = None) -> list[str]:
    """The runs `load` accepts by name: "<dataset>/<run>" for every run folder under
    `output_root` (default: the repository's outputs/) that holds a checkpoint."""
    root = _output_root(output_root)
    return sorted(f"{run.parent.name}/{run.name}" for run in root.glob("*/*")
                  if run.is_dir() and _run_checkpoint(run) is not None)


def resolve_checkpoint(run_or_checkpoint: str | Path, output_root: str | Path | None = None) -> Path:
    """The checkpoint file `run_or_checkpoint` names: a file (ours or the reference code's);
    a run folder (its checkpoints/best.pt, else last.pt); or a run name "<dataset>/<run>" under
    `output_root`. A relative path is looked up from the working folder, then from the
    repository root."""
    given = Path(run_or_checkpoint).expanduser()
    candidates = [given] if given.is_absolute() else [given, REPO_ROOT / given, _output_root(output_root) / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.is_dir() and (found := _run_checkpoint(candidate)) is not None:
            return found
    runs = available_models(output_root)
    raise CheckpointError(
        f"no checkpoint {str(run_or_checkpoint)!r}: it is neither a checkpoint file, nor a run folder "
        f"holding checkpoints/best.pt or last.pt, nor a run name under {_output_root(output_root)} "
        f"(runs there: {', '.join(runs) or 'none'})")


def _base_params(state: dict, layout: str, params: str | Params | None) -> Params:
    """The parameters a checkpoint is loaded with: `params` when given (a params/<name>.yaml
    name, a YAML path or a Params); else, for our checkpoints, the parameters of the run that
    wrote it, and for a reference checkpoint the defaults of emcl_nb/params.py."""
    if isinstance(params, Params):
        return params
    if params is not None:
        return load_params(params, use_env=False)
    stored = state.get("params") if layout == FORMAT else None
    if not stored:
        return Params()
    return Params().replace(**{name: value for name, value in stored.items() if name in FIELDS})


def load(run_or_checkpoint: str | Path, device: str | torch.device | None = None, *,
         params: str | Params | None = None, overrides: str | dict | None = None) -> TrainedModel:
    """A trained EMCL-Net ready for evaluation (eval mode, on `device`; default: CUDA when
    present, else the CPU).

    `run_or_checkpoint`: a checkpoint file, a run folder or a run name (`available_models`;
    see `resolve_checkpoint`). The file is read with weights_only=True; one that is neither
    an emcl-nb checkpoint nor an EMCL-Net state dict is a CheckpointError. CLIP is built from
    the checkpoint's own clip.* weights (the CLIP file it was trained from is not needed).

    The ModelConfig: an emcl-nb checkpoint carries its own, and the run's parameters (frame
    sampling, words per caption, block size) come with it. A checkpoint of the reference
    code's layout (a plain state dict, maybe "module."-prefixed, without EMCL bases, which are
    then re-created from `seed` with a warning) carries neither: it is built from `params`,
    the defaults of emcl_nb/params.py when not given (the reference's MSR-VTT recipe:
    ViT-B/32, seqTransf with 4 layers, 12 frames at 1 fps, 32 words, 32 bases), or a
    parameter file (`params="msvd"`, a YAML path) or a `Params`. `overrides`
    ("key=value ..." or a dict) change them further, e.g. `overrides="num_hidden_layers=2"`
    for a model trained with another depth (a mismatch is an error naming the keys).
    """
    path = resolve_checkpoint(run_or_checkpoint)
    state = read_checkpoint(path, mmap=True)
    weights, layout = model_weights(state, str(path))
    if not any(key.startswith(CLIP_PREFIX) for key in weights):
        sample = ", ".join(sorted(weights)[:3]) or "none"
        raise CheckpointError(
            f"{path} is neither an emcl-nb checkpoint nor an EMCL-Net state dict of the reference "
            f"code: none of its {len(weights)} tensors is under {CLIP_PREFIX}* (its keys: {sample}, ...)")
    base = _base_params(state, layout, params).replace(**parse_overrides(overrides))
    device = torch.device(device) if device is not None else resolve_device("auto", DistEnv())
    net, run_params, report = load_for_evaluation(path, base, device)
    return TrainedModel(net, run_params, path, report)


# ---------------------------------------------------------------------------------------
# Videos by path, through the test split's reader
# ---------------------------------------------------------------------------------------

@dataclass
class VideoFeatures:
    """Encoded videos: frame features after temporal aggregation, on the CPU in float32."""
    paths: list[str]              # the videos that were read, in the order given
    video: torch.Tensor           # [V, T, D]
    frame_mask: torch.Tensor      # [V, T] int64, 0 = padded frame
    unreadable: dict[str, str] = field(default_factory=dict)   # path -> why it was left out


class PathVideos(Dataset):
    """Videos given by path, each read as the test split reads its videos (VideoDataset:
    sampling, decode size, test transform); an unreadable one gives the reason instead."""

    def __init__(self, paths: Sequence[str | Path], params: Params):
        paths = [Path(path) for path in paths]
        ids = [str(row) for row in range(len(paths))]
        annotations = Annotations(layout=params.layout, split="test",
                                  samples=[Sample("", video_id) for video_id in ids], video_ids=ids,
                                  video_index=np.arange(len(paths), dtype=np.int64), video_paths=paths,
                                  caption_groups=[[row] for row in range(len(paths))])
        self.videos = VideoDataset(annotations, params.replace(on_bad_sample="raise", frame_cache=False,
                                                               cache_decoded_clips=False))

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, row: int) -> dict:
        try:
            item = self.videos[row]
        except VideoReadError as error:
            return {"row": row, "error": error.reason}
        return {"row": row, "video": item["video"], "frame_mask": item["frame_mask"]}


def _collate(items: list[dict]) -> dict:
    """The readable clips stacked (none: video None), and the (row, reason) of the others."""
    read = [item for item in items if "error" not in item]
    batch = {key: default_collate([item[key] for item in read]) for key in ("video", "frame_mask")} \
        if read else {"video": None, "frame_mask": None}
    return {**batch, "rows": [item["row"] for item in read],
            "failed": [(item["row"], item["error"]) for item in items if "error" in item]}


@dataclass
class EncodedBatch:
    rows: list[int]                    # positions in the list of paths
    video: torch.Tensor | None         # [n, T, D] float32, CPU
    frame_mask: torch.Tensor | None    # [n, T]
    failed: list[tuple[int, str]]      # (position, reason) of the unreadable ones


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

@dataclass
class TrainedModel:
    """What `load` returns: the EMCL-Net (`net`, eval mode), the parameters it was built and
    is used with (`params`), the checkpoint and what loading it did (`report`)."""
    net: EMCLNet
    params: Params
    checkpoint: Path
    report: LoadReport

    @property
    def device(self) -> torch.device:
        return self.net.device

    @functools.cached_property
    def scoring(self) -> Scoring:
        """The model's own scoring (emcl_nb.evaluation.scoring): its EMCL mode and module,
        where features are normalised, the block size."""
        return scoring_setup(self.net.eval(), self.params)

    def _autocast(self):
        return autocast(self.device, autocast_dtype(self.device, self.params.precision))

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """[N, D] float32 CPU: each text's EOT feature (not normalised), tokenised as the
        evaluation tokenises captions (max_words)."""
        return encode_captions(self.net.eval(), [texts] if isinstance(texts, str) else list(texts), self.params)

    def encode_video_batches(self, paths: Sequence[str | Path], rows: Sequence[int] | None = None, *,
                             progress: bool | None = None, desc: str = "encode videos") -> Iterator[EncodedBatch]:
        """Encode `paths` (those at `rows` only, when given) batch by batch, decoded by
        params.num_workers loader workers; unreadable files are reported, never zeros."""
        loader = DataLoader(PathVideos(paths, self.params), batch_size=self.params.batch_size_val,
                            sampler=list(range(len(paths)) if rows is None else rows),
                            num_workers=loader_workers(self.params), collate_fn=_collate)
        show = self.params.progress if progress is None else progress
        for batch in progress_bar(loader, desc=desc, disable=not show, unit="batch", leave=False):
            video = None
            if batch["rows"]:
                with torch.no_grad(), self._autocast():
                    video = self.net.encode_video(batch["video"].to(self.device),
                                                  batch["frame_mask"].to(self.device)).float().cpu()   # [n, T, D]
            yield EncodedBatch(batch["rows"], video, batch["frame_mask"], batch["failed"])

    def encode_videos(self, paths: Sequence[str | Path], *, progress: bool | None = None) -> VideoFeatures:
        """Every readable video of `paths` encoded once; the others listed with the reason."""
        paths = [str(path) for path in paths]
        rows, videos, masks, unreadable = [], [], [], {}
        for batch in self.encode_video_batches(paths, progress=progress):
            if batch.rows:
                rows += batch.rows
                videos.append(batch.video)
                masks.append(batch.frame_mask)
            unreadable.update({paths[row]: reason for row, reason in batch.failed})
        T, D = self.params.max_frames, self.net.embed_dim
        order = torch.argsort(torch.tensor(rows, dtype=torch.int64))              # the order given
        video = torch.cat(videos)[order] if videos else torch.zeros(0, T, D)
        mask = torch.cat(masks)[order] if masks else torch.zeros(0, T, dtype=torch.int64)
        return VideoFeatures([paths[rows[i]] for i in order.tolist()], video, mask, unreadable)

    def frames(self, paths: Sequence[str | Path]) -> np.ndarray:
        """uint8 [V, T, S, S, 3]: the frames the model sees of each video (black: padding, or
        a file that cannot be read), for figures."""
        videos, S = PathVideos(paths, self.params), self.params.image_size
        out = np.zeros((len(videos), self.params.max_frames, S, S, 3), dtype=np.uint8)
        for row in range(len(videos)):
            item = videos[row]
            if "video" in item:
                out[row] = item["video"].permute(0, 2, 3, 1).numpy()                  # [T, S, S, 3]
        return out

    def score(self, text: torch.Tensor | str | Sequence[str], videos) -> torch.Tensor:
        """[Q, V] float32 CPU search scores: each query (a row of `encode_text`, or strings)
        alone against the videos with the model's own scoring (text-conditioned or mean
        pooling, the EMCL block, cosine), in blocks of 1 text x block_size videos
        (emcl_nb.model.similarity.query_similarity). `videos`: VideoFeatures, or anything
        with their `video` [V, T, D] and `frame_mask` [V, T] (a search index)."""
        if not torch.is_tensor(text):
            text = self.encode_text(text)
        scoring = self.scoring
        sim = query_similarity(text.to(self.device), videos.video.to(self.device),
                               videos.frame_mask.to(self.device), temp=self.net.temp,
                               emcl_module=scoring.emcl_module, block_size=scoring.block_size,
                               normalize=scoring.normalize, pooling=self.net.pooling)
        return sim.float().cpu()
