"""Encoding a split: every text and every video once, through a feature cache.

1. `encode_split`: every text and every video of a split encoded exactly once (a video is
   not re-encoded per caption, docs/reference-differences.md #10) -> `Features`.
2. `load_or_encode`: the same, through a cache `out_dir/features/<split>-<tag>.pt`. The tag
   hashes everything that changes the features: the encoder weights (the EMCL bases are
   left out: they act after encoding), the annotations and video files, FEATURE_FIELDS, the
   precision. Re-scoring with other EMCL settings never re-encodes a video.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import TextDataset, VideoDataset, build_loader, tokenize
from emcl_nb.params import FEATURE_FIELDS, Params
from emcl_nb.progress import note, progress_bar, timed
from emcl_nb.training.checkpoint import atomic_torch_save
from emcl_nb.training.runtime import autocast, autocast_dtype

CACHE_VERSION = 3                # 2: Features.dropped; 3: the fp32 head (features differ under autocast)
UNREADABLE_VIDEO = "unreadable video"


@dataclass
class Features:
    """Encoded split: every text and every video once, on the CPU in float32."""
    split: str
    text: torch.Tensor           # [A, D] EOT features, not normalised
    video: torch.Tensor          # [V, T, D] frame features after temporal aggregation
    frame_mask: torch.Tensor     # [V, T] int64, 0 = padded frame
    text_video: torch.Tensor     # [A] int64 index (row of `video`) of each text's video
    video_ids: list[str]
    captions: list[str]
    skipped_videos: list[str] = field(default_factory=list)   # unreadable, left out with their texts
    dropped: dict = field(default_factory=dict)   # reason -> texts (queries) left out of the split

    @property
    def n_texts(self) -> int:
        return self.text.shape[0]

    @property
    def n_videos(self) -> int:
        return self.video.shape[0]

    @property
    def single_sentence(self) -> bool:
        """One caption per video, text i <-> video i: the true pairs are the diagonal."""
        return self.n_texts == self.n_videos and torch.equal(self.text_video, torch.arange(self.n_texts))

    def to_dict(self) -> dict:
        return dict(vars(self))


def split_loaders(annotations, params: Params, persistent: bool = True) -> tuple[DataLoader, DataLoader]:
    """(texts, videos) loaders of one split for `encode_split`. Kept across calls (as the
    per-epoch validation does), their workers and decoded-clip caches persist."""
    return (build_loader(TextDataset(annotations, params), params, train=False, persistent=persistent),
            build_loader(VideoDataset(annotations, params), params, train=False, persistent=persistent))


def encode_split(model, params: Params, split: str, device: torch.device | None = None, *,
                 annotations=None, loaders: tuple[DataLoader, DataLoader] | None = None) -> Features:
    """Encode every text and every video of `split` once (batch_size_val per batch).

    `loaders`: `split_loaders(annotations, params)` to reuse (built here when None, for
    this one pass: their workers end with it).
    Videos that cannot be read are skipped when params.on_bad_sample == "skip": they and
    their texts are left out with a warning, and listed in `skipped_videos`.
    """
    annotations = annotations if annotations is not None else load_annotations(params, split)
    text_loader, video_loader = loaders or split_loaders(annotations, params, persistent=False)
    device = device or model.device
    model.eval()
    n_texts, n_videos, T = len(annotations), annotations.num_videos, params.max_frames
    text = torch.zeros(n_texts, model.embed_dim)
    video = torch.zeros(n_videos, T, model.embed_dim)
    frame_mask = torch.zeros(n_videos, T, dtype=torch.int64)
    present = torch.zeros(n_videos, dtype=torch.bool)
    bar = dict(disable=not params.progress, leave=False, unit="batch")

    with torch.no_grad(), autocast(device, autocast_dtype(device, params.precision, model.clip.dtype)):
        with timed("encode texts"):
            for batch in progress_bar(text_loader, desc=f"encode {split} texts", **bar):
                features = model.encode_text(batch["text_ids"].to(device), batch["text_mask"].to(device))
                text[batch["index"]] = features.float().cpu()                             # [B, D]
        with timed("encode videos"):
            for batch in progress_bar(video_loader, desc=f"encode {split} videos", **bar):
                features = model.encode_video(batch["video"].to(device), batch["frame_mask"].to(device))
                index = batch["video_index"]
                video[index] = features.float().cpu()                                     # [B, T, D]
                frame_mask[index] = batch["frame_mask"]
                present[index] = True

    text_video = torch.from_numpy(annotations.video_index).long()
    result = Features(split, text, video, frame_mask, text_video, list(annotations.video_ids),
                      [sample.caption for sample in annotations.samples],
                      dropped=dict(annotations.dropped))
    return result if present.all() else _drop_videos(result, present)


def encode_captions(model, captions: list[str], params: Params, device: torch.device | None = None, *,
                    desc: str = "encode texts") -> torch.Tensor:
    """[N, D] float32 CPU: the EOT features of `captions`, tokenised as a split's texts are
    (max_words), batch_size_val at a time, under the evaluation's autocast."""
    device = device or model.device
    ids, mask = tokenize(captions, params.max_words)                                    # [N, L]
    out = torch.zeros(len(captions), model.embed_dim)
    starts = range(0, len(captions), params.batch_size_val)
    with torch.no_grad(), autocast(device, autocast_dtype(device, params.precision)):
        for start in progress_bar(starts, desc=desc, disable=not params.progress or len(starts) < 2,
                                  leave=False, unit="batch"):
            rows = slice(start, start + params.batch_size_val)
            out[rows] = model.encode_text(ids[rows].to(device), mask[rows].to(device)).float().cpu()
    return out


def _drop_videos(features: Features, present: torch.Tensor) -> Features:
    """Leave out the videos that were not read, and their texts (re-indexing the rest)."""
    skipped = [vid for vid, ok in zip(features.video_ids, present.tolist()) if not ok]
    if not present.any():
        raise RuntimeError(f"no video of the {features.split} split could be read; "
                           f"the warnings above name the files")
    new_index = torch.cumsum(present.long(), 0) - 1                                       # [V]
    keep_text = present[features.text_video]                                              # [A]
    warnings.warn(f"{len(skipped)} unreadable {features.split} video(s) and {int((~keep_text).sum())} "
                  f"caption(s) left out of the evaluation: {skipped[:5]}", stacklevel=3)
    return Features(
        features.split, features.text[keep_text], features.video[present],
        features.frame_mask[present], new_index[features.text_video[keep_text]],
        [vid for vid, ok in zip(features.video_ids, present.tolist()) if ok],
        [c for c, ok in zip(features.captions, keep_text.tolist()) if ok], skipped,
        {**features.dropped, UNREADABLE_VIDEO: int((~keep_text).sum())})


def weights_fingerprint(model) -> str:
    """SHA-256 of the encoder weights (names, dtypes, shapes, bytes). The EMCL bases are left
    out: they act after encoding, so re-scoring with other bases reuses the features.

    Cached on the model (`_emcl_nb_fingerprint`) and recomputed only when a tensor is
    replaced or updated in place (its storage or version counter changes). Writes through
    `tensor.data` bypass the version counter and are not seen."""
    encoder = sorted((name, tensor) for name, tensor in model.state_dict(keep_vars=True).items()
                     if not name.startswith("emcl."))
    stamp = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in encoder)
    cached = getattr(model, "_emcl_nb_fingerprint", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in encoder:
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())        # the buffer itself, no copy
    model._emcl_nb_fingerprint = (stamp, digest.hexdigest())
    return model._emcl_nb_fingerprint[1]


def annotations_fingerprint(annotations) -> str:
    """SHA-256 of the captions, their videos and each video file's size and mtime."""
    digest = hashlib.sha256()
    for sample, video_index in zip(annotations.samples, annotations.video_index.tolist()):
        digest.update(f"{sample.caption}|{video_index}|{sample.start}|{sample.end}\n".encode())
    for video_id, path in zip(annotations.video_ids, annotations.video_paths):
        stat = Path(path).stat()
        digest.update(f"{video_id}|{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_key(model, params: Params, split: str, annotations, device: torch.device) -> dict:
    """Everything the features of `split` depend on."""
    return {"version": CACHE_VERSION, "split": split, "weights": weights_fingerprint(model),
            "annotations": annotations_fingerprint(annotations),
            "precision": str(autocast_dtype(device, params.precision, model.clip.dtype) or torch.float32),
            **{name: getattr(params, name) for name in FEATURE_FIELDS}}


def cache_path(params: Params, key: dict) -> Path:
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return params.out_dir / "features" / f"{key['split']}-{tag}.pt"


def load_or_encode(model, params: Params, split: str, device: torch.device | None = None, *,
                   cache: bool = True, annotations=None) -> Features:
    """`encode_split` through the cache in out_dir/features (written atomically).
    A cached file whose key does not match, or that cannot be read, is re-encoded."""
    if not cache:
        return encode_split(model, params, split, device, annotations=annotations)
    annotations = annotations if annotations is not None else load_annotations(params, split)
    device = device or model.device
    key = feature_key(model, params, split, annotations, device)
    path = cache_path(params, key)
    if path.is_file():
        try:
            with timed("read cached features"):
                stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["key"] == key:
                return Features(**stored["features"])
        except Exception as error:  # noqa: BLE001 - a broken cache file is re-made
            note(f"feature cache {path} is unreadable ({error}); encoding again")
    features = encode_split(model, params, split, device, annotations=annotations)
    atomic_torch_save({"key": key, "features": features.to_dict()}, path)
    return features
