"""Evaluation's encoding speed at ViT-B/32 shapes (random weights): which batch, threads and
precision encode frames fastest on this device, as evaluation runs the model (EMCLNet's
encode_video: uint8 frames, folded patch embedding, temporal transformer, no gradients).

    python bench/encode_speed.py --json docs/results/encode-vit-b32-cpu.json   # and the README section
    python bench/encode_speed.py --device cuda                                # a GPU: fp32, bf16, fp16
    python bench/encode_speed.py --check       # exit 1 if the README section is not what the file gives

Each setting is timed over at least `--seconds` after one untimed batch; settings are tried in
alternating rounds (the machine's speed drifts) and the median round is reported.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from train_step import vit_b32_clip  # bench/, the script's folder

from emcl_nb.analysis.readme import write_or_check
from emcl_nb.io import atomic_write_json
from emcl_nb.params import load_params
from emcl_nb.training.build import build_model
from emcl_nb.training.runtime import autocast, configure_torch, machine

ROOT = Path(__file__).resolve().parents[1]
SECTION = "encode-results"
FRAMES = 12                      # per video, as the real datasets' max_frames
PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def frames_per_second(model, videos: int, dtype, device: torch.device, seconds: float) -> float:
    """Frames encoded per second by encode_video on batches of `videos` x FRAMES random frames
    (one untimed batch first, then whole batches for at least `seconds`)."""
    video = torch.randint(0, 256, (videos, FRAMES, 3, 224, 224), dtype=torch.uint8, device=device)
    mask = torch.ones(videos, FRAMES, dtype=torch.int64, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        model.encode_video(video, mask)                              # untimed: allocations, kernels
        done, start = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - start < seconds:
            model.encode_video(video, mask)
            done += videos * FRAMES
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def measure(device: torch.device, batches, threads, rounds: int, seconds: float) -> dict:
    params = load_params("msrvtt", {"clip_dtype": "fp32", "device": device.type}, use_env=False)
    configure_torch(params)
    torch.manual_seed(0)
    model = build_model(params, vit_b32_clip()).to(device).eval()
    # Every batch and thread count in fp32; the other precisions at the smallest batch with every
    # thread (on a CPU without bf16 units they run many times slower, and a large batch would take minutes).
    settings = [(b, t, "fp32") for b, t in itertools.product(batches, threads)]
    settings += [(min(batches), max(threads), p) for p in PRECISIONS[device.type] if p != "fp32"]
    timings = {setting: [] for setting in settings}
    for _ in range(rounds):
        for videos, thread_count, precision in settings:
            torch.set_num_threads(thread_count)
            timings[videos, thread_count, precision].append(
                frames_per_second(model, videos, DTYPES[precision], device, seconds))
            print(f"{videos} videos x {FRAMES} frames, {thread_count} threads, {precision}: "
                  f"{timings[videos, thread_count, precision][-1]:.1f} frames/s", flush=True)
    rows = [{"videos_per_batch": v, "threads": t, "precision": p, "frames_per_s": statistics.median(r),
             "rounds": [round(x, 2) for x in r]} for (v, t, p), r in timings.items()]
    best = max(rows, key=lambda row: row["frames_per_s"])
    return {"benchmark": "encode_speed", "device": device.type,
            "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else machine(),
            "torch": torch.__version__, "frames_per_video": FRAMES, "rows": rows, "best": best,
            "command": "python " + " ".join(sys.argv)}


def render(result: dict) -> str:
    best = result["best"]
    lines = ["| videos per batch (x 12 frames) | threads | precision | frames/s |", "|---|---|---|---|"]
    lines += [f"| {row['videos_per_batch']} | {row['threads']} | {row['precision']} | {row['frames_per_s']:.0f} |"
              for row in result["rows"]]
    return "\n".join([
        f"ViT-B/32 video encoding at evaluation ({result['machine']}): fastest at "
        f"{best['videos_per_batch']} videos per batch, {best['threads']} threads, {best['precision']}: "
        f"{best['frames_per_s']:.0f} frames/s, so the MSR-VTT 1k test (about 11,500 frames) encodes in about "
        f"{11_500 / best['frames_per_s'] / 60:.0f} min, its texts aside. Median of alternating rounds, "
        f"`{result['command']}`:", "", *lines])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="videos per batch")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and every core")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="at least this long per setting and round")
    parser.add_argument("--json", type=Path, help="measure and write the results here, then the README section")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "encode-vit-b32-cpu.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when the README section is stale")
    args = parser.parse_args(argv)
    if args.json or not args.check and args.device != "cpu":
        device = torch.device(args.device)
        threads = args.threads or sorted({1, torch.get_num_threads()})
        result = measure(device, args.batches, threads, args.rounds, args.seconds)
        print(json.dumps(result["best"]))
        if not args.json:
            return                           # a GPU run: figures printed, nothing written
        atomic_write_json(args.json, result)
        args.results = args.json
    body = render(json.loads(args.results.read_text()))
    write_or_check(SECTION, body, args.readme, check=args.check)


if __name__ == "__main__":
    main()
