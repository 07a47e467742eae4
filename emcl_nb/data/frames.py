"""The frames the model sees for some videos of a split (test sampling and transform), for
figures and thumbnails."""
from __future__ import annotations

import numpy as np

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import VideoDataset


def video_frames(params, split: str, video_ids: list[str], *, annotations=None) -> np.ndarray:
    """uint8 [V,T,S,S,3]: the frames the model sees (test sampling and transform) for some
    videos of `split`; padded or unreadable frames are black. Pass the split's
    `annotations` when already loaded, to skip reading them (and walking the videos) again."""
    annotations = annotations if annotations is not None else load_annotations(params, split)
    return dataset_frames(VideoDataset(annotations, params), video_ids)


def dataset_frames(dataset: VideoDataset, video_ids: list[str]) -> np.ndarray:
    """`video_frames` read through a split's `dataset` (its reader and frame cache reused)."""
    params = dataset.params
    position = {vid: i for i, vid in enumerate(dataset.annotations.video_ids)}
    S = params.image_size
    out = np.zeros((len(video_ids), params.max_frames, S, S, 3), dtype=np.uint8)
    for row, video_id in enumerate(video_ids):
        item = dataset[position[video_id]]
        if isinstance(item, dict):
            out[row] = item["video"].permute(0, 2, 3, 1).numpy()                # [T, S, S, 3]
    return out


def frame_reader(params, features):
    """A function: rows of `features.video` -> the frames the model saw, uint8 [V,T,S,S,3].
    The split's annotations and video reader are set up once, here, not on every call."""
    dataset = VideoDataset(load_annotations(params, features.split), params)

    def frames(video_indices) -> np.ndarray:
        return dataset_frames(dataset, [features.video_ids[int(i)] for i in video_indices])
    return frames
