"""File writes: the umask decides the mode, a full disk names the file, one lock holder."""
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from emcl_nb.io import (
    DiskFullError,
    FolderBusyError,
    atomic_write,
    atomic_write_text,
    folder_lock,
    sweep_temp_files,
)
from emcl_nb.training.checkpoint import atomic_torch_save


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert {oct(os.stat(tmp_path / name).st_mode & 0o777) for name in ("a.txt", "b.pt")} == {oct(mode)}


def test_a_full_disk_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    def no_space(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    target = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(DiskFullError, match=r"writing .*last\.pt \(\d+\.\d MiB free in .*checkpoints\)"):
        atomic_torch_save({"w": 1}, target)
    assert list(target.parent.iterdir()) == []           # neither the file nor a temporary


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def broken(obj, handle):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError) as error:
        atomic_torch_save({"w": 1}, tmp_path / "x.pt")
    assert not isinstance(error.value, DiskFullError)


def test_sweep_removes_only_hidden_temporaries(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_text("stale")
    (tmp_path / "notes.tmp").write_text("a user's file")
    (tmp_path / "last.pt").write_text("kept")
    assert [p.name for p in sweep_temp_files(tmp_path)] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


def test_sweep_can_keep_to_the_temporaries_of_named_files(tmp_path):
    (tmp_path / ".history.json.abc123.tmp").write_text("stale")
    (tmp_path / ".metrics.json.def456.tmp").write_text("another process is writing it")
    assert [p.name for p in sweep_temp_files(tmp_path, ("history.json",))] == [".history.json.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == [".metrics.json.def456.tmp"]


def test_the_lock_keeps_out_another_process_and_names_the_holder(tmp_path):
    probe = ("import sys; from emcl_nb.io import folder_lock, FolderBusyError\n"
             "try:\n    folder_lock(sys.argv[1]).__enter__()\n"
             "except FolderBusyError as error:\n    print(error); sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with folder_lock(tmp_path / "run"):
        busy = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")],
                              capture_output=True, text=True, env=env)
        with pytest.raises(FolderBusyError):                   # in this process too
            with folder_lock(tmp_path / "run"):
                pass
    assert busy.returncode == 3, busy.stderr
    assert f"process {os.getpid()}" in busy.stdout and str(tmp_path / "run") in busy.stdout
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], env=env)
    assert free.returncode == 0


def _ended(process: subprocess.Popen) -> int:
    process.wait()
    return process.pid


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    """A loader worker (a forked child) outliving its killed parent left the run or cache
    folder locked (issue 24: a rebuild refused for over 10 minutes)."""
    holder = ("import os, sys, time; from emcl_nb.io import folder_lock\n"
              "with folder_lock(sys.argv[1]):\n"
              "    child = os.fork()\n"
              "    if child == 0:\n        time.sleep(60); os._exit(0)\n"
              "    print(child, flush=True); os._exit(0)\n")     # killed: the lock is never released
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    parent.wait(timeout=60)
    parent.stdout.close()
    try:
        with folder_lock(tmp_path / "run"):                # the child is alive, the lock is free
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_note(tmp_path, capsys):
    """A lock still held by a process an ended holder left behind (as earlier versions' loader
    workers did) is taken over; a living holder keeps it."""
    folder = tmp_path / "run"
    folder.mkdir()
    with open(folder / ".lock", "a+") as orphan:
        fcntl.flock(orphan, fcntl.LOCK_EX | fcntl.LOCK_NB)
        orphan.write(f"process {_ended(subprocess.Popen([sys.executable, '-c', 'pass']))} "
                     f"on {socket.gethostname()}\n")
        orphan.flush()
        with folder_lock(folder):
            assert "taking the lock over" in capsys.readouterr().out
            assert f"process {os.getpid()}" in (folder / ".lock").read_text()
            with pytest.raises(FolderBusyError):           # the new holder is alive
                with folder_lock(folder):
                    pass


class _InterruptedOnThirdWrite:
    """A file handle that receives Ctrl-C (SIGINT) while torch.save's writer is writing."""

    def __init__(self, handle):
        self.handle, self.calls = handle, 0

    def write(self, data):
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


def test_ctrl_c_inside_torch_save_surfaces_as_the_interruption(tmp_path):
    """torch's writer turned it into RuntimeError "enforce fail ... unexpected pos" (issue 24);
    the write now ends first, then the interruption is raised."""
    target, state = tmp_path / "x.pt", {"w": torch.arange(1000.0)}
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda handle: torch.save(state, _InterruptedOnThirdWrite(handle)))
    assert torch.equal(torch.load(target)["w"], state["w"])
