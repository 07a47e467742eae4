"""Video compression: sizes, frame rate, kept tree, resumability and failure reporting."""
import subprocess
import sys

import decord
import numpy as np
import pytest

from emcl_nb.data.compress import compress_videos, main
from emcl_nb.data.ffmpeg import PARTIAL_SUFFIX, write_video


def make_video(path, width, height, seconds=2, fps=25):
    """A raw clip with a moving bar, so the encoder has real content."""
    frames = np.zeros((seconds * fps, height, width, 3), np.uint8)
    for t in range(len(frames)):
        frames[t, :, (t * 3) % width] = 255
    write_video(path, frames, fps)


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    make_video(root / "phone" / "portrait.MOV", 180, 320)   # upper-case extension counts too
    make_video(root / "landscape.avi", 320, 180)
    (root / "notes.txt").write_text("not a video")
    return root


def read(path):
    reader = decord.VideoReader(str(path))
    return reader[0].shape, len(reader), reader.get_avg_fps()


def test_sizes_fps_and_tree(raw, tmp_path):
    out = tmp_path / "out"
    report = compress_videos(raw, out, workers=2, progress=False)
    assert report.ok and len(report.encoded) == 2 and report.ignored == [raw.joinpath("notes.txt").relative_to(raw)]
    # portrait 180x320 -> 224 wide, 398 high (not squashed); landscape the other way round
    assert read(out / "phone" / "portrait.mp4") == ((398, 224, 3), 6, 3.0)
    assert read(out / "landscape.mp4") == ((224, 398, 3), 6, 3.0)
    assert not (out / "notes.txt").exists()          # nothing copied
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["landscape.mp4", "portrait.mp4"]


def test_rerun_skips_finished_and_removes_partials(raw, tmp_path):
    out = tmp_path / "out"
    compress_videos(raw, out, workers=1, progress=False)
    finished = out / "landscape.mp4"
    before = finished.stat().st_mtime_ns
    # what a killed run leaves behind: one output missing, a half-written temporary file
    (out / "phone" / "portrait.mp4").unlink()
    stale = out / "phone" / f".portrait.mp4.123-456{PARTIAL_SUFFIX}"
    stale.write_bytes(b"half a video")
    report = compress_videos(raw, out, workers=1, progress=False)
    assert [p.name for p in report.encoded] == ["portrait.MOV"]
    assert [p.name for p in report.skipped] == ["landscape.avi"]
    assert finished.stat().st_mtime_ns == before
    assert not stale.exists()
    assert read(out / "phone" / "portrait.mp4")[0] == (398, 224, 3)


def test_corrupt_input_is_listed_and_cli_fails(raw, tmp_path):
    (raw / "broken.mp4").write_bytes(b"\x00not really an mp4" * 100)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "emcl_nb.data.compress", "--input_root", str(raw),
                             "--output_root", str(out), "--workers", "2", "--no_progress"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "broken.mp4" in failed[0] and len(failed[0]) > len("FAILED broken.mp4: ") + 5
    assert "encoded 2" in result.stdout
    assert not (out / "broken.mp4").exists()
    assert not list(out.rglob(f"*{PARTIAL_SUFFIX}"))


def test_name_collision_and_bad_roots(raw, tmp_path):
    make_video(raw / "landscape.mkv", 64, 48, seconds=1)   # would also become landscape.mp4
    report = compress_videos(raw, tmp_path / "out", workers=1, progress=False)
    assert [p.name for p, _ in report.failed] == ["landscape.mkv"]
    assert "landscape.avi" in report.failed[0][1]
    assert main(["--input_root", str(raw), "--output_root", str(tmp_path / "out"), "--no_progress"]) == 1
    with pytest.raises(ValueError, match="output_root"):
        compress_videos(raw, raw / "compressed", progress=False)
    with pytest.raises(FileNotFoundError, match="input_root"):
        compress_videos(tmp_path / "missing", tmp_path / "out2", progress=False)


@pytest.fixture
def faulty(tmp_path):
    """Inputs ffmpeg encodes with exit status 0 although they are bad: a faststart mp4 cut
    to 35 % of its bytes (10 s stated), a 1-frame video, one with bytes flipped mid-stream."""
    from emcl_nb.data.ffmpeg import ffmpeg_binary

    root = tmp_path / "faulty"
    make_video(tmp_path / "ten.mp4", 64, 48, seconds=10, fps=10)
    subprocess.run([ffmpeg_binary(), "-loglevel", "error", "-i", str(tmp_path / "ten.mp4"), "-c", "copy",
                    "-movflags", "+faststart", str(tmp_path / "fast.mp4")], check=True)
    data = (tmp_path / "fast.mp4").read_bytes()
    root.mkdir()
    (root / "truncated.mp4").write_bytes(data[:int(len(data) * 0.35)])
    damaged = bytearray(data)
    for i in range(len(data) // 2, len(data) // 2 + 300, 7):
        damaged[i] ^= 0xFF
    (root / "damaged.mp4").write_bytes(bytes(damaged))
    write_video(root / "one_frame.mp4", np.full((1, 48, 64, 3), 200, np.uint8), 25)
    return root


def test_outputs_are_checked_against_the_input_and_failures_are_redone(faulty, tmp_path):
    out = tmp_path / "out"
    report = compress_videos(faulty, out, workers=2, progress=False)
    reasons = dict((path.name, reason) for path, reason in report.failed)
    assert set(reasons) == {"truncated.mp4", "one_frame.mp4"}
    assert "but the input lasts 10.00 s: the input is truncated" in reasons["truncated.mp4"]
    assert "no usable video" in reasons["one_frame.mp4"]
    # the damaged one decodes to a full-length output, with ffmpeg's complaints reported
    assert [p.name for p in report.encoded] == ["damaged.mp4"]
    assert [p.name for p, _ in report.warnings] == ["damaged.mp4"] and "WARNING damaged.mp4" in report.summary()
    frames, fps = read(out / "damaged.mp4")[1:]
    assert 27 <= frames <= 31 and fps == pytest.approx(3.0)           # 10 s at 3 fps, give or take concealment
    assert sorted(p.name for p in out.iterdir()) == ["damaged.mp4"]     # nothing under a failed name
    again = compress_videos(faulty, out, workers=2, progress=False)
    assert sorted(p.name for p, _ in again.failed) == ["one_frame.mp4", "truncated.mp4"]
    assert [p.name for p in again.skipped] == ["damaged.mp4"]


def test_non_square_pixels_are_made_square(tmp_path):
    from emcl_nb.data.ffmpeg import encode_mp4

    make_video(tmp_path / "square.mp4", 64, 48, seconds=1)
    # stored 64x48 with sample aspect 2:1: shown 128x48
    encode_mp4(["-i", str(tmp_path / "square.mp4")], tmp_path / "raw" / "wide.mp4", ["-vf", "setsar=2"])
    report = compress_videos(tmp_path / "raw", tmp_path / "out", workers=1, progress=False)
    assert report.ok
    height, width, _ = read(tmp_path / "out" / "wide.mp4")[0]
    assert height == 224 and abs(width - 224 * 128 / 48) <= 2           # 597.3, rounded to even
