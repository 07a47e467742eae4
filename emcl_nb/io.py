"""File writes that lose nothing: atomic, with the user's umask, one writer per run folder.

- A killed process never leaves a truncated checkpoint or output: each file is written to a
  hidden temporary name in its folder and renamed (`sweep_temp_files` removes the
  temporaries a killed process left).
- Files get the permissions the umask allows (as `open` would), not mkstemp's 0600.
- A full disk is a `DiskFullError` naming the file and the space left.
- Ctrl-C during a write waits for the write to end, then surfaces as KeyboardInterrupt (inside
  torch.save's writer it became a RuntimeError "enforce fail ... unexpected pos").
- `folder_lock`: an advisory lock (fcntl.flock) that keeps a second run out of a run folder
  (or a second build out of a cache). It dies with its holder: forked children (loader
  workers) do not keep it, and a lock whose named holder is gone is taken over with a note.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
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


@contextlib.contextmanager
def interrupts_deferred():
    """Hold back Ctrl-C (SIGINT) until the block ends, then deliver it to the handler that was
    in place (a KeyboardInterrupt by default). Only the main thread receives signals: in
    another thread the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def atomic_write(path: Path, write) -> None:
    """Write `path` atomically: `write(handle)` fills a temporary file in the same folder
    (a binary handle), which is flushed, synced and renamed over `path`. A Ctrl-C meanwhile
    is delivered once the write has ended."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with interrupts_deferred(), naming_full_disk(path):
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


# The descriptors of the locks this process holds, closed in every forked child.
_HELD_LOCKS: set[int] = set()
RUN_ADVICE = "wait for it to finish, or use another run name (run=...)"


def _drop_inherited_locks() -> None:
    """In a forked child (a loader worker): point the descriptors of the parent's locks at
    /dev/null, so that a child outliving its parent does not keep the parent's folder
    locked (a flock lasts while any descriptor of its open file does)."""
    if not _HELD_LOCKS:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD_LOCKS:
        os.dup2(devnull, fd)
    os.close(devnull)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _gone_holder(holder: str) -> int | None:
    """The process id a lock file names when that process no longer runs on this machine."""
    found = re.fullmatch(r"process (\d+) on (.+)", holder)
    if found is None or found.group(2) != socket.gethostname():
        return None
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return int(found.group(1))
    except PermissionError:           # alive, another user's
        return None
    return None


def _take_lock(path: Path, advice: str):
    """The open lock file `path`, flock-ed; a lock whose named holder is gone (a process
    it forked still holds the file) is replaced by a fresh lock file, with a note."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            gone = _gone_holder(holder)
            if gone is None:
                raise FolderBusyError(f"{path.parent} is in use by "
                                      f"{holder or 'a process that has not named itself yet'}; "
                                      f"{advice}") from None
            print(f"[emcl_nb] note: {path.parent} was locked by process {gone}, which is gone "
                  f"(a process it started still held the lock); taking the lock over")
            path.unlink(missing_ok=True)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:       # replaced by another process taking over a stale lock
            same = False
        if same:
            return handle
        handle.close()


@contextlib.contextmanager
def folder_lock(folder: Path, advice: str = RUN_ADVICE):
    """Hold an exclusive advisory lock on `folder` (its `.lock` file names the holder).
    A second holder, in this process or another, gets a FolderBusyError at once, ending with
    `advice` (what the user can do: the default fits a run folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _take_lock(folder / LOCK_NAME, advice) as handle:
        _HELD_LOCKS.add(handle.fileno())
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            _HELD_LOCKS.discard(handle.fileno())
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
