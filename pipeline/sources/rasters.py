"""Rasters: PNG / JPEG through PIL, TIFF through tifffile (direct reads of contiguous data).

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..errors import InputError
from ._common import _PIL_GRAY_MODES, _is_url, _local_stat_key, _one_line, _Part
from .caches import _PIL_ARRAYS, _TIFF_HANDLES, _SharedLRU, _ThreadLRU


def _open_binary(path: str) -> Any:
    if _is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _pil_bands(mode: str) -> int:
    return 1 if mode in _PIL_GRAY_MODES else 3


def _probe_pil(path: str) -> tuple[_Part, None]:
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_binary(path) as f, Image.open(f) as im:
            nx, ny = im.size
            mode = im.mode
            im.verify()  # checks the file's structure / checksums without decoding
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise InputError(f"{path}: not a readable image ({_one_line(exc)})") from exc
    if nx == 0 or ny == 0:
        raise InputError(f"{path}: empty image (shape ({ny}, {nx}))")
    n_bands = _pil_bands(mode)
    raw_shape = (ny, nx, n_bands)
    return (
        _Part(
            path=path,
            kind="image",
            reader="pil",
            raw_shape=raw_shape,
            y_axis=0,
            x_axis=1,
            band_axis=2,
            n_bands=n_bands,
        ),
        None,
    )


def _decode_pil(path: str) -> np.ndarray:
    """Whole image as (ny, nx, bands) in its own dtype; alpha dropped, palettes expanded."""
    from PIL import Image

    with _open_binary(path) as f, Image.open(f) as im:
        mode = im.mode
        if mode in ("1", "LA", "La"):
            im = im.convert("L")
        elif mode not in _PIL_GRAY_MODES and mode != "RGB":
            im = im.convert("RGB")
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, np.newaxis]
    return arr


_pil_arrays = _SharedLRU(_PIL_ARRAYS)


def _tiff_layout(path: str, tif: Any) -> tuple[_Part, None] | None:
    """Layout of a TIFF's first series, or None when PIL should decode it instead."""
    series = tif.series[0]
    page = tif.pages[0]
    photometric = int(getattr(page, "photometric", 1) or 1)
    # 0 / 1 MinIsWhite / MinIsBlack, 2 RGB; palette, YCbCr, CIELab, ... go through PIL.
    if photometric not in (0, 1, 2):
        return None
    shape = tuple(int(n) for n in series.shape)
    axes = series.axes
    label = path
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{label}: TIFF without Y and X axes (axes {axes}, shape {shape})")
    y_axis, x_axis = axes.index("Y"), axes.index("X")
    others = [i for i in range(len(shape)) if i not in (y_axis, x_axis) and shape[i] != 1]
    if len(others) > 1:
        raise InputError(
            f"{label}: {len(shape)}-D TIFF (axes {axes}, shape {shape}); need 2-D or 3-D"
        )
    if 0 in shape:
        raise InputError(f"{label}: empty image (shape {shape})")
    band_axis = others[0] if others else None
    n_bands = 1
    if band_axis is not None:
        n_bands = shape[band_axis]
        if axes[band_axis] == "S":
            if photometric == 2:
                n_bands = min(3, n_bands)
            else:
                extras = len(getattr(page, "extrasamples", ()) or ())
                n_bands = max(1, n_bands - extras)
    part = _Part(
        path=path,
        kind="image",
        reader="tiff",
        raw_shape=shape,
        y_axis=y_axis,
        x_axis=x_axis,
        band_axis=band_axis,
        n_bands=n_bands,
    )
    return part, None


def _probe_tiff(path: str) -> tuple[_Part, None]:
    import tifffile

    try:
        with _open_binary(path) as f, tifffile.TiffFile(f) as tif:
            if not tif.series:
                raise InputError(f"{path}: TIFF without image data")
            layout = _tiff_layout(path, tif)
    except InputError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: not a readable TIFF file ({_one_line(exc)})") from exc
    if layout is None:
        return _probe_pil(path)
    return layout


class _ContiguousArray:
    """Sections of a C-ordered array stored uncompressed at ``offset`` in a local file.

    Read with ``os.preadv`` straight into the result, one run of contiguous bytes per row (or
    per band and row): the memory and the I/O of a section are those of the section. A
    memory map would fault in the pages around every row it touches (kernel readahead), which
    for a narrow tile of a wide mosaic means whole rows.
    """

    def __init__(self, path: str, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.fd = os.open(path, os.O_RDONLY)
        self.offset = offset
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]

    def __getitem__(self, key: tuple) -> np.ndarray:
        ndim = len(self.shape)
        # Short trailing axes (RGB(A) samples) are read whole and sliced after: one read per
        # row rather than one per pixel.
        wide = list(key)
        for a in range(ndim - 1, 0, -1):
            if isinstance(key[a], int) or self.shape[a] > 16:
                break
            wide[a] = slice(0, self.shape[a])
        starts = [k if isinstance(k, int) else k.start for k in wide]
        counts = [1 if isinstance(k, int) else k.stop - k.start for k in wide]
        # Axes after `split` are read whole, so one read covers axis `split`'s span of them.
        split = ndim - 1
        while split > 0 and counts[split] == self.shape[split]:
            split -= 1
        unit = counts[split] * self.strides[split]
        out = np.empty(counts, self.dtype)
        rows = out.reshape(-1, unit)
        itemsize = self.dtype.itemsize
        for i, outer in enumerate(np.ndindex(*counts[:split])):
            first = sum((starts[a] + outer[a]) * self.strides[a] for a in range(split))
            first += starts[split] * self.strides[split]
            got = os.preadv(self.fd, [rows[i]], self.offset + first * itemsize)
            if got != unit * itemsize:
                raise EOFError(f"file ends {unit * itemsize - got} bytes early (truncated?)")
        post = tuple(
            0 if isinstance(k, int) else slice(k.start, k.stop) if w != k else slice(None)
            for k, w in zip(key, wide, strict=True)
        )
        return out[post]

    def close(self) -> None:
        os.close(self.fd)


class _TiffHandle:
    """An array-like over a TIFF's first series: direct reads if uncompressed, else Zarr."""

    def __init__(self, path: str):
        import tifffile
        import zarr

        self.file = None
        self.tif = None
        self.array: Any = None
        if not _is_url(path):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                offset = series.dataoffset  # None unless uncompressed and contiguous
                dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                shape = tuple(int(n) for n in series.shape)
            if offset is not None:
                self.array = _ContiguousArray(path, offset, dtype, shape)
                return
        self.file = _open_binary(path)
        self.tif = tifffile.TiffFile(self.file)
        node = zarr.open(self.tif.series[0].aszarr(), mode="r")
        self.array = node if not isinstance(node, zarr.Group) else node["0"]

    def close(self) -> None:
        if isinstance(self.array, _ContiguousArray):
            self.array.close()
        self.array = None
        if self.tif is not None:
            self.tif.close()
        if self.file is not None:
            self.file.close()


_tiff_handles = _ThreadLRU(_TIFF_HANDLES, close=lambda h: h.close())


def _read_image(part: _Part, box: tuple[int, int, int, int], out: np.ndarray) -> None:
    key = part.key(*box)
    if part.reader == "tiff":
        h = _tiff_handles.get(("tiff", *_local_stat_key(part.path)), lambda: _TiffHandle(part.path))
        out[...] = part.to_bands(h.array[key])
        return
    arr = _pil_arrays.get(("pil", *_local_stat_key(part.path)), lambda: _decode_pil(part.path))
    out[...] = part.to_bands(arr[key])
