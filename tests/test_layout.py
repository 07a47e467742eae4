"""The package's structure, read from its source: no import circle, a model library that
imports nothing of the app, imports at the top of modules, and docs/architecture.md's module
map naming exactly the modules that exist."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "emcl_nb"
# Imports a function may make (each says why where it is made): dependencies that stay
# optional at run time or cost seconds only the code that needs them should pay, and a
# command's machinery, which loads after the command has checked its inputs.
FUNCTION_LEVEL_IMPORTS = {
    "timm.data.auto_augment",   # seconds to import; only the loader-side augmentation uses it
    "imageio_ffmpeg",           # the fallback binary, only where PATH has no ffmpeg
    # the commands' machinery, loaded after their inputs are checked (torch takes seconds)
    "emcl_nb.training.run", "emcl_nb.training.distributed", "emcl_nb.evaluation.run",
    "torch.utils.tensorboard",  # the optional [tensorboard] extra, only with tensorboard=true
}
# Functions that may import anything: the package's __getattr__ (PEP 562) imports its public
# names on first use, so that `import emcl_nb` loads no torch and a command can check its
# inputs before torch loads.
LAZY_IMPORTERS = {("emcl_nb", "__getattr__")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[str, int, str | None]]:
    """(imported module, line, the function it is imported in or None) of every import in
    `path`; `from package import name` counts as the module package.name when that module exists."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    in_function = {id(node): fn.name for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        nested = in_function.get(id(node))
        if top_level_only and nested:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                       # relative: from the package up
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in MODULES else base, node.lineno, nested))
    return found


def internal_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (the package __init__ files left out as
    targets: every import passes through them)."""
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {target for target, _, _ in imports(path)
                       if target in MODULES and target != name and not MODULES[target].name == "__init__.py"}
    return graph


def test_the_package_has_no_import_circle():
    graph, state, path = internal_graph(), {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_model_library_imports_nothing_of_the_app():
    outside = {}
    for name, path in MODULES.items():
        if not name.startswith("emcl_nb.model"):
            continue
        for target, line, _ in imports(path):
            if target.startswith("emcl_nb") and not target.startswith("emcl_nb.model"):
                outside.setdefault(name, []).append(f"{target} (line {line})")
    assert not outside, outside


def test_emclnet_imports_neither_params_nor_distributed():
    targets = {target for target, _, _ in imports(MODULES["emcl_nb.model.emclnet"])}
    assert not {t for t in targets if t.startswith(("emcl_nb.params", "emcl_nb.training"))}
    assert "torch.distributed" not in targets


def test_the_model_library_loads_without_the_run_machinery():
    """Importing it (and building a tiny model) pulls in no run parameters, notebooks,
    matplotlib or process-group set-up of the app."""
    code = ("import sys, torch; from emcl_nb.model.config import ModelConfig; "
            "from emcl_nb.model.emclnet import create_model; "
            "fields = dict(clip_weights='tiny', tiny_width=64, tiny_layers=1, tiny_patch=16, image_size=32, "
            "agg_module='seqTransf', num_hidden_layers=1, temporal_ln_eps=1e-5, pooling='text', temp=3.0, "
            "emcl='on', emcl_bases=4, emcl_stages=2, emcl_momentum=0.9, emcl_lamd=1.0, emcl_beta=3.0, "
            "emcl_init='reference', seed=0); "
            "create_model(ModelConfig(**fields)); "
            "loaded = [m for m in ('emcl_nb.params', 'emcl_nb.training', 'emcl_nb.data', 'matplotlib', "
            "'IPython', 'yaml') if m in sys.modules]; assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_imports_are_at_the_top_of_modules_unless_they_keep_a_dependency_optional():
    inside = [f"{name}:{line} imports {target}" for name, path in MODULES.items()
              for target, line, nested in imports(path)
              if nested and target not in FUNCTION_LEVEL_IMPORTS and (name, nested) not in LAZY_IMPORTERS]
    assert not inside, inside


def test_import_emcl_nb_loads_no_torch_and_its_public_names_load_on_use():
    code = ("import sys, emcl_nb; assert 'torch' not in sys.modules, 'torch at import'; "
            "assert set(emcl_nb.__all__) <= set(dir(emcl_nb)); "
            "assert callable(emcl_nb.load) and callable(emcl_nb.tokenize); assert 'torch' in sys.modules; "
            "missing = [n for n in emcl_nb.__all__ if not hasattr(emcl_nb, n)]; assert not missing, missing")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        import emcl_nb
        emcl_nb.lod  # noqa: B018 - a misspelt name is an AttributeError naming it


def module_map(text: str) -> set[str]:
    """The modules listed in the first code block of docs/architecture.md: `name/` lines open
    a folder at their indentation, `name.py` lines are modules in the enclosing folder."""
    block = text.split("```", 2)[1]
    folders: list[tuple[int, str]] = []
    listed = set()
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match:
            continue
        indent, entry = len(match.group(1)), match.group(2)
        while folders and folders[-1][0] >= indent:
            folders.pop()
        if entry.endswith("/"):
            folders.append((indent, entry.rstrip("/")))
        elif entry.endswith(".py"):
            listed.add("/".join([folder for _, folder in folders] + [entry]))
    return listed


def test_the_architecture_module_map_lists_every_module_and_nothing_else():
    listed = module_map((ROOT / "docs" / "architecture.md").read_text())
    existing = {str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")}
    assert listed - existing == set(), "listed in docs/architecture.md but gone"
    assert existing - listed == set(), "not in docs/architecture.md's module map"
