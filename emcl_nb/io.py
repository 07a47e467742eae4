"""File writes that lose nothing: atomic, with the user's umask, one writer per run folder.

- A killed process never leaves a truncated checkpoint or output: each file is written to a
  hidden temporary name in its folder and renamed (`sweep_temp_files` removes the
  temporaries a killed process left).
- Files get the permissions the umask allows (as `open` would), not mkstemp's 0600.
- A full disk is a `DiskFullError` naming the file and the space left.
- `folder_lock`: an advisory lock (fcntl.flock) that keeps a second run out of a run folder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
from pathlib import Path

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left while writing a file; the message names the file and the free space."""


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


def _caused_by_full_disk(error: BaseException | None) -> bool:
    """Whether `error` or an error it was raised from (torch wraps the OSError) is ENOSPC."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def naming_full_disk(path: Path):
    """Turn a full-disk error while writing `path` into a DiskFullError that names it."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as error:
        if not _caused_by_full_disk(error):
            raise
        folder = Path(path).parent
        free = shutil.disk_usage(folder).free if folder.is_dir() else 0
        raise DiskFullError(errno.ENOSPC,
                            f"no space left on the device writing {path} ({free / 2**20:.1f} MiB "
                            f"free in {folder}); free some space, or set output_root to a "
                            f"disk with room") from error


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def atomic_write(path: Path, write) -> None:
    """Write `path` atomically: `write(handle)` fills a temporary file in the same folder
    (a binary handle), which is flushed, synced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with naming_full_disk(path):
            # os.open applies the umask to 0o666, as open() would
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_temp_files(folder: Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporaries (.<name>.<token>.tmp) that killed writes left in `folder`:
    of the files `names`, or of any file. Call it only while no other process writes
    those files (training holds `folder_lock`; evaluation writes its own files unlocked)."""
    folder = Path(folder)
    patterns = [f".{name}.*{TEMP_SUFFIX}" for name in names] or [f".*{TEMP_SUFFIX}"]
    stale = sorted({path for pattern in patterns for path in folder.glob(pattern)}) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive advisory lock on `folder` (its `.lock` file names the holder).
    A second holder, in this process or another, gets a FolderBusyError at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not named itself yet"
            raise FolderBusyError(
                f"{folder} is in use by another run ({holder}); wait for it to finish, or "
                f"use another run name (run=...)") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def removed_on_failure(folder: Path, kept=(LOCK_NAME, "params.yaml")):
    """A folder that this block creates is removed again when the block fails having written
    nothing in it but `kept` (a lock, the parameters) and empty files: a run that fails at its
    start leaves no empty run folder. A folder that existed before is never touched."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        yield
    except BaseException:
        if created and folder.is_dir() and not any(
                path.is_file() and path.name not in kept and path.stat().st_size
                for path in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        raise
