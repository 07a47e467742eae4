"""Frame transforms on uint8 clips [T,3,H,W]; output stays uint8 [T,3,S,S].

Test: resize the short side to `image_size` (bicubic, antialiased) and centre-crop.
Train (MSR-VTT, MSVD, LSMDC, as in the reference): one RandAugment policy drawn per clip
and applied to every frame, then the test transform. Scaling to [0, 1] and CLIP's
mean/std normalisation happen on the device (`EMCLNet.encode_video`), so workers ship
uint8 (reference defect #12).

The reference uses timm-style "rand-m7-n4" (4 ops, magnitude 7 of 10). torchvision's
RandAugment with 11 magnitude bins and magnitude 7 gives the same strength; the
reference's magnitude noise (mstd 0.5) is not reproduced.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

AUGMENTED_LAYOUTS = ("msrvtt", "msvd", "lsmdc")
RAND_AUGMENT = dict(num_ops=4, magnitude=7, num_magnitude_bins=11)


def resize_center_crop(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """Short side to `image_size` (bicubic, antialiased), then the central square."""
    height, width = frames.shape[-2:]
    if min(height, width) != image_size:
        frames = F.resize(frames, image_size, interpolation=v2.InterpolationMode.BICUBIC,
                          antialias=True)
    return F.center_crop(frames, image_size)


class FrameTransform:
    """uint8 [T,3,H,W] -> uint8 [T,3,S,S]; with `augment`, RandAugment seeded per clip.

    `seed` makes the augmentation a function of the sample alone (the dataset derives
    it from params.seed, epoch and sample index), whatever process runs it.
    """

    def __init__(self, image_size: int, augment: bool):
        self.image_size = image_size
        self.augment = v2.RandAugment(**RAND_AUGMENT) if augment else None

    def __call__(self, frames: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be uint8 [T,3,H,W], got {frames.dtype} {tuple(frames.shape)}")
        if self.augment is not None:
            if seed is None:
                raise ValueError("an augmenting FrameTransform needs the clip's seed")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                frames = self.augment(frames)   # one draw of ops for the whole clip
        return resize_center_crop(frames, self.image_size)

    def __repr__(self) -> str:
        return f"FrameTransform(image_size={self.image_size}, augment={self.augment})"


def build_transform(params, layout: str, train: bool) -> FrameTransform:
    """The transform of one split: augmentation only for training on MSR-VTT/MSVD/LSMDC
    and only when params.train_augment."""
    augment = train and params.train_augment and layout in AUGMENTED_LAYOUTS
    return FrameTransform(params.image_size, augment)
