"""Text search over a folder of videos: an index of their features, and queries ranked by the
model's own scoring. The command line is `python -m emcl_nb.search`.

`build_index(model, videos, index)` encodes every video file under `videos` once, as the
test split's videos are encoded (emcl_nb.retrieval.trained), into the folder `index`:

    index.json          the checkpoint (path, size, mtime, fingerprint of the encoder weights),
                        the settings (ModelConfig, sampling, precision), the run parameters the
                        model was loaded with, and each video: its path under the folder, size,
                        mtime, and where its features are (part file, row); the unreadable
                        files with the reason
    part-<token>.pt     features of a run of videos: {"video": [n,T,D] float32, "frame_mask": [n,T]}

The build is resumable: every CHUNK_VIDEOS videos a part is written atomically, then
index.json (atomically), so a killed build keeps what it had finished and a part that
index.json does not name is removed on the next run. Building again re-encodes only what
changed: a file whose size or mtime differs is encoded again, a deleted one dropped, an
unreadable one retried only when it changed. At the end the parts are merged into one, in
path order, which a query maps into memory without copying. An index belongs to one model
and one set of settings: building it with others is an error, unless asked to rebuild.

`search(model, index, queries, k)` scores each query alone against every indexed video in
blocks of 1 text x block_size videos (text-conditioned pooling and the EMCL block as at
evaluation: emcl_nb.model.similarity.query_similarity), and gives the top k with the time of
the frame the query attends to most (text-conditioned pooling only).
"""
from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.compress import is_video
from emcl_nb.data.video import AUTO_BACKENDS, VideoReadError, sample_indices, video_info
from emcl_nb.evaluation.encode import weights_fingerprint
from emcl_nb.io import atomic_write_json, folder_lock, sweep_temp_files
from emcl_nb.model.emclnet import pool_frames
from emcl_nb.params import Params
from emcl_nb.retrieval.trained import TrainedModel, load
from emcl_nb.training.checkpoint import atomic_torch_save
from emcl_nb.training.runtime import autocast_dtype

FORMAT = "emcl-nb-index/1"
INDEX_FILE = "index.json"
CHUNK_VIDEOS = 512            # videos per part file while building (a kill loses at most these)


class SearchIndexError(RuntimeError):
    """An index that cannot be used as asked; the message names it and the fix."""


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def video_files(folder: Path) -> list[str]:
    """The video files under `folder` (by extension, as emcl_nb.data.compress takes them),
    as sorted paths relative to it."""
    if not folder.is_dir():
        raise SearchIndexError(f"--videos {folder} is not a folder")
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and is_video(path))


def split_folder(params: Params, split: str, folder: str | Path) -> Path:
    """`folder` holding links to the video files of a dataset's split (the synthetic test
    videos, say), made anew: a folder of videos to index without copying them."""
    folder = Path(folder)
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in load_annotations(params, split).video_paths:
        (folder / path.name).symlink_to(Path(path).resolve())
    return folder


def settings(model: TrainedModel) -> dict:
    """What the indexed features depend on besides the encoder weights and the files."""
    p = model.params
    return {"model_config": model.net.config.to_dict(), "max_frames": p.max_frames,
            "video_framerate": p.video_framerate, "image_size": p.image_size,
            "precision": str(autocast_dtype(model.device, p.precision) or torch.float32),
            "decoders": list(AUTO_BACKENDS)}


def checkpoint_record(model: TrainedModel) -> dict:
    size, mtime_ns = _stamp(model.checkpoint)
    return {"path": str(model.checkpoint.resolve()), "size": size, "mtime_ns": mtime_ns,
            "encoder": weights_fingerprint(model.net)}


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------

@dataclass
class IndexReport:
    """What one build did; paths are relative to the videos folder."""
    index: Path
    videos: int = 0                                   # videos in the index now
    encoded: list[str] = field(default_factory=list)
    kept: int = 0                                     # unchanged, not encoded again
    dropped: list[str] = field(default_factory=list)  # deleted or changed since the last build
    unreadable: dict[str, str] = field(default_factory=dict)   # path -> reason (left out)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.index}: {self.videos} videos indexed ({len(self.encoded)} encoded, {self.kept} kept, "
                 f"{len(self.dropped)} dropped as deleted or changed) in {self.seconds:.1f} s"]
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable file(s) left out:")
            lines += [f"  {path}: {reason}" for path, reason in sorted(self.unreadable.items())]
        return "\n".join(lines)


class _Builder:
    """index.json and the part files of one build (the folder lock held)."""

    def __init__(self, folder: Path, state: dict):
        self.folder, self.state = folder, state
        self.pending: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []

    def save_state(self) -> None:
        atomic_write_json(self.folder / INDEX_FILE, self.state)

    def write_part(self, video: torch.Tensor, frame_mask: torch.Tensor) -> str:
        name = f"part-{secrets.token_hex(6)}.pt"
        atomic_torch_save({"video": video.contiguous(), "frame_mask": frame_mask.contiguous()}, self.folder / name)
        return name

    def flush(self, stamps: dict[str, tuple[int, int]]) -> None:
        """The pending features as one part, then index.json naming them."""
        if not self.pending:
            return
        paths = [path for rel, _, _ in self.pending for path in rel]
        name = self.write_part(torch.cat([v for _, v, _ in self.pending]), torch.cat([m for _, _, m in self.pending]))
        for row, path in enumerate(paths):
            size, mtime_ns = stamps[path]
            self.state["videos"][path] = {"size": size, "mtime_ns": mtime_ns, "part": name, "row": row}
        self.pending = []
        self.save_state()

    def remove_unnamed_parts(self) -> None:
        named = {entry["part"] for entry in self.state["videos"].values()}
        for path in self.folder.glob("part-*.pt"):
            if path.name not in named:
                path.unlink()

    def merge(self) -> None:
        """One part holding every video in path order (unless that is what there is)."""
        entries = [self.state["videos"][path] for path in sorted(self.state["videos"])]
        parts = {entry["part"] for entry in entries}
        if len(parts) <= 1 and [entry["row"] for entry in entries] == list(range(len(entries))):
            return
        video, frame_mask = _gather(self.folder, entries)
        name = self.write_part(video, frame_mask)
        for row, entry in enumerate(entries):
            entry.update(part=name, row=row)
        self.save_state()
        self.remove_unnamed_parts()


def _read_state(folder: Path) -> dict | None:
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT:
        raise SearchIndexError(f"{path} is not an index of this version ({state.get('format')!r}, "
                               f"this version reads {FORMAT!r}); build it again with --rebuild")
    return state


def _check_same(state: dict, header: dict, folder: Path) -> None:
    """An index is reused only for the same encoder, settings and videos folder."""
    differences = []
    if state["checkpoint"]["encoder"] != header["checkpoint"]["encoder"]:
        differences.append(f"it was built with the encoder of {state['checkpoint']['path']}, not that of "
                           f"{header['checkpoint']['path']}")
    differences += [f"{key}: {state['settings'].get(key)!r} -> {value!r}"
                    for key, value in header["settings"].items() if state["settings"].get(key) != value]
    if state["videos_root"] != header["videos_root"]:
        differences.append(f"videos folder: {state['videos_root']} -> {header['videos_root']}")
    if differences:
        raise SearchIndexError(f"the index {folder} was built otherwise ({'; '.join(differences)}); "
                               f"use another --index folder, or --rebuild to encode everything again")


def build_index(model: TrainedModel, videos: str | Path, index: str | Path, *, rebuild: bool = False,
                progress: bool | None = None, chunk_videos: int = CHUNK_VIDEOS) -> IndexReport:
    """Index every video file under `videos` into the folder `index` (see the module
    docstring); returns what it did. One build at a time holds the folder's lock."""
    start = time.perf_counter()
    root, folder = Path(videos).expanduser().resolve(), Path(index).expanduser()
    files = video_files(root)
    stamps = {path: _stamp(root / path) for path in files}
    header = {"format": FORMAT, "checkpoint": checkpoint_record(model), "settings": settings(model),
              "params": model.params.to_dict(), "videos_root": str(root)}
    report = IndexReport(folder)
    with folder_lock(folder, "another process is indexing into it; wait for it to finish, or "
                             "give another index folder"):
        sweep_temp_files(folder)
        state = None if rebuild else _read_state(folder)
        if state is not None:
            _check_same(state, header, folder)
        state = state or {"videos": {}, "unreadable": {}}
        same = {path for path, entry in state["videos"].items()
                if stamps.get(path) == (entry["size"], entry["mtime_ns"])}
        report.dropped = sorted(set(state["videos"]) - same)
        known_bad = {path: entry for path, entry in state["unreadable"].items()
                     if stamps.get(path) == (entry["size"], entry["mtime_ns"])}
        builder = _Builder(folder, {**header, "videos": {path: state["videos"][path] for path in sorted(same)},
                                    "unreadable": known_bad})
        builder.save_state()                   # deleted and changed files out before anything is added
        builder.remove_unnamed_parts()
        todo = [path for path in files if path not in same and path not in known_bad]
        report.kept = len(same)
        pending = 0
        for batch in model.encode_video_batches([root / path for path in todo], progress=progress,
                                                desc=f"index {len(todo)} videos"):
            for row, reason in batch.failed:
                builder.state["unreadable"][todo[row]] = {"reason": reason, "size": stamps[todo[row]][0],
                                                          "mtime_ns": stamps[todo[row]][1]}
            if batch.rows:
                builder.pending.append(([todo[row] for row in batch.rows], batch.video, batch.frame_mask))
                report.encoded += [todo[row] for row in batch.rows]
                pending += len(batch.rows)
            if pending >= chunk_videos:
                builder.flush(stamps)
                pending = 0
        builder.flush(stamps)
        builder.save_state()                   # unreadable files found after the last part
        builder.merge()
    report.videos = len(builder.state["videos"])
    report.unreadable = {path: entry["reason"] for path, entry in builder.state["unreadable"].items()}
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------
# Reading and searching
# ---------------------------------------------------------------------------------------

def _gather(folder: Path, entries: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, T, D] features and [V, T] masks of `entries`, in their order."""
    parts = {name: torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
             for name in dict.fromkeys(entry["part"] for entry in entries)}
    if len(parts) == 1 and [entry["row"] for entry in entries] == list(range(len(entries))):
        part = next(iter(parts.values()))          # the merged part: mapped, not copied
        return part["video"][:len(entries)], part["frame_mask"][:len(entries)]
    video = torch.stack([parts[entry["part"]]["video"][entry["row"]] for entry in entries])          # [V, T, D]
    frame_mask = torch.stack([parts[entry["part"]]["frame_mask"][entry["row"]] for entry in entries])
    return video, frame_mask


@dataclass
class VideoIndex:
    """An index read back: its record (index.json) and the features of its videos in path order."""
    folder: Path
    state: dict
    paths: list[str]               # relative to state["videos_root"]
    video: torch.Tensor            # [V, T, D] float32
    frame_mask: torch.Tensor       # [V, T]

    @property
    def root(self) -> Path:
        return Path(self.state["videos_root"])

    def __len__(self) -> int:
        return len(self.paths)


def read_index(index: str | Path) -> VideoIndex:
    folder = Path(index).expanduser()
    state = _read_state(folder)
    if state is None:
        raise SearchIndexError(f"no index in {folder} (no {INDEX_FILE}); build one with "
                               f"python -m emcl_nb.search index --checkpoint C --videos DIR --index {folder}")
    paths = sorted(state["videos"])
    if not paths:
        raise SearchIndexError(f"the index {folder} holds no video ({len(state['unreadable'])} unreadable "
                               f"file(s) under {state['videos_root']}); index a folder with readable videos")
    video, frame_mask = _gather(folder, [state["videos"][path] for path in paths])
    return VideoIndex(folder, state, paths, video, frame_mask)


def load_index_model(index: VideoIndex, device: str | torch.device | None = None) -> TrainedModel:
    """The model an index was built with: its checkpoint, with the run parameters recorded.
    A checkpoint that changed since (size or mtime, then the encoder weights) is an error."""
    record = index.state["checkpoint"]
    path = Path(record["path"])
    if not path.is_file():
        raise SearchIndexError(f"the index {index.folder} was built with {path}, which is gone; "
                               f"put it back, or build the index again with another --checkpoint")
    params = Params().replace(**index.state["params"])
    model = load(path, device, params=params)
    if _stamp(path) != (record["size"], record["mtime_ns"]) and weights_fingerprint(model.net) != record["encoder"]:
        raise SearchIndexError(f"{path} has changed since the index {index.folder} was built (other "
                               f"encoder weights); build the index again (python -m emcl_nb.search index ...)")
    return model


@dataclass
class Hit:
    rank: int
    score: float
    path: str                    # the video file (absolute)
    time: float | None           # seconds: the sampled frame the query attends to most
    video: int                   # row in the index

    def to_dict(self) -> dict:
        return dict(vars(self))


def attended_time(model: TrainedModel, path: Path, weights: torch.Tensor) -> float | None:
    """The time in `path` of the sampled frame with the largest weight (None: the file
    cannot be read now)."""
    p = model.params
    try:
        num_frames, fps = video_info(path)
    except VideoReadError:
        return None
    indices, _ = sample_indices(num_frames, fps, p.max_frames, p.video_framerate)
    return float(indices[min(int(weights.argmax()), len(indices) - 1)] / fps)


def search(model: TrainedModel, index: VideoIndex, queries: list[str], k: int = 10) -> list[list[Hit]]:
    """The top `k` videos of each query, best first (see the module docstring)."""
    text = model.encode_text(queries)                                              # [Q, D]
    sim = model.score(text, index)                                      # [Q, V]
    top = sim.topk(min(k, sim.shape[1]), dim=1)
    results = []
    for q, (scores, videos) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        weights = None
        if model.net.pooling == "text" and videos:
            weights, _ = pool_frames(text[q:q + 1], index.video[videos], index.frame_mask[videos],
                                     model.net.temp)                               # [1, k, T]
        results.append([Hit(rank + 1, score, str(index.root / index.paths[video]),
                            attended_time(model, index.root / index.paths[video], weights[0, rank])
                            if weights is not None else None, video)
                        for rank, (score, video) in enumerate(zip(scores, videos))])
    return results


def format_hits(query: str, hits: list[Hit], n_videos: int, seconds: float) -> str:
    lines = [f'"{query}": top {len(hits)} of {n_videos} videos ({seconds * 1000:.0f} ms)',
             f"{'rank':>4}  {'score':>7}  {'time':>7}  path"]
    lines += [f"{hit.rank:>4}  {hit.score:>7.4f}  {_clock(hit.time):>7}  {hit.path}" for hit in hits]
    return "\n".join(lines)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def stale_paths(index: VideoIndex, hits: list[Hit]) -> list[str]:
    """The hits whose file was deleted or changed since it was indexed."""
    stale = []
    for hit in hits:
        entry = index.state["videos"][index.paths[hit.video]]
        path = Path(hit.path)
        if not path.is_file() or _stamp(path) != (entry["size"], entry["mtime_ns"]):
            stale.append(hit.path)
    return stale

