"""What a run needs on disk, checked before anything slow: the CLIP weights file, the
annotation files of every split it uses, the video folder. Every missing piece is named in
one error, with where it comes from and the setting that points at it. Nothing here imports
torch, so `python -m emcl_nb.train` names them within a second of its start."""
from __future__ import annotations

from pathlib import Path

from emcl_nb.data.annotations import SPLITS, split_files
from emcl_nb.model.clip_files import TINY, WeightsNotFoundError, resolve_weights_path
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
    """Inputs of a run are missing; the message names each and says where to get it."""


def annotation_status(params: Params) -> dict[str, dict[str, bool]]:
    """For each split the layout has: annotation file name -> present on disk."""
    status = {}
    for split in SPLITS:
        files = split_files(params, split)
        if files is not None:
            status[split] = {path.name: path.is_file() for path in files}
    return status


def missing_inputs(params: Params, *, weights: bool = True, splits=("train", "test")) -> list[str]:
    """One sentence per missing input of a run on real data: the CLIP weights (with `weights`),
    the annotation files of `splits` (and of val when msrvtt_val_csv names a file), the video
    folder. Empty for the synthetic set, which is generated."""
    if params.synthetic:
        return []
    problems = []
    if weights and params.clip_weights != TINY:
        try:
            resolve_weights_path(params.clip_weights, params.clip_cache)
        except WeightsNotFoundError as error:
            problems.append(str(error))
    status = annotation_status(params)
    wanted = [*splits, *(("val",) if params.layout == "msrvtt" and params.msrvtt_val_csv else ())]
    missing = [f"{split}: {name}" for split in wanted for name, present in status.get(split, {}).items()
               if not present]
    if missing:
        problems.append(
            f"annotation files missing in anno_path={params.anno_path}: {', '.join(missing)}. Get them "
            f"from {SOURCES[params.layout]}, then set anno_path (params/{params.dataset}.yaml or "
            f"--set anno_path=...); the file names are docs/data.md's (msrvtt_train_csv and "
            f"msrvtt_val_csv name files inside anno_path)")
    if not Path(params.video_path).expanduser().is_dir():
        problems.append(f"video_path={params.video_path} is not a folder: put the videos there (compressed with "
                        f"`python -m emcl_nb.data.compress`) or set video_path")
    return problems


def check_inputs(params: Params, **which) -> None:
    """A DataNotFoundError naming every missing input (`missing_inputs`), or nothing."""
    problems = missing_inputs(params, **which)
    if problems:
        listed = "\n".join(f"  {number}. {problem}" for number, problem in enumerate(problems, 1))
        raise DataNotFoundError(f"dataset {params.dataset!r} ({params.layout}) cannot start: "
                                f"{len(problems)} input(s) missing\n{listed}")
