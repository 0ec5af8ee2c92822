"""Dask on a real SLURM cluster through ``compute.connect("slurm")`` (dask-jobqueue).

Needs a running SLURM (``deploy/slurm/start-slurm.sh``; CI starts one); skipped otherwise.
Every test submits jobs under its own job name and checks with ``squeue`` that none of them is
left in the queue afterwards, also when the run fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from pipeline import compute
from pipeline.errors import ConfigError

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm")]

REPO = Path(__file__).resolve().parents[2]


def _squeue(job_name: str) -> list[tuple[str, str]]:
    """(job id, state) of the queued, running or completing jobs called ``job_name``."""
    out = subprocess.run(
        ["squeue", "-h", "-n", job_name, "-o", "%i %T"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [tuple(row.split()[:2]) for row in out.stdout.splitlines() if row.strip()]


def _wait_until_gone(job_name: str, limit: float = 60.0) -> list[tuple[str, str]]:
    # scancel is asynchronous: a cancelled job spends a moment COMPLETING (KillWait).
    deadline = time.monotonic() + limit
    jobs = _squeue(job_name)
    while jobs and time.monotonic() < deadline:
        time.sleep(0.5)
        jobs = _squeue(job_name)
    return jobs


@pytest.fixture
def small_jobs(tmp_path):
    """Small worker jobs (1 core, 1 GB) under a job name of this test only."""
    name = f"elodin-test-{uuid.uuid4().hex[:8]}"
    settings = {
        # Job .out/.err files go here rather than slurm-<id>.out in the working directory.
        "elodin.slurm.log-directory": str(tmp_path / "slurm-logs"),
        "elodin.slurm.cores": 1,
        "elodin.slurm.processes": 1,
        "elodin.slurm.memory": "1GB",
        "elodin.slurm.walltime": "00:10:00",
        "elodin.slurm.job-name": name,
        "elodin.slurm.wait-timeout": 120,
        "elodin.fingerprint.gpu": False,
    }
    with dask.config.set(settings):
        yield name
    # Whatever the test did, nothing of it may stay in the queue.
    left = _wait_until_gone(name)
    if left:
        subprocess.run(["scancel", "-n", name], check=False)
    assert not left, f"jobs left in the queue: {left}"


def test_dask_array_runs_on_slurm_jobs_and_jobs_are_cancelled(small_jobs):
    def worker_env():
        # Defined here so cloudpickle ships it by value: workers cannot import test modules.
        return {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_NAME")}

    x = da.arange(200_000, chunks=20_000).reshape(400, 500)
    with compute.connect("slurm", workers=1, quiet=True) as client:
        queued = _squeue(small_jobs)
        assert len(queued) == 1 and queued[0][1] == "RUNNING", queued
        result = client.compute((x**2).sum(axis=0)).result()
        envs = client.run(worker_env)
    np.testing.assert_array_equal(result, (np.arange(200_000).reshape(400, 500) ** 2).sum(axis=0))
    # The worker is the SLURM job squeue showed, not a local process.
    assert [e["SLURM_JOB_ID"] for e in envs.values()] == [queued[0][0]]
    assert all(e["SLURM_JOB_NAME"] == small_jobs for e in envs.values())
    assert _wait_until_gone(small_jobs) == []


def test_failing_run_still_cancels_its_jobs(small_jobs):
    with pytest.raises(ZeroDivisionError):
        with compute.connect("slurm", workers=2, quiet=True) as client:
            assert _squeue(small_jobs), "jobs should be queued while the run is on"
            client.submit(lambda: 1 / 0).result()
    assert _wait_until_gone(small_jobs) == []


def test_worker_that_never_starts_gives_one_line_and_no_job_left(small_jobs):
    # --begin keeps the job PENDING: no worker can join, the wait gives up and cancels it.
    with dask.config.set(
        {
            "elodin.slurm.job-extra-directives": ["--begin=now+3600"],
            "elodin.slurm.wait-timeout": 3,
        }
    ):
        with pytest.raises(ConfigError) as err:
            with compute.connect("slurm", workers=1, quiet=True):
                pass
    msg = str(err.value)
    assert "\n" not in msg
    assert "no Dask worker joined within 3 s" in msg
    assert "PENDING (BeginTime)" in msg and "sinfo:" in msg
    assert _wait_until_gone(small_jobs) == []


def test_worker_that_cannot_start_is_reported_with_its_log(small_jobs):
    # The job runs but its Python does not exist: no need to wait out the timeout.
    with dask.config.set({"elodin.slurm.python": "/nonexistent/bin/python"}):
        with pytest.raises(ConfigError) as err:
            with compute.connect("slurm", workers=1, quiet=True):
                pass
    msg = str(err.value)
    assert "ended before any Dask worker joined" in msg and "slurm-logs" in msg, msg
    log_dir = Path(dask.config.get("elodin.slurm.log-directory"))
    errors = "".join(p.read_text() for p in log_dir.glob(f"{small_jobs}-*.err"))
    assert "/nonexistent/bin/python" in errors
    assert _wait_until_gone(small_jobs) == []


def test_job_that_slurm_refuses_is_reported_before_anything_is_queued(small_jobs):
    with dask.config.set({"elodin.slurm.queue": "no-such-partition"}):
        with pytest.raises(ConfigError, match="SLURM refuses the worker job.*partition"):
            with compute.connect("slurm", workers=1, quiet=True):
                pass
    assert _squeue(small_jobs) == []


def test_example_batch_script_is_accepted_by_sbatch():
    script = REPO / "deploy" / "slurm" / "elodin-batch.sbatch"
    # Command-line options win over #SBATCH lines: shrink the request to fit a CI runner.
    out = subprocess.run(
        ["sbatch", "--test-only", "--cpus-per-task=1", "--mem=1G", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def _small_mosaic(path: Path) -> Path:
    """A 200 x 260 FITS image: noise and a dozen Gaussian sources (seeded)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:200, :260]
    img = rng.normal(100.0, 5.0, (200, 260))
    for x, y, a, s in rng.uniform([10, 10, 200, 1.5], [250, 190, 2000, 5.0], (12, 4)):
        img += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    fits.PrimaryHDU(img.astype(np.float32)).writeto(path)
    return path


def test_fingerprint_on_slurm_gives_the_store_a_local_run_gives(tmp_path, lite0_onnx):
    image = _small_mosaic(tmp_path / "field.fits")
    name = f"elodin-test-{uuid.uuid4().hex[:8]}"
    logs = tmp_path / "slurm-logs"
    # The command line, as a user runs it; settings through ELODIN__ variables, which sbatch
    # passes on to the worker jobs with the rest of the environment (model cache included).
    env = {
        **os.environ,
        "ELODIN__SLURM__CORES": "1",
        "ELODIN__SLURM__MEMORY": "2GB",
        "ELODIN__SLURM__JOB_NAME": name,
        "ELODIN__SLURM__LOG_DIRECTORY": str(logs),
        "ELODIN__SLURM__WAIT_TIMEOUT": "120",
        "ELODIN__FINGERPRINT__GPU": "false",
    }
    args = [str(image), "--size", "32", "--tile-size", "128", "--workers", "1", "--no-progress"]
    stores = {}
    for scheduler in ("local", "slurm"):
        stores[scheduler] = tmp_path / f"{scheduler}.zarr"
        command = [sys.executable, "-m", "pipeline.cli", "fingerprint", *args]
        out = subprocess.run(
            [*command, "-o", str(stores[scheduler]), "--scheduler", scheduler],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    # The slurm run's worker was a job of ours (its log is there), and it is gone now.
    assert list(logs.glob(f"{name}-*.out")), "no worker job log: did the run use SLURM?"
    assert _wait_until_gone(name) == []

    local = xr.open_zarr(stores["local"], consolidated=False)
    slurm = xr.open_zarr(stores["slurm"], consolidated=False)
    assert local.sizes == slurm.sizes and local.sizes["cutout"] >= 48
    for var in ("valid", "x", "y", "width", "height", "image", "top_class"):
        np.testing.assert_array_equal(slurm[var].values, local[var].values, err_msg=var)
    # Same model, same batches, same CPU kernels: the same numbers up to float rounding.
    np.testing.assert_allclose(
        slurm["fingerprint"].values, local["fingerprint"].values, rtol=1e-5, atol=1e-6
    )
