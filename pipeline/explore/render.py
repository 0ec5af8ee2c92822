"""The map of every valid row, rendered by datashader for the current viewport.

Each pan or zoom renders the points inside the view into an image of the map's screen size
(datashader aggregates 10^6 points in tens of milliseconds), so the browser only ever gets one
RGBA image, whatever the number of cutouts. Colours: point density, the cluster (the report's
colours), the outlier score or any other numeric per-cutout variable (mean per pixel), the
image or the label.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from ..report.figures import cluster_colours, hex_colour

__all__ = ["MapRenderer", "Rendered"]

logger = logging.getLogger(__name__)

# Distinct colours for images (cycled when there are more) and labels.
_IMAGE_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17604c",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
]  # fmt: skip
_LABEL_COLOURS = {"none": "#9a9a9a", "not_interesting": "#3b6fd6", "interesting": "#f0a020"}


def _rgba(hex_colour: str) -> int:
    """``#rrggbb`` as the little-endian RGBA uint32 of Bokeh's ``image_rgba`` (opaque)."""
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return r | g << 8 | b << 16 | 255 << 24


@dataclass
class Rendered:
    """One rendered view: the RGBA image (rows bottom to top, as Bokeh's ``image_rgba``
    draws them) and the data box it covers."""

    image: np.ndarray  # uint32 (height, width)
    x0: float
    y0: float
    dw: float
    dh: float
    in_view: int  # valid rows inside the box


class MapRenderer:
    """Renders ``xy`` (per valid row) coloured by one of the explorer's columns.

    Parameters
    ----------
    explorer : pipeline.explore.data.Explorer
    width, height : int
        Image size in pixels (the map's frame).
    """

    def __init__(self, explorer, *, width: int, height: int) -> None:
        import pandas as pd

        self.explorer = explorer
        self.width = width
        self.height = height
        # The frame datashader reads; columns for colours are added when first asked for
        # (categorical codes: a byte or four a row, not strings).
        self.frame = pd.DataFrame({"x": explorer.xy[:, 0], "y": explorer.xy[:, 1]}, copy=False)
        self._legend: dict[str, dict[str, str]] = {}
        self._label_version = -1
        # Sessions render on the IO loop, GET /api/map.png on a worker thread: the frame's
        # colour columns are added under this lock.
        self._lock = threading.Lock()

    def legend(self, by: str) -> dict[str, str]:
        """Category -> colour of the last render coloured by ``by`` (empty for numeric)."""
        return self._legend.get(by, {})

    def _column(self, by: str) -> tuple[str, list[str] | None]:
        """Name of the frame column for ``by`` and its colour key (None: numeric)."""
        import pandas as pd

        ex = self.explorer
        if by == "label" and self._label_version != ex.labels.version and "label" in self.frame:
            del self.frame["label"], self.frame["label_code"]  # labels changed: rebuild
        if by in self.frame:
            return by, (list(self._legend[by].values()) if by in self._legend else None)
        if by == "cluster":
            codes = ex.column("cluster")
            ids = sorted(int(c) for c in np.unique(codes))
            colours = cluster_colours(ids)
            names = ["noise" if c < 0 else f"cluster {c}" for c in ids]
            lookup = np.searchsorted(ids, codes)
            self.frame[by] = pd.Categorical.from_codes(lookup.astype(np.int32), names)
            self.frame[f"{by}_code"] = lookup.astype(np.float32)
            self._legend[by] = {n: hex_colour(colours[c]) for n, c in zip(names, ids, strict=True)}
        elif by == "image":
            n = min(len(ex.image_names), len(_IMAGE_COLOURS))
            names = (
                ex.image_names[:n]
                if len(ex.image_names) <= n
                else [f"images {i} mod {n}" for i in range(n)]
            )
            self.frame[by] = pd.Categorical.from_codes((ex.image % n).astype(np.int32), names)
            self.frame[f"{by}_code"] = (ex.image % n).astype(np.float32)
            self._legend[by] = dict(zip(names, _IMAGE_COLOURS[:n], strict=True))
        elif by == "label":
            names = list(_LABEL_COLOURS)  # none, not_interesting, interesting = codes -1, 0, 1
            self.frame[by] = pd.Categorical.from_codes(ex.labels.values.astype(np.int32) + 1, names)
            self.frame[f"{by}_code"] = ex.labels.values.astype(np.float32) + 1
            self._legend[by] = dict(_LABEL_COLOURS)
            self._label_version = ex.labels.version
        else:
            self.frame[by] = ex.column(by)
            return by, None
        return by, list(self._legend[by].values())

    def render(
        self, by: str, x_range: tuple[float, float], y_range: tuple[float, float]
    ) -> Rendered:
        """The view ``x_range`` x ``y_range`` coloured by ``by`` (``density``, ``cluster``,
        ``outlier_score``, ``image``, ``label`` or any numeric per-cutout variable: its mean
        per pixel)."""
        with self._lock:
            return self._render(by, x_range, y_range)

    def png(self, by: str, x_range: tuple[float, float], y_range: tuple[float, float]) -> bytes:
        """:meth:`render` as PNG bytes (top row first, as images are read)."""
        import io

        from PIL import Image

        r = self.render(by, x_range, y_range)
        rgba = np.ascontiguousarray(r.image[::-1]).view(np.uint8).reshape(*r.image.shape, 4)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
        return buf.getvalue()

    def _render(self, by, x_range, y_range) -> Rendered:
        import datashader as ds
        import datashader.transfer_functions as tf

        x0, x1 = sorted(float(v) for v in x_range)
        y0, y1 = sorted(float(v) for v in y_range)
        if not x1 > x0:
            x1 = x0 + 1e-9
        if not y1 > y0:
            y1 = y0 + 1e-9
        canvas = ds.Canvas(
            plot_width=self.width, plot_height=self.height, x_range=(x0, x1), y_range=(y0, y1)
        )
        count = int(np.count_nonzero(self.in_view(x0, x1, y0, y1)))
        # Lone points would be single pixels: grown while the view is sparse.
        sparse = count < self.width * self.height // 50
        if by == "density":
            agg = canvas.points(self.frame, "x", "y", ds.count())
            img = tf.shade(agg, cmap=["#c6dbef", "#08306b"], how="log", min_alpha=90)
        else:
            column, key = self._column(by)
            if key is None:
                agg = canvas.points(self.frame, "x", "y", ds.mean(column))
                img = tf.shade(agg, cmap=["#2c7bb6", "#ffffbf", "#d7191c"], how="linear")
            else:
                # One category per pixel (the largest code there), looked up in the colour key:
                # datashader's blended categorical shading costs (height x width x categories)
                # float arrays, seconds and hundreds of MB per render for 20 clusters.
                agg = canvas.points(self.frame, "x", "y", ds.max(f"{column}_code"))
                codes = np.nan_to_num(np.asarray(agg.data, np.float64), nan=-1).astype(np.int64)
                if sparse:
                    from scipy.ndimage import maximum_filter

                    codes = np.where(codes >= 0, codes, maximum_filter(codes, size=3))
                lut = np.array([_rgba(c) for c in key] + [0], np.uint32)
                return Rendered(lut[codes], x0, y0, x1 - x0, y1 - y0, count)
        if sparse:
            img = tf.spread(img, px=1)
        return Rendered(np.asarray(img.data), x0, y0, x1 - x0, y1 - y0, count)

    def in_view(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        xy = self.explorer.xy
        return (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
