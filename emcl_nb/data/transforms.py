"""Frame transforms on uint8 clips [T,3,H,W]; output stays uint8 [T,3,S,S].

Test: resize the short side to `image_size` (bicubic, antialiased) and centre-crop.
Train (MSR-VTT, MSVD, LSMDC, as in the reference): the reference's RandAugment policy
"rand-m7-n4-mstd0.5-inc1" from timm, then the test transform. The policy picks 4 of
timm's 15 "increasing" ops (Invert and SolarizeAdd among them), applies each with
probability 0.5 at magnitude 7 of 10 plus Gaussian noise of std 0.5, fills with grey
(128) and resamples bicubically. One draw of ops, probabilities, magnitudes and signs is
made per clip and applied to every frame alike, as the reference's video transform does.
Scaling to [0, 1] and CLIP's mean/std normalisation happen on the device
(`EMCLNet.encode_video`), so workers ship uint8 (docs/reference-differences.md #12).
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

AUGMENTED_LAYOUTS = ("msrvtt", "msvd", "lsmdc")
REFERENCE_POLICY = "rand-m7-n4-mstd0.5-inc1"
GREY_FILL = (128, 128, 128)


def reference_rand_augment():
    """timm's RandAugment with the reference's policy string and hyperparameters (bicubic,
    grey fill; the "increasing" op set translates by up to 45 % of the frame's own size,
    timm's translate_pct, so the absolute translate_const the reference also passes has no
    effect and is left out). Takes one PIL image and draws its randomness from Python's
    `random` and NumPy's global generator."""
    # Imported here: timm takes seconds to import and only the loader-side augmentation needs it.
    from timm.data.auto_augment import rand_augment_transform
    return rand_augment_transform(REFERENCE_POLICY, {"interpolation": Image.BICUBIC,
                                                     "img_mean": GREY_FILL})


@contextlib.contextmanager
def seeded_python_and_numpy(seed: int):
    """Python's and NumPy's global generators seeded with `seed`, restored afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def resize_center_crop(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """Short side to `image_size` (bicubic, antialiased), then the central square."""
    height, width = frames.shape[-2:]
    if min(height, width) != image_size:
        frames = F.resize(frames, image_size, interpolation=v2.InterpolationMode.BICUBIC,
                          antialias=True)
    return F.center_crop(frames, image_size)


class FrameTransform:
    """uint8 [T,3,H,W] -> uint8 [T,3,S,S]; with `augment`, the reference policy seeded per clip.

    `seed` makes the augmentation a function of the sample alone (the dataset derives
    it from params.seed, epoch and sample index), whatever process runs it. Every frame
    is augmented from the same generator state, so all frames get the same draw.
    """

    def __init__(self, image_size: int, augment: bool):
        self.image_size = image_size
        self.augment = reference_rand_augment() if augment else None

    def __call__(self, frames: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be uint8 [T,3,H,W], got {frames.dtype} {tuple(frames.shape)}")
        if self.augment is not None:
            if seed is None:
                raise ValueError("an augmenting FrameTransform needs the clip's seed")
            frames = torch.stack([self._augment_frame(frame, seed) for frame in frames])
        return resize_center_crop(frames, self.image_size)

    def _augment_frame(self, frame: torch.Tensor, seed: int) -> torch.Tensor:
        image = Image.fromarray(frame.permute(1, 2, 0).numpy())                  # [H, W, 3]
        with seeded_python_and_numpy(seed):
            image = self.augment(image)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)              # [3, H, W]

    def __repr__(self) -> str:
        policy = REFERENCE_POLICY if self.augment is not None else None
        return f"FrameTransform(image_size={self.image_size}, augment={policy})"


def augments(params, layout: str, train: bool) -> bool:
    """Whether a split's clips are augmented: training on MSR-VTT/MSVD/LSMDC with
    params.train_augment (in the loader or on the device, params.augment_on)."""
    return train and params.train_augment and layout in AUGMENTED_LAYOUTS


def build_transform(params, layout: str, train: bool) -> FrameTransform:
    """The transform of one split: the loader-side augmentation where `augments` and
    params.augment_on == "loader"; else resize and crop only."""
    return FrameTransform(params.image_size,
                          augments(params, layout, train) and params.augment_on == "loader")
