"""FITS (plain, ``.gz``, tile-compressed ``.fz``): probing HDUs and reading sections.

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
import zlib
from typing import Any

import numpy as np

from ..errors import InputError
from ._common import (
    _celestial_header,
    _is_url,
    _label,
    _local_stat_key,
    _one_line,
    _Part,
    _squeeze_layout,
)
from .caches import _FITS_HANDLES, _ThreadLRU


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

    if hdu is None and not _is_url(path) and not _stream_compressed(path):
        if (found := _probe_primary(path)) is not None:
            return found
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
    size = None if _stream_compressed(path) else _file_size(path)
    info = _hdu_fileinfo(hdul, index, compressed=compressed)
    if size is not None:
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
    stored = not compressed and not _stream_compressed(path) and not _is_url(path)
    plain = _plain_fits_data(part, h) if stored else None
    if plain is not None:
        part = dataclasses.replace(part, plain=(plain.str, int(info["datLoc"])))
    raw = _header_block(path, info) if stored else None
    return part, _celestial_header(h.header, label=label, raw=raw)


def _probe_primary(path: str) -> tuple[_Part, str | None] | None:
    """The common case probed from the primary header's cards alone, without astropy's
    header or HDU list: a plain local file whose primary HDU holds a good, whole 2-D or 3-D
    image, its structural cards in the standard's fixed format. Anything else (no image
    there, a card to read another way, a size to complain about) is None: the full probe
    judges it and words the error. Opening the list cost two thirds of a small patch's
    probe, and parsing the header as astropy cards most of the rest (each value is checked
    in Python, with a configuration lookup per card)."""
    label = _label(path, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as f:
                raw = _primary_block(f)
            if raw is None:
                return None
            cards = _structural_cards(raw)
            naxis, bitpix = cards.get("NAXIS"), cards.get("BITPIX")
            if (
                cards.get("SIMPLE") is not True
                or cards.get("GROUPS")
                or type(naxis) is not int
                or naxis < 2
                or type(bitpix) is not int
                or bitpix not in _BITPIX
            ):
                return None
            shape = tuple(cards[f"NAXIS{naxis - i}"] for i in range(naxis))
            if not all(type(n) is int for n in shape) or min(shape) < 1:
                return None
            if os.path.getsize(path) < len(raw) + abs(bitpix) // 8 * math.prod(shape):
                return None
            y_axis, x_axis, band_axis = _squeeze_layout(shape, label=label)
            # astropy's header is parsed only for a WCS that is not all wcslib's.
            wcs_header = _celestial_header(None, label=label, raw=raw)
        except Exception:  # whatever it is, the full probe words it
            return None
    if caught:  # a header astropy had something to say about: the full probe judges it
        return None
    part = _Part(
        path=path,
        kind="fits",
        reader="fits",
        raw_shape=shape,
        y_axis=y_axis,
        x_axis=x_axis,
        band_axis=band_axis,
        n_bands=shape[band_axis] if band_axis is not None else 1,
        hdu=0,
    )
    plain = _plain_dtype(cards)
    if plain is not None:
        part = dataclasses.replace(part, plain=(plain.str, len(raw)))
    return part, wcs_header


# A primary header of more blocks than this is left to astropy (a patch's is one or two).
_MAX_PRIMARY_BLOCKS = 64
_BLOCK = 2880
_END_CARD = b"END" + b" " * 77
_PRINTABLE = re.compile(rb"[ -~]*")


def _primary_block(f) -> bytes | None:
    """The primary header's blocks (cards, END, padding) from the file's start, or None: no
    END card on a card boundary, a short block, bytes that are not printable ASCII."""
    blocks: list[bytes] = []
    while len(blocks) < _MAX_PRIMARY_BLOCKS:
        block = f.read(_BLOCK)
        if len(block) < _BLOCK:
            return None
        if not blocks and not block.startswith(b"SIMPLE  = "):
            return None  # the standard's first card of a primary header
        blocks.append(block)
        at = block.find(b"END")
        while at >= 0:
            if at % 80 == 0 and block[at : at + 80] == _END_CARD:
                raw = b"".join(blocks)
                return raw if _PRINTABLE.fullmatch(raw) else None
            at = block.find(b"END", at + 1)
    return None


# The cards that say where the pixels are and what they are: the keyword, "= ", a logical or a
# plain number ending by column 30 (the standard's fixed format; a little freer here), then
# blanks or a comment. A card of these keywords in any other form leaves the file to astropy.
_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "GROUPS", "BSCALE", "BZERO", "BLANK")
_FIXED = re.compile(rb" {0,19}(?P<v>[TF]|[-+]?[0-9]+|[-+]?[0-9.]+(?:[EeDd][-+]?[0-9]+)?) *(?:/.*)?")


def _structural_cards(raw: bytes) -> dict[str, Any]:
    """The structural keywords of a header block (``SIMPLE``, ``BITPIX``, ``NAXISn``,
    ``GROUPS``, ``BSCALE``, ``BZERO``, ``BLANK``) and their values; a keyword whose card is
    not in fixed format, or repeated, is an error (the caller leaves the file to astropy)."""
    cards: dict[str, Any] = {}
    for i in range(0, len(raw), 80):
        key = raw[i : i + 8].rstrip().decode()
        if key not in _STRUCTURAL and not (key.startswith("NAXIS") and key[5:].isdigit()):
            continue
        if raw[i + 8 : i + 10] != b"= " or key in cards:
            raise ValueError(f"card {key} not in fixed format, or repeated")
        m = _FIXED.fullmatch(raw, i + 10, i + 80)
        if m is None:
            raise ValueError(f"card {key}: value not in fixed format")
        v = m["v"].decode()
        if v in ("T", "F"):
            cards[key] = v == "T"
        elif v.lstrip("+-").isdigit():
            cards[key] = int(v)
        else:
            cards[key] = float(v.replace("D", "E").replace("d", "e"))
    return cards


def _hdu_fileinfo(hdul: Any, index: int, *, compressed: bool) -> dict:
    """Where HDU ``index`` lies in its file (``hdrLoc``, ``datLoc``, ``datSpan``).

    The HDU's own answer: the list's ``fileinfo()`` first re-serialises every card of the
    header to check it was not resized (a fifth of a small patch's probe). A compressed HDU's
    data location is its table's, which only the list's answer gives."""
    return (None if compressed else hdul[index].fileinfo()) or hdul.fileinfo(index)


def _header_block(path: str, info: dict) -> bytes | None:
    """The HDU's header as stored in the file (its cards, END and padding), or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, int(info["datLoc"]) - int(info["hdrLoc"]), int(info["hdrLoc"]))
        finally:
            os.close(fd)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _stream_compressed(path: str) -> bool:
    """gzip or bzip2 streams: astropy decodes them; no positioned reads."""
    return path.lower().endswith((".gz", ".bz2"))


# Decompressed bytes one compressed-FITS read may buffer beyond its output: row-tiled .fz files
# (the fpack default) decompress whole rows, so wide mosaics are read in strips of rows.
_COMP_STRIP_BYTES = 4 * 2**20


_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _plain_fits_data(part: _Part, h: Any) -> np.dtype | None:
    """The dtype of an uncompressed local image stored as plain numbers (no BSCALE / BZERO /
    BLANK to apply), else None."""
    if _is_url(part.path):
        return None
    return _plain_dtype(h.header)


def _plain_dtype(header: Any) -> np.dtype | None:
    if header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0 or "BLANK" in header:
        return None
    dtype = _BITPIX.get(header.get("BITPIX"))
    return None if dtype is None else np.dtype(dtype)


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
    if part.plain is not None and _pread_box(
        part, np.dtype(part.plain[0]), part.plain[1], box, out
    ):
        return
    y0, y1, x0, x1 = box
    hdul = _fits_handles.get(("fits", *_local_stat_key(part.path)), lambda: _fits_open(part.path))
    h = hdul[part.hdu]
    nx = part.raw_shape[part.x_axis]
    if not part.compressed:
        plain = _plain_fits_data(part, h)
        if plain is not None:
            offset = int(_hdu_fileinfo(hdul, part.hdu, compressed=False)["datLoc"])
            if _pread_box(part, plain, offset, box, out):
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
