"""What the EM module does on one evaluation block, and figures of it (method.md §8).

`em_block` runs text-conditioned pooling and the model's EMCL module (eval mode, no basis
update) on A chosen test texts x V chosen videos of cached `Features`, exactly as
evaluation scores a block, and keeps everything worth looking at:

    w   [A,V,T]   frame weights of each caption on each video's frames (pooling, §3)
    z   [D,K]     responsibilities: which feature channels each basis explains
    mu  [N,K]     bases, N = A*V + A rows: split into video rows [A,V,K] and text rows [A,K]
    R   [N,D]     reconstruction; X' = X + beta R, and the effective rank of R
    text / video embeddings (L2-normalised) before and after EMCL, S [A,V] with and without it

Plots (each returns a matplotlib Figure): `plot_responsibilities`, `plot_basis_loadings`,
`plot_frame_weights`, `plot_modality_gap`. `explorer` is an ipywidgets browser over the
captions (ipywidgets is imported only there). `frame_reader` fetches the sampled frames
the model saw, for thumbnails.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from emcl_nb.emcl import effective_rank
from emcl_nb import viz
from emcl_nb.model import block_logits, pool

TEXT_COLOUR, VIDEO_COLOUR = "tab:orange", "tab:blue"


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


@torch.no_grad()
def em_block(model, features, text_indices, video_indices=None, *, params=None,
             emcl_mode: str | None = None, scoring=None) -> EMBlock:
    """Pooling + EMCL on the block of `text_indices` x `video_indices` (default: the videos
    of those texts) of `features`, with the scoring evaluation uses (evaluate.scoring_setup):
    emcl_mode "on" (the trained module) or "inference" (method.md §7). Default: the model's
    own mode; a model trained with EMCL off gets the inference-only module. `params`: the
    run parameters the model was loaded with (load_split), for the scoring settings. A
    `scoring` set up by the caller (with EMCL) is used as it is, and needs no `params`.
    The result depends on the block (N = A*V + A rows; V + A with mean pooling), as the
    evaluation scores do."""
    from emcl_nb.evaluate import note, scoring_setup

    if scoring is not None and emcl_mode is not None:
        raise ValueError("em_block takes emcl_mode or scoring, not both")
    if scoring is None and params is None:
        raise ValueError("em_block needs the run parameters (params=...) or a scoring")
    if scoring is None:
        mode = emcl_mode or model.config.emcl
        if mode == "off":
            if emcl_mode is not None:
                raise ValueError("emcl_mode='off' has no EM step to show; use 'on' or 'inference'")
            note("the model was trained with emcl=off: showing EMCL as an inference-only module")
            mode = "inference"
        scoring = scoring_setup(model.eval(), params, mode)
    if scoring.emcl is None:
        raise ValueError("em_block needs a scoring with EMCL (mode 'on' or 'inference')")
    emcl, normalize = scoring.emcl, scoring.normalize

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


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------

def _short(caption: str, width: int = 40) -> str:
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
    right.set_yticks(range(A), [f"{a}: {_short(c)}" for a, c in zip(caption_numbers, block.captions)],
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


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Coordinates [M,2] of the rows of x [M,D] on their two principal axes (SVD)."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)           # vh [min(M,D), D]
    axes = vh[:2]                                                        # [2, D]
    axes = axes * axes.gather(1, axes.abs().argmax(1, keepdim=True)).sign()  # largest entry > 0
    return (centred @ axes.T).float()                                    # [M, 2]


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


# ---------------------------------------------------------------------------------------
# Frames and the interactive explorer
# ---------------------------------------------------------------------------------------

def frame_reader(params, features):
    """A function: rows of `features.video` -> the frames the model saw, uint8 [V,T,S,S,3].
    The split's annotations are read once, here, not on every call."""
    from emcl_nb.data.annotations import load_annotations

    annotations = load_annotations(params, features.split)

    def frames(video_indices) -> np.ndarray:
        video_ids = [features.video_ids[int(i)] for i in video_indices]
        return viz.video_frames(params, features.split, video_ids, annotations=annotations)
    return frames


def explorer(model, features, frames_fn=None, *, params, top: int = 5):
    """An ipywidgets browser: pick a caption, see its `top` videos (ranked by the evaluation
    scores of the whole split) with its frame weights and the basis loadings of the block
    (that caption x those videos). `params`: the run parameters the model was loaded with. `frames_fn(video_indices)` -> uint8 [V,T,H,W,3] or None
    (see `frame_reader`). The controls stay above a height-limited output, and say when
    an update is running."""
    import html

    import ipywidgets as widgets
    from IPython.display import display

    from emcl_nb.evaluate import score

    sim = score(features, params, model)                                  # [texts, videos]
    top = min(top, features.n_videos)
    options = [(f"{a}: {_short(c, 70)}", a) for a, c in enumerate(features.captions)]
    dropdown = widgets.Dropdown(options=options, value=0, description="caption",
                                layout=widgets.Layout(width="70%"))
    status = widgets.HTML()
    scores = widgets.HTML()
    output = widgets.Output(layout=widgets.Layout(max_height="720px", overflow="auto"))

    def show(change) -> None:
        a = change["new"]
        dropdown.disabled = True
        status.value = "<i>updating…</i>"
        try:
            videos = sim[a].topk(top).indices
            block = em_block(model, features, [a], videos, params=params)
            scores.value = _score_table(block, sim[a, videos])
            figures = [plot_frame_weights(block, frames_fn(videos.tolist()) if frames_fn else None,
                                          top=top),
                       plot_basis_loadings(block)]
            with output:
                output.clear_output(wait=True)
                for fig in figures:
                    display(fig)
            for fig in figures:
                plt.close(fig)
            status.value = f"caption {a}: “{html.escape(_short(features.captions[a], 60))}”"
        finally:
            dropdown.disabled = False

    dropdown.observe(show, names="value")
    show({"new": dropdown.value})
    return widgets.VBox([widgets.HBox([dropdown, status]), scores, output])


def _score_table(block: EMBlock, evaluation: torch.Tensor) -> str:
    """HTML: each video of a one-caption block with its evaluation score (the split scored
    in `block_size` blocks) and its score S in this block (EM depends on the block)."""
    rows = "".join(
        f"<tr><td>{b + 1}</td><td>{video_id}{' (its video)' if int(block.positive[0]) == b else ''}</td>"
        f"<td>{float(evaluation[b]):.3f}</td><td>{float(block.sim[0, b]):.3f}</td></tr>"
        for b, video_id in enumerate(block.video_ids))
    return ("<table><tr><th>#</th><th>video</th><th>evaluation score</th>"
            "<th>S in this block</th></tr>" + rows + "</table>")
