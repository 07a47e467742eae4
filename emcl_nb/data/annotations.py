"""Annotation loaders: one per published layout, all returning the same `Annotations`.
Over 300 lines: five short readers that share one record type and one set of checks.

`load_annotations(params, split)` reads the files of `params.layout` under
`params.anno_path` (layouts in docs/data.md), finds every video by
walking `params.video_path` once (id = file name without its last extension) and drops
or rejects bad samples according to `params.on_bad_sample`.

Samples are (caption, video, segment) pairs. Single-sentence layouts give each video one
sample; MSVD and the MSR-VTT training/validation splits give each video all its captions;
ActivityNet and DiDeMo give each video one paragraph covering a segment. `caption_groups`
lists, per video, the indices of its samples, which is what multi-sentence evaluation
needs (and, unlike the reference, is built from the samples themselves: docs/reference-differences.md #8).

MSR-VTT validation (`msrvtt_val_csv`, e.g. MSRVTT_val.full.csv) uses every caption of
every listed video from MSRVTT_data.json, like training; multi-sentence evaluation
handles it, and it does not depend on which caption one would pick.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import logging
import math
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emcl_nb.params import Params

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Clips whose videos are broken in the LSMDC release; the reference skips them too.
LSMDC_BROKEN_CLIPS = frozenset({
    "0017_Pianist_00.23.28.872-00.23.34.843",
    "0017_Pianist_00.30.36.767-00.30.38.009",
    "3064_SPARKLE_2012_01.41.07.000-01.41.11.793",
})
DIDEMO_SEGMENT = (0.0, 31.0)     # DiDeMo videos were truncated to 30 s when annotated

# Reasons under which `Annotations.dropped` counts samples.
EMPTY_CAPTION = "empty caption"
MISSING_VIDEO = "no video file"
NO_CAPTIONS = "listed video without captions"
BROKEN_CLIP = "known broken LSMDC clip"
LIMITED = "beyond max_train_videos / max_eval_videos"


ENCODING = "utf-8"               # of every text annotation file (a byte-order mark is allowed)


class AnnotationError(ValueError):
    """Annotation files that cannot be used; the message names the file/id and the fix."""


def single_sentence_test(layout: str) -> bool:
    """Whether the layout's test split pairs each video with exactly one text (the true
    pairs are the diagonal of the similarity matrix); MSVD's test is multi-sentence."""
    return layout != "msvd"


@dataclass(slots=True)
class Sample:
    caption: str
    video_id: str
    start: float | None = None   # segment in seconds; None = whole video
    end: float | None = None


@dataclass
class Annotations:
    layout: str
    split: str
    samples: list[Sample]
    video_ids: list[str]                  # unique, in order of first appearance
    video_index: np.ndarray               # [len(samples)] int64 index into video_ids
    video_paths: list[Path]               # aligned with video_ids
    caption_groups: list[list[int]]       # per video: indices of its samples
    dropped: Counter = field(default_factory=Counter)   # reason -> number of samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)


# ---------------------------------------------------------------- file locations

def split_files(params: Params, split: str) -> list[Path] | None:
    """The annotation files a split needs, or None when the layout has no such split."""
    if split not in SPLITS:
        raise AnnotationError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root = Path(params.anno_path).expanduser()
    names = {
        # MSR-VTT training leaves out the held-out validation ids (MSRVTT_val.full.csv lies
        # inside the 9k training list): the third file, when a validation list is set.
        "msrvtt": {"train": [params.msrvtt_train_csv, "MSRVTT_data.json"]
                            + ([params.msrvtt_val_csv] if params.msrvtt_val_csv else []),
                   "val": [params.msrvtt_val_csv, "MSRVTT_data.json"] if params.msrvtt_val_csv else None,
                   "test": ["MSRVTT_JSFUSION_test.csv"]},
        "msvd": {s: [f"{s}_list.txt", "raw-captions.pkl"] for s in SPLITS},
        "lsmdc": {"train": ["LSMDC16_annos_training.csv"], "val": ["LSMDC16_annos_val.csv"],
                  "test": ["LSMDC16_challenge_1000_publictect.csv"]},
        "activity": {"train": ["train_ids.json", "train.json"], "val": None,
                     "test": ["val_ids.json", "val_1.json"]},
        "didemo": {s: [f"{s}_list.txt", f"{s}_data.json"] for s in SPLITS},
    }
    if params.layout not in names:
        raise AnnotationError(f"unknown layout {params.layout!r}; use one of {', '.join(names)}")
    files = names[params.layout][split]
    return None if files is None else [root / name for name in files]


def has_split(params: Params, split: str) -> bool:
    """Whether `params.layout` has `split` and its annotation files exist."""
    files = split_files(params, split)
    return files is not None and all(f.is_file() for f in files)


def find_videos(video_path: str | Path) -> dict[str, Path]:
    """Walk `video_path` once: video id (file name without last extension) -> path.

    Hidden files (e.g. partial outputs of an interrupted compression) are ignored; two
    files with the same id are an error because either could be meant.
    """
    root = Path(video_path).expanduser()
    if not root.is_dir():
        raise AnnotationError(f"video_path {str(root)!r} is not a folder; set video_path to "
                              "the folder holding the (compressed) videos")
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            video_id = name.rsplit(".", 1)[0] if "." in name else name
            path = Path(folder) / name
            if video_id in found:
                raise AnnotationError(f"two video files for id {video_id!r}: {found[video_id]} "
                                      f"and {path}; keep one of them under {root}")
            found[video_id] = path
    return found


# ---------------------------------------------------------------- readers, one per layout
# Each returns (records, listed ids without any caption). A record is a Sample.

def _read_text(path: Path) -> str:
    """The whole file as text; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode(f"{ENCODING}-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise AnnotationError(
            f"{path}:{line}: not valid {ENCODING} (byte {data[error.start]:#04x} at offset "
            f"{error.start}: {error.reason}); re-save the file as {ENCODING}, e.g. "
            f"`iconv -f latin1 -t {ENCODING} FILE > FILE.utf8`") from None


def _field(record, key: str, path: Path, where: str, kind: type | tuple = str):
    """record[key] of one JSON record, or an error naming the file, the record and the fix."""
    if not isinstance(record, dict) or key not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise AnnotationError(f"{path}: {where} has no {key!r} field (it has {found}); add it "
                              f"or remove the record")
    value = record[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AnnotationError(f"{path}: {where} has {key!r} = {value!r}, not a {names}; "
                              f"correct it or remove the record")
    return value


def _read_id_list(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {', '.join(missing)} "
                              f"(found {reader.fieldnames}); is this the right file?")
    try:
        rows = list(reader)
    except csv.Error as error:
        raise AnnotationError(f"{path}:{reader.line_num}: not valid CSV ({error}); correct "
                              f"that line") from None
    short = next((n for n, row in enumerate(rows, 2) if any(row[c] is None for c in columns)), None)
    if short is not None:
        raise AnnotationError(f"{path}:{short}: the row has fewer fields than the header "
                              f"({', '.join(columns)} needed); correct or remove it")
    return rows


def _read_json(path: Path, kind: type):
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path}:{error.lineno}: not valid JSON at column {error.colno} ({error.msg}); the "
            f"file is truncated or damaged: download or copy it again") from None
    if not isinstance(data, kind):
        raise AnnotationError(f"{path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


def _msrvtt(files: list[Path], split: str):
    if split == "test":
        rows = _read_csv(files[0], ("video_id", "sentence"))
        return [Sample(row["sentence"], row["video_id"]) for row in rows], []
    listed = [row["video_id"] for row in _read_csv(files[0], ("video_id",))]
    if len(files) == 3:                                   # train minus the held-out validation ids
        held_out = {row["video_id"] for row in _read_csv(files[2], ("video_id",))}
        listed = [video_id for video_id in listed if video_id not in held_out]
    wanted = set(listed)
    sentences = _read_json(files[1], dict).get("sentences")
    if not isinstance(sentences, list):
        raise AnnotationError(f"{files[1]}: no 'sentences' list; expected MSRVTT_data.json")
    where = "sentence {} of 'sentences'".format
    records = [Sample(_field(s, "caption", files[1], where(n)), video_id)
               for n, s in enumerate(sentences)
               if (video_id := _field(s, "video_id", files[1], where(n))) in wanted]
    with_captions = {r.video_id for r in records}
    return records, [v for v in listed if v not in with_captions]


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a downloaded caption file cannot
    run code (any class or function it names is refused)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}; a caption file holds plain data only")


def _msvd(files: list[Path], split: str):
    listed = _read_id_list(files[0])
    try:
        with open(files[1], "rb") as f:
            captions = _PlainDataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as error:
        raise AnnotationError(f"{files[1]}: cannot be unpickled ({type(error).__name__}: {error}); "
                              f"the file is truncated or damaged: download it again") from None
    if not isinstance(captions, dict):
        raise AnnotationError(f"{files[1]}: expected a pickled dict video_id -> captions")
    records = [Sample(" ".join(tokens), video_id)
               for video_id in listed for tokens in captions.get(video_id, ())]
    return records, [v for v in listed if not captions.get(v)]


def _lsmdc(files: list[Path], split: str):
    records = []
    for number, line in enumerate(_read_text(files[0]).split("\n"), 1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 6:
            raise AnnotationError(f"{files[0]}:{number}: expected 6 tab-separated fields "
                                  f"(clip id, 4 times, sentence), got {len(fields)}")
        records.append(Sample(fields[5], fields[0]))
    return records, []


def _activity(files: list[Path], split: str):
    listed = _read_json(files[0], list)
    data = _read_json(files[1], dict)
    records = []
    for video_id in listed:
        if video_id in data:
            entry, where = data[video_id], f"entry {video_id!r}"
            sentences = _field(entry, "sentences", files[1], where, list)
            paragraph = " ".join(str(sentence).strip() for sentence in sentences)
            duration = _field(entry, "duration", files[1], where, (int, float))
            records.append(Sample(paragraph, video_id, 0.0, float(math.ceil(duration))))
    return records, [v for v in listed if v not in data]


def _didemo(files: list[Path], split: str):
    """Videos in the order of their first entry in <split>_data.json, as the reference
    iterates them (the order decides the evaluation blocks)."""
    listed = _read_id_list(files[0])
    wanted = set(listed)
    descriptions: dict[str, list[str]] = {}
    for number, entry in enumerate(_read_json(files[1], list)):
        where = f"record {number}"
        video = _field(entry, "video", files[1], where)
        if video in wanted:
            descriptions.setdefault(video, []).append(_field(entry, "description", files[1], where).strip())
    records = [Sample(" ".join(texts), v, *DIDEMO_SEGMENT) for v, texts in descriptions.items()]
    return records, [v for v in listed if v not in descriptions]


READERS = {"msrvtt": _msrvtt, "msvd": _msvd, "lsmdc": _lsmdc,
           "activity": _activity, "didemo": _didemo}


# ---------------------------------------------------------------- assembly

def load_annotations(params: Params, split: str) -> Annotations:
    """Samples of `split` for `params.layout`, with video lookup and bad-sample handling."""
    files = split_files(params, split)
    if files is None:
        raise AnnotationError(
            f"layout {params.layout!r} has no {split!r} split"
            + (" (set msrvtt_val_csv, e.g. MSRVTT_val.full.csv)" if params.layout == "msrvtt" else "")
            + "; check has_split(params, split) first")
    for path in files:
        if not path.is_file():
            raise AnnotationError(f"{params.layout} {split}: annotation file {path} not found; "
                                  "set anno_path to the folder holding it")
    videos = find_videos(params.video_path)
    with _gc_paused():
        records, uncaptioned = READERS[params.layout](files, split)
        if split == "test" and single_sentence_test(params.layout):
            _check_one_text_per_video(records, files[0])
        annotations = _assemble(params, split, records, uncaptioned, videos)
    limit = params.max_train_videos if split == "train" else params.max_eval_videos
    return first_videos(annotations, limit) if limit else annotations


def first_videos(annotations: Annotations, count: int) -> Annotations:
    """The first `count` videos of a split with all their samples (a short trial: the
    max_train_videos / max_eval_videos settings); the samples left out are counted in
    `dropped` under LIMITED."""
    if count >= annotations.num_videos:
        return annotations
    keep = annotations.video_index < count                                       # [samples]
    samples = [sample for sample, kept in zip(annotations.samples, keep) if kept]
    video_index = annotations.video_index[keep]
    dropped = Counter(annotations.dropped)
    dropped[LIMITED] += int((~keep).sum())
    return Annotations(annotations.layout, annotations.split, samples, annotations.video_ids[:count],
                       video_index, annotations.video_paths[:count], caption_groups(video_index, count),
                       dropped)


def caption_groups(video_index, num_videos: int) -> list[list[int]]:
    """Per video, the indices of its samples (video_index: each sample's video)."""
    groups: list[list[int]] = [[] for _ in range(num_videos)]
    for i, v in enumerate(np.asarray(video_index).tolist()):
        groups[v].append(i)
    return groups


def _check_one_text_per_video(records: list[Sample], path: Path) -> None:
    """A repeated video id in a single-sentence test split is an error: it would silently
    switch the scoring to the multi-sentence protocol."""
    repeated = {video_id: n for video_id, n in Counter(r.video_id for r in records).items() if n > 1}
    if repeated:
        listed = ", ".join(f"{video_id!r} ({n} times)" for video_id, n in list(repeated.items())[:5])
        raise AnnotationError(
            f"{path}: {len(repeated)} test video id(s) appear more than once: {listed}. This "
            f"test split is scored single-sentence (one text per video), so each id must "
            f"appear once: remove the repeated rows")


@contextlib.contextmanager
def _gc_paused():
    """Building ~200k small objects would otherwise trigger repeated collections of the
    whole (growing) heap, several times the cost of the building itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _assemble(params: Params, split: str, records: list[Sample], uncaptioned: list[str],
              videos: dict[str, Path]) -> Annotations:
    where = f"{params.layout} {split}"
    strict = params.on_bad_sample == "raise"
    dropped: Counter = Counter()

    def reject(reason: str, message: str, count: int = 1) -> None:
        if strict:
            raise AnnotationError(f"{where}: {message}; set on_bad_sample=skip to drop such samples")
        dropped[reason] += count

    for video_id in uncaptioned:
        reject(NO_CAPTIONS, f"video {video_id!r} is listed but has no caption")

    samples, video_ids, video_index, video_paths = [], [], [], []
    position: dict[str, int] = {}
    for sample in records:
        if params.layout == "lsmdc" and sample.video_id in LSMDC_BROKEN_CLIPS:
            dropped[BROKEN_CLIP] += 1
            continue
        sample.caption = sample.caption.strip()
        if not sample.caption:
            reject(EMPTY_CAPTION, f"empty caption for video {sample.video_id!r}")
            continue
        index = position.get(sample.video_id)
        if index is None:
            path = videos.get(sample.video_id)
            if path is None:
                reject(MISSING_VIDEO, f"video {sample.video_id!r} has no file named "
                                      f"{sample.video_id}.<ext> under {params.video_path}")
                continue
            index = position[sample.video_id] = len(video_ids)
            video_ids.append(sample.video_id)
            video_paths.append(path)
        samples.append(sample)
        video_index.append(index)

    if dropped:
        log.warning("%s: dropped %d sample(s): %s", where, sum(dropped.values()),
                    ", ".join(f"{n} {reason}" for reason, n in dropped.items()))
    if not samples:
        raise AnnotationError(f"{where}: no usable samples ({dict(dropped) or 'no records'}); "
                              "check anno_path and video_path")
    groups = caption_groups(video_index, len(video_ids))
    return Annotations(params.layout, split, samples, video_ids,
                       np.asarray(video_index, dtype=np.int64), video_paths, groups, dropped)
