"""What the EM module does on one evaluation block (docs/method.md §8).

`em_block` runs text-conditioned pooling and the model's EMCL module (eval mode, no basis
update) on A chosen test texts x V chosen videos of cached `Features`, exactly as
evaluation scores a block, and keeps everything worth looking at:

    w   [A,V,T]   frame weights of each caption on each video's frames (pooling, §3)
    z   [D,K]     responsibilities: which feature channels each basis explains
    mu  [N,K]     bases, N = A*V + A rows: split into video rows [A,V,K] and text rows [A,K]
    R   [N,D]     reconstruction; X' = X + beta R, and the effective rank of R
    text / video embeddings (L2-normalised) before and after EMCL, S [A,V] with and without it

Figures of a block are in `emcl_nb.analysis.em_figures`, the ipywidgets browser in
`emcl_nb.analysis.em_explorer`; this module imports neither matplotlib nor ipywidgets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emcl_nb.evaluation.scoring import scoring_setup
from emcl_nb.model.emcl import effective_rank
from emcl_nb.model.emclnet import block_logits, pool
from emcl_nb.progress import note


@dataclass
class EMBlock:
    """One block of texts x videos through pooling and EMCL (CPU tensors). With mean pooling
    the EM input has one row per video (N = V + A); the [A,V,...] fields repeat it for
    every caption, so that both poolings are read the same way."""
    text_indices: torch.Tensor     # [A] rows of features.text
    video_indices: torch.Tensor    # [V] rows of features.video
    captions: list[str]            # [A]
    video_ids: list[str]           # [V]
    positive: torch.Tensor         # [A] column of each text's own video in the block, -1 if absent
    frame_mask: torch.Tensor       # [V,T]
    w: torch.Tensor                # [A,V,T] frame weights (text: softmax over T, then masked; mean: 1/valid)
    z: torch.Tensor                # [D,K] responsibilities
    mu_video: torch.Tensor         # [A,V,K] bases, rows of the pooled videos
    mu_text: torch.Tensor          # [A,K] bases, rows of the texts
    recon: torch.Tensor            # [N,D] reconstruction R (X' = X + beta R), N = A*V + A (mean: V + A)
    text_before: torch.Tensor      # [A,D] L2-normalised text embeddings entering EMCL
    video_before: torch.Tensor     # [A,V,D] L2-normalised pooled videos entering EMCL
    text_after: torch.Tensor       # [A,D] L2-normalised texts after EMCL
    video_after: torch.Tensor      # [A,V,D] L2-normalised pooled videos after EMCL
    sim: torch.Tensor              # [A,V] S with EMCL (as evaluation scores this block)
    sim_plain: torch.Tensor        # [A,V] S without EMCL (pooling + cosine)
    rank: int                      # effective rank of R (emcl.effective_rank)
    mode: str                      # EMCL scoring mode: on | inference
    init: str                      # reference | distinct
    beta: float

    @property
    def gap_before(self) -> float:
        return modality_gap(self.text_before, self.video_before)

    @property
    def gap_after(self) -> float:
        return modality_gap(self.text_after, self.video_after)


def modality_gap(text: torch.Tensor, video: torch.Tensor) -> float:
    """Distance between the mean text embedding and the mean video embedding."""
    D = text.shape[-1]
    return float((text.reshape(-1, D).mean(0) - video.reshape(-1, D).mean(0)).norm())


def videos_of(features, text_indices) -> torch.Tensor:
    """The videos of the given texts, each once, in order of first appearance [V]."""
    seen = dict.fromkeys(features.text_video[torch.as_tensor(text_indices)].tolist())
    return torch.tensor(list(seen), dtype=torch.long)


def em_scoring(model, params, emcl_mode: str | None = None):
    """The scoring (scoring.scoring_setup) whose EMCL step `em_block` shows: emcl_mode "on"
    (the trained module) or "inference" (docs/method.md §7). Default: the model's own mode;
    a model trained with EMCL off gets the inference-only module (with a note). `params`:
    the run parameters the model was loaded with (load_split). Set it up once and pass it to
    every `em_block` of the model (an inference module is built afresh here each time).
    Puts the model in eval mode."""
    mode = emcl_mode or model.config.emcl
    if mode == "off":
        if emcl_mode is not None:
            raise ValueError("emcl_mode='off' has no EM step to show; use 'on' or 'inference'")
        note("the model was trained with emcl=off: showing EMCL as an inference-only module")
        mode = "inference"
    return scoring_setup(model.eval(), params, mode)


@torch.no_grad()
def em_block(model, features, text_indices, video_indices=None, *, params=None,
             emcl_mode: str | None = None, scoring=None) -> EMBlock:
    """Pooling + EMCL on the block of `text_indices` x `video_indices` (default: the videos
    of those texts) of `features`, with the scoring evaluation uses: a `scoring` set up by
    the caller (with EMCL, e.g. `em_scoring`), used as it is, or else `em_scoring(model,
    params, emcl_mode)`. The result depends on the block (N = A*V + A rows; V + A with mean
    pooling), as the evaluation scores do."""
    if scoring is not None and emcl_mode is not None:
        raise ValueError("em_block takes emcl_mode or scoring, not both")
    if scoring is None and params is None:
        raise ValueError("em_block needs the run parameters (params=...) or a scoring")
    if scoring is None:
        scoring = em_scoring(model, params, emcl_mode)
    if scoring.emcl_module is None:
        raise ValueError("em_block needs a scoring with EMCL (mode 'on' or 'inference')")
    emcl, normalize = scoring.emcl_module, scoring.normalize

    ti = torch.as_tensor(text_indices, dtype=torch.long)
    vi = videos_of(features, ti) if video_indices is None else torch.as_tensor(video_indices, dtype=torch.long)
    device = model.device
    t = features.text[ti].to(device)                                     # [A, D]
    f = features.video[vi].to(device)                                    # [V, T, D]
    mask = features.frame_mask[vi].to(device)                            # [V, T]
    A, V, D = len(ti), len(vi), t.shape[-1]

    v, w = pool(t, f, mask, model.pooling, model.temp)                   # [(A,) V, D], [(A,) V, T]
    sim = block_logits(t, v, emcl, normalize)                            # [A, V]; sets emcl.last
    state = emcl.last
    sim_plain = block_logits(t, v, None)                                 # [A, V]
    if normalize == "before":
        t, v = F.normalize(t, dim=-1), F.normalize(v, dim=-1)
    video_rows = v.reshape(-1, D)                                        # [A*V or V, D]
    n = video_rows.shape[0]
    x = torch.cat([video_rows, t])                                       # [N, D] the EMCL input
    x_after = x + emcl.beta * state.recon                                # [N, D]

    def split(rows):  # [N, ...] -> video rows [A, V, ...] (mean pooling: one copy per caption), text rows [A, ...]
        video = rows[:n].reshape(-1, V, *rows.shape[1:]).expand(A, V, *rows.shape[1:])
        return video.cpu(), rows[n:].cpu()

    mu_video, mu_text = split(state.mu)
    video_before, text_before = split(F.normalize(x, dim=-1))
    video_after, text_after = split(F.normalize(x_after, dim=-1))
    column = {int(b): j for j, b in enumerate(vi)}
    positive = torch.tensor([column.get(int(b), -1) for b in features.text_video[ti]])
    return EMBlock(
        text_indices=ti, video_indices=vi, captions=[features.captions[i] for i in ti],
        video_ids=[features.video_ids[i] for i in vi], positive=positive,
        frame_mask=mask.cpu(), w=w.expand(A, V, -1).float().cpu(), z=state.z.cpu(), mu_video=mu_video,
        mu_text=mu_text, recon=state.recon.cpu(), text_before=text_before,
        video_before=video_before, text_after=text_after, video_after=video_after,
        sim=sim.float().cpu(), sim_plain=sim_plain.float().cpu(),
        rank=int(effective_rank(state.recon)), mode=scoring.mode, init=emcl.init,
        beta=float(emcl.beta))


def describe(block: EMBlock) -> str:
    """One line per fact of the block (no timings, no paths: stable notebook output)."""
    A, V, K = block.mu_video.shape
    return "\n".join([
        f"EMCL mode {block.mode!r} (init {block.init!r}, beta {block.beta:g}): {A} texts x {V} videos, "
        f"N = {block.recon.shape[0]} rows, D = {block.z.shape[0]} channels, K = {K} bases",
        f"effective rank of the correction R: {block.rank}",
        f"modality gap |mean text - mean video|: {block.gap_before:.3f} before EMCL, "
        f"{block.gap_after:.3f} after"])


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Coordinates [M,2] of the rows of x [M,D] on their two principal axes (SVD)."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)           # vh [min(M,D), D]
    axes = vh[:2]                                                        # [2, D]
    axes = axes * axes.gather(1, axes.abs().argmax(1, keepdim=True)).sign()  # largest entry > 0
    return (centred @ axes.T).float()                                    # [M, 2]
