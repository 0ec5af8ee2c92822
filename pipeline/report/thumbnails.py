"""Thumbnails and downsampled views, read back lazily from the source images.

The store keeps no pixels. A cutout's window is rebuilt from its row's coordinates
(``x0 = round(x - (width - 1) / 2)``, the inverse of the centre convention in ``tiling.py``),
read from the image the store recorded (its record in the images table, :meth:`Store.images`) and stretched
with the store's own preprocessing config, so a thumbnail shows what the model saw.

Reads stay small and few: windows are grouped by image, then into row bands whose neighbours
are read together when that costs less than reading them apart (:func:`plan_reads`).
Downsampled views of whole images are built tile by tile (block means for small factors, one
row per output row for large ones), never holding the full-resolution image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import InputError, StoreError
from ..sources import ImageSource
from ..store import Store

__all__ = [
    "ThumbnailReader",
    "downsample_factor",
    "downsampled_image",
    "plan_reads",
    "read_windows",
    "to_uint8",
    "window_boxes",
]

logger = logging.getLogger(__name__)

# What a row of a partial-width read costs beyond its pixels, in pixels: local FITS sections
# narrower than the image are read row by row, one astropy call each (measured here: ~0.1-0.2
# ms a row; a 32 x 32 section ~3 ms, while 32 full 8192-pixel rows, one contiguous read, take
# ~0.4 ms). Zarr and tile-compressed files pay per chunk instead, which merging neighbours
# within a band also saves.
ROW_COST = 32768
# The largest single read (pixels per band): bounds memory whatever the windows.
MAX_READ_PIXELS = 1 << 22


def window_boxes(x, y, width, height) -> np.ndarray:
    """Integer windows ``(n, 4)`` = ``x0, y0, w, h`` from stored centres and sizes.

    The store's centre is ``x = x0 + (w - 1) / 2`` (tiling.py), so ``x0`` is recovered exactly.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(width, dtype=np.int64)
    h = np.asarray(height, dtype=np.int64)
    # Empty slots have NaN centres; they get a harmless zero box.
    x0 = np.rint(np.nan_to_num(x - (w - 1) / 2.0)).astype(np.int64)
    y0 = np.rint(np.nan_to_num(y - (h - 1) / 2.0)).astype(np.int64)
    return np.stack([x0, y0, w, h], axis=1).reshape(-1, 4)


def _paste(out: np.ndarray, data: np.ndarray, box: Sequence[int], win: Sequence[int]) -> None:
    """Copy the part of ``win`` (x0, y0, w, h) that lies in ``data`` (read at ``box`` =
    y0, y1, x0, x1) into ``out`` (bands, h, w)."""
    by0, by1, bx0, bx1 = box
    x0, y0, w, h = (int(v) for v in win)
    ys, ye = max(y0, by0), min(y0 + h, by1)
    xs, xe = max(x0, bx0), min(x0 + w, bx1)
    if ye > ys and xe > xs:
        out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = data[
            :, ys - by0 : ye - by0, xs - bx0 : xe - bx0
        ]


def plan_reads(
    boxes: np.ndarray,
    *,
    width: int | None = None,
    row_cost: float = ROW_COST,
    band: int | None = None,
    max_pixels: int = MAX_READ_PIXELS,
) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Group boxes ``(y0, y1, x0, x1)`` (inside the image, non-empty) into reads.

    Returns ``[(read_box, indices)]`` with every box inside its read box, each index once.
    A read of ``h`` rows and ``w`` columns is costed ``h * (row_cost + w)`` pixels, or ``h * w``
    when it spans the image's whole ``width`` (one contiguous read of a row-major file): FITS
    sections narrower than the image are read row by row, a call each, so reading the windows of
    a row band together is far cheaper than one read per window, while a wide gap between two
    windows costs more than a second read. Windows are cut into bands of ``band`` rows (4x the
    tallest window by default) by their top row; within a band they are merged left to right
    while merging costs less than reading apart, and the whole band is read full width when
    that is cheaper still. No read exceeds ``max_pixels``.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if not len(boxes):
        return []
    band = band or int(4 * max(1, (boxes[:, 1] - boxes[:, 0]).max()))

    def cost(y0, y1, x0, x1) -> float:
        h, w = y1 - y0, x1 - x0
        return h * w if width is not None and w >= width else h * (row_cost + w)

    order = np.lexsort((boxes[:, 2], boxes[:, 0] // band))
    keys = boxes[order, 0] // band
    reads = []
    for group in np.split(order, np.flatnonzero(np.diff(keys)) + 1):
        runs: list[tuple[list[int], tuple[int, int, int, int]]] = []
        run, box = [int(group[0])], tuple(int(v) for v in boxes[group[0]])
        for i in group[1:]:
            b = tuple(int(v) for v in boxes[i])
            m = (min(box[0], b[0]), max(box[1], b[1]), min(box[2], b[2]), max(box[3], b[3]))
            small = (m[1] - m[0]) * (m[3] - m[2]) <= max_pixels
            if small and cost(*m) <= cost(*box) + cost(*b):
                run.append(int(i))
                box = m
            else:
                runs.append((run, box))
                run, box = [int(i)], b
        runs.append((run, box))
        if width is not None and len(runs) > 1:
            g = boxes[group]
            full = (int(g[:, 0].min()), int(g[:, 1].max()), 0, int(width))
            area = (full[1] - full[0]) * width
            if area <= max_pixels and cost(*full) < sum(cost(*b) for _, b in runs):
                runs = [([int(i) for i in group], full)]
        reads.extend((b, np.array(r)) for r, b in runs)
    return reads


def read_windows(
    source: ImageSource, windows: np.ndarray, *, fill: float = 0.0
) -> list[np.ndarray]:
    """Raw pixels of each window ``(x0, y0, w, h)``, float32 ``(bands, h, w)``, in input order.

    Parts of a window outside the image are ``fill`` (the store's ``cutouts.fill``, what the
    model saw under the ``pad`` edge policy). Only the windows' neighbourhoods are read, in the
    reads :func:`plan_reads` groups them into.
    """
    windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    ny, nx = source.shape
    out = [np.full((source.n_bands, int(h), int(w)), fill, np.float32) for _, _, w, h in windows]
    if not len(windows):
        return out
    # Clip to the image: pad-policy windows may reach past its edges.
    y0 = np.clip(windows[:, 1], 0, ny)
    y1 = np.clip(windows[:, 1] + windows[:, 3], 0, ny)
    x0 = np.clip(windows[:, 0], 0, nx)
    x1 = np.clip(windows[:, 0] + windows[:, 2], 0, nx)
    inside = np.flatnonzero((y1 > y0) & (x1 > x0))
    boxes = np.stack([y0, y1, x0, x1], axis=1)[inside]
    for box, members in plan_reads(boxes, width=nx):
        data = source.read(*box)
        for i in inside[members]:
            _paste(out[i], data, box, windows[i])
    return out


class ThumbnailReader:
    """Reads and stretches the windows of store rows, the way the fingerprint stage did.

    Parameters
    ----------
    store : Store
        The store: its images table says where each image is (sources are made from their
        records on first use), its attrs how cutouts were stretched (``preprocess``,
        ``cutouts``).
    """

    def __init__(self, store: Store) -> None:
        attrs = store.attrs
        self.sources: Mapping[str, ImageSource] = store.images().sources()
        self.preprocess = dict(attrs.get("preprocess") or {})
        self.fill = float((attrs.get("cutouts") or {}).get("fill") or 0.0)
        self._limits: dict[str, np.ndarray | None] = {}

    def source(self, image: str) -> ImageSource:
        try:
            return self.sources[image]
        except KeyError:
            raise StoreError(
                f"store records no source for image {image!r}; it cannot be read back for thumbnails"
            ) from None

    def _reading(self, image: str, fn, *args, **kwargs):
        """Call ``fn``; a source that cannot be read any more says that the report needs it."""
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            raise InputError(
                f"{e} (image {image!r}: the report reads its thumbnails back from the images "
                "the store was made from; put the file back where the store recorded it)"
            ) from e

    def downsampled(self, image: str, factor: int) -> np.ndarray:
        """:func:`downsampled_image` of a recorded image."""
        return self._reading(image, downsampled_image, self.source(image), factor)

    def image_limits(self, image: str) -> np.ndarray | None:
        """Per-image stretch limits (``scope: image``), measured once per image."""
        if image not in self._limits:
            from ..preprocess import image_limits_for, preprocess_settings

            settings = preprocess_settings(self.preprocess)
            self._limits[image] = (
                self._reading(image, image_limits_for, self.source(image), self.preprocess)
                if settings["scope"] == "image"
                else None
            )
        return self._limits[image]

    def stretch(self, raw: np.ndarray, image: str) -> np.ndarray:
        """Stretch raw ``(n, bands, h, w)`` cutouts of one image to RGB ``(n, 3, h, w)`` in [0, 1]."""
        from ..preprocess import stretch_cutouts

        rgb, _ = stretch_cutouts(
            raw, config=self.preprocess, image_limits=self.image_limits(image), image=image
        )
        return rgb

    def read(self, images: Sequence[str], windows: np.ndarray) -> list[np.ndarray]:
        """Stretched RGB ``(3, h, w)`` float32 of each window, in input order."""
        images = np.asarray([str(i) for i in images], dtype=object)
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        out: list[np.ndarray | None] = [None] * len(windows)
        for image in dict.fromkeys(images):
            idx = np.flatnonzero(images == image)
            raw = self._reading(
                image, read_windows, self.source(image), windows[idx], fill=self.fill
            )
            # One stretch call per window shape (blob windows vary in size).
            shapes: dict[tuple[int, ...], list[int]] = {}
            for k, r in enumerate(raw):
                shapes.setdefault(r.shape, []).append(k)
            for ks in shapes.values():
                rgb = self.stretch(np.stack([raw[k] for k in ks]), image)
                for j, k in enumerate(ks):
                    out[idx[k]] = rgb[j]
        return out  # type: ignore[return-value]

    def thumbnails(
        self, images: Sequence[str], windows: np.ndarray, *, size: int, chunk: int = 1024
    ) -> np.ndarray:
        """Display thumbnails: uint8 ``(n, size, size, 3)``, each window resized to ``size``.

        Windows are handled ``chunk`` at a time in image and row order (reads stay grouped),
        so the float pixels in memory follow the chunk, not the number of thumbnails.
        """
        from PIL import Image

        images = np.asarray([str(i) for i in images], dtype=object)
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        out = np.zeros((len(windows), size, size, 3), np.uint8)
        if not len(windows):
            return out
        _, image_code = np.unique(images, return_inverse=True)
        order = np.lexsort((windows[:, 0], windows[:, 1], image_code))
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            for i, rgb in zip(idx, self.read(images[idx], windows[idx]), strict=True):
                img = Image.fromarray(to_uint8(rgb))
                if img.size != (size, size):
                    big = img.width > size
                    img = img.resize(
                        (size, size),
                        Image.Resampling.LANCZOS if big else Image.Resampling.NEAREST,
                    )
                out[i] = np.asarray(img)
        return out


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """``(3, h, w)`` floats in [0, 1] to ``(h, w, 3)`` uint8."""
    return (np.clip(np.moveaxis(rgb, 0, -1), 0, 1) * 255 + 0.5).astype(np.uint8)


def downsample_factor(shape: Sequence[int], max_side: int) -> int:
    """Smallest integer factor that brings the longer side of ``shape`` to ``max_side`` or less."""
    return max(1, math.ceil(max(int(shape[0]), int(shape[1])) / max(1, int(max_side))))


def downsampled_image(
    source: ImageSource, factor: int, *, tile: int = 2048, mean_up_to: int = 8
) -> np.ndarray:
    """Raw ``(bands, ceil(ny / factor), ceil(nx / factor))`` view of a whole image.

    Memory follows the tile, not the mosaic. For ``factor <= mean_up_to`` the image is read
    tile by tile and each output pixel is the mean of its ``factor x factor`` block (NaNs
    ignored); for larger factors each output row reads one source row (in strips of at most
    ``tile**2`` pixels) and keeps the centre pixel of each block, so the bytes read shrink with
    the factor.
    """
    ny, nx = source.shape
    f = max(1, int(factor))
    oy, ox = -(-ny // f), -(-nx // f)
    out = np.full((source.n_bands, oy, ox), np.nan, np.float32)
    if f > mean_up_to:
        # The centre pixel of each block: one source row per output row, read in strips of at
        # most tile^2 pixels, so the bytes read shrink with the factor.
        width = max(f, tile * tile - (tile * tile) % f)
        for oy_i in range(oy):
            y = min(ny - 1, oy_i * f + f // 2)
            for sx in range(0, nx, width):
                sx1 = min(nx, sx + width)
                row = source.read(y, y + 1, sx, sx1)[:, 0]
                n = -(-(sx1 - sx) // f)
                xs = np.minimum(np.arange(n) * f + f // 2, sx1 - sx - 1)
                out[:, oy_i, sx // f : sx // f + n] = row[:, xs]
        return out
    step = max(f, tile - tile % f)  # tiles aligned on the factor
    for ty in range(0, ny, step):
        for tx in range(0, nx, step):
            y1, x1 = min(ny, ty + step), min(nx, tx + step)
            data = source.read(ty, y1, tx, x1)
            hy, hx = -(-(y1 - ty) // f), -(-(x1 - tx) // f)
            if data.shape[1:] != (hy * f, hx * f) or not np.isfinite(data).all():
                padded = np.full((source.n_bands, hy * f, hx * f), np.nan, np.float32)
                padded[:, : y1 - ty, : x1 - tx] = data
                with _quiet_nanmean():
                    mean = np.nanmean(padded.reshape(source.n_bands, hy, f, hx, f), axis=(2, 4))
            else:  # the common case, several times faster than nanmean
                mean = data.reshape(source.n_bands, hy, f, hx, f).mean(axis=(2, 4))
            out[:, ty // f : ty // f + hy, tx // f : tx // f + hx] = mean
    return out


class _quiet_nanmean:
    """Silence numpy's 'Mean of empty slice' for blocks that are all NaN."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
