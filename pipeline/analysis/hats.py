"""The catalog of cutouts as a HATS catalog (HEALPix-partitioned Parquet) that lsdb opens.

The rows and columns are :mod:`pipeline.analysis.export`'s, less the rows without celestial
coordinates (counted in the log; a store with none is refused), plus hats' ``_healpix_29``
index. It is built the way hats-import builds catalogs, with no step holding more than one
block of store rows or one partition:

1. *count*: each block task returns the sparse histogram of its rows' HEALPix pixels at
   ``analysis.export.hats-max-order``; the client adds them up;
2. *plan*: the client picks the partitions by hats' rule (``generate_alignment``: HEALPix
   pixels of mixed order, at most ``hats-partition-rows`` rows each), computed on the occupied
   pixels only (:func:`alignment`);
3. *shard*: each block task splits its rows by partition into small Parquet files under a
   work directory beside the output;
4. *write*: lsdb's ``write_catalog`` writes the catalog, one task per partition (read its shards,
   sort by ``_healpix_29``, write ``Norder=k/Dir=d/Npix=p.parquet``), then ``_metadata``,
   ``partition_info.csv``, ``hats.properties`` and the skymap.

Step 4 sees the shards as an lsdb :class:`~lsdb.Catalog` built from one function per
partition, as ``lsdb.from_dataframe`` builds its own (lsdb 0.11's ``FromHealpixMap``
operation); :func:`store_catalog` returns that catalog for cross-matching without writing the
catalog. No margin cache is written: in a cross-match put the other catalog (which has one)
on the right.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import config
from ..errors import ConfigError, StoreError
from ..store import Store
from . import _base
from .export import ExportResult, block_table, catalog_columns

__all__ = ["SkyCatalog", "alignment", "export_hats", "store_catalog"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ block tasks
@dataclasses.dataclass
class _Counts:
    """Valid rows, rows with sky coordinates, and their sparse pixel histogram."""

    n_valid: int
    n_sky: int
    pixels: np.ndarray
    counts: np.ndarray

    def __add__(self, other: _Counts) -> _Counts:
        pixels, inverse = np.unique(np.r_[self.pixels, other.pixels], return_inverse=True)
        counts = np.bincount(inverse, weights=np.r_[self.counts, other.counts]).astype(np.int64)
        return _Counts(self.n_valid + other.n_valid, self.n_sky + other.n_sky, pixels, counts)


def _group(path: str):
    return Store.zarr(path)


def _count_block(path: str, start: int, stop: int, order: int) -> _Counts:
    from hats.pixel_math.spatial_index import SPATIAL_INDEX_ORDER, compute_spatial_index

    g = _group(path)
    valid = np.asarray(g["valid"][start:stop], bool)
    ra, dec = np.asarray(g["ra"][start:stop]), np.asarray(g["dec"][start:stop])
    sky = valid & np.isfinite(ra) & np.isfinite(dec)
    pix = compute_spatial_index(ra[sky], dec[sky]) >> (2 * (SPATIAL_INDEX_ORDER - order))
    pixels, counts = np.unique(pix, return_counts=True)
    return _Counts(int(valid.sum()), int(sky.sum()), pixels, counts.astype(np.int64))


def _arrow(t, spatial_index: np.ndarray):
    import pyarrow as pa
    from hats.pixel_math.spatial_index import SPATIAL_INDEX_COLUMN

    arrays = {SPATIAL_INDEX_COLUMN: pa.array(spatial_index.astype(np.int64))}
    for c in t.colnames:
        arrays[c] = pa.array(np.asarray(t[c]))
    return pa.table(arrays)


def _shard_block(
    path: str,
    start: int,
    stop: int,
    extra: dict,
    lower: np.ndarray,
    upper: np.ndarray,
    shard_dir: str,
    block_no: int,
) -> np.ndarray:
    """Write the block's sky rows into one Parquet file per partition; rows per partition."""
    import pyarrow.parquet as pq
    from hats.pixel_math.spatial_index import compute_spatial_index

    counts = np.zeros(len(lower), np.int64)
    t = block_table(_group(path), start, stop, extra, sky=True)
    if t is None:
        return counts
    s = compute_spatial_index(np.asarray(t["ra"]), np.asarray(t["dec"]))
    dest = np.searchsorted(lower, s, side="right") - 1
    if np.any(dest < 0) or np.any(s >= upper[np.maximum(dest, 0)]):
        raise StoreError(f"{path}: sky positions changed while exporting; run the export again")
    order = np.argsort(dest, kind="stable")
    table, dest = _arrow(t, s).take(order), dest[order]
    cuts = np.r_[0, np.flatnonzero(np.diff(dest)) + 1, len(dest)]
    for a, b in itertools.pairwise(cuts):
        d = int(dest[a])
        os.makedirs(f"{shard_dir}/{d:06d}", exist_ok=True)
        pq.write_table(table.slice(a, b - a), f"{shard_dir}/{d:06d}/{block_no:08d}.parquet")
        counts[d] = b - a
    return counts


def _read_partition(pixel, directory: str):
    """One partition of the catalog: its shards, indexed and sorted by ``_healpix_29``."""
    import nested_pandas as npd
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hats.pixel_math.spatial_index import SPATIAL_INDEX_COLUMN

    files = sorted(glob.glob(f"{directory}/*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    df = table.to_pandas(types_mapper=pd.ArrowDtype).set_index(SPATIAL_INDEX_COLUMN)
    return npd.NestedFrame(df.sort_index(kind="stable"))


# --------------------------------------------------------------------------------- running
def _stream(runner: _base.Runner, tasks: list, *, desc: str, progress: bool) -> Iterator:
    """Results of delayed ``tasks`` as they finish (any order), with a progress bar; at most a
    window of results is held at once."""
    from tqdm.auto import tqdm

    with tqdm(total=len(tasks), desc=desc, disable=not progress, unit="block") as bar:
        if runner.distributed:
            from distributed import as_completed

            futures = runner.client.compute(tasks)
            for future in as_completed(futures):
                yield future.result()
                future.release()
                bar.update()
            return
        window = 2 * (os.cpu_count() or 1)
        for i in range(0, len(tasks), window):
            results = runner.compute(*tasks[i : i + window])
            bar.update(len(results))
            yield from results


def _fold(results) -> _Counts:
    total = _Counts(0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    for r in results:
        total = total + r
    return total


def _sums(pixels: np.ndarray, counts: np.ndarray, shift: int):
    """Occupied parent pixels (``pixels >> shift``), each row's parent and their row counts."""
    parents, inverse = np.unique(pixels >> shift, return_inverse=True)
    return parents, inverse, np.bincount(inverse, counts).astype(np.int64)


def alignment(
    pixels: np.ndarray, counts: np.ndarray, max_order: int, threshold: int, lowest_order: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """hats' partitioning of a sparse histogram: the partition of each occupied pixel.

    The same rule as ``hats.pixel_math.generate_alignment(histogram, highest_order=max_order,
    lowest_order=lowest_order, threshold=threshold, drop_empty_siblings=True,
    use_lower_order=True)`` (tested equal): work at the coarsest order ``top`` (but not below
    ``lowest_order + 1``) where every pixel holds at most ``threshold`` rows; a pixel goes to its coarsest ancestor that holds at
    most ``threshold`` rows and has more than one occupied child, else stays at ``top``. hats
    runs it in Python loops over every pixel of the sky (35 s at order 10); here it costs
    numpy passes over the occupied pixels only.

    Parameters
    ----------
    pixels, counts : ndarray
        Occupied pixels at ``max_order`` (sorted, unique) and their row counts.

    Returns
    -------
    order, pixel : ndarray
        The partition of each input pixel.
    threshold : int
        The threshold used: raised to the densest pixel at ``max_order`` when that holds more.
    """
    pixels, counts = np.asarray(pixels, np.int64), np.asarray(counts, np.int64)
    densest = int(counts.max())
    if densest > threshold:
        logger.warning(
            "%d rows fall in one HEALPix pixel of order %d (more than hats-partition-rows = %d): "
            "that partition holds them all",
            densest,
            max_order,
            threshold,
        )
        threshold = densest
    # hats never settles below lowest_order + 1 (its search stops short of lowest_order).
    top = next(
        o
        for o in range(min(lowest_order + 1, max_order), max_order + 1)
        if _sums(pixels, counts, 2 * (max_order - o))[2].max() <= threshold
    )
    order = np.full(len(pixels), top, np.int64)
    decided = np.zeros(len(pixels), bool)
    for n in range(lowest_order, top):
        _, inverse, sums = _sums(pixels, counts, 2 * (max_order - n))
        children = np.unique(pixels >> (2 * (max_order - n - 1)))
        n_children = np.unique(children >> 2, return_counts=True)[1]
        hit = ((sums <= threshold) & (n_children > 1))[inverse] & ~decided
        order[hit] = n
        decided |= hit
    return order, pixels >> (2 * (max_order - order)), threshold


def _partitions(counts: _Counts, max_order: int, threshold: int):
    """The partitions of the sky rows, sorted by ``_healpix_29``: pixels and the first and
    past-last ``_healpix_29`` of each."""
    from hats.pixel_math import HealpixPixel
    from hats.pixel_math.healpix_pixel_function import get_pixel_argsort
    from hats.pixel_math.spatial_index import healpix_to_spatial_index

    orders, pix, _ = alignment(counts.pixels, counts.counts, max_order, threshold)
    found = {(int(o), int(p)) for o, p in zip(orders, pix, strict=True)}
    pixels = [HealpixPixel(o, p) for o, p in found]
    pixels = [pixels[i] for i in get_pixel_argsort(pixels)]
    lower = np.array([healpix_to_spatial_index(p.order, p.pixel) for p in pixels], np.int64)
    upper = np.array([healpix_to_spatial_index(p.order, p.pixel + 1) for p in pixels], np.int64)
    return pixels, lower, upper


@dataclasses.dataclass
class SkyCatalog:
    """A store's sky rows as a lazy lsdb catalog over Parquet shards in ``workdir``."""

    catalog: object  # lsdb.Catalog
    workdir: str
    n_valid: int
    n_rows: int
    columns: list[str]

    @property
    def n_left_out(self) -> int:
        return self.n_valid - self.n_rows


def store_catalog(
    store: str | os.PathLike | Store,
    workdir: str | os.PathLike,
    *,
    runner: _base.Runner,
    block_rows: int | None = None,
    pca_components: int | None = None,
    partition_rows: int | None = None,
    max_order: int | None = None,
    name: str | None = None,
    progress: bool = True,
) -> SkyCatalog:
    """Steps 1-3: the store's sky rows as an lsdb catalog partitioned by HEALPix.

    ``workdir`` (absent or empty; made here) receives the shards; the returned catalog reads
    them whenever it is computed, so it must outlive the catalog and be visible to every
    Dask worker. Rows without sky coordinates are left out and counted in the log; a store
    with none is refused with a :class:`StoreError` before anything is written.
    """
    import hats as hc
    import pandas as pd
    import pyarrow.parquet as pq
    from dask import delayed
    from hats.catalog import CatalogType, TableProperties
    from hats.pixel_math.spatial_index import SPATIAL_INDEX_COLUMN, SPATIAL_INDEX_ORDER
    from lsdb import Catalog
    from lsdb.operations.lsdb_ops import FromHealpixMap
    from mocpy import MOC

    threshold = config.get_int(
        "analysis.export.hats-partition-rows", override=partition_rows, minimum=1
    )
    max_order = config.get_int("analysis.export.hats-max-order", override=max_order, minimum=0)
    if max_order > 19:
        raise ConfigError(
            f"config elodin.analysis.export.hats-max-order: at most 19, got {max_order}"
        )
    work = Path(workdir)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise ConfigError(f"{work}: the work directory for the HEALPix shards must be empty")
    st = _base.open_store(store)
    _base.valid_count(st, stage="export")
    extra = catalog_columns(st, pca_components=pca_components)
    block = _base.block_rows(st, block_rows)
    starts = list(range(0, st.n_rows, block))

    count = delayed(_count_block, pure=True)
    counts = _fold(
        _stream(
            runner,
            [count(st.path, a, min(st.n_rows, a + block), max_order) for a in starts],
            desc="sky positions",
            progress=progress,
        )
    )
    if counts.n_sky == 0:
        raise StoreError(
            f"{st.path}: none of the {counts.n_valid} valid rows has sky coordinates (its images "
            "have no celestial WCS), and HATS catalogs and cross-matches need them (export "
            ".parquet, .fits, .ecsv or .vot instead)"
        )
    if counts.n_sky < counts.n_valid:
        logger.warning(
            "%s: %d of %d valid rows have no sky coordinates (images without a celestial WCS) "
            "and are left out of the HATS catalog",
            st.path,
            counts.n_valid - counts.n_sky,
            counts.n_valid,
        )
    pixels, lower, upper = _partitions(counts, max_order, threshold)

    shard_dir = work / "shards"
    shard_dir.mkdir(parents=True)
    shard = delayed(_shard_block, pure=True)
    extra_d, lower_d, upper_d = delayed(extra), delayed(lower), delayed(upper)
    per_partition = np.zeros(len(pixels), np.int64)
    tasks = [
        shard(st.path, a, min(st.n_rows, a + block), extra_d, lower_d, upper_d, str(shard_dir), i)
        for i, a in enumerate(starts)
    ]
    for c in _stream(runner, tasks, desc="HEALPix shards", progress=progress):
        per_partition += c
    keep = per_partition > 0
    pixels = [p for p, k in zip(pixels, keep, strict=True) if k]
    dirs = [str(shard_dir / f"{d:06d}") for d in np.flatnonzero(keep)]
    schema = pq.read_schema(next(iter(sorted(glob.glob(f"{dirs[0]}/*.parquet"))))).remove_metadata()

    import nested_pandas as npd

    meta = npd.NestedFrame(
        schema.empty_table().to_pandas(types_mapper=pd.ArrowDtype).set_index(SPATIAL_INDEX_COLUMN)
    )
    info = TableProperties(
        catalog_name=name or Path(st.path.rstrip("/")).stem,
        catalog_type=CatalogType.OBJECT,
        ra_column="ra",
        dec_column="dec",
        healpix_column=SPATIAL_INDEX_COLUMN,
        healpix_order=SPATIAL_INDEX_ORDER,
        total_rows=int(counts.n_sky),
        hats_max_rows=int(per_partition.max()),
    )
    moc_order = min(max_order, 10)
    moc = MOC.from_healpix_cells(
        np.unique(counts.pixels >> (2 * (max_order - moc_order))).astype(np.uint64),
        np.uint8(moc_order),
        moc_order,
    )
    structure = hc.catalog.Catalog(info, pixels, moc=moc, schema=schema, generate_snapshot=True)
    op = FromHealpixMap(_read_partition, pixels, meta=meta, map_kwargs={"directory": dirs})
    columns = [c for c in schema.names if c != SPATIAL_INDEX_COLUMN]
    logger.info("%s: %d rows in %d HEALPix partitions", st.path, counts.n_sky, len(pixels))
    return SkyCatalog(Catalog(op, structure), str(work), counts.n_valid, counts.n_sky, columns)


def export_hats(
    store: str | os.PathLike | Store,
    path: str | os.PathLike,
    *,
    block_rows: int | None = None,
    pca_components: int | None = None,
    partition_rows: int | None = None,
    overwrite: bool = True,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ExportResult:
    """Write the catalog of the store's sky rows as a HATS catalog at ``path`` (a directory).

    Parameters
    ----------
    store : path or Store
    path : path
        The catalog directory (``out.hats``); it appears whole or not at all.
    block_rows : int, optional
        Store rows per task.
    pca_components : int, optional
        First PCA components exported (default ``analysis.export.pca-components``).
    partition_rows : int, optional
        Rows per HEALPix partition at most (default ``analysis.export.hats-partition-rows``).
    overwrite : bool
        Replace an existing catalog.
    client, scheduler, workers
        Where the block and partition tasks run (as for the other analysis stages).
    progress : bool
        Progress bars.

    Returns
    -------
    ExportResult
        ``n_rows`` counts the rows written (valid rows with sky coordinates).

    Raises
    ------
    StoreError
        No valid row, or no row with sky coordinates.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists (pass overwrite=True to replace it)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory (a HATS catalog is one)")
    work = out.with_name(f".{out.name}.part")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(work, ignore_errors=True)  # ours, left by an interrupted export
    try:
        with _base.runner(client, scheduler=scheduler, workers=workers) as run:
            sky = store_catalog(
                store,
                work,
                runner=run,
                block_rows=block_rows,
                pca_components=pca_components,
                partition_rows=partition_rows,
                name=out.stem,
                progress=progress,
            )
            with run.activate():
                sky.catalog.write_catalog(
                    work / "catalog",
                    catalog_name=out.stem,
                    as_collection=False,
                    progress_bar=progress,
                    tqdm_kwargs={"desc": "HATS partitions"},
                )
        if out.exists():
            os.replace(out, old)
        os.replace(work / "catalog", out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = ExportResult(str(out), sky.n_rows, sky.columns)
    logger.info("%s", result)
    return result
