"""The main job: cutouts of survey images -> CNN fingerprints in a Zarr store, on Dask.

The flow, as :func:`fingerprint` reads::

    listing  = InputListing.of(inputs)                   # ids, sizes, mtimes: no image opened
    store    = open or create the store; refuse another model/config
    known    = compare_with_records(store, listing)      # one vectorised (path, size, mtime) check
    sources  = open only the new or changed images       # lazy: headers only
    plan     = plan the new images (blobs: detection tasks per tile)
    segment  = save the plan, grow the store by its rows
    todo     = units of the touched segments without a done marker
    submit one task per unit (a share of GPU=1 when asked), at most a few per worker in flight
    each task: read tile + halo -> cut -> stretch -> infer in batches -> write its chunks -> mark done

Every planned window is written exactly once: rows are fixed by the saved plan, each Zarr chunk
belongs to one unit, and a unit that is run again (a lost worker, a rerun after Ctrl-C or
``kill -9``) writes the same bytes. A rerun skips units that are done; a finished store
does no inference at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import config
from .errors import ConfigError, ElodinError, InputError, StoreError
from .geometry import cut_windows, window_centres
from .geometry import read_box as _read_box
from .sources import ImageSource
from .store import Layout, Store, chunk_rows_for, pack_units
from .tiling import Plan

__all__ = [
    "FingerprintResult",
    "ModelRef",
    "UnitJob",
    "cut_windows",
    "fingerprint",
    "fingerprint_settings",
    "gpu_share",
    "image_limits",
    "plan_sources",
    "run_unit",
]

logger = logging.getLogger(__name__)

METHODS = ("sliding", "full", "blobs", "catalog")


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
class TileJob:
    source: ImageSource
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


@dataclasses.dataclass
class FingerprintResult:
    store: str
    n_cutouts: int
    units_run: int
    units_skipped: int
    images: tuple[str, ...]
    retired: int = 0

    def __str__(self) -> str:
        text = (
            f"{self.store}: {self.n_cutouts} cutouts from {len(self.images)} image(s); "
            f"{self.units_run} work unit(s) run, {self.units_skipped} already done"
        )
        return text + (
            f"; {self.retired} changed image(s) fingerprinted again" if self.retired else ""
        )


# ------------------------------------------------------------------------------ worker side
_STORES: dict[str, Store] = {}


def _worker_store(path: str) -> Store:
    if path not in _STORES:
        _STORES[path] = Store.open(path, mode="r+")
    return _STORES[path]


def _prepared_batches(job: UnitJob):
    """Yield ``(tile_index, rgb, masked_fraction)`` batches of the unit, in row order."""
    from .cutouts import CutoutReader

    reader = CutoutReader(preprocess=job.preprocess, fill=job.fill, image_limits=job.image_limits)
    for t, tile in enumerate(job.tiles):
        data = tile.source.read(*tile.read_box)
        for b in range(0, len(tile.windows), job.batch_size):
            wins = tile.windows[b : b + job.batch_size]
            cut = reader.cut(data, tile.read_box, wins, side=job.side)
            yield t, *reader.prepare(cut, tile.source.id)


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
    from .errors import ModelError
    from .models.runtime import get_session

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

    def padded(parts, fill, dtype, tail=()):
        arr = np.full((job.n_rows, *tail), fill, dtype=dtype)
        if n:
            arr[:n] = np.concatenate(parts)
        return arr

    feature_dim = feats[0].shape[1] if feats else session.feature_dim
    k = classes[0].shape[1] if classes else m.topk
    values = {
        "fingerprint": padded(feats, np.nan, job.dtype, (feature_dim,)),
        "top_class": padded(classes, -1, np.int32, (k,)),
        "top_prob": padded(probs, np.nan, np.float32, (k,)),
        "masked_fraction": padded(masked, np.nan, np.float32),
        "valid": np.arange(job.n_rows) < n,
        "image": padded(coords["image"], "", object),
        "x": padded(coords["x"], np.nan, np.float64),
        "y": padded(coords["y"], np.nan, np.float64),
        "width": padded(coords["width"], 0, np.int32),
        "height": padded(coords["height"], 0, np.int32),
        "ra": padded(coords["ra"], np.nan, np.float64),
        "dec": padded(coords["dec"], np.nan, np.float64),
    }
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


def _unit_task(job: UnitJob) -> int | _UnitFailed:
    try:
        return run_unit(job)
    except ElodinError as e:
        return _UnitFailed(type(e), str(e))


# ------------------------------------------------------------------------------ client side
CUDNN_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def _optional_bool(key: str) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"config elodin.{key}: expected true, false or null, got {value!r}")
    return value


def _check_model_settings() -> None:
    """The model settings that the workers read when they open their sessions: checked here,
    on the client, so that a typo is one line before the store exists, not a failed task."""
    import onnxruntime as ort

    providers = config.get("model.providers")
    if providers not in ("auto", None):
        names = [providers] if isinstance(providers, str) else providers
        if not isinstance(names, list | tuple) or not all(isinstance(p, str) for p in names):
            raise ConfigError(
                f"config elodin.model.providers: expected auto or a list of execution provider "
                f"names, got {providers!r}"
            )
        # Which ones a worker's onnxruntime offers is checked there (a GPU worker's build can
        # differ from the client's); a name that no onnxruntime knows is a typo.
        known = ort.get_all_providers()
        unknown = [p for p in names if p not in known]
        if unknown:
            raise ConfigError(
                f"config elodin.model.providers: {unknown[0]!r} is not an ONNX Runtime "
                "execution provider (such as CUDAExecutionProvider, CPUExecutionProvider)"
            )
    for key in ("model.io-binding", "model.fixed-batches"):
        _optional_bool(key)
    if config.get("model.threads") is not None:
        config.get_int("model.threads", minimum=1)
    cuda = config.get("model.cuda") or {}
    if not isinstance(cuda, dict):
        raise ConfigError(f"config elodin.model.cuda: expected a mapping, got {cuda!r}")
    search = cuda.get("cudnn-conv-algo-search", "EXHAUSTIVE")
    if search not in CUDNN_SEARCH:
        raise ConfigError(
            f"config elodin.model.cuda.cudnn-conv-algo-search: {search!r} is not one of "
            f"{', '.join(CUDNN_SEARCH)}"
        )
    device = cuda.get("device-id")
    if device is not None and (
        isinstance(device, bool) or not isinstance(device, int) or device < 0
    ):
        raise ConfigError(
            f"config elodin.model.cuda.device-id: expected null or a device number >= 0, got {device!r}"
        )
    if not isinstance(cuda.get("cuda-graph", False), bool):
        raise ConfigError(
            f"config elodin.model.cuda.cuda-graph: expected true or false, got {cuda['cuda-graph']!r}"
        )
    if cuda.get("cuda-graph") and False in (
        config.get("model.fixed-batches"),
        config.get("model.io-binding"),
    ):
        raise ConfigError(
            "config elodin.model.cuda.cuda-graph needs model.fixed-batches and model.io-binding "
            "(a captured graph replays one shape on the same device buffers); set them to "
            "true or null, or turn cuda-graph off"
        )


def fingerprint_settings(**flags: Any) -> dict:
    """Every setting of the run, flags over config, checked once, before anything is written:
    also those that only the workers (stretch, sessions) or later steps (detection, the task
    loop) use, so a refused run leaves no store, or the existing one as it was."""
    from .models.zoo import with_invariance
    from .preprocess import preprocess_settings

    method = config.get_choice("cutouts.method", METHODS, override=flags.get("method"))
    size = config.get_int("cutouts.size", override=flags.get("size"), minimum=1)
    # null (the default) means "the cutout size"; 0 is a bad stride, not null.
    stride = config.get("cutouts.stride", override=flags.get("stride"))
    stride = (
        size if stride is None else config.get_int("cutouts.stride", override=stride, minimum=1)
    )
    edge = config.get_choice("cutouts.edge", ("shift", "pad", "drop"), override=flags.get("edge"))
    _check_model_settings()
    if method == "blobs":
        from .detect import detection_options

        detection_options()
    # Read by the task loop, after the store has grown: checked now.
    config.get_int("fingerprint.gpu-units", minimum=1)
    config.get_int("fingerprint.resubmit-killed", minimum=0)
    return {
        "cutouts": {
            "method": method,
            "size": size,
            "stride": stride if method == "sliding" else None,
            "edge": edge if method == "sliding" else None,
            "fill": None
            if config.get("cutouts.fill") is None
            else config.get_float("cutouts.fill"),
            **(
                {
                    k: config.get(f"cutouts.{k}")
                    for k in (
                        "min-size",
                        "max-size",
                        "blob-scale",
                        "detect-nsigma",
                        "detect-npixels",
                        "deblend",
                    )
                }
                if method == "blobs"
                else {}
            ),
        },
        "tiling": {
            "tile-size": config.get_int(
                "tiling.tile-size", override=flags.get("tile_size"), minimum=1
            )
        },
        # Checked whole here (the workers only apply it): a bad scope, interval, stretch or
        # number is refused before the store is made with it.
        "preprocess": preprocess_settings(),
        "batch_size": config.get_int(
            "fingerprint.batch-size", override=flags.get("batch_size"), minimum=1
        ),
        # The largest chunk; a new store for a small job gets smaller ones (chunk_rows_for).
        "chunk_rows": config.get_int(
            "fingerprint.chunk-rows", override=flags.get("chunk_rows"), minimum=1
        ),
        "min_chunk_rows": config.get_int("fingerprint.min-chunk-rows", minimum=1),
        "units_per_thread": config.get_int("fingerprint.units-per-thread", minimum=1),
        "dtype": config.get_choice(
            "fingerprint.dtype", ("float32", "float16"), override=flags.get("dtype")
        ),
        "gpu": bool(config.get("fingerprint.gpu", override=flags.get("gpu"))),
        "model": with_invariance(
            str(config.get("model.name", override=flags.get("model"))),
            config.get("model.invariance"),
        ),
        "topk": config.get_int("model.topk", minimum=1),
        "providers": config.get("model.providers"),
        "precision": config.get_choice("model.precision", ("fp32", "fp16")),
    }


@dataclasses.dataclass(frozen=True)
class InputListing:
    """The run's inputs as a listing: image ids, their input specs and their files' size and
    mtime, found without opening any image. Image ``k`` owns files
    ``file_start[k]:file_start[k + 1]``."""

    ids: tuple[str, ...]
    specs: tuple[tuple[str, ...], ...]
    file_start: np.ndarray
    paths: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray

    @classmethod
    def of(cls, inputs: Sequence[str | os.PathLike]) -> InputListing:
        from .sources import list_images, spec_path

        listed = list_images(list(inputs))
        paths = [spec_path(spec) for _, specs in listed for spec in specs]
        sizes, mtimes = _stat_files(paths)
        counts = [len(specs) for _, specs in listed]
        return cls(
            ids=tuple(sid for sid, _ in listed),
            specs=tuple(specs for _, specs in listed),
            file_start=np.r_[0, np.cumsum(counts)].astype(np.int64),
            paths=np.asarray(paths, dtype=object),
            sizes=sizes,
            mtimes=mtimes,
        )

    def files(self, k: int) -> list[dict]:
        """Image ``k``'s files as the store records them."""
        lo, hi = int(self.file_start[k]), int(self.file_start[k + 1])
        return [
            {"path": str(self.paths[j]), "size": int(self.sizes[j]), "mtime": float(self.mtimes[j])}
            for j in range(lo, hi)
        ]


def _stat_files(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Size (-1: unknown) and mtime (POSIX seconds, NaN: unknown) of each file: a stat each,
    no file opened. Local paths go through ``os.stat`` (what fsspec's local ``info`` reports)."""
    from .store import parse_mtime

    sizes = np.full(len(paths), -1, np.int64)
    mtimes = np.full(len(paths), np.nan)
    for j, p in enumerate(paths):
        try:
            if "://" not in p:
                st = os.stat(p)
                sizes[j], mtimes[j] = st.st_size, st.st_mtime
                continue
            import fsspec

            fs, root = fsspec.core.url_to_fs(p)
            info = fs.info(root)
            sizes[j] = int(info.get("size") or 0)
            mtimes[j] = parse_mtime(info.get("mtime") or info.get("LastModified"))
        except (OSError, ValueError):
            pass
    return sizes, mtimes


def compare_with_records(store: Store | None, listing: InputListing) -> tuple[dict, list[str]]:
    """Which listed images the store knows, and which of those changed.

    One vectorised comparison of (id, path, size, mtime) with the records in use: returns
    ``known`` (image id -> its segment) and ``changed`` (known ids whose files differ in number,
    path, size or mtime), in listing order.
    """
    if store is None or not listing.ids:
        return {}, []
    table = store.images()
    cur = table.current()
    if not len(cur):
        return {}, []
    rec_ids = table.ids[cur].astype(str)
    order = np.argsort(rec_ids, kind="stable")
    ids = np.asarray(listing.ids)
    pos = np.clip(np.searchsorted(rec_ids[order], ids), 0, len(order) - 1)
    found = rec_ids[order][pos] == ids
    rec = np.where(found, cur[order[pos]], -1)  # table row of each listed image
    f0, f1 = table.column("file_start"), table.column("file_stop")
    n_listed = np.diff(listing.file_start)
    same_count = found & ((f1[rec] - f0[rec]) == n_listed)
    # File j of listed image k against file j - file_start[k] of its record.
    owner = np.repeat(np.arange(len(ids)), n_listed)
    check = same_count[owner]
    j = np.flatnonzero(check)
    k = owner[j]
    rj = f0[rec[k]] + (j - listing.file_start[k])
    differs = np.zeros(len(owner), bool)
    if len(j):
        r_path, r_size = table.column("file_path")[rj], table.column("file_size")[rj]
        r_mtime = table.column("file_mtime")[rj]
        m = listing.mtimes[j]
        same_mtime = (r_mtime == m) | (np.isnan(r_mtime) & np.isnan(m))
        differs[j] = (r_path != listing.paths[j]) | (r_size != listing.sizes[j]) | ~same_mtime
    changed_files = np.bincount(owner, weights=differs, minlength=len(ids)) > 0
    changed = found & (~same_count | changed_files)
    segment = table.column("segment")
    known = {listing.ids[i]: int(segment[rec[i]]) for i in np.flatnonzero(found)}
    return known, [listing.ids[i] for i in np.flatnonzero(changed)]


def _plan_digest(plan: Plan) -> str:
    h = hashlib.sha256()
    for arr in (plan.windows, plan.tile_start, plan.tiles):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\0".join(plan.images).encode())
    return h.hexdigest()


def _plan_sources(
    client, sources: Sequence[ImageSource], settings: dict, catalog: str | None, first_index: int
) -> Plan:
    from . import tiling

    cut = settings["cutouts"]
    ts = settings["tiling"]["tile-size"]
    method = cut["method"]
    if method in ("sliding", "full"):
        plans = []
        for i, s in enumerate(sources):
            try:
                plans.append(
                    tiling.plan_image(
                        s.shape,
                        image_index=i,
                        image_id=s.id,
                        method=method,
                        size=cut["size"],
                        stride=cut["stride"],
                        edge=cut["edge"] or "shift",
                        tile_size=ts,
                    )
                )
            except InputError as e:  # planning is pure and knows ids; the user knows files
                raise InputError(f"{'+'.join(s.paths)}: {e}") from None
        return Plan.concat(plans)
    if method == "catalog":
        from .catalog import plan_catalog

        if not catalog:
            raise ConfigError("--method catalog needs --catalog FILE")
        return plan_catalog(catalog, sources, size=cut["size"], tile_size=ts)
    return _plan_blobs(client, sources, tile_size=ts, first_index=first_index)


def _plan_blobs(
    client, sources: Sequence[ImageSource], *, tile_size: int, first_index: int
) -> Plan:
    """Blob plan: :func:`pipeline.detect.detect_plan` (one detection task per tile on the
    Dask workers, windows shifted inside the image, ownership on the client)."""
    from .detect import detect_plan

    return detect_plan(sources, client=client, tile_size=tile_size, image_index=first_index)


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
    sources: dict[str, ImageSource],
    base: dict,
    done: set[int],
) -> Iterable[UnitJob]:
    seg = store.segments[seg_index]
    layout: Layout = pack_units(plan.tile_start, chunk_rows=store.chunk_rows)
    for u in range(layout.n_units):
        unit = seg.unit_start + u
        if unit in done:
            continue
        w0, w1 = int(layout.unit_windows[u]), int(layout.unit_windows[u + 1])
        t0 = int(np.searchsorted(plan.tile_start, w0, side="right")) - 1
        t1 = int(np.searchsorted(plan.tile_start, w1, side="left"))
        tiles = []
        for t in range(t0, t1):
            lo, hi = max(w0, int(plan.tile_start[t])), min(w1, int(plan.tile_start[t + 1]))
            if hi <= lo:
                continue
            src = sources[plan.images[int(plan.tiles[t]["image"])]]
            wins = np.ascontiguousarray(plan.windows[lo:hi])
            tiles.append(TileJob(src, _read_box(wins, src.shape), wins))
        rows = int(layout.unit_rows[u + 1] - layout.unit_rows[u])
        yield UnitJob(
            row_start=seg.row_start + int(layout.unit_rows[u]),
            n_rows=rows,
            unit=unit,
            tiles=tuple(tiles),
            **base,
        )


def fingerprint(
    inputs: Sequence[str | os.PathLike],
    store: str | os.PathLike,
    *,
    method: str | None = None,
    size: int | None = None,
    stride: int | None = None,
    edge: str | None = None,
    catalog: str | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
    tile_size: int | None = None,
    chunk_rows: int | None = None,
    hdu: int | str | None = None,
    variable: str | None = None,
    progress: bool = True,
    client=None,
    replace_changed: bool = False,
) -> FingerprintResult:
    """Fingerprint every cutout of ``inputs`` into the store at ``store``.

    Parameters mirror ``elodin fingerprint``; ``None`` means the configured default. Pass a
    :class:`distributed.Client` as ``client`` to use a cluster you manage; otherwise one is
    started from ``scheduler`` (``local`` by default) and closed at the end.

    With ``replace_changed`` (``elodin run --incremental``), an input whose file changed since
    it was fingerprinted has its old rows retired (``valid = False``) and is fingerprinted again;
    without it such an input is refused.

    Returns
    -------
    FingerprintResult
        Rows written, units run and skipped.
    """
    from .models import resolve
    from .models.export import ensure_onnx
    from .models.recorded import record_name
    from .models.zoo import sha256_file

    settings = fingerprint_settings(
        method=method,
        size=size,
        stride=stride,
        edge=edge,
        model=model,
        batch_size=batch_size,
        gpu=gpu,
        tile_size=tile_size,
        chunk_rows=chunk_rows,
    )
    # A listing (globs, directories, @lists expanded; sizes and mtimes), no image opened:
    # only the images the store does not know yet are opened, under the lock.
    listing = InputListing.of(inputs)
    if not listing.ids:
        raise InputError("no input images")
    card = resolve(settings["model"])
    onnx_path = ensure_onnx(card, precision=settings["precision"])
    if not card.builtin:
        # A user card may leave the feature length out, and a user model may have fewer
        # classes than top-k asks for: ask the model itself, once.
        from .models.runtime import Session

        probe = Session(onnx_path, providers=["CPUExecutionProvider"], threads=1, topk=1)
        out = probe.infer(np.zeros((1, 3, 64, 64), np.float32), logits=True)
        card = dataclasses.replace(card, feature_dim=int(out.features.shape[1]))
        if out.logits is not None:
            settings["topk"] = min(settings["topk"], int(out.logits.shape[1]))
    sha = sha256_file(onnx_path)
    from . import __version__

    attrs = {
        "model": record_name(card.name, settings["precision"]),
        "model_sha256": sha,
        "feature_dim": card.feature_dim,
        "topk": settings["topk"],
        "cutouts": settings["cutouts"],
        "preprocess": settings["preprocess"],
        "tiling": settings["tiling"],
        "fingerprint_dtype": settings["dtype"],
        "pipeline_version": __version__,
    }
    store_path = str(store)
    # One writer at a time: a second run into the same store is refused with one line naming
    # the holder; the lock is given back however this run ends (error, Ctrl-C).
    with Store.lock(store_path):
        return _fingerprint_locked(
            store_path,
            listing,
            hdu=hdu,
            variable=variable,
            settings=settings,
            attrs=attrs,
            card=card,
            onnx_path=onnx_path,
            sha=sha,
            catalog=catalog,
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            client=client,
            replace_changed=replace_changed,
        )


def _fingerprint_locked(
    store_path: str,
    listing: InputListing,
    *,
    hdu: int | str | None,
    variable: str | None,
    settings: dict,
    attrs: dict,
    card,
    onnx_path,
    sha: str,
    catalog: str | None,
    scheduler: str | None,
    workers: int | None,
    progress: bool,
    client,
    replace_changed: bool,
) -> FingerprintResult:
    """The part of :func:`fingerprint` that runs under the store's writer lock."""
    from .preprocess import check_bands
    from .sources import open_listed

    exists = Store.exists(store_path) and not Store.incomplete(store_path)
    existing = Store.open(store_path, mode="r+") if exists else None
    position = {img: k for k, img in enumerate(listing.ids)}
    known, changed = compare_with_records(existing, listing)

    # Only images the store does not hold are opened (headers): a rerun over a known survey
    # opens none. Each is checked against the settings first, so a setting the new images
    # cannot take (bands) is named as such.
    def opened(which) -> list[ImageSource]:
        out = [
            open_listed(img, listing.specs[k], hdu=hdu, variable=variable)
            for k, img in enumerate(listing.ids)
            if which(img)
        ]
        for s in out:
            check_bands(s.n_bands, settings["preprocess"], image="+".join(s.paths))
        return out

    new = opened(lambda img: img not in known)
    if existing is not None:
        existing.check_compatible(attrs)
    if changed and not replace_changed:
        img = changed[0]
        raise StoreError(
            f"{store_path}: input {img} ({listing.paths[listing.file_start[position[img]]]}) "
            "changed since it was fingerprinted; use a new store or `elodin run --incremental`"
        )
    if changed:
        again = {s.id: s for s in opened(lambda img: img in changed)}
        # In listing order, as the run adds them.
        new = sorted([*new, *again.values()], key=lambda s: position[s.id])
    # A changed input is fingerprinted again as new, after its old rows are retired; that is
    # the first write, so it waits until the new images are measured and planned.
    touched = sorted({seg for img, seg in known.items() if img not in changed})
    images = listing.ids
    if not new and existing is not None:
        done = existing.done_units()
        segs = existing.segments
        if all(
            all(u in done for u in range(segs[i].unit_start, segs[i].unit_stop)) for i in touched
        ):
            # Nothing new, nothing left to resume: no cluster, no write.
            units = sum(segs[i].unit_stop - segs[i].unit_start for i in touched)
            n = sum(segs[i].n_windows for i in touched)
            return FingerprintResult(store_path, n, 0, units, images)
    # Measured before anything is written (an all-NaN image is refused here) and recorded, so a
    # resume and the report stretch with the same limits.
    new_limits = _image_limits(new, settings["preprocess"])

    from .compute import connect

    # Plans that need no cluster (all but blobs) are made before one is started, so a bad
    # catalog is one line at once, not after a cluster start.
    on_cluster = settings["cutouts"]["method"] == "blobs"
    plan = _plan_sources(None, new, settings, catalog, 0) if new and not on_cluster else None
    ctx = (
        contextlib.nullcontext(client)
        if client is not None
        else connect(scheduler, workers=workers, quiet=not progress, gpu=settings["gpu"])
    )
    with ctx as client:
        if settings["gpu"]:
            _check_gpu_workers(client, need_cuda=settings["providers"] in ("auto", None))
        if new and on_cluster:
            plan = _plan_sources(client, new, settings, catalog, 0)
        for img in changed:
            with _store_writes(store_path):
                existing.retire_image(known.pop(img), img)
        with _store_writes(store_path):
            st = existing or Store.create(
                store_path,
                feature_dim=card.feature_dim,
                topk=settings["topk"],
                chunk_rows=_new_chunk_rows(plan, settings, client),
                attrs=attrs,
                dtype=settings["dtype"],
            )
            if plan is not None:
                if plan.n_windows == 0:
                    logger.warning("no cutouts planned for %s", ", ".join(s.id for s in new))
                index = len(st.segments)
                _record_segment(st, index, plan, new, listing, new_limits)
                touched.append(index)

        base = {
            "store": store_path,
            "model": _model_ref(card, onnx_path, sha, settings, client),
            "preprocess": settings["preprocess"],
            "image_limits": {},
            "batch_size": settings["batch_size"],
            "fill": np.nan if settings["cutouts"]["fill"] is None else settings["cutouts"]["fill"],
            "side": settings["cutouts"]["size"],
            "dtype": settings["dtype"],
        }
        all_sources = {s.id: s for s in new}
        table = st.images()
        done = st.done_units()
        jobs: list[UnitJob] = []
        total_units = n_windows = 0
        for index in touched:
            seg = st.segments[index]
            total_units += seg.unit_stop - seg.unit_start
            if all(u in done for u in range(seg.unit_start, seg.unit_stop)):
                n_windows += seg.n_windows
                continue  # nothing to resume: its plan is not even read
            plan = st.load_plan(index)
            n_windows += plan.n_windows
            for i in table.in_segment(index):
                img = str(table.ids[i])
                # A segment is resumed as a whole: its other images are reopened from the record.
                if img not in all_sources:
                    all_sources[img] = table.source(i)
                limits = table.limits(i)
                if limits is not None:
                    base["image_limits"][img] = limits
            jobs.extend(_segment_jobs(st, index, plan, all_sources, base, done))
        # Largest units first (units are independent; rows are fixed by the plan): the run
        # then ends on small ones, and no worker waits long for the last.
        jobs.sort(key=lambda j: -sum(len(t.windows) for t in j.tiles))
        _run_jobs(client, jobs, gpu=settings["gpu"], progress=progress)
    return FingerprintResult(
        store_path, n_windows, len(jobs), total_units - len(jobs), images, retired=len(changed)
    )


def _record_segment(
    st: Store,
    index: int,
    plan: Plan,
    sources: Sequence[ImageSource],
    listing: InputListing,
    limits: dict,
):
    """Save segment ``index``'s ``plan`` and append the segment: its units, and a record per
    image (its files' size and mtime from ``listing``, its source, its stretch limits).
    Returns the new segment."""
    position = {img: k for k, img in enumerate(listing.ids)}
    st.save_plan(index, plan)
    return st.append_segment(
        images=[s.id for s in sources],
        layout=pack_units(plan.tile_start, chunk_rows=st.chunk_rows),
        plan_digest=_plan_digest(plan),
        inputs={
            s.id: {
                "files": listing.files(position[s.id]),
                "source": s.to_record(),
                "limits": limits.get(s.id),
            }
            for s in sources
        },
        plan=plan,
    )


def _cluster_threads(client) -> int:
    """Worker threads of the compute cluster now (a cluster still growing counts low, which
    only makes chunks smaller)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(w.get("nthreads") or 1) for w in workers.values()))


def _new_chunk_rows(plan: Plan | None, settings: dict, client) -> int:
    """The chunk size of a new store: small enough that every worker thread gets several
    units of this first job (a job of 3,465 windows at 1024 rows was 3 units for 2 workers,
    one of them idle for a third of the run). The store records it; appends and resumes keep
    it, so every chunk still has one writer."""
    n = plan.n_windows if plan is not None else 0
    threads = _cluster_threads(client)
    rows = chunk_rows_for(
        n,
        threads=threads,
        largest=settings["chunk_rows"],
        smallest=settings["min_chunk_rows"],
        units_per_thread=settings["units_per_thread"],
        multiple=settings["batch_size"],
    )
    logger.info("new store: %d rows per chunk (%d windows, %d worker threads)", rows, n, threads)
    return rows


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
            from .errors import ModelError

            raise ModelError(
                f"a GPU was asked for (--gpu) but onnxruntime on {', '.join(missing)} has no "
                "CUDA provider (install onnxruntime-gpu there, or drop --gpu)"
            )


def _cuda_offered() -> tuple[str, bool]:
    import onnxruntime as ort

    return socket.gethostname(), "CUDAExecutionProvider" in ort.get_available_providers()


@contextlib.contextmanager
def _store_writes(path: str):
    """The client's own writes (store creation, plans, growth): a disk that is full or
    read-only is one line. Each step is atomic or undone on the next open (Store.repair)."""
    try:
        yield
    except OSError as e:
        raise StoreError(
            f"{path}: cannot write to the store ({e.strerror or e}); fix that, then run the "
            "same command again"
        ) from None


def _image_limits(sources: Sequence[ImageSource], preprocess: dict) -> dict:
    if preprocess.get("scope") != "image":
        return {}
    from .preprocess import image_limits_for

    # Errors name the file, which is what the user can go and look at.
    return {
        s.id: image_limits_for(s, preprocess, image="+".join(s.paths)).tolist() for s in sources
    }


def plan_sources(
    sources: Sequence[ImageSource], settings: dict, *, catalog: str | None = None
) -> Plan:
    """The plan ``elodin fingerprint`` makes of ``sources`` with ``settings``
    (:func:`fingerprint_settings`), planned here: sliding, full or catalog windows (blob
    detection needs a cluster and is not offered here)."""
    if settings["cutouts"]["method"] == "blobs":
        raise ConfigError("plan_sources: blob plans are made on a cluster, by fingerprint()")
    return _plan_sources(None, sources, settings, catalog, 0)


def image_limits(sources: Sequence[ImageSource], preprocess: dict) -> dict:
    """Per-image stretch limits ``{image id: [[vmin, vmax], ...]}`` as ``elodin fingerprint``
    records them (empty unless ``preprocess.scope`` is ``image``)."""
    return _image_limits(sources, preprocess)


def gpu_share() -> float:
    """The part of a worker's ``GPU=1`` that one unit takes: ``1 / fingerprint.gpu-units``,
    rounded down so that that many shares never add up to more than one."""
    units = config.get_int("fingerprint.gpu-units", minimum=1)
    return math.floor(1e6 / units) / 1e6


def _model_ref(card, onnx_path, sha: str, settings: dict, client) -> ModelRef:
    on_gpu = settings["gpu"]
    fixed = config.get("model.fixed-batches")
    return ModelRef(
        card.name,
        str(onnx_path),
        sha,
        settings["providers"],
        settings["topk"],
        _session_threads(client),
        io_binding=config.get("model.io-binding"),
        fixed_batch=settings["batch_size"] if (on_gpu if fixed is None else fixed) else None,
        require_gpu=on_gpu and settings["providers"] in ("auto", None),
    )


def _run_jobs(client, jobs: list[UnitJob], *, gpu: bool, progress: bool) -> int:
    """Submit units with back-pressure, show progress, and fail with the first error."""
    import dask.config
    from distributed import as_completed
    from distributed.scheduler import KilledWorker
    from tqdm.auto import tqdm

    if not jobs:
        return 0
    n_workers = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    # In flight at once: scheduler memory stays bounded for 10^6 units, and every worker thread
    # has a unit running and one queued behind it.
    window = max(4 * n_workers, 2 * _cluster_threads(client)) + 4
    resources = {"GPU": gpu_share()} if gpu else None
    total = sum(len(t.windows) for j in jobs for t in j.tiles)
    bar = tqdm(
        total=total,
        unit="cutout",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="fingerprint",
    )
    it = iter(jobs)
    run_token = os.urandom(4).hex()
    in_flight: set = set()
    pending = as_completed()
    unit_job: dict[str, UnitJob] = {}
    resubmitted: dict[int, int] = {}
    max_resubmits = config.get_int("fingerprint.resubmit-killed", minimum=0)

    def submit(job: UnitJob) -> None:
        again = resubmitted.get(job.unit, 0)
        fut = client.submit(
            _unit_task,
            job,
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
