"""The fingerprint store: a Zarr v3 group that ``xarray.open_zarr`` opens, and the only door to
it (DESIGN.md, "The store"; docs/ARCHITECTURE.md, "store/").

One module per job:

- :mod:`.schema`: the schema version, the variables and coordinates a store holds, every
  per-row variable's dtype and fill (:func:`row_schema`, :func:`empty_rows`);
- :mod:`.layout`: work units that own whole chunks (:func:`pack_units`), the chunk size of a new
  store (:func:`chunk_rows_for`), segments and each image's row range (pure numpy);
- :mod:`.images`: the images table (:class:`ImageTable`, :class:`RecordedSources`);
- :mod:`.plans`: each segment's plan kept in the store;
- :mod:`.done`: the done markers, sharded by unit number;
- :mod:`.lock`: the writer lock (:class:`WriterLock`, :class:`LockInfo`);
- :mod:`.core`: :class:`Store`, which opens, creates, grows and writes a store;
- :mod:`.upgrades`: ``elodin upgrade`` (:func:`upgrade`).
"""

from __future__ import annotations

from .core import Store
from .images import IMAGES_GROUP, ImageTable, RecordedSources, parse_mtime
from .layout import (
    BLOCK_CHUNKS,
    Layout,
    Segment,
    block_rows_for,
    chunk_rows_for,
    image_rows,
    pack_units,
)
from .lock import LockInfo, WriterLock
from .schema import (
    COORDS,
    REQUIRED_VARIABLES,
    SCHEMA_VERSION,
    RowVariable,
    empty_rows,
    filled_rows,
    row_schema,
)
from .upgrades import upgrade

__all__ = [
    "BLOCK_CHUNKS",
    "COORDS",
    "IMAGES_GROUP",
    "REQUIRED_VARIABLES",
    "SCHEMA_VERSION",
    "ImageTable",
    "Layout",
    "LockInfo",
    "RecordedSources",
    "RowVariable",
    "Segment",
    "Store",
    "WriterLock",
    "block_rows_for",
    "chunk_rows_for",
    "empty_rows",
    "filled_rows",
    "image_rows",
    "pack_units",
    "parse_mtime",
    "row_schema",
    "upgrade",
]
