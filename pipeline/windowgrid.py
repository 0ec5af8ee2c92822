"""Formula plans: sliding and full-frame windows as a rule, not as data.

A sliding plan of a survey (10^6 tiles, 10^9 windows) would be 32 GB of int64 boxes if every
window were listed. But the windows of a sliding or full-frame plan follow from a few numbers:
each image's shape, the window size and stride, the edge policy and the tile size. A
:class:`WindowGrid` keeps those numbers (16 bytes per image, the rest once) and derives the
windows of one tile when asked (:meth:`WindowGrid.tile_windows`), in the order
:func:`pipeline.tiling.plan_image` lists them; the client holds the tiles and their window
counts (80 bytes per tile) and nothing per window. Sparse plans (blobs, a catalog) are data and
stay :class:`~pipeline.tiling.Plan` arrays.

:func:`plan_grid` plans many images at once, vectorised: images of the same shape share one
tile layout, so a survey of equal patches is planned as one patch and repeated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ConfigError, ImageInputError, InputError
from .tiling import (
    EDGE_POLICIES,
    MAX_WINDOW_SIDE,
    TILE_DTYPE,
    Plan,
    _axis_starts,
    _check_edge,
    _check_fits,
    _positive_int,
    _sliding_tiles,
)

__all__ = ["GRID_METHODS", "WindowGrid", "plan_grid"]

# The methods whose windows are a formula of the image's shape.
GRID_METHODS = ("sliding", "full")
# Edge codes in digests: "" (full frame) is 0, then the policies in tiling's order (a new
# policy must go at the end, or old digests change).
_EDGE_CODES = ("", *EDGE_POLICIES)


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """The rule a formula plan's windows follow.

    Attributes
    ----------
    method : {"sliding", "full"}
    shapes : (n_images, 2) int64
        ``ny, nx`` of each image of the plan (indexed like ``Plan.images``).
    size, stride : int
        Window side and step (sliding; 0 for full).
    edge : str
        Edge policy (sliding; ``""`` for full).
    tile_size : int
    """

    method: str
    shapes: np.ndarray
    size: int
    stride: int
    edge: str
    tile_size: int

    def __post_init__(self):
        if self.method not in GRID_METHODS:
            raise ValueError(f"a window grid is one of {GRID_METHODS}, not {self.method!r}")
        if self.shapes.ndim != 2 or self.shapes.shape[1] != 2:
            raise ValueError("shapes must be an (n_images, 2) array")

    def tile_windows(self, tile: np.void | Mapping[str, Any]) -> np.ndarray:
        """The ``(n, 4)`` windows ``x0, y0, w, h`` tile ``tile`` (a row of the plan's tiles)
        owns, row-major, as :func:`pipeline.tiling.plan_image` lists them."""
        ny, nx = (int(v) for v in self.shapes[int(tile["image"])])
        if self.method == "full":
            return np.array([[0, 0, nx, ny]], dtype=np.int64)
        sel_x = self._owned(nx, int(tile["tx0"]))
        sel_y = self._owned(ny, int(tile["ty0"]))
        out = np.empty((sel_y.size * sel_x.size, 4), dtype=np.int64)
        out[:, 0] = np.tile(sel_x, sel_y.size)
        out[:, 1] = np.repeat(sel_y, sel_x.size)
        out[:, 2:] = self.size
        return out

    def _owned(self, length: int, core_start: int) -> np.ndarray:
        """Starts along one axis whose owner pixel falls in the tile starting at
        ``core_start`` (owners are monotone in the start: one contiguous run)."""
        starts = _axis_starts(length, size=self.size, stride=self.stride, edge=self.edge)
        owner = np.clip(starts + self.size // 2, 0, length - 1) // self.tile_size
        t = core_start // self.tile_size
        lo, hi = np.searchsorted(owner, [t, t + 1])
        return starts[lo:hi]

    def to_attrs(self) -> dict:
        """The grid's scalars, JSON-able (the shapes are stored as an array beside them)."""
        return {
            "method": self.method,
            "size": self.size,
            "stride": self.stride,
            "edge": self.edge,
            "tile_size": self.tile_size,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], shapes: np.ndarray) -> WindowGrid:
        return cls(
            str(attrs["method"]),
            np.asarray(shapes, dtype=np.int64).reshape(-1, 2),
            int(attrs["size"]),
            int(attrs["stride"]),
            str(attrs["edge"]),
            int(attrs["tile_size"]),
        )

    def to_array(self) -> np.ndarray:
        """Everything the windows follow from as one int64 array (for a digest)."""
        head = [
            GRID_METHODS.index(self.method),
            self.size,
            self.stride,
            _EDGE_CODES.index(self.edge),
            self.tile_size,
        ]
        return np.concatenate([np.asarray(head, np.int64), self.shapes.ravel()])


def plan_grid(
    shapes,
    *,
    method: str,
    tile_size: int,
    size: int | None = None,
    stride: int | None = None,
    edge: str = "shift",
    image_ids: Sequence[str] | None = None,
) -> Plan:
    """Plan every image of ``shapes`` (``(n, 2)``: ``ny, nx``) as one formula plan.

    The tiles, their order and their windows are those of
    ``Plan.concat([plan_image(shape_i, image_index=i, ...) for i ...])``; only the windows
    are not listed (see :class:`WindowGrid`). Images of equal shape share one tile layout, so
    planning 10^5 equal patches costs one patch and a few array copies.

    Raises
    ------
    ImageInputError
        When no window fits an image (under ``shift`` or ``drop``); ``err.image_index`` is
        the image's position, for the caller to name its file.
    ConfigError
        For a bad size, stride, edge policy, tile size or method.
    """
    shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    n = len(shapes)
    ids = tuple(image_ids) if image_ids is not None else ("",) * n
    if len(ids) != n:
        raise ValueError("one image id per shape")
    ts = _positive_int(tile_size, "tiling.tile-size")
    if method == "sliding":
        size = _positive_int(size, "cutouts.size", MAX_WINDOW_SIDE)
        stride = _positive_int(size if stride is None else stride, "cutouts.stride")
        edge = _check_edge(edge)
    elif method == "full":
        size, stride, edge = 0, 0, ""
    else:
        raise ConfigError(
            f"config elodin.cutouts.method: {method!r} has no window grid (one of "
            f"{', '.join(GRID_METHODS)})"
        )
    grid = WindowGrid(method, shapes, size, stride, edge, ts)
    if n == 0:
        return Plan((), np.zeros(0, TILE_DTYPE), None, np.zeros(1, np.int64), grid=grid)
    empty = np.flatnonzero((shapes <= 0).any(axis=1))
    if empty.size:
        i = int(empty[0])
        _fail(f"image has an empty pixel grid ({shapes[i, 1]}x{shapes[i, 0]})", i)
    if method == "sliding" and edge != "pad":
        small = np.flatnonzero((shapes < size).any(axis=1))
        if small.size:  # the first such image in the input's order, as one by one would
            i = int(small[0])
            try:
                _check_fits(
                    tuple(shapes[i]), size=size, stride=stride, edge=edge, name=ids[i] or f"#{i}"
                )
            except InputError as e:
                _fail(str(e), i)
    unique, first, inverse = np.unique(shapes, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    layouts = []
    for u, (ny, nx) in enumerate(unique):
        if method == "sliding":
            i = int(first[u])
            # Logs what the policy leaves uncovered, once per shape (all fit by now).
            _check_fits(
                (int(ny), int(nx)), size=size, stride=stride, edge=edge, name=ids[i] or f"#{i}"
            )
            tiles, tile_start, _ = _sliding_tiles(
                int(ny), int(nx), size=size, stride=stride, edge=edge, ts=ts, image_index=0
            )
        else:
            tiles, tile_start = _full_tile(int(ny), int(nx), ts)
        layouts.append((tiles, np.diff(tile_start)))
    pool_tiles = np.concatenate([t for t, _ in layouts])
    pool_counts = np.concatenate([c for _, c in layouts])
    per_shape = np.array([len(t) for t, _ in layouts], np.int64)
    pool_first = np.r_[0, np.cumsum(per_shape)[:-1]]
    n_tiles = per_shape[inverse]  # tiles of each image
    image_first = np.cumsum(n_tiles) - n_tiles
    total = int(n_tiles.sum())
    pos = np.arange(total, dtype=np.int64) + np.repeat(pool_first[inverse] - image_first, n_tiles)
    tiles = pool_tiles[pos]
    tiles["image"] = np.repeat(np.arange(n, dtype=np.int32), n_tiles)
    tile_start = np.r_[0, np.cumsum(pool_counts[pos])].astype(np.int64)
    return Plan(ids, tiles, None, tile_start, grid=grid)


def _full_tile(ny: int, nx: int, ts: int) -> tuple[np.ndarray, np.ndarray]:
    """The one tile a full-frame window has: the one holding its owner pixel."""
    tiles = np.zeros(1, TILE_DTYPE)
    py, px = min(ny // 2, ny - 1), min(nx // 2, nx - 1)
    ty0, tx0 = (py // ts) * ts, (px // ts) * ts
    tiles["ty0"], tiles["ty1"] = ty0, min(ty0 + ts, ny)
    tiles["tx0"], tiles["tx1"] = tx0, min(tx0 + ts, nx)
    tiles["ry0"], tiles["ry1"], tiles["rx0"], tiles["rx1"] = 0, ny, 0, nx
    return tiles, np.array([0, 1], np.int64)


def _fail(message: str, index: int):
    raise ImageInputError(message, image_index=index)
