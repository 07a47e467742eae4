"""Symmetric InfoNCE over a text x video similarity matrix (docs/method.md §5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_infonce(sims: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """½ [CE(s·S, diag) + CE(s·Sᵀ, diag)] with s = exp(logit_scale).

    `sims` [B,B]: text a (row) against video b (column), true pairs on the diagonal.
    Repeated videos in a batch count as negatives, as in the reference.
    """
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"sims must be a square [B, B] text x video matrix; got {tuple(sims.shape)}")
    logits = logit_scale.exp().float() * sims.float()          # [B, B], loss in fp32
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
