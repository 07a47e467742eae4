"""Training throughput: clips/s and peak memory of the engine's `train_step` (forward,
backward, clipping, optimiser and schedule steps, logit_scale clamp) on random clips, for
one configuration.

    python bench/train_step.py                                  # tiny CLIP on CPU
    python bench/train_step.py --preset reference-cpu --repeats 3 --json docs/results/train_step-reference-cpu.json
    python bench/train_step.py --preset vit-b32 --device cuda --flops  # ViT-B/32, 128 clips x 12 frames, MFU
    python bench/train_step.py --set batch_size=64 max_frames=8
    python bench/train_step.py --preset reference-cpu --set compile=true   # torch.compile; compile time shown

`reference-cpu` is the configuration of the side-by-side measurement against the reference
code (tiny CLIP width 128, 2 layers, patch 32; 224 px, 12 frames, batch 16, 32 words,
seqTransf with 2 layers, fp32, 2 threads), with the reference's weight-decay exemptions so
that both optimisers do the same work (`bench/reference_side_by_side.py` runs the two).
The ViT-B/32 preset uses a randomly initialised CLIP with ViT-B/32 shapes (throughput does
not depend on the weights), so it runs without the checkpoint. `--repeats` times that many
windows of `--steps` steps and reports the median window. `--flops` counts one step's FLOPs
with torch's FlopCounterMode and reports MFU against the device's peak (see
`model_flops_utilisation`).
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from emcl_nb.io import atomic_write_json
from emcl_nb.params import Params, load_params, parse_overrides
from emcl_nb.training.build import build_model
from emcl_nb.training.engine import train_step
from emcl_nb.training.optim import build_optimizer
from emcl_nb.training.runtime import autocast_dtype, configure_torch, cpu_model, grad_scaler, seed_everything

PRESETS = {
    "tiny": dict(clip_weights="tiny", tiny_width=128, tiny_layers=2, tiny_patch=16,
                 image_size=64, max_frames=8, batch_size=32, num_hidden_layers=1),
    "reference-cpu": dict(clip_weights="tiny", tiny_width=128, tiny_layers=2, tiny_patch=32,
                          image_size=224, max_frames=12, batch_size=16, max_words=32,
                          agg_module="seqTransf", num_hidden_layers=2, precision="fp32",
                          num_threads=2, decay_exempt="reference"),
    "vit-b32": dict(image_size=224, max_frames=12, batch_size=128, num_hidden_layers=4),
}
# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) of GPUs this may meet, by a part
# of the name torch reports; others need --peak-tflops for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
MFU_FORMULA = ("MFU = FLOPs of one training step (forward + backward, counted by "
               "torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, attention; "
               "the frozen patch embedding has no weight gradient and the frames none, so its "
               "backward counts nothing) x steps/s / peak dense bf16 FLOP/s of the device")


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


def machine_name(device: torch.device) -> str:
    """GPU name, or the CPU model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((flops for part, flops in PEAK_BF16_FLOPS.items() if part in name), None)


def model_flops_utilisation(flops_per_step: float, seconds_per_step: float, peak: float) -> float:
    """Achieved FLOP/s over the device's peak (see MFU_FORMULA)."""
    return flops_per_step / seconds_per_step / peak


def time_windows(step: Callable[[], object], steps: int, repeats: int) -> tuple[list[float], float]:
    """Seconds of each of `repeats` windows of `steps` calls of `step`, and the 1-minute load
    average before them (how busy the machine was, others' work too). A window whose last
    step returns a tensor (a loss on the device) ends by reading it: that waits for the device."""
    load_before = round(os.getloadavg()[0], 2)
    window_seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            result = step()
        if isinstance(result, torch.Tensor):
            result.item()
        window_seconds.append(time.perf_counter() - start)
    return window_seconds, load_before


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=positive_int, default=10, help="steps per timed window")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="untimed steps, the first included (>= 1: the first step is never timed)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed windows; the median is reported")
    parser.add_argument("--flops", action="store_true", help="count one step's FLOPs and report MFU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: looked up by GPU name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="with compile=true, keep torch's own inductor cache (the first step may then "
                             "reuse earlier compilations) instead of compiling from scratch")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    overrides = {**PRESETS[args.preset], "device": args.device, **parse_overrides(args.set)}
    params = load_params("synthetic", overrides, use_env=False)
    configure_torch(params)
    seed_everything(0)
    device = torch.device(args.device)
    clip_model = vit_b32_clip() if args.preset == "vit-b32" else None     # None: params' tiny CLIP
    model = build_model(params, clip_model).to(device).train()
    total_steps = args.warmup + args.steps * args.repeats + int(args.flops)
    optimizer, scheduler = build_optimizer(model, params, total_steps)
    dtype = autocast_dtype(device, params.precision, model.clip.dtype)
    scaler = grad_scaler(device, dtype, params.clip_dtype)
    batch = random_batch(params, device)

    compile_cache = None
    if params.compile and not args.warm_compile_cache:
        # A fresh inductor cache, so the first step's time is a whole compilation, not a cache hit.
        compile_cache = tempfile.mkdtemp(prefix="emcl-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
    trained = torch.compile(model) if params.compile else model

    def step(module: torch.nn.Module = trained) -> torch.Tensor:
        return train_step(module, batch, optimizer, scheduler, scaler, dtype=dtype, grad_clip=params.grad_clip)

    start = time.perf_counter()
    step().item()                       # the first step (with compile=true: compiling)
    first_step_seconds = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    if compile_cache is not None:
        shutil.rmtree(compile_cache, ignore_errors=True)
    flops_per_step = None
    if args.flops:
        with FlopCounterMode(display=False) as counter:
            step(model)                                # eager: the counter sees each operator
        flops_per_step = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    window_seconds, load_before = time_windows(step, args.steps, args.repeats)
    elapsed = statistics.median(window_seconds)
    seconds_per_step = elapsed / args.steps
    clips_per_s = params.batch_size / seconds_per_step
    name = machine_name(device)
    if device.type == "cuda":
        peak_gib, peak_kind = torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    else:
        peak_gib, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"
    threads = torch.get_num_threads()
    figures = {
        "benchmark": "train_step", "preset": args.preset, "device": device.type, "machine": name,
        "threads": threads if device.type == "cpu" else None, "torch": torch.__version__,
        "clips_per_s": round(clips_per_s, 2), "ms_per_step": round(seconds_per_step * 1000, 1),
        "clips_per_s_windows": [round(args.steps * params.batch_size / s, 2) for s in window_seconds],
        "peak_memory_gib": round(peak_gib, 3), "peak_memory_kind": peak_kind,
        "batch_size": params.batch_size, "max_frames": params.max_frames, "image_size": params.image_size,
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "compile": params.compile, "first_step_seconds": round(first_step_seconds, 2),
        "compile_cache": ("warm" if args.warm_compile_cache else "cold") if params.compile else None,
        "cpu_count": os.cpu_count(), "load_average_1min": [load_before, round(os.getloadavg()[0], 2)],
        "command": "python bench/train_step.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    print(f"preset={args.preset} device={name} ({threads} threads) batch={params.batch_size} "
          f"frames={params.max_frames} image={params.image_size} precision={figures['precision']}")
    print(f"{clips_per_s:.1f} clips/s ({seconds_per_step * 1000:.0f} ms/step, median of "
          f"{args.repeats} x {args.steps} steps), peak memory {peak_gib:.2f} GiB {peak_kind}")
    print(f"first step {first_step_seconds:.1f} s" + (" (torch.compile compiling)" if params.compile else ""))
    if flops_per_step is not None:
        peak = peak_flops(name, args.peak_tflops)
        mfu = model_flops_utilisation(flops_per_step, seconds_per_step, peak) if peak else None
        figures.update(flops_per_step=flops_per_step, peak_flops=peak, mfu=mfu, mfu_formula=MFU_FORMULA)
        achieved = flops_per_step / seconds_per_step / 1e12
        print(f"{flops_per_step / 1e12:.4g} TFLOP/step, {achieved:.4g} TFLOP/s achieved; "
              + (f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s" if mfu is not None
                 else "MFU: unknown peak for this device (give --peak-tflops)"))
        print(MFU_FORMULA)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, figures)
        print(f"wrote {args.json}")
    return figures


if __name__ == "__main__":
    main()
