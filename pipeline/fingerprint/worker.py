"""The worker side of a fingerprint run: one task per work unit.

A task reads each tile's read box once, cuts its windows, stretches them, runs the model in
batches (the next batch prepared on a thread meanwhile) and writes the unit's rows, then its
done marker. Everything here is pickled by reference into tasks (``_unit_task``, ``run_unit``,
the job specs), so it stays importable as ``pipeline.fingerprint.worker`` and is re-exported
from ``pipeline.fingerprint``.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

import numpy as np

from ..errors import ElodinError, StoreError
from ..geometry import window_centres
from ..sources import ImageSource
from ..store import Store, filled_rows

__all__ = ["ANY_HOST", "ModelRef", "ProbedRef", "TileJob", "UnitJob", "run_unit"]


# ---------------------------------------------------------------------------------- job specs
@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What a worker needs to get its session: the file, its sha256 and the session options."""

    name: str
    path: str
    sha256: str
    providers: Any = "auto"
    topk: int = 20
    threads_per_host: tuple[tuple[str, int], ...] = ()
    io_binding: bool | None = None
    fixed_batch: int | None = None
    require_gpu: bool = False

    def threads(self) -> int | None:
        per_host = dict(self.threads_per_host)
        return per_host.get(socket.gethostname(), per_host.get(ANY_HOST))


# The host key of a thread count that every worker takes (config ``model.threads``).
ANY_HOST = "*"


@dataclasses.dataclass(frozen=True)
class ProbedRef:
    """A new image's source where the probe left it, on the workers: place ``index`` of the
    task's probe batch ``batch`` (of the unit's :attr:`UnitJob.probed`). The client makes units
    from these, never bringing the sources over (at 576 images a unit, the sources of the units
    in flight were most of its memory); ``id`` and ``shape`` are all it needs of them."""

    id: str
    shape: tuple[int, int]
    index: int
    batch: int = 0


@dataclasses.dataclass(frozen=True)
class TileJob:
    source: ImageSource | ProbedRef
    read_box: tuple[int, int, int, int]  # ry0, ry1, rx0, rx1 (inside the image)
    windows: np.ndarray  # (n, 4) x0, y0, w, h in image pixels


@dataclasses.dataclass(frozen=True)
class UnitJob:
    """One task: the tiles of a work unit and where their rows go."""

    store: str
    unit: int
    row_start: int
    n_rows: int
    tiles: tuple[TileJob, ...]
    model: ModelRef
    preprocess: dict
    image_limits: dict  # image id -> stretch limits when preprocess.scope == image
    batch_size: int
    fill: float
    side: int  # common side for windows of varying size (blobs, catalog sizes)
    dtype: str
    # The probe batches (Dask futures) that its ProbedRef tiles point into, on the client
    # only: they are given to the task as its argument, so Dask brings their sources to it.
    probed: tuple = ()

    def resolved(self, probed: tuple) -> UnitJob:
        """The job with each :class:`ProbedRef` replaced by its source and its image's
        stretch limits added, both from ``probed`` (the batches' :class:`~.probe.Probed`
        results, in :attr:`probed` order; the limits as the store records them)."""
        tiles, limits = [], dict(self.image_limits)
        for t in self.tiles:
            ref = t.source
            if isinstance(ref, ProbedRef):
                batch = probed[ref.batch]
                src = batch.sources[ref.index]
                if src.id != ref.id:  # a bug, not a user's problem: fail loudly
                    raise RuntimeError(f"probe batch {ref.batch} holds {src.id}, not {ref.id}")
                t = dataclasses.replace(t, source=src)
                if (lim := batch.limits.get(src.id)) is not None:
                    limits[src.id] = np.asarray(lim, np.float32)
            tiles.append(t)
        return dataclasses.replace(self, tiles=tuple(tiles), image_limits=limits, probed=())


# ------------------------------------------------------------------------------ worker side
_STORES: dict[str, Store] = {}


def _worker_store(path: str) -> Store:
    if path not in _STORES:
        _STORES[path] = Store.open(path, mode="r+")
    return _STORES[path]


def _prepared_batches(job: UnitJob):
    """Yield ``(tile, rgb, masked_fraction)`` batches of the unit, in row order (``tile``: the
    index of the tile of the batch's last cutout).

    A batch is filled across tiles: every batch holds ``batch_size`` cutouts but the unit's
    last. A survey of small patches has one window a tile, and a batch a tile ran the model
    576 times a unit on one cutout each (the batch's fixed cost, paid per patch); its cutouts
    are stretched together too, each with its own image's limits. A batch holds cutouts of
    one size: blob and catalog windows of another size start a new one."""
    from ..cutouts import CutoutReader

    reader = CutoutReader(preprocess=job.preprocess, fill=job.fill, image_limits=job.image_limits)
    parts, n, last = [], 0, 0  # the batch being filled (raw cutouts, their image), its last tile
    for t, tile in enumerate(job.tiles):
        data = tile.source.read(*tile.read_box)
        b = 0
        while b < len(tile.windows):
            wins = tile.windows[b : b + job.batch_size - n]
            cut = reader.cut(data, tile.read_box, wins, side=job.side)
            if parts and cut.shape[2:] != parts[0][0].shape[2:]:
                # A batch holds one cutout size: a tile of blob windows all of one other size
                # is cut at that size (the model resizes), as when a batch was a tile.
                yield last, *reader.prepare_many(parts)
                parts, n = [], 0
            parts.append((cut, tile.source.id))
            n, b, last = n + len(wins), b + len(wins), t
            if n == job.batch_size:
                yield t, *reader.prepare_many(parts)
                parts, n = [], 0
    if n:
        yield last, *reader.prepare_many(parts)


def _prefetch(gen, depth: int = 1):
    """Run ``gen`` one step ahead on a thread: the next batch is read, cut and stretched
    while the model runs the current one (numpy and ONNX Runtime release the GIL)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in gen:
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="elodin-prefetch")
    thread.start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def _session_for(m: ModelRef):
    from ..errors import ModelError
    from ..models.runtime import get_session

    session = get_session(
        m.path,
        providers=m.providers,
        threads=m.threads(),
        topk=m.topk,
        sha256=m.sha256,
        io_binding=m.io_binding,
        fixed_batch=m.fixed_batch,
    )
    if m.require_gpu and not session.on_gpu:
        raise ModelError(
            f"a GPU was asked for (--gpu) but onnxruntime on {socket.gethostname()} has no working "
            "CUDA provider (install onnxruntime-gpu there, or drop --gpu)"
        )
    return session


def run_unit(job: UnitJob, *, prefetch: bool = True) -> int:
    """Fingerprint one work unit and write its rows; returns the number of cutouts written."""
    m = job.model
    session = _session_for(m)
    n = sum(len(t.windows) for t in job.tiles)
    feats, classes, probs, masked = [], [], [], []
    batches = _prepared_batches(job)
    for _, rgb, frac in _prefetch(batches) if prefetch else batches:
        out = session.infer(rgb, logits=False)
        feats.append(out.features)
        classes.append(out.top_class)
        probs.append(out.top_prob)
        masked.append(frac)
    coords = {k: [] for k in ("image", "x", "y", "width", "height", "ra", "dec")}
    for tile in job.tiles:
        src = tile.source
        x, y = window_centres(tile.windows)
        ra, dec = src.pixel_to_radec(x, y)
        coords["image"].append(np.full(len(x), src.id, dtype=object))
        coords["x"].append(x)
        coords["y"].append(y)
        coords["width"].append(tile.windows[:, 2].astype(np.int32))
        coords["height"].append(tile.windows[:, 3].astype(np.int32))
        coords["ra"].append(np.asarray(ra, dtype=np.float64))
        coords["dec"].append(np.asarray(dec, dtype=np.float64))

    feature_dim = feats[0].shape[1] if feats else session.feature_dim
    k = classes[0].shape[1] if classes else m.topk
    # The store's own schema fills the unit's empty slots (one home for dtypes and fills).
    values = filled_rows(
        job.n_rows,
        {
            "fingerprint": feats,
            "top_class": classes,
            "top_prob": probs,
            "masked_fraction": masked,
            **coords,
        },
        feature_dim=feature_dim,
        topk=k,
        dtype=job.dtype,
    )
    try:
        store = _worker_store(job.store)
        store.write_rows(job.row_start, values)
        # After the data: a unit with a marker always has its rows (a failed or killed write
        # leaves no marker, and the unit is written again, whole, by the next run).
        store.mark_done(job.unit)
    except OSError as e:  # disk full, read-only, a lost mount
        raise StoreError(
            f"{job.store}: cannot write rows {job.row_start}-{job.row_start + job.n_rows - 1} "
            f"(work unit {job.unit}): {e.strerror or e}; free space or fix the store, then run "
            "the same command again"
        ) from None
    return n


@dataclasses.dataclass(frozen=True)
class _UnitFailed:
    """A user-caused problem in a unit (unreadable tile, full disk), returned by the task
    instead of raised: the worker does not log it as a crash with a traceback, Dask does not
    retry it, and the client raises it as the one-line error it is."""

    kind: type
    message: str

    def error(self) -> ElodinError:
        return self.kind(self.message)


def _unit_task(job: UnitJob, probed: tuple = ()) -> int | _UnitFailed:
    try:
        return run_unit(job.resolved(probed) if probed else job)
    except ElodinError as e:
        return _UnitFailed(type(e), str(e))
