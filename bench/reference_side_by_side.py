"""Training throughput of this project beside the published reference code, measured on the
same machine in alternating rounds, so that the README compares against a reference figure
of the same session instead of a quoted one.

    python bench/reference_side_by_side.py --reference EMCL/video_retrieval/EMCL-Net
    python bench/reference_side_by_side.py --reference EMCL/video_retrieval/EMCL-Net --rounds 1 --steps 3
    python bench/reference_side_by_side.py --reference EMCL/video_retrieval/EMCL-Net --anomaly --json side.json

Each round runs two processes, one after the other, with the same warm-up, steps and repeats:
ours, `bench/train_step.py --preset reference-cpu`, then the reference's training step at
that configuration (this script with --only-reference). It prints every round, the medians
and ours / reference.

The reference (jpthu17/EMCL, folder video_retrieval/EMCL-Net) is imported from --reference,
never copied. Its settings are its argument parser's defaults, except the configuration
(batch, words, frames, aggregation and its depth), taken from the preset. The timed step is
the body of its `train_epoch`: forward to the loss, backward (inside
torch.autograd.detect_anomaly only with --anomaly, as it ships), clip_grad_norm_(1.0), its
BertAdam step (the warm-up cosine schedule lives in BertAdam: prep_optimizer gives no
scheduler), zero_grad, the logit-scale clamp and the two .item() reads it logs. Its input is
the clip of `random_batch` normalised to float32 frames, made before the timing. Its loader
hands it float64 (np.float), which its forward converts; float32 spares it that conversion
(about a tenth of its CPU step), so the comparison errs in its favour. Patched at run time,
in its process only (numerics untouched):

- `pandas`, `cv2`, `functional`: empty stand-ins when missing (main_retrieval imports its
  data loaders, which import them; no loader runs here);
- `torch.Tensor.cuda(device)` is `.to(device)`: its EMCL moves its bases with `.cuda(embds.device)`;
- its CLIP weights: `_PT_NAME` gets an entry naming a temporary state dict of our tiny CLIP,
  drawn as our run draws it (seed 0, `build_tiny_clip`); its model reads the architecture off
  the shapes, and the script checks that every weight arrived.

Both processes see no GPU (CUDA_VISIBLE_DEVICES=""), so the reference takes its CPU paths
(fp32, no DDP, no all_gather) on any machine. Ours sets up torch as it always does
(configure_torch: threads, denormals flushed, freed memory kept); the reference gets the
preset's thread count and torch's defaults otherwise, as it ships.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from train_step import PRESETS, positive_int, random_batch, time_windows  # bench/, the script's folder

from emcl_nb.io import atomic_write_json
from emcl_nb.model.clip_backbone import build_tiny_clip, normalize_frames
from emcl_nb.params import Params, load_params
from emcl_nb.training.runtime import cpu_model, seed_everything

ROOT = Path(__file__).resolve().parents[1]
PRESET = "reference-cpu"
REFERENCE_FILES = ("main_retrieval.py", "tvr/models/modeling.py", "tvr/models/optimization.py")
REFERENCE_REPO = "https://github.com/jpthu17/EMCL"
# Modules the reference's data loaders import at module level; no loader runs here.
LOADER_ONLY_MODULES = ("pandas", "cv2", "functional")
# Our setting -> the reference's argument: what sets the same work on both sides.
REFERENCE_ARGS = {"batch_size": "batch_size", "max_words": "max_words", "max_frames": "max_frames",
                  "agg_module": "agg_module", "num_hidden_layers": "num_hidden_layers", "temp": "temp",
                  "emcl_bases": "centerK", "emcl_stages": "stage_num", "emcl_momentum": "momentum",
                  "emcl_lamd": "lamd", "emcl_beta": "beta"}
# Our settings for what the reference hard-codes: EMCL on the text-pooled block (its init),
# fp32 on the CPU, BertAdam with its per-tensor clip 1.0, the global clip 1.0 in the loop,
# decay for every name without "bias", the patch embedding frozen.
REFERENCE_FIXED = {"emcl": "on", "pooling": "text", "emcl_init": "reference", "precision": "fp32",
                   "optimizer": "bertadam", "grad_clip": 1.0, "decay_exempt": "reference",
                   "freeze_patch_embedding": True}


class ReferenceNotFoundError(ValueError):
    """--reference is not the reference's video_retrieval/EMCL-Net folder; the message says how to get it."""


def check_reference_folder(path: Path) -> Path:
    """`path` resolved, if it holds the reference's training script and model code."""
    path = Path(path).expanduser().resolve()
    missing = [name for name in REFERENCE_FILES if not (path / name).is_file()]
    if not missing:
        return path
    if not path.is_dir():
        problem = "does not exist"
    elif (path / "video_retrieval" / "EMCL-Net").is_dir():
        problem = f"is the repository, not its folder video_retrieval/EMCL-Net: pass {path}/video_retrieval/EMCL-Net"
    else:
        problem = f"is not the video_retrieval/EMCL-Net folder of {REFERENCE_REPO} (no {', '.join(missing)})"
    raise ReferenceNotFoundError(
        f"--reference {path} {problem}. Get the reference with `git clone {REFERENCE_REPO}` and pass "
        f"--reference EMCL/video_retrieval/EMCL-Net.")


def preset_params() -> Params:
    """Our run's parameters: the synthetic defaults with the preset (what train_step runs)."""
    return load_params("synthetic", PRESETS[PRESET], use_env=False)


def setting_differences(params: Params, reference_args: dict) -> dict[str, dict]:
    """Settings that give the two sides different work: {our name: {ours, reference}}."""
    pairs = {name: (getattr(params, name), reference_args[arg]) for name, arg in REFERENCE_ARGS.items()}
    pairs |= {name: (getattr(params, name), value) for name, value in REFERENCE_FIXED.items()}
    return {name: {"ours": ours, "reference": theirs} for name, (ours, theirs) in pairs.items() if ours != theirs}


# ---------------------------------------------------------------------------------------
# The reference's training step (this script with --only-reference, in its own process)
# ---------------------------------------------------------------------------------------

def import_reference(path: Path) -> types.ModuleType:
    """The reference's main_retrieval, with stand-ins for the loader-only modules that are
    missing and its EMCL's `.cuda(device)` made a plain `.to(device)`."""
    for name in LOADER_ONLY_MODULES:
        if importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None)   # torch's import hooks read it
            sys.modules[name] = stand_in
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **_: self.to(
        "cpu" if device is None else device, non_blocking=non_blocking)
    sys.path.insert(0, str(path))
    import main_retrieval
    return main_retrieval


def reference_args(main_retrieval: types.ModuleType, params: Params, clip_name: str, output_dir: str):
    """Its parser's defaults, with the configuration of our preset."""
    argv = ["--output_dir", output_dir, "--base_encoder", clip_name, "--batch_size", str(params.batch_size),
            "--max_words", str(params.max_words), "--max_frames", str(params.max_frames),
            "--agg_module", params.agg_module, "--num_hidden_layers", str(params.num_hidden_layers)]
    saved_argv, sys.argv = sys.argv, ["main_retrieval.py", *argv]
    try:
        return main_retrieval.get_args()
    finally:
        sys.argv = saved_argv


def build_reference_model(main_retrieval: types.ModuleType, args, clip_state: dict, clip_path: Path):
    """Its EMCL model on our tiny CLIP's weights (written to `clip_path`), built after seed 0 as its
    set_seed_logger seeds before build_model."""
    from tvr.models import modeling
    modeling._PT_NAME[args.base_encoder] = str(clip_path)    # os.path.join keeps an absolute path
    torch.save(clip_state, clip_path)
    torch.manual_seed(args.seed)
    model = main_retrieval.build_model(args)
    loaded = model.clip.state_dict()
    wrong = [name for name, tensor in clip_state.items() if not torch.equal(loaded[name], tensor)]
    if wrong:
        raise RuntimeError(f"the reference model did not take the tiny CLIP's weights: {', '.join(wrong)}")
    return model


def reference_batch(params: Params) -> tuple[torch.Tensor, ...]:
    """What its model takes from a batch of its loader: text ids and mask [B,L] int64, frames
    [B,T,3,H,W] normalised (CLIP's mean and std; float32, not its loader's float64: see the
    module's docstring), frame mask [B,T] int64, video ids [B]."""
    batch = random_batch(params, torch.device("cpu"))
    video = normalize_frames(batch["video"])                                         # [B, T, 3, H, W]
    video_ids = torch.arange(params.batch_size)                                      # all distinct
    return batch["text_ids"], batch["text_mask"], video, batch["frame_mask"], video_ids


def time_reference(path: Path, warmup: int, steps: int, repeats: int, anomaly: bool) -> dict:
    """The reference's training step, timed like train_step: the median of `repeats` windows."""
    import numpy as np

    params = preset_params()
    torch.set_num_threads(params.num_threads)
    main_retrieval = import_reference(path)
    seed_everything(0)                               # train_step draws its tiny CLIP first after this seed
    clip_state = build_tiny_clip(params.tiny_width, params.tiny_layers, params.tiny_patch,
                                 params.image_size).state_dict()
    with tempfile.TemporaryDirectory() as scratch:
        args = reference_args(main_retrieval, params, "tiny-clip", scratch)
        model = build_reference_model(main_retrieval, args, clip_state, Path(scratch) / "tiny_clip.pt")
    model.train()
    total_steps = warmup + steps * repeats
    optimizer, _no_scheduler, model = main_retrieval.prep_optimizer(args, model, total_steps, args.local_rank)
    text_ids, text_mask, video, video_mask, video_ids = reference_batch(params)
    global_step = 0

    def step() -> float:
        nonlocal global_step
        global_step += 1
        loss = model(text_ids, text_mask, video, video_mask, video_ids, global_step)
        with torch.autograd.detect_anomaly() if anomaly else contextlib.nullcontext():
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        torch.clamp_(model.clip.logit_scale.data, max=np.log(100))
        model.clip.logit_scale.exp().item()
        return float(loss)

    for _ in range(warmup):
        step()
    window_seconds, load_before = time_windows(step, steps, repeats)
    seconds_per_step = statistics.median(window_seconds) / steps
    return {
        "benchmark": "reference_train_step", "anomaly": anomaly, "threads": torch.get_num_threads(),
        "clips_per_s": round(args.batch_size / seconds_per_step, 2), "ms_per_step": round(seconds_per_step * 1000, 1),
        "clips_per_s_windows": [round(steps * args.batch_size / s, 2) for s in window_seconds],
        "peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "settings": {arg: getattr(args, arg) for arg in REFERENCE_ARGS.values()},
        "load_average_1min": [load_before, round(os.getloadavg()[0], 2)],
    }


# ---------------------------------------------------------------------------------------
# The alternating rounds
# ---------------------------------------------------------------------------------------

def run_timer(command: list[str], json_path: Path) -> dict:
    """Run one timing process (this checkout's code first on its path, no GPU) and read its figures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, *command, "--json", str(json_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed (exit {run.returncode}):\n{run.stdout[-2000:]}"
                           f"{run.stderr[-4000:]}")
    return json.loads(json_path.read_text())


def alternate(rounds: int, time_ours, time_reference) -> list[dict]:
    """`rounds` x (ours, then the reference), each a fresh process: [{ours, reference}] of
    their figures. Prints every round."""
    results = []
    for number in range(1, rounds + 1):
        ours, reference = time_ours(), time_reference()
        results.append({"ours": ours, "reference": reference})
        print(f"round {number}/{rounds}: ours {ours['clips_per_s']:.1f} clips/s ({ours['ms_per_step']:.0f} ms/step), "
              f"reference {reference['clips_per_s']:.1f} clips/s ({reference['ms_per_step']:.0f} ms/step)",
              flush=True)
    return results


def summarise(rounds: list[dict]) -> dict:
    """Medians over the rounds and ours / reference."""
    ours = statistics.median(r["ours"] for r in rounds)
    reference = statistics.median(r["reference"] for r in rounds)
    return {"ours_clips_per_s": round(ours, 2), "reference_clips_per_s": round(reference, 2),
            "ratio": round(ours / reference, 3)}


def reference_commit(path: Path) -> str | None:
    """The checkout's commit, or None where the folder is not in a git work tree."""
    run = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def describe(params: Params, anomaly: bool) -> str:
    return (f"tiny CLIP (width {params.tiny_width}, {params.tiny_layers} layers, patch {params.tiny_patch}), "
            f"{params.image_size} px, {params.max_frames} frames, batch {params.batch_size}, {params.max_words} "
            f"words, {params.agg_module} with {params.num_hidden_layers} layers, {params.precision}, "
            f"{params.num_threads} threads; reference anomaly mode {'on (as shipped)' if anomaly else 'off'}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True,
                        help="the video_retrieval/EMCL-Net folder of a jpthu17/EMCL checkout")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds (ours, then the reference)")
    parser.add_argument("--steps", type=positive_int, default=10, help="steps per timed window")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed steps per process")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed windows per process; the median is kept")
    parser.add_argument("--anomaly", action="store_true",
                        help="time the reference as it ships: backward inside torch.autograd.detect_anomaly")
    parser.add_argument("--only-reference", action="store_true",
                        help="time the reference once in this process (what each round runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        reference = check_reference_folder(args.reference)
    except ReferenceNotFoundError as error:
        parser.error(str(error))
    if args.only_reference:
        figures = time_reference(reference, args.warmup, args.steps, args.repeats, args.anomaly)
        if args.json is not None:
            atomic_write_json(args.json, figures)
        return figures

    params = preset_params()
    timing = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    ours_command = ["bench/train_step.py", "--preset", PRESET, *timing]
    reference_command = ["bench/reference_side_by_side.py", "--only-reference", "--reference", str(reference),
                         *timing, *(["--anomaly"] if args.anomaly else [])]
    print(describe(params, args.anomaly))
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as scratch:
        timings = alternate(args.rounds, lambda: run_timer(ours_command, Path(scratch) / "ours.json"),
                            lambda: run_timer(reference_command, Path(scratch) / "reference.json"))
    rounds = [{side: figures["clips_per_s"] for side, figures in timing.items()} for timing in timings]
    settings = timings[-1]["reference"]["settings"]
    differences = setting_differences(params, settings)
    summary = summarise(rounds)
    figures = {
        "benchmark": "reference_side_by_side", "machine": cpu_model(), "threads": params.num_threads,
        "torch": torch.__version__,
        "configuration": {"description": describe(params, args.anomaly), "reference_anomaly_mode": args.anomaly,
                          "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                          "reference_settings": settings, "setting_differences": differences},
        "rounds": rounds, **summary, "reference_commit": reference_commit(reference),
        "command": "python bench/reference_side_by_side.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "load_average_1min": [load_before, round(os.getloadavg()[0], 2)],
    }
    print(f"median: ours {summary['ours_clips_per_s']:.1f} clips/s, reference {summary['reference_clips_per_s']:.1f} "
          f"clips/s; ours / reference {summary['ratio']:.2f} (load {figures['load_average_1min'][0]}-"
          f"{figures['load_average_1min'][1]})")
    print("settings that change the work: " + (json.dumps(differences) if differences else "none differ"))
    if args.json is not None:
        atomic_write_json(args.json, figures)
        print(f"wrote {args.json}")
    return figures


if __name__ == "__main__":
    main()
