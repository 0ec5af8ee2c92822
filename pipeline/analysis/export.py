"""The catalog: one row per valid cutout with its position and what analysis found.

Columns: ``index`` (store row), ``image``, ``x``, ``y`` (pix, window centre, 0-based),
``width``, ``height`` (pix), ``ra``, ``dec`` (deg, ICRS), then whichever of ``cluster``,
``embedding_0``, ``embedding_1`` ..., ``outlier_score`` the store holds. The format follows the
extension: ``.parquet`` (streamed block by block with pyarrow, carrying astropy's table
metadata so ``Table.read`` restores the units; memory stays one block for any store size),
``.fits`` / ``.fit`` (a binary table) and ``.ecsv``, which astropy writes from one in-memory
table (fine up to ~10^7 rows; use Parquet beyond). The file appears whole or not at all
(written beside it, then renamed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..store import Store
from . import _base

__all__ = ["FORMATS", "ExportResult", "export"]

logger = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".fits": "fits", ".fit": "fits", ".ecsv": "ascii.ecsv"}
UNITS = {"x": "pix", "y": "pix", "width": "pix", "height": "pix", "ra": "deg", "dec": "deg"}


@dataclasses.dataclass
class ExportResult:
    path: str
    n_rows: int
    columns: list[str]

    def __str__(self) -> str:
        return f"{self.path}: {self.n_rows} rows, columns {', '.join(self.columns)}"


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"{path}: unknown catalog extension {suffix or '(none)'!r}; use .parquet, .fits or .ecsv"
        )
    return FORMATS[suffix]


def _block_table(group, start: int, stop: int, extra: list[str], rows: np.ndarray | None = None):
    import astropy.units as u
    from astropy.table import Table

    valid = np.ones(stop - start, bool)
    if rows is not None:  # a selection: sorted unique store rows
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi == lo:
            return None
        valid[:] = False
        valid[rows[lo:hi] - start] = True
    valid &= np.asarray(group["valid"][start:stop], bool)
    if not valid.any():
        return None
    t = Table()
    t["index"] = np.arange(start, stop, dtype=np.int64)[valid]
    t["image"] = _base.to_str(group["image"][start:stop])[valid]
    for name in ("x", "y", "width", "height", "ra", "dec"):
        t[name] = np.asarray(group[name][start:stop])[valid]
        t[name].unit = u.Unit(UNITS[name])
    for name in extra:
        values = np.asarray(group[name][start:stop])[valid]
        if values.ndim == 2:
            for j in range(values.shape[1]):
                t[f"{name}_{j}"] = values[:, j]
        else:
            t[name] = values
    return t


def _parquet_writer(path: Path, first, image_len: int):
    """A pyarrow writer whose schema carries astropy's metadata (units) for ``Table.read``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import meta, serialize
    from astropy.utils.data_info import serialize_context_as

    with serialize_context_as("parquet"):
        encoded = serialize.represent_mixins_as_columns(first)
    metadata = {
        "table_meta_yaml": "\n".join(meta.get_yaml_from_table(encoded)),
        "table::len::image": str(max(1, image_len)),
    }
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


def export(
    store: str | os.PathLike | Store,
    path: str | os.PathLike,
    *,
    block_rows: int | None = None,
    overwrite: bool = True,
    rows: np.ndarray | None = None,
) -> ExportResult:
    """Write the catalog of valid rows to ``path`` (format from the extension).

    Parameters
    ----------
    store : path or Store
    path : path
        ``.parquet``, ``.fits`` / ``.fit`` or ``.ecsv``.
    block_rows : int, optional
        Rows read per step.
    overwrite : bool
        Replace an existing file.
    rows : array of int, optional
        Only these store rows (a selection, e.g. from the explorer); empty slots among them
        are left out. Default: every valid row.

    Returns
    -------
    ExportResult
    """
    import zarr

    out = Path(path)
    fmt = _format(out)
    st = _base.open_store(store)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists (pass overwrite=True to replace it)")
    n_valid = _base.valid_count(st, stage="export")
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= st.n_rows):
            raise ConfigError(f"{st.path}: selected rows must lie in 0..{st.n_rows - 1}")
        if not len(rows):
            raise ConfigError(f"{st.path}: the selection is empty; nothing to export")
    present = _base.names(st)
    extra = [v for v in ("cluster", "embedding", "outlier_score") if v in present]
    block = _base.block_rows(st, block_rows)
    group = zarr.open_group(st.path, mode="r", zarr_format=3)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    columns: list[str] = []
    try:
        if fmt == "parquet":
            import pyarrow as pa

            image_len = max((len(i) for s in st.segments for i in s.images), default=1)
            writer = schema = None
            n_valid = 0
            for start in range(0, st.n_rows, block):
                t = _block_table(group, start, min(st.n_rows, start + block), extra, rows)
                if t is None:
                    continue
                n_valid += len(t)
                if writer is None:
                    writer, schema = _parquet_writer(tmp, t, image_len)
                    columns = list(t.colnames)
                arrays = [pa.array(np.asarray(t[c])) for c in t.colnames]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            if writer is None:
                raise ConfigError(f"{st.path}: no valid cutout among the selected rows")
            writer.close()
        else:
            from astropy.table import vstack

            parts = [
                t
                for start in range(0, st.n_rows, block)
                if (t := _block_table(group, start, min(st.n_rows, start + block), extra, rows))
                is not None
            ]
            if not parts:
                raise ConfigError(f"{st.path}: no valid cutout among the selected rows")
            n_valid = sum(len(t) for t in parts)
            table = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
            table.meta.update({"store": st.path, "model": st.attrs.get("model")})
            columns = list(table.colnames)
            table.write(tmp, format=fmt, overwrite=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result = ExportResult(str(out), n_valid, columns)
    logger.info("%s", result)
    return result
