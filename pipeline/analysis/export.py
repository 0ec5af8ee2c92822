"""The catalog: one row per valid cutout with its position and what analysis found.

Columns: ``index`` (store row), ``image``, ``x``, ``y`` (pix, window centre, 0-based),
``width``, ``height`` (pix), ``ra``, ``dec`` (deg, ICRS), then whichever of ``cluster``,
``embedding_0``, ``embedding_1`` ..., ``outlier_score``, ``pca_0`` ... (the first
``analysis.export.pca-components``) and ``label`` the store holds. The format follows the
extension (or ``format=``): ``.parquet`` (streamed block by block with pyarrow, carrying
astropy's table metadata so ``Table.read`` restores the units; memory stays one block for any
store size), ``.fits`` / ``.fit`` (a binary table), ``.ecsv`` and ``.vot`` / ``.xml``
(VOTable, with UCDs for the position), which astropy writes from one in-memory table (fine up
to ~10^7 rows; use Parquet beyond), and ``.hats`` (a HEALPix-partitioned catalog for lsdb,
see :mod:`pipeline.analysis.hats`). The file appears whole or not at all (written beside it,
then renamed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .. import config
from ..errors import ConfigError
from ..store import Store
from . import _base

__all__ = [
    "FORMATS",
    "ExportResult",
    "annotate",
    "block_table",
    "catalog_columns",
    "export",
    "output_format",
    "string_lengths",
    "write_table",
]

logger = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet",
    ".fits": "fits",
    ".fit": "fits",
    ".ecsv": "ascii.ecsv",
    ".vot": "votable",
    ".xml": "votable",
    ".hats": "hats",
}
# --format names -> the astropy format (or hats)
FORMAT_NAMES = {"parquet": "parquet", "fits": "fits", "ecsv": "ascii.ecsv", "votable": "votable"}
FORMAT_NAMES["hats"] = "hats"
UNITS = {"x": "pix", "y": "pix", "width": "pix", "height": "pix", "ra": "deg", "dec": "deg"}
# IVOA UCDs (VOTable FIELD ucd=...; kept in the column meta of every format that has one).
UCDS = {
    "index": "meta.id",
    "ra": "pos.eq.ra;meta.main",
    "dec": "pos.eq.dec;meta.main",
    "x": "pos.cartesian.x;instr.pixel",
    "y": "pos.cartesian.y;instr.pixel",
}
DESCRIPTIONS = {
    "index": "row of the cutout in the fingerprint store",
    "image": "id of the source image",
    "x": "window centre, 0-based pixel column of the source image",
    "y": "window centre, 0-based pixel row of the source image",
    "width": "window width in source pixels",
    "height": "window height in source pixels",
    "ra": "window centre, right ascension (ICRS)",
    "dec": "window centre, declination (ICRS)",
}


@dataclasses.dataclass
class ExportResult:
    path: str
    n_rows: int
    columns: list[str]

    def __str__(self) -> str:
        return f"{self.path}: {self.n_rows} rows, columns {', '.join(self.columns)}"


def output_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The writer for ``path``: ``fmt`` (a :data:`FORMAT_NAMES` key) or its extension."""
    path = Path(path)
    if fmt is not None:
        if fmt not in FORMAT_NAMES:
            raise ConfigError(
                f"unknown catalog format {fmt!r} (expected one of {', '.join(FORMAT_NAMES)})"
            )
        return FORMAT_NAMES[fmt]
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"{path}: unknown catalog extension {suffix or '(none)'!r}; use .parquet, .fits, "
            ".ecsv, .vot or .hats"
        )
    return FORMATS[suffix]


def catalog_columns(store: Store, *, pca_components: int | None = None) -> dict[str, int | None]:
    """The analysis variables a catalog of ``store`` carries: name -> columns taken from a 2-D
    variable (None: all, or a 1-D variable)."""
    k = config.get_int("analysis.export.pca-components", override=pca_components, minimum=0)
    present = _base.names(store)
    extra: dict[str, int | None] = {}
    for name in ("cluster", "embedding", "outlier_score"):
        if name in present:
            extra[name] = None
    if "pca" in present and k:
        extra["pca"] = k
    if "label" in present:
        extra["label"] = None
    return extra


def block_table(
    group,
    start: int,
    stop: int,
    extra: dict[str, int | None],
    *,
    sky: bool = False,
    rows: np.ndarray | None = None,
):
    """The catalog rows of store rows ``start:stop`` as an astropy Table (None when empty).

    ``sky``: only rows with celestial coordinates (finite ``ra`` and ``dec``). ``rows``: only
    these store rows (sorted, unique: a selection).
    """
    from astropy.table import Table

    keep = np.asarray(group["valid"][start:stop], bool)
    if rows is not None:
        lo, hi = np.searchsorted(rows, [start, stop])
        chosen = np.zeros(stop - start, bool)
        chosen[rows[lo:hi] - start] = True
        keep &= chosen
    if sky:
        keep &= np.isfinite(group["ra"][start:stop]) & np.isfinite(group["dec"][start:stop])
    if not keep.any():
        return None
    t = Table()
    t["index"] = np.arange(start, stop, dtype=np.int64)[keep]
    t["image"] = _base.to_str(group["image"][start:stop])[keep]
    for name in ("x", "y", "width", "height", "ra", "dec"):
        t[name] = np.asarray(group[name][start:stop])[keep]
    for name, take in extra.items():
        values = np.asarray(group[name][start:stop])
        if values.dtype.kind not in "biuf":
            values = _base.to_str(values)
        values = values[keep]
        if values.ndim == 2:
            for j in range(values.shape[1] if take is None else min(take, values.shape[1])):
                t[f"{name}_{j}"] = values[:, j]
        else:
            t[name] = values
    return annotate(t)


def annotate(t):
    """Units, UCDs and descriptions of the cutout columns of ``t`` (those it has), in place."""
    import astropy.units as u

    for name, unit in UNITS.items():
        if name in t.colnames:
            t[name].unit = u.Unit(unit)
    for name, ucd in UCDS.items():
        if name in t.colnames:
            t[name].meta["ucd"] = ucd
    for name, text in DESCRIPTIONS.items():
        if name in t.colnames:
            t[name].description = text
    return t


def string_lengths(store: Store, extra: dict[str, int | None]) -> dict[str, int]:
    """The longest string of each string column of the catalog (``image`` from the images table,
    the others by one pass over their variable), for Parquet readers that want it up front."""
    out = {"image": max((len(str(i)) for i in store.images().ids), default=1)}
    for name in extra:
        if store.array(name).dtype.kind not in "biuf":
            out[name] = max(
                (len(v) for _, block in store.iter_blocks(name) for v in _base.to_str(block)),
                default=1,
            )
    return out


def _parquet_writer(path: Path, first, string_len: dict[str, int]):
    """A pyarrow writer whose schema carries astropy's metadata (units) for ``Table.read``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import meta, serialize
    from astropy.utils.data_info import serialize_context_as

    with serialize_context_as("parquet"):
        encoded = serialize.represent_mixins_as_columns(first)
    metadata = {"table_meta_yaml": "\n".join(meta.get_yaml_from_table(encoded))}
    for name, n in string_len.items():
        metadata[f"table::len::{name}"] = str(max(1, n))
    fields = [
        (
            name,
            pa.from_numpy_dtype(
                first[name].dtype.type if first[name].dtype.kind != "U" else np.str_
            ),
        )
        for name in first.colnames
    ]
    schema = pa.schema(fields, metadata={k.encode(): v.encode() for k, v in metadata.items()})
    return pq.ParquetWriter(path, schema, version="2.6"), schema


def write_table(
    pieces: Iterable,
    path: str | os.PathLike,
    fmt: str,
    *,
    meta: dict | None = None,
    string_len: dict[str, int] | None = None,
) -> tuple[int, list[str]]:
    """Write astropy Tables of the same columns as one file; returns (rows, column names).

    Parquet is streamed piece by piece (``string_len``: the longest string of each string
    column, recorded for astropy's reader; it finds the others itself, with a warning); the
    other formats are stacked into one
    table. The file appears whole (written beside it, then renamed). Nothing is written when
    there are no pieces.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    n, columns = 0, []
    try:
        if fmt == "parquet":
            import pyarrow as pa

            writer = schema = None
            for t in pieces:
                if writer is None:
                    writer, schema = _parquet_writer(tmp, t, string_len or {})
                    columns = list(t.colnames)
                arrays = [pa.array(np.asarray(t[c])) for c in t.colnames]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                n += len(t)
            if writer is None:
                return 0, []
            writer.close()
        else:
            from astropy.table import vstack

            parts = list(pieces)
            if not parts:
                return 0, []
            table = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
            table.meta.update(meta or {})
            columns, n = list(table.colnames), len(table)
            table.write(tmp, format=fmt, overwrite=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n, columns


def export(
    store: str | os.PathLike | Store,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    block_rows: int | None = None,
    pca_components: int | None = None,
    overwrite: bool = True,
    rows: np.ndarray | None = None,
    **hats_options,
) -> ExportResult:
    """Write the catalog of valid rows to ``path`` (format from the extension).

    Parameters
    ----------
    store : path or Store
    path : path
        ``.parquet``, ``.fits`` / ``.fit``, ``.ecsv``, ``.vot`` / ``.xml`` or ``.hats``.
    format : {'parquet', 'fits', 'ecsv', 'votable', 'hats'}, optional
        Overrides the extension.
    block_rows : int, optional
        Rows read per step.
    pca_components : int, optional
        First PCA components exported (default ``analysis.export.pca-components``).
    overwrite : bool
        Replace an existing file.
    rows : array of int, optional
        Only these store rows (a selection, e.g. from the explorer); empty slots among them
        are left out. Default: every valid row. Not for HATS.
    **hats_options
        For HATS: passed to :func:`pipeline.analysis.hats.export_hats` (``client``,
        ``scheduler``, ``workers``, ``progress``, ``partition_rows``).

    Returns
    -------
    ExportResult
    """
    out = Path(path)
    fmt = output_format(out, format)
    if fmt == "hats":
        from .hats import export_hats

        if rows is not None:
            raise ConfigError(f"{out}: a selection of rows cannot be exported as HATS")

        return export_hats(
            store,
            out,
            block_rows=block_rows,
            pca_components=pca_components,
            overwrite=overwrite,
            **hats_options,
        )
    if hats_options:
        raise ConfigError(f"{out}: {', '.join(hats_options)} only apply to a HATS export")
    st = _base.open_store(store)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists (pass overwrite=True to replace it)")
    n_valid = _base.valid_count(st, stage="export")
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            raise ConfigError(f"{st.path}: the selection is empty; nothing to export")
        if rows[0] < 0 or rows[-1] >= st.n_rows:
            raise ConfigError(f"{st.path}: selected rows must lie in 0..{st.n_rows - 1}")
    extra = catalog_columns(st, pca_components=pca_components)
    block = _base.block_rows(st, block_rows)
    group = Store.zarr(st.path)
    pieces = (
        t
        for start in range(0, st.n_rows, block)
        if (t := block_table(group, start, min(st.n_rows, start + block), extra, rows=rows))
        is not None
    )
    n_valid, columns = write_table(
        pieces,
        out,
        fmt,
        meta={"store": st.path, "model": st.attrs.get("model")},
        string_len=string_lengths(st, extra) if fmt == "parquet" else None,
    )
    if not columns:
        raise ConfigError(f"{st.path}: no valid cutout among the selected rows")
    result = ExportResult(str(out), n_valid, columns)
    logger.info("%s", result)
    return result
