"""pyproject.toml: the package's dependencies are requirements.txt's, and every console script names a callable."""

import importlib
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def test_dependencies_follow_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    required = {_name(r): r.replace(" ", "") for r in required if r}
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    extras = {_name(r) for group in project["optional-dependencies"].values() for r in group}
    assert set(required) <= set(declared) | extras, set(required) - set(declared) - extras
    for name, spec in declared.items():  # the same version pins
        assert required.get(name, spec) == spec, (name, required[name], spec)
    assert {"gpu", "hf"} <= set(project["optional-dependencies"])


def test_console_scripts_name_callables():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"lm-train", "lm-perplexity", "lm-generate", "lm-checkpoint", "lm-throughput", "lm-race"} <= set(scripts)
    for target in scripts.values():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    assert not (ROOT / "tokenizers" / "__init__.py").exists()  # scripts, never a package
