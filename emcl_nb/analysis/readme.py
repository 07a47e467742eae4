"""The README's generated sections, the one place that writes README.md.

Each section lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` and is rewritten
from files the code wrote: `demo-results` (`make notebooks`, from the demo run),
`ablations` (`make ablations`, from docs/results/ablations.json), `perf-results`
(`python bench/report.py`, from the benchmark results in docs/results), `regime-results`
(`python bench/reference_regime.py`) and `encode-results` (`python bench/encode_speed.py`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from emcl_nb.io import atomic_write_text
from emcl_nb.params import REPO_ROOT

README = REPO_ROOT / "README.md"
SECTIONS = ("demo-results", "ablations", "perf-results", "regime-results", "encode-results")


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section `name` (one of SECTIONS)."""
    if name not in SECTIONS:
        raise ValueError(f"unknown README section {name!r}; the generated ones are {', '.join(SECTIONS)}")
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` (a README) with section `name` replaced by `body`; its markers must appear
    exactly once each."""
    begin, end = markers(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"the README must hold {begin} and {end} once each to rewrite that section")
    head, rest = text.split(begin)
    tail = rest.split(end)[1]
    return f"{head}{begin}\n{body}\n{end}{tail}"


def update_readme(name: str, body: str, readme: Path = README) -> bool:
    """Rewrite section `name` of `readme` with `body` (atomically); False when it already
    reads so."""
    text = readme.read_text()
    updated = replace_section(text, name, body)
    if updated == text:
        return False
    atomic_write_text(readme, updated)
    return True


def write_or_check(name: str, body: str, readme: Path = README, *, check: bool = False) -> None:
    """A results script's last step: with `check`, exit 1 when section `name` of `readme` is
    not `body` (0 when it is); otherwise rewrite it, saying so when it changed."""
    if check:
        text = readme.read_text()
        sys.exit(0 if replace_section(text, name, body) == text else 1)
    if update_readme(name, body, readme):
        print(f"rewrote the {name} section of {readme}")
