"""Thin wrapper around the ffmpeg binary: find it, encode H.264 mp4 files atomically.

The system `ffmpeg` is used when it is on PATH, otherwise the binary shipped by
`imageio-ffmpeg`. Every encode writes to a hidden temporary file in the destination
folder and renames it at the end, so a killed process never leaves a truncated video
under the final name (leftovers end in `PARTIAL_SUFFIX` and can be swept away).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

PARTIAL_SUFFIX = ".partial"
# H.264 settings shared by every encode: yuv420p for players, one thread and no B-frames
# so the same input gives the same bytes, no metadata or version strings in the file.
H264_ARGS = ("-c:v", "libx264", "-preset", "medium", "-pix_fmt", "yuv420p",
             "-bf", "0", "-threads", "1", "-map_metadata", "-1",
             "-fflags", "+bitexact", "-flags:v", "+bitexact")


class FFmpegError(RuntimeError):
    """ffmpeg exited with an error; `reason` holds the last lines of its stderr."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"ffmpeg failed writing {path}: {reason}")
        self.path, self.reason = path, reason


def ffmpeg_binary() -> str:
    """Path of the ffmpeg executable: `ffmpeg` on PATH, else imageio-ffmpeg's binary."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg  # the optional fallback binary: imported only when PATH has no ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as error:
        raise RuntimeError(
            "no ffmpeg found: install it on PATH (e.g. `apt install ffmpeg`) or "
            f"`pip install imageio-ffmpeg` ({error})") from error


def partial_path(path: Path) -> Path:
    """Hidden temporary name next to `path`, unique per process and thread."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{PARTIAL_SUFFIX}")


def remove_partials(folder: Path) -> int:
    """Delete the temporary files a killed run left under `folder`; returns how many."""
    folder = Path(folder)
    leftovers = list(folder.rglob(f".*{PARTIAL_SUFFIX}")) if folder.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def _stderr_tail(stderr: bytes, lines: int = 5) -> str:
    """The last `lines` lines of ffmpeg's messages on one line ("" when it printed none)."""
    text = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


def encode_mp4(input_args: list[str], path: Path, output_args: list[str] = (),
               stdin: bytes | None = None, verify=None) -> str:
    """Run ffmpeg with `input_args` + H.264 settings + `output_args` into `path`, atomically.

    `verify(partial_file)` may check the written file before it is renamed into place: a
    reason (str) it returns makes the encode fail. Returns ffmpeg's warnings ("" when none:
    damaged input often encodes with warnings and exit status 0). Raises FFmpegError (with
    the tail of ffmpeg's messages) and removes the partial file on any failure, including
    an interrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    command = [ffmpeg_binary(), "-hide_banner", "-loglevel", "warning", "-y", *input_args,
               *H264_ARGS, *output_args, "-f", "mp4", str(tmp)]
    try:
        result = subprocess.run(command, input=stdin, capture_output=True,
                                stdin=None if stdin is not None else subprocess.DEVNULL)
        messages = _stderr_tail(result.stderr)
        if result.returncode != 0:
            raise FFmpegError(path, messages or "no error message")
        problem = verify(tmp) if verify is not None else None
        if problem:
            raise FFmpegError(path, problem + (f" (ffmpeg: {messages})" if messages else ""))
        os.replace(tmp, path)
        return messages
    finally:
        tmp.unlink(missing_ok=True)


def write_video(path: Path, frames: np.ndarray, fps: int, crf: int = 18) -> None:
    """Write uint8 RGB frames [T,H,W,3] to an H.264 mp4 at `fps` (bit-for-bit reproducible)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video({path}): frames must be a non-empty uint8 array "
                         f"[T,H,W,3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"write_video({path}): H.264 yuv420p needs even sizes, got "
                         f"{height}x{width}; crop or pad the frames by one pixel")
    if fps <= 0:
        raise ValueError(f"write_video({path}): fps must be positive, got {fps}")
    encode_mp4(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                "-r", str(fps), "-i", "pipe:0"],
               path, ["-crf", str(crf), "-r", str(fps)],
               stdin=np.ascontiguousarray(frames).tobytes())
