"""What remains between our training regime and the reference code's, measured where a CPU can.

    python bench/reference_regime.py --json docs/results/reference-regime.json   # then rewrites
                                                                                # the README section
    python bench/reference_regime.py --check     # exit 1 if the README is not what the file gives

Measures, each with the setting that brings the reference's behaviour back:
1. the fp16 update (clip_dtype=fp16) against fp32 master weights, on one 1024 x 768 matrix
   (std 0.02) at the reference's CLIP rate (lr x coef_lr = 1e-7), 100 BertAdam steps of
   gradients of four scales: the share of elements that move in fp16, and the mean change;
2. the temporal transformer's LayerNorm eps (temporal_ln_eps): 1e-5 vs the reference's 1e-12
   on features of std 0.3;
3. the fp16 CLIP forward: our towers (folded patch embedding, fused attention) against CLIP's
   own fp16 forward, which the reference runs, beside fp16 against fp32;
4. compression's frame choice: ffmpeg's fps filter (ours) against the output option -r 3
   (the reference's script, `compress --reference_rate`), on videos whose frames carry their
   own number.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emcl_nb.analysis.readme import write_or_check
from emcl_nb.data.compress import compress_one
from emcl_nb.data.ffmpeg import write_video
from emcl_nb.data.video import read_frames, video_info
from emcl_nb.io import atomic_write_json
from emcl_nb.model.clip_backbone import (
    build_tiny_clip,
    convert_to_fp16,
    encode_text,
    encode_uint8_frames,
    normalize_frames,
)
from emcl_nb.training.optim import BertAdam
from emcl_nb.training.runtime import machine

ROOT = Path(__file__).resolve().parents[1]
SECTION = "regime-results"
GRADIENT_STDS = (1e-5, 8e-5, 1e-3, 1e-2)


def update_table(steps: int = 100, lr: float = 1e-7) -> list[dict]:
    """Per gradient std: share of elements moved and mean |change| in fp16 and in fp32."""
    rows = []
    for std in GRADIENT_STDS:
        start = torch.randn(1024, 768, generator=torch.Generator().manual_seed(0)) * 0.02
        change = {}
        for dtype in (torch.float16, torch.float32):
            p = start.to(dtype).clone().requires_grad_()
            optimizer = BertAdam([{"params": [p], "weight_decay": 0.0, "lr": lr}], lr=lr)
            grads = torch.Generator().manual_seed(1)
            for _ in range(steps):
                p.grad = (torch.randn(p.shape, generator=grads) * std).to(dtype)
                optimizer.step()
            change[dtype] = (p.detach().float() - start.to(dtype).float()).abs()
        rows.append({"gradient_std": std, "fp16_moved_share": float((change[torch.float16] > 0).float().mean()),
                     "fp16_mean_abs_change": float(change[torch.float16].mean()),
                     "fp32_moved_share": float((change[torch.float32] > 0).float().mean()),
                     "fp32_mean_abs_change": float(change[torch.float32].mean())})
    return rows


def layer_norm_eps(std: float = 0.3, width: int = 512) -> dict:
    x = torch.randn(2000, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std
    ours, theirs = F.layer_norm(x, (width,), eps=1e-5), F.layer_norm(x, (width,), eps=1e-12)
    return {"feature_std": std, "width": width, "max_abs_difference": float((ours - theirs).abs().max()),
            "mean_abs_difference": float((ours - theirs).abs().mean())}


def fp16_forward(width: int = 128, layers: int = 2, patch: int = 32, frames: int = 8) -> dict:
    """Relative L2 difference of image and text features: our fp16 towers vs CLIP's own fp16
    forward (the reference's computation), and CLIP's own fp16 vs fp32."""
    torch.manual_seed(0)
    model = build_tiny_clip(width, layers, patch, 224).eval()
    video = torch.randint(0, 256, (frames, 3, 224, 224), dtype=torch.uint8)
    text = torch.zeros(frames, 32, dtype=torch.long)
    text[:, 0], text[:, 1:20], text[:, 20] = 49406, torch.randint(1, 49000, (frames, 19)), 49407
    with torch.no_grad():
        fp32 = (model.encode_image(normalize_frames(video)), model.encode_text(text))
        convert_to_fp16(model)
        own = (model.encode_image(normalize_frames(video).half()).float(), model.encode_text(text).float())
        with torch.autocast("cpu", dtype=torch.float16):
            ours = (encode_uint8_frames(model, video, torch.ones(frames)).float(), encode_text(model, text).float())

    def relative(a, b):
        return float((a - b).norm() / b.norm())
    return {"clip": f"random, width {width}, {layers} layers, patch {patch}, 224 px",
            "image_ours_vs_own_fp16": relative(ours[0], own[0]), "text_ours_vs_own_fp16": relative(ours[1], own[1]),
            "image_own_fp16_vs_fp32": relative(own[0], fp32[0]), "text_own_fp16_vs_fp32": relative(own[1], fp32[1])}


BITS = 10          # frame numbers up to 1023, one black or white block per bit


def numbered_frames(count: int, size: int = 80) -> np.ndarray:
    """Frames whose top row of 10 blocks spells their number in binary (white = 1)."""
    frames = np.zeros((count, size, size * 2, 3), dtype=np.uint8)
    block = size * 2 // BITS
    for n in range(count):
        for bit in range(BITS):
            if n >> bit & 1:
                frames[n, :size // 2, bit * block:(bit + 1) * block] = 255
    return frames


def frame_numbers(path: Path) -> list[int]:
    count, _ = video_info(path)
    frames = read_frames(path, np.arange(count)).astype(np.float32)        # [n, H, W, 3]
    height, width = frames.shape[1:3]
    block = width // BITS
    bits = [frames[:, :height // 4, b * block + block // 4:(b + 1) * block - block // 4].mean(axis=(1, 2, 3)) > 127
            for b in range(BITS)]
    return [int(sum(int(bit[i]) << b for b, bit in enumerate(bits))) for i in range(count)]


def compression_frames(rates=(25, 30, 24)) -> list[dict]:
    """Per source rate (10 s): the source frames each way keeps, and how many both keep."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fps in rates:
            source = Path(folder) / f"source-{fps}.mp4"
            write_video(source, numbered_frames(10 * fps), fps)
            kept = {}
            for name, reference in (("fps filter", False), ("-r 3", True)):
                out = Path(folder) / f"out-{fps}-{reference}.mp4"
                compress_one(source, out, reference_rate=reference)
                kept[name] = frame_numbers(out)
            ours, theirs = kept["fps filter"], kept["-r 3"]
            rows.append({"source_fps": fps, "frames_fps_filter": len(ours), "frames_r3": len(theirs),
                         "frames_in_common": len(set(ours) & set(theirs)),
                         "fps_filter_first": ours[:5], "r3_first": theirs[:5]})
    return rows


def measure() -> dict:
    return {"benchmark": "reference_regime", "machine": machine(), "torch": torch.__version__,
            "command": "python bench/reference_regime.py --json docs/results/reference-regime.json",
            "update": update_table(), "layer_norm": layer_norm_eps(), "forward": fp16_forward(),
            "compression": compression_frames()}


def render(result: dict) -> str:
    """The README section: each remaining difference, its measured size, the setting."""
    update = "; ".join(f"{row['gradient_std']:g}: {row['fp16_moved_share']:.0%} move, mean change "
                       f"{row['fp16_mean_abs_change']:.1e} ({row['fp32_mean_abs_change']:.1e} in fp32, where "
                       f"{row['fp32_moved_share']:.0%} move)" for row in result["update"])
    ln, fwd = result["layer_norm"], result["forward"]
    compression = "; ".join(
        f"{row['source_fps']} fps, 10 s: the filter keeps {row['frames_fps_filter']} frames (source frames "
        f"{', '.join(map(str, row['fps_filter_first']))}, ...), -r 3 keeps {row['frames_r3']} "
        f"({', '.join(map(str, row['r3_first']))}, ...), {row['frames_in_common']} in common"
        for row in result["compression"])
    lines = [
        "| difference from the reference's training | measured here | setting that gives the reference's |",
        "|---|---|---|",
        f"| CLIP stored and updated in fp16: 100 BertAdam steps at CLIP's rate 1e-7 on a 1024 x 768 matrix "
        f"(std 0.02), by the std of the gradients drawn (BertAdam then clips each tensor to norm 1) | {update} | "
        "`clip_dtype=fp16` (the dataset files' default) |",
        "| each of W processes gets 1/W of the gradient, logit_scale all of it | equal to the reference's per "
        "tensor (tests/training/test_reference_regime.py, W = 2) | `ddp_gradients=reference` (default) |",
        f"| temporal transformer LayerNorm eps 1e-5 vs 1e-12 | at feature std {ln['feature_std']}: max "
        f"{ln['max_abs_difference']:.1e}, mean {ln['mean_abs_difference']:.1e} of the normalised features | "
        "`temporal_ln_eps=1e-12` (default) |",
        f"| fp16 forward: our fused towers vs CLIP's own fp16 forward (the reference's) | relative feature "
        f"difference image {fwd['image_ours_vs_own_fp16']:.1e}, text {fwd['text_ours_vs_own_fp16']:.1e} (fp16 vs "
        f"fp32 itself: {fwd['image_own_fp16_vs_fp32']:.1e}, {fwd['text_own_fp16_vs_fp32']:.1e}; {fwd['clip']}) | "
        "none (kernel rounding) |",
        f"| compression keeps frames with the fps filter, the reference with `-r 3` | {compression} | "
        "`python -m emcl_nb.data.compress --reference_rate` |",
        "",
        f"Measured by `{result['command']}` on {result['machine']}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="measure and write the results here, then the README section")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "reference-regime.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when the README section is stale")
    args = parser.parse_args(argv)
    if args.json:
        result = measure()
        atomic_write_json(args.json, result)
        print(json.dumps(result, indent=1))
        args.results = args.json
    body = render(json.loads(args.results.read_text()))
    write_or_check(SECTION, body, args.readme, check=args.check)


if __name__ == "__main__":
    main()
