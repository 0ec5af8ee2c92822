"""How a run gets its Dask cluster: local, an existing scheduler, SLURM or Kubernetes.

``connect(scheduler)`` is a context manager yielding a :class:`distributed.Client`; it owns the
cluster it started and closes it (and, for SLURM, cancels its jobs) on the way out, also when the
run fails. The Dask cluster lives here; groups of fingerprints live in ``analysis/clustering.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from . import config
from .errors import ConfigError

__all__ = ["connect", "dashboard_link", "local_cluster"]

logger = logging.getLogger(__name__)


def local_cluster(*, workers: int | None = None, threads_per_worker: int | None = None, **kwargs):
    """A :class:`distributed.LocalCluster` of worker processes (the embedded default)."""
    from distributed import LocalCluster

    n_cores = os.cpu_count() or 1
    workers = config.get("compute.workers", override=workers) or n_cores
    threads = config.get("compute.threads-per-worker", override=threads_per_worker) or 1
    if workers < 1 or threads < 1:
        raise ConfigError(
            f"workers and threads per worker must be >= 1, got {workers} and {threads}"
        )
    kwargs.setdefault("memory_limit", config.get("compute.memory-limit"))
    kwargs.setdefault("dashboard_address", config.get("compute.dashboard-address"))
    kwargs.setdefault("resources", {"GPU": 1} if config.get("fingerprint.gpu") else None)
    if kwargs["resources"] is None:
        del kwargs["resources"]
    return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, **kwargs)


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
) -> Iterator:
    """Yield a client for ``scheduler``: ``local``, ``slurm``, ``kubernetes`` or an address.

    Clusters started here are closed on exit; an address is only joined, never shut down.
    """
    from distributed import Client

    scheduler = config.get("compute.scheduler", override=scheduler)
    cluster = None
    if scheduler == "local":
        cluster = local_cluster(workers=workers, threads_per_worker=threads_per_worker)
        target = cluster
    elif scheduler in ("slurm", "kubernetes"):
        cluster = _profile_cluster(scheduler, workers=workers)
        target = cluster
    elif "://" in scheduler or ":" in scheduler:
        target = scheduler
    else:
        raise ConfigError(
            f"--scheduler {scheduler!r}: expected local, slurm, kubernetes or an address like tcp://host:8786"
        )
    try:
        client = Client(target, timeout="60s")
    except OSError as e:
        if cluster is not None:
            cluster.close()
        raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    try:
        link = dashboard_link(client)
        if link and not quiet:
            # Printed, not logged: it belongs beside the progress bar at any log level.
            print(f"Dask dashboard: {link}", file=sys.stderr, flush=True)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
