"""A decoded-frame cache: each clip is decoded once into the frames sampling uses, and
every epoch reads them by memory map instead of decoding videos.
Over 300 lines: the build, its resume and the reader share one on-disk format, kept in one place.

    python -m emcl_nb.data.frame_cache --params msrvtt [--set key=value ...] [--splits train test]

What is stored, per distinct clip of a split (video file + segment): the uint8 frames
`load_clip` returns, i.e. the indices `sample_indices` picks for max_frames and
video_framerate, at the size the video is stored (short side as prepared; a much larger
video at the decoder's reduced size). Nothing is cropped or augmented: the transforms still
run per clip on these frames, so batches equal those of the decoding path.

One cache, `<frame_cache_dir>/<split>-<key>/`:
- `manifest.json`: the settings and the key;
- `chunk-NNNNN.u8`: the raw frame bytes of a run of clips (about CHUNK_BYTES each, so
  files stay few), channel-planar [frames, 3, H, W] so that the loader's [T, 3, H, W]
  clips are plain copies, `chunk-NNNNN.json`: their index (clip number, byte offset, frames,
  height, width; or why the video could not be read);
- `cache.json`, written last: size, build time, clips, frames, unreadable videos.

The key hashes the sampling settings, the decoders and each clip's file (path, size,
modification time) and segment. A cache built for other settings or other files is never
read: the folder for the current ones is missing, and the loader says how to build it.

A build can be interrupted at any point: a chunk's bytes are written under a temporary
name and renamed, then its index is written atomically, and only chunks with an index
count. Building again resumes after the last complete chunk; a half-written file is never
read. Unreadable videos follow `on_bad_sample`: "raise" stops the build (the chunks done
are kept), "skip" records the reason, and the loader then skips the clip as it would
when decoding.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from emcl_nb.data.annotations import SPLITS, Annotations, has_split, load_annotations
from emcl_nb.data.synthetic import generate_from_params
from emcl_nb.data.video import AUTO_BACKENDS, VideoReadError, load_clip
from emcl_nb.data.workers import loader_workers
from emcl_nb.io import TEMP_SUFFIX, atomic_write_json, folder_lock, sweep_temp_files
from emcl_nb.params import Params, load_params
from emcl_nb.progress import progress_bar

FORMAT_VERSION = 1
CHUNK_BYTES = 256 * 2**20          # a chunk file is closed once it holds this many bytes
MANIFEST, REPORT = "manifest.json", "cache.json"
CHUNK_INDEX = re.compile(r"chunk-(\d{5})\.json")

Clip = tuple[int, float | None, float | None]      # (video index, segment start, end)


class FrameCacheError(RuntimeError):
    """No complete cache for these settings; the message names the folder and the fix."""


# ---------------------------------------------------------------- identity

def split_clips(annotations: Annotations) -> list[Clip]:
    """The distinct clips a split's datasets load, in order of first use (every sample's
    segment, which includes the first-sample segment evaluation encodes)."""
    return list(dict.fromkeys((int(video), sample.start, sample.end)
                              for video, sample in zip(annotations.video_index, annotations.samples)))


def sampling_settings(params: Params) -> dict:
    """Everything besides the video files that decides the cached frames."""
    return {"format": FORMAT_VERSION, "max_frames": params.max_frames,
            "video_framerate": params.video_framerate, "image_size": params.image_size,
            "decoders": list(AUTO_BACKENDS)}


def _file_identity(path: Path) -> list:
    try:
        stat = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def cache_root(params: Params) -> Path:
    """The folder holding a dataset's caches: frame_cache_dir, or <output_root>/frame_cache/<dataset>."""
    root = params.frame_cache_dir or Path(params.output_root) / "frame_cache" / params.dataset
    return Path(root).expanduser()


def cache_folder(params: Params, annotations: Annotations, clips: list[Clip]) -> Path:
    """The folder of the cache for these settings and these video files."""
    files = [[*_file_identity(annotations.video_paths[video]), start, end] for video, start, end in clips]
    text = json.dumps({"settings": sampling_settings(params), "clips": files})
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_root(params) / f"{annotations.split}-{key}"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _chunk_indices(folder: Path) -> dict[int, dict]:
    """Chunk number -> index of every complete chunk in `folder`."""
    chunks = {}
    for path in sorted(folder.glob("chunk-*.json")):
        match = CHUNK_INDEX.fullmatch(path.name)
        if match:
            chunks[int(match.group(1))] = _read_json(path)
    return chunks


def _chunk_data(folder: Path, number: int) -> Path:
    return folder / f"chunk-{number:05d}.u8"


# ---------------------------------------------------------------- building

class _ClipDecoder(Dataset):
    """(clip number, frames or None, reason or None) for the clips still to build; run by
    DataLoader workers, so decoding uses params.num_workers processes."""

    def __init__(self, params: Params, annotations: Annotations, clips: list[Clip], todo: list[int]):
        self.params, self.annotations, self.clips, self.todo = params, annotations, clips, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, position: int):
        number = self.todo[position]
        video, start, end = self.clips[number]
        try:
            frames, _ = load_clip(self.annotations.video_paths[video], self.params.max_frames,
                                  self.params.video_framerate, start, end,
                                  short_side=self.params.image_size)
        except VideoReadError as error:
            return number, None, error.reason
        return number, frames, None


def _as_is(item):
    """DataLoader conversion that keeps numpy frames as they are."""
    return item


class _ChunkWriter:
    """Appends clips to one chunk file under a temporary name; `close` renames it into
    place and then writes its index (the chunk's completion record)."""

    def __init__(self, folder: Path, number: int):
        self.folder, self.number = folder, number
        self.entries: list[dict] = []
        self.size, self.handle, self.started = 0, None, time.perf_counter()
        self.temporary = folder / f".chunk-{number:05d}.u8.{os.getpid()}{TEMP_SUFFIX}"

    def add(self, clip: int, frames: np.ndarray | None, reason: str | None) -> None:
        if frames is None:
            self.entries.append({"clip": clip, "error": reason})
            return
        if self.handle is None:
            self.handle = open(self.temporary, "wb")   # noqa: SIM115 - closed by close()
        planar = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.uint8)   # [n, 3, H, W]
        self.handle.write(memoryview(planar).cast("B"))
        self.entries.append({"clip": clip, "offset": self.size, "frames": frames.shape[0],
                             "height": frames.shape[1], "width": frames.shape[2]})
        self.size += planar.nbytes

    def close(self) -> float:
        """Make the chunk complete; returns the seconds spent on it."""
        if not self.entries:
            return 0.0
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.temporary, _chunk_data(self.folder, self.number))
        seconds = time.perf_counter() - self.started
        atomic_write_json(self.folder / f"chunk-{self.number:05d}.json",
                          {"bytes": self.size, "seconds": round(seconds, 3), "clips": self.entries})
        return seconds


def _report(folder: Path, annotations: Annotations, clips: list[Clip], settings: dict) -> dict:
    chunks = _chunk_indices(folder)
    entries = [entry for chunk in chunks.values() for entry in chunk["clips"]]
    unreadable = [{"video": str(annotations.video_paths[clips[entry["clip"]][0]]),
                   "reason": entry["error"]} for entry in entries if "error" in entry]
    return {"split": annotations.split, "folder": str(folder), "settings": settings,
            "clips": len(clips), "frames": sum(entry.get("frames", 0) for entry in entries),
            "bytes": sum(chunk["bytes"] for chunk in chunks.values()), "files": len(list(folder.glob("chunk-*"))) + 2,
            "build_seconds": round(sum(chunk["seconds"] for chunk in chunks.values()), 3),
            "unreadable": unreadable}


def describe(report: dict) -> str:
    """One line: what a cache holds, its size and build time (a cache found complete says so)."""
    built = (f"found complete (built earlier in {report['build_seconds']:.1f} s)" if report.get("reused")
             else f"built in {report['build_seconds']:.1f} s")
    return (f"frame cache {report['split']}: {report['clips']} clips, {report['frames']} frames, "
            f"{report['bytes'] / 1e9:.3f} GB in {report['files']} files, {built}, "
            f"{len(report['unreadable'])} unreadable videos ({report['folder']})")


# What to do when another process is building the same cache (runs share a cache).
CACHE_ADVICE = ("another process is building this frame cache (every run with these data "
                "settings shares it); wait for it to finish, it is then reused")


def build_frame_cache(params: Params, split: str, *, progress: bool | None = None) -> dict:
    """Build (or finish, or reuse) the cache of `split` for `params`; returns its report
    (also in cache.json beside it; a cache found complete is reported with "reused": True)."""
    annotations = load_annotations(params, split)
    clips = split_clips(annotations)
    folder = cache_folder(params, annotations, clips)
    if (folder / REPORT).is_file():
        return {**_read_json(folder / REPORT), "reused": True}
    settings = sampling_settings(params)
    with folder_lock(folder, CACHE_ADVICE):
        sweep_temp_files(folder)
        if not (folder / MANIFEST).is_file():
            atomic_write_json(folder / MANIFEST, {"split": split, "dataset": params.dataset,
                                                  "settings": settings, "clips": len(clips)})
        chunks = _chunk_indices(folder)
        for orphan in folder.glob("chunk-*.u8"):     # renamed, but killed before its index
            if int(orphan.stem.split("-")[1]) not in chunks:
                orphan.unlink()
        done = {entry["clip"] for chunk in chunks.values() for entry in chunk["clips"]}
        todo = [number for number in range(len(clips)) if number not in done]
        _decode_into_chunks(params, annotations, clips, todo, folder,
                            next_number=max(chunks, default=-1) + 1,
                            progress=params.progress if progress is None else progress)
        report = _report(folder, annotations, clips, settings)
        atomic_write_json(folder / REPORT, report)
    return report


def _decode_into_chunks(params: Params, annotations: Annotations, clips: list[Clip],
                        todo: list[int], folder: Path, next_number: int, progress: bool) -> None:
    loader = DataLoader(_ClipDecoder(params, annotations, clips, todo), batch_size=None,
                        num_workers=loader_workers(params), collate_fn=_as_is)
    writer = _ChunkWriter(folder, next_number)
    try:
        for number, frames, reason in progress_bar(loader, total=len(todo), unit="clip",
                                                   desc=f"frame cache {annotations.split}",
                                                   disable=not progress):
            if reason is not None and params.on_bad_sample == "raise":
                raise VideoReadError(annotations.video_paths[clips[number][0]], reason)
            writer.add(number, frames, reason)
            if writer.size >= CHUNK_BYTES:
                writer.close()
                writer = _ChunkWriter(folder, writer.number + 1)
    finally:                      # keep what was decoded, also when a video stops the build
        writer.close()


def build_frame_caches(params: Params, splits=None, *, progress: bool | None = None) -> list[dict]:
    """The caches of `splits` (default: every split the layout has), printing a line for each."""
    reports = []
    for split in splits or [split for split in SPLITS if has_split(params, split)]:
        reports.append(build_frame_cache(params, split, progress=progress))
        print(describe(reports[-1]))
    return reports


# ---------------------------------------------------------------- reading

class FrameCache:
    """The complete cache of one split: `clip(video, start, end)` -> (frames, mask) as
    `load_clip` returns them. Chunk files are mapped on first use in each process."""

    def __init__(self, params: Params, annotations: Annotations):
        clips = split_clips(annotations)
        self.folder = cache_folder(params, annotations, clips)
        if not (self.folder / REPORT).is_file():
            raise FrameCacheError(_missing_message(params, annotations.split, self.folder))
        self.paths, self.max_frames = annotations.video_paths, params.max_frames
        self.entries = {clips[entry["clip"]]: (number, entry)
                        for number, chunk in _chunk_indices(self.folder).items()
                        for entry in chunk["clips"]}
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}          # each worker maps the files itself

    def clip(self, video: int, start: float | None, end: float | None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames [n,H,W,3] and frame mask [max_frames] of one clip; a video that
        could not be read raises VideoReadError as decoding it would. The frames are a
        read-only view of the map (no copy): writing to them is an error, never a change
        of the cache."""
        try:
            number, entry = self.entries[(video, start, end)]
        except KeyError:
            raise FrameCacheError(f"clip {(video, start, end)} is not in the frame cache "
                                  f"{self.folder}; was it built for other annotations?") from None
        if "error" in entry:
            raise VideoReadError(self.paths[video], entry["error"])
        if number not in self._maps:
            self._maps[number] = np.memmap(_chunk_data(self.folder, number), dtype=np.uint8, mode="r")
        shape = (entry["frames"], 3, entry["height"], entry["width"])
        offset = entry["offset"]
        planar = self._maps[number][offset:offset + int(np.prod(shape))].reshape(shape)
        mask = np.zeros(self.max_frames, dtype=np.int64)
        mask[:shape[0]] = 1
        return planar.transpose(0, 2, 3, 1), mask       # [n, H, W, 3], a view of [n, 3, H, W]


def _missing_message(params: Params, split: str, folder: Path) -> str:
    fix = (f"build it with `python -m emcl_nb.data.frame_cache --params {params.dataset}` and "
           f"the same overrides (ensure_data builds it too), or set frame_cache=false")
    if folder.is_dir():
        return f"the frame cache {folder} is incomplete (its build was interrupted); {fix} to resume"
    others = sorted(path.name for path in folder.parent.glob(f"{split}-*") if path.is_dir())
    found = (f"; {folder.parent} holds caches for other settings or video files: "
             f"{', '.join(others)} (max_frames, video_framerate, image_size and the files "
             f"are in their manifest.json)") if others else ""
    return f"no frame cache for the {split} split with these settings at {folder}{found}; {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="synthetic",
                        help="a dataset name (params/<name>.yaml) or a path to a YAML file")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override parameters, e.g. --set max_frames=12 num_workers=8")
    parser.add_argument("--splits", nargs="*", choices=SPLITS, help="default: every split the layout has")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    if params.synthetic:
        generate_from_params(params, progress=not args.no_progress)
    build_frame_caches(params, args.splits, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
