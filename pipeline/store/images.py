"""The images table: one record per image and per file, inside the store (``images/``).

Per-image facts (paths, size, mtime, source record, stretch limits, segment, row range,
retired) grow with the survey, so they live in Zarr arrays rather than in the root attrs: an
open or an append costs the same at 10 and 10^6 images. :class:`ImageTable` reads the
committed records column by column; :class:`RecordedSources` reopens the images in use.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import StoreError
from ._common import _json_text

__all__ = ["IMAGES_GROUP", "ImageTable", "RecordedColumn", "RecordedSources", "parse_mtime"]

IMAGES_GROUP = "images"
_IMAGE_CHUNK = 1024
# The images table: one row per image (dim ``image``) and one per file (dim ``file``; image i
# owns files ``file_start[i]:file_stop[i]``). Numbers that are compared across the whole survey
# (segment, rows, retired, file size and mtime) are numeric columns, read and compared as
# arrays; what is only read to reopen one image (its source record, WCS header included, and
# its stretch limits) is one JSON string per image.
_IMAGE_COLUMNS: dict[str, tuple[str, Any, Any]] = {
    "id": ("image", str, ""),
    "segment": ("image", "int32", -1),
    "row_start": ("image", "int64", -1),
    "row_stop": ("image", "int64", -1),
    "file_start": ("image", "int64", -1),
    "file_stop": ("image", "int64", -1),
    "source": ("image", str, ""),
    "limits": ("image", str, ""),
    "retired": ("image", "bool", False),
    "retired_reason": ("image", str, ""),
    "retired_rows": ("image", "int64", 0),
    "file_path": ("file", str, ""),
    "file_size": ("file", "int64", -1),
    "file_mtime": ("file", "float64", np.nan),
}
_IMAGES_ABOUT = (
    "one record per image (dim image) and per file (dim file); the root's segments say how "
    "many rows are committed"
)


def parse_mtime(value: Any) -> float:
    """A file's modification time as POSIX seconds (NaN when unknown); accepts what fsspec
    filesystems report (a number, a datetime, an ISO string) and what schema-1 stores kept."""
    import datetime

    if value is None or value == "":
        return float("nan")
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        return datetime.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return float("nan")


class ImageTable:
    """The committed image records of a store, read column by column (each column once).

    ``len(table)`` is the number of records; a retired record stays, flagged, so the rows it
    names keep their history. Columns come back as numpy arrays (:meth:`column`); one image's
    full record is :meth:`record`, its source :meth:`source`.
    """

    def __init__(self, group, n_images: int, n_files: int, *, path: str = "") -> None:
        self._group = group
        self.n_images = int(n_images)
        self.n_files = int(n_files)
        self.path = str(path)
        self._cache: dict[str, np.ndarray] = {}
        self._index: dict[str, int] | None = None
        # Parsed JSON fields, by (column, record): each record's text is parsed at most once.
        self._parsed: dict[tuple[str, int], Any] = {}

    def __len__(self) -> int:
        return self.n_images

    def column(self, name: str) -> np.ndarray:
        """One column over every committed record (``file_*``: over every file)."""
        if name not in self._cache:
            dim, dtype, _ = _IMAGE_COLUMNS[name]
            n = self.n_images if dim == "image" else self.n_files
            if self._group is None or n == 0 or name not in self._group:
                values = np.zeros(0, dtype=object if dtype is str else dtype)
            else:
                values = self._group[name][:n]
                if dtype is str:
                    values = np.asarray(values, dtype=object)
            self._cache[name] = values
        return self._cache[name]

    @property
    def ids(self) -> np.ndarray:
        return self.column("id")

    def current(self) -> np.ndarray:
        """Indices of the records in use (not retired)."""
        return np.flatnonzero(~self.column("retired").astype(bool))

    def in_segment(self, segment: int, *, retired: bool = False) -> np.ndarray:
        """Indices of segment ``segment``'s records, in its plan's image order."""
        mask = self.column("segment") == segment
        if not retired:
            mask &= ~self.column("retired").astype(bool)
        return np.flatnonzero(mask)

    def find(self, image: str) -> int | None:
        """The index of the record in use for image id ``image`` (None: not in the store)."""
        if self._index is None:
            ids = self.ids
            self._index = {str(ids[i]): int(i) for i in self.current()}
        return self._index.get(image)

    def files(self, i: int) -> list[dict]:
        lo, hi = int(self.column("file_start")[i]), int(self.column("file_stop")[i])
        paths, sizes = self.column("file_path"), self.column("file_size")
        mtimes = self.column("file_mtime")
        return [
            {"path": str(paths[j]), "size": int(sizes[j]), "mtime": float(mtimes[j])}
            for j in range(lo, hi)
        ]

    def _json(self, name: str, i: int) -> Any:
        """Record ``i``'s JSON column ``name`` parsed (None when empty), once per record."""
        key = (name, int(i))
        if key not in self._parsed:
            text = str(self.column(name)[i])
            self._parsed[key] = json.loads(text) if text else None
        return self._parsed[key]

    def has(self, name: str) -> np.ndarray:
        """Indices of the records in use whose JSON column ``name`` (``source``, ``limits``) is
        recorded; tests the raw text, parses nothing."""
        current = self.current()
        if not len(current):
            return current
        text = self.column(name)
        return current[np.fromiter((bool(str(text[i])) for i in current), bool, len(current))]

    def limits(self, i: int) -> np.ndarray | None:
        """Image ``i``'s stretch limits as the workers use them (float32), or None."""
        value = self._json("limits", i)
        return None if value is None else np.asarray(value, np.float32)

    def source_record(self, i: int) -> dict | None:
        rec = self._json("source", i)
        return None if rec is None else copy.deepcopy(rec)

    def source(self, i: int, *, from_files: bool = False):
        """Image ``i`` reopened lazily, exactly as it was fingerprinted (HDU and variable).

        With ``from_files``, a record without a source (stores written before sources were
        recorded name only their files) is reopened from its files by path instead; without
        it such a record is a StoreError.
        """
        from ..sources import ImageSource

        rec = self._json("source", i)
        if rec is not None:
            return ImageSource.from_record(rec)
        if not from_files:
            raise StoreError(f"the store records no source for image {self.ids[i]!r}")
        return self._source_from_files(i)

    def _source_from_files(self, i: int):
        from ..sources import open_sources

        image = str(self.ids[i])
        paths = [f["path"] for f in self.files(i)]
        if not paths:
            raise StoreError(
                f"{self.path}: the store does not record the file of image {image}; the pixel baseline cannot read it"
            )
        opened = open_sources([paths[0] if len(paths) == 1 else "+".join(paths)])
        return next((s for s in opened if s.id == image), opened[0])

    def record(self, i: int) -> dict:
        """Everything recorded of image ``i`` as one mapping (JSON-able)."""
        return {
            "id": str(self.ids[i]),
            "segment": int(self.column("segment")[i]),
            "rows": [int(self.column("row_start")[i]), int(self.column("row_stop")[i])],
            "files": self.files(i),
            "source": self.source_record(i),
            "limits": copy.deepcopy(self._json("limits", i)),
            "retired": bool(self.column("retired")[i]),
            "retired_reason": str(self.column("retired_reason")[i]),
            "retired_rows": int(self.column("retired_rows")[i]),
        }

    def sources(self) -> RecordedSources:
        """The images in use, by id, reopened on first access."""
        return RecordedSources(self)


class RecordedColumn(Mapping):
    """A read-only mapping image id -> a value made from the JSON column ``column`` of the
    images table, over the records that hold one (records made before the column existed are
    not in it). Listing tests the raw column, so it parses nothing; the table is a snapshot,
    so that listing is made once."""

    column: str

    def __init__(self, table: ImageTable) -> None:
        self._table = table
        self._ids: np.ndarray | None = None

    def _index(self, image: str) -> int:
        """The table row of ``image``'s record, if it holds the column (else KeyError)."""
        i = self._table.find(image)
        if i is None or self._table._json(self.column, i) is None:
            raise KeyError(image)
        return i

    def _holding(self) -> np.ndarray:
        if self._ids is None:
            self._ids = self._table.has(self.column)
        return self._ids

    def __iter__(self):
        ids = self._table.ids
        return (str(ids[i]) for i in self._holding())

    def __len__(self) -> int:
        return len(self._holding())


class RecordedSources(RecordedColumn):
    """Image id -> :class:`~pipeline.sources.ImageSource` over the images in use; each source
    is made from its record when first asked for."""

    column = "source"

    def __init__(self, table: ImageTable) -> None:
        super().__init__(table)
        self._made: dict[str, Any] = {}

    def __getitem__(self, image: str):
        if image not in self._made:
            self._made[image] = self._table.source(self._index(image))
        return self._made[image]


def _images_columns(group, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Every column of the ``images/`` group, by name, each opened once (an open reads its
    metadata) or made (of ``sizes[dim]`` records) when missing."""
    if IMAGES_GROUP in group:
        table = group[IMAGES_GROUP]
    else:
        table = group.create_group(IMAGES_GROUP, attributes={"about": _IMAGES_ABOUT})
    columns = {}
    for name, (dim, dtype, fill) in _IMAGE_COLUMNS.items():
        try:
            columns[name] = table[name]
        except KeyError:
            columns[name] = table.create_array(
                name,
                shape=((sizes or {}).get(dim, 0),),
                dtype=dtype,
                chunks=(_IMAGE_CHUNK,),
                fill_value=fill,
                dimension_names=(dim,),
            )
    return columns


def _write_column(arr, at: int, values: list, dtype: Any) -> None:
    """Write ``values`` at ``at`` (the column already long enough): only the chunks they fall
    in are written, so an append costs what it adds."""
    if values:
        arr[at : at + len(values)] = np.asarray(values, dtype=object if dtype is str else dtype)


def append_records(
    root,
    images: Sequence[str],
    inputs: Mapping,
    rows: np.ndarray,
    image_start: int,
    file_start: int,
    *,
    segment: int,
    on_chunk: Callable[[int], Any] | None = None,
) -> int:
    """Write the records of ``images`` into the table of the store group ``root``, at table
    rows ``image_start...`` and file rows ``file_start...`` (uncommitted until the segment is
    recorded); returns the number of files written. ``on_chunk(n)`` follows each chunk of
    ``n`` records written.

    The image columns are made (or grown) once to their new length, then written a table
    chunk of images at a time, each record asked of ``inputs`` once (it may be made when asked
    for): the client holds one chunk's JSON texts and encoded strings, never the whole
    segment's (at 10^4 images that was a 190 MB peak for 40 MB of records). The file columns
    grow with each chunk, by the files its records name."""
    # A resize updates the column's handle too: each is opened once an append.
    arrays = _images_columns(root, {"image": image_start + len(images), "file": file_start})
    for name, (dim, _, _) in _IMAGE_COLUMNS.items():
        stop = image_start + len(images) if dim == "image" else file_start
        if arrays[name].shape[0] != stop:
            arrays[name].resize((stop,))
    f = file_start
    # Slices end on the table's chunk boundaries: each chunk is encoded and written once.
    ends = range(_IMAGE_CHUNK - image_start % _IMAGE_CHUNK, len(images), _IMAGE_CHUNK)
    for lo, hi in itertools.pairwise([0, *ends, len(images)]):
        cols, f_lo = _record_columns(images[lo:hi], inputs, rows[lo:hi], f, segment), f
        f += len(cols["file_path"])
        for name, values in cols.items():
            dim, dtype, _ = _IMAGE_COLUMNS[name]
            if dim == "file" and values:
                arrays[name].resize((f,))
            _write_column(arrays[name], image_start + lo if dim == "image" else f_lo, values, dtype)
        if on_chunk is not None:
            on_chunk(hi - lo)
    return f - file_start


def _record_columns(
    images: Sequence[str], inputs: Mapping, rows: np.ndarray, file_start: int, segment: int
) -> dict[str, list]:
    """The table columns of ``images`` (their files from ``file_start`` on)."""
    cols: dict[str, list] = {name: [] for name in _IMAGE_COLUMNS}
    f = file_start
    for k, img in enumerate(images):
        rec = inputs.get(img) or {}
        files = rec.get("files") or []
        cols["id"].append(str(img))
        cols["row_start"].append(int(rows[k, 0]))
        cols["row_stop"].append(int(rows[k, 1]))
        cols["file_start"].append(f)
        cols["file_stop"].append(f + len(files))
        cols["source"].append(_json_text(rec.get("source")))
        cols["limits"].append(_json_text(rec.get("limits")))
        for fr in files:
            cols["file_path"].append(str(fr["path"]))
            size = fr.get("size")
            cols["file_size"].append(-1 if size is None else int(size))
            cols["file_mtime"].append(parse_mtime(fr.get("mtime")))
        f += len(files)
    cols["segment"] = [segment] * len(images)
    cols["retired"] = [False] * len(images)
    cols["retired_reason"] = [""] * len(images)
    cols["retired_rows"] = [0] * len(images)
    return cols


def truncate_records(root, n_images: int, n_files: int) -> bool:
    """Drop table rows past the committed ``n_images`` records and ``n_files`` files (left by
    an append killed before its segment was recorded); True if anything was dropped."""
    if IMAGES_GROUP not in root:
        return False
    counts = {"image": n_images, "file": n_files}
    table = root[IMAGES_GROUP]
    fixed = False
    for name, (dim, _, _) in _IMAGE_COLUMNS.items():
        if name in table and table[name].shape[0] > counts[dim]:
            table[name].resize((counts[dim],))
            fixed = True
    return fixed
