"""environment.yml (conda) and pyproject.toml (its dependencies and every extra) must list the
same packages and pins."""
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _normalise(requirement: str) -> str:
    return "".join(requirement.split()).lower()


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [requirement for extra in project["optional-dependencies"].values()
                                          for requirement in extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert sorted(map(_normalise, pip_section)) == sorted(map(_normalise, declared))


def test_critical_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = set(map(_normalise, project["dependencies"]))
    assert {"torch==2.14.1", "torchvision==0.29.1", "setuptools>=71,<82"} <= deps
