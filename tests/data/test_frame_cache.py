"""The decoded-frame cache on tiny generated videos: the same batches as decoding, no
decoding in epochs, invalidation, resuming an interrupted build, unreadable videos."""
import json
import os

import numpy as np
import pytest
import torch

from emcl_nb.data import dataset as dataset_module
from emcl_nb.data import frame_cache, video
from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import TrainDataset, VideoDataset, build_loader
from emcl_nb.data.frame_cache import FrameCache, FrameCacheError, build_frame_cache, build_frame_caches
from emcl_nb.data.prepare import ensure_data
from emcl_nb.data.video import VideoReadError
from tests.data.test_dataset import FRAME_COUNTS, SAMPLED, frame_levels, write_layout


@pytest.fixture
def params(tmp_path):
    return write_layout(tmp_path).replace(frame_cache=True, frame_cache_dir=str(tmp_path / "cache"),
                                          progress=False)


def forbid_decoding(monkeypatch):
    """Make every way of decoding a video fail."""
    def refuse(*args, **kwargs):
        raise AssertionError("a video was decoded")
    monkeypatch.setattr(video, "_open", refuse)
    monkeypatch.setattr(dataset_module, "load_clip", refuse)


def cache_files(params, split="train"):
    return sorted(path.name for path in (frame_cache.cache_root(params)).glob(f"{split}-*/*"))


def test_build_reports_size_and_frames(params):
    reports = build_frame_caches(params)
    assert [report["split"] for report in reports] == ["train", "test"]
    train = reports[0]
    sampled = sum(len(indices) for indices in SAMPLED)
    assert train["clips"] == len(FRAME_COUNTS) and train["frames"] == sampled
    assert train["bytes"] == sampled * 40 * 56 * 3          # uint8, stored size, no crop
    assert train["unreadable"] == [] and train["build_seconds"] >= 0
    stored = json.loads((frame_cache.cache_root(params).glob("train-*/cache.json").__next__()).read_text())
    assert stored == train
    assert build_frame_cache(params, "train") == {**train, "reused": True}     # reused, not rebuilt


@pytest.mark.parametrize("train", [False, True], ids=["test-transform", "augmented"])
def test_cached_clips_equal_decoded_clips(params, train):
    params = params.replace(train_augment=True)
    annotations = load_annotations(params, "train")
    build_frame_cache(params, "train")
    cached = TrainDataset(annotations, params, train=train)
    decoded = TrainDataset(annotations, params.replace(frame_cache=False), train=train)
    assert (cached.clips.transform.augment is not None) == train
    for key in [(epoch, index) for epoch in (0, 1) for index in range(len(annotations))]:
        a, b = cached[key], decoded[key]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a), key
    for index in range(len(annotations)):         # and they are the sampled frames
        item = cached[(0, index)]
        if not train:
            assert frame_levels(item["video"], item["frame_mask"]) == SAMPLED[int(item["video_index"])]


def test_an_epoch_with_the_cache_decodes_no_video(params, monkeypatch):
    ensure_data(params)                           # builds the caches, as training does
    forbid_decoding(monkeypatch)
    annotations = load_annotations(params, "train")
    loader = build_loader(TrainDataset(annotations, params, train=True), params.replace(batch_size=4),
                          train=True)
    batches = list(loader)
    assert sum(len(batch["index"]) for batch in batches) == len(annotations)
    assert all(batch["skipped"].numel() == 0 for batch in batches)
    test = load_annotations(params, "test")
    videos = list(build_loader(VideoDataset(test, params), params, train=False))
    assert torch.cat([batch["video_index"] for batch in videos]).tolist() == list(range(test.num_videos))


def test_other_settings_or_changed_videos_do_not_use_the_cache(params, tmp_path):
    build_frame_cache(params, "train")
    annotations = load_annotations(params, "train")
    with pytest.raises(FrameCacheError, match=r"other settings.*python -m emcl_nb\.data\.frame_cache"):
        FrameCache(params.replace(max_frames=3), annotations)
    with pytest.raises(FrameCacheError, match="no frame cache"):
        FrameCache(params.replace(video_framerate=2), annotations)
    changed = tmp_path / "videos" / "video2.mp4"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    with pytest.raises(FrameCacheError, match="no frame cache"):
        FrameCache(params, annotations)
    rebuilt = build_frame_cache(params, "train")            # the new settings get their own cache
    assert len(list(frame_cache.cache_root(params).glob("train-*"))) == 2
    assert FrameCache(params, annotations).folder == frame_cache.Path(rebuilt["folder"])


def test_an_interrupted_build_resumes_where_it_stopped(params, monkeypatch):
    monkeypatch.setattr(frame_cache, "CHUNK_BYTES", 1)      # one clip per chunk
    real_load_clip, calls = frame_cache.load_clip, []

    def killed_at_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load_clip(*args, **kwargs)
    monkeypatch.setattr(frame_cache, "load_clip", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        build_frame_cache(params, "train")
    folder = next(frame_cache.cache_root(params).glob("train-*"))
    assert sorted(path.name for path in folder.glob("chunk-*")) == [
        "chunk-00000.json", "chunk-00000.u8", "chunk-00001.json", "chunk-00001.u8"]
    annotations = load_annotations(params, "train")
    with pytest.raises(FrameCacheError, match="incomplete.*to resume"):
        FrameCache(params, annotations)
    # what a kill during a write leaves: a temporary, and a chunk renamed before its index
    (folder / ".chunk-00002.u8.123.tmp").write_bytes(b"half")
    (folder / "chunk-00002.u8").write_bytes(b"no index")

    calls.clear()
    monkeypatch.setattr(frame_cache, "load_clip", lambda *a, **k: calls.append(a[0]) or real_load_clip(*a, **k))
    report = build_frame_cache(params, "train")
    assert [path.name for path in calls] == ["video2.mp4", "video3.mp4"]    # only the rest
    assert report["frames"] == sum(len(indices) for indices in SAMPLED)
    assert not list(folder.glob("*.tmp"))
    cached = TrainDataset(annotations, params, train=False)
    decoded = TrainDataset(annotations, params.replace(frame_cache=False), train=False)
    for index in range(len(annotations)):
        assert torch.equal(cached[index]["video"], decoded[index]["video"])


def test_unreadable_videos_follow_on_bad_sample(tmp_path, caplog, monkeypatch):
    params = write_layout(tmp_path, broken_video="video1").replace(
        frame_cache=True, frame_cache_dir=str(tmp_path / "cache"), progress=False)
    (tmp_path / "videos" / "video3.mp4").write_bytes(os.urandom(2000))      # corrupt
    strict = params.replace(on_bad_sample="raise")
    with pytest.raises(VideoReadError, match=r"video1\.mp4: empty file"):
        build_frame_cache(strict, "train")

    report = build_frame_cache(params, "train")
    assert sorted(os.path.basename(bad["video"]) for bad in report["unreadable"]) == [
        "video1.mp4", "video3.mp4"]
    assert report["frames"] == len(SAMPLED[0]) + len(SAMPLED[2])
    forbid_decoding(monkeypatch)
    annotations = load_annotations(params, "train")
    batch = next(iter(build_loader(TrainDataset(annotations, params, train=False), params, train=True)))
    bad = set(annotations.caption_groups[1]) | set(annotations.caption_groups[3])
    assert set(batch["skipped"].tolist()) == bad
    assert set(batch["index"].tolist()) == set(range(len(annotations))) - bad
    assert "video1.mp4" in caplog.text and "video3.mp4" in caplog.text
    with pytest.raises(VideoReadError, match=r"video[13]\.mp4: (empty file|decord: cannot decode)"):
        list(build_loader(TrainDataset(annotations, strict, train=False), strict, train=True))


def test_cached_frames_are_a_read_only_view_of_the_map(params):
    build_frame_cache(params, "train")
    cache = FrameCache(params, load_annotations(params, "train"))
    frames, mask = cache.clip(2, None, None)
    assert frames.dtype == np.uint8 and frames.shape == (4, 40, 56, 3)
    assert mask.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="read-only"):
        frames[:] = 0
    with pytest.raises(FrameCacheError, match="not in the frame cache"):
        cache.clip(2, 0.0, 1.0)


def test_command_builds_with_worker_processes(params, tmp_path, capsys):
    import yaml
    settings = {key: getattr(params, key) for key in (
        "anno_path", "video_path", "frame_cache_dir", "max_frames", "image_size", "max_words")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(settings))
    assert frame_cache.main(["--params", str(tmp_path / "tiny.yaml"), "--splits", "train",
                             "--set", "num_workers=2", "--no_progress"]) == 0
    assert "frame cache train: 4 clips, 13 frames" in capsys.readouterr().out
    cached = TrainDataset(load_annotations(params, "train"), params, train=False)
    assert frame_levels(cached[0]["video"], cached[0]["frame_mask"]) == SAMPLED[0]


def test_a_cache_being_built_elsewhere_is_named_as_a_cache(params):
    """The message of a busy cache spoke of runs ("use another run name"), which does not
    apply to a cache every run shares."""
    from emcl_nb.io import FolderBusyError, folder_lock
    annotations = load_annotations(params, "train")
    folder = frame_cache.cache_folder(params, annotations, frame_cache.split_clips(annotations))
    with folder_lock(folder, frame_cache.CACHE_ADVICE):
        with pytest.raises(FolderBusyError, match="building this frame cache") as error:
            build_frame_cache(params, "train")
    assert "run name" not in str(error.value)
