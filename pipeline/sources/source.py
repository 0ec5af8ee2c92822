""":class:`ImageSource`, the reader protocol that dispatches to each format (``_READERS``),
probing, sampling for stretch limits, and :func:`clear_caches`.

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import logging
import math
import operator
import os
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ._common import (
    _TIFF_EXTENSIONS,
    _hdu_value,
    _is_url,
    _kind_of,
    _local_stat_key,
    _one_line,
    _parse_spec,
    _Part,
    _pixel_to_icrs,
    _supported,
    _wcs_from_header,
)
from .fits import _check_local, _fits_handles, _probe_fits, _read_fits
from .rasters import _decode_pil, _pil_arrays, _probe_pil, _probe_tiff, _read_image, _tiff_handles
from .zarrs import _probe_zarr, _read_zarr, _zarr_handles

logger = logging.getLogger(__name__)


_READERS = {"fits": _read_fits, "zarr": _read_zarr, "image": _read_image}


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
        if self.wcs_header is None:
            return np.full(shape, np.nan), np.full(shape, np.nan)
        x, y = np.broadcast_arrays(x, y)
        ra, dec = _pixel_to_icrs(self.wcs_header, x, y)
        return ra.astype(np.float64, copy=True), dec.astype(np.float64, copy=True)

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
    """Close this thread's cached file handles and drop the process's decoded images (tests,
    long-lived workers after a run)."""
    for cache in (_fits_handles, _zarr_handles, _tiff_handles, _pil_arrays):
        cache.clear()
    with _probe_lock:
        _probe_cache.clear()
