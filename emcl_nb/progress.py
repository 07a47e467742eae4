"""Progress bars that read the same in a terminal and in a saved notebook.

In a terminal this is tqdm's text bar on stderr. In a Jupyter kernel the same text bar is
drawn into one display output updated in place and stored as plain text, so a notebook
saved and reopened shows the bar's last line. (tqdm's widget bars reopen as "Error
displaying widget: model not found", since their widget models die with the kernel.)
Anywhere else (stderr a log file or a pipe: a headless run) there is no bar: its redraws
would flood the log; the commands print a line per epoch and a timing summary instead.
"""
from __future__ import annotations

import io
import sys

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
