"""Synthetic MSR-VTT-layout dataset: files, decoding, determinism, captions vs. pixels."""
import csv
import hashlib
import json

import decord
import numpy as np
import pytest

from emcl_nb.data.synthetic import (
    CAPTION_TEMPLATES,
    COLOURS,
    DEFAULT_TEMPLATES,
    DIRECTIONS,
    _mask,
    _position,
    captions,
    generate_from_params,
    generate_synthetic,
    plan_videos,
    render,
)
from emcl_nb.params import Params

TINY = dict(train=6, val=2, test=4, frames=6, fps=3, size=32, progress=False)


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "a", seed=3, workers=1, **TINY)


def test_layout(tiny):
    data = json.loads((tiny / "MSRVTT_data.json").read_text())
    assert set(data) == {"videos", "sentences"}
    train = [r["video_id"] for r in read_csv(tiny / "MSRVTT_train.9k.csv")]
    val = [r["video_id"] for r in read_csv(tiny / "MSRVTT_val.csv")]
    test_rows = read_csv(tiny / "MSRVTT_JSFUSION_test.csv")
    assert list(test_rows[0]) == ["key", "vid_key", "video_id", "sentence"]
    test = [r["video_id"] for r in test_rows]
    assert (len(train), len(val), len(test)) == (6, 2, 4)
    assert len(set(train) | set(val) | set(test)) == 12
    assert sorted(v["video_id"] for v in data["videos"]) == sorted(train + val + test)
    per_video = {}
    for s in data["sentences"]:
        assert set(s) == {"video_id", "caption", "sen_id"}
        per_video.setdefault(s["video_id"], []).append(s["caption"])
    assert all(len(c) == DEFAULT_TEMPLATES == 3 for c in per_video.values())
    assert len({s["sen_id"] for s in data["sentences"]}) == len(data["sentences"])
    for row in test_rows:                      # the test sentence is one of that video's captions
        assert row["sentence"] in per_video[row["video_id"]]
    assert sorted(p.name for p in (tiny / "videos").iterdir()) == sorted(f"{v}.mp4" for v in per_video)


def test_videos_decode_with_requested_frames_and_fps(tiny):
    reader = decord.VideoReader(str(tiny / "videos" / "video0.mp4"))
    assert (len(reader), reader.get_avg_fps(), reader[0].shape) == (6, 3.0, (32, 32, 3))


def test_deterministic_per_seed_and_independent_of_workers(tiny, tmp_path):
    again = generate_synthetic(tmp_path / "b", seed=3, workers=2, **TINY)
    other = generate_synthetic(tmp_path / "c", seed=4, workers=1, **TINY)
    reference = digests(tiny)
    assert digests(again) == reference
    changed = {k for k, v in digests(other).items() if reference.get(k) != v}
    assert "MSRVTT_data.json" in changed and "videos/video0.mp4" in changed


def test_rerun_is_noop_resume_and_settings_change(tiny, tmp_path):
    folder = generate_synthetic(tmp_path / "d", seed=3, workers=1, **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    generate_synthetic(folder, seed=3, workers=1, **TINY)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps
    # a deleted video is noticed and redrawn, the rest is kept
    (folder / "videos" / "video2.mp4").unlink()
    generate_synthetic(folder, seed=3, workers=1, **TINY)
    assert digests(folder) == digests(tiny)
    # interrupted run: manifest not complete, one video missing -> only that one is redone
    manifest = json.loads((folder / "synthetic.json").read_text())
    (folder / "synthetic.json").write_text(json.dumps(dict(manifest, complete=False)))
    (folder / "videos" / "video1.mp4").unlink()
    (folder / "videos" / ".video1.mp4.99-1.partial").write_bytes(b"killed half-way")
    generate_synthetic(folder, seed=3, workers=1, **TINY)
    assert (folder / "videos" / "video0.mp4").stat().st_mtime_ns == stamps[folder / "videos" / "video0.mp4"]
    assert digests(folder) == digests(tiny)
    # other settings: everything redone, videos of the old set removed
    generate_synthetic(folder, seed=3, workers=1, **dict(TINY, train=2))
    assert len(list((folder / "videos").iterdir())) == 8


def test_captions_and_pixels_follow_the_metadata():
    size, frames = 64, 12
    videos = plan_videos(train=30, val=0, test=20, seed=0, frames=frames, size=size, distractors=0)
    test_combos = {(v["shape"], v["colour"], v["second_colour"], v["direction"])
                   for v in videos if v["split"] == "test"}
    assert len(test_combos) == 20                       # test videos are distinguishable
    for video in videos[:8]:
        for text in captions(video, templates=len(CAPTION_TEMPLATES)):
            assert video["shape"] in text
            assert text.index(video["colour"]) < text.index(video["second_colour"])  # time order
            assert any(word in text for word in DIRECTIONS[video["direction"]][1:])
        clip = render(video, frames, size, seed=0)
        for t in (0, frames - 1):
            x, y = _position(video, t, frames)
            colour = video["colour"] if t < video["change_frame"] else video["second_colour"]
            assert np.array_equal(clip[t, int(y), int(x)], COLOURS[colour])
        (dx, dy), _, _ = DIRECTIONS[video["direction"]]
        start, end = np.array(_position(video, 0, frames)), np.array(_position(video, frames - 1, frames))
        assert np.allclose(end - start, np.array([dx, dy]) * video["travel"])
        assert video["travel"] > 0.25 * size


def test_distractors_are_drawn_and_bad_arguments_rejected(tmp_path):
    plain = plan_videos(train=1, val=0, test=1, seed=0, frames=6, size=32, distractors=0)[0]
    busy = plan_videos(train=1, val=0, test=1, seed=0, frames=6, size=32, distractors=3)[0]
    assert len(busy["distractors"]) == 3 and plain["distractors"] == []
    assert (render(busy, 6, 32, 0) > 150).sum() > (render(plain, 6, 32, 0) > 150).sum()
    with pytest.raises(ValueError, match="size must be even"):
        generate_synthetic(tmp_path, size=33, progress=False)
    with pytest.raises(ValueError, match="test must be"):
        generate_synthetic(tmp_path, test=0, progress=False)


def test_every_shape_fills_the_same_box():
    """Circle, square and triangle span the same 2r x 2r box, so that a circle and a square
    differ by more than a few corner pixels; only the square fills its corners."""
    size, radius, cx, cy = 64, 10.0, 32.0, 32.0
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    for shape in ("circle", "square", "triangle"):
        painted = _mask(shape, cx, cy, radius, xs, ys)
        width, height = np.ptp(xs[painted]) + 1, np.ptp(ys[painted]) + 1   # pixels, centres + 1
        assert abs(width - 2 * radius) <= 1 and abs(height - 2 * radius) <= 1, shape
        corner = painted[int(cy + 0.9 * radius), int(cx + 0.9 * radius)]   # bottom right
        assert corner == (shape in ("square", "triangle")), shape
        assert painted[int(cy - 0.9 * radius), int(cx - 0.9 * radius)] == (shape == "square"), shape


@pytest.mark.parametrize("scale", [0.5, 2.5])
def test_shape_scale_sizes_shapes_that_stay_inside_and_move(scale, tmp_path):
    size, frames = 64, 8
    base = plan_videos(train=40, val=0, test=0, seed=0, frames=frames, size=size, distractors=1)
    scaled = plan_videos(train=40, val=0, test=0, seed=0, frames=frames, size=size, distractors=1,
                         shape_scale=scale)
    for a, b in zip(base, scaled):
        assert b["radius"] == pytest.approx(a["radius"] * scale, abs=2e-3)   # radii are rounded to 1e-3
        for item in (b, *b["distractors"]):
            assert item["travel"] > 0
            for t in (0, frames - 1):               # the whole shape inside the frame
                x, y = _position(item, t, frames)
                assert item["radius"] <= min(x, y, size - x, size - y) + 1e-6
    with pytest.raises(ValueError, match="shape_scale"):
        generate_synthetic(tmp_path, shape_scale=3.0, progress=False)


def test_more_templates_add_paraphrases_and_keep_the_videos(tiny, tmp_path):
    every = generate_synthetic(tmp_path / "all", seed=3, workers=1, templates=len(CAPTION_TEMPLATES),
                               **TINY)
    sentences = json.loads((every / "MSRVTT_data.json").read_text())["sentences"]
    default = json.loads((tiny / "MSRVTT_data.json").read_text())["sentences"]
    per_video = {}
    for s in sentences:
        per_video.setdefault(s["video_id"], []).append(s["caption"])
    assert all(len(set(c)) == len(CAPTION_TEMPLATES) == 7 for c in per_video.values())
    for video_id, texts in per_video.items():   # the default's captions are the first three
        assert texts[:3] == [s["caption"] for s in default if s["video_id"] == video_id]
    same_videos = {k: v for k, v in digests(every).items() if k.startswith("videos/")}
    assert same_videos == {k: v for k, v in digests(tiny).items() if k.startswith("videos/")}
    with pytest.raises(ValueError, match="templates must be at most 7"):
        generate_synthetic(tmp_path / "x", templates=8, progress=False)


def test_generate_from_params_uses_the_synthetic_fields(tiny, tmp_path):
    params = Params(anno_path=str(tmp_path / "p"), video_path=str(tmp_path / "p" / "videos"),
                    synthetic_seed=3, synthetic_train=6, synthetic_val=2, synthetic_test=4,
                    synthetic_frames=6, synthetic_fps=3, synthetic_size=32, progress=False)
    assert digests(generate_from_params(params)) == digests(tiny)
    five = generate_from_params(params.replace(anno_path=str(tmp_path / "q"), synthetic_templates=5,
                                               video_path=str(tmp_path / "q" / "videos")))
    sentences = json.loads((five / "MSRVTT_data.json").read_text())["sentences"]
    assert len(sentences) == 5 * 12                               # 12 videos, 5 paraphrases each
    with pytest.raises(ValueError, match="video_path"):
        generate_from_params(params.replace(video_path=str(tmp_path / "elsewhere")))
