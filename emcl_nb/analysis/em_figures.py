"""Figures of one EM block (`em_step.EMBlock`); each function returns a matplotlib Figure:
`plot_responsibilities`, `plot_basis_loadings`, `plot_frame_weights`, `plot_modality_gap`."""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from emcl_nb.analysis.em_step import EMBlock, modality_gap, pca_2d

TEXT_COLOUR, VIDEO_COLOUR = "tab:orange", "tab:blue"


def short_caption(caption: str, width: int = 40) -> str:
    return caption if len(caption) <= width else caption[:width - 1] + "…"


def plot_responsibilities(block: EMBlock) -> Figure:
    """Heat map of Z [D,K]: channels (rows) sorted by the basis that claims them most.
    Bases within 1 % of a row's maximum tie and the first of them counts, so collapsed
    (identical) bases group their channels together."""
    z = block.z.numpy()
    D, K = z.shape
    best = (z >= 0.99 * z.max(1, keepdims=True)).argmax(1)               # [D] first top basis
    order = np.lexsort((-z.max(1), best))                                # by top basis, then strength
    used = len(np.unique(best))
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    image = ax.imshow(z[order], aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="responsibility z[d, k] (columns sum to 1)")
    ax.set(xlabel=f"basis k ({used} of {K} bases are the first top basis of some channel)",
           ylabel=f"feature channel d (sorted by top basis), D = {D}",
           title=f"EM responsibilities ({block.mode}, init {block.init}): "
                 f"effective rank of R = {block.rank}")
    return fig


def plot_basis_loadings(block: EMBlock) -> Figure:
    """Bases mu: the loadings of every pooled video row (grouped by caption) and of every
    caption row on the K bases."""
    A, V, K = block.mu_video.shape
    video = block.mu_video.reshape(A * V, K).numpy()                     # [A*V, K]
    text = block.mu_text.numpy()                                         # [A, K]
    limit = float(max(np.abs(video).max(), np.abs(text).max())) or 1.0
    style = dict(aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained",
                                      gridspec_kw=dict(width_ratios=(1, 1)))
    left.imshow(video, **style)
    for a in range(1, A):
        left.axhline(a * V - 0.5, color="k", linewidth=0.6)
    caption_numbers = block.text_indices.tolist()                      # rows of features.text
    left.set_yticks(np.arange(A) * V + (V - 1) / 2, [f"caption {a}" for a in caption_numbers])
    left.set(xlabel="basis k", title=f"video rows: each caption's {V} pooled videos")
    image = right.imshow(text, **style)
    right.set_yticks(range(A), [f"{a}: {short_caption(c)}" for a, c in zip(caption_numbers, block.captions)],
                     fontsize=8)
    right.set(xlabel="basis k", title="caption rows")
    fig.colorbar(image, ax=(left, right), label="loading mu[n, k] (unit columns)")
    fig.suptitle(f"Basis loadings ({block.mode}, init {block.init}, effective rank of R = {block.rank})")
    return fig


def plot_frame_weights(block: EMBlock, frames: np.ndarray | None = None, *, text: int = 0,
                       top: int = 3) -> Figure:
    """Frame weights w[text, b, :] of one caption on its `top` highest-scoring videos of the
    block; with `frames` (uint8 [V,T,H,W,3], the block's videos) a strip of thumbnails
    above each bar chart."""
    T = block.w.shape[-1]
    top = min(top, len(block.video_ids))
    ranked = block.sim[text].argsort(descending=True)[:top].tolist()
    rows = [kind for _ in ranked for kind in (("frames", "weights") if frames is not None else ("weights",))]
    ratios = [1.0 if kind == "frames" else 1.3 for kind in rows]
    fig = plt.figure(figsize=(max(6.0, 0.9 * T), sum(ratios) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(rows), 1, height_ratios=ratios)
    ymax = float(block.w[text, ranked].max()) * 1.15
    for i, b in enumerate(ranked):
        valid = block.frame_mask[b].bool().numpy()
        if frames is not None:
            strip = np.concatenate(list(frames[b]), axis=1)              # [H, T*W, 3]
            thumbs = fig.add_subplot(grid[2 * i])
            thumbs.imshow(strip, extent=(-0.5, T - 0.5, 0, 1), aspect="auto", interpolation="nearest")
            thumbs.set_axis_off()
        ax = fig.add_subplot(grid[2 * i + 1 if frames is not None else i])
        weights = block.w[text, b].numpy()
        colours = [VIDEO_COLOUR if ok else "lightgrey" for ok in valid]
        ax.bar(range(T), weights, color=colours, width=0.8)
        ax.axhline(1.0 / max(valid.sum(), 1), color="k", linestyle="--", linewidth=0.8,
                   label="uniform over valid frames")
        for t in np.flatnonzero(~valid):
            ax.text(t, 0, "pad", ha="center", va="bottom", fontsize=7, color="grey")
        own = " (its video)" if int(block.positive[text]) == b else ""
        ax.set(xlim=(-0.5, T - 0.5), ylim=(0, ymax), xticks=range(T), ylabel="w",
               title=f"#{i + 1} {block.video_ids[b]}{own}: S = {float(block.sim[text, b]):.3f} "
                     f"(without EMCL {float(block.sim_plain[text, b]):.3f})")
        ax.title.set_fontsize(9)
        if i == 0:
            ax.legend(loc="upper right", fontsize=7)
    ax.set_xlabel("frame")
    fig.suptitle("\n".join(textwrap.wrap(f"frame weights of “{block.captions[text]}”", 80)))
    return fig


def plot_modality_gap(block: EMBlock) -> Figure:
    """2-D PCA of the L2-normalised texts and pooled videos, before and after EMCL; lines
    join each text to its own video, crosses mark the two means."""
    A, V, D = block.video_before.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    for ax, name, text, video in ((axes[0], "before EMCL", block.text_before, block.video_before),
                                  (axes[1], "after EMCL", block.text_after, block.video_after)):
        xy = pca_2d(torch.cat([video.reshape(A * V, D), text])).numpy()  # [A*V + A, 2]
        v_xy, t_xy = xy[:A * V].reshape(A, V, 2), xy[A * V:]
        ax.scatter(*v_xy.reshape(-1, 2).T, s=12, alpha=0.5, color=VIDEO_COLOUR, label="pooled videos")
        ax.scatter(*t_xy.T, s=40, marker="^", color=TEXT_COLOUR, label="texts")
        for a, b in enumerate(block.positive.tolist()):
            if b >= 0:
                ax.plot(*np.stack([t_xy[a], v_xy[a, b]]).T, color="grey", linewidth=0.7)
        means = np.stack([t_xy.mean(0), v_xy.reshape(-1, 2).mean(0)])
        ax.plot(*means.T, color="k", linewidth=1, linestyle="--")
        ax.scatter(*means.T, s=70, marker="X", facecolor="none", edgecolor="k", zorder=3,
                   label="means")
        ax.set(xlabel="PC 1", ylabel="PC 2 (own scale)",
               title=f"{name}: gap |mean text - mean video| = {modality_gap(text, video):.3f}")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"Modality gap ({block.mode}, init {block.init}); grey lines: true pairs")
    return fig
