"""Choosing which rows a report shows, streaming over the store block by block.

A report shows a few thousand cutouts of a store that may hold 10^8; every choice it makes
(one cutout per map cell, the k nearest a cluster's centre, a seeded random few, the top
outliers, the nearest neighbours of a query, the interactive sample) is "the k rows with the
smallest key in each group", which :class:`KSmallest` keeps over a stream of blocks in memory
bounded by groups x k, never by the store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["KSmallest", "grid_cells", "iter_rows", "random_keys", "take_rows"]


class KSmallest:
    """Per group, the ``k`` rows with the smallest keys seen so far.

    Ties are broken by row number, so the result does not depend on the block size.
    """

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self._rows = np.zeros(0, np.int64)
        self._keys = np.zeros(0, np.float64)
        self._groups = np.zeros(0, np.int64)

    def update(self, rows, keys, groups=None) -> None:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        keys = np.asarray(keys, dtype=np.float64).ravel()
        groups = (
            np.zeros(len(rows), np.int64)
            if groups is None
            else np.asarray(groups, dtype=np.int64).ravel()
        )
        ok = np.isfinite(keys)
        if self.k <= 0 or not ok.any():
            return
        rows = np.r_[self._rows, rows[ok]]
        keys = np.r_[self._keys, keys[ok]]
        groups = np.r_[self._groups, groups[ok]]
        order = np.lexsort((rows, keys, groups))
        rows, keys, groups = rows[order], keys[order], groups[order]
        first = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
        rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.r_[first, len(rows)]))
        keep = rank < self.k
        self._rows, self._keys, self._groups = rows[keep], keys[keep], groups[keep]

    def result(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``group -> (rows, keys)``, each sorted by key."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for g in np.unique(self._groups):
            m = self._groups == g
            out[int(g)] = (self._rows[m], self._keys[m])
        return out

    def rows(self, group: int = 0) -> np.ndarray:
        m = self._groups == group
        return self._rows[m]

    def keys(self, group: int = 0) -> np.ndarray:
        m = self._groups == group
        return self._keys[m]


def random_keys(seed: int, start: int, n: int) -> np.ndarray:
    """Uniform keys for rows ``start .. start + n``, fixed by ``seed`` and the rows themselves
    (the k smallest keys are a uniform random sample of size k, the same for any block size)."""
    rows = np.arange(start, start + n, dtype=np.uint64)
    # A cheap integer hash (splitmix64) of seed and row: independent of how rows are blocked.
    with np.errstate(over="ignore"):
        z = rows + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def grid_cells(xy: np.ndarray, lo, hi, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell index (row-major, row 0 at the top) and distance to the cell centre of 2-D points.

    Each axis of ``[lo, hi]`` is cut into ``n_cells`` equal parts; distances are in cell units.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    lo = np.asarray(lo, dtype=np.float64)
    span = np.asarray(hi, dtype=np.float64) - lo
    span = np.where(span > 0, span, 1.0)
    u = (xy - lo) / span * n_cells
    c = np.clip(np.floor(u), 0, n_cells - 1)
    d = np.hypot(*(u - c - 0.5).T)
    col = c[:, 0].astype(np.int64)
    row = (n_cells - 1 - c[:, 1]).astype(np.int64)  # embedding y points up
    return row * n_cells + col, d


def iter_rows(
    store, names: Sequence[str], *, block_rows: int | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(start, {name: values})`` over chunk-aligned blocks of per-row variables."""
    n = store.n_rows
    step = store.block_rows(block_rows)
    arrays = {name: store.array(name) for name in names}
    for start in range(0, n, step):
        yield start, {name: _plain(a[start : start + step]) for name, a in arrays.items()}


def take_rows(store, name: str, rows: np.ndarray) -> np.ndarray:
    """Values of a per-row variable at ``rows`` (any order), reading only the chunks touched."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        arr = store.array(name)
        return np.zeros((0, *arr.shape[1:]), dtype=_plain(arr[0:0]).dtype)
    uniq, inverse = np.unique(rows, return_inverse=True)
    values = _plain(store.array(name).oindex[uniq])
    return values[inverse]


def _plain(values: np.ndarray) -> np.ndarray:
    """Strings as Python objects (numpy's StringDType does not mix with everything)."""
    values = np.asarray(values)
    if values.dtype.kind in ("T", "U", "S", "O"):
        return values.astype(object)
    return values
