"""Make sure a dataset is on disk before training or evaluation starts.

The synthetic set is generated on first use. For the real benchmarks, nothing can be
downloaded on the machines this project is tested on, so a missing file is an error that
names the file, where the data comes from and the parameter to set.
"""
from __future__ import annotations

from pathlib import Path

from emcl_nb.data.annotations import SPLITS, has_split, load_annotations, split_files
from emcl_nb.data.frame_cache import build_frame_caches
from emcl_nb.data.synthetic import generate_from_params
from emcl_nb.params import Params

# Where each benchmark's annotations and videos come from (the release README's sources).
SOURCES = {
    "msrvtt": "splits and captions: msrvtt_data.zip from the CLIP4Clip release "
              "(github.com/ArrowLuo/CLIP4Clip/releases); videos: MSRVTT.zip from Frozen in Time",
    "msvd": "raw-captions.pkl and the split lists with the videos: the EMCL-Net / CLIP4Clip "
            "processed MSVD release",
    "lsmdc": "LSMDC cannot be redistributed: request it from the dataset authors "
             "(sites.google.com/site/describingmovies) and bring your own copy",
    "activity": "ActivityNet Captions (cs.stanford.edu/people/ranjaykrishna/densevid) with "
                "train_ids.json / val_ids.json from the EMCL-Net release",
    "didemo": "DiDeMo (github.com/lisaanne/localizingmoments) with the EMCL-Net release lists",
}


class DataNotFoundError(FileNotFoundError):
    """Annotations or videos are missing; the message says what to fetch and where to put it."""


def annotation_status(params: Params) -> dict[str, dict[str, bool]]:
    """For each split the layout has: annotation file name -> present on disk."""
    status = {}
    for split in SPLITS:
        files = split_files(params, split)
        if files is not None:
            status[split] = {path.name: path.is_file() for path in files}
    return status


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
    missing = [f"{split}: {name}" for split, files in annotation_status(params).items()
               if split != "val" for name, present in files.items() if not present]
    if missing:
        raise DataNotFoundError(
            f"dataset {params.dataset!r} ({params.layout}) is missing annotation files in "
            f"anno_path={params.anno_path}: {', '.join(missing)}. Get them from "
            f"{SOURCES[params.layout]}, then set anno_path (params/{params.dataset}.yaml or "
            f"--set anno_path=...).")
    if not Path(params.video_path).expanduser().is_dir():
        raise DataNotFoundError(
            f"video_path={params.video_path} is not a folder. Put the videos there (compressed "
            f"with `python -m emcl_nb.data.compress`) or set video_path.")
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
