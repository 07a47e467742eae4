"""Training throughput: clips/s and peak memory of the engine's `train_step` (forward,
backward, clipping, optimiser and schedule steps, logit_scale clamp) on random clips, for
one configuration.

    python bench/train_step.py                               # tiny CLIP on CPU
    python bench/train_step.py --preset vit-b32 --device cuda  # ViT-B/32, 128 clips x 12 frames
    python bench/train_step.py --set batch_size=64 max_frames=8

The ViT-B/32 preset uses a randomly initialised CLIP with ViT-B/32 shapes (throughput does
not depend on the weights), so it runs without the checkpoint.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from emcl_nb.engine import train_step
from emcl_nb.model import build_model
from emcl_nb.optim import build_optimizer
from emcl_nb.params import Params, load_params, parse_overrides
from emcl_nb.runtime import autocast_dtype, configure_torch, seed_everything

PRESETS = {
    "tiny": dict(clip_weights="tiny", tiny_width=128, tiny_layers=2, tiny_patch=16,
                 image_size=64, max_frames=8, batch_size=32, num_hidden_layers=1),
    "vit-b32": dict(image_size=224, max_frames=12, batch_size=128, num_hidden_layers=4),
}


def vit_b32_clip():
    """A random CLIP with the ViT-B/32 shapes (vision width 768, text width 512, 12 layers)."""
    import clip.model
    return clip.model.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                           vision_patch_size=32, context_length=77, vocab_size=49408,
                           transformer_width=512, transformer_heads=8, transformer_layers=12)


def random_batch(params: Params, device: torch.device) -> dict:
    B, L, T, S = params.batch_size, params.max_words, params.max_frames, params.image_size
    text_ids = torch.randint(1, 40000, (B, L))
    text_ids[:, 0], text_ids[:, -1] = 49406, 49407
    return {"text_ids": text_ids.to(device), "text_mask": torch.ones(B, L, dtype=torch.int64, device=device),
            "video": torch.randint(0, 256, (B, T, 3, S, S), dtype=torch.uint8, device=device),
            "frame_mask": torch.ones(B, T, dtype=torch.int64, device=device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    overrides = {**PRESETS[args.preset], "device": args.device, **parse_overrides(args.set)}
    params = load_params("synthetic", overrides, use_env=False)
    configure_torch(params)
    seed_everything(0)
    device = torch.device(args.device)
    clip_model = vit_b32_clip() if args.preset == "vit-b32" else None     # None: params' tiny CLIP
    model = build_model(params, clip_model).to(device).train()
    optimizer, scheduler = build_optimizer(model, params, args.warmup + args.steps)
    dtype = autocast_dtype(device, params.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = random_batch(params, device)

    def step() -> torch.Tensor:
        return train_step(model, batch, optimizer, scheduler, scaler, dtype=dtype, grad_clip=params.grad_clip)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()                                       # wait for the device
    elapsed = time.perf_counter() - start
    clips_per_s = args.steps * params.batch_size / elapsed
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
        name = torch.cuda.get_device_name()
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"preset={args.preset} device={name} batch={params.batch_size} frames={params.max_frames} "
          f"image={params.image_size} precision={dtype or torch.float32}")
    print(f"{clips_per_s:.1f} clips/s ({elapsed / args.steps * 1000:.0f} ms/step), peak memory {peak}")


if __name__ == "__main__":
    main()
