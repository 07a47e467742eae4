"""Time the block-protocol similarity matrix: batched blocks vs the reference loop.

Scores an n x n test matrix (default 1,000 x 1,000, MSR-VTT 1k-A) from random features of
ViT-B/32 widths (D 512, 12 frames, temporal padding) through EMCL (K 32, 9 stages, blocks
of 32), with `block_similarity` and with `block_similarity_loop` in the same run, on CPU
and on CUDA when available. Prints both times, their ratio, the max abs difference and the
peak memory of the batched path.

    .venv/bin/python bench/similarity.py              # full size
    .venv/bin/python bench/similarity.py --n 256      # quicker

On zero-mean unit-variance random features the reference init (±1 constant bases) splits
its identical bases on float32 rounding noise, so the two summation orders differ by more
than rounding (1.8e-5 measured at the default size, up to ~2e-3 at D 32); `--scale 0.2`
(or `--init distinct`) shows the ~1e-7 agreement on well-conditioned input.

Measured with `--device cpu` (2 CPU threads, no GPU, denormals flushed as in evaluation):
batched 6.85 s, loop 8.67 s (1.27x), peak RSS 0.83 GiB.
"""
from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from emcl_nb.model.emcl import EMCL
from emcl_nb.model.similarity import block_similarity, block_similarity_loop
from emcl_nb.params import Params
from emcl_nb.training.runtime import configure_torch


def random_features(n: int, dim: int, frames: int, scale: float, device: torch.device, seed: int = 0):
    """t [n,D], f [n,T,D] (padded frames zero) and frame_mask [n,T] with 1..T valid frames."""
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(n, dim, generator=g)
    f = scale * torch.randn(n, frames, dim, generator=g)
    lengths = torch.randint(1, frames + 1, (n,), generator=g)                     # [n]
    frame_mask = (torch.arange(frames)[None, :] < lengths[:, None]).long()        # [n, T]
    return t.to(device), (f * frame_mask[..., None]).to(device), frame_mask.to(device)


def timed(fn, device: torch.device):
    """(result, seconds) of fn(), synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB -> GiB


def bench(device: torch.device, args) -> None:
    t, f, frame_mask = random_features(args.n, args.dim, args.frames, args.scale, device)
    emcl = EMCL(args.bases, stage_num=args.stages, init=args.init, dim=args.dim,
                generator=torch.Generator().manual_seed(1)).to(device).eval()
    kwargs = dict(temp=3.0, emcl_module=emcl, block_size=args.block)
    # warm-up (CUDA context, kernels, allocator) on a small slice
    block_similarity(t[:2 * args.block], f[:2 * args.block], frame_mask[:2 * args.block], **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batched, batched_s = timed(lambda: block_similarity(
        t, f, frame_mask, max_blocks_per_batch=args.max_blocks, **kwargs), device)
    peak = peak_memory_gb(device)
    loop, loop_s = timed(lambda: block_similarity_loop(t, f, frame_mask, **kwargs), device)
    n_blocks = math.ceil(args.n / args.block) ** 2
    print(f"[{device}] {args.n} x {args.n}, D {args.dim}, T {args.frames}, EMCL K {args.bases} "
          f"x {args.stages} stages ({args.init} init), block {args.block} ({n_blocks} blocks), "
          f"feature scale {args.scale}")
    print(f"  batched ({args.max_blocks or 'default'} blocks per call): {batched_s:8.2f} s   "
          f"peak memory {peak:.2f} GiB ({'allocated' if device.type == 'cuda' else 'process RSS'})")
    print(f"  loop oracle:                   {loop_s:8.2f} s")
    print(f"  loop / batched: {loop_s / batched_s:.2f}x   max |batched - loop| = "
          f"{(batched - loop).abs().max().item():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="texts = videos (1000: MSR-VTT 1k-A)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--bases", type=int, default=32)
    parser.add_argument("--stages", type=int, default=9)
    parser.add_argument("--init", choices=("reference", "distinct"), default="reference")
    parser.add_argument("--scale", type=float, default=1.0, help="std of the random features")
    parser.add_argument("--max-blocks", type=int, default=None,
                        help="blocks per batched call (default: the library's: "
                             "4 blocks of 32 x 32 on a CPU, 64 on a GPU)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    configure_torch(Params())          # the torch settings evaluation runs with (denormals flushed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("[cuda] not available, skipped")
            continue
        with torch.no_grad():
            bench(torch.device(name), args)


if __name__ == "__main__":
    main()
