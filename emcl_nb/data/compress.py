"""Re-encode raw videos once before training: 3 fps, short side 224, video stream only.

    python -m emcl_nb.data.compress --input_root RAW --output_root OUT [--workers N]

Unlike the reference tool (docs/reference-differences.md #14) portrait videos keep their aspect
ratio (1080x1920 -> 224x398), the folder tree is kept (`RAW/a/b.avi` -> `OUT/a/b.mp4`),
every ffmpeg failure is listed with its reason (nothing is copied in its place) and the
exit status is non-zero when any failed. Non-square pixels are made square first (a
720x576 PAL frame with sample aspect 16:15 becomes 768x576, then 280x224).

ffmpeg's exit status is not trusted: before each output is renamed into place, its video
stream must hold frames covering the input's duration and its last frame must decode (a
truncated input encodes "successfully" with part of it). A failed check is a listed
failure, so a re-run redoes it; ffmpeg's warnings about damaged input are listed too. Outputs appear
atomically, so re-running after an interruption skips the finished files and redoes the
rest.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import av

from ..progress import progress_bar
from .ffmpeg import FFmpegError, encode_mp4, remove_partials
from .video import VideoReadError, read_frames, video_info

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".3gp",
                              ".flv", ".mpg", ".mpeg", ".wmv", ".ogv"})
TARGET_FPS = 3
SHORT_SIDE = 224
# Square pixels first (width x sample aspect ratio), then short side -> SHORT_SIDE, the other
# side following the aspect ratio, rounded to an even number.
SCALE_FILTER = ("scale='trunc(iw*sar/2)*2':ih,setsar=1,"
                f"scale='if(lt(iw,ih),{SHORT_SIDE},-2)':'if(lt(iw,ih),-2,{SHORT_SIDE})'"
                ":flags=bicubic")
# An output's frame count may differ from duration x TARGET_FPS by this many frames, or by
# this share of them, whichever is larger (rounding at both ends, variable frame rates).
FRAME_SLACK, FRAME_SLACK_SHARE = 2, 0.1
CRF = 23


@dataclass
class CompressReport:
    """What one run did; paths are relative to the input root."""
    encoded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)      # output already there
    failed: list[tuple[Path, str]] = field(default_factory=list)   # (path, reason)
    ignored: list[Path] = field(default_factory=list)      # files that are not videos
    warnings: list[tuple[Path, str]] = field(default_factory=list)  # encoded, but ffmpeg warned

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [f"encoded {len(self.encoded)}, skipped {len(self.skipped)} (already done), "
                 f"failed {len(self.failed)}, ignored {len(self.ignored)} non-video files"]
        lines += [f"FAILED {path}: {reason}" for path, reason in self.failed]
        lines += [f"WARNING {path}: ffmpeg: {text}" for path, text in self.warnings]
        return "\n".join(lines)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def output_path(relative: Path, output_root: Path) -> Path:
    return output_root / relative.with_suffix(".mp4")


def _check_roots(input_root: Path, output_root: Path) -> None:
    if not input_root.is_dir():
        raise FileNotFoundError(f"--input_root {input_root} is not a folder of videos")
    inp, out = input_root.resolve(), output_root.resolve()
    if inp == out or inp in out.parents or out in inp.parents:
        raise ValueError(f"--output_root {output_root} must not be --input_root {input_root}, "
                         "nor inside it or above it: pick a separate folder")


def video_duration(path: Path) -> float | None:
    """Seconds of the first video stream as its container states them (None if unknown)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None
    except Exception:  # noqa: BLE001 - unreadable header: only the output check applies
        return None


def output_problem(source: Path, output: Path) -> str | None:
    """Why the encoded `output` does not stand for `source`, or None: its video stream must
    hold as many frames as the input's duration gives at TARGET_FPS (counted from the
    stream header), and its last frame must decode."""
    duration = video_duration(source)
    lasting = f"the input lasts {duration:.2f} s" if duration is not None else "input duration unknown"
    try:
        frames, _ = video_info(output, backend="av")                    # from the stream header
        if frames < 1:
            return f"the output holds no video frames ({lasting})"
        read_frames(output, [frames - 1], backend="av")                  # decodes to its end
    except VideoReadError as error:
        return f"the output has no usable video ({error.reason}; {lasting})"
    if duration is None:
        return None
    expected = duration * TARGET_FPS
    if abs(frames - expected) > max(FRAME_SLACK, FRAME_SLACK_SHARE * expected):
        return (f"the output holds {frames} frames ({frames / TARGET_FPS:.1f} s at {TARGET_FPS} "
                f"fps) but {lasting}: the input is truncated or damaged")
    return None


def compress_one(source: Path, destination: Path, reference_rate: bool = False) -> str:
    """Encode one video to 3 fps / short side 224 H.264 mp4 and check the output; returns
    ffmpeg's warnings, raises FFmpegError. The frames are kept by ffmpeg's fps filter (the
    source frame nearest each 1/3 s), or with `reference_rate` by the output option `-r 3`
    as the reference's script does (it can keep other source frames; docs/data.md)."""
    rate = ["-vf", SCALE_FILTER, "-r", str(TARGET_FPS)] if reference_rate else \
        ["-vf", f"fps={TARGET_FPS},{SCALE_FILTER}"]
    return encode_mp4(["-threads", "1", "-i", str(source)], destination,
                      [*rate, "-an", "-sn", "-dn", "-crf", str(CRF)],
                      verify=lambda written: output_problem(source, written))


def compress_videos(input_root, output_root, workers: int | None = None,
                    progress: bool = True, reference_rate: bool = False) -> CompressReport:
    """Compress every video under `input_root` into `output_root`, keeping the tree.

    Runs `workers` ffmpeg processes at once (default: one per CPU core). Finished outputs
    are skipped, so an interrupted run can simply be started again. `reference_rate`: see
    `compress_one`.
    """
    input_root, output_root = Path(input_root), Path(output_root)
    _check_roots(input_root, output_root)
    remove_partials(output_root)
    report = CompressReport()
    claimed: dict[Path, Path] = {}       # output -> the relative input path that owns it
    todo: dict[Path, Path] = {}          # the subset still to encode
    for source in sorted(p for p in input_root.rglob("*") if p.is_file()):
        relative = source.relative_to(input_root)
        if not is_video(source):
            report.ignored.append(relative)
            continue
        destination = output_path(relative, output_root)
        if destination in claimed:
            report.failed.append((relative, f"same output {destination} as {claimed[destination]}; "
                                            "rename one of them"))
            continue
        claimed[destination] = relative
        if destination.exists():
            report.skipped.append(relative)
        else:
            todo[destination] = relative

    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(total=len(todo), desc="compress", unit="video", disable=not progress) as bar:
        jobs = {pool.submit(compress_one, input_root / rel, dest, reference_rate): rel for dest, rel in todo.items()}
        for job in as_completed(jobs):
            relative = jobs[job]
            try:
                warned = job.result()
                report.encoded.append(relative)
                if warned:
                    report.warnings.append((relative, warned))
            except FFmpegError as error:
                report.failed.append((relative, error.reason))
            bar.update(1)
            bar.set_postfix(failed=len(report.failed))
    report.encoded.sort()
    report.failed.sort()
    report.warnings.sort()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_root", required=True, help="folder of raw videos (walked recursively)")
    parser.add_argument("--output_root", required=True, help="where the .mp4 files go (same tree)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel ffmpeg processes")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--reference_rate", action="store_true",
                        help="keep frames with the output option -r 3 as the reference's script does, "
                             "instead of the fps filter (other source frames can be kept)")
    args = parser.parse_args(argv)
    report = compress_videos(args.input_root, args.output_root, args.workers,
                             progress=not args.no_progress, reference_rate=args.reference_rate)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
