"""Where rows go: work units that own whole chunks, the chunk size of a new store, segments.

Pure numpy on the plan's tile and window arrays (cheap for 10^6 tiles); nothing here opens the
store. :func:`pack_units` is the rule that makes every Zarr chunk belong to exactly one unit, so
exactly one task writes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

__all__ = [
    "BLOCK_CHUNKS",
    "Layout",
    "Segment",
    "block_rows_for",
    "chunk_rows_for",
    "image_rows",
    "pack_units",
]

# Chunks per block when a stage streams a per-row variable (Store.block_rows): large enough
# that a read is many chunks, small enough that a block of fingerprints stays in memory.
BLOCK_CHUNKS = 64


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each work unit's windows go in the store (pure numpy; cheap for 10^6 tiles).

    Unit ``u`` owns the plan's windows ``unit_windows[u]:unit_windows[u+1]`` and the rows
    ``unit_rows[u]:unit_rows[u+1]``, relative to the segment's first row (chunk-aligned; the
    last chunk may hold empty slots).
    """

    chunk_rows: int
    unit_windows: np.ndarray
    unit_rows: np.ndarray

    @property
    def n_units(self) -> int:
        return len(self.unit_windows) - 1

    @property
    def n_rows(self) -> int:
        return int(self.unit_rows[-1])

    def rows_of(self, windows: np.ndarray) -> np.ndarray:
        """Row (relative to the segment) of the windows numbered ``windows`` (plan order)."""
        w = np.asarray(windows, dtype=np.int64)
        u = np.searchsorted(self.unit_windows, w, side="right") - 1
        return self.unit_rows[u] + (w - self.unit_windows[u])

    def window_rows(self) -> np.ndarray:
        """Row (relative to the segment) of every window of the plan, in plan order."""
        counts = np.diff(self.unit_windows)
        starts = np.repeat(self.unit_rows[:-1] - self.unit_windows[:-1], counts)
        return starts + np.arange(self.unit_windows[-1])


def pack_units(tile_start: np.ndarray, *, chunk_rows: int) -> Layout:
    """Cut the plan's windows into work units that own whole chunks.

    A tile with more windows than a chunk is cut every ``chunk_rows`` windows into pieces of
    their own (windows are row-major in a tile, so a piece is a band of it, read alone); then
    consecutive pieces share a unit while they start in the same chunk-sized bucket of the
    window order. So small tiles share one task, a large tile is worked on by several, and a
    unit never holds two chunks' worth of windows (memory per task is bounded by the chunk).
    """
    tile_start = np.asarray(tile_start, dtype=np.int64)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if len(tile_start) < 2 or tile_start[-1] == 0:
        z = np.zeros(1, np.int64)
        return Layout(chunk_rows, z, z)
    counts = np.diff(tile_start)
    pieces = np.maximum(1, -(-counts // chunk_rows))
    first_piece = np.cumsum(pieces) - pieces
    within = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)
    starts = np.unique(np.repeat(tile_start[:-1], pieces) + within * chunk_rows)
    starts = starts[starts < tile_start[-1]]
    bucket = starts // chunk_rows
    first = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    unit_windows = np.r_[starts[first], tile_start[-1]].astype(np.int64)
    n = np.diff(unit_windows)
    unit_rows = np.r_[0, np.cumsum(-(-n // chunk_rows) * chunk_rows)].astype(np.int64)
    return Layout(chunk_rows, unit_windows, unit_rows)


def chunk_rows_for(
    n_windows: int,
    *,
    threads: int,
    largest: int,
    smallest: int = 1,
    units_per_thread: int = 4,
    multiple: int = 1,
) -> int:
    """Rows per Zarr chunk for a new store whose first plan holds ``n_windows`` windows.

    :func:`pack_units` makes at least ``floor(n_windows / chunk_rows)`` units (a piece is at
    most a chunk long, so every whole chunk-sized bucket of the window order holds the start of
    a piece, and the first of them starts a unit), so a chunk of at most
    ``n_windows // (units_per_thread * threads)`` rows gives every worker thread at least
    ``units_per_thread`` units: the run's tail, when some threads have nothing left, is then
    short. It is rounded down to a ``multiple`` (the batch size: full batches) and kept within
    ``[smallest, largest]``; ``largest`` wins (a configured small chunk is kept as it is), and
    ``smallest`` bounds the per-unit overhead (a task, a session call per batch, a tile read).
    """
    if largest < 1 or smallest < 1 or threads < 1 or units_per_thread < 1 or multiple < 1:
        raise ValueError("chunk sizes, threads, units per thread and multiple must be >= 1")
    want = int(n_windows) // (units_per_thread * threads)
    if want >= multiple:
        want -= want % multiple
    return max(1, min(largest, max(smallest, want)))


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows and units one run appended to the store, and where its images' records are.

    The segment's images are the rows ``image_start:image_stop`` of the images table
    (:meth:`Store.images`) and their files ``file_start:file_stop``; a segment record has a
    fixed size, whatever the number of images.
    """

    row_start: int
    row_stop: int
    unit_start: int
    unit_stop: int
    plan_digest: str
    n_windows: int = 0
    image_start: int = 0
    image_stop: int = 0
    file_start: int = 0
    file_stop: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> Segment:
        return cls(
            **{
                f.name: int(d[f.name])
                for f in dataclasses.fields(cls)
                if f.name != "plan_digest" and f.name in d
            },
            plan_digest=str(d["plan_digest"]),
        )


def image_rows(plan, layout: Layout) -> np.ndarray:
    """``(n_images, 2)`` rows ``[start, stop)`` (relative to the segment) spanned by each image
    of ``plan`` (``-1, -1`` for an image with no window); the range bounds the rows a retire
    has to look at. From each tile's first and last window (rows grow with the plan order):
    nothing per window."""
    n = len(plan.images)
    out = np.full((n, 2), -1, np.int64)
    if plan.n_windows == 0 or n == 0:
        return out
    owns = np.diff(plan.tile_start) > 0
    img = plan.tiles["image"].astype(np.int64)[owns]
    start = np.full(n, np.iinfo(np.int64).max, np.int64)
    stop = np.full(n, -1, np.int64)
    np.minimum.at(start, img, layout.rows_of(plan.tile_start[:-1][owns]))
    np.maximum.at(stop, img, layout.rows_of(plan.tile_start[1:][owns] - 1) + 1)
    has = stop >= 0
    out[has, 0], out[has, 1] = start[has], stop[has]
    return out


def block_rows_for(chunk_rows: int, block_rows: int | None = None) -> int:
    """Rows per block of a store chunked by ``chunk_rows``: ``block_rows`` (default
    ``BLOCK_CHUNKS`` chunks) rounded down to whole chunks, and at least one chunk, so a block
    never splits a chunk between two readers or writers."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    step = block_rows or BLOCK_CHUNKS * chunk_rows
    return max(chunk_rows, step - step % chunk_rows)
