"""A first real run rehearsed at real shapes, small enough for CI: a CLIP with ViT-B/32's
shapes (random weights, saved as a plain state dict), raw videos of several sizes and frame
rates in the MSR-VTT layout, and every step as a user runs it: compress -> frame cache ->
2 training steps -> the CLIP file moved away -> evaluate -> notebook 03 through papermill."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import clip.model
import numpy as np
import papermill
import torch

from emcl_nb.data.ffmpeg import write_video

ROOT = Path(__file__).resolve().parent.parent
# (width, height, fps) of the raw videos: landscape 4:3 and 16:9, portrait, square; 25-30 fps
RAW = [(320, 240, 25), (400, 224, 30), (240, 320, 30), (256, 256, 25), (320, 240, 30), (224, 400, 25)]
TRAIN, TEST = ["video0", "video1", "video2", "video3"], ["video4", "video5"]


def vit_b32_state_dict(path: Path) -> None:
    model = clip.model.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                            vision_patch_size=32, context_length=77, vocab_size=49408,
                            transformer_width=512, transformer_heads=8, transformer_layers=12)
    torch.save(model.state_dict(), path)


def raw_videos(folder: Path) -> None:
    """Three seconds of a moving bright square on a coloured ground, one colour per video."""
    folder.mkdir(parents=True)
    for number, (width, height, fps) in enumerate(RAW):
        frames = np.zeros((3 * fps, height, width, 3), np.uint8)
        frames[...] = (40 * number % 256, 90, 200 - 30 * number)
        for t in range(len(frames)):
            x = t * (width - 48) // len(frames)
            frames[t, height // 3: height // 3 + 48, x: x + 48] = 255
        write_video(folder / f"video{number}.mp4", frames, fps)


def msrvtt_annotations(anno: Path) -> None:
    """MSRVTT_data.json, MSRVTT_train.9k.csv and MSRVTT_JSFUSION_test.csv as the real files are."""
    anno.mkdir(parents=True)
    (anno / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in TRAIN))
    with open(anno / "MSRVTT_JSFUSION_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        writer.writerows([f"ret{k}", v.replace("video", "msr"), v, f"a square moves in {v}"]
                         for k, v in enumerate(TEST))
    sentences = [{"video_id": v, "caption": f"a square moves across {v} take {k}", "sen_id": 20 * n + k}
                 for n, v in enumerate(TRAIN + TEST) for k in range(3)]
    (anno / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))


def command(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EMCL_NB_OVERRIDES", None)
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_a_first_msrvtt_run_at_vit_b32_shapes_survives_a_moved_clip_file(tmp_path, monkeypatch):
    weights = tmp_path / "weights" / "ViT-B-32-random.pt"
    weights.parent.mkdir()
    vit_b32_state_dict(weights)
    raw_videos(tmp_path / "raw")
    msrvtt_annotations(tmp_path / "annotations")
    videos = tmp_path / "videos_compressed"
    command("emcl_nb.data.compress", "--input_root", str(tmp_path / "raw"), "--output_root", str(videos),
            "--workers", "2", "--no_progress")
    assert sorted(p.name for p in videos.iterdir()) == [f"video{n}.mp4" for n in range(len(RAW))]

    settings = [f"anno_path={tmp_path / 'annotations'}", f"video_path={videos}", f"output_root={tmp_path / 'out'}",
                f"frame_cache_dir={tmp_path / 'frame_cache'}", "max_frames=4", "batch_size=2", "batch_size_val=2",
                "num_workers=1", "clip_dtype=fp32", "reference_selection=false", "run=rehearsal"]
    command("emcl_nb.data.frame_cache", "--params", "msrvtt", "--no_progress", "--set", *settings)
    assert len(list((tmp_path / "frame_cache").rglob("cache.json"))) == 2          # train and test
    trained = command("emcl_nb.train", "--params", "msrvtt", "--set", *settings, f"clip_weights={weights}",
                      "frame_cache=true", "max_steps=2")
    assert "frame cache" in trained and "training took" in trained
    run = tmp_path / "out" / "msrvtt" / "rehearsal"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True, mmap=True)["step"] == 2

    weights.rename(weights.with_name("moved.pt"))                  # the CLIP file is gone
    evaluated = command("emcl_nb.evaluate", "--params", "msrvtt", "--set", *settings, f"clip_weights={weights}")
    assert "evaluation took" in evaluated
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["results"]["last"]["n_texts"] == 2 and metrics["results"]["last"]["n_videos"] == 2

    monkeypatch.delenv("EMCL_NB_OVERRIDES", raising=False)
    papermill.execute_notebook(str(ROOT / "notebooks" / "03_evaluate.ipynb"), str(run / "03.ipynb"),
                               parameters={"dataset": "msrvtt", "run": "rehearsal", "num_queries": 2,
                                           "overrides": " ".join([*settings, f"clip_weights={weights}"])},
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    shown = "".join("".join(output.get("text", "")) for cell in json.loads((run / "03.ipynb").read_text())["cells"]
                    for output in cell.get("outputs", []))
    assert "test split: 2 texts, 2 videos" in shown
