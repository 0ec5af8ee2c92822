"""Window geometry: the one home of the pixel-centre convention, read boxes and cutting.

Pure numpy, no files: :mod:`pipeline.tiling` plans windows with it, the fingerprint worker cuts
with it, and everything that reads a store's cutouts back (the pixel baseline, the report, the
explorer) recovers windows from stored centres with it, so all of them agree to the pixel.

Conventions (docs/ARCHITECTURE.md):

- A *window* is an integer box ``(x0, y0, w, h)`` in the image's 0-based pixel grid.
- Its stored centre is ``x = x0 + (w - 1) / 2``, ``y = y0 + (h - 1) / 2`` (astropy's
  pixel-centre convention: an odd window's centre is its middle pixel, an even one's a pixel
  corner). :func:`window_centres` applies it, :func:`windows_from_centres` inverts it exactly.
- A *box* is ``(y0, y1, x0, x1)``, half-open, in the same grid: what a source is asked to read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "clip_boxes",
    "cut_windows",
    "read_box",
    "shift_inside",
    "window_centres",
    "window_radec",
    "windows_from_centres",
]


def window_centres(windows) -> tuple[np.ndarray, np.ndarray]:
    """Stored centres ``x0 + (w - 1) / 2``, ``y0 + (h - 1) / 2`` (float64) of ``(n, 4)`` windows."""
    w = np.asarray(windows).reshape(-1, 4)
    return w[:, 0] + (w[:, 2] - 1) / 2.0, w[:, 1] + (w[:, 3] - 1) / 2.0


def windows_from_centres(x, y, width, height) -> np.ndarray:
    """Integer windows ``(n, 4)`` = ``x0, y0, w, h`` from stored centres and sizes.

    The inverse of :func:`window_centres`: ``x0 = round(x - (w - 1) / 2)``, exact for every
    centre the store holds. Empty slots have NaN centres; they get a harmless ``x0 = y0 = 0``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(width, dtype=np.int64)
    h = np.asarray(height, dtype=np.int64)
    x0 = np.rint(np.nan_to_num(x - (w - 1) / 2.0)).astype(np.int64)
    y0 = np.rint(np.nan_to_num(y - (h - 1) / 2.0)).astype(np.int64)
    return np.stack([x0, y0, w, h], axis=1).reshape(-1, 4)


def read_box(windows: np.ndarray, shape) -> tuple[int, int, int, int]:
    """The pixels a set of windows needs: their bounding box ``(y0, y1, x0, x1)``, clipped to
    the image of ``shape = (ny, nx)`` (parts of windows outside it are filled by
    :func:`cut_windows`). The box may be empty when every window lies outside the image."""
    ny, nx = shape
    windows = np.asarray(windows).reshape(-1, 4)
    x0, y0 = windows[:, 0], windows[:, 1]
    ry0, ry1 = max(0, int(y0.min())), min(ny, int((y0 + windows[:, 3]).max()))
    rx0, rx1 = max(0, int(x0.min())), min(nx, int((x0 + windows[:, 2]).max()))
    return ry0, ry1, rx0, rx1


def clip_boxes(windows, shape) -> np.ndarray:
    """Each window's own box ``(y0, y1, x0, x1)`` clipped to the image, ``(n, 4)`` int64; a
    window wholly outside the image gets an empty box (``y1 <= y0`` or ``x1 <= x0``)."""
    ny, nx = shape
    w = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    y0 = np.clip(w[:, 1], 0, ny)
    y1 = np.clip(w[:, 1] + w[:, 3], 0, ny)
    x0 = np.clip(w[:, 0], 0, nx)
    x1 = np.clip(w[:, 0] + w[:, 2], 0, nx)
    return np.stack([y0, y1, x0, x1], axis=1)


def shift_inside(windows: np.ndarray, shape) -> np.ndarray:
    """Move windows that pass the image edge inward (where they fit), so a source near the
    edge is cut from real pixels: padded cutouts cluster by their padding, not their content.
    A window larger than the image along an axis is left where it is along that axis.

    ``windows`` is ``(N, 4)`` ``x0, y0, w, h``; ``shape`` ends with ``(ny, nx)``."""
    ny, nx = (int(v) for v in tuple(shape)[-2:])
    out = np.array(windows, dtype=np.int64, copy=True).reshape(-1, 4)
    fits_x, fits_y = out[:, 2] <= nx, out[:, 3] <= ny
    out[fits_x, 0] = np.clip(out[fits_x, 0], 0, nx - out[fits_x, 2])
    out[fits_y, 1] = np.clip(out[fits_y, 1], 0, ny - out[fits_y, 3])
    return out


def cut_windows(
    data: np.ndarray, read_box: Sequence[int], windows: np.ndarray, *, fill: float
) -> np.ndarray:
    """Cut ``windows`` (image pixels) out of ``data`` (bands, h, w) read at ``read_box``.

    Returns float32 (n, bands, wh, ww) for windows of one size. Parts of a window outside the
    image (``pad`` edge policy) are filled with ``fill``.
    """
    ry0, rx0 = int(read_box[0]), int(read_box[2])
    bands = data.shape[0]
    w, h = int(windows[0, 2]), int(windows[0, 3])
    lx = windows[:, 0] - rx0
    ly = windows[:, 1] - ry0
    inside = (lx >= 0) & (ly >= 0) & (lx + w <= data.shape[2]) & (ly + h <= data.shape[1])
    out = np.empty((len(windows), bands, h, w), dtype=np.float32)
    if len(windows) == 1 and inside[0]:  # a patch's one window: a plain slice
        out[0] = data[:, ly[0] : ly[0] + h, lx[0] : lx[0] + w]
        return out
    if inside.all():
        # One gather over a strided view instead of a Python loop per window.
        view = np.lib.stride_tricks.sliding_window_view(data, (h, w), axis=(1, 2))
        out[:] = view[:, ly, lx].transpose(1, 0, 2, 3)
        return out
    for i, (x, y) in enumerate(zip(lx, ly, strict=True)):
        out[i] = fill
        ys, xs = max(0, -y), max(0, -x)
        ye, xe = min(h, data.shape[1] - y), min(w, data.shape[2] - x)
        if ye > ys and xe > xs:
            out[i, :, ys:ye, xs:xe] = data[:, y + ys : y + ye, x + xs : x + xe]
    return out


def window_radec(windows, wcs) -> tuple[np.ndarray, np.ndarray]:
    """ICRS RA/Dec in degrees of the windows' stored centres; NaN without a celestial WCS."""
    w = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    if wcs is None or not wcs.has_celestial:
        nan = np.full(w.shape[0], np.nan)
        return nan, nan.copy()
    x, y = window_centres(w)
    sky = wcs.celestial.pixel_to_world(x, y).icrs
    return np.asarray(sky.ra.deg, dtype=np.float64), np.asarray(sky.dec.deg, dtype=np.float64)
