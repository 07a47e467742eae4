"""torch Datasets over `Annotations`, the CLIP tokenizer and the DataLoaders.

- `TrainDataset`: (caption, clip) pairs, the batch of docs/architecture.md;
- `TextDataset`: captions only, `VideoDataset`: each video once (evaluation encodes every
  text and every video a single time, docs/reference-differences.md #10).

Reproducibility: the loader's sampler hands each worker (epoch, index) pairs and the
augmentation of a sample is seeded from (params.seed, epoch, index), so clips do not
depend on the number of workers or on which worker gets them. Call
`loader.sampler.set_epoch(epoch)` before each epoch (shuffling and augmentation).

Unreadable videos: with `on_bad_sample == "raise"` the `VideoReadError` (naming the file)
propagates. With "skip" the sample is logged and left out of its batch; every batch then
carries `skipped`, the int64 sample indices (TrainDataset, TextDataset) or video indices
(VideoDataset) that were left out, so the caller can count them. A batch in which
every sample failed raises. A clip is never replaced by zeros.
"""
from __future__ import annotations

import functools
import logging
import random
import warnings
import weakref

import numpy as np
import torch
from clip.simple_tokenizer import SimpleTokenizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from emcl_nb.data.annotations import Annotations
from emcl_nb.data.device_augment import draw_augmentation
from emcl_nb.data.frame_cache import FrameCache
from emcl_nb.data.transforms import augments, build_transform
from emcl_nb.data.video import VideoReadError, load_clip
from emcl_nb.data.workers import loader_workers
from emcl_nb.params import Params

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- tokenizer

@functools.lru_cache(maxsize=1)
def _tokenizer():
    """CLIP's BPE tokenizer, built once per process (reading the vocabulary is slow)."""
    return SimpleTokenizer()


def tokenize(captions, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[SOT] bpe[:max_words-2] [EOT], padded with 0 -> (ids [N,L] int64, mask [N,L] int64)."""
    if isinstance(captions, str):
        captions = [captions]
    if max_words < 2:
        raise ValueError(f"max_words must leave room for SOT and EOT (>= 2), got {max_words}")
    tokenizer = _tokenizer()
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    ids = torch.zeros(len(captions), max_words, dtype=torch.int64)
    for row, caption in enumerate(captions):
        tokens = [sot, *tokenizer.encode(caption)[:max_words - 2], eot]
        ids[row, :len(tokens)] = torch.tensor(tokens)
    return ids, (ids != 0).long()


# ---------------------------------------------------------------- datasets

class Skipped:
    """Stands in for a sample whose video could not be read (on_bad_sample == "skip")."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on (seed, epoch, index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def _split_key(key) -> tuple[int, int]:
    """Dataset keys are sample indices or (epoch, index) pairs from `EpochSampler`."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


class _ClipReader:
    """Loads one clip as uint8 [max_frames,3,S,S] + frame_mask, applying the bad-sample policy."""

    def __init__(self, annotations: Annotations, params: Params, train: bool):
        self.annotations, self.params = annotations, params
        self.transform = build_transform(params, annotations.layout, train)
        self.decoded: dict | None = {} if params.cache_decoded_clips else None
        self.frame_cache = FrameCache(params, annotations) if params.frame_cache else None

    def _decode(self, video_index: int, start, end):
        """Sampled frames + mask of a clip: read from the frame cache when `frame_cache`,
        else decoded (and kept in memory when `cache_decoded_clips`)."""
        if self.frame_cache is not None:
            return self.frame_cache.clip(video_index, start, end)
        key = (video_index, start, end)
        if self.decoded is not None and key in self.decoded:
            return self.decoded[key]
        clip = load_clip(self.annotations.video_paths[video_index], self.params.max_frames,
                         self.params.video_framerate, start, end, short_side=self.params.image_size)
        if self.decoded is not None:
            self.decoded[key] = clip
        return clip

    def __call__(self, video_index: int, start, end, seed: int | None):
        try:
            frames, mask = self._decode(video_index, start, end)
        except VideoReadError as error:
            if self.params.on_bad_sample == "raise":
                raise
            log.warning("skipping a sample: %s", error)
            return None
        clip = self.transform(_as_tensor(frames).permute(0, 3, 1, 2), seed)
        if len(clip) < len(mask):                       # zero frames after the real ones
            clip = torch.cat([clip, clip.new_zeros((len(mask) - len(clip), *clip.shape[1:]))])
        # Left as it is (often a view of the decoded or cached frames): `collate` copies it
        # into the batch, in a loader worker straight into shared memory.
        return clip, torch.from_numpy(mask)


def _as_tensor(frames: np.ndarray) -> torch.Tensor:
    """A tensor over `frames` without a copy. Frames from the frame cache are a read-only
    memory map: the transforms return new tensors or views and never write in place, and
    a write would fault rather than change the cache."""
    if frames.flags.writeable:
        return torch.from_numpy(frames)
    with warnings.catch_warnings():                 # torch warns about read-only arrays
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(frames)


class TrainDataset(Dataset):
    """(caption, clip) pairs; `train` turns on the per-clip augmentation where it applies."""

    def __init__(self, annotations: Annotations, params: Params, train: bool = True):
        self.annotations, self.params, self.train = annotations, params, train
        self.clips = _ClipReader(annotations, params, train)
        self.augmented = augments(params, annotations.layout, train)
        # augment_on=device: the clip's draw travels in the batch ("augment"), the frames plain
        self.device_augment = self.augmented and params.augment_on == "device"
        _tokenizer()                      # built here, so forked loader workers inherit it
        if self.device_augment:
            draw_augmentation(0)          # timm's policy built here too (the draw leaves no trace)

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, key):
        epoch, index = _split_key(key)
        sample = self.annotations.samples[index]
        video_index = int(self.annotations.video_index[index])
        seed = sample_seed(self.params.seed, epoch, index) if self.augmented else None
        clip = self.clips(video_index, sample.start, sample.end, None if self.device_augment else seed)
        if clip is None:
            return Skipped(index)
        ids, mask = tokenize(sample.caption, self.params.max_words)
        item = {"text_ids": ids[0], "text_mask": mask[0], "video": clip[0], "frame_mask": clip[1],
                "index": torch.tensor(index), "video_index": torch.tensor(video_index)}
        if self.device_augment:
            item["augment"] = draw_augmentation(seed)                  # [SLOTS, 2]
        return item


class TextDataset(Dataset):
    """Every caption once: text_ids, text_mask, index, video_index."""

    def __init__(self, annotations: Annotations, params: Params):
        self.annotations, self.params = annotations, params
        _tokenizer()                      # built here, so forked loader workers inherit it

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, key):
        _, index = _split_key(key)
        ids, mask = tokenize(self.annotations.samples[index].caption, self.params.max_words)
        return {"text_ids": ids[0], "text_mask": mask[0], "index": torch.tensor(index),
                "video_index": torch.tensor(int(self.annotations.video_index[index]))}


class VideoDataset(Dataset):
    """Every video once (no augmentation): video, frame_mask, video_index.

    A video's segment is that of its first sample (ActivityNet/DiDeMo have one sample per
    video; the other layouts use whole videos).
    """

    def __init__(self, annotations: Annotations, params: Params):
        self.annotations, self.params = annotations, params
        self.clips = _ClipReader(annotations, params, train=False)

    def __len__(self) -> int:
        return self.annotations.num_videos

    def __getitem__(self, key):
        _, video_index = _split_key(key)
        first = self.annotations.samples[self.annotations.caption_groups[video_index][0]]
        clip = self.clips(video_index, first.start, first.end, None)
        if clip is None:
            return Skipped(video_index)
        return {"video": clip[0], "frame_mask": clip[1], "video_index": torch.tensor(video_index)}


def collate(items: list) -> dict:
    """Stack sample dicts; leave out `Skipped` ones, listing their indices in `skipped`."""
    kept = [item for item in items if not isinstance(item, Skipped)]
    skipped = torch.tensor([item.index for item in items if isinstance(item, Skipped)],
                           dtype=torch.int64)
    if not kept:
        raise RuntimeError(f"every video of this batch failed to read (indices "
                           f"{skipped.tolist()}); the warnings above name the files")
    # default_collate stacks straight into shared memory in a loader worker (one copy fewer)
    batch = {key: default_collate([item[key] for item in kept]) for key in kept[0]}
    batch["skipped"] = skipped
    return batch


# ---------------------------------------------------------------- loaders

class EpochSampler(DistributedSampler):
    """DistributedSampler (also for one process) that yields (epoch, index) pairs, so a
    sample's augmentation seed is known wherever it is loaded."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


def _seed_worker(worker_id: int) -> None:
    """Seed Python/NumPy from the worker's torch seed (itself from the loader's generator)
    and keep each worker to one thread: the workers already use every core."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)


def build_loader(dataset: Dataset, params: Params, *, train: bool, rank: int = 0,
                 world_size: int = 1, persistent: bool = True) -> DataLoader:
    """DataLoader over this process's share of `dataset`.

    Batches hold params.batch_size (train) or params.batch_size_val samples over all
    processes together. Training shuffles (seeded by params.seed and the epoch given to
    `loader.sampler.set_epoch`) and drops the last incomplete batch. With several
    processes, evaluation pads the last share with repeated samples (DistributedSampler);
    the `index`/`video_index` fields identify them. `persistent` keeps the workers (and
    their decoded-clip caches) between passes; a loader read once passes False, so that
    its workers end with the pass.
    """
    total = params.batch_size if train else params.batch_size_val
    if total % world_size:
        name = "batch_size" if train else "batch_size_val"
        raise ValueError(f"{name} ({total}) is the global batch and must be divisible by the "
                         f"number of processes ({world_size})")
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                           seed=params.seed, drop_last=train)
    generator = torch.Generator().manual_seed(params.seed + rank)
    workers = loader_workers(params)
    loader = DataLoader(dataset, batch_size=total // world_size, sampler=sampler,
                        num_workers=workers, collate_fn=collate,
                        pin_memory=torch.cuda.is_available(), drop_last=train,
                        worker_init_fn=_seed_worker, generator=generator,
                        persistent_workers=persistent and workers > 0)
    _LOADERS.add(loader)
    return loader


# Every loader `build_loader` made that is still alive, for `shutdown_workers`.
_LOADERS: weakref.WeakSet = weakref.WeakSet()


def shutdown_workers() -> None:
    """Stop the worker processes of every loader `build_loader` made. Persistent workers
    otherwise live until their loader is garbage-collected, which in a notebook kernel
    (reference cycles, a kept traceback) can be never. A loader stays usable: iterating it
    again starts new workers."""
    for loader in list(_LOADERS):
        iterator, loader._iterator = loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
