"""Make sure a dataset is on disk before training or evaluation starts.

The synthetic set is generated on first use. For the real benchmarks, nothing can be
downloaded on the machines this project is tested on, so a missing file is an error that
names the file, where the data comes from and the parameter to set (emcl_nb.data.inputs).
"""
from __future__ import annotations

from pathlib import Path

from emcl_nb.data.annotations import SPLITS, has_split, load_annotations
from emcl_nb.data.frame_cache import build_frame_caches
from emcl_nb.data.inputs import check_inputs
from emcl_nb.data.synthetic import generate_from_params
from emcl_nb.params import Params


def ensure_data(params: Params, *, progress: bool | None = None) -> Path:
    """Generate the synthetic set (when `params.synthetic`) or check that the annotation
    files and the video folder exist, then, with `params.frame_cache`, build (or finish)
    the decoded-frame cache of every split. Returns the annotation folder."""
    folder = _ensure_files(params, progress)
    if params.frame_cache:
        build_frame_caches(params, progress=progress)
    return folder


def _ensure_files(params: Params, progress: bool | None) -> Path:
    if params.synthetic:
        return generate_from_params(params, progress)
    check_inputs(params, weights=False)
    return Path(params.anno_path)


def split_statistics(params: Params) -> str:
    """Markdown table: per split, videos, samples, captions per video, words per caption and
    the samples dropped at load time (with their reasons)."""
    lines = ["| split | videos | samples | samples / video | words / caption | dropped |",
             "|---|---|---|---|---|---|"]
    for split in SPLITS:
        if not has_split(params, split):
            continue
        annotations = load_annotations(params, split)
        words = sum(len(sample.caption.split()) for sample in annotations.samples) / len(annotations)
        dropped = ", ".join(f"{count} {reason}" for reason, count in annotations.dropped.items()) or "0"
        lines.append(f"| {split} | {annotations.num_videos} | {len(annotations)} | "
                     f"{len(annotations) / annotations.num_videos:.1f} | {words:.1f} | {dropped} |")
    return "\n".join(lines)
