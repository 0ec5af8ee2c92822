"""Survey inputs as lazy, picklable image sources.

:func:`open_sources` turns paths, globs, directories, list files and fsspec URLs of FITS, Zarr
and PNG / JPEG / TIFF images into :class:`ImageSource` objects. A source holds only paths and
header facts (shape, bands, HDU, variable, celestial WCS as a header string), so it pickles to
any worker; :meth:`ImageSource.read` opens the file in the worker and reads only the section it
is asked for, never a whole mosaic:

- FITS (plain, ``.gz``, tile-compressed ``.fz``): astropy ``HDU.section`` on a lazily loaded
  local or fsspec (URL) file, so a tile read touches only the bytes / compressed tiles under
  it (row by row for a narrow section; in strips of rows for row-tiled ``.fz``).
  BSCALE / BZERO / BLANK are applied by astropy. Local files are deliberately not
  memory-mapped: see :func:`_fits_open`.
- Zarr / xarray: ``xarray.open_zarr(chunks=None)`` gives lazily indexed variables (no dask
  inside a worker's task), so a read fetches only the chunks under it. Stores that xarray
  cannot open (a bare array, arrays without dimension names) fall back to zarr itself.
- TIFF: tifffile finds the layout; uncompressed contiguous data is read directly with
  ``os.preadv`` row by row (not memory-mapped, for the reason given for FITS), anything else
  through tifffile's Zarr view, which decodes only the strips / tiles under the section.
- PNG / JPEG (and TIFF flavours tifffile cannot map, such as palette images): PIL decodes the
  whole file on the first read; these formats have no random access and such images are small.
  The decoded array is kept per thread (one image) so the tiles of one image decode it once.

Open files are kept in a small per-thread LRU (never pickled, keyed by path, size and mtime so
a rewritten file is reopened), which keeps reads in Dask worker threads free of locks.

Every problem the user can cause raises :class:`~pipeline.errors.InputError` with one line
naming the file (and HDU / variable).
"""

from __future__ import annotations

import glob
import logging
import math
import operator
import os
import re
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "FITS_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "ZARR_EXTENSIONS",
    "ImageSource",
    "clear_caches",
    "expand_inputs",
    "list_images",
    "open_listed",
    "open_sources",
    "sample_pixels",
    "spec_path",
]

logger = logging.getLogger(__name__)

FITS_EXTENSIONS = (
    ".fits",
    ".fit",
    ".fts",
    ".fz",
    ".fits.fz",
    ".fit.fz",
    ".fts.fz",
    ".fits.gz",
    ".fit.gz",
    ".fts.gz",
    ".fits.bz2",
    ".fit.bz2",
    ".fts.bz2",
)
ZARR_EXTENSIONS = (".zarr",)
_PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
_TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = _PIL_EXTENSIONS + _TIFF_EXTENSIONS
LIST_EXTENSIONS = (".txt", ".lst")

# Longest first so that ".fits.gz" wins over ".gz"-less ".fits" checks.
_ALL_EXTENSIONS = tuple(
    sorted(FITS_EXTENSIONS + ZARR_EXTENSIONS + IMAGE_EXTENSIONS, key=len, reverse=True)
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_HDU_SUFFIX = re.compile(r"^(.*)\[([^\[\]]+)\]$")
# Zarr / xarray dimension names that mean "bands" when they come last.
_BAND_DIM_NAMES = {"band", "bands", "channel", "channels", "c", "rgb", "color", "colour"}
# PIL modes read as one band; every other mode is converted to RGB.
_PIL_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}

_FITS_HANDLES = 8
_ZARR_HANDLES = 8
_TIFF_HANDLES = 8
_PIL_ARRAYS = 1
_WCS_CACHE = 64


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in path


def _kind_of(path: str) -> str | None:
    """``fits`` / ``zarr`` / ``image`` from a path's extension (or a Zarr directory)."""
    name = path.rstrip("/").lower()
    if name.endswith(FITS_EXTENSIONS):
        return "fits"
    if name.endswith(ZARR_EXTENSIONS):
        return "zarr"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image"
    if not _is_url(path) and os.path.isdir(path) and _is_zarr_dir(path):
        return "zarr"
    return None


def _is_zarr_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zgroup", ".zarray"))


def _stem(path: str) -> str:
    """File name without its (possibly double) image extension: ``a.fits.gz`` -> ``a``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not _is_url(path):
        name = os.path.basename(path.rstrip(os.sep)) or name
    lower = name.lower()
    for ext in _ALL_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0] or name


def _parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``file.fits[SCI]`` / ``store.zarr:var`` into (path, hdu text, variable)."""
    m = _HDU_SUFFIX.match(spec)
    if m and m.group(1).lower().endswith(FITS_EXTENSIONS):
        return m.group(1), m.group(2).strip().strip("'\""), None
    if ":" in spec:
        base, var = spec.rsplit(":", 1)
        if var and "/" not in var and base.rstrip("/").lower().endswith(ZARR_EXTENSIONS):
            return base, None, var
    return spec, None, None


def _hdu_value(text: str | int | None) -> int | str | None:
    if text is None or isinstance(text, int):
        return text
    text = str(text).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def _split_combo(spec: str) -> list[str]:
    """Split ``g.fits+r.fits+i.fits`` into its band files.

    Survey file names often contain ``+`` (``J1234+5678.fits``), so pieces are joined until they
    end with a known image extension, and a spec that exists on disk as-is is never split.
    """
    if "+" not in spec:
        return [spec]
    path = _parse_spec(spec)[0]
    if not _is_url(path) and os.path.exists(path):
        return [spec]
    parts: list[str] = []
    acc = ""
    for piece in spec.split("+"):
        acc = f"{acc}+{piece}" if acc else piece
        if _kind_of(_parse_spec(acc)[0]) is not None:
            parts.append(acc)
            acc = ""
    if acc or len(parts) < 2:
        return [spec]
    return parts


def _label(path: str, hdu: Any = None, variable: str | None = None) -> str:
    if hdu is not None:
        return f"{path}[{hdu}]"
    if variable is not None:
        return f"{path}:{variable}"
    return path


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _local_stat_key(path: str) -> tuple:
    """Cache key that changes when a local file is rewritten."""
    if _is_url(path):
        return (path,)
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return (path, st.st_size, st.st_mtime_ns)


class _Handles(OrderedDict):
    """One thread's handles; closes them when the thread ends and its locals are dropped."""

    def __init__(self, close: Callable[[Any], None] | None):
        super().__init__()
        self.close = close

    def pop_and_close(self, *, last: bool) -> None:
        _, old = self.popitem(last=last)
        if self.close is not None:
            try:
                self.close(old)
            except Exception:  # closing a stale handle must never fail a read
                logger.debug("closing a cached handle failed", exc_info=True)

    def __del__(self) -> None:
        while self:
            self.pop_and_close(last=True)


class _ThreadLRU:
    """A per-thread LRU of open handles; ``close`` is called on eviction and thread exit.

    Per thread so that Dask worker threads never share a file position or a lazily loaded
    astropy structure, and need no locks.
    """

    def __init__(self, maxsize: int, close: Callable[[Any], None] | None = None):
        self.maxsize = maxsize
        self.close = close
        self._local = threading.local()

    def _entries(self) -> _Handles:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = _Handles(self.close)
        return entries

    def get(self, key: Any, factory: Callable[[], Any]) -> Any:
        entries = self._entries()
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        value = factory()
        entries[key] = value
        while len(entries) > self.maxsize:
            entries.pop_and_close(last=False)
        return value

    def clear(self) -> None:
        entries = self._entries()
        while entries:
            entries.pop_and_close(last=True)


# --------------------------------------------------------------------------------------------
# The picklable description of one file (one or more bands)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One file of a source and how to index it; pickles, holds no pixels or handles.

    ``raw_shape`` is the array as stored; ``y_axis``, ``x_axis`` and ``band_axis`` locate the
    image axes in it, every other axis has length 1 and is indexed with 0. ``n_bands`` of the
    band axis are read (the rest, e.g. alpha, dropped).
    """

    path: str
    kind: str  # fits | zarr | image
    reader: str  # fits | xarray | zarr | tiff | pil
    raw_shape: tuple[int, ...]
    y_axis: int
    x_axis: int
    band_axis: int | None
    n_bands: int
    hdu: int | None = None
    variable: str | None = None
    compressed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw_shape[self.y_axis], self.raw_shape[self.x_axis])

    @property
    def label(self) -> str:
        return _label(self.path, self.hdu, self.variable)

    def key(self, y0: int, y1: int, x0: int, x1: int) -> tuple:
        key: list[Any] = [0] * len(self.raw_shape)
        key[self.y_axis] = slice(y0, y1)
        key[self.x_axis] = slice(x0, x1)
        if self.band_axis is not None:
            key[self.band_axis] = slice(0, self.n_bands)
        return tuple(key)

    def to_bands(self, data: Any) -> np.ndarray:
        """Array indexed with :meth:`key` (integer-indexed axes gone) -> (n_bands, h, w)."""
        data = np.asarray(data)
        kept = sorted(a for a in (self.band_axis, self.y_axis, self.x_axis) if a is not None)
        want = [a for a in (self.band_axis, self.y_axis, self.x_axis) if a is not None]
        data = np.transpose(data, [kept.index(a) for a in want])
        return data if self.band_axis is not None else data[np.newaxis]


def _squeeze_layout(
    shape: tuple[int, ...], *, label: str, band_last: bool = False
) -> tuple[int, int, int | None]:
    """(y_axis, x_axis, band_axis) of a stored array, last two axes being y and x.

    Leading length-1 axes (radio images' Stokes / frequency axes, a time axis of 1) are
    dropped; what is left must be (y, x) or (band, y, x). ``band_last``: (y, x, band).
    """
    if len(shape) < 2:
        raise InputError(
            f"{label}: {len(shape)}-D data of shape {shape}; need 2-D (y, x) or 3-D (band, y, x)"
        )
    if band_last and len(shape) >= 3:
        y_axis, x_axis, band_axis = len(shape) - 3, len(shape) - 2, len(shape) - 1
        lead = shape[: len(shape) - 3]
    else:
        y_axis, x_axis = len(shape) - 2, len(shape) - 1
        band_axis = len(shape) - 3 if len(shape) >= 3 else None
        lead = shape[: len(shape) - 3] if len(shape) >= 3 else ()
    if any(n != 1 for n in lead):
        raise InputError(
            f"{label}: {len(shape)}-D data of shape {shape}; need 2-D (y, x) or 3-D (band, y, x)"
        )
    if any(n == 0 for n in shape):
        raise InputError(f"{label}: empty image (shape {shape})")
    return y_axis, x_axis, band_axis


# --------------------------------------------------------------------------------------------
# WCS
# --------------------------------------------------------------------------------------------


def _celestial_header(header: Any, *, label: str) -> str | None:
    """Celestial WCS of a FITS header as a header string, or None (logged when unusable)."""
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import wcs_to_celestial_frame

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(header)
            if not w.has_celestial:
                return None
            cel = w.celestial
            wcs_to_celestial_frame(cel)  # refuses frames astropy cannot turn into ICRS
            text = cel.to_header(relax=True).tostring()
            WCS(_header_from_string(text))  # what workers will rebuild must build
    except Exception as exc:
        logger.warning(
            "%s: celestial WCS not usable (%s); RA/Dec will be NaN", label, _one_line(exc)
        )
        return None
    return text


def _header_from_string(text: str) -> Any:
    from astropy.io import fits

    sep = "\n" if "\n" in text else ""
    return fits.Header.fromstring(text, sep=sep)


_wcs_local = threading.local()


def _wcs_from_header(text: str) -> Any:
    # Per thread: wcslib structures are not safe to share between threads.
    cache = getattr(_wcs_local, "cache", None)
    if cache is None:
        cache = _wcs_local.cache = OrderedDict()
    w = cache.get(text)
    if w is None:
        from astropy.wcs import WCS, FITSFixedWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(_header_from_string(text)).celestial
        cache[text] = w
        while len(cache) > _WCS_CACHE:
            cache.popitem(last=False)
    return w


# --------------------------------------------------------------------------------------------
# FITS
# --------------------------------------------------------------------------------------------


def _fits_open(path: str) -> Any:
    from astropy.io import fits

    if _is_url(path):
        return fits.open(path, use_fsspec=True, lazy_load_hdus=True, mode="readonly")
    # Not memory-mapped: a page fault pulls the pages around it in too (kernel readahead), so
    # a narrow tile of a wide mosaic mapped whole rows, 16x the tile for 2048 of 32768
    # columns. Plain reads of each row's span touch only the bytes of the section.
    return fits.open(path, memmap=False, lazy_load_hdus=True, mode="readonly")


_fits_handles = _ThreadLRU(_FITS_HANDLES, close=lambda h: h.close())


def _file_size(path: str) -> int | None:
    try:
        if _is_url(path):
            import fsspec

            fs, p = fsspec.core.url_to_fs(path)
            return int(fs.size(p))
        return os.path.getsize(path)
    except Exception:  # size unknown (some HTTP servers): skip the truncation check
        return None


def _check_local(path: str) -> None:
    if _is_url(path):
        return
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")


def _hdu_table(hdul: Any) -> str:
    rows = []
    for i, h in enumerate(hdul):
        shape = getattr(h, "shape", None) if _is_image_hdu(h) else None
        what = type(h).__name__ + (f" {tuple(shape)}" if shape else "")
        rows.append(f"{i} {h.name or '-'} {what}")
    return "; ".join(rows)


def _is_image_hdu(h: Any) -> bool:
    from astropy.io import fits

    return isinstance(h, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU) and not isinstance(
        h, fits.GroupsHDU
    )


_READ_ERRORS = (OSError, ValueError, TypeError, EOFError, KeyError, IndexError, zlib.error)


def _probe_fits(path: str, hdu: int | str | None) -> tuple[_Part, str | None]:
    _check_local(path)
    if not _is_url(path) and os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a FITS file")
    lower = path.lower()
    if not _is_url(path) and lower.endswith(".gz"):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise InputError(f"{path}: named .gz but is not gzip-compressed")
    if not _is_url(path) and lower.endswith(".bz2"):
        with open(path, "rb") as f:
            if f.read(3) != b"BZh":
                raise InputError(f"{path}: named .bz2 but is not bzip2-compressed")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = _fits_open(path)
        except _READ_ERRORS as exc:
            raise InputError(f"{path}: not a readable FITS file ({_one_line(exc)})") from exc
        try:
            part, wcs_header = _probe_fits_hdul(path, hdul, hdu)
        except InputError:
            raise
        except _READ_ERRORS as exc:
            raise InputError(f"{_label(path, hdu)}: corrupt FITS file ({_one_line(exc)})") from exc
        finally:
            hdul.close()
    for w in caught:
        if "truncated" in str(w.message).lower():
            raise InputError(
                f"{_label(path, part.hdu)}: truncated FITS file ({_one_line(w.message)})"
            )
    return part, wcs_header


def _probe_fits_hdul(path: str, hdul: Any, hdu: int | str | None) -> tuple[_Part, str | None]:
    from astropy.io import fits

    if hdu is None:
        index = None
        for i, h in enumerate(hdul):
            if not _is_image_hdu(h) or not h.shape:
                continue
            try:
                _squeeze_layout(tuple(h.shape), label=_label(path, i))
            except InputError:
                continue
            index = i
            break
        if index is None:
            raise InputError(
                f"{path}: no HDU holds a 2-D (y, x) or 3-D (band, y, x) image "
                f"(HDUs: {_hdu_table(hdul)})"
            )
    elif isinstance(hdu, int):
        n = len(hdul)
        if not -n <= hdu < n:
            raise InputError(f"{path}: no HDU {hdu} (HDUs: {_hdu_table(hdul)})")
        index = hdu % n
    else:
        try:
            index = hdul.index_of(hdu)
        except (KeyError, IndexError):
            raise InputError(f"{path}: no HDU named {hdu!r} (HDUs: {_hdu_table(hdul)})") from None
    h = hdul[index]
    label = _label(path, hdu if hdu is not None else index)
    if not _is_image_hdu(h):
        raise InputError(f"{label}: HDU {index} ({h.name}) is a {type(h).__name__}, not an image")
    shape = tuple(int(n) for n in (h.shape or ()))
    if not shape:
        raise InputError(f"{label}: HDU {index} ({h.name}) has no data")
    bitpix = h.header.get("BITPIX")
    if bitpix not in (8, 16, 32, 64, -32, -64):
        # astropy opens such a header and fails only when the pixels are read.
        raise InputError(
            f"{label}: BITPIX = {bitpix!r} is not a FITS pixel type (8, 16, 32, 64, -32, -64)"
        )
    y_axis, x_axis, band_axis = _squeeze_layout(shape, label=label)
    compressed = isinstance(h, fits.CompImageHDU)

    # A compressed stream's length says nothing about the data's; gzip truncation shows on read.
    size = None if path.lower().endswith((".gz", ".bz2")) else _file_size(path)
    if size is not None:
        info = hdul.fileinfo(index)
        needed = 0
        if compressed:
            bt = getattr(h, "_bintable", None)  # the table holding the compressed tiles
            if bt is not None:
                cards = bt.header
                needed = info["datLoc"] + cards["NAXIS1"] * cards["NAXIS2"] + cards.get("PCOUNT", 0)
        else:
            needed = info["datLoc"] + abs(int(h.header["BITPIX"])) // 8 * math.prod(shape)
        if size < needed:
            raise InputError(
                f"{label}: truncated FITS file ({size} bytes, the header needs {needed})"
            )
    part = _Part(
        path=path,
        kind="fits",
        reader="fits",
        raw_shape=shape,
        y_axis=y_axis,
        x_axis=x_axis,
        band_axis=band_axis,
        n_bands=shape[band_axis] if band_axis is not None else 1,
        hdu=index,
        compressed=compressed,
    )
    return part, _celestial_header(h.header, label=label)


# Decompressed bytes one compressed-FITS read may buffer beyond its output: row-tiled .fz files
# (the fpack default) decompress whole rows, so wide mosaics are read in strips of rows.
_COMP_STRIP_BYTES = 4 * 2**20


_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _plain_fits_data(part: _Part, hdul: Any, h: Any) -> tuple[np.dtype, int] | None:
    """(dtype, byte offset) of an uncompressed local image stored as plain numbers (no
    BSCALE / BZERO / BLANK to apply), else None."""
    if _is_url(part.path):
        return None
    header = h.header
    if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or "BLANK" in header:
        return None
    dtype = _BITPIX.get(header.get("BITPIX"))
    if dtype is None:
        return None
    return np.dtype(dtype), int(hdul.fileinfo(part.hdu)["datLoc"])


def _pread_box(
    part: _Part,
    dtype: np.dtype,
    offset: int,
    box: tuple[int, int, int, int],
    out: np.ndarray,
) -> bool:
    """Read a box of a plain FITS image with one positioned read per row and band; False
    (nothing read) when the file is not a plain FITS file (gzip, bzip2: astropy decodes those).

    astropy's ``section`` costs about 0.1 ms of Python per row (0.3 s per 2048-row tile, most
    of a GPU worker's time per unit); a positioned read of the row's span costs a few
    microseconds and, like ``section``, reads only the bytes of the box (no memory map, so no
    readahead of the whole row either, see :func:`_fits_open`).
    """
    y0, y1, x0, x1 = box
    ny, nx = part.shape
    width = x1 - x0
    rows = np.empty((out.shape[0], y1 - y0, width), dtype=dtype)
    item = dtype.itemsize
    with open(part.path, "rb", buffering=0) as f:
        fd = f.fileno()
        if os.pread(fd, 6, 0) != b"SIMPLE":
            return False
        for b in range(out.shape[0]):
            plane = offset + b * ny * nx * item
            if width == nx:  # whole rows: one contiguous read
                _pread_exact(fd, rows[b], plane + y0 * nx * item, part.label)
                continue
            for y in range(y0, y1):
                _pread_exact(fd, rows[b, y - y0], plane + (y * nx + x0) * item, part.label)
    out[...] = rows
    return True


def _pread_exact(fd: int, dest: np.ndarray, offset: int, label: str) -> None:
    view = memoryview(dest).cast("B")
    got = os.preadv(fd, [view], offset)
    if got != view.nbytes:
        raise OSError(f"{label}: file ends before its data (truncated?)")


def _read_fits(part: _Part, box: tuple[int, int, int, int], out: np.ndarray) -> None:
    y0, y1, x0, x1 = box
    hdul = _fits_handles.get(("fits", *_local_stat_key(part.path)), lambda: _fits_open(part.path))
    h = hdul[part.hdu]
    nx = part.raw_shape[part.x_axis]
    if not part.compressed:
        plain = _plain_fits_data(part, hdul, h)
        if plain is not None and _pread_box(part, *plain, box, out):
            return
        if x1 - x0 == nx or y1 - y0 == 1:  # one contiguous read
            out[...] = part.to_bands(h.section[part.key(y0, y1, x0, x1)])
            return
        # Row by row straight into the output (astropy would do the same loop, then stack a
        # list of rows and copy it again).
        for y in range(y0, y1):
            out[:, y - y0 : y - y0 + 1] = part.to_bands(h.section[part.key(y, y + 1, x0, x1)])
        return
    tile = tuple(int(t) for t in h.tile_shape)
    th, tw = tile[part.y_axis], tile[part.x_axis]
    span = min(nx, -(-x1 // tw) * tw) - (x0 // tw) * tw  # columns decompressed per row
    per_row = span * np.dtype(h.section.dtype).itemsize * part.n_bands
    budget = max(_COMP_STRIP_BYTES, out.nbytes)
    rows = y1 - y0 if per_row * (y1 - y0) <= budget else max(th, budget // per_row // th * th)
    y = y0
    while y < y1:
        # Strips end on tile boundaries so no compressed tile is decoded twice.
        stop = min(y1, (y // th) * th + rows) if rows < y1 - y0 else y1
        out[:, y - y0 : stop - y0] = part.to_bands(h.section[part.key(y, stop, x0, x1)])
        y = stop


# --------------------------------------------------------------------------------------------
# Zarr / xarray
# --------------------------------------------------------------------------------------------


def _zarr_open_xarray(path: str) -> Any:
    import xarray as xr

    with warnings.catch_warnings():
        # Unconsolidated stores and v3 consolidated metadata both warn; neither matters here.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return xr.open_zarr(path, chunks=None)


def _zarr_open_raw(path: str) -> Any:
    import zarr

    return zarr.open(path, mode="r")


_zarr_handles = _ThreadLRU(_ZARR_HANDLES, close=lambda h: getattr(h, "close", lambda: None)())


def _wcs_from_attrs(attrs: Any, *, label: str) -> str | None:
    """A FITS header string under ``wcs`` (or ``fits_header`` / ``header``), or header cards."""
    from astropy.io import fits

    attrs = dict(attrs or {})
    text = None
    for key in ("wcs", "fits_header", "header", "WCS"):
        if key in attrs:
            value = attrs[key]
            if isinstance(value, str):
                text = value
            elif isinstance(value, dict):
                text = fits.Header(
                    [(k, v) for k, v in value.items() if isinstance(v, str | int | float)]
                ).tostring()
            break
    if text is None and any(str(k).upper().startswith("CTYPE") for k in attrs):
        cards = [
            (str(k).upper(), v)
            for k, v in attrs.items()
            if isinstance(v, str | int | float) and not isinstance(v, bool) and len(str(k)) <= 8
        ]
        text = fits.Header(cards).tostring()
    if text is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy warns per odd card; the result decides
            header = _header_from_string(text)
    except Exception as exc:
        logger.warning(
            "%s: WCS attribute is not a FITS header (%s); RA/Dec will be NaN", label, _one_line(exc)
        )
        return None
    return _celestial_header(header, label=label)


def _probe_zarr(path: str, variable: str | None) -> tuple[_Part, str | None]:
    _check_local(path)
    try:
        ds = _zarr_open_xarray(path)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such Zarr store ({_one_line(exc)})") from exc
    except Exception as exc:  # a bare array, arrays without dimension names, ...
        logger.debug("%s: xarray cannot open the store (%s); trying zarr", path, exc)
        return _probe_zarr_raw(path, variable, xarray_error=exc)
    names = [str(v) for v in ds.data_vars]
    if variable is None:
        candidates = [v for v in names if ds[v].ndim in (2, 3)]
        if not candidates:
            raise InputError(
                f"{path}: no 2-D (y, x) or 3-D (band, y, x) variable "
                f"(variables: {', '.join(f'{v}{tuple(ds[v].shape)}' for v in names) or 'none'})"
            )
        if len(candidates) > 1:
            # Zarr has no "primary" variable and its listing order differs between formats.
            raise InputError(
                f"{path}: several image variables ({', '.join(sorted(candidates))}); "
                f"name one as {path}:VARIABLE or with the variable option"
            )
        variable = candidates[0]
    elif variable not in ds.variables:
        raise InputError(
            f"{path}: no variable {variable!r} (variables: {', '.join(names) or 'none'})"
        )
    da = ds[variable]
    label = _label(path, variable=variable)
    band_last = da.ndim >= 3 and str(da.dims[-1]).lower() in _BAND_DIM_NAMES
    shape = tuple(int(n) for n in da.shape)
    y_axis, x_axis, band_axis = _squeeze_layout(shape, label=label, band_last=band_last)
    n_bands = shape[band_axis] if band_axis is not None else 1
    part = _Part(
        path=path,
        kind="zarr",
        reader="xarray",
        raw_shape=shape,
        y_axis=y_axis,
        x_axis=x_axis,
        band_axis=band_axis,
        n_bands=n_bands,
        variable=variable,
    )
    wcs_header = _wcs_from_attrs(da.attrs, label=label) or _wcs_from_attrs(ds.attrs, label=label)
    return part, wcs_header


def _probe_zarr_raw(
    path: str, variable: str | None, *, xarray_error: Exception
) -> tuple[_Part, str | None]:
    import zarr

    try:
        node = _zarr_open_raw(path)
    except Exception as exc:
        reasons = dict.fromkeys((_one_line(xarray_error), _one_line(exc)))  # each reason once
        raise InputError(f"{path}: not a readable Zarr store ({'; '.join(reasons)})") from exc
    group_attrs: dict = {}
    if isinstance(node, zarr.Group):
        group_attrs = dict(node.attrs)
        arrays = {name: arr for name, arr in sorted(node.arrays())}
        if variable is None:
            candidates = [n for n, a in arrays.items() if a.ndim in (2, 3)]
            if not candidates:
                raise InputError(
                    f"{path}: no 2-D (y, x) or 3-D (band, y, x) array in the Zarr group"
                )
            if len(candidates) > 1:
                raise InputError(
                    f"{path}: several image arrays ({', '.join(candidates)}); "
                    f"name one as {path}:VARIABLE or with the variable option"
                )
            variable = candidates[0]
        elif variable not in arrays:
            raise InputError(
                f"{path}: no variable {variable!r} (arrays: {', '.join(arrays) or 'none'})"
            )
        arr = arrays[variable]
    else:
        if variable is not None:
            raise InputError(f"{path}: is a single Zarr array, it has no variable {variable!r}")
        arr = node
    label = _label(path, variable=variable)
    shape = tuple(int(n) for n in arr.shape)
    y_axis, x_axis, band_axis = _squeeze_layout(shape, label=label)
    part = _Part(
        path=path,
        kind="zarr",
        reader="zarr",
        raw_shape=shape,
        y_axis=y_axis,
        x_axis=x_axis,
        band_axis=band_axis,
        n_bands=shape[band_axis] if band_axis is not None else 1,
        variable=variable,
    )
    wcs_header = _wcs_from_attrs(arr.attrs, label=label) or _wcs_from_attrs(
        group_attrs, label=label
    )
    return part, wcs_header


def _read_zarr(part: _Part, box: tuple[int, int, int, int], out: np.ndarray) -> None:
    key = part.key(*box)
    if part.reader == "xarray":
        ds = _zarr_handles.get(("xarray", part.path), lambda: _zarr_open_xarray(part.path))
        # Positional indexing of the lazily indexed (chunks=None) variable reads only the
        # chunks under the section, with _FillValue / scale_factor decoded by xarray.
        out[...] = part.to_bands(ds[part.variable].variable[key].values)
        return
    node = _zarr_handles.get(("zarr", part.path), lambda: _zarr_open_raw(part.path))
    arr = node[part.variable] if part.variable is not None else node
    out[...] = part.to_bands(arr[key])


# --------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF
# --------------------------------------------------------------------------------------------


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


_pil_arrays = _ThreadLRU(_PIL_ARRAYS)


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


_READERS = {"fits": _read_fits, "zarr": _read_zarr, "image": _read_image}


# --------------------------------------------------------------------------------------------
# ImageSource
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """One image of the survey, lazily: paths and header facts, never pixels or open files.

    Attributes
    ----------
    id : str
        Stable id, unique within a run: the file stem, plus ``[HDU]`` / ``:variable`` when the
        input named one, ``+``-joined stems for band files, parent directories when stems
        collide.
    paths : tuple of str
        One per band file, or one file holding all bands (absolute local paths or URLs).
    kind : str
        ``fits``, ``zarr`` or ``image`` (of the first file).
    shape : tuple of int
        ``(ny, nx)``.
    n_bands : int
        Bands :meth:`read` returns.
    hdu : int or str or None
        FITS HDU used (the index astropy found).
    variable : str or None
        Zarr / xarray variable used.
    wcs_header : str or None
        Celestial WCS as a FITS header string; None when the image has none.
    parts : tuple
        How each file is indexed (filled by :func:`open_sources`; rebuilt from the fields above
        when empty).
    """

    id: str
    paths: tuple[str, ...]
    kind: str
    shape: tuple[int, int]
    n_bands: int
    hdu: int | str | None = None
    variable: str | None = None
    wcs_header: str | None = None
    parts: tuple[_Part, ...] = field(default=(), repr=False)

    def _parts(self) -> tuple[_Part, ...]:
        if self.parts:
            return self.parts
        return _probe_parts(self.paths, self.kind, self.hdu, self.variable)

    def to_record(self) -> dict[str, Any]:
        """The fields as a JSON-able mapping: what a store records to reopen the image later
        (a resumed run, the report's thumbnails) without pickling anything."""
        return {
            "id": self.id,
            "paths": list(self.paths),
            "kind": self.kind,
            "shape": [int(v) for v in self.shape],
            "n_bands": int(self.n_bands),
            "hdu": self.hdu,
            "variable": self.variable,
            "wcs_header": self.wcs_header,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ImageSource:
        """Reopen an image from :meth:`to_record`'s mapping (lazily: nothing is read)."""
        return cls(
            id=str(record["id"]),
            paths=tuple(record["paths"]),
            kind=str(record["kind"]),
            shape=tuple(int(v) for v in record["shape"]),
            n_bands=int(record["n_bands"]),
            hdu=record.get("hdu"),
            variable=record.get("variable"),
            wcs_header=record.get("wcs_header"),
        )

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of every band, reading only that section.

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Section in 0-based pixels; it must lie inside the image (the caller clips and pads).

        Returns
        -------
        numpy.ndarray
            float32 of shape ``(n_bands, y1 - y0, x1 - x0)``.

        Raises
        ------
        ValueError
            The section is not inside the image.
        InputError
            The file cannot be read (removed, truncated, corrupt).
        """
        try:
            y0, y1, x0, x1 = (operator.index(v) for v in (y0, y1, x0, x1))
        except TypeError:
            raise ValueError(
                f"{self.id}: section bounds must be integers, got {(y0, y1, x0, x1)}"
            ) from None
        ny, nx = self.shape
        if not (0 <= y0 <= y1 <= ny and 0 <= x0 <= x1 <= nx):
            raise ValueError(
                f"{self.id}: section y {y0}:{y1}, x {x0}:{x1} is outside the image of shape {self.shape}"
            )
        out = np.empty((self.n_bands, y1 - y0, x1 - x0), np.float32)
        if out.size == 0:
            return out
        band = 0
        for part in self._parts():
            try:
                _READERS[part.kind](part, (y0, y1, x0, x1), out[band : band + part.n_bands])
            except InputError:
                raise
            except (
                OSError,
                EOFError,
                ValueError,
                TypeError,
                KeyError,
                IndexError,
                zlib.error,
            ) as exc:
                logger.debug("reading %s failed", part.label, exc_info=True)
                raise InputError(
                    f"{part.label}: cannot read pixels y {y0}:{y1}, x {x0}:{x1} ({_one_line(exc)})"
                ) from exc
            band += part.n_bands
        return out

    @property
    def wcs(self) -> Any:
        """Celestial :class:`astropy.wcs.WCS` (cached per thread), or None."""
        if self.wcs_header is None:
            return None
        return _wcs_from_header(self.wcs_header)

    def pixel_to_radec(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """ICRS RA, Dec in degrees of 0-based pixel positions; NaN without a celestial WCS."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        shape = np.broadcast_shapes(x.shape, y.shape)
        w = self.wcs
        if w is None:
            return np.full(shape, np.nan), np.full(shape, np.nan)
        sky = w.pixel_to_world(x, y).icrs
        ra = np.broadcast_to(np.asarray(sky.ra.deg, dtype=np.float64), shape).copy()
        dec = np.broadcast_to(np.asarray(sky.dec.deg, dtype=np.float64), shape).copy()
        return ra, dec

    def radec_to_pixel(self, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel positions of ICRS RA, Dec in degrees.

        Raises
        ------
        InputError
            The image has no celestial WCS.
        """
        w = self.wcs
        if w is None:
            raise InputError(
                f"{self.paths[0]}: image {self.id!r} has no celestial WCS, so RA/Dec cannot be placed on it"
            )
        import astropy.units as u
        from astropy.coordinates import SkyCoord

        ra = np.asarray(ra, dtype=np.float64)
        dec = np.asarray(dec, dtype=np.float64)
        x, y = w.world_to_pixel(SkyCoord(ra * u.deg, dec * u.deg, frame="icrs"))
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


_probe_cache: dict[tuple, tuple[_Part, ...]] = {}
_probe_lock = threading.Lock()


def _probe_parts(
    paths: tuple[str, ...], kind: str, hdu: Any, variable: str | None
) -> tuple[_Part, ...]:
    key = (paths, kind, hdu, variable)
    with _probe_lock:
        hit = _probe_cache.get(key)
    if hit is None:
        hit = tuple(_probe(p, hdu=hdu, variable=variable)[0] for p in paths)
        with _probe_lock:
            _probe_cache[key] = hit
    return hit


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _walk(directory: str) -> list[str]:
    """Supported images under a directory (Zarr stores kept whole), sorted, hidden skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        keep = []
        for d in dirs:
            if d.startswith("."):
                continue
            full = os.path.join(root, d)
            if d.lower().endswith(ZARR_EXTENSIONS) or _is_zarr_dir(full):
                found.append(full)
            else:
                keep.append(d)
        dirs[:] = sorted(keep)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(
                FITS_EXTENSIONS + IMAGE_EXTENSIONS
            ):
                found.append(os.path.join(root, name))
    return sorted(os.path.abspath(p) for p in found)


def _read_list(path: str, depth: int) -> list[str]:
    if depth > 8:
        raise InputError(f"{path}: list files nest more than 8 deep")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the list of inputs ({_one_line(exc)})") from exc
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            out += _expand_one(line, base=base, depth=depth + 1)
    return out


def _expand_one(spec: str, *, base: str | None, depth: int) -> list[str]:
    spec = spec.strip()
    if not spec:
        return []
    if spec.startswith("@"):
        target = spec[1:]
        if base is not None and not os.path.isabs(target):
            target = os.path.join(base, target)
        if not os.path.isfile(target):
            raise InputError(f"{target}: no such list file")
        return _read_list(target, depth)
    combo = _split_combo(spec)
    if len(combo) > 1:
        expanded = []
        for part in combo:
            paths = _expand_one(part, base=base, depth=depth)
            if len(paths) != 1:
                raise InputError(
                    f"{spec}: each band of a '+' combination must name one image, {part!r} names {len(paths)}"
                )
            expanded.append(paths[0])
        return ["+".join(expanded)]
    path, hdu_text, var = _parse_spec(spec)
    suffix = f"[{hdu_text}]" if hdu_text is not None else f":{var}" if var is not None else ""
    if _is_url(path):
        return _expand_url(path, suffix)
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    if os.path.isdir(path):
        if path.rstrip(os.sep).lower().endswith(ZARR_EXTENSIONS) or _is_zarr_dir(path):
            return [os.path.abspath(path) + suffix]
        found = _walk(path)
        if not found:
            raise InputError(f"{path}: directory holds no supported images ({_supported()})")
        return found
    if os.path.exists(path):
        if not suffix and path.lower().endswith(LIST_EXTENSIONS):
            return _read_list(path, depth)
        return [os.path.abspath(path) + suffix]
    if _GLOB_CHARS.search(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise InputError(f"{path}: no files match this pattern")
        out = []
        for m in matches:
            if os.path.isdir(m):
                if m.rstrip(os.sep).lower().endswith(ZARR_EXTENSIONS) or _is_zarr_dir(m):
                    out.append(os.path.abspath(m) + suffix)
                else:
                    out += _walk(m)
            elif _kind_of(m) is not None:
                out.append(os.path.abspath(m) + suffix)
        if not out:
            raise InputError(
                f"{path}: the pattern matches {len(matches)} path(s) but no supported image ({_supported()})"
            )
        return out
    raise InputError(f"{path}: no such file or directory")


def _expand_url(url: str, suffix: str) -> list[str]:
    """A URL as is; a URL glob (``s3://bucket/tiles/*.fits``) through its fsspec filesystem."""
    if not _GLOB_CHARS.search(url.split("://", 1)[1]):
        return [url + suffix]
    import fsspec

    try:
        fs, pattern = fsspec.core.url_to_fs(url)
        matches = sorted(fs.glob(pattern))
    except Exception as exc:  # unknown protocol, missing credentials, network
        raise InputError(f"{url}: cannot list this pattern ({_one_line(exc)})") from exc
    out = [fs.unstrip_protocol(m) + suffix for m in matches if _kind_of(m) is not None]
    if not out:
        raise InputError(f"{url}: no files match this pattern")
    return out


def _supported() -> str:
    return ", ".join(FITS_EXTENSIONS + ZARR_EXTENSIONS + IMAGE_EXTENSIONS)


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand paths, globs, directories, list files and URLs into one input per image.

    Parameters
    ----------
    inputs : str or path-like, or a sequence of them
        - a file (``file.fits[SCI]``, ``file.fits[1]`` and ``store.zarr:var`` name an HDU or a
          variable; the suffix is kept on the result);
        - a glob (``data/**/*.fits``), sorted; directories it matches are walked;
        - a directory: walked recursively for supported extensions, sorted, hidden entries
          skipped, Zarr stores kept whole;
        - a list file, ``@list.txt`` or any ``.txt`` / ``.lst`` file: one input per line,
          ``#`` comments, relative paths taken from the list file's directory;
        - ``g.fits+r.fits+i.fits``: band files of one image, each part expanded alone;
        - an fsspec URL (``s3://...``, ``memory://...``), kept as is.

    Returns
    -------
    list of str
        Absolute local paths (or URLs), in order, duplicates dropped.

    Raises
    ------
    InputError
        A path that does not exist, a pattern that matches nothing, an empty directory.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    out: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        for p in _expand_one(os.fspath(item), base=None, depth=0):
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def _probe(spec: str, *, hdu: Any, variable: str | None) -> tuple[_Part, str | None]:
    path, hdu_text, var = _parse_spec(spec)
    if hdu_text is not None:
        hdu = _hdu_value(hdu_text)
    if var is not None:
        variable = var
    kind = _kind_of(path)
    if kind is None:
        if not _is_url(path) and not os.path.exists(path):
            raise InputError(f"{path}: no such file or directory")
        raise InputError(f"{path}: unsupported file type (supported: {_supported()})")
    if kind == "fits":
        return _probe_fits(path, _hdu_value(hdu))
    if kind == "zarr":
        return _probe_zarr(path, variable)
    _check_local(path)
    if not _is_url(path) and os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an image file")
    if path.lower().endswith(_TIFF_EXTENSIONS):
        return _probe_tiff(path)
    return _probe_pil(path)


def _id_base(spec: str, *, full_name: bool = False) -> str:
    path, hdu_text, var = _parse_spec(spec)
    stem = _stem(path) if not full_name else path.rstrip("/").rsplit("/", 1)[-1]
    if hdu_text is not None:
        return f"{stem}[{hdu_text}]"
    if var is not None:
        return f"{stem}:{var}"
    return stem


def _parents(path: str) -> list[str]:
    """Parent directory names, nearest first."""
    p = path.rstrip("/")
    if _is_url(p):
        p = p.split("://", 1)[1]
    parts = [s for s in re.split(r"[/\\]", p) if s]
    return list(reversed(parts[:-1]))


def _assign_ids(groups: list[list[str]]) -> list[str]:
    """Ids from stems; where they collide, prefixed with as many parent dirs as needed.

    Members of a colliding group that still collide with every parent dir (``a.fits`` and
    ``a.fits.gz`` side by side) use their full file names instead of stems. The result depends
    only on the inputs, so the same inputs give the same ids in every run.
    """
    bases = ["+".join(_id_base(s) for s in g) for g in groups]
    ids = list(bases)
    by_id: dict[str, list[int]] = {}
    for i, b in enumerate(bases):
        by_id.setdefault(b, []).append(i)
    for members in by_id.values():
        if len(members) < 2:
            continue
        parents = {i: _parents(_parse_spec(groups[i][0])[0]) for i in members}
        depth = max(len(p) for p in parents.values())
        for full_name in (False, True):
            names = {
                i: "+".join(_id_base(s, full_name=full_name) for s in groups[i]) for i in members
            }
            found = None
            for k in range(0 if full_name else 1, depth + 1):
                cand = {i: "/".join([*reversed(parents[i][:k]), names[i]]) for i in members}
                if len(set(cand.values())) == len(members):
                    found = cand
                    break
            if found is not None:
                for i in members:
                    ids[i] = found[i]
                break
    # Anything still equal (the same file listed through two spellings) gets a counter.
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            seen[v] += 1
            ids[i] = f"{v}~{seen[v]}"
        else:
            seen[v] = 0
    return ids


def open_sources(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    hdu: int | str | None = None,
    variable: str | None = None,
    bands: Sequence[str | os.PathLike] | None = None,
) -> list[ImageSource]:
    """Open survey inputs as lazy :class:`ImageSource` objects.

    Only headers and metadata are read here; pixels are read by :meth:`ImageSource.read`.

    Parameters
    ----------
    inputs : sequence of str or path-like
        Anything :func:`expand_inputs` accepts.
    hdu : int or str, optional
        FITS HDU (index or EXTNAME) for inputs that do not name one; default: the first HDU
        with 2-D or 3-D image data.
    variable : str, optional
        Zarr / xarray variable for stores that do not name one; default: the first 2-D or 3-D
        data variable.
    bands : sequence of str or path-like, optional
        Band files combined into the channels of one image, in order (``["g.fits", "r.fits",
        "i.fits"]``). Entries may be globs or directories that expand to the same number of
        files: the i-th file of each (in sorted order) make the i-th image.

    Returns
    -------
    list of ImageSource
        In input order, then the ``bands`` images.

    Raises
    ------
    InputError
        Anything wrong with an input, naming the file (and HDU / variable).
    """
    listed = list_images(inputs, bands=bands)
    sources = [open_listed(sid, specs, hdu=hdu, variable=variable) for sid, specs in listed]
    logger.info("opened %d image source(s)", len(sources))
    return sources


def list_images(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    bands: Sequence[str | os.PathLike] | None = None,
) -> list[tuple[str, tuple[str, ...]]]:
    """The images :func:`open_sources` would open, as ``(id, specs)``, without opening any.

    A listing only (globs, directories, list files expanded; ids assigned): an incremental run
    compares it with the store's records and opens only what is new. ``specs`` are the band
    files' inputs (``file.fits[SCI]``); :func:`spec_path` gives each one's file.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    groups = [_split_combo(s) for s in expand_inputs(inputs or [])]
    if bands:
        lists = [expand_inputs([b]) for b in bands]
        counts = {os.fspath(b): len(files) for b, files in zip(bands, lists, strict=True)}
        if len(set(counts.values())) > 1:
            raise InputError(
                "band inputs expand to different numbers of files: "
                + ", ".join(f"{b} -> {n}" for b, n in counts.items())
            )
        groups += [list(t) for t in zip(*lists, strict=True)]
    if not groups:
        raise InputError("no input images given")
    return [(sid, tuple(g)) for sid, g in zip(_assign_ids(groups), groups, strict=True)]


def spec_path(spec: str) -> str:
    """The file (or URL) of one input spec, without its ``[HDU]`` / ``:variable``: the path an
    :class:`ImageSource` records for it."""
    return _parse_spec(spec)[0]


def open_listed(
    sid: str, specs: Sequence[str], *, hdu: int | str | None = None, variable: str | None = None
) -> ImageSource:
    """Open one image of :func:`list_images` (headers only)."""
    return _make_source(sid, list(specs), hdu=hdu, variable=variable)


def _make_source(sid: str, group: list[str], *, hdu: Any, variable: str | None) -> ImageSource:
    probed = [_probe(s, hdu=hdu, variable=variable) for s in group]
    parts = tuple(p for p, _ in probed)
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        raise InputError(
            "band files differ in shape: " + ", ".join(f"{p.label} {p.shape}" for p in parts)
        )
    first = parts[0]
    return ImageSource(
        id=sid,
        paths=tuple(p.path for p in parts),
        kind=first.kind,
        shape=first.shape,
        n_bands=sum(p.n_bands for p in parts),
        hdu=first.hdu,
        variable=first.variable,
        wcs_header=probed[0][1],
        parts=parts,
    )


# --------------------------------------------------------------------------------------------
# Sampling for per-image stretch limits
# --------------------------------------------------------------------------------------------


def _patch_grid(n: int, p: int, k: int) -> list[int]:
    return sorted({round(float(v)) for v in np.linspace(0, n - p, k)})


def sample_pixels(source: ImageSource, *, max_pixels: int = 1_000_000) -> np.ndarray:
    """A sparse sample of the image for per-image stretch limits, never the whole image.

    Images with at most ``max_pixels`` pixels are read whole. Larger ones are sampled as an
    8 x 8 grid of square patches spread evenly over the image (compact reads, so a tile-
    compressed or chunked file decodes few tiles), whose total area is at most ``max_pixels``.
    PNG / JPEG images, decoded whole anyway, are sampled with a regular stride.

    Parameters
    ----------
    source : ImageSource
    max_pixels : int
        Most pixel positions sampled (per band).

    Returns
    -------
    numpy.ndarray
        float32 ``(n_bands, m)`` with ``m <= max_pixels``; NaNs kept.
    """
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    ny, nx = source.shape
    if ny * nx <= max_pixels:
        return source.read(0, ny, 0, nx).reshape(source.n_bands, -1)
    parts = source._parts()
    if all(p.reader == "pil" for p in parts):
        step = math.ceil(math.sqrt(ny * nx / max_pixels))
        while math.ceil(ny / step) * math.ceil(nx / step) > max_pixels:
            step += 1
        out = []
        for p in parts:
            arr = _pil_arrays.get(
                ("pil", *_local_stat_key(p.path)), lambda p=p: _decode_pil(p.path)
            )
            sub = arr[::step, ::step, : p.n_bands]
            out.append(np.moveaxis(sub, -1, 0).reshape(p.n_bands, -1).astype(np.float32))
        return np.concatenate(out, axis=0)
    k = 8
    p = max(1, math.isqrt(max_pixels // (k * k)))
    py, px = min(p, ny), min(p, nx)
    chunks = [
        source.read(y, y + py, x, x + px).reshape(source.n_bands, -1)
        for y in _patch_grid(ny, py, k)
        for x in _patch_grid(nx, px, k)
    ]
    return np.concatenate(chunks, axis=1)


def clear_caches() -> None:
    """Close this thread's cached file handles (tests, long-lived workers after a run)."""
    for cache in (_fits_handles, _zarr_handles, _tiff_handles, _pil_arrays):
        cache.clear()
    with _probe_lock:
        _probe_cache.clear()
