"""The reference RandAugment on the device: whole uint8 batches [B,T,3,H,W], grouped by op.

The loader path (`transforms.FrameTransform`) runs timm's RandAugment through PIL on every
frame in the loader workers: about 15 clips/s per core. Here the work is split in two:

- `draw_augmentation(seed)` (in the loader, per clip): what timm's RandAugment does with the
  clip's seed, recorded by running timm's own policy with its image ops replaced by a
  recorder, so the generators are consumed exactly as in the loader path. The result is a
  small tensor [SLOTS, 2]: one row per applied op, in order (op id, its argument: degrees,
  enhance factor, bits, threshold, added value or translate fraction), rows of -1 after.
- `augment_batch(video, draws)` (on the batch's device, before the model): the applied ops,
  slot by slot, the clips of a slot grouped by op, each op computed as PIL computes it
  (greyscale weights, blend truncation, SMOOTH kernel, the affine transforms' bicubic
  filter and pixel-centre conventions, grey fill), the same draw for every frame of a clip.

The device path augments the resized, centre-cropped frames (the frame cache stores them),
the loader path the full frames before the crop: docs/reference-recipe.md (Augmentation)
states what differs and by how much; tests/data/test_device_augment.py holds each op to PIL's.
"""
from __future__ import annotations

import functools

import torch
from torchvision.transforms.v2 import functional as TF

from emcl_nb.data.transforms import GREY_FILL, reference_rand_augment, seeded_python_and_numpy

# timm's "increasing" RandAugment ops, in the order of its policy (op id = index here)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
SLOTS = 4                              # the policy's n: at most 4 ops apply to a clip
NOT_APPLIED = -1.0


class _DrawRecorder:
    """timm's reference policy with each op's image function replaced by a recorder: calling
    it with a seed consumes Python's and NumPy's generators exactly as the loader path does
    and returns the ops that would apply, in order, with their arguments."""

    def __init__(self):
        self.policy = reference_rand_augment()
        names = tuple(op.name for op in self.policy.ops)
        if names != OPS:
            raise RuntimeError(f"timm's RandAugment ops changed: {names}; update device_augment.OPS")
        self.applied: list[tuple[int, float]] = []
        for op_id, op in enumerate(self.policy.ops):
            op.aug_fn = functools.partial(self._record, op_id)

    def _record(self, op_id: int, image, *level_args, **_):
        self.applied.append((op_id, float(level_args[0]) if level_args else 0.0))
        return image

    def __call__(self, seed: int) -> torch.Tensor:
        self.applied = []
        with seeded_python_and_numpy(seed):
            self.policy(None)                      # the image is never looked at
        draw = torch.full((SLOTS, 2), NOT_APPLIED, dtype=torch.float64)
        if self.applied:
            draw[:len(self.applied)] = torch.tensor(self.applied, dtype=torch.float64)
        return draw


@functools.lru_cache(maxsize=1)
def _recorder() -> _DrawRecorder:
    return _DrawRecorder()


def draw_augmentation(seed: int) -> torch.Tensor:
    """The reference policy's draw for a clip seed: float64 [SLOTS, 2] (op id, argument) per
    applied op, in order; -1 rows after the last."""
    return _recorder()(seed)


# ---------------------------------------------------------------- colour ops (PIL's arithmetic)

def _grey(video: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32 [..., 1, H, W]."""
    r, g, b = video.int().unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(-3)


def _per_clip(values: torch.Tensor, video: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[b] per-clip values as a [b,1,1,1,1] tensor on the video's device."""
    return values.to(device=video.device, dtype=dtype).view(-1, 1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, video: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, video, factor): in float32, truncated, clipped to uint8."""
    degenerate = degenerate.float()
    mixed = video.float().sub_(degenerate).mul_(_per_clip(factor, video)).add_(degenerate)
    return mixed.clamp_(0, 255).floor_().to(torch.uint8)


def auto_contrast(video, _):
    """ImageOps.autocontrast: each frame's channels stretched from [min, max] to [0, 255]."""
    low = video.amin(dim=(-2, -1), keepdim=True).float()                  # [b,T,3,1,1]
    high = video.amax(dim=(-2, -1), keepdim=True).float()
    scale = torch.where(high > low, 255.0 / (high - low).clamp(min=1), 1.0)
    offset = torch.where(high > low, -low * scale, 0.0)
    return video.float().mul_(scale).add_(offset).clamp_(0, 255).floor_().to(torch.uint8)


def equalize(video, _):
    """ImageOps.equalize, per frame and channel (torchvision's port of it)."""
    return TF.equalize(video)


def invert(video, _):
    return 255 - video


def posterize(video, bits):
    """ImageOps.posterize: keep the `bits` most significant bits (8 or more: unchanged)."""
    keep = (255 << (8 - bits.clamp(max=8).long())) & 255                  # [b]
    return video & _per_clip(keep, video, torch.uint8)


def solarize(video, threshold):
    """ImageOps.solarize: values >= threshold inverted."""
    return torch.where(video.short() >= _per_clip(threshold, video, torch.int16), 255 - video, video)


def solarize_add(video, added):
    """timm's solarize_add: values below 128 raised by `added` (capped at 255)."""
    raised = (video.short() + _per_clip(added, video, torch.int16)).clamp_(max=255).to(torch.uint8)
    return torch.where(video < 128, raised, video)


def color(video, factor):
    """ImageEnhance.Color: blend with the frame's greyscale."""
    return _blend(_grey(video).expand_as(video), video, factor)


def contrast(video, factor):
    """ImageEnhance.Contrast: blend with the frame's mean grey level, rounded as PIL does."""
    mean = (_grey(video).double().mean(dim=(-3, -2, -1), keepdim=True) + 0.5).floor()
    return _blend(mean.expand_as(video), video, factor)


def brightness(video, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(video), video, factor)


def sharpness(video, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter of the frame (kernel 1 1 1 /
    1 5 1 / 1 1 1 over 13, rounded; border pixels unfiltered), summed in int16."""
    pixels = video.short()
    inner = pixels[..., 1:-1, 1:-1] * 4                                 # centre 5 = 4 + itself below
    for dy in range(3):
        for dx in range(3):
            inner += pixels[..., dy:dy + video.shape[-2] - 2, dx:dx + video.shape[-1] - 2]
    degenerate = pixels.clone()
    degenerate[..., 1:-1, 1:-1] = (inner * 2 + 13).div_(26, rounding_mode="floor")   # round(sum / 13)
    return _blend(degenerate, video, factor)


# ---------------------------------------------------------------- geometric ops (PIL's affine transform)

def _cubic_taps(position: torch.Tensor):
    """PIL's bicubic filter of Image.transform (cubic convolution with a = -1) at continuous
    `position` (pixel centres at i + 0.5): the first of the 4 taps and their weights."""
    position = position - 0.5
    first = position.floor()
    d = position - first
    d2, d3 = d * d, d * d * d
    weights = torch.stack([-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3])   # [4, ...]
    return first.long() - 1, weights


def _affine(video: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=grey) per clip.

    matrices [b, 2, 3] map an output pixel centre (x + 0.5, y + 0.5) to its input position;
    an output pixel whose input position lies outside the frame gets the grey fill, the
    filter's taps are clamped to the frame. An axis that every matrix leaves alone (an x or
    a y shear or translation) is not interpolated. The frames and channels of a clip share
    their positions: each tap reads one row of T*3 values per pixel."""
    b, frames, channels, height, width = video.shape
    device = video.device
    identity = torch.tensor([[1., 0., 0.], [0., 1., 0.]], dtype=matrices.dtype)
    x_untouched, y_untouched = (matrices.cpu() == identity).all(-1).all(0).tolist()   # on the host: no sync
    matrices = matrices.to(device=device, dtype=torch.float32)
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                            torch.arange(width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs.flatten())])   # [3, P]
    x_in, y_in = (matrices @ centres).unbind(1)                                          # [b, P] each
    pixels = video.permute(0, 3, 4, 1, 2).reshape(b * height * width, frames * channels)  # [b*P, T*3]
    pixels = pixels.to(torch.float32, memory_format=torch.contiguous_format)  # rows contiguous (a view above)
    first_pixel = (torch.arange(b, device=device) * height * width).view(b, 1)          # [b, 1]
    columns = _axis_taps(x_in, width, x_untouched)
    rows = _axis_taps(y_in, height, y_untouched)
    out = torch.zeros_like(pixels)                                                       # [b*P, T*3]
    for row, row_weight in zip(*rows):
        for column, column_weight in zip(*columns):
            index = (first_pixel + row * width + column).flatten()                       # [b*P]
            out.addcmul_(pixels.index_select(0, index), (row_weight * column_weight).reshape(-1, 1))
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)               # [b, P]
    out = out.clamp_(0, 255).floor_().masked_fill_(~inside.reshape(-1, 1), GREY_FILL[0])
    out = out.to(torch.uint8).view(b, height, width, frames, channels)
    return out.permute(0, 3, 4, 1, 2).contiguous()                                       # [b, T, 3, H, W]


def _axis_taps(position: torch.Tensor, size: int, untouched: bool):
    """The taps of one axis: (indices, weights) lists, 4 clamped bicubic taps, or the pixel
    itself when no matrix moves this axis."""
    if untouched:
        return [position.floor().long().clamp(0, size - 1)], [torch.ones_like(position)]
    first, weights = _cubic_taps(position)
    return [(first + k).clamp(0, size - 1) for k in range(4)], list(weights)


def _matrices(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-clip 2x3 matrices from rows of [b] tensors or numbers."""
    b = next(entry for row in rows for entry in row if torch.is_tensor(entry)).shape[0]
    return torch.stack([torch.stack([torch.as_tensor(entry, dtype=torch.float64).expand(b)
                                     for entry in row], -1) for row in rows], 1)   # [b, 2, 3]


def rotate(video, degrees):
    """Image.rotate(degrees, BICUBIC, fillcolor=grey): about the frame's centre, counter-clockwise."""
    height, width = video.shape[-2:]
    angle = -torch.deg2rad(degrees.double())
    cos, sin = angle.cos(), angle.sin()
    cx, cy = width / 2.0, height / 2.0
    return _affine(video, _matrices([[cos, sin, cx - cos * cx - sin * cy],
                                     [-sin, cos, cy + sin * cx - cos * cy]]))


def shear_x(video, factor):
    return _affine(video, _matrices([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]))


def shear_y(video, factor):
    return _affine(video, _matrices([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]))


def translate_x(video, fraction):
    return _affine(video, _matrices([[1.0, 0.0, fraction * video.shape[-1]], [0.0, 1.0, 0.0]]))


def translate_y(video, fraction):
    return _affine(video, _matrices([[1.0, 0.0, 0.0], [0.0, 1.0, fraction * video.shape[-2]]]))


# op id -> function(video uint8 [b,T,3,H,W], argument [b] float64 on the CPU) -> uint8
DEVICE_OPS = (auto_contrast, equalize, invert, rotate, posterize, solarize, solarize_add,
              color, contrast, brightness, sharpness, shear_x, shear_y, translate_x, translate_y)


def augment_batch(video: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """uint8 [B,T,3,H,W] on any device, draws [B, SLOTS, 2] (`draw_augmentation` per clip,
    kept on the CPU: the grouping reads it without a device sync) -> augmented uint8
    [B,T,3,H,W]. Padding frames (zeros after a short clip's real frames) are augmented too;
    the model masks them."""
    if video.dtype != torch.uint8 or video.ndim != 5 or video.shape[2] != 3:
        raise ValueError(f"video must be uint8 [B,T,3,H,W], got {video.dtype} {tuple(video.shape)}")
    if draws.shape != (len(video), SLOTS, 2):
        raise ValueError(f"draws must be [{len(video)}, {SLOTS}, 2] (draw_augmentation per clip), "
                         f"got {tuple(draws.shape)}")
    draws = draws.cpu()
    video = video.clone()
    for slot in range(SLOTS):
        op_ids = draws[:, slot, 0].long()
        for op_id in op_ids.unique().tolist():
            if op_id < 0:
                continue
            clips = (op_ids == op_id).nonzero().flatten()
            on_device = clips.to(video.device)
            video[on_device] = DEVICE_OPS[op_id](video[on_device], draws[clips, slot, 1])
    return video

