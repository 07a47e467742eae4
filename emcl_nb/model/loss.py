"""The training loss: features gathered over processes, scored by the model, symmetric InfoNCE
(docs/method.md §5).

As in open_clip, the gather lives with the loss: each process encodes its share of the
batch, `gather_features` concatenates every process's features (with gradients), and every
process computes the same loss over the global batch. How the gather's backward hands the
gradient back is a choice (`GRADIENTS`):

- "exact": each process gets the gradient of the global loss with respect to its own
  features (summed over processes, indexed by the global rank), so that with DDP's
  averaging the parameters get the gradient a single process would compute;
- "reference": the published code's regime: each process keeps only its slice of its own
  loss's gradient, so everything before the gather gets 1/W of the true gradient after
  DDP's averaging, while `logit_scale` (used after the gather) gets it at full size
  (docs/reference-recipe.md, "The 1/W gradient regime").

This module uses torch.distributed directly (no process group is created here); with one
process the gather is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

GRADIENTS = ("exact", "reference")


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


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this process's slice of the gradient
    (indexed by the global rank): summed over processes first when `exact`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, exact: bool) -> torch.Tensor:
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size, ctx.exact = rank, x.shape[0], exact
        return torch.cat(parts, dim=0)                                   # [W*B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if ctx.exact:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None


def gather_features(*tensors: torch.Tensor, gradients: str = "exact") -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over all processes along dim 0 ([B, ...] -> [W*B, ...]), with
    gradients as `gradients` says (GRADIENTS); the identity for one process. Every process
    must pass tensors of the same shapes (the engine's per-process batches are equal)."""
    if gradients not in GRADIENTS:
        raise ValueError(f"gradients must be one of {', '.join(GRADIENTS)}; got {gradients!r}")
    if _world()[1] == 1:
        return tensors
    return tuple(_GatherWithGrad.apply(x, gradients == "exact") for x in tensors)


class EMCLLoss:
    """The training loss of an EMCLNet over the global batch: the features of every process
    gathered (`gather_features`), scored by the model (pooling, EMCL when it trains with it,
    cosine; `EMCLNet.score`) and compared by `symmetric_infonce` at the model's temperature."""

    def __init__(self, gradients: str = "exact"):
        if gradients not in GRADIENTS:
            raise ValueError(f"gradients must be one of {', '.join(GRADIENTS)}; got {gradients!r}")
        self.gradients = gradients

    def __call__(self, model, text: torch.Tensor, video: torch.Tensor,
                 frame_mask: torch.Tensor) -> torch.Tensor:
        """`model` the EMCLNet (unwrapped); text [B,D], video [B,T,D], frame_mask [B,T] its
        forward's outputs on this process's batch. Returns the scalar loss (fp32)."""
        text, video, frame_mask = gather_features(text, video, frame_mask, gradients=self.gradients)
        sims = model.score(text, video, frame_mask, emcl_module=model.training_emcl)  # [W*B, W*B]
        return symmetric_infonce(sims, model.clip.logit_scale)
