"""How a run gets its Dask cluster: local, an existing scheduler, SLURM or Kubernetes.

``connect(scheduler)`` is a context manager yielding a :class:`distributed.Client`; it owns the
cluster it started and closes it (and, for SLURM, cancels its jobs) on the way out, also when the
run fails. The Dask cluster lives here; groups of fingerprints live in ``analysis/clustering/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from collections.abc import Iterator, Sequence

from . import config, numba_cache
from .errors import ConfigError

__all__ = ["connect", "dashboard_link", "gpu_devices", "local_cluster"]

logger = logging.getLogger(__name__)

# The client's stream to the scheduler keeps copies of the last batches it sent, for
# developers (distributed.admin.low-level-log-length, 1,000 batches by default). A run's
# batches are its unit tasks, windows and sources included: at 10^4 units that was 23 MiB of
# client memory, growing with the survey up to that bound. The client of a run keeps a few.
_CLIENT_MESSAGE_LOG = 8


def local_cluster(
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    gpu: bool | None = None,
    **kwargs,
):
    """A :class:`distributed.LocalCluster` of worker processes (the embedded default).

    With ``gpu`` (default: ``fingerprint.gpu``) there is one worker process per GPU device
    (:func:`gpu_devices`), each seeing only its own device and offering the resource
    ``GPU=1``, with at least ``fingerprint.gpu-units`` threads.
    """
    from distributed import LocalCluster

    gpu = bool(config.get("fingerprint.gpu", override=gpu))
    devices = gpu_devices() if gpu else ()
    workers = config.get("compute.workers", override=workers) or len(devices) or os.cpu_count() or 1
    threads = config.get("compute.threads-per-worker", override=threads_per_worker) or 1
    if gpu:
        threads = max(threads, config.get_int("fingerprint.gpu-units", minimum=1))
    if workers < 1 or threads < 1:
        raise ConfigError(
            f"workers and threads per worker must be >= 1, got {workers} and {threads}"
        )
    kwargs.setdefault("dashboard_address", config.get("compute.dashboard-address"))
    # Workers keep numba's compiled code (umap-learn, pynndescent) in the same on-disk cache as
    # this process: set before numba is imported there, so in the environment they start with.
    kwargs["env"] = {**numba_cache.environment(), **(kwargs.get("env") or {})}
    if not gpu:
        kwargs.setdefault("memory_limit", config.get("compute.memory-limit"))
        return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, **kwargs)
    from distributed.worker_memory import parse_memory_limit

    kwargs.setdefault("resources", {"GPU": 1})
    limit = parse_memory_limit(config.get("compute.memory-limit"), 1, workers, logger=logger)
    kwargs.setdefault("memory_limit", limit)
    if workers > len(devices):
        logger.warning("%d GPU workers on %d device(s): some share a GPU", workers, len(devices))
    cluster = _device_cluster_class()(
        devices=devices, threads_per_worker=threads, processes=True, **kwargs
    )
    try:
        cluster.scale(workers)
        cluster.wait_for_workers(workers, timeout=120)
    except BaseException:
        cluster.close()
        raise
    return cluster


def gpu_devices() -> tuple[str, ...]:
    """GPU device ids for local GPU workers: ``compute.gpus``, else ``CUDA_VISIBLE_DEVICES``,
    else the GPUs that ``nvidia-smi -L`` lists, else one (device 0)."""
    import subprocess

    pinned = config.get("compute.gpus")
    if pinned is not None:
        ids = [pinned] if isinstance(pinned, int | str) else list(pinned)
        if not ids or any(not str(i).strip() for i in ids):
            raise ConfigError(
                f"config elodin.compute.gpus: expected a list of device ids, got {pinned!r}"
            )
        return tuple(str(i).strip() for i in ids)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return tuple(d.strip() for d in visible.split(",") if d.strip())
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    n = sum(line.startswith("GPU ") for line in listed.splitlines())
    return tuple(str(i) for i in range(n)) or ("0",)


def _device_cluster_class():
    # Built on first use: importing distributed costs a second the CLI need not always pay.
    from distributed import LocalCluster

    class DeviceCluster(LocalCluster):
        """A LocalCluster whose n-th worker sees only GPU ``devices[n % len(devices)]``
        (``CUDA_VISIBLE_DEVICES`` set by its nanny before the process starts), so the one
        ``GPU=1`` a worker offers is the one device it can use. Nannies restart a lost worker
        with the same device."""

        def __init__(self, *, devices: Sequence[str], **kwargs):
            self.devices = tuple(devices)
            super().__init__(n_workers=0, **kwargs)

        def new_worker_spec(self):
            ((name, spec),) = super().new_worker_spec().items()
            device = self.devices[len(self.worker_spec) % len(self.devices)]
            options = dict(spec["options"])
            options["env"] = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": device}
            return {name: {**spec, "options": options}}

    return DeviceCluster


class _ClosingHeartbeatFilter(logging.Filter):
    """Drops the one error a worker logs when its own shutdown cuts off a heartbeat in flight.

    ``Worker.close`` stops the heartbeat callback but then closes its RPC pool under a heartbeat
    already awaiting the scheduler, which distributed logs with a traceback
    (dask/distributed has the race; e.g. NVIDIA-NeMo/Curator#9). On a command that ends with one
    clear line, that traceback is noise from our own close, so it is dropped, and only while the
    worker is closing: the same error from a running worker means the scheduler is gone.
    """

    _MESSAGE = "Failed to communicate with scheduler during heartbeat"

    def __init__(self, worker) -> None:
        super().__init__()
        self._worker = weakref.ref(worker)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self._MESSAGE):
            return True
        worker = self._worker()
        return worker is not None and worker.status.name not in _CLOSING


_CLOSING = frozenset({"closing", "closing_gracefully", "closed"})


def _quiet_close_plugin():
    # Built on first use, like the GPU cluster: importing distributed costs the CLI a second.
    from distributed.diagnostics.plugin import WorkerPlugin

    class QuietClose(WorkerPlugin):
        """Installs :class:`_ClosingHeartbeatFilter` on each worker (and on restarted ones).

        The filter outlives the plugin: ``Worker.close`` tears plugins down before the race."""

        name = "elodin-quiet-close"

        def setup(self, worker) -> None:
            logging.getLogger("distributed.worker").addFilter(_ClosingHeartbeatFilter(worker))

    return QuietClose()


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # no dashboard (bokeh missing, or a remote scheduler without one)
        return None


def _profile_cluster(name: str, **kwargs):
    """Clusters of the named profiles; each profile module owns its own settings."""
    if name == "slurm":
        from .deploy_profiles import slurm_cluster

        return slurm_cluster(**kwargs)
    if name == "kubernetes":
        from .deploy_profiles import kubernetes_cluster

        return kubernetes_cluster(**kwargs)
    raise ConfigError(f"unknown scheduler profile {name!r}")


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    quiet: bool = False,
    gpu: bool | None = None,
) -> Iterator:
    """Yield a client for ``scheduler``: ``local``, ``slurm``, ``kubernetes`` or an address.

    ``gpu`` (default: ``fingerprint.gpu``) starts GPU workers offering the resource ``GPU=1``.

    Clusters started here are closed on exit; an address is only joined, never shut down.
    """
    import dask.config
    from distributed import Client

    scheduler = config.get("compute.scheduler", override=scheduler)
    cluster = None
    if scheduler == "local":
        cluster = local_cluster(workers=workers, threads_per_worker=threads_per_worker, gpu=gpu)
        target = cluster
    elif scheduler in ("slurm", "kubernetes"):
        cluster = _profile_cluster(scheduler, workers=workers, gpu=gpu)
        target = cluster
    elif "://" in scheduler or ":" in scheduler:
        target = scheduler
    else:
        raise ConfigError(
            f"--scheduler {scheduler!r}: expected local, slurm, kubernetes or an address like tcp://host:8786"
        )
    try:
        with dask.config.set({"distributed.admin.low-level-log-length": _CLIENT_MESSAGE_LOG}):
            client = Client(target, timeout="60s")
    except OSError as e:
        if cluster is not None:
            cluster.close()
        raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    try:
        if cluster is not None:
            # Only clusters started here are closed here, so only their workers are told.
            client.register_plugin(_quiet_close_plugin())
        link = dashboard_link(client)
        if link and not quiet:
            # Printed, not logged: it belongs beside the progress bar at any log level.
            print(f"Dask dashboard: {link}", file=sys.stderr, flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
