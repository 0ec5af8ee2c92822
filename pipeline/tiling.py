"""Pure planning: tiles over an image and the cutout windows each tile owns.

Nothing here touches pixels or files; everything is vectorised numpy so that a survey of
millions of tiles plans in seconds (``benchmarks/bench_planning.py``).

Conventions (docs/ARCHITECTURE.md):

- A *window* is an integer box ``(x0, y0, w, h)`` in the image's 0-based pixel grid. Its stored
  centre is ``x = x0 + (w - 1) / 2``, ``y = y0 + (h - 1) / 2`` (astropy's pixel-centre
  convention, so an odd window's centre is its middle pixel). The convention, read boxes,
  shifting inside the image and cutting live in :mod:`pipeline.geometry`.
- A window is *owned* by the tile that contains its owner pixel ``(x0 + w // 2, y0 + h // 2)``,
  clipped into the image for windows that pass the edge. Every window has exactly one owner.
- A tile's *read box* is the bounding box of the windows it owns, clipped to the image: it lies
  inside the core grown by the largest window, and for sparse plans (a catalog with one source
  per tile) it is far smaller than the core, so a tile never reads pixels it does not cut.
  Parts of ``pad`` (and catalog) windows outside the image are filled by the reader.

The public entry is :func:`plan_image`; :meth:`Plan.concat` joins the plans of several images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .config import INT_LIMIT
from .errors import ConfigError, InputError
from .geometry import window_centres

if TYPE_CHECKING:
    from .windowgrid import WindowGrid

__all__ = [
    "EDGE_POLICIES",
    "MAX_WINDOW_SIDE",
    "METHODS",
    "TILE_DTYPE",
    "Plan",
    "assign_windows",
    "full_window",
    "owner_pixels",
    "plan_image",
    "sliding_count",
    "sliding_windows",
    "tile_grid",
]

logger = logging.getLogger(__name__)

EDGE_POLICIES = ("shift", "pad", "drop")
METHODS = ("sliding", "full", "blobs", "catalog")
# The largest cutout side in pixels. One window of it is 16 GiB per band as float32, more than
# a worker holds: a larger side is a typo or a catalog size in the wrong unit, refused up front
# rather than found out as an out-of-memory worker (or an int overflow) half way through.
MAX_WINDOW_SIDE = 2**16

TILE_DTYPE = np.dtype(
    [("image", np.int32)]
    + [(name, np.int64) for name in ("ty0", "ty1", "tx0", "tx1", "ry0", "ry1", "rx0", "rx1")]
)
_EMPTY_WINDOWS = np.zeros((0, 4), dtype=np.int64)


# --------------------------------------------------------------------------- checks


def _positive_int(value, key: str, maximum: int = INT_LIMIT) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ConfigError(f"config elodin.{key}: must be a positive integer, got {value!r}")
    if value > maximum:
        raise ConfigError(f"config elodin.{key}: must be at most {maximum}, got {value!r}")
    return int(value)


def _check_edge(edge: str) -> str:
    if edge not in EDGE_POLICIES:
        raise ConfigError(
            f"config elodin.cutouts.edge: {edge!r} is not one of {', '.join(EDGE_POLICIES)}"
        )
    return edge


def _shape(shape) -> tuple[int, int]:
    ny, nx = (int(v) for v in tuple(shape)[-2:])
    if ny <= 0 or nx <= 0:
        raise InputError(f"image has an empty pixel grid ({nx}x{ny})")
    return ny, nx


def _name(image_id: str | None, image_index: int) -> str:
    return image_id if image_id else f"#{image_index}"


def _check_fits(shape, *, size: int, stride: int, edge: str, name: str) -> None:
    """Refuse images no window fits in; log what the policy leaves uncovered."""
    ny, nx = shape
    if edge != "pad" and (nx < size or ny < size):
        raise InputError(
            f"image {name} ({nx}x{ny}) is smaller than one {size}-pixel cutout under edge "
            f"policy {edge!r} (use --size smaller or edge policy 'pad')"
        )
    if stride > size:
        logger.info(
            "image %s: stride %d > size %d leaves gaps of %d pixels between windows",
            name,
            stride,
            size,
            stride - size,
        )
    if edge == "drop":
        left = [
            length
            - ((sliding_count(length, size=size, stride=stride, edge="drop") - 1) * stride + size)
            for length in (nx, ny)
        ]
        if any(left):
            logger.info(
                "image %s: edge policy 'drop' leaves the last %d column(s) and %d row(s) "
                "without a cutout",
                name,
                left[0],
                left[1],
            )


# --------------------------------------------------------------------------- windows


def sliding_count(length: int, *, size: int, stride: int, edge: str) -> int:
    """Number of sliding windows along one axis, in closed form.

    With ``L = length``, ``s = size``, ``t = stride``:

    - ``drop``:  ``(L - s) // t + 1`` (0 when ``L < s``);
    - ``shift``: the ``drop`` count plus one when ``(L - s) % t != 0`` (0 when ``L < s``);
    - ``pad``:   ``min(ceil((L - s) / t) + 1, ceil(L / t))`` with ``L - s`` floored at 0: the
      regular grid up to the first window reaching the edge, never a window wholly outside.
    """
    size = _positive_int(size, "cutouts.size", MAX_WINDOW_SIDE)
    stride = _positive_int(stride, "cutouts.stride")
    edge = _check_edge(edge)
    if edge == "pad":
        return min(-(-max(length - size, 0) // stride) + 1, -(-length // stride))
    if length < size:
        return 0
    n = (length - size) // stride + 1
    return n + int(edge == "shift" and (length - size) % stride != 0)


def _axis_starts(length: int, *, size: int, stride: int, edge: str) -> np.ndarray:
    """Window start positions along one axis, increasing."""
    n = sliding_count(length, size=size, stride=stride, edge=edge)
    starts = np.arange(n, dtype=np.int64) * stride
    if edge == "shift" and n and (length - size) % stride:
        starts[-1] = length - size  # the last window moves inward to end on the edge
    return starts


def sliding_windows(
    shape, *, size: int, stride: int, edge: str = "shift", image_id: str | None = None
) -> np.ndarray:
    """All sliding windows over an image, row-major (by ``y0`` then ``x0``).

    Edge policies, for the last window along an axis when ``size`` / ``stride`` do not divide
    the image:

    - ``shift`` (default): the last window moves inward to end on the edge. Every pixel is
      covered by a window of real data (when ``stride <= size``): nothing is invented (no fill
      values reach the model) and no part of the sky is dropped; the price is one extra
      overlap along the far edges.
    - ``pad``: the regular grid is kept; windows may pass the edge and the reader fills the
      outside with ``cutouts.fill``. An image smaller than one window gets one padded window.
    - ``drop``: partial windows are left out; the uncovered strip is logged.

    Raises
    ------
    InputError
        Under ``shift`` or ``drop`` when the image is smaller than one window.
    ConfigError
        When ``size`` or ``stride`` is not a positive integer, or ``edge`` is unknown.
    """
    ny, nx = _shape(shape)
    size = _positive_int(size, "cutouts.size", MAX_WINDOW_SIDE)
    stride = _positive_int(stride, "cutouts.stride")
    _check_fits((ny, nx), size=size, stride=stride, edge=_check_edge(edge), name=_name(image_id, 0))
    xs = _axis_starts(nx, size=size, stride=stride, edge=edge)
    ys = _axis_starts(ny, size=size, stride=stride, edge=edge)
    out = np.empty((ys.size * xs.size, 4), dtype=np.int64)
    out[:, 0] = np.tile(xs, ys.size)
    out[:, 1] = np.repeat(ys, xs.size)
    out[:, 2:] = size
    return out


def full_window(shape) -> np.ndarray:
    """The one window covering the whole image: ``[[0, 0, nx, ny]]``."""
    ny, nx = _shape(shape)
    return np.array([[0, 0, nx, ny]], dtype=np.int64)


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tiles and the windows each owns, in CSR layout (cheap for 10^6 tiles).

    Attributes
    ----------
    images : tuple of str
        Image ids; ``tiles["image"]`` indexes it. A position may be ``""`` in a one-image plan
        built with ``image_index > 0`` and no id; :meth:`concat` fills positions from each plan.
    tiles : (T,) structured array of :data:`TILE_DTYPE`
        ``image``; core ``ty0, ty1, tx0, tx1``; read box ``ry0, ry1, rx0, rx1`` (clipped to
        the image). Only tiles that own at least one window are listed.
    windows : (N, 4) int64
        ``x0, y0, w, h`` sorted by tile, row-major (``y0`` then ``x0``) within a tile.
    tile_start : (T + 1,) int64
        Tile ``t`` owns ``windows[tile_start[t]:tile_start[t + 1]]``.
    input_index : (N,) int64 or None
        For plans made by :func:`assign_windows`: where each window was in the array given to
        it (the catalog row for catalog plans), so per-window data can follow the sort.
    """

    images: tuple[str, ...]
    tiles: np.ndarray
    windows: np.ndarray | None
    tile_start: np.ndarray
    input_index: np.ndarray | None = None
    grid: WindowGrid | None = None

    def __post_init__(self):
        if self.tiles.dtype != TILE_DTYPE:
            raise ValueError(f"tiles must have dtype {TILE_DTYPE}, got {self.tiles.dtype}")
        if self.tile_start.shape != (self.tiles.size + 1,):
            raise ValueError("tile_start must have one entry more than tiles")
        if (self.windows is None) == (self.grid is None):
            raise ValueError("a plan has either its windows or the grid they follow from")
        if self.windows is not None:
            if self.windows.ndim != 2 or self.windows.shape[1] != 4:
                raise ValueError("windows must be an (N, 4) array")
            if int(self.tile_start[-1]) != self.windows.shape[0]:
                raise ValueError("tile_start[-1] must equal the number of windows")

    @property
    def n_tiles(self) -> int:
        return int(self.tiles.size)

    @property
    def n_windows(self) -> int:
        return int(self.tile_start[-1])

    @property
    def is_formula(self) -> bool:
        """True for a plan whose windows follow from its :attr:`grid` (nothing per window)."""
        return self.grid is not None

    def tile_windows(self, t: int) -> np.ndarray:
        """The ``(n, 4)`` windows tile ``t`` owns (a view of a data plan, derived from the
        grid for a formula plan)."""
        if self.grid is not None:
            return self.grid.tile_windows(self.tiles[t])
        return self.windows[self.tile_start[t] : self.tile_start[t + 1]]

    def window_range(self, start: int, stop: int) -> np.ndarray:
        """Windows ``start:stop`` in plan order, ``(stop - start, 4)``: only the tiles they
        fall in are derived."""
        if self.grid is None:
            return self.windows[start:stop]
        t0 = int(np.searchsorted(self.tile_start, start, side="right")) - 1
        t1 = int(np.searchsorted(self.tile_start, stop, side="left"))
        parts = [_EMPTY_WINDOWS]
        for t in range(max(t0, 0), t1):
            first = int(self.tile_start[t])
            lo, hi = max(start, first), min(stop, int(self.tile_start[t + 1]))
            if hi > lo:
                parts.append(self.tile_windows(t)[lo - first : hi - first])
        return np.concatenate(parts)

    def all_windows(self) -> np.ndarray:
        """Every window, ``(N, 4)``: the plan's own array, or derived (32 bytes per window: for
        small plans and tests; the run derives a unit's windows at a time)."""
        return self.window_range(0, self.n_windows)

    def window_tiles(self) -> np.ndarray:
        """``(N,)`` tile number of every window."""
        return np.repeat(np.arange(self.n_tiles, dtype=np.int64), np.diff(self.tile_start))

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored centres ``x0 + (w - 1) / 2``, ``y0 + (h - 1) / 2`` of all windows."""
        return window_centres(self.all_windows())

    def digest(self) -> str:
        """SHA-256 of what fixes the windows and their order: the windows (data plans) or the
        grid (formula plans), the tiles and the image ids."""
        import hashlib

        h = hashlib.sha256()
        first = self.windows if self.grid is None else self.grid.to_array()
        for arr in (first, self.tile_start, self.tiles):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update("\0".join(self.images).encode())
        return h.hexdigest()

    @classmethod
    def empty(cls, images: tuple[str, ...] = ()) -> Plan:
        return cls(
            tuple(images), np.zeros(0, TILE_DTYPE), _EMPTY_WINDOWS.copy(), np.zeros(1, np.int64)
        )

    @classmethod
    def concat(cls, plans: Sequence[Plan]) -> Plan:
        """Join plans (typically one per image) in the order given.

        ``images`` are merged position by position: each position takes the id that the
        plans give it, and two plans naming the same image number differently is an error.
        """
        plans = list(plans)
        if not plans:
            return cls.empty()
        if any(p.grid is not None for p in plans):
            if len(plans) == 1:
                return plans[0]
            raise ValueError("formula plans are made for all their images at once (plan_grid)")
        images = [""] * max(len(p.images) for p in plans)
        for p in plans:
            for i, name in enumerate(p.images):
                if name and images[i] and images[i] != name:
                    raise ValueError(f"image number {i} is both {images[i]!r} and {name!r}")
                images[i] = images[i] or name
        offsets = np.cumsum([0] + [p.n_windows for p in plans])
        starts = [p.tile_start[:-1] + off for p, off in zip(plans, offsets, strict=False)]
        index = None
        if all(p.input_index is not None for p in plans):
            index = np.concatenate([p.input_index for p in plans])
        return cls(
            tuple(images),
            np.concatenate([p.tiles for p in plans]),
            np.concatenate([p.windows for p in plans]),
            np.concatenate([*starts, [offsets[-1]]]).astype(np.int64),
            index,
        )


def tile_grid(shape, *, tile_size: int) -> np.ndarray:
    """Core boxes of the tile grid, row-major: ``(T, 4)`` int64 ``ty0, ty1, tx0, tx1``.

    Tiles along the far edges are cut short by the image.
    """
    ny, nx = _shape(shape)
    ts = _positive_int(tile_size, "tiling.tile-size")
    y0 = np.arange(0, ny, ts, dtype=np.int64)
    x0 = np.arange(0, nx, ts, dtype=np.int64)
    out = np.empty((y0.size * x0.size, 4), dtype=np.int64)
    out[:, 0] = np.repeat(y0, x0.size)
    out[:, 1] = np.minimum(out[:, 0] + ts, ny)
    out[:, 2] = np.tile(x0, y0.size)
    out[:, 3] = np.minimum(out[:, 2] + ts, nx)
    return out


def owner_pixels(windows: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Owner pixel ``(x0 + w // 2, y0 + h // 2)`` of each window, clipped into the image."""
    ny, nx = _shape(shape)
    w = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    px = np.clip(w[:, 0] + w[:, 2] // 2, 0, nx - 1)
    py = np.clip(w[:, 1] + w[:, 3] // 2, 0, ny - 1)
    return px, py


def _tiles_array(n: int, image_index: int) -> np.ndarray:
    tiles = np.zeros(n, dtype=TILE_DTYPE)
    tiles["image"] = image_index
    return tiles


def _images(image_index: int, image_id: str | None) -> tuple[str, ...]:
    return ("",) * image_index + (image_id or "",)


def _plan_order(windows: np.ndarray, tid: np.ndarray, tile_origin_y, tile_origin_x) -> np.ndarray:
    """Stable permutation sorting windows by tile, then ``y0``, then ``x0``.

    One int64 key and one argsort when the key fits (always for realistic surveys), else lexsort.
    """
    ly = windows[:, 1] - tile_origin_y
    lx = windows[:, 0] - tile_origin_x
    ly = ly - ly.min()
    lx = lx - lx.min()
    span_y, span_x = int(ly.max()) + 1, int(lx.max()) + 1
    if (int(tid.max()) + 1) * span_y * span_x >= 2**62:
        return np.lexsort((lx, ly, tid))
    key = (tid * span_y + ly) * span_x + lx
    if np.all(key[1:] >= key[:-1]):
        return np.arange(key.size, dtype=np.int64)  # already in plan order
    # Unstable sorting is about twice as fast as stable; only runs of equal keys (the same
    # window given twice) need their input order restored, and they are few.
    order = np.argsort(key)
    ordered = key[order]
    equal = ordered[1:] == ordered[:-1]
    if equal.any():
        tied = np.zeros(key.size, dtype=bool)
        tied[1:] |= equal
        tied[:-1] |= equal
        at = np.flatnonzero(tied)
        order[at] = order[at][np.lexsort((order[at], ordered[at]))]
    return order


def assign_windows(
    windows,
    shape,
    *,
    tile_size: int,
    image_index: int = 0,
    image_id: str | None = None,
) -> Plan:
    """Give every window to the tile holding its owner pixel; compute read boxes.

    Tiles that own no window are left out of the plan; every window is kept (windows wholly
    outside the image go to the nearest tile, whose read box is then clipped: the reader pads).
    ``Plan.input_index`` maps each planned window back to its row in ``windows``.
    """
    ny, nx = _shape(shape)
    ts = _positive_int(tile_size, "tiling.tile-size")
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    if windows.shape[0] == 0:
        plan = Plan.empty(_images(image_index, image_id))
        return dataclasses.replace(plan, input_index=np.zeros(0, np.int64))
    if np.any(windows[:, 2:] <= 0):
        raise ValueError("window sides must be positive")
    ntx = -(-nx // ts)
    px, py = owner_pixels(windows, (ny, nx))
    tyi, txi = py // ts, px // ts
    tid = tyi * ntx + txi
    order = _plan_order(windows, tid, tyi * ts, txi * ts)
    windows, tid = np.take(windows, order, axis=0), tid[order]
    first = np.flatnonzero(np.r_[True, tid[1:] != tid[:-1]])
    tile_start = np.r_[first, windows.shape[0]].astype(np.int64)
    utid = tid[first]
    tiles = _tiles_array(utid.size, image_index)
    tiles["ty0"] = (utid // ntx) * ts
    tiles["ty1"] = np.minimum(tiles["ty0"] + ts, ny)
    tiles["tx0"] = (utid % ntx) * ts
    tiles["tx1"] = np.minimum(tiles["tx0"] + ts, nx)
    tiles["rx0"] = np.clip(np.minimum.reduceat(windows[:, 0], first), 0, nx)
    tiles["ry0"] = np.clip(np.minimum.reduceat(windows[:, 1], first), 0, ny)
    tiles["rx1"] = np.clip(np.maximum.reduceat(windows[:, 0] + windows[:, 2], first), 0, nx)
    tiles["ry1"] = np.clip(np.maximum.reduceat(windows[:, 1] + windows[:, 3], first), 0, ny)
    return Plan(_images(image_index, image_id), tiles, windows, tile_start, order)


def _axis_groups(starts: np.ndarray, length: int, size: int, ts: int):
    """Per axis: owner tile of each start (monotone), and count / first start per tile."""
    owner = np.clip(starts + size // 2, 0, length - 1) // ts
    counts = np.bincount(owner, minlength=-(-length // ts))
    first = np.r_[0, np.cumsum(counts)[:-1]]
    return counts, first


def _sliding_tiles(ny, nx, *, size, stride, edge, ts, image_index):
    """Tiles of a sliding plan and their window counts, without the windows.

    Ownership is separable (a window's tile row depends on ``y0`` only, its tile column on
    ``x0`` only) and the starts are sorted, so each tile owns the product of a contiguous run
    of row starts and a contiguous run of column starts. Returns ``tiles``, ``tile_start`` and
    the per-axis starts and groups the windows are filled from.
    """
    xs = _axis_starts(nx, size=size, stride=stride, edge=edge)
    ys = _axis_starts(ny, size=size, stride=stride, edge=edge)
    cnt_x, first_x = _axis_groups(xs, nx, size, ts)
    cnt_y, first_y = _axis_groups(ys, ny, size, ts)
    txs, tys = np.flatnonzero(cnt_x), np.flatnonzero(cnt_y)
    cx, fx = cnt_x[txs], first_x[txs]
    per_tile = np.outer(cnt_y[tys], cx).ravel()
    tile_start = np.r_[0, np.cumsum(per_tile)].astype(np.int64)

    tiles = _tiles_array(per_tile.size, image_index)
    ty0 = np.repeat(tys * ts, txs.size)
    tx0 = np.tile(txs * ts, tys.size)
    tiles["ty0"], tiles["ty1"] = ty0, np.minimum(ty0 + ts, ny)
    tiles["tx0"], tiles["tx1"] = tx0, np.minimum(tx0 + ts, nx)
    tiles["ry0"] = np.repeat(ys[first_y[tys]], txs.size)
    tiles["ry1"] = np.repeat(np.minimum(ys[first_y[tys] + cnt_y[tys] - 1] + size, ny), txs.size)
    tiles["rx0"] = np.tile(xs[fx], tys.size)
    tiles["rx1"] = np.tile(np.minimum(xs[fx + cx - 1] + size, nx), tys.size)
    return tiles, tile_start, (xs, ys, cx, fx, tys, cnt_y, first_y)


def _plan_sliding(ny, nx, *, size, stride, edge, ts, image_index, image_id) -> Plan:
    """Sliding plan built directly in plan order, one vectorised step per tile row: no sort,
    no per-window Python loop."""
    tiles, tile_start, (xs, ys, cx, fx, tys, cnt_y, first_y) = _sliding_tiles(
        ny, nx, size=size, stride=stride, edge=edge, ts=ts, image_index=image_index
    )
    windows = np.empty((int(tile_start[-1]), 4), dtype=np.int64)
    windows[:, 2:] = size
    layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    offset = 0
    for ty in tys:
        band_ys = ys[first_y[ty] : first_y[ty] + cnt_y[ty]]
        m = band_ys.size
        if m not in layouts:  # bands of equal height share one layout
            layouts[m] = _band_layout(xs, cx, fx, m)
        band_x, band_row = layouts[m]
        band = windows[offset : offset + band_x.size]
        band[:, 0] = band_x
        band[:, 1] = band_ys[band_row]
        offset += band_x.size
    return Plan(_images(image_index, image_id), tiles, windows, tile_start)


def _band_layout(xs: np.ndarray, cx: np.ndarray, fx: np.ndarray, m: int):
    """For a band of ``m`` window rows: ``x0`` and row number of each window in plan order.

    Window (row, j) goes to (first start of its tile) * m + row * (starts in its tile) +
    (rank of j in its tile): tile-major, then row-major within the tile.
    """
    tile_of_x = np.repeat(np.arange(cx.size), cx)
    rank_x = np.arange(xs.size) - fx[tile_of_x]
    pos = (fx[tile_of_x] * m + rank_x)[None, :] + np.arange(m)[:, None] * cx[tile_of_x][None, :]
    band_x = np.empty(m * xs.size, dtype=np.int64)
    band_row = np.empty(m * xs.size, dtype=np.int64)
    band_x[pos.ravel()] = np.tile(xs, m)
    band_row[pos.ravel()] = np.repeat(np.arange(m), xs.size)
    return band_x, band_row


def plan_image(
    shape,
    *,
    image_index: int = 0,
    image_id: str | None = None,
    method: str,
    size: int | None = None,
    stride: int | None = None,
    edge: str = "shift",
    tile_size: int,
    windows: np.ndarray | None = None,
) -> Plan:
    """Plan one image: its tiles and the windows each owns.

    ``method`` is ``sliding`` (``size``, ``stride`` (default ``size``), ``edge``), ``full``
    (one window, the whole image) or ``blobs`` / ``catalog`` (``windows`` given, from
    :mod:`pipeline.detect` or :mod:`pipeline.catalog`).
    """
    ny, nx = _shape(shape)
    ts = _positive_int(tile_size, "tiling.tile-size")
    if method == "sliding":
        size = _positive_int(size, "cutouts.size", MAX_WINDOW_SIDE)
        stride = _positive_int(size if stride is None else stride, "cutouts.stride")
        _check_fits(
            (ny, nx),
            size=size,
            stride=stride,
            edge=_check_edge(edge),
            name=_name(image_id, image_index),
        )
        return _plan_sliding(
            ny,
            nx,
            size=size,
            stride=stride,
            edge=edge,
            ts=ts,
            image_index=image_index,
            image_id=image_id,
        )
    if method == "full":
        windows = full_window((ny, nx))
    elif method in METHODS:
        if windows is None:
            raise ValueError(f"method {method!r} needs the windows (from detection or a catalog)")
    else:
        raise ConfigError(
            f"config elodin.cutouts.method: {method!r} is not one of {', '.join(METHODS)}"
        )
    return assign_windows(
        windows, (ny, nx), tile_size=ts, image_index=image_index, image_id=image_id
    )
