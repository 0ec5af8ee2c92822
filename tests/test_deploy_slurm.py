"""SLURM profile without a SLURM cluster: the job scripts SLURM would receive, and the errors.

The real cluster tests are in tests/integration/test_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import yaml
from dask_jobqueue.slurm import SLURMJob

from pipeline import config, deploy_profiles
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "deploy" / "slurm"


def _script(options: dict) -> str:
    """The batch script dask-jobqueue would submit for one worker with these options."""
    job_options = {k: v for k, v in options.items() if k != "scheduler_options"}
    return SLURMJob("tcp://10.0.0.1:8786", name="w-0", **job_options).job_script()


def _directives(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")
    ]


def _worker_line(script: str) -> str:
    return next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)


def test_cpu_job_script_from_defaults():
    with dask.config.set({"elodin.fingerprint.gpu": False}):
        script = _script(deploy_profiles.slurm_options())
    directives = _directives(script)
    assert "-J elodin-worker" in directives
    assert "--cpus-per-task=4" in directives
    assert "--mem=15G" in directives  # 16 GB asked = 14.9 GiB, rounded up
    assert "-t 01:00:00" in directives
    assert not any("gres" in d for d in directives)
    worker = _worker_line(script)
    # Workers start from the very Python (and so the environment) that runs elodin.
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://10.0.0.1:8786")
    assert "--nthreads 4" in worker and "--resources" not in worker


def test_gpu_profile_asks_for_gres_and_offers_the_gpu_resource():
    script = _script(deploy_profiles.slurm_options(gpu=True))
    directives = _directives(script)
    assert "--gres=gpu:1" in directives
    assert "--cpus-per-task=8" in directives and "--mem=30G" in directives
    assert _worker_line(script).endswith("--resources GPU=1")


def test_gpu_follows_the_fingerprint_setting():
    with dask.config.set({"elodin.fingerprint.gpu": True}):
        assert "--resources" in deploy_profiles.slurm_options()["worker_extra_args"]
    with dask.config.set({"elodin.fingerprint.gpu": False}):
        assert deploy_profiles.slurm_options()["worker_extra_args"] == []
        assert "--resources" in deploy_profiles.slurm_options(gpu=True)["worker_extra_args"]


def test_overrides_win_and_site_settings_reach_the_script():
    settings = {
        "elodin.slurm.queue": "compute",
        "elodin.slurm.account": "astro",
        "elodin.slurm.job-extra-directives": ["--constraint=skylake"],
        "elodin.slurm.job-script-prologue": ["source /opt/elodin/.venv/bin/activate"],
        "elodin.slurm.python": "/opt/elodin/.venv/bin/python",
    }
    with dask.config.set(settings):
        options = deploy_profiles.slurm_options(gpu=False, cores=2, memory="3GB", job_name="t")
    script = _script(options)
    directives = _directives(script)
    assert {"-p compute", "-A astro", "--constraint=skylake", "-J t", "--cpus-per-task=2"} <= set(
        directives
    )
    lines = script.splitlines()
    activate = lines.index("source /opt/elodin/.venv/bin/activate")
    assert activate < lines.index(_worker_line(script))
    assert _worker_line(script).startswith("/opt/elodin/.venv/bin/python -m distributed")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"elodin.slurm.processes": 8, "elodin.slurm.cores": 4}, "processes: 8 worker processes"),
        ({"elodin.slurm.cores": 0}, "elodin.slurm.cores: expected an integer >= 1"),
        ({"elodin.slurm.memory": None}, "elodin.slurm.memory: memory per job is required"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with dask.config.set({"elodin.fingerprint.gpu": False, **settings}):
        with pytest.raises(ConfigError, match=message):
            deploy_profiles.slurm_options()


def test_more_gpu_processes_than_gres_gpus_is_refused():
    with dask.config.set({"elodin.slurm.processes": 2, "elodin.slurm.gpu.gres": "gpu:a100:1"}):
        with pytest.raises(ConfigError, match=r"elodin.slurm.gpu.gres: 'gpu:a100:1'"):
            deploy_profiles.slurm_options(gpu=True)
    with dask.config.set({"elodin.slurm.processes": 2, "elodin.slurm.gpu.gres": "gpu:a100:2"}):
        assert (
            "--gres=gpu:a100:2" in deploy_profiles.slurm_options(gpu=True)["job_extra_directives"]
        )


def test_without_slurm_commands_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="sbatch/squeue not found on PATH.*start-slurm.sh"):
        deploy_profiles.slurm_cluster(workers=1)


def test_example_config_uses_only_known_keys_and_builds_a_gpu_job():
    data = yaml.safe_load((SLURM_DIR / "config-example.yaml").read_text())
    config.validate(data, source="config-example.yaml")
    body = data["elodin"]
    with dask.config.set({"elodin.slurm": body["slurm"]}):
        script = _script(deploy_profiles.slurm_options(gpu=True))
    assert "-p gpu" in _directives(script)
    assert "module load cuda/13.0" in script.splitlines()


def test_scripts_are_executable_and_parse():
    for name in ("start-slurm.sh", "stop-slurm.sh"):
        path = SLURM_DIR / name
        assert os.access(path, os.X_OK), f"{name} must be executable (.ci/run checks -x)"
        subprocess.run(["bash", "-n", str(path)], check=True)
    subprocess.run(["bash", "-n", str(SLURM_DIR / "elodin-batch.sbatch")], check=True)


def test_run_example_and_scrontab_are_valid():
    from pathlib import Path

    from pipeline import config

    root = Path(__file__).resolve().parents[1] / "deploy" / "slurm"
    body = config.load_file(root / "run-example.yaml")
    assert body["run"]["store"].endswith(".zarr")
    lines = [
        ln
        for ln in (root / "elodin.scrontab").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert len(lines) == 1
    fields = lines[0].split()
    assert (
        len(fields[:5]) == 5
        and "elodin" in lines[0]
        and "run" in fields
        and "--incremental" in fields
    )
