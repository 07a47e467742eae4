"""Progress bars that read the same in a terminal and in a saved notebook.

In a terminal this is tqdm's text bar on stderr. In a Jupyter kernel the same text bar is
drawn into one display output updated in place and stored as plain text, so a notebook
saved and reopened shows the bar's last line. (tqdm's widget bars reopen as "Error
displaying widget: model not found", since their widget models die with the kernel.)
Anywhere else (stderr a log file or a pipe: a headless run) there is no bar: its redraws
would flood the log; the commands print a line per epoch and a timing summary instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import sys
import time

from IPython import get_ipython
from IPython.display import display
from tqdm.std import tqdm


def in_kernel() -> bool:
    """True inside a Jupyter kernel (not a terminal IPython, not plain Python)."""
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class DisplayLine(io.TextIOBase):
    """A file-like target for tqdm: every redraw replaces one plain-text notebook output."""

    def __init__(self):
        self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def write(self, text: str) -> int:
        if "\r" in text or text.strip():           # tqdm redraws a line as "\r<bar>"
            self._handle.update({"text/plain": text.rsplit("\r", 1)[-1].strip()}, raw=True)
        return len(text)

    def flush(self) -> None:
        pass


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, drawn as an in-place text line in a Jupyter kernel
    (redrawn at most twice a second there: every redraw is a message to the browser), on
    stderr in a terminal, and not drawn when stderr is neither (a log file)."""
    if in_kernel() and not kwargs.get("disable"):
        kwargs = {"file": DisplayLine(), "mininterval": 0.5, "ncols": 100, **kwargs}
    elif not sys.stderr.isatty():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


def note(text: str, notes: list | None = None) -> None:
    """Print a note for the user and keep it with the results."""
    print(f"[emcl_nb] note: {text}")
    if notes is not None:
        notes.append(text)


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


_ACTIVE_STOPWATCH = contextvars.ContextVar("stopwatch", default=None)


class Stopwatch:
    """Wall time by part of a long job, for the one-line summary a headless log ends with.
    `with stopwatch.running():` makes it the one that `timed(part)` blocks add to, however
    deep in the calls they are (encoding inside scoring inside evaluation)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        """Add the wall time of the `with` block to `seconds[name]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def running(self):
        token = _ACTIVE_STOPWATCH.set(self)
        try:
            yield self
        finally:
            _ACTIVE_STOPWATCH.reset(token)

    def summary(self, job: str) -> str:
        return timing_line(job, self.seconds)


def timing_line(job: str, seconds: dict[str, float]) -> str:
    """'[emcl_nb] <job> took <total>: <part> <time>, ...'."""
    parts = ", ".join(f"{name} {duration(value)}" for name, value in seconds.items())
    return f"[emcl_nb] {job} took {duration(sum(seconds.values()))}: {parts}"


def timed(part: str):
    """Time the `with` block as `part` of the running Stopwatch (nothing when none runs)."""
    stopwatch = _ACTIVE_STOPWATCH.get()
    return stopwatch.part(part) if stopwatch is not None else contextlib.nullcontext()
