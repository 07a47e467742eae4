"""A text box over a search index (notebook 06, interactive=True): type a query, see its top
videos as frame strips with their scores."""
from __future__ import annotations

import html

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display

from emcl_nb.analysis.figures import search_strips
from emcl_nb.retrieval.index import VideoIndex, search
from emcl_nb.retrieval.trained import TrainedModel


def search_box(model: TrainedModel, index: VideoIndex, k: int = 5, placeholder: str = "") -> widgets.VBox:
    """An ipywidgets text box and button: a query (Enter or the button) shows its top `k`
    videos of `index`, ranked by the model's own scoring (emcl_nb.retrieval.index.search)."""
    text = widgets.Text(placeholder=placeholder, description="query", continuous_update=False,
                        layout=widgets.Layout(width="70%"))
    button = widgets.Button(description="search")
    status = widgets.HTML()
    output = widgets.Output(layout=widgets.Layout(max_height="720px", overflow="auto"))

    def run(_=None) -> None:
        query = text.value.strip()
        if not query:
            return
        button.disabled, status.value = True, "<i>searching…</i>"
        try:
            hits = search(model, index, [query], k)[0]
            fig = search_strips(query, hits, model.frames([hit.path for hit in hits]))
            with output:
                output.clear_output(wait=True)
                display(fig)
            plt.close(fig)
            status.value = f"top {len(hits)} of {len(index)} videos for “{html.escape(query)}”"
        finally:
            button.disabled = False

    text.observe(run, names="value")
    button.on_click(run)
    return widgets.VBox([widgets.HBox([text, button]), status, output])
