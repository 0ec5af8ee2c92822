"""Fixtures for tests that need real services started outside pytest.

``slurm``: a running SLURM cluster (``deploy/slurm/start-slurm.sh``, which CI runs). Tests that
use it are skipped, with the reason shown, when ``sinfo`` is missing or no node is usable.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest


def _slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when it can."""
    for tool in ("sinfo", "squeue", "sbatch", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH (start SLURM with deploy/slurm/start-slurm.sh)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s (is slurmctld running?)"
    if out.returncode != 0:
        return f"sinfo failed: {' '.join(out.stderr.split())}"
    states = {s.strip().rstrip("*~#$@") for s in out.stdout.split()}
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no usable SLURM node (sinfo states: {', '.join(sorted(states)) or 'none'})"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skip unless a SLURM cluster with a usable node is running."""
    problem = _slurm_problem()
    if problem:
        pytest.skip(f"SLURM not available: {problem}")
