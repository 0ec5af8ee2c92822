"""Cross-matching the cutouts with an external catalog on the sky.

``crossmatch(store, catalog, radius=ARCSEC)`` pairs every cutout centre with every catalog
row within ``radius`` (or, with ``nearest``, only the nearest one), and keeps the cutout's
catalog columns (:mod:`pipeline.analysis.export`'s), all of the catalog's (a name the cutout
columns already use gets ``analysis.crossmatch.suffix``, ``_cat``) and ``_dist_arcsec``, the
separation (lsdb's name for it). Cutouts without sky coordinates are left out (counted in
the log); a store with none is refused.

- A **table** (FITS, ECSV, Parquet, CSV; RA/Dec columns found by
  :func:`pipeline.catalog.read_catalog`, as for catalog cutouts) is read whole and put in a
  k-d tree of unit vectors; the store streams past it block by block (one task per block on
  the Dask workers or local threads), so memory is the catalog plus one block plus the
  matches. The result is an astropy Table sorted by cutout ``index`` and separation.
- A **HATS catalog** (a directory, or a URL such as a public catalog on data.lsdb.io) is
  opened with lsdb, the store becomes an lsdb catalog partitioned by HEALPix
  (:func:`pipeline.analysis.hats.store_catalog`, Parquet shards in a work directory), and
  lsdb matches partition by partition on the cluster: ``KdTreeCrossmatch`` for the nearest,
  :func:`radius_crossmatch` for all pairs (lsdb's own keeps at most ``n_neighbors``). The
  result is a lazy lsdb catalog; written to a file, it is computed a window of partitions at
  a time. Use the catalog's margin cache (lsdb opens a collection's by default): without one,
  pairs across its partition borders are missed, which is logged.

Matching (:func:`match_xyz`) is one function for both: scipy's k-d tree over unit vectors,
chord distances turned into exact arcs.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import config
from ..errors import CatalogError, ConfigError, StoreError
from ..store import Store
from . import _base
from .export import (
    ExportResult,
    annotate,
    block_table,
    catalog_columns,
    output_format,
    string_lengths,
    write_table,
)

__all__ = ["crossmatch", "crossmatch_file", "is_hats", "match_xyz", "radius_crossmatch", "unit_xyz"]

logger = logging.getLogger(__name__)

DIST = "_dist_arcsec"


# --------------------------------------------------------------------------------- matching
def unit_xyz(ra_deg, dec_deg) -> np.ndarray:
    """(n, 3) unit vectors of ICRS positions in degrees."""
    ra, dec = (
        np.radians(np.asarray(ra_deg, np.float64)),
        np.radians(np.asarray(dec_deg, np.float64)),
    )
    c = np.cos(dec)
    return np.stack([c * np.cos(ra), c * np.sin(ra), np.sin(dec)], axis=1)


def match_xyz(
    left_xyz: np.ndarray, right, radius_arcsec: float, *, nearest: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of ``left_xyz`` rows and ``right`` rows (a :class:`scipy.spatial.cKDTree` of unit
    vectors, or the vectors) within ``radius_arcsec``: left index, right index, separation in
    arcsec, ordered by left index then separation. ``nearest``: at most one per left row."""
    from scipy.spatial import cKDTree

    tree = right if isinstance(right, cKDTree) else cKDTree(np.asarray(right))
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    if len(left_xyz) == 0 or tree.n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    if nearest:
        d, j = tree.query(left_xyz, k=1, distance_upper_bound=chord)
        i = np.flatnonzero(np.isfinite(d))
        j, d = j[i].astype(np.int64), d[i]
    else:
        pairs = cKDTree(left_xyz).sparse_distance_matrix(tree, chord, output_type="ndarray")
        i, j, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
        order = np.lexsort((d, i))
        i, j, d = i[order], j[order], d[order]
    arcsec = np.degrees(2.0 * np.arcsin(np.minimum(d / 2.0, 1.0))) * 3600.0
    return i, j, arcsec


@functools.cache
def _radius_class():
    # Made on first use, so importing this module does not import lsdb (seconds).
    from lsdb import KdTreeCrossmatch

    class RadiusCrossmatch(KdTreeCrossmatch):
        """Every pair within ``radius_arcsec`` (lsdb's ``KdTreeCrossmatch`` keeps at most
        ``n_neighbors`` per left row); the same checks (radius, right margin) as lsdb's."""

        def __init__(self, radius_arcsec: float) -> None:
            super().__init__(n_neighbors=1, radius_arcsec=radius_arcsec)

        def perform_crossmatch(self, crossmatch_args):
            import pandas as pd
            import pyarrow as pa

            a = crossmatch_args
            left = unit_xyz(
                a.left_df[a.left_catalog_info.ra_column].to_numpy(np.float64),
                a.left_df[a.left_catalog_info.dec_column].to_numpy(np.float64),
            )
            right = unit_xyz(
                a.right_df[a.right_catalog_info.ra_column].to_numpy(np.float64),
                a.right_df[a.right_catalog_info.dec_column].to_numpy(np.float64),
            )
            i, j, d = match_xyz(left, right, self.radius_arcsec)
            return i, j, pd.DataFrame({DIST: pd.Series(d, dtype=pd.ArrowDtype(pa.float64()))})

    RadiusCrossmatch.__module__ = __name__
    return RadiusCrossmatch


def radius_crossmatch(radius_arcsec: float):
    """An lsdb cross-match algorithm keeping every pair within ``radius_arcsec`` (pass it as
    ``left.crossmatch(right, algorithm=...)``)."""
    return _radius_class()(radius_arcsec)


# ---------------------------------------------------------------------------------- inputs
def is_hats(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a HATS catalog (a directory with HATS properties, or a URL)."""
    text = os.fspath(path)
    if "://" in text:
        return True
    p = Path(text)
    return p.is_dir()


def _check_hats_dir(path: str) -> None:
    if "://" in path:
        return
    p = Path(path)
    if not any(
        (p / f).exists() for f in ("hats.properties", "collection.properties", "properties")
    ):
        raise CatalogError(
            f"{path}: a directory but not a HATS catalog (no hats.properties or "
            "collection.properties)"
        )


def _open_hats(path: str):
    import lsdb

    _check_hats_dir(path)
    try:
        cat = lsdb.open_catalog(path)
    except Exception as e:  # lsdb / hats / fsspec raise many types for a broken catalog
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CatalogError(f"{path}: cannot open HATS catalog ({reason})") from None
    if not isinstance(cat, lsdb.Catalog):
        raise CatalogError(f"{path}: a HATS {type(cat).__name__}, not an object catalog")
    return cat


def _read_table(path: str):
    from ..catalog import read_catalog

    table = read_catalog(path)
    info = table.meta["elodin"]
    if info["kind"] != "radec":
        raise CatalogError(
            f"{path}: no RA/Dec columns (found pixel columns {info['lon']} / {info['lat']}); "
            "a cross-match needs sky positions"
        )
    return table, info


def _radius(radius) -> float:
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise ConfigError(f"crossmatch radius {radius!r} is not a number of arcseconds") from None
    if not (math.isfinite(r) and r > 0):
        raise ConfigError(
            f"crossmatch radius must be a positive number of arcseconds, got {radius}"
        )
    return r


def _renamed(names, taken, suffix: str) -> dict[str, str]:
    """Catalog column -> output name: ``suffix`` appended while the name is taken."""
    out, used = {}, set(taken)
    for n in names:
        m = n
        while m in used:
            m += suffix
        out[n] = m
        used.add(m)
    return out


# ------------------------------------------------------------------------------ table path
def _match_block(path, start, stop, extra, tree, radius, nearest):
    group = Store.zarr(path)
    valid = np.asarray(group["valid"][start:stop], bool)
    t = block_table(group, start, stop, extra, sky=True)
    n_valid = int(valid.sum())
    if t is None:
        return n_valid, 0, None, None, None
    i, j, d = match_xyz(unit_xyz(t["ra"], t["dec"]), tree, radius, nearest=nearest)
    return n_valid, len(t), t[i], j, d


def _table_crossmatch(
    st: Store,
    path: str,
    radius: float,
    nearest: bool,
    suffix: str,
    *,
    runner,
    block,
    extra,
    progress,
):
    import astropy.units as u
    from astropy.table import Table, hstack
    from dask import delayed
    from scipy.spatial import cKDTree

    from .hats import _stream

    cat, info = _read_table(path)
    tree = cKDTree(unit_xyz(cat[info["lon"]], cat[info["lat"]]))
    import uuid

    task = delayed(_match_block, pure=True)
    # Named, so dask does not hash the tree's contents to make a key; one copy per worker.
    tree_d = delayed(tree, name=f"crossmatch-tree-{uuid.uuid4().hex}")
    extra_d = delayed(extra)
    tasks = [
        task(st.path, a, min(st.n_rows, a + block), extra_d, tree_d, radius, nearest)
        for a in range(0, st.n_rows, block)
    ]
    n_valid = n_sky = 0
    pieces, renamed = [], None
    for nv, ns, left, j, d in _stream(runner, tasks, desc="cross-match", progress=progress):
        n_valid, n_sky = n_valid + nv, n_sky + ns
        if left is None:
            continue
        if renamed is None:
            names = _renamed(cat.colnames, [*left.colnames, DIST], suffix)
            renamed = cat.copy(copy_data=False)
            renamed.rename_columns(list(names), list(names.values()))
            renamed.meta = {}
        right = renamed[j]
        piece = hstack([left, right], metadata_conflicts="silent", join_type="exact")
        piece[DIST] = d * u.arcsec
        pieces.append(piece)
    _sky_rows(st, n_valid, n_sky)
    if pieces:
        from astropy.table import vstack

        table = vstack(pieces, metadata_conflicts="silent") if len(pieces) > 1 else pieces[0]
        table.sort(["index", DIST])
    else:
        table = Table()
    table.meta.update(
        {"store": st.path, "catalog": path, "radius": radius, "nearest": bool(nearest)}
    )
    return table


def _sky_rows(st: Store, n_valid: int, n_sky: int) -> None:
    if n_sky == 0:
        raise StoreError(
            f"{st.path}: none of the {n_valid} valid rows has sky coordinates (its images have no "
            "celestial WCS), so there is nothing to cross-match"
        )
    if n_sky < n_valid:
        logger.warning(
            "%s: %d of %d valid rows have no sky coordinates and are left out of the cross-match",
            st.path,
            n_valid - n_sky,
            n_valid,
        )


# ------------------------------------------------------------------------------- HATS path
def _hats_crossmatch(left, right, radius: float, nearest: bool, suffix: str, path: str):
    kwargs = {
        "suffixes": ("", suffix),
        "suffix_method": "overlapping_columns",
        "log_changes": False,
    }
    if right.margin is None:
        logger.warning(
            "%s: no margin cache: pairs across its partition borders are missed (open a "
            "collection, or generate a margin of at least %g arcsec)",
            path,
            radius,
        )
    try:
        if nearest:
            return left.crossmatch(right, n_neighbors=1, radius_arcsec=radius, **kwargs)
        return left.crossmatch(right, algorithm=radius_crossmatch(radius), **kwargs)
    except ValueError as e:  # lsdb's checks: radius, margin threshold
        reason = " ".join(str(e).split())
        if right.margin is not None and "margin" in reason:
            width = right.margin.hc_structure.catalog_info.margin_threshold
            reason = (
                f"radius {radius:g} arcsec is wider than its margin cache ({width:g} arcsec), "
                "so pairs across its partition borders would be missed; use a smaller radius "
                "or a catalog with a wider margin"
            )
        raise ConfigError(f"{path}: {reason}") from None


def _as_table(df, string_len: dict[str, int]):
    """A computed lsdb partition as an astropy Table with the cutout columns' units."""
    import astropy.units as u
    import pyarrow as pa
    from astropy.table import Table

    frame = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False).to_pandas()
    t = annotate(Table.from_pandas(frame))
    if DIST in t.colnames:
        t[DIST].unit = u.arcsec
    for name in list(string_len):
        if name in t.colnames and t[name].dtype.kind == "U":
            string_len[name] = max(string_len[name], t[name].dtype.itemsize // 4)
    return t


def _write_lsdb(result, out: Path, fmt: str, runner, *, string_len, progress: bool) -> int:
    """Write a lazy lsdb catalog: ``write_catalog``, or a window of partitions at a time."""
    from tqdm.auto import tqdm

    with runner.activate():
        if fmt == "hats":
            work = out.with_name(f".{out.name}.write")
            shutil.rmtree(work, ignore_errors=True)
            try:
                result.write_catalog(
                    work,
                    catalog_name=out.stem,
                    as_collection=False,
                    progress_bar=progress,
                    error_if_empty=False,
                )
                if out.exists():
                    shutil.rmtree(out)
                os.replace(work, out)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            import hats

            return int(hats.read_hats(out).catalog_info.total_rows or 0)
        import dask

        parts = result.to_delayed()
        window = 2 * (os.cpu_count() or 1)

        def pieces():
            with tqdm(total=len(parts), desc="cross-match", disable=not progress) as bar:
                for a in range(0, len(parts), window):
                    for df in dask.compute(*parts[a : a + window]):
                        bar.update()
                        if len(df):
                            yield _as_table(df, string_len)

        n, _ = write_table(pieces(), out, fmt, string_len=string_len)
        if n == 0:  # an empty result still gets a file with the columns
            write_table([_as_table(result.meta.iloc[:0], string_len)], out, fmt)
        return n


# ------------------------------------------------------------------------------------- API
def crossmatch(
    store: str | os.PathLike | Store,
    catalog: str | os.PathLike,
    *,
    radius: float,
    nearest: bool | None = None,
    block_rows: int | None = None,
    pca_components: int | None = None,
    workdir: str | os.PathLike | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
):
    """Pair the store's cutouts with the rows of ``catalog`` within ``radius`` arcseconds.

    Parameters
    ----------
    store : path or Store
    catalog : path or URL
        A table (``.fits``, ``.ecsv``, ``.parquet``, ``.csv``) with RA/Dec columns, or a
        HATS catalog (directory or URL).
    radius : float
        Arcseconds, positive.
    nearest : bool, optional
        Only the nearest catalog row of each cutout (default
        ``analysis.crossmatch.nearest``: every row within the radius).
    block_rows, pca_components
        As for :func:`pipeline.analysis.export.export`.
    workdir : path, optional
        HATS input: where the store's HEALPix shards go (default: a temporary directory).
        The returned lazy catalog reads them, so they stay until Python exits; on a cluster
        of several hosts give a directory on a shared filesystem.
    client, scheduler, workers
        Where the tasks run (as for the other analysis stages).
    progress : bool
        Progress bars.

    Returns
    -------
    astropy.table.Table or lsdb.Catalog
        A Table for a table catalog; for a HATS catalog the lazy lsdb catalog of the pairs.

    Raises
    ------
    ConfigError
        Radius not positive.
    CatalogError
        Unreadable catalog, no RA/Dec columns.
    StoreError
        No valid rows, or none with sky coordinates.
    """
    return _run(
        store,
        catalog,
        radius=radius,
        nearest=nearest,
        block_rows=block_rows,
        pca_components=pca_components,
        workdir=workdir,
        client=client,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )[0]


def crossmatch_file(
    store: str | os.PathLike | Store,
    catalog: str | os.PathLike,
    output: str | os.PathLike,
    *,
    radius: float,
    format: str | None = None,
    overwrite: bool = True,
    **options,
) -> ExportResult:
    """:func:`crossmatch` written to ``output`` (``.parquet``, ``.fits``, ``.ecsv``, ``.vot``
    or ``.hats``, or ``format=``), which appears whole or not at all; ``options`` are
    :func:`crossmatch`'s. HATS input is written partition by partition (a window at a time)
    and its shards (beside ``output`` unless ``workdir``) are removed afterwards.

    Returns
    -------
    ExportResult
        The file, the number of pairs and the columns.
    """
    return _run(
        store, catalog, radius=radius, output=output, format=format, overwrite=overwrite, **options
    )[1]


def _run(
    store,
    catalog,
    *,
    radius,
    nearest=None,
    output=None,
    format=None,
    overwrite=True,
    block_rows=None,
    pca_components=None,
    workdir=None,
    client=None,
    scheduler=None,
    workers=None,
    progress=True,
):
    # Every setting and input is checked before anything is written.
    r = _radius(radius)
    nearest = bool(config.get("analysis.crossmatch.nearest", override=nearest))
    suffix = str(config.get("analysis.crossmatch.suffix"))
    out = Path(output) if output is not None else None
    fmt = output_format(out, format) if out is not None else None
    if out is not None and out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists (pass overwrite=True to replace it)")
    st = _base.open_store(store)
    _base.valid_count(st, stage="crossmatch")
    extra = catalog_columns(st, pca_components=pca_components)
    block = _base.block_rows(st, block_rows)
    path = os.fspath(catalog)
    with _base.runner(client, scheduler=scheduler, workers=workers) as run:
        if not is_hats(path):
            table = _table_crossmatch(
                st,
                path,
                r,
                nearest,
                suffix,
                runner=run,
                block=block,
                extra=extra,
                progress=progress,
            )
            logger.info("%s x %s: %d pairs within %g arcsec", st.path, path, len(table), r)
            if out is None:
                return table, None
            if fmt == "hats":
                _table_to_hats(table, out)
            else:
                write_table([table], out, fmt, meta=dict(table.meta), string_len=_lengths(table))
            return table, ExportResult(str(out), len(table), list(table.colnames))

        from .hats import store_catalog

        right = _open_hats(path)
        if workdir is None and out is None:
            workdir = tempfile.mkdtemp(prefix="elodin-crossmatch-")
        elif workdir is None:
            workdir = out.with_name(f".{out.name}.shards")
            shutil.rmtree(workdir, ignore_errors=True)  # ours, left by an interrupted run
        work = Path(workdir)
        kept = False
        try:
            sky = store_catalog(
                st,
                work,
                runner=run,
                block_rows=block_rows,
                pca_components=pca_components,
                progress=progress,
            )
            result = _hats_crossmatch(sky.catalog, right, r, nearest, suffix, path)
            if out is None:
                # The lazy result reads the shards: they stay until Python exits.
                atexit.register(shutil.rmtree, work, ignore_errors=True)
                kept = True
                return result, None
            n = _write_lsdb(
                result, out, fmt, run, string_len=string_lengths(st, extra), progress=progress
            )
            return result, ExportResult(str(out), n, list(result.columns))
        finally:
            if not kept:
                shutil.rmtree(work, ignore_errors=True)


def _lengths(table) -> dict[str, int]:
    return {
        c: max(1, table[c].dtype.itemsize // 4)
        for c in table.colnames
        if table[c].dtype.kind == "U"
    }


def _table_to_hats(table, out: Path) -> None:
    """A matched table (in memory already) as a HATS catalog positioned on the cutouts."""
    import lsdb

    work = out.with_name(f".{out.name}.write")
    shutil.rmtree(work, ignore_errors=True)
    if not len(table):
        raise StoreError(f"{out}: no pairs within the radius; nothing to write as HATS")
    try:
        frame = table.to_pandas(index=False)
        lsdb.from_dataframe(
            frame, ra_column="ra", dec_column="dec", catalog_name=out.stem, margin_threshold=None
        ).write_catalog(work, as_collection=False, progress_bar=False)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
