"""What the commands (`python -m emcl_nb.train`, `evaluate`, ...) share: how they end on an error.

An error of one of the package's own kinds (a missing file, a setting that cannot be used,
data that cannot be read, a checkpoint that does not fit) already names the thing and the
fix: it is printed as one line, without a traceback, and the command exits with status 2.
Any other error is unexpected and keeps its traceback, as does every error with
`--traceback` or EMCL_NB_TRACEBACK=1.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

TRACEBACK_VARIABLE = "EMCL_NB_TRACEBACK"


def add_traceback_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traceback", action="store_true",
                        help=f"show the traceback of every error (or set {TRACEBACK_VARIABLE}=1)")


def is_input_error(error: BaseException) -> bool:
    """Whether `error` is one of the package's own kinds: raised with a message for the user."""
    return isinstance(error, Exception) and type(error).__module__.startswith("emcl_nb.")


def run_command(command: Callable[[], None], traceback: bool = False) -> None:
    """Run `command`; end on an input error with its message and status 2 (see above)."""
    try:
        command()
    except Exception as error:
        if traceback or os.environ.get(TRACEBACK_VARIABLE) == "1" or not is_input_error(error):
            raise
        print(f"[emcl_nb] error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
