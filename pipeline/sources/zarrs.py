"""Zarr / xarray stores: probing variables and WCS attributes, reading sections.

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from ..errors import InputError
from ._common import (
    _BAND_DIM_NAMES,
    _celestial_header,
    _header_from_string,
    _label,
    _one_line,
    _Part,
    _squeeze_layout,
)
from .caches import _ZARR_HANDLES, _ThreadLRU
from .fits import _check_local

logger = logging.getLogger(__name__)


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
