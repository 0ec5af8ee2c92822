"""What every analysis stage shares: opening the store, lazy row arrays, sampling, running
block tasks (on Dask workers or in threads), writing per-row results, running top-n.

Empty slots (``valid == False``) become all-NaN rows in the float arrays handed to the
algorithms (:func:`rows`), so every estimator skips non-finite rows and every writer puts the
fill value there. Nothing here holds more than one block of rows per task.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config
from ..errors import ConfigError, StoreError
from ..store import Store

__all__ = [
    "Runner",
    "TopN",
    "choice",
    "drop_variables",
    "finite_rows",
    "open_store",
    "require",
    "row_table",
    "rows",
    "runner",
    "sample_valid",
    "to_str",
    "tree_sum",
    "valid_count",
    "write_rows",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ store
def open_store(store: str | os.PathLike | Store, *, mode: str = "r") -> Store:
    """``store`` as an open :class:`Store` (a path is opened and validated)."""
    if isinstance(store, Store):
        return store if mode == "r" else Store.open(store.path, mode=mode)
    return Store.open(store, mode=mode)


def names(store: Store) -> set[str]:
    return set(Store.zarr(store.path).array_keys())


def require(store: Store, name: str, stage: str) -> None:
    """Refuse to run a stage before the stage that writes ``name``."""
    if name not in names(store):
        raise StoreError(
            f"{store.path}: no `{name}` variable; run `elodin {stage} {store.path}` first"
        )


def drop_variables(store: Store, variables: Sequence[str]) -> list[str]:
    """Delete variables that a new result makes stale; returns the names removed."""
    group = Store.zarr(store.path, mode="r+")
    present = set(group.array_keys())
    gone = [v for v in variables if v in present]
    for v in gone:
        del group[v]
    return gone


def choice(value: Any, what: str, choices: Sequence[str]) -> str:
    """A string option checked against ``choices`` with a one-line :class:`ConfigError`."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r} (expected one of {', '.join(choices)})")
    return value


def block_rows(store: Store, value: int | None) -> int:
    """Rows per task: the configured block, rounded to whole store chunks."""
    return store.block_rows(config.get_int("analysis.block-rows", override=value, minimum=1))


# ------------------------------------------------------------------------------ lazy arrays
def _zarr_array(store: Store, name: str):
    return Store.zarr(store.path, name)


def rows(store: Store, name: str, *, block: int, dtype: str | None = "float32"):
    """Lazy ``(cutout, ...)`` dask array of ``name`` with empty slots as all-NaN rows.

    Chunks are ``block`` rows, whole store chunks, so every task reads and writes whole Zarr
    chunks. ``dtype=None`` keeps the stored dtype and leaves empty slots as stored.
    """
    import dask.array as da

    arr = _zarr_array(store, name)
    x = da.from_zarr(arr, chunks=(block, *arr.shape[1:]))
    if dtype is None:
        return x
    valid = da.from_zarr(_zarr_array(store, "valid"), chunks=(block,))
    x = x.astype(dtype)
    mask = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    return da.where(mask, x, np.asarray(np.nan, dtype=dtype))


def valid_array(store: Store, *, block: int):
    import dask.array as da

    return da.from_zarr(_zarr_array(store, "valid"), chunks=(block,))


def to_str(values) -> np.ndarray:
    """Strings read from Zarr (numpy ``StringDType`` or object) as a fixed-width ``str`` array."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    return np.array([str(v) for v in values.astype(object).ravel()], dtype=str).reshape(
        values.shape
    )


def finite_rows(block: np.ndarray) -> np.ndarray:
    """Mask of the rows of a 2-D block that hold a usable value (not an empty slot)."""
    return np.isfinite(block).all(axis=1) if block.ndim == 2 else np.isfinite(block)


def valid_count(store: Store, *, stage: str = "analysis") -> int:
    """Number of valid rows; an empty store is refused."""
    n = 0
    for _, v in store.iter_blocks("valid", block_rows=1 << 20):
        n += int(np.count_nonzero(v))
    if n == 0:
        raise StoreError(
            f"{store.path}: no valid rows to analyse ({stage}); fingerprint some images first"
        )
    return n


def write_rows(
    store: Store, name: str, data, *, compute: bool = False, runner: Runner | None = None
):
    """Store the dask array ``data`` into the existing per-row variable ``name``.

    Block boundaries are whole store chunks, so each Zarr chunk is written by one task.
    Returns the delayed store (``compute=False``) to compute together with other results.
    """
    import dask.array as da

    target = Store.zarr(store.path, name, mode="r+")
    out = da.store(data, target, lock=False, compute=False)
    if compute:
        (runner or Runner(None)).compute(out)
        return None
    return out


# ------------------------------------------------------------------------------- execution
class Runner:
    """Computes dask collections on a distributed client, or in local threads without one."""

    def __init__(self, client) -> None:
        self.client = client

    @property
    def distributed(self) -> bool:
        return self.client is not None

    def compute(self, *objs, **kwargs):
        import dask

        if self.client is not None:
            return dask.compute(*objs, scheduler=self.client, **kwargs)
        return dask.compute(*objs, scheduler="threads", num_workers=os.cpu_count() or 1, **kwargs)

    def activate(self):
        """Make this the dask scheduler of the estimators' own ``dask.compute`` calls."""
        import dask

        if self.client is not None:
            return dask.config.set(scheduler=self.client)
        return dask.config.set(scheduler="threads", num_workers=os.cpu_count() or 1)


@contextlib.contextmanager
def runner(
    client=None, *, scheduler: str | None = None, workers: int | None = None
) -> Iterator[Runner]:
    """Where block tasks run.

    ``client`` given: that client. ``scheduler`` or ``workers`` given: Dask workers from
    :func:`pipeline.compute.connect` (closed afterwards). Otherwise the current default
    :class:`distributed.Client` when there is one (e.g. inside ``elodin demo``), else local
    threads: on one machine the blocks are BLAS-heavy numpy that releases the GIL, so a
    pool of worker processes would only add start-up and serialisation.
    """
    if client is not None:
        yield Runner(client)
        return
    if scheduler is not None or workers is not None:
        from ..compute import connect

        with connect(scheduler, workers=workers, quiet=True) as c:
            yield Runner(c)
        return
    try:
        from distributed import default_client

        current = default_client()
    except (ImportError, ValueError):
        current = None
    yield Runner(current)


def tree_sum(parts: list, *, fan_in: int = 8):
    """Sum delayed partial results pairwise-ish so no single task receives them all."""
    from dask import delayed

    if not parts:
        raise ValueError("nothing to sum")
    while len(parts) > 1:
        parts = [delayed(_sum_parts)(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _sum_parts(*parts):
    if isinstance(parts[0], tuple):
        return tuple(_sum_parts(*items) for items in zip(*parts, strict=True))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


# -------------------------------------------------------------------------------- sampling
def _block_ranks(valid: np.ndarray, ranks: np.ndarray, offset: int) -> np.ndarray:
    return np.flatnonzero(valid)[ranks] + offset


def sample_index(mask, size: int, *, seed: int) -> np.ndarray:
    """Sorted indices of a uniform random sample of ``size`` true rows of the dask bool array
    ``mask`` (all of them when fewer), computed with the current dask scheduler.

    Two cheap passes over the mask only: count per block, then turn the sampled global ranks
    into rows inside each block, so no task and not the client ever holds all indices.
    """
    import dask
    from dask import delayed

    blocks = mask.to_delayed().ravel()
    counts = np.asarray(
        dask.compute(*[delayed(np.count_nonzero)(b) for b in blocks]), dtype=np.int64
    )
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    ranks = (
        np.arange(total) if size >= total else np.sort(rng.choice(total, size=size, replace=False))
    )
    starts = np.r_[0, np.cumsum(counts)]
    offsets = np.cumsum((0, *mask.chunks[0]))
    parts = []
    for b, vb in enumerate(blocks):
        lo, hi = np.searchsorted(ranks, [starts[b], starts[b + 1]])
        if hi > lo:
            parts.append(delayed(_block_ranks)(vb, ranks[lo:hi] - starts[b], int(offsets[b])))
    found = dask.compute(*parts)
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def sample_valid(
    store: Store, size: int, *, seed: int, block: int, stop: int | None = None
) -> np.ndarray:
    """Sorted indices of a uniform sample of the store's valid rows (of rows ``[:stop]``).

    The sample depends only on the valid rows, ``size`` and ``seed``, not on ``block``, so a
    stage's sample is drawn again from the rows it saw: what the ``load_*`` functions do to
    restore a fitted estimator after rows were appended.
    """
    valid = valid_array(store, block=block)
    if stop is not None:
        valid = valid[: max(0, min(int(stop), store.n_rows))]
    return sample_index(valid, size, seed=seed)


def usable_mask(x):
    """Lazy mask of the usable (all-finite) rows of a 2-D dask array."""
    return x.map_blocks(finite_rows, drop_axis=list(range(1, x.ndim)), dtype=bool)


def take_rows(x, index: np.ndarray) -> np.ndarray:
    """``x[index]`` of a dask array for sorted ``index`` (reads only the chunks it touches)."""
    import dask

    if len(index) == 0:
        return np.zeros((0, *x.shape[1:]), dtype=x.dtype)
    (out,) = dask.compute(x[index])
    return np.asarray(out)


def split_by_block(
    index: np.ndarray, chunks: Sequence[int]
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """For each block: its first row and the positions (into ``index``) of the rows inside it."""
    offsets = np.cumsum((0, *chunks))
    out = []
    for b in range(len(chunks)):
        lo, hi = np.searchsorted(index, [offsets[b], offsets[b + 1]])
        out.append((int(offsets[b]), np.arange(lo, hi), index[lo:hi] - offsets[b]))
    return out


# ---------------------------------------------------------------------------------- top n
@dataclass
class TopN:
    """Running ``n`` smallest (or largest) scores over blocks: ``np.argpartition`` per block,
    so memory stays ``O(n + block)`` however many rows stream past."""

    n: int
    largest: bool = False

    def __post_init__(self) -> None:
        self.scores = np.zeros(0, np.float64)
        self.index = np.zeros(0, np.int64)

    def add(self, scores: np.ndarray, index: np.ndarray) -> None:
        ok = np.isfinite(scores)
        scores, index = np.asarray(scores, np.float64)[ok], np.asarray(index, np.int64)[ok]
        s = np.r_[self.scores, scores]
        i = np.r_[self.index, index]
        key = -s if self.largest else s
        if len(s) > self.n:
            keep = np.argpartition(key, self.n - 1)[: self.n]
            s, i, key = s[keep], i[keep], key[keep]
        order = np.lexsort((i, key))  # ties broken by row index: stable, reproducible order
        self.scores, self.index = s[order], i[order]


# ---------------------------------------------------------------------------------- tables
COORD_UNITS: Mapping[str, str | None] = {"x": "pix", "y": "pix", "ra": "deg", "dec": "deg"}


def row_table(store: Store, index: np.ndarray, columns: Mapping[str, np.ndarray] | None = None):
    """An astropy Table of rows ``index``: ``index, image, x, y, ra, dec`` (with units) plus
    ``columns``. Reads only the chunks holding those rows."""
    import astropy.units as u
    from astropy.table import Table

    index = np.asarray(index, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    t = Table()
    t["index"] = index
    for name in ("image", "x", "y", "ra", "dec"):
        arr = _zarr_array(store, name)
        vals = np.empty(len(index), dtype=object if name == "image" else arr.dtype)
        if len(index):
            vals[order] = arr.oindex[index[order]]
        if name == "image":
            vals = to_str(vals)
        unit = COORD_UNITS.get(name)
        t[name] = vals * u.Unit(unit) if unit and unit != "pix" else vals
        if unit == "pix":
            t[name].unit = u.pix
    for name, values in (columns or {}).items():
        t[name] = values
    return t
