"""Container images (deploy/docker/): lint only, no Docker engine here.

The images must run as the non-root user the Kubernetes manifests ask for (uid 1000), pin
every base image and package they install, bake the exported model in, and keep PyTorch out
of the image that runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline import deploy_profiles

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _args(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for word, a in _instructions(path) if word == "ARG" and "=" in a)


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_uid_1000(path):
    final = _stages(path)[-1]
    users = [a for w, a in final if w == "USER"]
    assert users, "no USER in the final stage: the image would run as root"
    assert users[-1].split(":")[0] == str(deploy_profiles.POD_SECURITY_CONTEXT["runAsUser"])
    # Nothing after USER may need root again.
    last_user = max(i for i, (w, _) in enumerate(final) if w == "USER")
    assert all(w != "USER" or a != "root" for w, a in final[last_user:])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_and_packages_are_pinned(path):
    args = _args(path)
    for word, rest in _instructions(path):
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
            if image in ("export",):
                continue
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"unpinned base image {image}"
            assert re.search(r"\d+\.\d+\.\d+", tag), (
                f"base image {image} not pinned to a patch release"
            )
        if word == "RUN" and "pip install" in rest:
            for command in re.split(r"&&", rest):
                if "pip install" not in command:
                    continue
                # Either constrained by the lock file or every named package pinned with ==.
                if "-c /tmp/constraints.txt" in command:
                    continue
                names = re.findall(r'"([A-Za-z0-9_.\-\[\]]+[=<>!~]=?[^"]*)"', command)
                assert names and all("==" in n for n in names), f"unpinned: {command.strip()}"


def test_constraints_pin_exact_versions_of_the_core_packages():
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not name==version"
            pins[name.lower().replace("_", "-")] = version
    for package in ("numpy", "dask", "distributed", "onnxruntime", "zarr", "xarray", "astropy"):
        assert package in pins, package
    assert pins["torch"].startswith("2.13.0")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_model_is_exported_at_build_and_torch_stays_out_of_the_runtime(path):
    stages = _stages(path)
    assert len(stages) == 2
    export, final = stages
    export_runs = " ".join(a for w, a in export if w == "RUN")
    assert "elodin models export" in export_runs and ".[export]" in export_runs
    final_runs = " ".join(a for w, a in final if w == "RUN")
    assert "[export]" not in final_runs and "torch" not in final_runs
    copies = [a for w, a in final if w == "COPY"]
    assert any(a.startswith("--from=export") and "/opt/elodin/models" in a for a in copies)
    env = " ".join(a for w, a in final if w == "ENV")
    assert "ELODIN__CACHE_DIR=/opt/elodin/models" in env
    # Everything that writes goes to /tmp (the emptyDir of a read-only root filesystem).
    assert "HOME=/tmp" in env and "MPLCONFIGDIR=/tmp/" in env


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_bake_the_default_model(path):
    # The runtime image has no PyTorch: a model it was not built with cannot be exported there.
    default = yaml.safe_load((REPO / "pipeline" / "elodin.yaml").read_text())["elodin"]["model"][
        "name"
    ]
    args = [a for ins, a in _instructions(path) if ins == "ARG" and a.startswith("MODEL=")]
    assert args == [f"MODEL={default}"]
    configmap = (REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text()
    assert f"name: {default}" in configmap


def test_gpu_image_uses_cuda_13_and_onnxruntime_gpu():
    path = DOCKER / "Dockerfile.gpu"
    assert re.match(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-", _args(path)["CUDA_IMAGE"])
    runs = " ".join(a for w, a in _instructions(path) if w == "RUN")
    assert re.search(r'"onnxruntime-gpu==\d', runs)
    assert "pip uninstall -y onnxruntime" in runs


def test_images_are_the_ones_the_manifests_and_config_name():
    cpu, gpu = (
        yaml.safe_load((REPO / "pipeline/elodin.yaml").read_text())["elodin"]["kubernetes"][k]
        for k in ("image", "gpu-image")
    )
    for path, image in ((DOCKER / "Dockerfile.cpu", cpu), (DOCKER / "Dockerfile.gpu", gpu)):
        assert f"-t {image} ." in path.read_text(), f"{path.name}: build command should tag {image}"


def test_dockerignore_lets_in_only_what_the_builds_copy():
    rules = [
        line.strip()
        for line in (DOCKER / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!pipeline/", "!deploy/docker/constraints.txt"} <= set(
        rules
    )
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        link = DOCKER / f"{name}.dockerignore"
        assert link.resolve() == (DOCKER / ".dockerignore").resolve()
