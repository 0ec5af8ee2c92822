"""What the explorer holds in memory, and the queries the page and the API share.

Per valid row the server keeps its map position (two float32), cluster, outlier score, image
number and label: about 30 bytes a row, 30 MB for 10^6 rows. Nothing else is loaded: cutouts
are read from their source images when asked for (:class:`ThumbnailCache`, a bounded LRU of
PNGs), neighbours and rankings stream the store block by block.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import config
from ..analysis import _base
from ..errors import ConfigError, StoreError
from ..store import Store

__all__ = ["Explorer", "RowError", "ThumbnailCache", "parse_row"]

logger = logging.getLogger(__name__)

# Variables the map can be coloured by when the store has them (categorical ones first).
CATEGORICAL = ("cluster", "image", "label")
NUMERIC = ("outlier_score",)


class RowError(ConfigError):
    """A row asked for that is not a valid cutout (HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_row(text: Any, n_rows: int) -> int:
    """A store row from request text: decimal digits only, inside the store.

    Anything else (signs, spaces, dots, slashes, other numerals) is refused before it is used
    for anything, so no request text ever reaches a file path or an array index unchecked.
    """
    s = str(text)
    if not (0 < len(s) <= 12 and s.isascii() and s.isdigit()):
        raise RowError(f"row {s[:40]!r}: expected a row number (0..{n_rows - 1})")
    row = int(s)
    if row >= n_rows:
        raise RowError(f"row {row} is out of range (the store has rows 0..{n_rows - 1})", 404)
    return row


class ThumbnailCache:
    """PNGs of store rows, read on demand and stretched as the fingerprint stage did
    (:class:`pipeline.report.thumbnails.ThumbnailReader`), least recently used dropped first."""

    def __init__(self, store, *, size: int, capacity: int) -> None:
        from ..report.thumbnails import ThumbnailReader

        self.reader = ThumbnailReader(store)
        self.size = size
        self.capacity = capacity
        self._png: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        # One read at a time: the reader caches per-image stretch limits and the sources keep
        # per-thread handles; cutouts are small, so serial reads cost little.
        self._lock = threading.Lock()

    def get(self, row: int, image: str, window: Callable[[], np.ndarray]) -> bytes:
        """The PNG of ``row``; ``window()`` gives its ``(x0, y0, w, h)`` when it must be read."""
        from ..report.interactive import png_bytes

        with self._lock:
            png = self._png.get(row)
            if png is not None:
                self._png.move_to_end(row)
                return png
            thumb = self.reader.thumbnails([image], np.asarray(window())[None], size=self.size)[0]
            png = png_bytes(thumb, optimize=False)
            self._png[row] = png
            while len(self._png) > self.capacity:
                self._png.popitem(last=False)
            return png

    def __len__(self) -> int:
        return len(self._png)


class Explorer:
    """The store as the explorer sees it: the map and a few columns of every valid row.

    Parameters
    ----------
    store : path
        A fingerprint store with an ``embedding`` (or at least ``pca``).
    read_only : bool
        Refuse labels even when the store is writable.
    """

    def __init__(self, store: str | os.PathLike, *, read_only: bool = False) -> None:
        from .labels import Labels

        st = Store.open(store)
        self.store = st
        self.path = st.path
        self.n_rows = st.n_rows
        present = _base.names(st)
        self.variables = sorted(present)
        self.space = "embedding" if "embedding" in present else "pca"
        if self.space not in present:
            raise StoreError(
                f"{st.path}: no `embedding` (nor `pca`) to map; run `elodin embed {st.path}` first"
            )
        block = _base.block_rows(st, None)
        rows, xy, image = [], [], []
        cluster = [] if "cluster" in present else None
        score = [] if "outlier_score" in present else None
        image_ids: dict[str, int] = {}
        for start in range(0, st.n_rows, block):
            stop = min(st.n_rows, start + block)
            valid = np.asarray(st.array("valid")[start:stop], bool)
            if not valid.any():
                continue
            rows.append(np.flatnonzero(valid) + start)
            xy.append(np.asarray(st.array(self.space)[start:stop, :2], np.float32)[valid])
            names, codes = np.unique(
                _base.to_str(st.array("image")[start:stop])[valid], return_inverse=True
            )
            lookup = np.array([image_ids.setdefault(str(n), len(image_ids)) for n in names])
            image.append(lookup[codes].astype(np.int32))
            if cluster is not None:
                cluster.append(np.asarray(st.array("cluster")[start:stop], np.int32)[valid])
            if score is not None:
                score.append(np.asarray(st.array("outlier_score")[start:stop], np.float32)[valid])
        if not rows:
            raise StoreError(f"{st.path}: no valid rows to explore; fingerprint some images first")
        self.rows = np.concatenate(rows).astype(np.int64)
        self.xy = np.concatenate(xy)
        self.image = np.concatenate(image)
        self.image_names = list(image_ids)
        self.cluster = np.concatenate(cluster) if cluster is not None else None
        self.outlier_score = np.concatenate(score) if score is not None else None
        finite = np.isfinite(self.xy).all(axis=1)
        if not finite.any():
            raise StoreError(f"{st.path}: `{self.space}` holds no finite positions")
        self.extent = (
            float(self.xy[finite, 0].min()),
            float(self.xy[finite, 0].max()),
            float(self.xy[finite, 1].min()),
            float(self.xy[finite, 1].max()),
        )
        self._outlier_order: np.ndarray | None = None
        self._numeric: list[str] | None = None
        self._columns: dict[str, np.ndarray] = {}
        # Opened once: each lookup through the group would read the array's metadata again.
        self._coords = {n: st.array(n) for n in ("x", "y", "width", "height", "ra", "dec")}
        self.labels = Labels(st, self.rows, read_only=read_only)
        self.thumbs = ThumbnailCache(
            st,
            size=config.get_int("explore.thumb-px", minimum=8),
            capacity=config.get_int("explore.thumbnail-cache", minimum=1),
        )
        logger.info("%s: %d valid rows on the %s map", st.path, len(self.rows), self.space)

    # -- rows --------------------------------------------------------------------------
    @property
    def n_valid(self) -> int:
        return len(self.rows)

    def position(self, row: int) -> int:
        """Index of store row ``row`` among the valid rows; :class:`RowError` (404) if empty."""
        i = int(np.searchsorted(self.rows, row))
        if i >= len(self.rows) or self.rows[i] != row:
            raise RowError(f"row {row} is an empty slot (no cutout there)", 404)
        return i

    def row(self, text: Any) -> int:
        """A valid store row from request text (see :func:`parse_row`)."""
        row = parse_row(text, self.n_rows)
        self.position(row)
        return row

    def info(self, row: int) -> dict[str, Any]:
        """What the page shows about one row."""
        i = self.position(row)
        c = self._coords
        out: dict[str, Any] = {
            "row": row,
            "image": self.image_names[int(self.image[i])],
            "x": float(c["x"][row]),
            "y": float(c["y"][row]),
            "width": int(c["width"][row]),
            "height": int(c["height"][row]),
            "ra": _finite(c["ra"][row]),
            "dec": _finite(c["dec"][row]),
            "map": [_finite(v) for v in self.xy[i]],
            "label": self.labels.get(row),
        }
        if self.cluster is not None:
            out["cluster"] = int(self.cluster[i])
        if self.outlier_score is not None:
            out["outlier_score"] = _finite(self.outlier_score[i])
        return out

    def cutout_png(self, row: int) -> bytes:
        """The row's cutout, read from its source image and stretched as fingerprinted."""
        from ..report.thumbnails import window_boxes

        i = self.position(row)
        c = self._coords

        def window() -> np.ndarray:
            return window_boxes(
                [c["x"][row]], [c["y"][row]], [c["width"][row]], [c["height"][row]]
            )[0]

        return self.thumbs.get(row, self.image_names[int(self.image[i])], window)

    def summary(self) -> dict[str, Any]:
        return {
            "store": self.path,
            "rows": self.n_valid,
            "store_rows": self.n_rows,
            "map": self.space,
            "extent": list(self.extent),
            "images": len(self.image_names),
            "variables": self.variables,
            "colour_by": self.colour_options(),
            "labels": self.labels.counts(),
            "writable": self.labels.writable()[0],
        }

    # -- neighbours, outliers, selections ------------------------------------------------
    def similar(self, row: int, n: int) -> list[dict[str, Any]]:
        """The ``n`` nearest rows: the store's k-NN graph (``neighbors``) when it has one and it
        is deep enough, else the exact streamed query of :func:`pipeline.analysis.similar`."""
        self.position(row)
        present = _base.names(self.store)
        if "neighbors" in present:
            nb = self.store.array("neighbors")
            if nb.shape[1] >= n:
                idx = np.asarray(nb[row], np.int64)
                dist = (
                    np.asarray(self.store.array("neighbor_distance")[row], np.float64)
                    if "neighbor_distance" in present
                    else np.full(len(idx), np.nan)
                )
                keep = (idx >= 0) & (idx != row)
                return [
                    {"row": int(r), "distance": _finite(d)}
                    for r, d in zip(idx[keep][:n], dist[keep][:n], strict=True)
                ]
        from ..analysis.similar import similar

        if "pca" not in present:
            raise StoreError(f"{self.path}: no `pca` to compare; run `elodin reduce {self.path}`")
        table = similar(self.store, cutout=row, n=n)
        return [
            {"row": int(r), "distance": _finite(d)}
            for r, d in zip(table["index"], table["distance"], strict=True)
        ]

    def outliers(self, page: int, per_page: int) -> dict[str, Any]:
        """Page ``page`` (from 0) of the valid rows by outlier score, highest first."""
        if self.outlier_score is None:
            raise StoreError(f"{self.path}: no `outlier_score`; run `elodin outliers {self.path}`")
        if self._outlier_order is None:
            s = np.where(np.isfinite(self.outlier_score), self.outlier_score, -np.inf)
            self._outlier_order = np.lexsort((self.rows, -s))
        take = self._outlier_order[page * per_page : (page + 1) * per_page]
        return {
            "page": page,
            "per_page": per_page,
            "total": self.n_valid,
            "results": [
                {"row": int(self.rows[i]), "outlier_score": _finite(self.outlier_score[i])}
                for i in take
            ],
        }

    def in_box(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        """Store rows whose map position lies in the box (edges included), in row order."""
        x, y = self.xy[:, 0], self.xy[:, 1]
        lo_x, hi_x = sorted((x0, x1))
        lo_y, hi_y = sorted((y0, y1))
        m = (x >= lo_x) & (x <= hi_x) & (y >= lo_y) & (y <= hi_y)
        return self.rows[m]

    def nearest(self, px: float, py: float, radius_x: float, radius_y: float) -> int | None:
        """Store row nearest to a map position, measured in units of the two radii (one
        screen pixel radius per axis), None when none is within one radius."""
        with np.errstate(invalid="ignore"):
            d = ((self.xy[:, 0] - px) / radius_x) ** 2 + ((self.xy[:, 1] - py) / radius_y) ** 2
        if not np.isfinite(d).any():
            return None
        i = int(np.nanargmin(d))
        return int(self.rows[i]) if d[i] <= 1.0 else None

    def export(self, rows: Sequence[int], path: str | os.PathLike) -> Any:
        """The selection as a catalog, through :func:`pipeline.analysis.export`."""
        from ..analysis.export import export

        return export(self.store, path, rows=np.asarray(rows, np.int64))

    def in_polygon(self, xs: Sequence[float], ys: Sequence[float]) -> np.ndarray:
        """Store rows whose map position lies inside the polygon (a lasso: vertices in map
        coordinates, closed implicitly; edges included), in row order."""
        from matplotlib.path import Path

        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        if (
            len(xs) != len(ys)
            or len(xs) < 3
            or not (np.isfinite(xs).all() and np.isfinite(ys).all())
        ):
            raise ConfigError("polygon: expected three or more [x, y] vertices, finite numbers")
        lo_x, hi_x, lo_y, hi_y = xs.min(), xs.max(), ys.min(), ys.max()
        inside = self.in_box(lo_x, hi_x, lo_y, hi_y)  # the bounding box first: cheap
        if not len(inside):
            return inside
        at = np.searchsorted(self.rows, inside)
        poly = Path(np.c_[xs, ys])
        # A tiny outward radius counts points on the edge as inside, as the box does.
        eps = 1e-9 * max(hi_x - lo_x, hi_y - lo_y, 1e-300)
        keep = poly.contains_points(
            self.xy[at].astype(np.float64), radius=eps
        ) | poly.contains_points(self.xy[at].astype(np.float64), radius=-eps)
        return inside[keep]

    # -- colours ------------------------------------------------------------------------
    def colour_options(self) -> list[str]:
        """What the map can be coloured by: the density, the categorical columns (cluster,
        image, label) and every numeric per-cutout variable of the store."""
        opts = ["density"]
        if self.cluster is not None:
            opts.append("cluster")
        if self.outlier_score is not None:
            opts.append("outlier_score")
        opts += ["image", "label"]
        return opts + [n for n in self.numeric_variables if n not in opts]

    @property
    def numeric_variables(self) -> list[str]:
        """The store's numeric (or boolean) variables with one value per cutout."""
        if self._numeric is None:
            skip = {"valid", "cluster", "outlier_score", "label", "image"}
            found = []
            for name in self.variables:
                if name in skip or name.startswith("label_log_"):
                    continue
                try:
                    arr = self.store.array(name)
                except KeyError:
                    continue
                dims = tuple(arr.metadata.dimension_names or ())
                if dims == ("cutout",) and np.dtype(arr.dtype).kind in "biuf":
                    found.append(name)
            self._numeric = found
        return self._numeric

    def column(self, name: str) -> np.ndarray:
        """Per valid row: codes of a categorical column (``cluster`` with -1 for noise) or
        the values of a numeric one (any per-cutout variable, read once, block by block)."""
        if name == "cluster" and self.cluster is not None:
            return self.cluster
        if name == "outlier_score" and self.outlier_score is not None:
            return self.outlier_score
        if name == "image":
            return self.image
        if name == "label":
            return self.labels.values
        if isinstance(name, str) and name in self.numeric_variables:
            hit = self._columns.get(name)
            if hit is None:
                arr = self.store.array(name)
                block = _base.block_rows(self.store, None)
                out = np.empty(len(self.rows), np.float32)
                for start in range(0, self.n_rows, block):
                    lo, hi = np.searchsorted(self.rows, [start, start + block])
                    if hi > lo:
                        part = np.asarray(arr[start : start + block], np.float32)
                        out[lo:hi] = part[self.rows[lo:hi] - start]
                hit = self._columns[name] = out
            return hit
        shown = str(name)[:40]
        raise ConfigError(f"cannot colour by {shown!r} (one of {', '.join(self.colour_options())})")


def _finite(value) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None
