"""Benchmark: the project's training loader against a reference-style float64 PIL pipeline,
or (--cache) against itself reading the decoded-frame cache.

    .venv/bin/python bench/data_loading.py [--videos 48 --clips 160 --workers 2 --batch 16]
    .venv/bin/python bench/data_loading.py --cache [--rounds 3] [--json docs/results/data_loading-cpu.json]

Generates synthetic videos of compressed size (short side 224, 3 fps, 12 s) in a
temporary folder, then loads the same training samples through

- `project`: emcl_nb's TrainDataset + build_loader (uint8 frames, normalised later on
  the device; no augmentation unless --augment);
- `reference`: what the reference's workers do per frame: decord read (emcl_nb's
  `load_clip` with the decord backend, the same frame indices) -> PIL bicubic resize of
  the short side + centre crop -> ToTensor -> Normalize -> float64 numpy. Without decord
  the frames are read with PyAV instead.

With --cache the two loaders are emcl_nb's TrainDataset decoding with decord (`decord`)
and reading the decoded-frame cache built first (`cache`, emcl_nb.data.frame_cache),
timed alternately for --rounds rounds so that other work on the machine slows both alike;
the cache's size and build time are printed with them. With --cache --augment both read
the cache and augment with the reference RandAugment: in the loader workers through PIL
(`loader augmentation`, augment_on=loader) or batched in the main process after the
loader (`device augmentation`, augment_on=device, emcl_nb.data.device_augment, on the
GPU where there is one, else on the CPU; its time counts in the rate); the last line is their ratio.

Both read the same frame indices with the same DataLoader settings (workers kept between
epochs, no in-memory clip cache), and the script prints clips/s, bytes per batch and the
ratios; --json writes them with the machine and the command. Not a test: the numbers
depend on the machine (and on other work sharing its cores).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from emcl_nb.data.annotations import load_annotations
from emcl_nb.data.dataset import TrainDataset, build_loader, tokenize
from emcl_nb.data.frame_cache import build_frame_cache, describe
from emcl_nb.data.synthetic import CAPTION_TEMPLATES, generate_synthetic
from emcl_nb.data.video import load_clip
from emcl_nb.io import atomic_write_json
from emcl_nb.model.clip_backbone import CLIP_MEAN, CLIP_STD
from emcl_nb.params import load_params
from emcl_nb.training.engine import device_augmented
from emcl_nb.training.runtime import cpu_model

try:
    import decord  # noqa: F401
    BACKEND = "decord"       # the reference reads with decord
except ImportError:
    BACKEND = None           # emcl_nb's automatic choice (PyAV)


class ReferenceStyleDataset(Dataset):
    """(caption, clip) pairs loaded the reference's way: per-frame PIL, float64 output."""

    def __init__(self, annotations, params):
        self.annotations, self.params = annotations, params
        size = params.image_size
        self.frame_transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size), transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD)])

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, index):
        sample = self.annotations.samples[index]
        path = self.annotations.video_paths[int(self.annotations.video_index[index])]
        frames, mask = load_clip(path, self.params.max_frames, self.params.video_framerate,
                                 sample.start, sample.end, backend=BACKEND)
        size = self.params.image_size
        video = np.zeros((self.params.max_frames, 3, size, size), dtype=np.float64)
        for slot, frame in enumerate(frames):
            video[slot] = self.frame_transform(Image.fromarray(frame)).numpy()
        ids, text_mask = tokenize(sample.caption, self.params.max_words)
        return ids[0].numpy(), text_mask[0].numpy(), video, mask


def batch_bytes(batch) -> int:
    items = batch.values() if isinstance(batch, dict) else batch
    return sum(item.numel() * item.element_size() for item in items if torch.is_tensor(item))


# where `device augmentation` runs: the GPU where there is one (the loader pins its batches)
AUGMENT_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(batch):
    """A batch whose loader shipped draws (augment_on=device) as training hands it to the
    model: moved to AUGMENT_DEVICE and augmented there; other batches as they come."""
    shipped_draws = isinstance(batch, dict) and "augment" in batch
    return device_augmented(batch, AUGMENT_DEVICE) if shipped_draws else batch


def measure(loader, clips: int, min_seconds: float) -> tuple[float, int]:
    """Clips per second over at least `clips` samples and `min_seconds` (as many epochs as
    that takes), after one warm-up batch per worker (their start and first decode: the
    pipeline is full when timing starts), device augmentation included; bytes per batch."""
    batches = iter(loader)
    for _, batch in zip(range(max(1, loader.num_workers)), batches):   # fewer in a short epoch
        size = batch_bytes(on_device(batch))
    seen, start = 0, time.perf_counter()
    while seen < clips or time.perf_counter() - start < min_seconds:
        for batch in batches:
            batch = on_device(batch)
            seen += len(batch["video"] if isinstance(batch, dict) else batch[2])
            if seen >= clips and time.perf_counter() - start >= min_seconds:
                break
        else:                                  # only a finished epoch starts the next one: a new
            batches = iter(loader)             # iterator waits for the workers' prefetched batches
    if AUGMENT_DEVICE.type == "cuda":
        torch.cuda.synchronize()               # the device augmentation's queued work counts
    return seen / (time.perf_counter() - start), size


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def compare_with_cache(params, annotations, args) -> dict:
    """Build the frame cache, then time alternately the decoding and the cached loader, or
    (--augment) the cached loader augmenting in its workers and on the device."""
    report = build_frame_cache(params.replace(frame_cache=True), "train", progress=False)
    print(describe(report))
    cached = params.replace(frame_cache=True)
    if args.augment:
        variants = {"loader augmentation": cached.replace(augment_on="loader"),
                    "device augmentation": cached.replace(augment_on="device")}
    else:
        variants = {"decord": params, "cache": cached}
    loaders = {name: build_loader(TrainDataset(annotations, variant, train=True), variant, train=True)
               for name, variant in variants.items()}
    rounds = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, loader in loaders.items():
            rounds[name].append(round(measure(loader, args.clips, args.seconds)[0], 1))
    for name, rates in rounds.items():
        print(f"{name:>9}: {statistics.median(rates):7.1f} clips/s (median; rounds {rates})")
    slow, fast = loaders                               # the ratio: the second over the first
    ratio = statistics.median(rounds[fast]) / statistics.median(rounds[slow])
    ratio_key = "device_over_loader_augmentation" if args.augment else "cache_over_decord"
    print(f"{fast} / {slow}: {ratio:.2f}x clips/s")
    return {"note": "loaders timed alternately, medians over rounds; other processes may share the "
                    "cores (load_average_1min, taken at the end)",
            "clips_per_s": {name: statistics.median(rates) for name, rates in rounds.items()},
            "rounds": rounds, ratio_key: round(ratio, 2),
            "cache": {key: report[key] for key in ("clips", "frames", "bytes", "build_seconds")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=48, help="videos to generate")
    parser.add_argument("--clips", type=int, default=160, help="clips timed per pipeline, at least")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds timed per pipeline, at least")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (both pipelines)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--augment", action="store_true",
                        help="the reference RandAugment policy (timm) in the project loader; with "
                             "--cache: augmentation in the loader vs on the device")
    parser.add_argument("--cache", action="store_true",
                        help="compare decoding with decord against the decoded-frame cache")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (--cache)")
    parser.add_argument("--json", help="also write the figures, machine and command to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="emcl-bench-") as tmp:
        start = time.perf_counter()
        folder = generate_synthetic(Path(tmp), train=args.videos, val=0, test=1, frames=36,
                                    templates=len(CAPTION_TEMPLATES),   # 7 pairs per video
                                    fps=3, size=224, progress=False)
        print(f"generated {args.videos} videos of 224x224, 36 frames at 3 fps "
              f"in {time.perf_counter() - start:.1f} s")
        params = load_params("synthetic", dict(
            anno_path=str(folder), video_path=str(folder / "videos"), image_size=224,
            max_frames=12, video_framerate=1, batch_size=args.batch, num_workers=args.workers,
            train_augment=args.augment, cache_decoded_clips=False, progress=False,
            frame_cache_dir=str(Path(tmp) / "frame_cache")), use_env=False)
        annotations = load_annotations(params, "train")
        torch.manual_seed(0)
        print(f"{len(annotations)} training pairs, batch {args.batch}, {args.workers} workers, "
              f"{params.max_frames} frames of {params.image_size}px, augment={args.augment}, "
              f"reader: {BACKEND or 'PyAV (decord missing)'}")
        results = compare_with_cache(params, annotations, args) if args.cache \
            else compare_with_reference(params, annotations, args)
    if args.json:
        atomic_write_json(Path(args.json), {
            "benchmark": "data_loading_cache" if args.cache else "data_loading_reference",
            "command": " ".join(["python", "bench/data_loading.py", *sys.argv[1:]]),
            "machine": machine(), "settings": {
                "videos": args.videos, "training_pairs": len(annotations), "batch": args.batch,
                "workers": args.workers, "frames": params.max_frames, "image_size": params.image_size,
                "augment": args.augment, "reader": BACKEND or "av", "in_memory_clip_cache": False,
                "device_augmentation_on": AUGMENT_DEVICE.type if args.augment and args.cache else None},
            **results})
        print(f"wrote {args.json}")


def compare_with_reference(params, annotations, args) -> dict:
    """Time the project's loader, then the reference-style float64 pipeline."""
    project = build_loader(TrainDataset(annotations, params, train=True), params, train=True)
    reference = DataLoader(ReferenceStyleDataset(annotations, params), batch_size=args.batch,
                           shuffle=True, num_workers=args.workers, drop_last=True,
                           persistent_workers=args.workers > 0)   # as build_loader's: both keep their workers
    results = {name: measure(loader, args.clips, args.seconds)
               for name, loader in (("project", project), ("reference", reference))}
    for name, (rate, size) in results.items():
        print(f"{name:>9}: {rate:7.1f} clips/s  {size / 2**20:8.1f} MiB per batch")
    (p_rate, p_size), (r_rate, r_size) = results["project"], results["reference"]
    print(f"project / reference: {p_rate / r_rate:.2f}x clips/s, {r_size / p_size:.1f}x fewer bytes per batch")
    return {"clips_per_s": {name: round(rate, 1) for name, (rate, _) in results.items()},
            "mib_per_batch": {name: round(size / 2**20, 1) for name, (_, size) in results.items()}}


if __name__ == "__main__":
    main()
