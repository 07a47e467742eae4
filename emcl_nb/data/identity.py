"""The identity of a run's data: a cheap fingerprint recorded in every checkpoint, so that a
run is neither resumed nor evaluated on other data without a word.

Three parts, each compared on its own so that a difference can be named:
- "annotations": SHA-256 of the annotation files of every split the layout has (read once:
  megabytes);
- "videos": SHA-256 of the video folder's list of files (relative path, size and, for real
  data, modification time: a stat per file, no video is read);
- "synthetic": the settings the synthetic folder was generated with (its synthetic.json),
  which fix its videos (their modification times are then left out: a set regenerated with
  the same settings is the same set).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from emcl_nb.data.annotations import SPLITS, split_files
from emcl_nb.params import Params

PARTS = {"annotations": "the annotation files", "videos": "the video files (their list, sizes or dates)",
         "synthetic": "the synthetic set (its generation settings)"}
SYNTHETIC_MANIFEST = "synthetic.json"


def _annotation_digest(params: Params) -> str | None:
    files = sorted({path for split in SPLITS for path in split_files(params, split) or ()
                    if path.is_file()})
    if not params.anno_path or not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _video_digest(video_path: str, with_dates: bool) -> str | None:
    root = Path(video_path).expanduser()
    if not video_path or not root.is_dir():
        return None
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(name for name in files if not name.startswith(".")):
            stat = (Path(folder) / name).stat()
            relative = os.path.relpath(Path(folder) / name, root)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns if with_dates else 0}\n".encode())
    return digest.hexdigest()


def _synthetic_settings(params: Params) -> dict | None:
    manifest = Path(params.anno_path).expanduser() / SYNTHETIC_MANIFEST
    if not (params.synthetic and manifest.is_file()):
        return None
    return json.loads(manifest.read_text()).get("settings")


def data_identity(params: Params) -> dict:
    """The fingerprint of the data `params` points at (see the module docstring)."""
    synthetic = _synthetic_settings(params)
    return {"annotations": _annotation_digest(params),
            "videos": _video_digest(params.video_path, with_dates=synthetic is None),
            "synthetic": synthetic}


def data_differences(recorded: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words ("the annotation files", ...; the
    synthetic settings that changed, old -> new)."""
    differences = []
    for part, words in PARTS.items():
        old, new = recorded.get(part), current.get(part)
        if old == new:
            continue
        if part == "synthetic" and isinstance(old, dict) and isinstance(new, dict):
            changed = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                                for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key))
            words = f"{words}: {changed}"
        differences.append(words)
    return differences
