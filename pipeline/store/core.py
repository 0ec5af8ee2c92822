"""The fingerprint store: a Zarr v3 group that ``xarray.open_zarr`` opens.

Layout (DESIGN.md, "The store"): dims ``cutout``, ``feature``, ``topk``; ``fingerprint(cutout,
feature)``, ``top_class`` and ``top_prob(cutout, topk)``, ``valid(cutout)``,
``masked_fraction(cutout)``; coordinates ``image, x, y, width, height, ra, dec`` on ``cutout``.
Analysis adds its own variables later.

Rows are allocated up front. The plan's tiles are packed, in order, into *work units* whose row
ranges start on a chunk boundary (:func:`~pipeline.store.layout.pack_units`), so every Zarr
chunk belongs to exactly one unit and is written by exactly one task; unused rows at the end of
a unit are empty slots (``valid == False``). After a unit's data is written, its done marker is
written; a task killed before that leaves a unit that is simply done again, writing the same
bytes.

A store records what made it (model name and sha256, cutout and preprocessing config, package
version) and refuses to be appended to with anything else. Each run that adds images appends a
*segment*: its images, row range and unit range, and a digest of its plan so a rerun of the same
command maps every window to the same row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import StoreError
from . import done, plans
from ._common import _fs, _jsonable
from .images import IMAGES_GROUP, ImageTable, append_records, truncate_records
from .layout import Layout, Segment, block_rows_for, image_rows
from .lock import (
    _LOCKS_ABOUT,
    LOCKS_GROUP,
    LockInfo,
    WriterLock,
    _acquire,
    lock_holder,
    other_writer,
    unlock,
)
from .schema import COORDS, REQUIRED_VARIABLES, SCHEMA_VERSION, row_schema

__all__ = ["Store"]

logger = logging.getLogger(__name__)


class Store:
    """A fingerprint store on disk (or any fsspec URL zarr can open).

    Use :meth:`create` for a new store, :meth:`open` for an existing one; :meth:`append_segment`
    adds rows for new images; workers call :meth:`write_rows` and :meth:`mark_done`.
    """

    def __init__(self, path: str | os.PathLike, group) -> None:
        self.path = str(path)
        self._group = group
        self._flat: bool | None = None

    # -- opening ------------------------------------------------------------------------
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        fs, root = _fs(str(path))
        return fs.exists(f"{root}/zarr.json")

    @classmethod
    def open(cls, path: str | os.PathLike, *, mode: str = "r") -> Store:
        """Open and validate an existing store (``mode`` ``r`` or ``r+``)."""
        import zarr

        path = str(path)
        if not cls.exists(path):
            raise StoreError(
                f"{path}: no fingerprint store here (run `elodin fingerprint ... -o {path}` first)"
            )
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreError(
                f"{path}: not a readable Zarr v3 group ({type(e).__name__}: {e})"
            ) from None
        store = cls(path, group)
        store._check_schema()
        if mode != "r" and not other_writer(path):
            # Never while another run holds the lock: it may be half way through growing the
            # arrays, which repair would take for a killed run's leftovers.
            store.repair()
        store.validate()
        return store

    @staticmethod
    def incomplete(path: str | os.PathLike) -> bool:
        """True for a store whose creation was interrupted (a client killed inside
        :meth:`create`): it holds no rows, and :meth:`create` makes it again."""
        fs, root = _fs(str(path))
        try:
            meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
        except (FileNotFoundError, ValueError):
            return False
        attrs = meta.get("attributes") or {}
        return bool(attrs.get("elodin_incomplete")) and "elodin_schema" not in attrs

    # -- the writer lock ------------------------------------------------------------------
    @classmethod
    def lock(cls, path: str | os.PathLike, *, command: str | None = None) -> WriterLock:
        """Take the store's writer lock (``locks/writer.json``), also before the store exists.

        Runs that write (fingerprint, analysis) hold it, so a second run into the same store is
        refused with one line naming the holder (host, pid, start time, command). A lock left by
        a killed run on this host (its pid gone, reused or a zombie, or the host rebooted) is
        taken over with a warning; a lock from another host cannot be checked and is refused
        with the command that clears it (:meth:`unlock`). Use as a context manager, or call
        ``release()`` in ``finally``.

        Raises
        ------
        StoreError
            Held by another run, or the store is not writable (read-only, disk full).
        """
        return _acquire(str(path), command)

    @staticmethod
    def lock_holder(path: str | os.PathLike) -> LockInfo | None:
        """Who holds the writer lock (None: nobody)."""
        return lock_holder(str(path))

    @staticmethod
    def unlock(path: str | os.PathLike, *, force: bool = False) -> LockInfo | None:
        """Remove the writer lock; returns whom it named (None: there was none).

        A lock held by a live process on this host is refused unless ``force``.
        """
        return unlock(str(path), force=force)

    def _check_schema(self) -> None:
        attrs = self._group.attrs.asdict()
        if attrs.get("elodin_incomplete") and "elodin_schema" not in attrs:
            raise StoreError(
                f"{self.path}: the run creating this store was interrupted before it wrote "
                "anything; run the same `elodin fingerprint` command again"
            )
        schema = attrs.get("elodin_schema")
        if (
            isinstance(schema, int)
            and not isinstance(schema, bool)
            and 1 <= schema < SCHEMA_VERSION
        ):
            raise StoreError(
                f"{self.path}: store schema {schema} is older than this Elodin's "
                f"({SCHEMA_VERSION}); run `elodin upgrade {self.path}` first"
            )
        if schema != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: not an Elodin fingerprint store (schema {schema!r}, expected {SCHEMA_VERSION})"
            )

    def validate(self) -> None:
        self._check_schema()
        names = set(self._group.array_keys())
        missing = [v for v in (*REQUIRED_VARIABLES, *COORDS) if v not in names]
        if missing:
            raise StoreError(f"{self.path}: store is missing variable(s) {', '.join(missing)}")
        n = self._group["fingerprint"].shape[0]
        for name in (*REQUIRED_VARIABLES, *COORDS):
            if self._group[name].shape[0] != n:
                raise StoreError(
                    f"{self.path}: variable {name} has {self._group[name].shape[0]} rows, fingerprint has {n}"
                )

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        feature_dim: int,
        topk: int,
        chunk_rows: int,
        attrs: Mapping[str, Any],
        dtype: str = "float32",
    ) -> Store:
        """Create an empty store (0 rows) recording ``attrs`` (model, configs, version)."""
        import zarr

        path = str(path)
        fs, root = _fs(path)
        if cls.incomplete(path):
            # A creation killed half way: nothing was ever appended, so start it over.
            for child in fs.ls(root, detail=False):
                if child.rstrip("/").rsplit("/", 1)[-1] != LOCKS_GROUP:
                    fs.rm(child, recursive=True)
        elif cls.exists(path):
            raise StoreError(f"{path}: a store already exists here")
        # The run's writer lock may already be there (locks/): then the group is made around it.
        names = (
            {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
            if fs.exists(root)
            else set()
        )
        # Marked incomplete until every array exists (see incomplete()).
        group = zarr.open_group(
            path,
            mode="a" if names <= {LOCKS_GROUP} else "w-",
            zarr_format=3,
            attributes={"elodin_incomplete": True},
        )
        for name, var in row_schema(feature_dim, topk, dtype).items():
            arr = group.create_array(
                name,
                shape=(0, *var.tail),
                dtype=var.dtype,
                chunks=(chunk_rows, *var.tail),
                fill_value=var.fill,
                dimension_names=("cutout", *var.dims),
            )
            if name not in COORDS:
                # The CF attribute xarray reads to tell coordinates from data variables.
                arr.attrs["coordinates"] = " ".join(COORDS)
        # Done markers live in a subgroup of their own so zarr and xarray see a valid hierarchy.
        group.create_group(done.DONE_GROUP, attributes=done.done_attrs())
        if LOCKS_GROUP not in group:
            group.create_group(LOCKS_GROUP, attributes={"about": _LOCKS_ABOUT})
        # One write of the whole attribute document: complete, and no longer marked incomplete.
        group.attrs.put(
            _jsonable(
                {
                    **dict(attrs),
                    "elodin_schema": SCHEMA_VERSION,
                    "chunk_rows": int(chunk_rows),
                    "segments": [],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
        return cls(path, group)

    # -- facts ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        return self._group.attrs.asdict()

    @property
    def n_rows(self) -> int:
        return int(self._group["fingerprint"].shape[0])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    def block_rows(self, block_rows: int | None = None) -> int:
        """Rows per block when streaming a per-row variable: ``block_rows`` (default 64
        chunks, :data:`~pipeline.store.layout.BLOCK_CHUNKS`) rounded down to whole chunks."""
        return block_rows_for(self.chunk_rows, block_rows)

    @property
    def segments(self) -> list[Segment]:
        return [Segment.from_json(s) for s in self.attrs.get("segments", [])]

    @property
    def n_units(self) -> int:
        segs = self.segments
        return segs[-1].unit_stop if segs else 0

    def images(self) -> ImageTable:
        """The per-image records (files, size, mtime, source, limits, segment, rows, retired)
        committed by the recorded segments; one read per column used, however many images."""
        segs = self.segments
        group = self._group.get(IMAGES_GROUP) if segs else None
        return ImageTable(
            group,
            segs[-1].image_stop if segs else 0,
            segs[-1].file_stop if segs else 0,
            path=self.path,
        )

    def n_retired(self) -> int:
        """Images retired so far (their rows are no longer valid)."""
        return int(np.count_nonzero(self.images().column("retired")))

    def array(self, name: str):
        return self._group[name]

    @staticmethod
    def zarr(path: str | os.PathLike, name: str | None = None, *, mode: str = "r"):
        """The Zarr group at ``path`` (or its array ``name``), opened afresh: metadata as it is
        now (arrays another process created or resized since a :class:`Store` was opened).

        The one door to Zarr for the analysis stages and their block tasks, which get a path
        (picklable, cheap) rather than a validated Store.
        """
        import zarr

        path = str(path)
        if name is None:
            return zarr.open_group(path, mode=mode, zarr_format=3)
        return zarr.open_array(f"{path.rstrip('/')}/{name}", mode=mode, zarr_format=3)

    def dataset(self):
        """The store as a lazy :class:`xarray.Dataset`."""
        import xarray as xr

        return xr.open_zarr(self.path, consolidated=False, zarr_format=3)

    # -- growing -------------------------------------------------------------------------
    def check_compatible(self, attrs: Mapping[str, Any]) -> None:
        """Refuse a run whose model or configuration differs from the store's."""
        mine = self.attrs
        for key in (
            "model",
            "model_sha256",
            "cutouts",
            "preprocess",
            "tiling",
            "fingerprint_dtype",
        ):
            if key in attrs and mine.get(key) != _jsonable(attrs[key]):
                # The default model has changed (2026-12-03, 2026-12-06): name the flag that
                # appends.
                same = "the same settings"
                if key == "model":
                    name, _, precision = str(mine.get(key)).partition("@")
                    same = f"--model {name}" + (
                        f" with model.precision {precision}" if precision else ""
                    )
                raise StoreError(
                    f"{self.path}: store was made with {key} = {json.dumps(mine.get(key), sort_keys=True)}, "
                    f"this run uses {json.dumps(_jsonable(attrs[key]), sort_keys=True)}; use a new store (-o) or {same}"
                )

    def append_segment(
        self,
        *,
        images: Sequence[str],
        layout: Layout,
        plan_digest: str,
        inputs: Mapping,
        plan=None,
        on_records: Callable[[int], Any] | None = None,
    ) -> Segment:
        """Grow every row array by ``layout.n_rows`` and record the new segment.

        ``inputs`` maps each image id to its record: ``files`` (``path``, ``size``, ``mtime``),
        ``source`` (:meth:`ImageSource.to_record`) and ``limits``. ``plan`` (the segment's
        plan) gives each image's row range; without it an image spans the segment's rows.
        ``on_records(n)`` is called as each table chunk of ``n`` records is written (a bar).

        The order is the commit protocol: the images table grows first, then the row arrays,
        and the segment record in the root attrs, written last and at once, makes both count.
        A client killed before that leaves rows past the recorded segments, which
        :meth:`repair` drops.
        """
        segs = self.segments
        start = self.n_rows
        image_start = segs[-1].image_stop if segs else 0
        file_start = segs[-1].file_stop if segs else 0
        rows = (
            image_rows(plan, layout)
            if plan is not None
            else np.tile([0, layout.n_rows], (len(images), 1)).astype(np.int64)
        )
        rows = np.where(rows >= 0, rows + start, -1)
        n_files = self._append_images(
            images, inputs, rows, image_start, file_start, segment=len(segs), on_chunk=on_records
        )
        seg = Segment(
            row_start=start,
            row_stop=start + layout.n_rows,
            unit_start=self.n_units,
            unit_stop=self.n_units + layout.n_units,
            plan_digest=plan_digest,
            n_windows=int(layout.unit_windows[-1]),
            image_start=image_start,
            image_stop=image_start + len(images),
            file_start=file_start,
            file_stop=file_start + n_files,
        )
        for name in self._row_array_names():
            arr = self._group[name]
            arr.resize((seg.row_stop, *arr.shape[1:]))
        self._group.attrs["segments"] = [*self.attrs.get("segments", []), seg.to_json()]
        return seg

    def _append_images(
        self,
        images: Sequence[str],
        inputs: Mapping,
        rows: np.ndarray,
        image_start: int,
        file_start: int,
        *,
        segment: int,
        on_chunk: Callable[[int], Any] | None = None,
    ) -> int:
        """Write the records of ``images`` at table rows ``image_start...`` (uncommitted until
        the segment is recorded); returns the number of files written."""
        return append_records(
            self._group,
            images,
            inputs,
            rows,
            image_start,
            file_start,
            segment=segment,
            on_chunk=on_chunk,
        )

    def _row_array_names(self) -> list[str]:
        return [
            n
            for n in self._group.array_keys()
            if self._group[n].metadata.dimension_names[:1] == ("cutout",)
        ]

    # -- plans ----------------------------------------------------------------------------
    def save_plan(self, index: int, plan) -> None:
        """Keep segment ``index``'s plan in the store, so a resume maps windows to the same rows
        without planning again (blob detection included)."""
        plans.save_plan(self._group, index, plan)

    def load_plan(self, index: int):
        """The plan saved for segment ``index`` (None if it was never saved)."""
        return plans.load_plan(self._group, index)

    def repair(self) -> bool:
        """Undo a half-finished append (arrays grown, segment not yet recorded).

        Growing is: plan saved, arrays resized, then the segment recorded in attrs. A client
        killed between the last two leaves arrays longer than the recorded segments; those rows
        were never handed to a task, so shrinking them back restores the last consistent state.
        """
        segs = self.segments
        expected = segs[-1].row_stop if segs else 0
        fixed = truncate_records(
            self._group, segs[-1].image_stop if segs else 0, segs[-1].file_stop if segs else 0
        )
        for name in self._row_array_names():
            arr = self._group[name]
            if arr.shape[0] != expected:
                logger.warning(
                    "%s: %s has %d rows, segments record %d; shrinking back",
                    self.path,
                    name,
                    arr.shape[0],
                    expected,
                )
                arr.resize((expected, *arr.shape[1:]))
                fixed = True
        return fixed

    # -- analysis variables ----------------------------------------------------------------
    def create_row_array(
        self,
        name: str,
        *,
        tail: Sequence[int] = (),
        dims: Sequence[str] = (),
        dtype: str = "float32",
        fill: Any = np.nan,
        attrs: Mapping | None = None,
    ):
        """(Re)create a per-row variable ``name(cutout, *dims)`` chunked like the store.

        Analysis writes its results (``pca``, ``cluster``, ``embedding``, ``outlier_score``)
        this way, then fills it block by block with :meth:`write_rows`.
        """
        if len(tail) != len(dims):
            raise ValueError("one dim name per trailing axis")
        arr = self._group.create_array(
            name,
            shape=(self.n_rows, *tail),
            dtype=dtype,
            chunks=(self.chunk_rows, *tail),
            fill_value=fill,
            dimension_names=("cutout", *dims),
            overwrite=True,
        )
        arr.attrs.update({"coordinates": " ".join(COORDS), **dict(attrs or {})})
        return arr

    def write_array(
        self, name: str, data: np.ndarray, *, dims: Sequence[str], attrs: Mapping | None = None
    ):
        """(Re)write a small whole variable (model parameters: PCA components, centroids ...)."""
        data = np.asarray(data)
        if data.ndim != len(dims):
            raise ValueError(f"{name}: {data.ndim} axes but {len(dims)} dim names")
        chunks = tuple(max(1, d) for d in data.shape)
        arr = self._group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            dimension_names=tuple(dims),
            overwrite=True,
        )
        if data.size:
            arr[...] = data
        if attrs:
            arr.attrs.update(dict(attrs))
        return arr

    def set_attrs(self, **values: Any) -> None:
        """Record facts about analysis runs in the store's attrs (JSON-able values)."""
        self._group.attrs.update(_jsonable(values))

    def iter_blocks(self, name: str, *, block_rows: int | None = None):
        """Yield ``(start, values)`` over a per-row variable in chunk-aligned blocks."""
        arr = self._group[name]
        step = self.block_rows(block_rows)
        for start in range(0, arr.shape[0], step):
            yield start, arr[start : start + step]

    def retire_image(self, index: int, image: str, *, reason: str = "changed") -> int:
        """Take ``image``'s rows in segment ``index`` out of use (``valid = False``) and flag
        its record retired, so the image can be fingerprinted again as new.

        Only for a complete segment (no task will write those rows again). Returns the number
        of rows retired. The flag is written last: a retire killed half way is done again.
        """
        seg = self.segments[index]
        units = range(seg.unit_start, seg.unit_stop)
        if len(self.done_units(units)) < len(units):
            raise StoreError(
                f"{self.path}: image {image} changed while the run that added it is unfinished; finish that run first"
            )
        table = self.images()
        i = table.find(image)
        if i is None or int(table.column("segment")[i]) != index:
            raise StoreError(f"{self.path}: segment {index} holds no image {image!r} in use")
        lo, hi = int(table.column("row_start")[i]), int(table.column("row_stop")[i])
        valid, ids = self._group["valid"], self._group["image"]
        step = self.block_rows()
        n = 0
        if lo >= 0:
            for b in range(lo - lo % self.chunk_rows, hi, step):
                e = min(hi, b + step)
                mask = np.asarray(ids[b:e], dtype=object) == image
                if mask.any():
                    v = valid[b:e]
                    n += int(np.count_nonzero(v & mask))
                    v[mask] = False
                    valid[b:e] = v
        group = self._group[IMAGES_GROUP]
        group["retired_rows"][i] = n
        group["retired_reason"][i] = reason
        group["retired"][i] = True
        return n

    # -- writing (workers) ----------------------------------------------------------------
    def write_rows(self, start: int, values: Mapping[str, np.ndarray]) -> None:
        """Write whole chunks of rows starting at ``start`` (a chunk boundary)."""
        if start % self.chunk_rows:
            raise ValueError(f"write at row {start} is not on a chunk boundary ({self.chunk_rows})")
        for name, data in values.items():
            arr = self._group[name]
            arr[start : start + len(data)] = data

    def _flat_markers(self) -> bool:
        # Read once per Store: a store made before the markers were sharded stays so.
        if self._flat is None:
            self._flat = done.has_flat_markers(*_fs(self.path))
        return self._flat

    def mark_done(self, unit: int) -> None:
        """Record unit ``unit`` finished (after all its rows are written)."""
        done.mark_done(*_fs(self.path), unit)

    def done_units(self, units: range | None = None) -> set[int]:
        """Units whose marker exists, of ``units`` (None: every unit).

        Lists only the marker shards that ``units`` overlaps (4,096 units each), so asking
        for a segment's units costs what the segment holds.
        """
        return done.done_units(*_fs(self.path), units, flat=self._flat_markers())

    def clear_done(self, units: Sequence[int]) -> None:
        """Forget units (their rows will be written again)."""
        done.clear_done(*_fs(self.path), units, flat=self._flat_markers())

    # -- a few rows at a time (the explorer's labels) --------------------------------------
    def write_values(self, name: str, rows: Sequence[int], values: np.ndarray) -> None:
        """Set the existing per-row variable ``name`` at ``rows`` (any order, each row once),
        leaving every other row as it is: only the chunks holding those rows are rewritten.

        For edits of a few rows (a label set in the explorer); whole results go through
        :meth:`write_rows`.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            return
        arr = self._group[name]
        if rows.min() < 0 or rows.max() >= arr.shape[0]:
            raise ValueError(f"{name}: rows outside 0..{arr.shape[0] - 1}")
        order = np.argsort(rows, kind="stable")
        arr.oindex[rows[order]] = np.asarray(values)[order]

    def append_table(self, name: str, records: Mapping[str, np.ndarray], *, dim: str) -> int:
        """Append records to a small table kept as 1-D variables ``{name}_{column}(dim)``
        (created on first use); returns the table's length afterwards.

        Every column is grown and written before the next, so a table interrupted half way
        has columns of unequal length; readers use the shortest.
        """
        n = {len(np.asarray(v).reshape(-1)) for v in records.values()}
        if len(n) != 1:
            raise ValueError(f"{name}: columns of unequal length")
        (count,) = n
        length = 0
        for column, values in records.items():
            values = np.asarray(values).reshape(-1)
            key = f"{name}_{column}"
            if key not in self._group:
                self._group.create_array(
                    key, shape=(0,), dtype=values.dtype, chunks=(4096,), dimension_names=(dim,)
                )
            arr = self._group[key]
            start = arr.shape[0]
            arr.resize((start + count,))
            if count:
                arr[start:] = values
            length = start + count
        return length
