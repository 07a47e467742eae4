"""Shared fixtures: a tiny Params, tiny CLIP / EMCLNet factories and random batches."""
from __future__ import annotations

import pytest
import torch

from emcl_nb.model.clip_backbone import build_tiny_clip
from emcl_nb.params import Params

SOT, EOT = 49406, 49407


@pytest.fixture
def tiny_params() -> Params:
    """Smallest settings that still exercise every code path (3 temporal layers > 2 CLIP
    text layers, so the initialisation trick copies only the layers that exist)."""
    return Params(clip_weights="tiny", tiny_width=64, tiny_layers=2, tiny_patch=16, image_size=32,
                  max_words=8, max_frames=4, agg_module="seqTransf", num_hidden_layers=3,
                  emcl_bases=4, emcl_stages=3, device="cpu", num_workers=0, progress=False)


@pytest.fixture
def tiny_clip(tiny_params):
    """A seeded tiny CLIP (fresh per test)."""
    torch.manual_seed(0)
    p = tiny_params
    return build_tiny_clip(p.tiny_width, p.tiny_layers, p.tiny_patch, p.image_size)


@pytest.fixture
def make_model(tiny_params):
    """make_model(**overrides) -> a seeded tiny EMCLNet built from tiny_params + overrides."""
    from emcl_nb.training.build import build_model

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_model(tiny_params.replace(**overrides))
    return make


def random_text_ids(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[SOT, random tokens, EOT, 0 padding] rows of varying length, [B, L] int64."""
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(1, length - 1, (1,), generator=generator))
        ids[row, 0] = SOT
        ids[row, 1:n + 1] = torch.randint(1, SOT, (n,), generator=generator)
        ids[row, n + 1] = EOT
    return ids


@pytest.fixture
def make_text_ids():
    """make_text_ids(B, L, seed) -> random token rows [SOT, tokens, EOT, 0...]."""
    return lambda batch, length, seed=0: random_text_ids(batch, length, torch.Generator().manual_seed(seed))


@pytest.fixture
def make_batch(tiny_params):
    """make_batch(B, valid_frames=[...], seed=0) -> a training batch dict (architecture.md).
    Frames per video: valid_frames[i] valid ones (a prefix), the rest padded."""
    def make(batch: int = 4, valid_frames=None, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        T, side, L = tiny_params.max_frames, tiny_params.image_size, tiny_params.max_words
        valid = valid_frames if valid_frames is not None else [T - i % T for i in range(batch)]
        frame_mask = torch.tensor([[1] * n + [0] * (T - n) for n in valid], dtype=torch.long)
        text_ids = random_text_ids(batch, L, g)
        return {
            "text_ids": text_ids,
            "text_mask": (text_ids > 0).long(),
            "video": torch.randint(0, 256, (batch, T, 3, side, side), dtype=torch.uint8, generator=g),
            "frame_mask": frame_mask,
            "index": torch.arange(batch),
            "video_index": torch.arange(batch),
        }
    return make
