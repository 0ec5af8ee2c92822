"""Thumbnails and downsampled views, read back lazily from the source images.

The store keeps no pixels. A cutout's window is rebuilt from its row's coordinates
(:func:`pipeline.geometry.windows_from_centres`, the inverse of the centre convention),
read from the image the store recorded (its record in the images table, :meth:`Store.images`)
and stretched
with the store's own preprocessing config, so a thumbnail shows what the model saw.

Reads stay small and few: windows are grouped by image, then into row bands whose neighbours
are read together when that costs less than reading them apart (:func:`plan_reads`).
Downsampled views of whole images are built tile by tile (block means for small factors, one
row per output row for large ones), never holding the full-resolution image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from ..cutouts import CutoutReader, plan_reads, read_windows, recorded_limits, store_sources
from ..errors import InputError
from ..geometry import windows_from_centres as window_boxes
from ..sources import ImageSource
from ..store import Store

__all__ = [
    "ThumbnailReader",
    "downsample_factor",
    "downsampled_image",
    "first_row_at_bottom",
    "plan_reads",
    "read_windows",
    "to_uint8",
    "window_boxes",
]

logger = logging.getLogger(__name__)


def first_row_at_bottom(source: ImageSource) -> bool:
    """Whether ``source`` is drawn as ds9 draws a FITS image, its first row at the bottom: a
    FITS image, or any image with a celestial WCS (FITS pixel coordinates count rows up from
    the bottom, so a field with North along +y is drawn North up). Pictures (PNG, JPEG, TIFF
    without a WCS) are drawn as stored, their first row at the top."""
    return source.kind == "fits" or source.wcs_header is not None


class ThumbnailReader(CutoutReader):
    """Reads and stretches the windows of store rows, the way the fingerprint stage did
    (a :class:`pipeline.cutouts.CutoutReader` of the store's images).

    Parameters
    ----------
    store : Store
        The store: its images table says where each image is (sources are made from their
        records on first use), its attrs how cutouts were stretched (``preprocess``,
        ``cutouts``).
    """

    def __init__(self, store: Store) -> None:
        attrs = store.attrs
        super().__init__(
            store_sources(store),
            preprocess=attrs.get("preprocess") or {},
            # A store's `fill: null` reads back as 0 here (see docs/ARCHITECTURE.md).
            fill=float((attrs.get("cutouts") or {}).get("fill") or 0.0),
            image_limits=recorded_limits(store),
        )

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
        """Per-image stretch limits (``scope: image``): recorded, else measured once per image."""
        return self._reading(image, super().image_limits, image)

    def stretch(self, raw: np.ndarray, image: str) -> np.ndarray:
        """Stretch raw ``(n, bands, h, w)`` cutouts of one image to RGB ``(n, 3, h, w)`` in [0, 1]."""
        return self.prepare(raw, image)[0]

    def read(self, images: Sequence[str], windows: np.ndarray) -> list[np.ndarray]:
        """Stretched RGB ``(3, h, w)`` float32 of each window, in input order."""
        images = np.asarray([str(i) for i in images], dtype=object)
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        out: list[np.ndarray | None] = [None] * len(windows)
        for image in dict.fromkeys(images):
            idx = np.flatnonzero(images == image)
            raw = self._reading(image, self.read_raw, image, windows[idx])
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
        """Display thumbnails: uint8 ``(n, size, size, 3)``, each window resized to ``size``
        and drawn the way up of its image (:func:`first_row_at_bottom`).

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
                pixels = np.asarray(img)
                out[i] = pixels[::-1] if first_row_at_bottom(self.source(images[i])) else pixels
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
