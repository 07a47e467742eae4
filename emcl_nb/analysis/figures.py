"""Figures the notebooks show: sampled frames, training curves, recall@K, top-k retrievals,
search results, the ablation grid.

Every function returns a matplotlib Figure (the notebook shows it and may save it);
nothing here computes results.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

from emcl_nb.params import repo_relative

RECALL_KS = (1, 5, 10, 50)


# Figures of many different video frames (noisy pixels PNG cannot compress) are stored as
# JPEG: the 4 x 5 grid of retrieved frames takes about 250 KB as PNG, under 100 KB as JPEG.
JPEG_QUALITY = 90


def save_figure(fig: plt.Figure, path) -> Path:
    """Save `fig` as a PNG, or a JPEG for a .jpg path (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = {"pil_kwargs": {"quality": JPEG_QUALITY}} if path.suffix == ".jpg" else {}
    fig.savefig(path, dpi=100, bbox_inches="tight", **jpeg)
    return path


def save_run_figure(fig: plt.Figure, params, name: str, suffix: str = ".png") -> Path:
    """Save `fig` as <run folder>/figures/<name><suffix> and print where it went."""
    path = save_figure(fig, params.out_dir / "figures" / f"{name}{suffix}")
    print("saved", repo_relative(path))
    return path


def show_jpeg(fig: plt.Figure) -> None:
    """Show `fig` in the notebook as a JPEG image, and close it: for figures of video frames."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg", bbox_inches="tight", pil_kwargs={"quality": JPEG_QUALITY})
    plt.close(fig)
    display(Image(data=buffer.getvalue(), format="jpeg"))


def frame_grid(frames: np.ndarray, captions: list[str], max_frames: int = 8) -> plt.Figure:
    """One row per video: its sampled frames [n, T, S, S, 3], under a caption."""
    n, T = frames.shape[:2]
    cols = min(T, max_frames)
    fig = plt.figure(figsize=(1.2 * cols, 1.55 * n), layout="constrained")
    for row, subfig in enumerate(np.atleast_1d(fig.subfigures(n, 1))):
        subfig.suptitle(captions[row], x=0.0, ha="left", fontsize=9)
        for col, ax in enumerate(np.atleast_1d(subfig.subplots(1, cols))):
            ax.imshow(frames[row, col * T // cols], interpolation="nearest")   # the pixels the model sees
            ax.axis("off")
    return fig


def search_strips(query: str, hits: list, frames: np.ndarray) -> plt.Figure:
    """One query's results (emcl_nb.retrieval.index.Hit, best first) as strips of the frames
    the model sees ([k, T, S, S, 3]), each titled with its rank, score, file and the time of
    the frame the query attends to most."""
    titles = [f"#{hit.rank}  {hit.score:.3f}  {Path(hit.path).name}"
              + (f"  (attends {hit.time:.1f} s)" if hit.time is not None else "") for hit in hits]
    fig = frame_grid(frames, titles, max_frames=6)
    fig.set_size_inches(*(0.8 * fig.get_size_inches()))          # k strips of 6 frames: under 100 KB as JPEG
    fig.suptitle(f"“{query}”", x=0.0, ha="left", fontsize=10, fontweight="bold")
    return fig


def read_log(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def read_history(out_dir: Path) -> list[dict]:
    """Per-epoch records of a run (loss, validation metrics), from history.json."""
    return json.loads((Path(out_dir) / "history.json").read_text())


def history_table(history: list[dict]) -> str:
    """Markdown table: epoch, last loss, validation R@1 (where the run validates)."""
    splits = ["val"] if any("val" in record for record in history) else []
    head = "| epoch | loss | " + " | ".join(f"{s} T2V R@1 | {s} V2T R@1" for s in splits) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(splits))]
    for record in history:
        cells = [f"{record[s]['t2v']['R1']:.1f} | {record[s]['v2t']['R1']:.1f}" if s in record else " | "
                 for s in splits]
        lines.append(f"| {record['epoch']} | {record['loss']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_training(records: list[dict]) -> plt.Figure:
    """Loss and the two learning rates (CLIP's, lr x coef_lr, and the new modules') per step,
    from the run's log.jsonl. Decay and no-decay groups share a rate, so each is drawn once."""
    steps = [r["step"] for r in records]
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.2))
    loss_ax.plot(steps, [r["loss"] for r in records], lw=1)
    loss_ax.set(xlabel="step", ylabel="loss", title="symmetric InfoNCE")
    rates = {}
    for label, prefix in (("CLIP", "lr_clip"), ("new modules", "lr_new")):
        key = next((k for k in records[0] if k.startswith(prefix)), None)
        if key is not None:
            rates[label] = [r[key] for r in records]
    same = len(rates) == 2 and np.allclose(*rates.values())
    for (label, values), style in zip(rates.items(), (dict(lw=3, alpha=0.5), dict(lw=1, ls="--"))):
        lr_ax.plot(steps, values, label=label, **style)
    lr_ax.set(xlabel="step", ylabel="learning rate", yscale="log",
              title="warm-up + cosine" + (" (CLIP's rate = the new modules')" if same else ""))
    lr_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class LiveTrainingPlot:
    """`on_log` callback for `train()`: redraws the loss / learning-rate figure in place while
    a notebook trains (only when `live`). `show(fig)` then puts the finished figure in the
    same place (or shows it once, when nothing was drawn live)."""

    def __init__(self, live: bool, every: int = 5):
        self.live, self.every, self.records, self.calls, self.handle = live, every, [], 0, None

    def __call__(self, records: list[dict]) -> None:
        self.records.extend(records)
        self.calls += 1
        if self.live and self.calls % self.every == 0:
            self.show(plot_training(self.records))

    def show(self, fig: plt.Figure) -> None:
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def plot_recall_at_k(results: dict[str, dict]) -> plt.Figure:
    """R@1/5/10/50 for each labelled result, text-to-video and video-to-text."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, direction in zip(axes, ("t2v", "v2t")):
        for label, result in results.items():
            ax.plot(RECALL_KS, [result[direction][f"R{k}"] for k in RECALL_KS], marker="o", label=label)
        ax.set(xscale="log", xticks=RECALL_KS, xticklabels=[str(k) for k in RECALL_KS],
               xlabel="K", title={"t2v": "text → video", "v2t": "video → text"}[direction])
    axes[0].set_ylabel("recall@K (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_top_k(sim: torch.Tensor, text_video: torch.Tensor, captions: list[str],
               frames_of: Callable[[list[int]], np.ndarray], queries: list[int],
               k: int = 5) -> plt.Figure:
    """For each query caption, its top-k videos (middle sampled frame, score below); the true
    video is framed in green. `frames_of(video_indices)` -> uint8 [n, T, S, S, 3]."""
    top = sim[queries].topk(min(k, sim.shape[1]), dim=1).indices                 # [Q, k]
    videos, position = top.unique(return_inverse=True)     # each video decoded once: [U], [Q, k]
    frames = frames_of(videos.tolist())                                         # [U, T, S, S, 3]
    frames = frames[:, frames.shape[1] // 2][position.numpy()]                  # [Q, k, S, S, 3]
    fig = plt.figure(figsize=(1.3 * top.shape[1], 1.75 * len(queries)), layout="constrained")
    for row, subfig in enumerate(np.atleast_1d(fig.subfigures(len(queries), 1))):
        query = queries[row]
        subfig.suptitle(captions[query], x=0.0, ha="left", fontsize=8)
        for col, (ax, video) in enumerate(zip(np.atleast_1d(subfig.subplots(1, top.shape[1])),
                                              top[row].tolist())):
            ax.imshow(frames[row, col], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            hit = video == int(text_video[query])
            for spine in ax.spines.values():
                spine.set(color="tab:green" if hit else "0.7", linewidth=3 if hit else 1)
            ax.set_xlabel(f"#{col + 1}  {sim[query, video]:.2f}", fontsize=7)
    return fig


def plot_ablations(results: dict) -> plt.Figure:
    """Left: each trained arm's T2V R@1, mean ± std over seeds (each seed a grey dot). Right:
    each question's difference to its baseline with its paired bootstrap interval (filled
    red: the interval excludes 0). `results`: what emcl_nb.analysis.ablations writes."""
    arms = [arm for arm in results["arms"].values() if arm["setting"] in ("trained", "inference")]
    questions = results["questions"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.3 * max(len(arms), len(questions)) + 1.2),
                                      layout="constrained", gridspec_kw={"width_ratios": (1, 1.3)})
    rows = np.arange(len(arms))[::-1]                       # the first arm on top
    for row, arm in zip(rows, arms):
        spread = arm["t2v_R1"]
        left.errorbar(spread["mean"], row, xerr=spread["std"], fmt="o", color="tab:blue", capsize=3)
        left.plot(spread["values"], [row] * len(spread["values"]), ".", color="0.5", markersize=4)
    left.set(yticks=rows, xlabel="T2V R@1 (%), mean ± std over seeds",
             title=f"{len(results['seeds'])} training seed(s)")
    left.set_yticklabels([arm["label"] for arm in arms], fontsize=7)
    rows = np.arange(len(questions))[::-1]
    for row, q in zip(rows, questions):
        colour = "tab:red" if q["significant"] else "tab:gray"
        right.errorbar(q["diff"], row, xerr=[[q["diff"] - q["low"]], [q["high"] - q["diff"]]], fmt="o",
                       color=colour, markerfacecolor=colour if q["significant"] else "white", capsize=3)
    right.axvline(0, color="0.3", linewidth=0.8)
    right.set(yticks=rows, xlabel="Δ T2V R@1 (points), 95 % paired bootstrap interval",
              title=f"difference to the baseline ({results['n_queries']} test queries)")
    right.set_yticklabels([q["question"] for q in questions], fontsize=7)
    return fig
