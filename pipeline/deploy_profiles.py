"""Dask clusters on SLURM (dask-jobqueue) and Kubernetes (the Dask operator), from config.

:func:`pipeline.compute.connect` calls :func:`slurm_cluster` for ``--scheduler slurm`` and
:func:`kubernetes_cluster` for ``--scheduler kubernetes``; both read their settings from the
``elodin.slurm`` and ``elodin.kubernetes`` sections of ``pipeline/elodin.yaml`` and return a
started cluster with at least one worker, or raise :class:`~pipeline.errors.ConfigError` saying
why none came. The caller owns the cluster and closes it, which cancels the SLURM jobs or
deletes the ``DaskCluster`` resource.

The pure builders (:func:`slurm_options`, :func:`cluster_spec`, :func:`gpu_worker_group_spec`)
need neither SLURM nor Kubernetes: tests compare them with the manifests in
``deploy/kubernetes/`` and with the job scripts SLURM would receive.
"""

from __future__ import annotations

import copy
import getpass
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from . import config
from .errors import ConfigError

__all__ = [
    "CONTAINER_SECURITY_CONTEXT",
    "POD_SECURITY_CONTEXT",
    "cluster_spec",
    "gpu_worker_group_spec",
    "kubernetes_cluster",
    "slurm_cluster",
    "slurm_options",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- SLURM
def _gpu_default(gpu: bool | None) -> bool:
    # GPU tasks ask for the Dask resource GPU=1; workers without it would leave them pending
    # forever, so the cluster follows the fingerprint setting unless told otherwise.
    return bool(config.get("fingerprint.gpu")) if gpu is None else bool(gpu)


def _gres_count(gres: str) -> int:
    # "gpu:2" or "gpu:a100:2" -> 2; "gpu" -> 1
    last = str(gres).rsplit(":", 1)[-1]
    return int(last) if last.isdigit() else 1


def slurm_options(*, gpu: bool | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`dask_jobqueue.SLURMCluster` from ``elodin.slurm``.

    Parameters
    ----------
    gpu
        Use the ``elodin.slurm.gpu`` settings: jobs ask for ``--gres`` and every worker offers
        the Dask resource ``GPU=1``. ``None``: follow ``elodin.fingerprint.gpu``.
    **overrides
        SLURMCluster keyword arguments (``cores=1``, ``memory="2GB"``, ``job_name=...``) that
        take precedence over the config.

    Returns
    -------
    dict
        Ready for ``SLURMCluster(**options)``; nothing is submitted.
    """
    gpu = _gpu_default(gpu)
    c = dict(config.get("slurm"))
    extra = list(c.get("job-extra-directives") or [])
    prologue = list(c.get("job-script-prologue") or [])
    worker_args: list[str] = []
    if gpu:
        g = dict(c.get("gpu") or {})
        for key in ("queue", "cores", "memory"):
            if g.get(key) is not None:
                c[key] = g[key]
        gres = g.get("gres") or "gpu:1"
        extra += [f"--gres={gres}", *(g.get("job-extra-directives") or [])]
        prologue += list(g.get("job-script-prologue") or [])
        # One GPU per worker process: the scheduler then runs one inference task per GPU.
        worker_args += ["--resources", "GPU=1"]
        processes = overrides.get("processes", c.get("processes") or 1)
        if _gres_count(gres) < int(processes):
            raise ConfigError(
                f"config elodin.slurm.gpu.gres: {gres!r} gives fewer GPUs than the "
                f"{processes} worker processes per job (elodin.slurm.processes)"
            )
    options: dict[str, Any] = {
        "queue": c.get("queue"),
        "account": c.get("account"),
        "cores": c.get("cores"),
        "processes": c.get("processes") or 1,
        "memory": c.get("memory"),
        "walltime": c.get("walltime"),
        "job_name": c.get("job-name") or "elodin-worker",
        "job_extra_directives": extra,
        "job_script_prologue": prologue,
        "python": c.get("python") or sys.executable,
        "local_directory": c.get("local-directory"),
        "log_directory": c.get("log-directory"),
        "interface": c.get("interface"),
        "death_timeout": c.get("death-timeout"),
        "worker_extra_args": worker_args,
        "scheduler_options": {"dashboard_address": config.get("compute.dashboard-address")},
    }
    options.update(overrides)
    cores, processes = options["cores"], options["processes"]
    for name, value in (("cores", cores), ("processes", processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"config elodin.slurm.{name}: expected an integer >= 1, got {value!r}"
            )
    if processes > cores:
        raise ConfigError(
            f"config elodin.slurm.processes: {processes} worker processes need at least as many "
            f"cores per job, got cores={cores}"
        )
    if not options["memory"]:
        raise ConfigError("config elodin.slurm.memory: memory per job is required, e.g. 16GB")
    return options


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sinfo_summary() -> str:
    try:
        out = _run(["sinfo", "-h", "-o", "%P %a %T %D"], timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e})"
    if out.returncode != 0:
        return f"sinfo failed: {_one_line(out.stderr)}"
    rows = [", ".join(r.split()) for r in out.stdout.splitlines() if r.strip()]
    # partition, availability, node state, node count
    return "; ".join(rows) or "no partitions"


def _job_table(job_name: str) -> dict[str, str] | None:
    """Job id -> "STATE (reason)" for this user's jobs called ``job_name``, ended ones included.

    Queried by name rather than by id: ``squeue -j`` fails outright once one of the ids has
    been purged. ``None`` when squeue does not answer.
    """
    try:
        out = _run(
            [
                "squeue",
                "-h",
                "-t",
                "all",
                "-u",
                getpass.getuser(),
                "-n",
                job_name,
                "-o",
                "%i %T %r",
            ],
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    table = {}
    for row in out.stdout.splitlines():
        parts = row.split(None, 2)
        if len(parts) >= 2:
            reason = parts[2] if len(parts) > 2 and parts[2] != "None" else ""
            table[parts[0]] = parts[1] + (f" ({reason})" if reason else "")
    return table


def _job_states(job_ids: list[str], job_name: str) -> str:
    if not job_ids:
        return "no job was submitted"
    table = _job_table(job_name)
    if table is None:
        return f"jobs {', '.join(job_ids)} (squeue did not answer)"
    return "jobs " + ", ".join(f"{j} {table.get(j, 'ended')}" for j in job_ids)


def _all_ended(job_ids: list[str], job_name: str) -> bool:
    table = _job_table(job_name)
    if not job_ids or table is None:
        return False
    alive = {j for j, state in table.items() if state.split()[0] in _ALIVE}
    return not alive & set(job_ids)


# Job states from which a Dask worker may still come.
_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "RESIZING", "REQUEUED", "RESV_DEL_HOLD"}


def _wait_for_first_worker(cluster, *, timeout: float, job_name: str, log_directory) -> None:
    """Return once a worker has joined; fail early when every job ended without one."""
    deadline = time.monotonic() + timeout
    while True:
        step = min(5.0, max(0.1, deadline - time.monotonic()))
        try:
            cluster.wait_for_workers(1, timeout=step)
            return
        except TimeoutError:
            pass
        ids = _job_ids(cluster)
        if _all_ended(ids, job_name):
            logs = (
                f"{log_directory}/{job_name}-<jobid>.err"
                if log_directory
                else "slurm-<jobid>.out in the directory elodin runs from"
            )
            raise ConfigError(
                f"--scheduler slurm: worker job(s) {', '.join(ids)} ended before any Dask "
                f"worker joined (the worker could not start); see {logs}"
            )
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"--scheduler slurm: no Dask worker joined within {timeout:.0f} s "
                f"(elodin.slurm.wait-timeout); {_job_states(ids, job_name)}; "
                f"sinfo: {_sinfo_summary()}"
            )


def _check_job_script(cluster) -> None:
    """``sbatch --test-only`` the worker script: wrong partitions and accounts fail here."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="elodin-slurm-") as f:
        f.write(cluster.job_script())
        f.flush()
        try:
            out = _run(["sbatch", "--test-only", f.name], timeout=60)
        except subprocess.TimeoutExpired:
            raise ConfigError(
                "--scheduler slurm: `sbatch --test-only` did not answer in 60 s"
            ) from None
    if out.returncode != 0:
        raise ConfigError(
            f"--scheduler slurm: SLURM refuses the worker job (elodin.slurm settings): "
            f"{_one_line(out.stderr or out.stdout)}"
        )


def _job_ids(cluster) -> list[str]:
    return [str(j.job_id) for j in list(cluster.workers.values()) if getattr(j, "job_id", None)]


def slurm_cluster(*, workers: int | None = None, gpu: bool | None = None, **overrides: Any):
    """Start a :class:`dask_jobqueue.SLURMCluster` of ``workers`` jobs and wait for one worker.

    Parameters
    ----------
    workers
        Worker jobs to submit. ``None``: ``elodin.slurm.workers``.
    gpu
        GPU variant (see :func:`slurm_options`). ``None``: ``elodin.fingerprint.gpu``.
    **overrides
        SLURMCluster keyword arguments over the config, plus ``wait_timeout`` (seconds).

    Returns
    -------
    dask_jobqueue.SLURMCluster
        With at least one worker connected. Close it (``compute.connect`` does) to cancel the
        jobs.

    Raises
    ------
    ConfigError
        SLURM's commands are missing, SLURM refuses the job, or no worker joined in time
        (the message gives the jobs' states and ``sinfo``'s view of the partitions).
    """
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise ConfigError(
            "--scheduler slurm: sbatch/squeue not found on PATH; run on a SLURM login node "
            "(or start a local one with deploy/slurm/start-slurm.sh)"
        )
    timeout = float(overrides.pop("wait_timeout", None) or config.get("slurm.wait-timeout"))
    n_jobs = config.get_int("slurm.workers", override=workers, minimum=1)
    options = slurm_options(gpu=gpu, **overrides)

    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(**options)
    try:
        _check_job_script(cluster)
        cluster.scale(jobs=n_jobs)
        logger.info(
            "SLURM: submitted %d job(s) named %s; waiting up to %.0f s for a worker",
            n_jobs,
            options["job_name"],
            timeout,
        )
        _wait_for_first_worker(
            cluster,
            timeout=timeout,
            job_name=options["job_name"],
            log_directory=options["log_directory"],
        )
    except BaseException:
        cluster.close()
        raise
    return cluster


# -------------------------------------------------------------------------------- Kubernetes
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
# With a read-only root filesystem everything that writes (Dask spilling, matplotlib's cache,
# Python's and fsspec's caches under $HOME) goes to the /tmp emptyDir.
_POD_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "DASK_TEMPORARY_DIRECTORY", "value": "/tmp/dask"},
    {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
]


def _k8s(key: str, overrides: dict[str, Any]) -> Any:
    name = key.replace("-", "_")
    if name in overrides:
        return overrides[name]
    return config.get(f"kubernetes.{key}")


def _resources(cpu: Any, memory: Any, gpus: int = 0) -> dict[str, dict[str, Any]]:
    # requests == limits: Guaranteed QoS, and Dask's `--memory-limit auto` reads the limit.
    req = {"cpu": str(cpu), "memory": str(memory)}
    lim = dict(req)
    if gpus:
        # A string, like every quantity: the operator's CRD types them all as strings.
        lim["nvidia.com/gpu"] = str(int(gpus))
        req = dict(req, **{"nvidia.com/gpu": str(int(gpus))})
    return {"requests": req, "limits": lim}


def _node_selector(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ConfigError(
                f"config elodin.kubernetes.gpu-node-selector: expected 'key=value', got {item!r}"
            )
        out[key] = value
    return out


def _pod(container: dict[str, Any], overrides: dict[str, Any], **extra: Any) -> dict[str, Any]:
    container = dict(container)
    container["imagePullPolicy"] = _k8s("image-pull-policy", overrides)
    container["env"] = copy.deepcopy(_POD_ENV)
    secret = _k8s("secret", overrides)
    if secret:
        # optional: a cluster reading only public or PVC data needs no Secret
        container["envFrom"] = [{"secretRef": {"name": secret, "optional": True}}]
    container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    return {
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": str(_k8s("tmp-size", overrides))}}],
        **extra,
    }


def _worker_args(cpu: Any, *, gpu: bool) -> list[str]:
    # `dask-worker` is gone from recent distributed: `dask worker` is the command.
    threads = max(1, int(float(str(cpu).rstrip("m")) / (1000 if str(cpu).endswith("m") else 1)))
    args = ["dask", "worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", str(threads)]
    args += ["--memory-limit", "auto", "--dashboard", "--dashboard-address", "8788"]
    if gpu:
        args += ["--resources", "GPU=1"]
    return args


def _worker_spec(*, replicas: int, gpu: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    if gpu:
        image = _k8s("gpu-image", overrides)
        cpu, mem = _k8s("gpu-worker-cpu", overrides), _k8s("gpu-worker-memory", overrides)
        resources = _resources(cpu, mem, int(_k8s("gpus-per-worker", overrides)))
        extra = {
            "nodeSelector": _node_selector(_k8s("gpu-node-selector", overrides)),
            "tolerations": copy.deepcopy(list(_k8s("gpu-tolerations", overrides) or [])),
        }
    else:
        image = _k8s("image", overrides)
        cpu, mem = _k8s("worker-cpu", overrides), _k8s("worker-memory", overrides)
        resources = _resources(cpu, mem)
        extra = {}
    container = {
        "name": "worker",
        "image": image,
        "args": _worker_args(cpu, gpu=gpu),
        "resources": resources,
        "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
    }
    return {"replicas": int(replicas), "spec": _pod(container, overrides, **extra)}


def cluster_spec(
    *, name: str | None = None, workers: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """The ``DaskCluster`` resource (kubernetes.dask.org/v1) for ``elodin.kubernetes``.

    A CPU scheduler and a CPU default worker group, non-root, read-only root filesystem with an
    emptyDir on /tmp, requests and limits on every container. It is the resource
    ``deploy/kubernetes/daskcluster.yaml`` holds (a test keeps them equal).

    Parameters
    ----------
    name
        Resource name. ``None``: ``elodin.kubernetes.name`` with ``{uuid}`` filled in.
    workers
        Replicas of the default (CPU) worker group. ``None``: ``elodin.kubernetes.workers``.
    **overrides
        Values for ``elodin.kubernetes`` keys, by their Python names (``image=...``,
        ``worker_memory="4Gi"``, ``secret=None``).
    """
    from dask_kubernetes.operator import make_cluster_spec

    name = name or str(_k8s("name", overrides)).format(uuid=uuid.uuid4().hex[:10])
    workers = _k8s("workers", overrides) if workers is None else workers
    base = make_cluster_spec(name=name, image=_k8s("image", overrides), n_workers=int(workers))
    scheduler = base["spec"]["scheduler"]
    container = scheduler["spec"]["containers"][0]
    # The operator's template still runs `dask-scheduler`, which recent distributed dropped.
    container["args"] = ["dask", "scheduler", "--host", "0.0.0.0"]
    container["resources"] = _resources(
        _k8s("scheduler-cpu", overrides), _k8s("scheduler-memory", overrides)
    )
    container.pop("env", None)
    scheduler["spec"] = _pod(container, overrides)
    base["spec"]["worker"] = _worker_spec(replicas=int(workers), gpu=False, overrides=overrides)
    base["spec"]["idleTimeout"] = 0
    return base


def gpu_worker_group_spec(
    *, cluster: str, workers: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """The ``DaskWorkerGroup`` of GPU workers (``{cluster}-gpu``) joining ``cluster``.

    Each worker asks for ``gpus-per-worker`` ``nvidia.com/gpu``, runs on nodes matching
    ``gpu-node-selector`` (tolerating ``gpu-tolerations``) and offers the Dask resource GPU=1.
    It is the resource ``deploy/kubernetes/daskworkergroup-gpu.yaml`` holds.
    """
    workers = _k8s("gpu-workers", overrides) if workers is None else workers
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskWorkerGroup",
        "metadata": {"name": f"{cluster}-gpu"},
        "spec": {
            "cluster": cluster,
            "worker": _worker_spec(replicas=int(workers), gpu=True, overrides=overrides),
        },
    }


def kubernetes_cluster(*, workers: int | None = None, gpu: bool | None = None, **overrides: Any):
    """Create a ``DaskCluster`` through the Dask operator and wait for one worker.

    Parameters
    ----------
    workers
        Without GPUs: CPU workers (default ``elodin.kubernetes.workers``). With GPUs: GPU
        workers (default ``elodin.kubernetes.gpu-workers``), beside the configured CPU ones.
    gpu
        Add the GPU worker group. ``None``: ``elodin.fingerprint.gpu``.
    **overrides
        ``elodin.kubernetes`` values by their Python names (see :func:`cluster_spec`).

    Returns
    -------
    dask_kubernetes.operator.KubeCluster
        Closing it deletes the DaskCluster (and its worker groups).

    Raises
    ------
    ConfigError
        The Kubernetes API cannot be reached, the operator is not installed, or no worker
        joined within ``elodin.kubernetes.wait-timeout``.
    """
    gpu = _gpu_default(gpu)
    if gpu:
        spec = cluster_spec(**overrides)
        gpu_workers = workers
    else:
        spec = cluster_spec(workers=workers, **overrides)
        gpu_workers = None
    name = spec["metadata"]["name"]
    namespace = _k8s("namespace", overrides)
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError(
            "--scheduler kubernetes needs dask-kubernetes: pip install 'elodin-pipeline[kubernetes]'"
        ) from None
    try:
        import kr8s

        # Credentials first: a KubeCluster that fails later stays registered for its atexit
        # clean-up, which then fails again, noisily, at interpreter exit.
        kr8s.api(namespace=namespace)
    except Exception as e:
        raise ConfigError(
            f"--scheduler kubernetes: cannot reach the Kubernetes API (kubeconfig or in-cluster "
            f"service account): {_one_line(str(e))[:300]}"
        ) from None
    try:
        cluster = KubeCluster(
            custom_cluster_spec=spec,
            namespace=namespace,
            resource_timeout=int(_k8s("resource-timeout", overrides)),
            shutdown_on_close=True,
            quiet=True,
        )
    except Exception as e:  # kr8s/httpx raise many kinds; the user needs the one line
        for instance in list(KubeCluster._instances):
            if instance.name == name:
                KubeCluster._instances.discard(instance)
        raise ConfigError(
            f"--scheduler kubernetes: cannot create DaskCluster {name!r}: {_one_line(str(e))[:300]}"
        ) from None
    try:
        if gpu:
            group = gpu_worker_group_spec(cluster=name, workers=gpu_workers, **overrides)
            cluster.add_worker_group("gpu", custom_spec=group["spec"]["worker"])
        timeout = float(_k8s("wait-timeout", overrides))
        try:
            cluster.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ConfigError(
                f"--scheduler kubernetes: no Dask worker of DaskCluster {name!r} joined within "
                f"{timeout:.0f} s (elodin.kubernetes.wait-timeout); see `kubectl describe pods "
                f"-l dask.org/cluster-name={name}`"
            ) from None
    except BaseException:
        cluster.close()
        raise
    return cluster
