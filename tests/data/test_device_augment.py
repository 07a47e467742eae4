"""The device RandAugment against timm's PIL ops: each op, the draw, the distribution, training."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import TrainDataset, sample_seed
from emcl_nb.data.device_augment import DEVICE_OPS, OPS, SLOTS, augment_batch, draw_augmentation
from emcl_nb.data.transforms import FrameTransform
from emcl_nb.params import load_params
from emcl_nb.training import engine
from emcl_nb.training.run import train
from tests.test_train_cli import tiny_overrides

PIL_KWARGS = {"fillcolor": (128, 128, 128), "resample": Image.BICUBIC}
NO_ARGUMENT = ("AutoContrast", "Equalize", "Invert")
# an argument at magnitude 7 for each op with one (both signs where the op has a sign)
ARGUMENTS = {"Rotate": (21.3, -20.7), "PosterizeIncreasing": (2, 1), "SolarizeIncreasing": (77, 180),
             "SolarizeAdd": (77, 72), "ColorIncreasing": (1.63, 0.37), "ContrastIncreasing": (1.63, 0.37),
             "BrightnessIncreasing": (1.63, 0.37), "SharpnessIncreasing": (1.63, 0.37),
             "ShearX": (0.21, -0.19), "ShearY": (0.21, -0.19), "TranslateXRel": (0.315, -0.29),
             "TranslateYRel": (0.315, -0.29)}
# What the device ops may differ from PIL's by, in grey levels: measured at most 0.003 mean and
# 1 max (float32 against PIL's double at a truncation boundary).
MEAN_TOLERANCE, MAX_TOLERANCE = 0.01, 1


def natural_frame(height=48, width=80, seed=0) -> np.ndarray:
    """A frame with what photographs have: gradients in each channel, a sharp-edged patch, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width) + 60], -1)
    image[height // 4:height // 2, width // 3:2 * width // 3] = (200, 30, 90)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)                              # [H, W, 3]


def pil_op(name: str, frame: np.ndarray, argument) -> np.ndarray:
    arguments = () if name in NO_ARGUMENT else (argument,)
    return np.array(NAME_TO_OP[name](Image.fromarray(frame), *arguments, **PIL_KWARGS)).astype(int)


def device_op(name: str, frame: np.ndarray, argument) -> np.ndarray:
    video = torch.from_numpy(frame).permute(2, 0, 1)[None, None]                 # [1, 1, 3, H, W]
    out = DEVICE_OPS[OPS.index(name)](video, torch.tensor([float(argument)], dtype=torch.float64))
    assert out.dtype == torch.uint8 and out.shape == video.shape
    return out[0, 0].permute(1, 2, 0).numpy().astype(int)


CASES = [(name, 0) for name in NO_ARGUMENT] + [(name, a) for name, pair in ARGUMENTS.items() for a in pair]


@pytest.mark.parametrize("name, argument", CASES)
def test_each_device_op_is_the_pil_op(name, argument):
    frame = natural_frame()
    difference = np.abs(device_op(name, frame, argument) - pil_op(name, frame, argument))
    assert difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE, \
        (name, argument, difference.mean(), difference.max())


@pytest.mark.parametrize("name, wrong", [("Rotate", -21.3), ("ShearX", -0.21), ("ShearY", -0.21),
                                         ("TranslateXRel", -0.315), ("ColorIncreasing", 0.37)])
def test_the_fidelity_test_sees_a_wrong_sign(name, wrong):
    """The tolerances are far below what a sign error (or a wrong centre) costs."""
    frame = natural_frame()
    right = ARGUMENTS[name][0]
    assert np.abs(device_op(name, frame, wrong) - pil_op(name, frame, right)).mean() > 5


def test_rotation_is_about_the_frame_centre():
    frame = natural_frame()
    shifted = device_op("Rotate", np.roll(frame, 3, axis=1), 21.3)
    assert np.abs(np.roll(shifted, -3, axis=1) - pil_op("Rotate", frame, 21.3)).mean() > 5


INTEGER_ARGUMENT = ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd")


def apply_draw_with_timm(frame: np.ndarray, draw: torch.Tensor) -> np.ndarray:
    image = Image.fromarray(frame)
    for op_id, argument in draw.tolist():
        if op_id >= 0:
            name = OPS[int(op_id)]
            argument = int(argument) if name in INTEGER_ARGUMENT else argument
            image = NAME_TO_OP[name](image, *(() if name in NO_ARGUMENT else (argument,)), **PIL_KWARGS)
    return np.array(image)


def test_the_draw_is_what_the_loader_path_applies():
    """For 200 clip seeds, timm's own op functions applied in the drawn order with the drawn
    arguments give exactly the loader path's frame: the draw is timm's, op for op."""
    frame = natural_frame(24, 32)
    transform = FrameTransform(image_size=24, augment=True)
    for seed in range(200):
        loader = transform._augment_frame(torch.from_numpy(frame).permute(2, 0, 1), seed)
        assert np.array_equal(loader.permute(1, 2, 0).numpy(), apply_draw_with_timm(frame, draw_augmentation(seed)))


def test_device_path_against_loader_path_on_whole_clips():
    """Same seeds, frames already at the crop size (so resize and crop do nothing): the chained
    ops of a clip differ by at most a few grey levels on average."""
    frames = torch.stack([torch.from_numpy(natural_frame(32, 32, seed)).permute(2, 0, 1) for seed in range(3)])
    transform = FrameTransform(image_size=32, augment=True)
    seeds = range(40)
    loader = torch.stack([transform(frames, seed) for seed in seeds]).int()                  # [40, 3, 3, 32, 32]
    draws = torch.stack([draw_augmentation(seed) for seed in seeds])                          # [40, SLOTS, 2]
    device = augment_batch(frames.expand(len(seeds), -1, -1, -1, -1), draws).int()
    difference = (device - loader).abs().float()
    assert difference.mean() <= 0.05, difference.mean()
    assert (difference.flatten(1).mean(1) > 0.5).sum() <= 1          # no clip far off


def test_op_and_magnitude_distribution_is_timms():
    """5,000 clips: ops uniform over the 15, each of the 4 slots applied with probability 0.5,
    magnitudes ~ N(7, 0.5) (read back from the arguments), signs fair. A policy at magnitude 10,
    without noise or with another probability fails these bounds."""
    draws = torch.stack([draw_augmentation(seed) for seed in range(5000)])                    # [5000, SLOTS, 2]
    applied = draws[..., 0] >= 0
    assert abs(applied.float().mean().item() - 0.5) < 0.015
    op_ids, arguments = draws[..., 0][applied].long(), draws[..., 1][applied]
    counts = torch.bincount(op_ids, minlength=len(OPS)).float()
    expected = len(op_ids) / len(OPS)
    assert ((counts - expected).abs() < 5 * expected ** 0.5).all(), counts          # 5 sigma
    scale = {"Rotate": 3.0, "ShearX": 0.03, "ShearY": 0.03, "TranslateXRel": 0.045, "TranslateYRel": 0.045,
             "ColorIncreasing": 0.09, "ContrastIncreasing": 0.09, "BrightnessIncreasing": 0.09,
             "SharpnessIncreasing": 0.09}
    for name, per_level in scale.items():
        values = arguments[op_ids == OPS.index(name)]
        signed = values - 1 if name.endswith("Increasing") else values
        magnitude = signed.abs() / per_level
        assert abs(magnitude.mean().item() - 7) < 0.1 and abs(magnitude.std().item() - 0.5) < 0.1, name
        assert abs((signed > 0).float().mean().item() - 0.5) < 0.1, name
    solarize = arguments[op_ids == OPS.index("SolarizeIncreasing")]
    assert set(solarize.long().tolist()) <= set(range(257)) and 60 < solarize.mean() < 100


def test_clips_without_a_draw_are_unchanged_and_bad_input_is_named():
    video = torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8)
    none = torch.full((2, SLOTS, 2), -1.0, dtype=torch.float64)
    assert torch.equal(augment_batch(video, none), video)
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(video.float(), none)
    with pytest.raises(ValueError, match="draws must be"):
        augment_batch(video, none[:1])


def test_training_with_augment_on_device_augments_every_batch(tmp_path, monkeypatch):
    calls = []

    def counting(video, draws):
        calls.append(draws.shape)
        return augment_batch(video, draws)

    monkeypatch.setattr(engine, "augment_batch", counting)
    params = load_params("synthetic", tiny_overrides(tmp_path, "epochs=1", "train_augment=true", "augment_on=device"),
                         use_env=False)
    train(params)
    assert len(calls) == 48 // 8 and all(shape == (8, SLOTS, 2) for shape in calls)
    # the loader ships plain frames and the draw of the clip's seed; the loader path ships no draw
    annotations = load_annotations(params, "train")
    item = TrainDataset(annotations, params)[(1, 5)]
    plain = TrainDataset(annotations, params.replace(train_augment=False))[(1, 5)]
    assert torch.equal(item["video"], plain["video"]) and "augment" not in plain
    assert torch.equal(item["augment"], draw_augmentation(sample_seed(params.seed, 1, 5)))
    assert "augment" not in TrainDataset(annotations, params.replace(augment_on="loader"))[(1, 5)]
