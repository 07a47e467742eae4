"""A small procedural text-video dataset in the MSR-VTT layout, for quick runs on a CPU.

    python -m emcl_nb.data.synthetic --out DIR [--train N --val V --test M --seed S
                                                --frames F --fps R --size P --distractors K
                                                --shape_scale X --templates C]

Each video shows one shape (circle / square / triangle) of one colour moving in one
direction (left / right / up / down) that switches to a second colour part-way through,
so a caption is only matched by getting both the appearance and the time order right
("a red circle moves left and then turns blue" is not "a blue circle ... turns red").
Positions, sizes, speeds and the moment of the switch vary per video; `distractors`
adds moving shapes that no caption mentions (a harder variant), `shape_scale` sets the
shapes' size (a radius of 10-14 % of the frame side times the scale; smaller is harder) and
`templates` how many caption paraphrases each video gets (the first C of CAPTION_TEMPLATES;
more is harder: the text encoder must learn more ways of saying the same thing).

Written files (the `msrvtt` layout of docs/data.md):
    DIR/videos/videoN.mp4          H.264, `frames` frames at `fps`, `size`x`size`
    DIR/MSRVTT_data.json           {"videos": [...drawn parameters...], "sentences": [...]}
    DIR/MSRVTT_train.9k.csv        video_id of the training videos
    DIR/MSRVTT_val.csv             video_id of held-out validation videos
    DIR/MSRVTT_JSFUSION_test.csv   key,vid_key,video_id,sentence: one caption per test video
    DIR/synthetic.json             the arguments, written last: same arguments -> no-op
Every file is a deterministic function of the arguments (same seed, same bytes).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..io import atomic_write_json, atomic_write_text
from ..params import synthetic_settings
from ..progress import progress_bar
from .ffmpeg import remove_partials, write_video

FORMAT_VERSION = 3     # bump when the drawing or captions change, so old folders are redone
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (225, 35, 35), "green": (40, 200, 60), "blue": (50, 90, 240),
           "yellow": (240, 220, 40), "white": (245, 245, 245)}
# direction -> (unit step (dx, dy) in image coordinates, adverb, phrase)
DIRECTIONS = {"left": ((-1, 0), "left", "to the left"), "right": ((1, 0), "right", "to the right"),
              "up": ((0, -1), "up", "upwards"), "down": ((0, 1), "down", "downwards")}
CAPTION_TEMPLATES = (
    "a {c1} {shape} moves {adv} and then turns {c2}",
    "a {shape}, {c1} at first and {c2} later, slides {phrase}",
    "the {c1} {shape} goes {adv} and becomes {c2} part-way through",
    "a {shape} travels {phrase}; it starts {c1} and ends {c2}",
    "a {c1} {shape} heading {phrase} changes its colour to {c2}",
    "{c1} then {c2}: a {shape} moving {adv}",
    "a {shape} drifts {phrase} while switching from {c1} to {c2}",
)
# The generator's defaults: those of the synthetic_* parameters (stated once, in Params).
DEFAULTS = synthetic_settings()
DEFAULT_TEMPLATES = DEFAULTS["templates"]   # all 7 make a harder variant
# Every (shape, first colour, second colour, direction): 3 x 5 x 4 x 4 = 240.
COMBOS = tuple((shape, c1, c2, direction) for shape in SHAPES for c1 in COLOURS
               for c2 in COLOURS if c2 != c1 for direction in DIRECTIONS)
# Half the square's side as a multiple of the radius: every shape fills the same 2r x 2r box.
# (0.85, about the circle's area, left only a few corner pixels between circle and square:
# most of the tiny model's test errors were circle <-> square.)
SQUARE_HALF_SIDE = 1.0
BACKGROUND = 30        # dark grey, plus mild per-pixel noise (the same in every frame)
NOISE_STD = 6.0


def captions(video: dict, templates: int = DEFAULT_TEMPLATES) -> list[str]:
    """The paraphrased captions of a planned video, one per template of the first `templates`."""
    _, adv, phrase = DIRECTIONS[video["direction"]]
    words = dict(shape=video["shape"], c1=video["colour"], c2=video["second_colour"],
                 adv=adv, phrase=phrase)
    return [template.format(**words) for template in CAPTION_TEMPLATES[:templates]]


def _moving_shape(rng: np.random.Generator, size: int, shape: str, direction: str,
                  scale: float) -> dict:
    """Random radius, start point and travel for a shape that stays inside the frame."""
    radius = float(rng.uniform(0.10, 0.14) * size * scale)
    low, high = radius + 1, size - radius - 1
    travel = min(float(rng.uniform(0.45, 0.60) * size), high - low)   # large shapes travel less
    (dx, dy), _, _ = DIRECTIONS[direction]
    along = float(rng.uniform(low, max(low, high - travel)))          # start on the motion axis
    across = float(rng.uniform(low, high))
    x, y = (along, across) if dx else (across, along)
    if dx < 0 or dy < 0:                                      # moving towards 0: start at the far end
        x, y = (size - x, y) if dx else (x, size - y)
    return dict(shape=shape, direction=direction, radius=round(radius, 3),
                start=[round(x, 3), round(y, 3)], travel=round(travel, 3))


def plan_videos(train: int, val: int, test: int, seed: int, frames: int, size: int,
                distractors: int, shape_scale: float = 1.0) -> list[dict]:
    """Every video's id, split and drawn parameters, in id order (train, val, test).

    Test (and validation) videos get distinct combinations where possible; training
    videos cycle through a shuffled list of all combinations, so each is seen.
    """
    rng = np.random.default_rng(seed)
    def cycled(count):
        order = rng.permutation(len(COMBOS))
        return [COMBOS[order[i % len(COMBOS)]] for i in range(count)]
    splits = [("train", c) for c in cycled(train)] + [("validate", c) for c in cycled(val)] + \
             [("test", c) for c in cycled(test)]
    videos = []
    for index, (split, (shape, c1, c2, direction)) in enumerate(splits):
        video = dict(video_id=f"video{index}", id=index, split=split, colour=c1, second_colour=c2,
                     change_frame=int(rng.integers(round(0.35 * frames), round(0.65 * frames) + 1)),
                     **_moving_shape(rng, size, shape, direction, scale=shape_scale))
        video["distractors"] = [
            dict(colour=str(rng.choice(list(COLOURS))),
                 **_moving_shape(rng, size, str(rng.choice(SHAPES)),
                                 str(rng.choice(list(DIRECTIONS))), scale=0.7 * shape_scale))
            for _ in range(distractors)]
        videos.append(video)
    return videos


def _mask(shape: str, cx: float, cy: float, radius: float, xs: np.ndarray, ys: np.ndarray):
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    if shape == "square":
        half = radius * SQUARE_HALF_SIDE
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":          # apex up, base at the bottom
        top = cy - radius
        return (ys >= top) & (ys <= cy + radius) & (np.abs(xs - cx) <= (ys - top) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _position(obj: dict, t: int, frames: int) -> tuple[float, float]:
    (dx, dy), _, _ = DIRECTIONS[obj["direction"]]
    step = obj["travel"] * t / max(frames - 1, 1)
    return obj["start"][0] + dx * step, obj["start"][1] + dy * step


def render(video: dict, frames: int, size: int, seed: int) -> np.ndarray:
    """The uint8 frames [frames, size, size, 3] of a planned video."""
    noise_rng = np.random.default_rng([seed, video["id"]])
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    # a static noisy background: texture without the cost of encoding fresh noise per frame
    out = np.repeat(noise_rng.normal(BACKGROUND, NOISE_STD, (1, size, size, 3)), frames, axis=0)
    for t in range(frames):
        for item in video["distractors"]:
            out[t][_mask(item["shape"], *_position(item, t, frames), item["radius"], xs, ys)] = \
                COLOURS[item["colour"]]
        colour = video["colour"] if t < video["change_frame"] else video["second_colour"]
        out[t][_mask(video["shape"], *_position(video, t, frames), video["radius"], xs, ys)] = \
            COLOURS[colour]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write_one(job: tuple[dict, Path, int, int, int, int]) -> None:
    video, path, frames, fps, size, seed = job
    write_video(path, render(video, frames, size, seed), fps)


def _csv(header: list[str], rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _annotation_files(videos: list[dict], seed: int, templates: int) -> dict[str, str]:
    """File name -> text of the MSR-VTT annotation files."""
    sentences = []
    for video in videos:
        sentences += [dict(video_id=video["video_id"], caption=text, sen_id=len(sentences) + i)
                      for i, text in enumerate(captions(video, templates))]
    pick = np.random.default_rng([seed, len(videos)])      # which caption each test video keeps
    tests = [v for v in videos if v["split"] == "test"]
    test_rows = [(f"ret{i}", f"msr{v['id']}", v["video_id"],
                  captions(v, templates)[pick.integers(templates)]) for i, v in enumerate(tests)]
    def id_list(split):
        return _csv(["video_id"], [(v["video_id"],) for v in videos if v["split"] == split])
    return {
        "MSRVTT_data.json": json.dumps({"videos": videos, "sentences": sentences}) + "\n",
        "MSRVTT_train.9k.csv": id_list("train"),
        "MSRVTT_val.csv": id_list("validate"),
        "MSRVTT_JSFUSION_test.csv": _csv(["key", "vid_key", "video_id", "sentence"], test_rows),
    }


def generate_synthetic(out_dir, train: int = DEFAULTS["train"], test: int = DEFAULTS["test"],
                       seed: int = DEFAULTS["seed"], frames: int = DEFAULTS["frames"],
                       fps: int = DEFAULTS["fps"], size: int = DEFAULTS["size"],
                       val: int = DEFAULTS["val"], distractors: int = DEFAULTS["distractors"],
                       shape_scale: float = DEFAULTS["shape_scale"],
                       templates: int = DEFAULTS["templates"], workers: int | None = None,
                       progress: bool = True) -> Path:
    """Write the synthetic dataset to `out_dir` (see the module docstring); returns the folder.

    A folder already holding a complete set made with the same arguments is left as is.
    An interrupted run with the same arguments keeps the videos it finished.
    """
    for name, value, least in (("train", train, 1), ("test", test, 1), ("val", val, 0),
                               ("frames", frames, 2), ("fps", fps, 1), ("size", size, 16),
                               ("distractors", distractors, 0), ("templates", templates, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"generate_synthetic: {name} must be an integer >= {least}, got {value!r}")
    if templates > len(CAPTION_TEMPLATES):
        raise ValueError(f"generate_synthetic: templates must be at most {len(CAPTION_TEMPLATES)} "
                         f"(the caption templates there are), got {templates}")
    if not 0.25 <= shape_scale <= 2.5:     # 2.5: the largest shapes still fit and can move
        raise ValueError(f"generate_synthetic: shape_scale must be in [0.25, 2.5], got {shape_scale!r}")
    if size % 2:
        raise ValueError(f"generate_synthetic: size must be even (H.264 yuv420p), got {size}")
    out_dir = Path(out_dir)
    manifest_path, video_dir = out_dir / "synthetic.json", out_dir / "videos"
    settings = dict(format=FORMAT_VERSION, train=train, val=val, test=test, seed=seed,
                    frames=frames, fps=fps, size=size, distractors=distractors, templates=templates)
    if shape_scale != 1.0:       # only when set, so sets made before the knob stay valid
        settings["shape_scale"] = shape_scale
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    same_settings = previous.get("settings") == settings
    videos = plan_videos(train, val, test, seed, frames, size, distractors, shape_scale)
    wanted = {video_dir / f"{v['video_id']}.mp4": v for v in videos}
    if same_settings and previous.get("complete") and all(path.exists() for path in wanted):
        return out_dir

    if not same_settings and video_dir.is_dir():      # made with other settings: redo everything
        for stale in video_dir.glob("video*.mp4"):
            stale.unlink()
    remove_partials(video_dir)
    atomic_write_json(manifest_path, dict(settings=settings, complete=False))
    jobs = [(v, path, frames, fps, size, seed) for path, v in wanted.items() if not path.exists()]
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    bar = progress_bar(total=len(jobs), desc="synthetic videos", unit="video", disable=not progress)
    with bar:
        if workers == 1:
            for job in jobs:
                _write_one(job)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_write_one, jobs, chunksize=8):
                    bar.update(1)
    for name, text in _annotation_files(videos, seed, templates).items():
        atomic_write_text(out_dir / name, text)
    atomic_write_json(manifest_path, dict(settings=settings, complete=True))
    return out_dir


def generate_from_params(params, progress: bool | None = None) -> Path:
    """`generate_synthetic` with the `synthetic_*` fields of a Params, into `anno_path`.

    The videos land in `anno_path/videos`, so `video_path` must point there.
    """
    anno = Path(params.anno_path).expanduser()
    if Path(params.video_path).expanduser().resolve() != (anno / "videos").resolve():
        raise ValueError(f"synthetic data: video_path {params.video_path!r} must be "
                         f"anno_path/videos ({anno / 'videos'}); set video_path to it")
    return generate_synthetic(anno, **synthetic_settings(params),
                              progress=params.progress if progress is None else progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    for name, text in (("train", "training videos"), ("val", "validation videos"),
                       ("test", "test videos (one caption each)"), ("seed", "random seed"),
                       ("frames", "frames per video"), ("fps", "frames per second"),
                       ("size", "frame side, pixels (even)"),
                       ("distractors", "uncaptioned moving shapes per video (harder)"),
                       ("templates", f"caption paraphrases per video, 1-{len(CAPTION_TEMPLATES)} "
                                     f"(more is harder)")):
        parser.add_argument(f"--{name}", type=int, default=DEFAULTS[name],
                            help=f"{text} (default {DEFAULTS[name]})")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help=f"parallel processes (default {os.cpu_count()})")
    parser.add_argument("--shape_scale", type=float, default=DEFAULTS["shape_scale"],
                        help=f"shape size factor, 0.25-2.5 (default {DEFAULTS['shape_scale']}; "
                             f"smaller is harder)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = vars(parser.parse_args(argv))
    args["out_dir"], args["progress"] = args.pop("out"), not args.pop("no_progress")
    print(f"synthetic dataset in {generate_synthetic(**args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
