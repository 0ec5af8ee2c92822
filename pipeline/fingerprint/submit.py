"""The client side of the task loop: the cluster's threads and GPUs, the unit jobs of a
segment, and their submission with back-pressure.

Units are submitted as tasks (``client.submit`` of :func:`~.worker._unit_task`), a bounded
number in flight at once (``distributed.as_completed``), with the GPU share as a resource
restriction on each task; a unit whose workers kept dying is submitted again under a new key.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .. import config, interrupts
from ..errors import ConfigError, ElodinError
from ..geometry import read_box as _read_box
from ..sources import ImageSource
from ..store import Layout, Store, pack_units
from ..tiling import Plan
from .probe import ProbedById
from .worker import ANY_HOST, ModelRef, ProbedRef, TileJob, UnitJob, _unit_task, _UnitFailed

__all__ = ["UnitStream", "gpu_share"]

logger = logging.getLogger(__name__)


def gpu_share() -> float:
    """The part of a worker's ``GPU=1`` that one unit takes: ``1 / fingerprint.gpu-units``,
    rounded down so that that many shares never add up to more than one."""
    units = config.get_int("fingerprint.gpu-units", minimum=1)
    return math.floor(1e6 / units) / 1e6


def _cluster_threads(client) -> int:
    """Worker threads of the compute cluster now (a cluster still growing counts low, which
    only makes chunks smaller)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(w.get("nthreads") or 1) for w in workers.values()))


def _session_threads(client) -> tuple[tuple[str, int], ...]:
    """Intra-op threads per worker: config ``model.threads`` on every host when it is set,
    else :func:`_threads_per_host`."""
    if config.get("model.threads") is not None:
        return ((ANY_HOST, config.get_int("model.threads", minimum=1)),)
    return _threads_per_host(client)


def _threads_per_host(client) -> tuple[tuple[str, int], ...]:
    """Intra-op threads per worker: the host's cores shared among its worker processes."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    hosts: dict[str, int] = {}
    for w in info.values():
        host = w.get("host") or w["id"]
        hosts[host] = hosts.get(host, 0) + 1
    # A worker that dies meanwhile (a lost node, a restart) is left out, not an error.
    cores = client.run(
        lambda: (socket.gethostname(), len(os.sched_getaffinity(0))), on_error="return"
    )
    per_host = {}
    for addr, got in cores.items():
        if isinstance(got, BaseException):
            continue
        name, n = got
        host = info.get(addr, {}).get("host")
        per_host[name] = max(1, n // max(1, hosts.get(host, 1)))
    return tuple(sorted(per_host.items()))


def _segment_jobs(
    store: Store,
    seg_index: int,
    plan: Plan,
    sources: Mapping[str, ImageSource],
    base: dict,
    done: set[int],
    *,
    limits: Mapping[str, Any] | None = None,
    on_skip: Callable[[int], None] | None = None,
) -> Iterator[UnitJob]:
    """The jobs of segment ``seg_index``'s units without a done marker, in unit order, made
    one at a time. Each job carries the stretch ``limits`` of its own images only;
    ``on_skip(n)`` is told the windows of each done unit passed over.

    ``sources`` gives an image's source, or, for a source left on the workers, its probe
    batch's future and a :class:`~.worker.ProbedRef` (see :meth:`.probe.ProbedSources.ref`):
    the job then names the source by place, and carries the futures as ``probed``."""
    seg = store.segments[seg_index]
    layout: Layout = pack_units(plan.tile_start, chunk_rows=store.chunk_rows)
    limits = limits or {}
    for u in range(layout.n_units):
        unit = seg.unit_start + u
        w0, w1 = int(layout.unit_windows[u]), int(layout.unit_windows[u + 1])
        if unit in done:
            if on_skip is not None:
                on_skip(w1 - w0)
            continue
        t0 = int(np.searchsorted(plan.tile_start, w0, side="right")) - 1
        t1 = int(np.searchsorted(plan.tile_start, w1, side="left"))
        tiles = []
        probed: dict[str, tuple[int, Any]] = {}  # probe batch key -> (place, future)
        for t in range(t0, t1):
            lo, hi = max(w0, int(plan.tile_start[t])), min(w1, int(plan.tile_start[t + 1]))
            if hi <= lo:
                continue
            src = sources[plan.images[int(plan.tiles[t]["image"])]]
            if isinstance(src, tuple):  # a new image's source, left on the workers
                batch, ref = src
                place = probed.setdefault(batch.key, (len(probed), batch))[0]
                src = dataclasses.replace(ref, batch=place)
            first = int(plan.tile_start[t])
            # Derived here for a formula plan: windows exist for the units in flight only.
            wins = np.ascontiguousarray(plan.tile_windows(t)[lo - first : hi - first])
            tiles.append(TileJob(src, _read_box(wins, src.shape), wins))
        rows = int(layout.unit_rows[u + 1] - layout.unit_rows[u])
        # A new image's limits come to the task with its source (UnitJob.resolved).
        ids = {t.source.id for t in tiles if not isinstance(t.source, ProbedRef)}
        own = {i: v for i in ids if (v := limits.get(i)) is not None}
        yield UnitJob(
            row_start=seg.row_start + int(layout.unit_rows[u]),
            n_rows=rows,
            unit=unit,
            tiles=tuple(tiles),
            probed=tuple(f for _, f in probed.values()),
            **{**base, "image_limits": own},
        )


def done_in(store: Store, segments: Sequence[int]) -> set[int]:
    """The done units of ``segments`` alone: only the marker shards their units fall in are
    listed, so resuming one segment does not list every marker ever written."""
    recs = store.segments
    out: set[int] = set()
    for i in segments:
        out |= store.done_units(range(recs[i].unit_start, recs[i].unit_stop))
    return out


class UnitStream:
    """The units still to run in the store's ``segments``, made lazily.

    Only the segment being walked has its plan, its images' sources and their limits on the
    client; a segment whose units are all done is not even read. Its window and unit counts
    come from the segment records alone, so the progress bar's total is known before any job
    is made. ``made`` counts the jobs handed out so far.
    """

    def __init__(
        self,
        store: Store,
        segments: Sequence[int],
        *,
        base: dict,
        new_sources: ProbedById,
        done: set[int],
    ):
        self.store = store
        self.base = base
        self.new_sources = new_sources
        self.done = done
        recs = store.segments
        self.segments = list(segments)
        self.todo = [
            i
            for i in self.segments
            if not all(u in done for u in range(recs[i].unit_start, recs[i].unit_stop))
        ]
        self.n_windows = sum(recs[i].n_windows for i in self.segments)
        self.n_units = sum(recs[i].unit_stop - recs[i].unit_start for i in self.segments)
        # The bar covers the segments being resumed; their done units count as it passes them.
        self.todo_windows = sum(recs[i].n_windows for i in self.todo)
        self.made = 0

    def jobs(self, on_skip: Callable[[int], None] | None = None) -> Iterator[UnitJob]:
        table = self.store.images() if self.todo else None
        for index in self.todo:
            plan = self.store.load_plan(index)
            rows = {str(table.ids[i]): int(i) for i in table.in_segment(index)}
            for job in _segment_jobs(
                self.store,
                index,
                plan,
                _SegmentSources(rows, table, self.new_sources),
                self.base,
                self.done,
                limits=_SegmentLimits(rows, table),
                on_skip=on_skip,
            ):
                self.made += 1
                yield job


class _SegmentSources(Mapping):
    """Image id -> source for one segment's images, looked up as its units are made: a new
    image's where the probe left it (:meth:`.probe.ProbedById.ref`), an image being resumed
    reopened from its record. The last few are kept (a unit's tiles come image after image),
    never the whole segment's."""

    def __init__(self, rows: Mapping[str, int], table, new: ProbedById):
        self._rows, self._table, self._new = rows, table, new
        self._get = functools.lru_cache(maxsize=64)(self._lookup)

    def _lookup(self, img: str) -> ImageSource | tuple[Any, ProbedRef]:
        return self._new.ref(img) if img in self._new else self._table.source(self._rows[img])

    def __getitem__(self, img: str) -> ImageSource:
        if img not in self._rows:
            raise KeyError(img)
        return self._get(img)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


class _SegmentLimits(_SegmentSources):
    """Image id -> recorded stretch limits (None: none recorded) for one segment's images."""

    def __init__(self, rows: Mapping[str, int], table):
        super().__init__(rows, table, {})

    def _lookup(self, img: str):  # type: ignore[override]
        return self._table.limits(self._rows[img])


def _unit_size(job: UnitJob) -> int:
    return sum(len(t.windows) for t in job.tiles)


def _largest_first(
    jobs: Iterable[UnitJob], lookahead: int, size: Callable[[UnitJob], int] = _unit_size
) -> Iterator[UnitJob]:
    """``jobs`` reordered largest first within a look-ahead of ``lookahead`` jobs: at most that
    many are drawn ahead of submission. Units are independent (rows are fixed by the plan), and
    the point is the end of the run: the last ``lookahead`` units go largest first, so the run
    ends on small ones and no worker waits long for the last. A full sort would hold every
    job of the run on the client."""
    heap: list = []
    for seq, job in enumerate(jobs):
        heapq.heappush(heap, (-size(job), seq, job))
        if len(heap) > lookahead:
            yield heapq.heappop(heap)[2]
    while heap:
        yield heapq.heappop(heap)[2]


def _in_flight_limit(client) -> int:
    """Units in flight at once: scheduler memory stays bounded for 10^6 units, and every
    worker thread has a unit running and one queued behind it."""
    n_workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    return max(4 * n_workers, 2 * _cluster_threads(client)) + 4


def _tile_bounded(window: int, first: UnitJob, client) -> int:
    """``window`` lowered so that that many units like ``first`` stay within
    ``fingerprint.in-flight-tiles`` tiles, but never below two units a worker thread. Units
    of a run are alike (``chunk-rows`` windows each), so the first one measures them."""
    budget = config.get_int("fingerprint.in-flight-tiles", minimum=1)
    floor = 2 * _cluster_threads(client)
    return max(floor, min(window, budget // max(1, len(first.tiles))))


def _model_ref(card, onnx_path, sha: str, settings, client) -> ModelRef:
    """What the workers need to open the run's session (``settings``: a
    :class:`~.settings.FingerprintSettings`)."""
    on_gpu = settings.gpu
    fixed = config.get("model.fixed-batches")
    return ModelRef(
        card.name,
        str(onnx_path),
        sha,
        settings.providers,
        settings.topk,
        _session_threads(client),
        io_binding=config.get("model.io-binding"),
        fixed_batch=settings.batch_size if (on_gpu if fixed is None else fixed) else None,
        require_gpu=on_gpu and settings.providers in ("auto", None),
    )


def _check_gpu_workers(client, *, need_cuda: bool) -> None:
    """Refuse, before anything is written, a GPU run whose tasks could not run: no worker
    offers the resource GPU (they would wait forever), or a GPU worker's onnxruntime has no
    CUDA provider (each session checks again, for CUDA libraries that fail to load)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    gpu_workers = [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU")]
    if workers and not gpu_workers:
        raise ConfigError(
            "--gpu: no Dask worker offers the resource GPU (start GPU workers with "
            "`--resources GPU=1`, as the slurm and kubernetes profiles do with fingerprint.gpu), "
            "or drop --gpu"
        )
    if need_cuda and gpu_workers:
        offered = client.run(_cuda_offered, workers=gpu_workers)
        missing = sorted({host for host, ok in offered.values() if not ok})
        if missing:
            from ..errors import ModelError

            raise ModelError(
                f"a GPU was asked for (--gpu) but onnxruntime on {', '.join(missing)} has no "
                "CUDA provider (install onnxruntime-gpu there, or drop --gpu)"
            )


def _cuda_offered() -> tuple[str, bool]:
    import onnxruntime as ort

    return socket.gethostname(), "CUDAExecutionProvider" in ort.get_available_providers()


def _run_jobs(client, units: UnitStream, *, gpu: bool, progress: bool) -> int:
    """Submit the stream's units with back-pressure, show progress, and fail with the first
    error. The client holds at most the units in flight and a look-ahead of as many again,
    drawn from ``units`` as results come back: never a list of every unit of the run, and
    fewer units when each holds many tiles (:func:`_tile_bounded`)."""
    import dask.config
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from ..progress import bar as progress_bar

    if not units.todo:
        return 0
    resources = {"GPU": gpu_share()} if gpu else None
    bar = progress_bar(units.todo_windows, desc="fingerprint", unit="cutout", enabled=progress)
    jobs = units.jobs(on_skip=bar.update)
    first = next(jobs, None)
    if first is None:  # every unit of the stream was done after all
        bar.close()
        return 0
    window = _tile_bounded(_in_flight_limit(client), first, client)
    it = _largest_first(itertools.chain([first], jobs), lookahead=window)
    run_token = os.urandom(4).hex()
    in_flight: set = set()
    pending = as_completed()
    unit_job: dict[str, UnitJob] = {}
    resubmitted: dict[int, int] = {}
    max_resubmits = config.get_int("fingerprint.resubmit-killed", minimum=0)

    def submit(job: UnitJob) -> None:
        again = resubmitted.get(job.unit, 0)
        # The probe batches go as the task's argument (Dask brings their sources to it), not
        # inside the pickled job.
        fut = client.submit(
            _unit_task,
            dataclasses.replace(job, probed=()),
            job.probed,
            key=f"elodin-unit-{job.unit}-{run_token}" + (f"-{again}" if again else ""),
            resources=resources,
            pure=False,
            retries=2,
        )
        unit_job[fut.key] = job
        in_flight.add(fut)
        pending.add(fut)

    # A LocalCluster (SpecCluster) hard-closes a worker's nanny when no worker of that name is
    # back within distributed.deploy.lost-worker-timeout (15 s). Under repeated deaths (out of
    # memory, killed processes) a nanny that happens to be restarting its worker then is closed
    # for good, and the cluster shrinks until the run waits forever. Nannies restart their
    # workers; give them the time while units run.
    keep_nannies = dask.config.set({"distributed.deploy.lost-worker-timeout": "1 hour"})
    for job in _take(it, window):
        submit(job)
    written = 0
    try:
        for fut in pending:
            in_flight.discard(fut)
            job = unit_job.pop(fut.key)
            try:
                rows = fut.result()  # re-raises a task's error here (a bug: with traceback)
            except KilledWorker:
                # Workers died under this unit more often than Dask allows one task (`retries`
                # does not count deaths). Nothing of the unit is trusted without its marker, so
                # running it again from scratch is safe.
                resubmitted[job.unit] = resubmitted.get(job.unit, 0) + 1
                if resubmitted[job.unit] > max_resubmits:
                    raise ElodinError(
                        f"work unit {job.unit} ({', '.join(sorted({t.source.id for t in job.tiles}))}, rows "
                        f"{job.row_start}-{job.row_start + job.n_rows - 1}): workers kept dying "
                        f"under it (Dask gave it up {resubmitted[job.unit]} times); out of "
                        "memory? lower tiling.tile-size or fingerprint.batch-size, then run the "
                        "same command again (finished units are kept)"
                    ) from None
                logger.warning(
                    "work unit %d: workers died under it; submitting it again (%d of %d)",
                    job.unit,
                    resubmitted[job.unit],
                    max_resubmits,
                )
                submit(job)
                continue
            if isinstance(rows, _UnitFailed):
                raise rows.error()  # e.g. an unreadable tile, a full disk: one line
            written += rows
            bar.update(rows)
            interrupts.raise_if_interrupted()  # Ctrl-C lost in a GC callback: stop here
            for job in _take(it, 1):
                submit(job)
    finally:
        keep_nannies.__exit__(None, None, None)
        bar.close()
        if in_flight:
            client.cancel(list(in_flight))
    return written


def _take(it, n):
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return
