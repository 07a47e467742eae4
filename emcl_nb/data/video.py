"""Reading frames from video files: one reader and one sampling rule for every dataset.

decord is used when it can be imported; files it cannot open or decode (and every file
when decord is missing) are read with PyAV (`av`), which gives the same frames. Every
failure (missing, empty or undecodable file, no frames, no frame rate) raises
`VideoReadError` naming the path and the reason; nothing is ever replaced by zeros
(docs/reference-differences.md #13).
Frame sampling follows docs/data.md "Frame sampling".

Frames are decoded at the size the model needs: asked for a short side S (the image size),
a video whose short side exceeds DECODE_HEADROOM x S is scaled by the decoder (decord's
width/height, PyAV's reformat) to a short side of DECODE_HEADROOM x S, so an 8K video is
never held at full size; the transforms then resize (antialiased) as for any video.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import av
import numpy as np

try:
    import decord
except ImportError:          # PyAV fallback
    decord = None

# Videos with a short side above DECODE_HEADROOM x the wanted one are decoded at that size.
DECODE_HEADROOM = 2


def decode_size(width: int, height: int, short_side: int | None) -> tuple[int, int] | None:
    """(width, height), both even, to decode a width x height video at so that its short
    side is DECODE_HEADROOM x `short_side`; None (native size) when it is not larger."""
    target = DECODE_HEADROOM * short_side if short_side else 0
    if not target or min(width, height) <= target:
        return None
    scale = target / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _stored_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of the first video stream from the container header (no decoding);
    probed once per file version in each process, not on every clip."""
    try:
        stat = os.stat(path)
    except OSError:                         # the decoder reports a missing file itself
        return None
    return _probed_size(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1 << 16)
def _probed_size(path: str, mtime_ns: int, size: int) -> tuple[int, int] | None:
    try:
        with av.open(str(path)) as container:
            context = container.streams.video[0].codec_context
            return (context.width, context.height) if context.width and context.height else None
    except Exception:  # noqa: BLE001 - the decoder reports an unreadable file itself
        return None


class VideoReadError(RuntimeError):
    """A video that cannot be used; `path` and `reason` say which and why."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read video {path}: {reason}")
        self.path, self.reason = Path(path), reason


class _DecordVideo:
    def __init__(self, path: Path, short_side: int | None = None):
        stored = _stored_size(path) if short_side else None
        width, height = (decode_size(*stored, short_side) if stored else None) or (-1, -1)
        self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1,
                                          width=width, height=height)
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())

    def frames(self, indices: np.ndarray) -> np.ndarray:
        return self._reader.get_batch(indices.tolist()).asnumpy()


class _AvVideo:
    """PyAV decodes sequentially; frames are kept only at the wanted indices."""

    def __init__(self, path: Path, short_side: int | None = None):
        self._path = path
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            context = stream.codec_context
            size = decode_size(context.width, context.height, short_side)
            self._size = dict(zip(("width", "height"), size)) if size else {}
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.num_frames = stream.frames or sum(1 for _ in container.decode(stream))

    def frames(self, indices: np.ndarray) -> np.ndarray:
        wanted = {int(i) for i in indices}
        last = max(wanted)
        decoded = {}
        with av.open(str(self._path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24", **self._size)
                if i >= last:
                    break
        missing = wanted - decoded.keys()
        if missing:
            raise ValueError(f"frames {sorted(missing)[:5]} could not be decoded")
        return np.stack([decoded[int(i)] for i in indices])


BACKENDS = {"decord": _DecordVideo, "av": _AvVideo}
# Without an explicit backend, files that decord cannot decode are retried with PyAV.
AUTO_BACKENDS = ("decord", "av") if decord is not None else ("av",)


def _open(path: Path, backend: str, short_side: int | None) -> _DecordVideo | _AvVideo:
    video = BACKENDS[backend](path, short_side)
    if video.num_frames <= 0:
        raise VideoReadError(path, "no frames")
    if not math.isfinite(video.fps) or video.fps <= 0:
        raise VideoReadError(path, f"no usable frame rate ({video.fps})")
    return video


def _frames(video, path: Path, indices: np.ndarray) -> np.ndarray:
    if indices.min() < 0 or indices.max() >= video.num_frames:
        raise IndexError(f"frame indices {indices.min()}..{indices.max()} outside "
                         f"0..{video.num_frames - 1} of {path}")
    frames = video.frames(indices)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != len(indices) \
            or frames.shape[-1] != 3:
        raise ValueError(f"decoder returned {frames.dtype} {frames.shape}, not uint8 [n,H,W,3]")
    return np.ascontiguousarray(frames)


def _with_video(path, backend: str | None, use, short_side: int | None = None):
    """`use(video)` on the first backend that can open and decode `path` (at `decode_size`
    for frames wanted with `short_side`)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "empty file (0 bytes)")
    reasons = []
    for name in (backend,) if backend else AUTO_BACKENDS:
        try:
            return use(_open(path, name, short_side))
        except VideoReadError as error:
            reasons.append(f"{name}: {error.reason}")
        except IndexError:
            raise
        except Exception as error:      # each decoder raises its own types for broken files
            reasons.append(f"{name}: cannot decode ({type(error).__name__}: {error})")
    raise VideoReadError(path, "; ".join(reasons))


def video_info(path, backend: str | None = None) -> tuple[int, float]:
    """(number of frames, average frame rate) of the video at `path`."""
    return _with_video(path, backend, lambda video: (video.num_frames, video.fps))


def read_frames(path, indices, backend: str | None = None, short_side: int | None = None) -> np.ndarray:
    """uint8 RGB frames [len(indices),H,W,3] of the video at `path`; with `short_side`,
    a much larger video is decoded smaller (`decode_size`)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-D list of frame numbers, got {indices.shape}")
    return _with_video(path, backend, lambda video: _frames(video, path, indices), short_side)


def sample_indices(num_frames: int, fps: float, max_frames: int, video_framerate: int,
                   start: float | None = None, end: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Frames to read for one sample, and its frame mask (docs/data.md "Frame sampling").

    Candidates run from the segment's first frame to its last (the video's last frame at
    most) every round(fps / video_framerate) frames; more than `max_frames` candidates
    are thinned to floor(linspace(0, n-1, max_frames)) of them, keeping the first and
    last. Returns (indices [n <= max_frames] int64, frame_mask [max_frames] int64 with
    1 for the n real frames and 0 for the padding that follows them).
    """
    if num_frames <= 0 or not fps > 0:
        raise ValueError(f"need a video with frames and a frame rate, got {num_frames} frames "
                         f"at {fps} fps")
    if max_frames <= 0 or video_framerate <= 0:
        raise ValueError(f"max_frames ({max_frames}) and video_framerate ({video_framerate}) "
                         "must be positive")
    first = 0 if start is None else int(start * fps)
    last = num_frames - 1 if end is None else min(int(end * fps), num_frames - 1)
    if first > last:
        raise ValueError(f"segment [{start}, {end}] s is outside the video "
                         f"({num_frames} frames at {fps:g} fps)")
    stride = max(1, round(fps / video_framerate))
    candidates = np.arange(first, last + 1, stride, dtype=np.int64)
    if len(candidates) > max_frames:
        keep = np.linspace(0, len(candidates) - 1, max_frames).astype(np.int64)
        candidates = candidates[keep]
    mask = np.zeros(max_frames, dtype=np.int64)
    mask[:len(candidates)] = 1
    return candidates, mask


def load_clip(path, max_frames: int, video_framerate: int, start: float | None = None,
              end: float | None = None, backend: str | None = None,
              short_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sampled frames [n,H,W,3] uint8 of one sample and its frame mask [max_frames].

    Opens the file once; a segment outside the video is a VideoReadError like any other
    unusable video. `short_side`: the frame size the caller needs (see `decode_size`).
    """
    def sample(video):
        try:
            indices, mask = sample_indices(video.num_frames, video.fps, max_frames,
                                           video_framerate, start, end)
        except ValueError as error:
            raise VideoReadError(path, str(error)) from error
        return _frames(video, path, indices), mask
    return _with_video(path, backend, sample, short_side)
