"""An ipywidgets browser over a split's captions, showing each one's EM block (notebook 05,
interactive=True)."""
from __future__ import annotations

import html

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from emcl_nb.analysis import em_step
from emcl_nb.analysis.em_figures import plot_basis_loadings, plot_frame_weights, short_caption
from emcl_nb.evaluation.scoring import score


def explorer(model, features, frames_fn=None, *, params, top: int = 5):
    """An ipywidgets browser: pick a caption, see its `top` videos (ranked by the evaluation
    scores of the whole split) with its frame weights and the basis loadings of the block
    (that caption x those videos). `params`: the run parameters the model was loaded with.
    `frames_fn(video_indices)` -> uint8 [V,T,H,W,3] or None (see `data.frames.frame_reader`).
    The controls stay above a height-limited output, and say when an update is running."""
    sim = score(features, params, model)                                  # [texts, videos]
    em_scoring = em_step.em_scoring(model, params)                     # set up (and noted) once
    top = min(top, features.n_videos)
    options = [(f"{a}: {short_caption(c, 70)}", a) for a, c in enumerate(features.captions)]
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
            block = em_step.em_block(model, features, [a], videos, scoring=em_scoring)
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
            status.value = f"caption {a}: “{html.escape(short_caption(features.captions[a], 60))}”"
        finally:
            dropdown.disabled = False

    dropdown.observe(show, names="value")
    show({"new": dropdown.value})
    return widgets.VBox([widgets.HBox([dropdown, status]), scores, output])


def _score_table(block: em_step.EMBlock, evaluation: torch.Tensor) -> str:
    """HTML: each video of a one-caption block with its evaluation score (the split scored
    in `block_size` blocks) and its score S in this block (EM depends on the block)."""
    rows = "".join(
        f"<tr><td>{b + 1}</td><td>{video_id}{' (its video)' if int(block.positive[0]) == b else ''}</td>"
        f"<td>{float(evaluation[b]):.3f}</td><td>{float(block.sim[0, b]):.3f}</td></tr>"
        for b, video_id in enumerate(block.video_ids))
    return ("<table><tr><th>#</th><th>video</th><th>evaluation score</th>"
            "<th>S in this block</th></tr>" + rows + "</table>")
