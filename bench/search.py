"""Time one search query over an index of videos: `query_similarity` + top-k, as
`python -m emcl_nb.search query` ranks (emcl_nb.retrieval.index.search).

Random features at ViT-B/32 shapes (D 512, 12 frames with temporal padding) for `--videos`
indexed videos (default 10,000) and one query, scored by EMCL-Net's scoring: text-conditioned
pooling, then EMCL (K 32, 9 stages) on blocks of 1 text x 32 videos, all blocks batched. The
features are read as a query reads them: from an index part file mapped into memory (written
here first); the first query pages them in (what a fresh `query` process pays), the repeats
that follow find them in memory. The text encoder is not timed
(one caption through CLIP's text tower). Reports the median and each repeat, for the
library's default blocks per batched call and the others asked for, on CPU and on CUDA when
available; `--json` writes the figures.

    .venv/bin/python bench/search.py                              # 10,000 videos
    .venv/bin/python bench/search.py --json docs/results/search-cpu.json --device cpu
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from emcl_nb.io import atomic_write_json
from emcl_nb.model.emcl import EMCL
from emcl_nb.model.similarity import QUERY_BLOCKS_PER_BATCH_CPU, query_similarity
from emcl_nb.params import Params
from emcl_nb.training.checkpoint import atomic_torch_save
from emcl_nb.training.runtime import configure_torch, machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from similarity import random_features, timed  # noqa: E402 - a script of this folder


def mapped_features(n: int, args, folder: Path):
    """(query [1, D], f [n, T, D], frame_mask [n, T]) with f and the mask written as an index
    part and mapped back, as `read_index` maps the merged part."""
    t, f, frame_mask = random_features(n, args.dim, args.frames, args.scale, torch.device("cpu"))
    path = folder / "part.pt"
    atomic_torch_save({"video": f, "frame_mask": frame_mask}, path)
    part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return t[:1], part["video"], part["frame_mask"]


def bench(device: torch.device, args, folder: Path) -> dict:
    query, f, frame_mask = mapped_features(args.videos, args, folder)
    query, f, frame_mask = query.to(device), f.to(device), frame_mask.to(device)
    emcl = EMCL(args.bases, stage_num=args.stages, dim=args.dim,
                generator=torch.Generator().manual_seed(1)).to(device).eval()
    kwargs = dict(temp=3.0, emcl_module=emcl, block_size=args.block)
    settings = [None] + [n for n in args.max_blocks if n]
    result = {"device": str(device), "settings": {}}
    print(f"[{device}] one query x {args.videos} videos, D {args.dim}, T {args.frames}, EMCL K {args.bases} "
          f"x {args.stages} stages, blocks of 1 x {args.block}")
    def one_query(per_call=None):
        return query_similarity(query, f, frame_mask, max_blocks_per_batch=per_call, **kwargs).topk(args.k, dim=1)

    result["first_query_s"] = timed(one_query, device)[1]       # pages the mapped part in: a fresh `query` process
    print(f"  first query after mapping the index: {result['first_query_s'] * 1000:.0f} ms")
    for per_call in settings:
        seconds = [timed(lambda: one_query(per_call), device)[1] for _ in range(args.repeats)]  # noqa: B023
        default = QUERY_BLOCKS_PER_BATCH_CPU if device.type == "cpu" else "block_similarity's budget"
        label = f"default ({default})" if per_call is None else str(per_call)
        result["settings"][label] = {"median_s": statistics.median(seconds), "runs_s": seconds}
        print(f"  {label:>32} blocks per call: median {statistics.median(seconds) * 1000:7.1f} ms "
              f"({', '.join(f'{s * 1000:.0f}' for s in seconds)})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10_000, help="indexed videos")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--bases", type=int, default=32)
    parser.add_argument("--stages", type=int, default=9)
    parser.add_argument("--scale", type=float, default=1.0, help="std of the random features")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-blocks", type=int, nargs="*", default=[16, 64, 128],
                        help="other blocks-per-call settings to compare with the default")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args()
    configure_torch(Params())          # the torch settings evaluation runs with (denormals flushed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {machine()}")
    results, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for name in ["cpu", "cuda"] if args.device == "all" else [args.device]:
            if name == "cuda" and not torch.cuda.is_available():
                print("[cuda] not available, skipped")
                continue
            results.append(bench(torch.device(name), args, Path(folder)))
    if args.json is not None:
        what = "one search query: query_similarity + top-k over an index part mapped into memory (text not encoded)"
        atomic_write_json(args.json, {"benchmark": "search", "what": what,
                                      "command": "python " + " ".join(sys.argv), "machine": machine(),
                                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                                      "load_average_1min": [load_before, os.getloadavg()[0]],
                                      "videos": args.videos, "dim": args.dim, "frames": args.frames,
                                      "block": args.block, "bases": args.bases, "stages": args.stages,
                                      "results": results})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
