"""Catalog cutouts: windows centred on the rows of an RA/Dec or x/y table.

``read_catalog`` reads FITS, CSV, ECSV or Parquet with :meth:`astropy.table.Table.read`, finds the
coordinate columns by the name lists of ``elodin.cutouts`` (case-insensitive; RA/Dec are used
when a table has both RA/Dec and x/y) and checks every coordinate, so that a bad row is one
:class:`~pipeline.errors.CatalogError` line naming the file and the row. Rows are numbered from 0,
as astropy and pandas number them.

``catalog_to_windows`` places the rows on the input images:

- RA/Dec (degrees, ICRS) through each image's celestial WCS (``world_to_pixel``, 0-based);
- x/y (0-based pixels) directly, on the image named by an ``image`` column, or on the single
  input when there is no such column.

Rows are placed a block of ``2**20`` at a time, and each image is offered only the rows that
may fall on it: those inside its sky footprint (a k-d tree of the block's unit vectors queried
with the circle through the image's corners and edges) or naming it in the image column. So a
catalog of 10^7 rows over 10^5 images costs the rows near each image, not rows x images, and
memory is bounded by the block.

Each row becomes one window centred on its position (see :func:`catalog_windows`:
the stored centre is within half a pixel of it). A row that falls on two overlapping images goes
to the first of them, in input order, so it is fingerprinted once. Rows that fall on no image
are reported (count and row numbers, logged as a warning and returned), never dropped in
silence; a catalog none of whose rows falls on an image is an error.

Sizes: ``size`` pixels for every row, or a size column (``cutouts.size-column``) in pixels, or in
arcseconds when the column carries an angular unit or its name ends in ``_arcsec`` (converted
with each image's pixel scale).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import config as _config
from .errors import CatalogError
from .tiling import MAX_WINDOW_SIDE, Plan, _shape, assign_windows

__all__ = [
    "FORMATS",
    "CatalogReport",
    "catalog_to_windows",
    "catalog_windows",
    "plan_catalog",
    "read_catalog",
]

logger = logging.getLogger(__name__)

FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".fits.gz": "fits",
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_FIRST_ROWS = 10  # row numbers named in messages


@dataclasses.dataclass(frozen=True)
class CatalogReport:
    """What happened to the rows of a catalog.

    Attributes
    ----------
    path : str
    n_rows : int
    placed : dict of str to int
        Rows placed on each image (by image id), in input order.
    outside_rows : ndarray of int64
        Row numbers (0-based) that fall on no input image.
    """

    path: str
    n_rows: int
    placed: dict[str, int]
    outside_rows: np.ndarray

    @property
    def n_placed(self) -> int:
        return int(sum(self.placed.values()))

    @property
    def n_outside(self) -> int:
        return int(self.outside_rows.size)

    def summary(self) -> str:
        """One line: how many rows fall on no image, and the first few of them."""
        rows = ", ".join(str(r) for r in self.outside_rows[:_FIRST_ROWS])
        more = ", ..." if self.n_outside > _FIRST_ROWS else ""
        return (
            f"{self.path}: {self.n_outside} of {self.n_rows} rows fall outside every input "
            f"image (rows {rows}{more})"
        )


# --------------------------------------------------------------------------- reading


def _suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return Path(name).suffix or name


def _settings(config: Mapping[str, Any] | None) -> dict:
    out = dict(_config.get("cutouts"))
    for key, value in (config or {}).items():
        out[str(key).replace("_", "-")] = value
    return out


def _find(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w.lower() in lower:
            return lower[w.lower()]
    return None


def _as_float(table, name: str, path: str) -> np.ndarray:
    """A coordinate (or size) column as float64; one CatalogError for the first bad row."""
    col = table[name]
    mask = np.asarray(getattr(col, "mask", np.zeros(len(col), bool)), dtype=bool)
    if mask.ndim > 1:
        mask = mask.any(axis=tuple(range(1, mask.ndim)))
    if mask.any():
        i = int(np.argmax(mask))
        raw = np.ma.getdata(col)[i]  # the value under the mask
        # astropy masks NaN floats when it reads FITS tables: call them NaN, not empty.
        what = "NaN" if isinstance(raw, float | np.floating) and np.isnan(raw) else "empty"
        raise CatalogError(f"{path}: row {i}: column '{name}' is {what}")
    values = np.asarray(col)
    if values.ndim != 1:
        raise CatalogError(f"{path}: column '{name}' holds arrays, not one number per row")
    if values.dtype.kind in "USO":
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            text = v.decode() if isinstance(v, bytes) else str(v)
            try:
                out[i] = float(text)
            except ValueError:
                raise CatalogError(
                    f"{path}: row {i}: column '{name}' is not a number ({text.strip()!r})"
                ) from None
        values = out
    elif values.dtype.kind not in "iuf":
        raise CatalogError(f"{path}: column '{name}' is not numeric (type {values.dtype})")
    values = values.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        what = "NaN" if np.isnan(values[i]) else "infinite"
        raise CatalogError(f"{path}: row {i}: column '{name}' is {what}")
    return values


def _coordinate_columns(table, path: str, settings: Mapping) -> tuple[str, str, str]:
    names = list(table.colnames)
    lists = {k: list(settings[f"{k}-columns"]) for k in ("ra", "dec", "x", "y")}
    found = {k: _find(names, v) for k, v in lists.items()}
    for kind, (a, b) in {"radec": ("ra", "dec"), "xy": ("x", "y")}.items():
        if found[a] and found[b]:
            return kind, found[a], found[b]
    for a, b in (("ra", "dec"), ("dec", "ra"), ("x", "y"), ("y", "x")):
        if found[a] and not found[b]:
            raise CatalogError(
                f"{path}: has a {a} column '{found[a]}' but no {b} column "
                f"(looked for {', '.join(lists[b])})"
            )
    raise CatalogError(
        f"{path}: no coordinate columns: looked for RA/Dec ({', '.join(lists['ra'])} / "
        f"{', '.join(lists['dec'])}) or x/y ({', '.join(lists['x'])} / {', '.join(lists['y'])}); "
        f"found {', '.join(names) or 'no columns'}"
    )


def _size_column(table, path: str, settings: Mapping) -> tuple[str | None, str | None]:
    wanted = settings.get("size-column")
    if not wanted:
        return None, None
    name = _find(table.colnames, [wanted])
    if name is None:
        raise CatalogError(
            f"{path}: no size column '{wanted}' (config elodin.cutouts.size-column); "
            f"found {', '.join(table.colnames)}"
        )
    unit = getattr(table[name], "unit", None)
    if unit is not None and unit.physical_type == "angle":
        return name, "arcsec"
    if name.lower().endswith("_arcsec"):
        return name, "arcsec"
    return name, "pixel"


def _prepare(table, path: str, settings: Mapping) -> dict:
    """Find and check the columns, convert them to float64 degrees / pixels in place."""
    kind, lon, lat = _coordinate_columns(table, path, settings)
    size, size_unit = _size_column(table, path, settings)
    for name in (lon, lat):
        unit = getattr(table[name], "unit", None)
        values = _as_float(table, name, path)
        if kind == "radec" and unit is not None and unit.physical_type == "angle":
            values = (values * unit).to_value("deg")  # e.g. RA in hourangle
        if kind == "radec" and name == lat and np.any(np.abs(values) > 90):
            i = int(np.argmax(np.abs(values) > 90))
            raise CatalogError(
                f"{path}: row {i}: column '{name}' is {values[i]:g} degrees, outside -90..90"
            )
        table[name] = values
    if size:
        unit = table[size].unit
        table[size] = _as_float(table, size, path)
        table[size].unit = unit
        bad = table[size] <= 0
        if np.any(bad):
            i = int(np.argmax(bad))
            raise CatalogError(f"{path}: row {i}: size column '{size}' is not positive")
    info = {
        "path": path,
        "kind": kind,
        "lon": lon,
        "lat": lat,
        "size": size,
        "size_unit": size_unit,
        "image": _find(table.colnames, ["image"]),
    }
    table.meta["elodin"] = info
    return info


def read_catalog(path: str | os.PathLike, *, config: Mapping[str, Any] | None = None):
    """Read and check a catalog; returns an :class:`astropy.table.Table`.

    The coordinate (and size) columns are converted to float64 in place (RA/Dec with an
    angular unit to degrees), and ``table.meta["elodin"]`` records what was found: ``path``,
    ``kind`` (``radec`` or ``xy``), ``lon`` / ``lat`` (the column names), ``size`` /
    ``size_unit`` (or None) and ``image`` (the name of an ``image`` column, or None).
    RA/Dec are taken as ICRS degrees.

    Parameters
    ----------
    path : str or path-like
        ``.fits`` (``.fit``, ``.fts``, ``.fits.gz``), ``.csv``, ``.ecsv`` or ``.parquet``.
    config : mapping, optional
        Overrides of ``elodin.cutouts`` keys (``ra-columns``, ``size-column``, ...).

    Raises
    ------
    CatalogError
        Unsupported extension, unreadable file, no coordinate columns (naming the columns found),
        a NaN / empty / non-numeric coordinate (naming the row).
    """
    from astropy.table import Table

    path = os.fspath(path)
    ext = _suffix(path)
    if ext not in FORMATS:
        raise CatalogError(
            f"{path}: unsupported catalog format {ext!r} (use .fits, .csv, .ecsv or .parquet)"
        )
    if not os.path.exists(path):
        raise CatalogError(f"{path}: no such catalog file")
    try:
        table = Table.read(path, format=FORMATS[ext])
    except Exception as e:  # astropy raises many types for a broken file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CatalogError(f"{path}: cannot read catalog ({reason})") from None
    _prepare(table, path, _settings(config))
    return table


# --------------------------------------------------------------------------- placing


def _image_names(source) -> set[str]:
    """Names an ``image`` column may use for a source: its id, file names and stems."""
    names = {source.id}
    for p in getattr(source, "paths", ()):
        base = os.path.basename(str(p))
        names |= {str(p), base, base.split(".")[0]}
    return names


def _sizes_for(table, info: Mapping, source, default: int, rows: np.ndarray) -> np.ndarray:
    if not info.get("size"):
        return np.full(rows.size, default, dtype=np.int64)
    name = info["size"]
    values = np.asarray(table[name], dtype=np.float64)[rows]
    given = values
    if info["size_unit"] == "arcsec":
        unit = getattr(table[name], "unit", None)
        if unit is not None and unit.physical_type == "angle":
            given = values = (values * unit).to_value("arcsec")
        with np.errstate(over="ignore", divide="ignore"):
            values = values / _pixel_scale_arcsec(source, info["path"])
    pixels = np.maximum(np.rint(values), 1)
    # Checked before the int64 cast: 9.2e18 pixels would wrap around to a negative side.
    bad = ~(pixels <= MAX_WINDOW_SIDE)
    if bad.any():
        i = int(np.argmax(bad))
        what = (
            f"{given[i]:.6g} arcsec ({values[i]:.6g} pixels on image {source.id})"
            if info["size_unit"] == "arcsec"
            else f"{values[i]:.6g} pixels"
        )
        raise CatalogError(
            f"{info['path']}: row {int(rows[i])}: size column '{name}' is {what}, more than "
            f"the largest cutout side ({MAX_WINDOW_SIDE} pixels)"
        )
    return pixels.astype(np.int64)


def _pixel_scale_arcsec(source, path: str) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    wcs = source.wcs
    if wcs is None:
        raise CatalogError(
            f"{path}: sizes in arcsec need a celestial WCS, and image {source.id} has none"
        )
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def _pixels(table, info: Mapping, source, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon = np.asarray(table[info["lon"]], dtype=np.float64)[rows]
    lat = np.asarray(table[info["lat"]], dtype=np.float64)[rows]
    if info["kind"] == "xy":
        return lon, lat
    if source.wcs is None:
        paths = getattr(source, "paths", ())
        where = f" ({paths[0]})" if paths else ""
        raise CatalogError(
            f"{info['path']}: RA/Dec catalog, but image {source.id}{where} has no celestial WCS"
        )
    with np.errstate(invalid="ignore"):
        x, y = source.radec_to_pixel(lon, lat)
        # A TAN projection maps the far side of the sky onto the plane too: keep positions
        # that come back to themselves.
        ra2, dec2 = source.pixel_to_radec(x, y)
    dra = (ra2 - lon + 180.0) % 360.0 - 180.0
    err = np.hypot(dra * np.cos(np.radians(lat)), dec2 - lat)
    far = ~(err < 1e-6)
    return np.where(far, np.nan, x), np.where(far, np.nan, y)


def catalog_windows(x, y, sizes, shape) -> tuple[np.ndarray, np.ndarray]:
    """Windows centred on catalog positions, and which positions lie inside the image.

    ``x0 = floor(x - (w - 1) / 2 + 0.5)``, so the stored centre ``x0 + (w - 1) / 2`` is the
    catalog position rounded to the grid of possible centres: whole pixels for odd sides, pixel
    corners for even ones (within 0.5 pixel, ties rounded up). Windows are never shifted to fit:
    near an edge they pass it and the reader pads them, so the object stays centred.

    A position is inside when ``-0.5 <= x < nx - 0.5`` and likewise for ``y`` (the pixel area
    of the image). Rows outside are returned with ``inside = False`` for the caller to report;
    non-finite positions are outside and get a zero window.

    Returns
    -------
    windows : (N, 4) int64
    inside : (N,) bool
    """
    ny, nx = _shape(shape)
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    sizes = np.broadcast_to(np.asarray(sizes), x.shape)
    if sizes.size and (
        not np.issubdtype(sizes.dtype, np.integer)
        or sizes.min() <= 0
        or sizes.max() > MAX_WINDOW_SIDE
    ):
        # The callers check the user's sizes (one line naming the row): this is a bug.
        raise ValueError(f"catalog window sizes must be integers in 1..{MAX_WINDOW_SIDE}")
    finite = np.isfinite(x) & np.isfinite(y)
    inside = finite & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    half = (sizes - 1) / 2.0
    out = np.zeros((x.size, 4), dtype=np.int64)
    # Clipped first: a finite but absurd position (1e300 in a bad catalog row) is outside and
    # reported, and must not overflow the int64 cast on the way.
    out[:, 0] = np.floor(np.where(finite, np.clip(x - half + 0.5, -1e15, 1e15), 0.0))
    out[:, 1] = np.floor(np.where(finite, np.clip(y - half + 0.5, -1e15, 1e15), 0.0))
    out[:, 2] = sizes
    out[:, 3] = sizes
    return out, inside


# Catalog rows placed at a time (memory per block: a few arrays of this length).
_BLOCK_ROWS = 1 << 20
# A footprint wider than this chord (about 29 degrees) is not a small field: all rows are
# offered to the image (all-sky projections do not lie inside the circle of their corners).
_MAX_CHORD = 0.5


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)


def _footprints(sources: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Each image's sky circle (unit-vector centre, chord radius) holding its pixel area;
    radius ``inf`` where no small circle is known (no WCS, a wide or odd projection)."""
    centres = np.zeros((len(sources), 3))
    radii = np.full(len(sources), np.inf)
    for i, s in enumerate(sources):
        if s.wcs is None:
            continue
        ny, nx = s.shape[-2:]
        # Centre, corners and edge midpoints of the pixel area (-0.5 .. n - 0.5).
        xs = np.array([0.5, 0, 0.5, 1, 1, 1, 0.5, 0, 0]) * nx - 0.5
        ys = np.array([0.5, 0, 0, 0, 0.5, 1, 1, 1, 0.5]) * ny - 0.5
        with np.errstate(invalid="ignore"):
            ra, dec = s.pixel_to_radec(xs, ys)
        if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
            continue
        v = _unit_vectors(ra, dec)
        chord = float(np.linalg.norm(v[1:] - v[0], axis=1).max())
        if chord <= _MAX_CHORD:
            centres[i] = v[0]
            radii[i] = 1.1 * chord + 1e-9  # edges bulge past the corners' circle a little
    return centres, radii


def _needs_footprints(info: Mapping, sources: Sequence, labels) -> bool:
    return labels is None and info["kind"] != "xy" and len(sources) > 1


def _candidate_rows(
    table,
    info: Mapping,
    sources: Sequence,
    block: np.ndarray,
    labels,
    by_name: Mapping,
    footprints: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """For each source, the rows of ``block`` that may fall on it (a superset), in order.

    ``footprints`` is :func:`_footprints` of ``sources``, computed once by the caller: it
    projects every image through its WCS, and a catalog has many blocks.
    """
    if labels is not None:  # the rows naming it in the image column
        names, inverse = np.unique(labels[block], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
        parts: list[list[np.ndarray]] = [[] for _ in sources]
        for k, name in enumerate(names):
            for i in by_name.get(str(name), ()):
                parts[i].append(block[order[bounds[k] : bounds[k + 1]]])
        return [np.sort(np.concatenate(p)) if p else block[:0] for p in parts]
    if not _needs_footprints(info, sources, labels):
        return [block] * len(sources)
    from sklearn.neighbors import KDTree

    lon = np.asarray(table[info["lon"]], dtype=np.float64)[block]
    lat = np.asarray(table[info["lat"]], dtype=np.float64)[block]
    finite = np.isfinite(lon) & np.isfinite(lat)
    rows = block[finite]
    centres, radii = footprints if footprints is not None else _footprints(sources)
    small = np.isfinite(radii)
    out = [block] * len(sources)
    if small.any() and rows.size:
        tree = KDTree(_unit_vectors(lon[finite], lat[finite]))
        near = tree.query_radius(centres[small], radii[small])
        for i, idx in zip(np.flatnonzero(small), near, strict=True):
            out[i] = rows[np.sort(idx)]
    elif small.any():
        for i in np.flatnonzero(small):
            out[i] = rows
    return out


def catalog_to_windows(
    table,
    sources: Sequence,
    *,
    size: int | None = None,
    tile_size: int | None = None,
    config: Mapping[str, Any] | None = None,
    first_index: int = 0,
) -> tuple[list[Plan], CatalogReport]:
    """Place the rows of a catalog (from :func:`read_catalog`) on the input images.

    Returns one :class:`~pipeline.tiling.Plan` per source (image number ``first_index + i``;
    ``Plan.input_index`` holds the catalog row of each window) and a :class:`CatalogReport`.
    Rows outside every image are logged as one warning and listed in the report.
    """
    info = table.meta.get("elodin")
    if info is None:  # a table made in memory: check a shallow copy
        table = table.copy(copy_data=False)
        info = _prepare(table, str(table.meta.get("path", "<table>")), _settings(config))
    path = info["path"]
    size = _config.get_int("cutouts.size", override=size, minimum=1, maximum=MAX_WINDOW_SIDE)
    tile_size = _config.get_int("tiling.tile-size", override=tile_size, minimum=1)
    n = len(table)
    image_col = info.get("image")
    if info["kind"] == "xy" and image_col is None and len(sources) > 1:
        raise CatalogError(
            f"{path}: an x/y catalog over {len(sources)} images needs an 'image' column naming "
            "the image of each row"
        )
    labels = None if image_col is None else np.char.strip(np.asarray(table[image_col]).astype(str))
    if info["kind"] == "radec":
        for source in sources:  # each image must be able to place rows: one line if not
            if source.wcs is None:
                _pixels(table, info, source, np.zeros(0, np.int64))
    by_name: dict[str, list[int]] = {}
    if labels is not None:
        for i, source in enumerate(sources):
            for name in _image_names(source):
                by_name.setdefault(name, []).append(i)
    footprints = _footprints(sources) if _needs_footprints(info, sources, labels) else None
    free = np.ones(n, dtype=bool)
    taken: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in sources]
    # Rows are placed a block at a time, each image offered only the rows near it (its sky
    # footprint, or its name in the image column): the work is O(rows + rows near images),
    # not O(rows x images), and memory is bounded by the block.
    for lo in range(0, n, _BLOCK_ROWS):
        block = np.arange(lo, min(n, lo + _BLOCK_ROWS), dtype=np.int64)
        candidates = _candidate_rows(table, info, sources, block, labels, by_name, footprints)
        for i, source in enumerate(sources):
            rows = candidates[i]
            rows = rows[free[rows]]
            if not rows.size:
                continue
            x, y = _pixels(table, info, source, rows)
            sizes = _sizes_for(table, info, source, size, rows)
            windows, inside = catalog_windows(x, y, sizes, source.shape)
            free[rows[inside]] = False
            taken[i].append((rows[inside], windows[inside]))
    plans, placed = [], {}
    for i, source in enumerate(sources):
        rows = np.concatenate([np.zeros(0, np.int64)] + [r for r, _ in taken[i]])
        windows = np.concatenate([np.zeros((0, 4), np.int64)] + [w for _, w in taken[i]])
        plan = assign_windows(
            windows,
            source.shape,
            tile_size=tile_size,
            image_index=first_index + i,
            image_id=source.id,
        )
        plans.append(dataclasses.replace(plan, input_index=rows[plan.input_index]))
        placed[source.id] = int(rows.size)
    report = CatalogReport(path, n, placed, np.flatnonzero(free).astype(np.int64))
    if report.n_outside:
        logger.warning("%s", report.summary())
    if n and not report.n_placed:
        raise CatalogError(f"{path}: none of the {n} rows falls on any input image")
    return plans, report


def plan_catalog(
    path: str | os.PathLike,
    sources: Sequence,
    *,
    size: int | None = None,
    tile_size: int | None = None,
    config: Mapping[str, Any] | None = None,
    first_index: int = 0,
) -> Plan:
    """Read a catalog and plan its cutouts over ``sources``: one :class:`Plan` for all images."""
    table = read_catalog(path, config=config)
    plans, _ = catalog_to_windows(
        table, sources, size=size, tile_size=tile_size, config=config, first_index=first_index
    )
    return Plan.concat(plans)
