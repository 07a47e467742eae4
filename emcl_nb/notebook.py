"""What the notebooks need from their kernel: `setup`, the one call each notebook starts with.

papermill only warns about a parameter the notebook does not declare ("Passed unknown
parameter") and the run goes on with the default, so `-p epochs 1` would silently train
the full schedule. `check_parameters()`, which `setup` calls first, turns that into an error
naming the unknown parameters.
"""
from __future__ import annotations

import ast

from IPython import get_ipython

from emcl_nb.params import Params, load_params, parse_overrides, repo_relative

# papermill's injected cell starts with this comment line (its Python translator).
INJECTED_HEADER = "# Parameters"


class NotebookParameterError(ValueError):
    """A papermill parameter the notebook's parameters cell does not declare."""


def assigned_names(source: str) -> list[str]:
    """Names assigned at the top level of a cell (`x = 1`, `x: int = 1`), in order."""
    names = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [target.id for target in targets if isinstance(target, ast.Name)]
    return names


def unknown_parameters(executed_cells: list[str]) -> tuple[list[str], list[str]]:
    """(unknown, declared): the names papermill's injected cell sets that the parameters
    cell before it does not declare. `executed_cells` is the kernel's input history."""
    injected = [i for i, source in enumerate(executed_cells)
                if i > 0 and source.lstrip().startswith(INJECTED_HEADER)]
    if not injected:
        return [], []
    declared = assigned_names(executed_cells[injected[-1] - 1])
    passed = assigned_names(executed_cells[injected[-1]])
    return [name for name in passed if name not in declared], declared


def check_parameters() -> None:
    """Raise NotebookParameterError when papermill passed a parameter this notebook does
    not declare; does nothing outside papermill (no injected cell) or outside a kernel."""
    shell = get_ipython()
    if shell is None:
        return
    unknown, declared = unknown_parameters(list(shell.user_ns.get("In", [])))
    if unknown:
        raise NotebookParameterError(
            f"unknown notebook parameter(s): {', '.join(unknown)}. This notebook takes "
            f"{', '.join(declared)}; run parameters such as epochs go in overrides, "
            f"e.g. -p overrides \"epochs=1\"")


def setup(dataset: str, run: str, overrides: str = "") -> Params:
    """A notebook's set-up after its parameters cell: the papermill parameters checked
    (`check_parameters`), the run's parameters loaded (params/<dataset>.yaml, then `run` and
    `overrides`, then EMCL_NB_OVERRIDES), figures drawn inline, and one line saying which run
    this is. Returns the parameters."""
    check_parameters()
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("matplotlib", "inline")
    params = load_params(dataset, {"run": run, **parse_overrides(overrides)})   # overrides may set run
    print(f"dataset {params.dataset} ({params.layout}), run {params.run} -> {repo_relative(params.out_dir)}")
    return params
