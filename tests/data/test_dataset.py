"""Tokenizer, transforms, datasets and loaders on tiny generated videos (MSR-VTT layout)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import TextDataset, TrainDataset, VideoDataset, _tokenizer, build_loader, tokenize
from emcl_nb.data.ffmpeg import write_video
from emcl_nb.data.transforms import FrameTransform, build_transform, resize_center_crop
from emcl_nb.data.video import VideoReadError
from emcl_nb.params import Params

FPS = 3
FRAME_COUNTS = [4, 7, 12, 30]          # sampled at 1 frame/s, max 4: 2, 3, 4, 4 frames
SAMPLED = [[0, 3], [0, 3, 6], [0, 3, 6, 9], [0, 9, 18, 27]]
CAPTIONS_PER_VIDEO = 2


def level(t):
    """Grey level of frame t: the mean of a decoded frame tells which frame it is."""
    return 7 * t + 20


def clip_frames(num_frames, height=40, width=56):
    """Frame t: grey level(t), left half +15 and right half -15 (texture for RandAugment)."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, :, : width // 2] = level(t) + 15
        frames[t, :, width // 2:] = level(t) - 15
    return frames


def write_layout(root, broken_video=None):
    """MSR-VTT layout with len(FRAME_COUNTS) videos; `broken_video` becomes a 0-byte file."""
    ids = [f"video{k}" for k in range(len(FRAME_COUNTS))]
    (root / "anno").mkdir(parents=True)
    (root / "anno" / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(ids) + "\n")
    (root / "anno" / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n" + "".join(f"ret{k},msr{k},{v},a test caption {k}\n"
                                                   for k, v in enumerate(ids)))
    sentences = [{"video_id": v, "caption": f"a shape number {k} moves {c}", "sen_id": 0}
                 for c in range(CAPTIONS_PER_VIDEO) for k, v in enumerate(ids)]
    (root / "anno" / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    for video_id, count in zip(ids, FRAME_COUNTS):
        path = root / "videos" / f"{video_id}.mp4"
        if video_id == broken_video:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            write_video(path, clip_frames(count), FPS)
    return Params().replace(anno_path=str(root / "anno"), video_path=str(root / "videos"),
                            max_frames=4, max_words=12, image_size=32, batch_size=8,
                            batch_size_val=8, num_workers=0, seed=3)


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("msrvtt"))


@pytest.fixture(scope="module")
def train_annotations(params):
    return load_annotations(params, "train")


def frame_levels(video, frame_mask):
    """Nearest frame index of each real frame of a uint8 [T,3,S,S] clip."""
    means = video[frame_mask.bool()].float().mean(dim=(1, 2, 3))
    return torch.round((means - 20) / 7).long().tolist()


# ---------------------------------------------------------------- tokenizer

def test_tokenize_wraps_truncates_and_pads():
    tokenizer = _tokenizer()
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    short, long = "a man is singing", " ".join(["word"] * 40)
    ids, mask = tokenize([short, long], max_words=10)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (2, 10)
    body = tokenizer.encode(short)
    assert ids[0].tolist() == [sot, *body, eot] + [0] * (8 - len(body))
    assert ids[1].tolist() == [sot, *tokenizer.encode(long)[:8], eot]
    assert mask.tolist() == (ids != 0).long().tolist()
    assert mask[0].sum() == len(body) + 2


# ---------------------------------------------------------------- transforms

def test_resize_short_side_and_centre_crop_portrait():
    frame = torch.zeros(1, 3, 60, 40, dtype=torch.uint8)
    frame[..., :10, :] = frame[..., 50:, :] = 255        # bright bands top and bottom
    out = resize_center_crop(frame, 20)                  # 60x40 -> 30x20 -> rows 5..25
    assert out.shape == (1, 3, 20, 20) and out.dtype == torch.uint8
    assert out.float().mean() < 8, "the crop must drop the top and bottom bands"
    assert resize_center_crop(frame.transpose(-1, -2), 20).float().mean() < 8   # landscape


def test_augmentation_is_one_policy_per_clip_and_seeded():
    textured = torch.randint(0, 256, (1, 3, 48, 64), generator=torch.Generator().manual_seed(0),
                             dtype=torch.uint8)
    clip = textured.repeat(5, 1, 1, 1)                  # 5 identical frames
    augment, plain = FrameTransform(32, augment=True), FrameTransform(32, augment=False)
    outputs = [augment(clip, seed) for seed in range(6)]
    for out in outputs:
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
        assert all(torch.equal(out[0], frame) for frame in out), "frames augmented differently"
    assert torch.equal(augment(clip, 4), outputs[4])
    assert len({out.numpy().tobytes() for out in outputs}) > 1
    assert any(not torch.equal(out, plain(clip)) for out in outputs)
    with pytest.raises(ValueError, match="seed"):
        augment(clip)


# The reference's "increasing" RandAugment op set (its rand_augment.py), transcribed.
REFERENCE_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                 "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                 "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                 "TranslateXRel", "TranslateYRel"]


def test_augmentation_is_the_reference_policy():
    policy = FrameTransform(224, augment=True).augment
    assert policy.num_layers == 4 and policy.choice_weights is None
    assert [op.name for op in policy.ops] == REFERENCE_OPS
    for op in policy.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 7, 0.5)
        assert op.kwargs["fillcolor"] == (128, 128, 128)
        assert op.kwargs["resample"] == Image.BICUBIC
    translate = policy.ops[REFERENCE_OPS.index("TranslateXRel")]
    # of the frame's own width (random sign)
    assert abs(translate.level_fn(10, translate.hparams)[0]) == pytest.approx(0.45)


def test_every_frame_gets_the_draw_timm_makes_for_the_clip_seed():
    import random

    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    g = torch.Generator().manual_seed(1)
    clip = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)   # distinct frames
    transform = FrameTransform(32, augment=True)                   # 32 x 32: no resize or crop
    timm_policy = rand_augment_transform("rand-m7-n4-mstd0.5-inc1", {
        "translate_const": 14, "interpolation": Image.BICUBIC, "img_mean": (128, 128, 128)})
    changed = 0
    for seed in range(8):
        out = transform(clip, seed)
        for frame, augmented in zip(clip, out):
            random.seed(seed)
            np.random.seed(seed)
            want = np.array(timm_policy(Image.fromarray(frame.permute(1, 2, 0).numpy())))
            assert np.array_equal(augmented.permute(1, 2, 0).numpy(), want)
        changed += not torch.equal(out, clip)
    assert changed >= 4                                             # the policy does act


@pytest.mark.parametrize("layout, train, enabled, expected", [
    ("msrvtt", True, True, True), ("msvd", True, True, True), ("lsmdc", True, True, True),
    ("activity", True, True, False), ("didemo", True, True, False),
    ("msrvtt", False, True, False), ("msrvtt", True, False, False)])
def test_augmentation_only_where_the_reference_has_it(layout, train, enabled, expected):
    transform = build_transform(Params(train_augment=enabled, image_size=32), layout, train)
    assert (transform.augment is not None) == expected


# ---------------------------------------------------------------- datasets and loaders

def test_training_batch_shapes_and_frames(params, train_annotations):
    dataset = TrainDataset(train_annotations, params, train=False)
    batch = next(iter(build_loader(dataset, params, train=True)))
    n, T, S, L = 8, params.max_frames, params.image_size, params.max_words
    assert batch["video"].shape == (n, T, 3, S, S) and batch["video"].dtype == torch.uint8
    assert batch["frame_mask"].shape == (n, T) and batch["frame_mask"].dtype == torch.int64
    assert batch["text_ids"].shape == batch["text_mask"].shape == (n, L)
    assert batch["text_ids"].dtype == batch["text_mask"].dtype == torch.int64
    assert sorted(batch["index"].tolist()) == list(range(8))        # one shuffled epoch
    assert batch["skipped"].tolist() == []
    for row in range(n):
        index, video = int(batch["index"][row]), int(batch["video_index"][row])
        assert video == train_annotations.video_index[index]
        expected = SAMPLED[video]
        assert batch["frame_mask"][row].tolist() == [1] * len(expected) + [0] * (T - len(expected))
        assert frame_levels(batch["video"][row], batch["frame_mask"][row]) == expected
        assert batch["video"][row, len(expected):].eq(0).all()      # padding after the frames
        ids, _ = tokenize(train_annotations.samples[index].caption, L)
        assert torch.equal(batch["text_ids"][row], ids[0])


def epoch_batches(dataset, params, epoch, num_workers):
    loader = build_loader(dataset, params.replace(num_workers=num_workers, batch_size=4), train=True)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_augmented_epochs_do_not_depend_on_worker_count(params, train_annotations):
    dataset = TrainDataset(train_annotations, params, train=True)
    assert dataset.clips.transform.augment is not None
    single = epoch_batches(dataset, params, epoch=1, num_workers=0)
    workers = epoch_batches(dataset, params, epoch=1, num_workers=2)
    for a, b in zip(single, workers, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = epoch_batches(dataset, params, epoch=2, num_workers=0)
    def order(batches):
        return torch.cat([b["index"] for b in batches]).tolist()
    assert order(single) != order(other)
    # the same sample is augmented differently in another epoch, identically when repeated
    assert torch.equal(dataset[(1, 5)]["video"], dataset[(1, 5)]["video"])
    assert not torch.equal(dataset[(1, 5)]["video"], dataset[(2, 5)]["video"])


def test_evaluation_datasets_cover_texts_and_videos_once(params):
    test = load_annotations(params, "test")
    videos = list(build_loader(VideoDataset(test, params), params, train=False))
    assert torch.cat([b["video_index"] for b in videos]).tolist() == list(range(test.num_videos))
    batch = videos[0]
    assert set(batch) == {"video", "frame_mask", "video_index", "skipped"}
    assert batch["frame_mask"].sum(dim=1).tolist() == [len(s) for s in SAMPLED]
    texts = next(iter(build_loader(TextDataset(test, params), params, train=False)))
    assert set(texts) == {"text_ids", "text_mask", "index", "video_index", "skipped"}
    assert texts["index"].tolist() == list(range(len(test)))
    assert torch.equal(texts["text_ids"], tokenize([s.caption for s in test.samples],
                                                   params.max_words)[0])


def test_processes_get_disjoint_shares(params, train_annotations):
    dataset = TrainDataset(train_annotations, params, train=False)
    shares = []
    for rank in range(2):
        loader = build_loader(dataset, params.replace(batch_size=4), train=True, rank=rank,
                              world_size=2)
        batches = list(loader)
        assert all(len(b["index"]) == 2 for b in batches)            # 4 global = 2 per process
        shares.append({i for b in batches for i in b["index"].tolist()})
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(8))
    with pytest.raises(ValueError, match="divisible"):
        build_loader(dataset, params.replace(batch_size=3), train=True, world_size=2)


def test_unreadable_video_is_skipped_and_reported_or_raised(tmp_path, caplog):
    params = write_layout(tmp_path, broken_video="video1")
    annotations = load_annotations(params, "train")                  # the file exists
    broken = set(annotations.caption_groups[1])
    batch = next(iter(build_loader(TrainDataset(annotations, params, train=False), params,
                                   train=True)))
    assert set(batch["skipped"].tolist()) == broken
    assert set(batch["index"].tolist()) == set(range(8)) - broken and len(batch["video"]) == 6
    assert "video1.mp4" in caplog.text and "empty file" in caplog.text

    strict = params.replace(on_bad_sample="raise")
    with pytest.raises(VideoReadError, match=r"video1\.mp4: empty file"):
        list(build_loader(TrainDataset(annotations, strict, train=False), strict, train=True))

    alone = params.replace(batch_size_val=1)
    loader = build_loader(VideoDataset(annotations, alone), alone, train=False)
    with pytest.raises(RuntimeError, match="every video of this batch failed"):
        list(loader)


def test_loader_workers_are_capped_at_the_usable_cores(capsys, monkeypatch):
    from emcl_nb.data import workers

    monkeypatch.setattr(workers, "usable_cores", lambda: 2)
    workers._note_cap.cache_clear()
    assert workers.loader_workers(Params(num_workers=8)) == 2
    assert workers.loader_workers(Params(num_workers=8)) == 2
    assert capsys.readouterr().out.count("num_workers=8 is more than the 2 core(s)") == 1   # said once
    assert workers.loader_workers(Params(num_workers=1)) == 1
    assert workers.loader_workers(Params(num_workers=0)) == 0
