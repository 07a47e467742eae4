"""Frame reading and sampling: real tiny mp4 files, hand-computed sampling expectations."""
import numpy as np
import pytest

from emcl_nb.data import video as video_module
from emcl_nb.data.ffmpeg import write_video
from emcl_nb.data.video import VideoReadError, decode_size, load_clip, read_frames, sample_indices, video_info

FPS = 3
NUM_FRAMES = 10


def grey_levels(num_frames):
    """Frame t is a flat grey 20*t + 10, so a decoded frame tells its own index."""
    return 20 * np.arange(num_frames) + 10


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "clip.mp4"
    frames = np.broadcast_to(grey_levels(NUM_FRAMES)[:, None, None, None],
                             (NUM_FRAMES, 32, 64, 3)).astype(np.uint8)
    write_video(path, frames, FPS)
    return path


def decoded_index(frames):
    """Index of each decoded flat grey frame (codec error is a few levels at most)."""
    means = frames.reshape(len(frames), -1).mean(axis=1)
    return np.rint((means - 10) / 20).astype(int)


# ---------------------------------------------------------------- sampling

def test_short_video_keeps_every_candidate_and_pads():
    # 10 frames at 3 fps, one frame per second: stride 3 -> 0, 3, 6, 9; 8 padding slots
    indices, mask = sample_indices(10, 3.0, max_frames=12, video_framerate=1)
    assert indices.tolist() == [0, 3, 6, 9]
    assert mask.tolist() == [1] * 4 + [0] * 8
    assert indices.dtype == np.int64 and mask.dtype == np.int64


def test_long_video_is_thinned_with_floored_linspace():
    # 90 frames at 3 fps: candidates 0, 3, ..., 87 (30 of them); linspace(0, 29, 12)
    # = 0, 2.64, 5.27, 7.91, 10.55, 13.18, 15.82, 18.45, 21.09, 23.73, 26.36, 29 -> floors
    indices, mask = sample_indices(90, 3.0, max_frames=12, video_framerate=1)
    positions = [0, 2, 5, 7, 10, 13, 15, 18, 21, 23, 26, 29]
    assert indices.tolist() == [3 * p for p in positions]
    assert indices[0] == 0 and indices[-1] == 87          # first and last candidates kept
    assert mask.tolist() == [1] * 12


def test_segment_uses_floored_frame_numbers_and_rounded_stride():
    # 29.97 fps: stride round(29.97) = 30; start int(2.5 * 29.97) = 74, end int(4 * 29.97) = 119
    indices, mask = sample_indices(300, 29.97, max_frames=4, video_framerate=1, start=2.5, end=4.0)
    assert indices.tolist() == [74, 104]
    assert mask.tolist() == [1, 1, 0, 0]


def test_segment_end_past_the_video_stops_at_the_last_frame():
    # ActivityNet ends at ceil(duration): 10 frames at 3 fps end at 3.33 s, segment [0, 4]
    indices, _ = sample_indices(10, 3.0, max_frames=12, video_framerate=1, start=0, end=4)
    assert indices.tolist() == [0, 3, 6, 9]


def test_higher_framerate_and_single_frame():
    # 3 fps sampled at 3 frames/s: stride 1, all 5 frames; max_frames 1 keeps the first
    assert sample_indices(5, 3.0, 12, 3)[0].tolist() == [0, 1, 2, 3, 4]
    indices, mask = sample_indices(90, 3.0, max_frames=1, video_framerate=1)
    assert indices.tolist() == [0] and mask.tolist() == [1]


def test_segment_outside_the_video_is_an_error():
    with pytest.raises(ValueError, match="outside the video"):
        sample_indices(10, 3.0, 12, 1, start=20.0, end=31.0)
    with pytest.raises(ValueError, match="frame rate"):
        sample_indices(10, 0.0, 12, 1)


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("backend", [None, "decord", "av"])
def test_read_frames_returns_the_requested_frames(clip_path, backend):
    if backend == "decord" and video_module.decord is None:
        pytest.skip("decord not installed")
    assert video_info(clip_path, backend) == (NUM_FRAMES, pytest.approx(FPS))
    frames = read_frames(clip_path, [0, 3, 9, 4], backend)
    assert frames.dtype == np.uint8 and frames.shape == (4, 32, 64, 3)
    assert decoded_index(frames).tolist() == [0, 3, 9, 4]


def test_decode_size_keeps_the_aspect_and_headroom():
    assert decode_size(7680, 4320, 224) == (796, 448)               # 8K: short side 2 x 224
    assert decode_size(4320, 7680, 224) == (448, 796)               # portrait
    assert decode_size(398, 224, 224) is None and decode_size(896, 448, 224) is None
    assert decode_size(7680, 4320, None) is None


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_large_videos_are_decoded_at_the_size_sampling_needs(clip_path, backend):
    if backend == "decord" and video_module.decord is None:
        pytest.skip("decord not installed")
    # the clip is 64x32; frames wanted with a short side of 8 are decoded at 32x16
    frames, mask = load_clip(clip_path, 4, 1, backend=backend, short_side=8)
    assert frames.shape == (4, 16, 32, 3) and mask.tolist() == [1] * 4
    assert decoded_index(frames).tolist() == [0, 3, 6, 9]
    assert read_frames(clip_path, [2], backend, short_side=16).shape == (1, 32, 64, 3)   # not larger


def test_backends_decode_identical_pixels(clip_path):
    if video_module.decord is None:
        pytest.skip("decord not installed")
    np.testing.assert_array_equal(read_frames(clip_path, [1, 5], "decord"),
                                  read_frames(clip_path, [1, 5], "av"))


def test_load_clip_samples_one_frame_per_second(clip_path):
    frames, mask = load_clip(clip_path, max_frames=6, video_framerate=1)
    assert decoded_index(frames).tolist() == [0, 3, 6, 9]
    assert mask.tolist() == [1, 1, 1, 1, 0, 0]
    frames, mask = load_clip(clip_path, max_frames=6, video_framerate=1, start=1.0, end=2.0)
    assert decoded_index(frames).tolist() == [3, 6]


def test_out_of_range_index_is_an_index_error(clip_path):
    with pytest.raises(IndexError, match="outside 0..9"):
        read_frames(clip_path, [0, 10])


# ---------------------------------------------------------------- bad files

def expect_read_error(path, reason):
    with pytest.raises(VideoReadError, match=reason) as caught:
        read_frames(path, [0])
    assert caught.value.path == path and str(path) in str(caught.value)


def test_missing_file(tmp_path):
    expect_read_error(tmp_path / "absent.mp4", "file not found")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    expect_read_error(path, r"empty file \(0 bytes\)")


def test_garbage_and_truncated_files(tmp_path, clip_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_read_error(garbage, "cannot decode")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip_path.read_bytes()[: clip_path.stat().st_size // 2])
    expect_read_error(truncated, "cannot decode")


class _FakeVideo:
    """Stands in for a decoder that opens a file but reports unusable metadata."""
    num_frames, fps = 10, 3.0

    def __init__(self, path, short_side=None):
        pass

    def frames(self, indices):
        raise AssertionError("must not decode a video with unusable metadata")


@pytest.mark.parametrize("num_frames, fps, reason", [
    (0, 3.0, "no frames"), (10, 0.0, "no usable frame rate"), (10, float("nan"), "no usable frame rate")])
def test_zero_frames_or_frame_rate_in_metadata(clip_path, monkeypatch, num_frames, fps, reason):
    fake = type("Fake", (_FakeVideo,), {"num_frames": num_frames, "fps": fps})
    monkeypatch.setitem(video_module.BACKENDS, "av", fake)
    with pytest.raises(VideoReadError, match=reason):
        load_clip(clip_path, 12, 1, backend="av")
