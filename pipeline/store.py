"""The fingerprint store: a Zarr v3 group that ``xarray.open_zarr`` opens.

Layout (DESIGN.md, "The store"): dims ``cutout``, ``feature``, ``topk``; ``fingerprint(cutout,
feature)``, ``top_class`` and ``top_prob(cutout, topk)``, ``valid(cutout)``,
``masked_fraction(cutout)``; coordinates ``image, x, y, width, height, ra, dec`` on ``cutout``.
Analysis adds its own variables later.

Rows are allocated up front. The plan's tiles are packed, in order, into *work units* whose row
ranges start on a chunk boundary (:func:`pack_units`), so every Zarr chunk belongs to exactly one
unit and is written by exactly one task; unused rows at the end of a unit are empty slots
(``valid == False``). After a unit's data is written, its marker ``done/<unit>`` is written; a
task killed before that leaves a unit that is simply done again, writing the same bytes.

A store records what made it (model name and sha256, cutout and preprocessing config, package
version) and refuses to be appended to with anything else. Each run that adds images appends a
*segment*: its images, row range and unit range, and a digest of its plan so a rerun of the same
command maps every window to the same row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError

__all__ = [
    "IMAGES_GROUP",
    "REQUIRED_VARIABLES",
    "SCHEMA_VERSION",
    "ImageTable",
    "Layout",
    "LockInfo",
    "RecordedSources",
    "Segment",
    "Store",
    "WriterLock",
    "chunk_rows_for",
    "image_rows",
    "pack_units",
    "parse_mtime",
    "upgrade",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Schema 1 kept every image's record in the root attrs (segments[*].images / inputs, retired);
# `elodin upgrade STORE` moves them into the images table.
REQUIRED_VARIABLES = ("fingerprint", "top_class", "top_prob", "valid", "masked_fraction")
COORDS = ("image", "x", "y", "width", "height", "ra", "dec")
# dtype and fill of every per-row array the fingerprint stage writes
_ROW_ARRAYS: dict[str, tuple[str, Any]] = {
    "valid": ("bool", False),
    "masked_fraction": ("float32", np.nan),
    "x": ("float64", np.nan),
    "y": ("float64", np.nan),
    "width": ("int32", 0),
    "height": ("int32", 0),
    "ra": ("float64", np.nan),
    "dec": ("float64", np.nan),
}


# ------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each work unit's windows go in the store (pure numpy; cheap for 10^6 tiles).

    Unit ``u`` owns the plan's windows ``unit_windows[u]:unit_windows[u+1]`` and the rows
    ``unit_rows[u]:unit_rows[u+1]``, relative to the segment's first row (chunk-aligned; the
    last chunk may hold empty slots).
    """

    chunk_rows: int
    unit_windows: np.ndarray
    unit_rows: np.ndarray

    @property
    def n_units(self) -> int:
        return len(self.unit_windows) - 1

    @property
    def n_rows(self) -> int:
        return int(self.unit_rows[-1])

    def window_rows(self) -> np.ndarray:
        """Row (relative to the segment) of every window of the plan, in plan order."""
        counts = np.diff(self.unit_windows)
        starts = np.repeat(self.unit_rows[:-1] - self.unit_windows[:-1], counts)
        return starts + np.arange(self.unit_windows[-1])


def pack_units(tile_start: np.ndarray, *, chunk_rows: int) -> Layout:
    """Cut the plan's windows into work units that own whole chunks.

    A tile with more windows than a chunk is cut every ``chunk_rows`` windows into pieces of
    their own (windows are row-major in a tile, so a piece is a band of it, read alone); then
    consecutive pieces share a unit while they start in the same chunk-sized bucket of the
    window order. So small tiles share one task, a large tile is worked on by several, and a
    unit never holds two chunks' worth of windows (memory per task is bounded by the chunk).
    """
    tile_start = np.asarray(tile_start, dtype=np.int64)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if len(tile_start) < 2 or tile_start[-1] == 0:
        z = np.zeros(1, np.int64)
        return Layout(chunk_rows, z, z)
    counts = np.diff(tile_start)
    pieces = np.maximum(1, -(-counts // chunk_rows))
    first_piece = np.cumsum(pieces) - pieces
    within = np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)
    starts = np.unique(np.repeat(tile_start[:-1], pieces) + within * chunk_rows)
    starts = starts[starts < tile_start[-1]]
    bucket = starts // chunk_rows
    first = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    unit_windows = np.r_[starts[first], tile_start[-1]].astype(np.int64)
    n = np.diff(unit_windows)
    unit_rows = np.r_[0, np.cumsum(-(-n // chunk_rows) * chunk_rows)].astype(np.int64)
    return Layout(chunk_rows, unit_windows, unit_rows)


def chunk_rows_for(
    n_windows: int,
    *,
    threads: int,
    largest: int,
    smallest: int = 1,
    units_per_thread: int = 4,
    multiple: int = 1,
) -> int:
    """Rows per Zarr chunk for a new store whose first plan holds ``n_windows`` windows.

    :func:`pack_units` makes at least ``floor(n_windows / chunk_rows)`` units (a piece is at
    most a chunk long, so every whole chunk-sized bucket of the window order holds the start of
    a piece, and the first of them starts a unit), so a chunk of at most
    ``n_windows // (units_per_thread * threads)`` rows gives every worker thread at least
    ``units_per_thread`` units: the run's tail, when some threads have nothing left, is then
    short. It is rounded down to a ``multiple`` (the batch size: full batches) and kept within
    ``[smallest, largest]``; ``largest`` wins (a configured small chunk is kept as it is), and
    ``smallest`` bounds the per-unit overhead (a task, a session call per batch, a tile read).
    """
    if largest < 1 or smallest < 1 or threads < 1 or units_per_thread < 1 or multiple < 1:
        raise ValueError("chunk sizes, threads, units per thread and multiple must be >= 1")
    want = int(n_windows) // (units_per_thread * threads)
    if want >= multiple:
        want -= want % multiple
    return max(1, min(largest, max(smallest, want)))


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows and units one run appended to the store, and where its images' records are.

    The segment's images are the rows ``image_start:image_stop`` of the images table
    (:meth:`Store.images`) and their files ``file_start:file_stop``; a segment record has a
    fixed size, whatever the number of images.
    """

    row_start: int
    row_stop: int
    unit_start: int
    unit_stop: int
    plan_digest: str
    n_windows: int = 0
    image_start: int = 0
    image_stop: int = 0
    file_start: int = 0
    file_stop: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> Segment:
        return cls(
            **{
                f.name: int(d[f.name])
                for f in dataclasses.fields(cls)
                if f.name != "plan_digest" and f.name in d
            },
            plan_digest=str(d["plan_digest"]),
        )


# ------------------------------------------------------------------------------- images table
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

    def __init__(self, group, n_images: int, n_files: int) -> None:
        self._group = group
        self.n_images = int(n_images)
        self.n_files = int(n_files)
        self._cache: dict[str, np.ndarray] = {}
        self._index: dict[str, int] | None = None

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

    def limits(self, i: int) -> np.ndarray | None:
        """Image ``i``'s stretch limits as the workers use them (float32), or None."""
        value = self._limits_record(i)
        return None if value is None else np.asarray(value, np.float32)

    def _limits_record(self, i: int) -> Any:
        text = str(self.column("limits")[i])
        return json.loads(text) if text else None

    def source_record(self, i: int) -> dict | None:
        text = str(self.column("source")[i])
        return json.loads(text) if text else None

    def source(self, i: int):
        """Image ``i`` reopened lazily, exactly as it was fingerprinted (HDU and variable)."""
        from .sources import ImageSource

        rec = self.source_record(i)
        if rec is None:
            raise StoreError(f"the store records no source for image {self.ids[i]!r}")
        return ImageSource.from_record(rec)

    def record(self, i: int) -> dict:
        """Everything recorded of image ``i`` as one mapping (JSON-able)."""
        return {
            "id": str(self.ids[i]),
            "segment": int(self.column("segment")[i]),
            "rows": [int(self.column("row_start")[i]), int(self.column("row_stop")[i])],
            "files": self.files(i),
            "source": self.source_record(i),
            "limits": self._limits_record(i),
            "retired": bool(self.column("retired")[i]),
            "retired_reason": str(self.column("retired_reason")[i]),
            "retired_rows": int(self.column("retired_rows")[i]),
        }

    def sources(self) -> RecordedSources:
        """The images in use, by id, reopened on first access."""
        return RecordedSources(self)


class RecordedSources(Mapping):
    """A read-only mapping image id -> :class:`~pipeline.sources.ImageSource` over the images
    in use; each source is made from its record when first asked for."""

    def __init__(self, table: ImageTable) -> None:
        self._table = table
        self._made: dict[str, Any] = {}

    def __getitem__(self, image: str):
        if image not in self._made:
            i = self._table.find(image)
            if i is None or self._table.source_record(i) is None:
                raise KeyError(image)
            self._made[image] = self._table.source(i)
        return self._made[image]

    def _with_source(self) -> np.ndarray:
        # Records without a source (stores written before sources were recorded) are not in
        # the mapping, as __getitem__ says.
        current = self._table.current()
        recorded = self._table.column("source")
        return current[[bool(str(recorded[i])) for i in current]] if len(current) else current

    def __iter__(self):
        ids = self._table.ids
        return (str(ids[i]) for i in self._with_source())

    def __len__(self) -> int:
        return len(self._with_source())


def image_rows(plan, layout: Layout) -> np.ndarray:
    """``(n_images, 2)`` rows ``[start, stop)`` (relative to the segment) spanned by each image
    of ``plan`` (``-1, -1`` for an image with no window); the range bounds the rows a retire
    has to look at."""
    n = len(plan.images)
    out = np.full((n, 2), -1, np.int64)
    if plan.n_windows == 0 or n == 0:
        return out
    rows = layout.window_rows()
    img = np.repeat(plan.tiles["image"].astype(np.int64), np.diff(plan.tile_start))
    start = np.full(n, np.iinfo(np.int64).max, np.int64)
    stop = np.full(n, -1, np.int64)
    np.minimum.at(start, img, rows)
    np.maximum.at(stop, img, rows + 1)
    has = stop >= 0
    out[has, 0], out[has, 1] = start[has], stop[has]
    return out


# -------------------------------------------------------------------------------------- store
def _fs(path: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/")


# --------------------------------------------------------------------------------- writer lock
LOCKS_GROUP = "locks"
LOCK_FILE = "writer.json"
_LOCKS_ABOUT = "the writer lock of the run adding to this store (elodin unlock STORE clears it)"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a Linux process, None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _command_line() -> str:
    import shlex
    import sys

    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name in ("elodin", "cli.py", "__main__.py"):
        argv[0] = "elodin"
    elif argv[0] in ("-c", "-"):
        argv.insert(0, "python")
    return shlex.join(argv)


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds a store's writer lock: what ``locks/writer.json`` records.

    ``boot_id`` and ``proc_start`` (Linux) tell a live holder from a reused pid or a host that
    has rebooted since.
    """

    host: str
    pid: int
    started: str
    command: str
    token: str = ""
    boot_id: str | None = None
    proc_start: str | None = None

    @classmethod
    def current(cls, command: str | None = None) -> LockInfo:
        import socket

        stat = _proc_stat(os.getpid())
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            command=(command or _command_line())[:500],
            token=os.urandom(8).hex(),
            boot_id=_boot_id(),
            proc_start=stat[1] if stat else None,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started} ({self.command})"

    def state(self) -> str:
        """``live``, ``stale`` (same host, process gone) or ``unknown`` (another host)."""
        import socket

        if self.host != socket.gethostname():
            return "unknown"
        boot = _boot_id()
        if self.boot_id and boot and self.boot_id != boot:
            return "stale"  # the host rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return "stale"
        except PermissionError:
            pass  # alive, another user's
        except OSError:
            return "unknown"
        stat = _proc_stat(self.pid)
        if stat is not None:
            state, start = stat
            if state in ("Z", "X") or (self.proc_start and start != self.proc_start):
                return "stale"  # a zombie, or the pid now belongs to another process
        return "live"


def _lock_paths(path: str) -> tuple[Any, str, str]:
    fs, root = _fs(path)
    return fs, root, f"{root}/{LOCKS_GROUP}/{LOCK_FILE}"


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _read_lock(fs, lock_file: str) -> LockInfo | None:
    """The recorded holder; None when there is no lock. A lock file that is not the JSON a
    lock writes (an old or damaged file) is reported by a holder that cannot be verified."""
    try:
        raw = fs.cat_file(lock_file)
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        return LockInfo(
            host=str(d["host"]),
            pid=int(d["pid"]),
            started=str(d.get("started", "?")),
            command=str(d.get("command", "?")),
            token=str(d.get("token", "")),
            boot_id=d.get("boot_id"),
            proc_start=d.get("proc_start"),
        )
    except (ValueError, KeyError, TypeError):
        return LockInfo(host="?", pid=-1, started="?", command="unreadable lock file")


def _ensure_locks_group(fs, root: str) -> None:
    """Make ``locks/`` a Zarr group (zarr and xarray keep seeing a valid hierarchy)."""
    meta = f"{root}/{LOCKS_GROUP}/zarr.json"
    if not fs.exists(meta):
        fs.makedirs(f"{root}/{LOCKS_GROUP}", exist_ok=True)
        body = {"zarr_format": 3, "node_type": "group", "attributes": {"about": _LOCKS_ABOUT}}
        fs.pipe_file(meta, json.dumps(body, indent=2).encode())


def _create_lock_file(fs, lock_file: str, data: bytes, token: str) -> bool:
    """Create ``lock_file`` holding ``data`` unless it exists; True when this call created it.

    Local: the content is written to a private temporary file that is then hard-linked to the
    lock's name. ``link`` fails when the name exists (atomic, NFS included), and the lock never
    appears half written. Where hard links are not supported, ``O_CREAT | O_EXCL``.
    Other fsspec filesystems: best effort (check, write, read back); object stores have no
    atomic create-if-absent that fsspec exposes everywhere, so two runs starting within the
    same instant could both pass; docs/threat-model.md says so.
    """
    if _is_local(fs):
        tmp = f"{lock_file}.{token}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, lock_file)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE or SMB mounts)
                pass
        finally:
            _quietly(os.unlink, tmp)
        try:
            fd = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if fs.exists(lock_file):
        return False
    fs.pipe_file(lock_file, data)
    held = _read_lock(fs, lock_file)
    return held is not None and held.token == token


def _remove_stale(fs, lock_file: str, stale: LockInfo, token: str) -> None:
    """Remove the lock ``stale`` describes, and only that one: it is renamed aside first (one
    of several racing runs wins the rename), and put back if it turned out to be a fresh lock
    another run took meanwhile."""
    if not _is_local(fs):
        held = _read_lock(fs, lock_file)
        if held is not None and held.token == stale.token:
            fs.rm(lock_file)
        return
    aside = f"{lock_file}.{token}.stale"
    try:
        os.rename(lock_file, aside)
    except FileNotFoundError:
        return  # another run took it over first
    if _read_lock(fs, aside) == stale:
        os.unlink(aside)
        return
    try:
        os.link(aside, lock_file)  # not the stale lock: restore it (fails if a third run took it)
    except FileExistsError:
        pass
    os.unlink(aside)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


_HELD: dict[str, WriterLock] = {}


class WriterLock:
    """A held writer lock on a store (see :meth:`Store.lock`); a context manager.

    Locks are re-entrant within a thread: a caller holding the lock can call
    :func:`pipeline.fingerprint.fingerprint`, which takes it again inside. Another thread of the
    same process is refused like another process.
    """

    def __init__(self, path: str, info: LockInfo, *, made_root: bool) -> None:
        import threading

        self.path = path
        self.info = info
        self._made_root = made_root
        self._depth = 1
        self._thread = threading.get_ident()

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._depth > 0

    def release(self) -> None:
        """Give the lock back (the outermost release removes the lock file)."""
        if self._depth <= 0:
            return
        self._depth -= 1
        if self._depth:
            return
        fs, root, lock_file = _lock_paths(self.path)
        _HELD.pop(lock_file, None)
        try:
            current = _read_lock(fs, lock_file)
            if current is not None and current.token == self.info.token:
                fs.rm(lock_file)
            else:
                logger.warning(
                    "%s: the writer lock was removed or taken over while this run held it%s",
                    self.path,
                    f" (now: {current.describe()})" if current else "",
                )
            if self._made_root and not fs.exists(f"{root}/zarr.json"):
                # This run made the directory for its lock and failed before creating the
                # store: leave nothing behind (only the files the lock made; never recursive).
                _quietly(fs.rm, f"{root}/{LOCKS_GROUP}/zarr.json")
                for d in (f"{root}/{LOCKS_GROUP}", root):
                    if fs.exists(d) and not fs.ls(d, detail=False):
                        _quietly(fs.rmdir, d)
        except OSError as e:  # a read-only or full store: the lock stays, a rerun takes it over
            logger.warning("%s: could not remove the writer lock (%s)", self.path, e)


def _check_target(fs, root: str, path: str) -> None:
    """Refuse, before writing anything there, a path that is not (the start of) a store: the
    lock would otherwise leave a ``locks/`` folder in someone's directory or Zarr group."""
    if not fs.isdir(root):
        raise StoreError(f"{path}: is a file, not a fingerprint store")
    try:
        meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except FileNotFoundError:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        if names - {LOCKS_GROUP}:
            raise StoreError(
                f"{path}: is a directory of other files, not a fingerprint store; "
                "give -o a new path"
            ) from None
        return
    except ValueError:
        raise StoreError(f"{path}: zarr.json is not valid JSON; not a fingerprint store") from None
    attrs = (meta.get("attributes") or {}) if isinstance(meta, dict) else {}
    if "elodin_schema" not in attrs and not attrs.get("elodin_incomplete"):
        raise StoreError(
            f"{path}: a Zarr store made by something else, not a fingerprint store; "
            "give -o a new path"
        )


def _acquire(path: str, command: str | None) -> WriterLock:
    import threading

    fs, root, lock_file = _lock_paths(path)
    held = _HELD.get(lock_file)
    if held is not None and held.held and held.info.pid == os.getpid():
        if held._thread != threading.get_ident():
            raise StoreError(
                f"{path}: another run in this process is writing to this store "
                f"({held.info.command}); wait for it to finish"
            )
        held._depth += 1
        return held
    me = LockInfo.current(command)
    data = json.dumps(dataclasses.asdict(me), indent=2).encode()
    try:
        made_root = not fs.exists(root)
        if not made_root:
            _check_target(fs, root, path)
        _ensure_locks_group(fs, root)
        for _ in range(5):
            if _create_lock_file(fs, lock_file, data, me.token):
                lock = WriterLock(path, me, made_root=made_root)
                _HELD[lock_file] = lock
                return lock
            holder = _read_lock(fs, lock_file)
            if holder is None:
                continue  # released meanwhile: try again
            state = holder.state()
            if state == "stale":
                logger.warning(
                    "%s: taking over the writer lock of a run that is gone: %s",
                    path,
                    holder.describe(),
                )
                _remove_stale(fs, lock_file, holder, me.token)
                continue
            if state == "live":
                raise StoreError(
                    f"{path}: another run is writing to this store: {holder.describe()}; "
                    "wait for it to finish, or stop it"
                )
            raise StoreError(
                f"{path}: locked by {holder.describe()}, which cannot be checked from this "
                f"host; if that run is over, clear the lock with `elodin unlock {path}`"
            )
    except OSError as e:
        raise StoreError(
            f"{path}: cannot write to the store ({e.strerror or type(e).__name__})"
        ) from None
    raise StoreError(f"{path}: could not take the writer lock (other runs keep taking it)")


class Store:
    """A fingerprint store on disk (or any fsspec URL zarr can open).

    Use :meth:`create` for a new store, :meth:`open` for an existing one; :meth:`append_segment`
    adds rows for new images; workers call :meth:`write_rows` and :meth:`mark_done`.
    """

    def __init__(self, path: str | os.PathLike, group) -> None:
        self.path = str(path)
        self._group = group

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
        if mode != "r" and not cls._other_writer(path):
            # Never while another run holds the lock: it may be half way through growing the
            # arrays, which repair would take for a killed run's leftovers.
            store.repair()
        store.validate()
        return store

    @staticmethod
    def _other_writer(path: str) -> bool:
        fs, _, lock_file = _lock_paths(path)
        try:
            holder = _read_lock(fs, lock_file)
        except OSError:
            return False
        if holder is None:
            return False
        mine = _HELD.get(lock_file)
        if mine is not None and mine.held and mine.info.token == holder.token:
            return False
        return holder.state() != "stale"

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
        fs, _, lock_file = _lock_paths(str(path))
        return _read_lock(fs, lock_file)

    @staticmethod
    def unlock(path: str | os.PathLike, *, force: bool = False) -> LockInfo | None:
        """Remove the writer lock; returns whom it named (None: there was none).

        A lock held by a live process on this host is refused unless ``force``.
        """
        path = str(path)
        fs, _, lock_file = _lock_paths(path)
        holder = _read_lock(fs, lock_file)
        if holder is None:
            return None
        if holder.state() == "live" and not force:
            raise StoreError(
                f"{path}: the lock is held by a running process, {holder.describe()}; "
                "stop it first (or use --force)"
            )
        try:
            fs.rm(lock_file)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{path}: cannot remove the lock ({e.strerror or e})") from None
        return holder

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
        rows = (0,)
        arrays = {
            "fingerprint": (
                (0, feature_dim),
                dtype,
                np.nan,
                ("cutout", "feature"),
                (chunk_rows, feature_dim),
            ),
            "top_class": ((0, topk), "int32", -1, ("cutout", "topk"), (chunk_rows, topk)),
            "top_prob": ((0, topk), "float32", np.nan, ("cutout", "topk"), (chunk_rows, topk)),
        }
        for name, (dt, fill) in _ROW_ARRAYS.items():
            arrays[name] = (rows, dt, fill, ("cutout",), (chunk_rows,))
        for name, (shape, dt, fill, dims, chunks) in arrays.items():
            arr = group.create_array(
                name, shape=shape, dtype=dt, chunks=chunks, fill_value=fill, dimension_names=dims
            )
            if name not in COORDS:
                # The CF attribute xarray reads to tell coordinates from data variables.
                arr.attrs["coordinates"] = " ".join(COORDS)
        group.create_array(
            "image",
            shape=rows,
            dtype=str,
            chunks=(chunk_rows,),
            fill_value="",
            dimension_names=("cutout",),
        )
        # Done markers live in a subgroup of their own so zarr and xarray see a valid hierarchy.
        group.create_group("done", attributes={"about": "one empty object per finished work unit"})
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
            group, segs[-1].image_stop if segs else 0, segs[-1].file_stop if segs else 0
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
                raise StoreError(
                    f"{self.path}: store was made with {key} = {json.dumps(mine.get(key), sort_keys=True)}, "
                    f"this run uses {json.dumps(_jsonable(attrs[key]), sort_keys=True)}; use a new store (-o) or the same settings"
                )

    def append_segment(
        self,
        *,
        images: Sequence[str],
        layout: Layout,
        plan_digest: str,
        inputs: Mapping,
        plan=None,
    ) -> Segment:
        """Grow every row array by ``layout.n_rows`` and record the new segment.

        ``inputs`` maps each image id to its record: ``files`` (``path``, ``size``, ``mtime``),
        ``source`` (:meth:`ImageSource.to_record`) and ``limits``. ``plan`` (the segment's
        plan) gives each image's row range; without it an image spans the segment's rows.

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
            images, inputs, rows, image_start, file_start, segment=len(segs)
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
    ) -> int:
        """Write the records of ``images`` at table rows ``image_start...`` (uncommitted until
        the segment is recorded); returns the number of files written."""
        cols: dict[str, list] = {name: [] for name in _IMAGE_COLUMNS}
        f = file_start
        for k, img in enumerate(images):
            rec = dict(inputs.get(img) or {})
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
        # Made by the first append at its size: one metadata write per column, not two.
        group = _create_images_table(self._group, {"image": image_start + len(images), "file": f})
        for name, values in cols.items():
            dim, dtype, _ = _IMAGE_COLUMNS[name]
            at = image_start if dim == "image" else file_start
            _write_column(group[name], at, values, dtype)
        return f - file_start

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
        group = self._group.require_group("plans").require_group(str(index))
        tiles = (
            np.stack([plan.tiles[f].astype(np.int64) for f in _TILE_FIELDS], axis=1)
            if plan.n_tiles
            else np.zeros((0, 9), np.int64)
        )
        for name, data in (
            ("windows", plan.windows),
            ("tile_start", plan.tile_start),
            ("tiles", tiles),
        ):
            data = np.asarray(data, dtype=np.int64)
            chunks = tuple(max(1, d) for d in data.shape)
            arr = group.create_array(
                name, shape=data.shape, dtype="int64", chunks=chunks, overwrite=True
            )
            if data.size:
                arr[...] = data
        _write_plan_ids(group, plan.images)

    def load_plan(self, index: int):
        """The plan saved for segment ``index`` (None if it was never saved)."""
        from .tiling import TILE_DTYPE, Plan

        try:
            group = self._group["plans"][str(index)]
            tiles_2d = group["tiles"][...]
            windows = group["windows"][...].reshape(-1, 4)
            tile_start = group["tile_start"][...]
        except KeyError:
            return None
        tiles = np.zeros(len(tiles_2d), TILE_DTYPE)
        for i, f in enumerate(_TILE_FIELDS):
            tiles[f] = tiles_2d[:, i]
        if "images" in group.array_keys():
            ids = tuple(str(v) for v in group["images"][...])
        else:  # schema 1 kept the ids in the plan group's attrs
            ids = tuple(group.attrs["images"])
        return Plan(ids, tiles, windows, tile_start)

    def repair(self) -> bool:
        """Undo a half-finished append (arrays grown, segment not yet recorded).

        Growing is: plan saved, arrays resized, then the segment recorded in attrs. A client
        killed between the last two leaves arrays longer than the recorded segments; those rows
        were never handed to a task, so shrinking them back restores the last consistent state.
        """
        segs = self.segments
        expected = segs[-1].row_stop if segs else 0
        fixed = False
        if IMAGES_GROUP in self._group:
            counts = {
                "image": segs[-1].image_stop if segs else 0,
                "file": segs[-1].file_stop if segs else 0,
            }
            table = self._group[IMAGES_GROUP]
            for name, (dim, _, _) in _IMAGE_COLUMNS.items():
                if name in table and table[name].shape[0] > counts[dim]:
                    table[name].resize((counts[dim],))
                    fixed = True
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
        step = block_rows or 64 * self.chunk_rows
        step = max(self.chunk_rows, step - step % self.chunk_rows)
        for start in range(0, arr.shape[0], step):
            yield start, arr[start : start + step]

    def retire_image(self, index: int, image: str, *, reason: str = "changed") -> int:
        """Take ``image``'s rows in segment ``index`` out of use (``valid = False``) and flag
        its record retired, so the image can be fingerprinted again as new.

        Only for a complete segment (no task will write those rows again). Returns the number
        of rows retired. The flag is written last: a retire killed half way is done again.
        """
        seg = self.segments[index]
        done = self.done_units()
        if any(u not in done for u in range(seg.unit_start, seg.unit_stop)):
            raise StoreError(
                f"{self.path}: image {image} changed while the run that added it is unfinished; finish that run first"
            )
        table = self.images()
        i = table.find(image)
        if i is None or int(table.column("segment")[i]) != index:
            raise StoreError(f"{self.path}: segment {index} holds no image {image!r} in use")
        lo, hi = int(table.column("row_start")[i]), int(table.column("row_stop")[i])
        valid, ids = self._group["valid"], self._group["image"]
        step = 64 * self.chunk_rows
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

    def _done_dir(self) -> str:
        return f"{_fs(self.path)[1]}/done"

    def mark_done(self, unit: int) -> None:
        fs, _ = _fs(self.path)
        with fs.open(f"{self._done_dir()}/{unit:010d}", "w") as f:
            f.write("done\n")

    def done_units(self) -> set[int]:
        """Units whose marker exists (one directory listing, cheap for 10^6 units)."""
        fs, _ = _fs(self.path)
        try:
            names = fs.ls(self._done_dir(), detail=False)
        except FileNotFoundError:
            return set()
        return {int(Path(n).name) for n in names if Path(n).name.isdigit()}

    def clear_done(self, units: Sequence[int]) -> None:
        """Forget units (their rows will be written again)."""
        fs, _ = _fs(self.path)
        for u in units:
            fs.rm(f"{self._done_dir()}/{u:010d}")

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


_TILE_FIELDS = ("image", "ty0", "ty1", "tx0", "tx1", "ry0", "ry1", "rx0", "rx1")


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so comparisons see what the store holds (tuples -> lists)."""
    return json.loads(json.dumps(value, default=str))


def _write_plan_ids(group, images: Sequence[str]) -> None:
    """A plan's image ids as a string array (its group's attrs would grow with the images)."""
    arr = group.create_array(
        "images",
        shape=(len(images),),
        dtype=str,
        chunks=(max(1, min(len(images), 65536)),),
        fill_value="",
        overwrite=True,
    )
    if len(images):
        arr[...] = np.asarray(list(images), dtype=object)


def _json_text(value: Any) -> str:
    """A record field as canonical JSON text (``""`` for None)."""
    return "" if value is None else json.dumps(_jsonable(value), sort_keys=True)


def _create_images_table(group, sizes: Mapping[str, int] | None = None):
    """The ``images/`` group with every column, made once (of ``sizes[dim]`` records)."""
    if IMAGES_GROUP in group:
        table = group[IMAGES_GROUP]
    else:
        table = group.create_group(IMAGES_GROUP, attributes={"about": _IMAGES_ABOUT})
    for name, (dim, dtype, fill) in _IMAGE_COLUMNS.items():
        if name not in table:
            table.create_array(
                name,
                shape=((sizes or {}).get(dim, 0),),
                dtype=dtype,
                chunks=(_IMAGE_CHUNK,),
                fill_value=fill,
                dimension_names=(dim,),
            )
    return table


def _write_column(arr, at: int, values: list, dtype: Any) -> None:
    """Write ``values`` at ``at`` (growing the column to end there): only the chunks from
    ``at`` on are written, so an append costs what it adds."""
    if arr.shape[0] != at + len(values):
        arr.resize((at + len(values),))
    if values:
        arr[at : at + len(values)] = np.asarray(values, dtype=object if dtype is str else dtype)


# ------------------------------------------------------------------------------------ upgrade
def upgrade(path: str | os.PathLike) -> str:
    """Convert a store of an older schema to the current one, in place; returns what was done.

    Schema 1 kept every image's record in the root attrs (``segments[*].images`` and
    ``inputs``, ``retired``): rewritten at every append and parsed at every open. The records
    move into the images table in the order a fresh run writes them (each segment's plan
    order, retired records where they were), the segments get their table ranges, and the
    root attrs lose the per-image facts. Runs under the writer lock; the root attrs are
    rewritten last, in one write, so an upgrade that fails before that leaves the store as it
    was (a partly written ``images/`` group is removed).
    """
    import zarr

    path = str(path)
    with Store.lock(path, command=f"elodin upgrade {path}"):
        if not Store.exists(path):
            raise StoreError(f"{path}: no fingerprint store here")
        group = zarr.open_group(path, mode="r+", zarr_format=3)
        attrs = group.attrs.asdict()
        schema = attrs.get("elodin_schema")
        if schema == SCHEMA_VERSION:
            return f"{path}: already at schema {SCHEMA_VERSION}; nothing to do"
        if schema != 1:
            raise StoreError(
                f"{path}: cannot upgrade schema {schema!r} (this Elodin reads {SCHEMA_VERSION})"
            )
        fresh = IMAGES_GROUP not in group
        if not fresh:  # left by an upgrade that failed before its commit
            del group[IMAGES_GROUP]
        store = Store(path, group)
        plans = [
            group["plans"][str(i)]
            for i in range(len(attrs.get("segments") or []))
            if "plans" in group and str(i) in group["plans"]
        ]
        try:
            new_attrs = _upgrade_v1(store, attrs)
            for p in plans:
                if "images" in p.attrs:
                    _write_plan_ids(p, p.attrs["images"])
        except BaseException as e:
            if IMAGES_GROUP in group:
                del group[IMAGES_GROUP]
            for p in plans:
                if "images" in p.attrs and "images" in p.array_keys():
                    del p["images"]
            if isinstance(e, OSError):
                raise StoreError(
                    f"{path}: cannot write to the store ({e.strerror or e}); "
                    "it is unchanged, still at schema 1"
                ) from None
            raise
        # The commit: one write of the whole root document.
        group.attrs.put(_jsonable(new_attrs))
        for p in plans:  # the ids are in their arrays now (load_plan reads those first)
            if "images" in p.attrs:
                p.attrs.put({})
        st = Store.open(path, mode="r")
        return (
            f"{path}: upgraded from schema 1 to {SCHEMA_VERSION} "
            f"({len(st.images())} image record(s) moved into {IMAGES_GROUP}/)"
        )


def _upgrade_v1(store: Store, attrs: Mapping[str, Any]) -> dict:
    """Write schema 1's per-image records into the images table; return the new root attrs.

    Nothing in the root document changes here (the caller commits), so a run killed half way
    leaves a schema-1 store with an uncommitted ``images/`` group that the next upgrade
    replaces.
    """
    retired = list(attrs.get("retired") or [])
    chunk_rows = int(attrs["chunk_rows"])
    segments: list[Segment] = []
    n_images = n_files = 0
    for index, seg in enumerate(attrs.get("segments") or []):
        plan = store.load_plan(index)
        if plan is None:
            raise StoreError(
                f"{store.path}: segment {index} has no saved plan; the store cannot be upgraded"
            )
        inputs = dict(seg.get("inputs") or {})
        reasons: dict[str, dict] = {}
        for r in retired:
            if int(r.get("segment", -1)) == index:
                inputs[str(r["id"])] = {k: r.get(k) for k in ("files", "source", "limits")}
                reasons[str(r["id"])] = r
        # The plan's order is the order the run appended its images in (retired ones too).
        images = [i for i in plan.images if i]
        missing = [i for i in images if i not in inputs]
        if missing:
            raise StoreError(
                f"{store.path}: segment {index} records no input for image {missing[0]!r}; "
                "the store cannot be upgraded"
            )
        layout = pack_units(plan.tile_start, chunk_rows=chunk_rows)
        row_start = int(seg["row_start"])
        if layout.n_rows != int(seg["row_stop"]) - row_start or layout.n_units != int(
            seg["unit_stop"]
        ) - int(seg["unit_start"]):
            raise StoreError(
                f"{store.path}: segment {index}'s rows or units do not follow from its saved "
                "plan; the store cannot be upgraded"
            )
        rows = image_rows(plan, layout)
        rows = np.where(rows >= 0, rows + row_start, -1)
        files = store._append_images(images, inputs, rows, n_images, n_files, segment=index)
        table = store._group[IMAGES_GROUP]
        for k, img in enumerate(images):
            if img in reasons:
                r = reasons[img]
                table["retired_rows"][n_images + k] = int(r.get("rows", 0))
                table["retired_reason"][n_images + k] = str(r.get("reason", ""))
                table["retired"][n_images + k] = True
        segments.append(
            Segment(
                row_start=row_start,
                row_stop=int(seg["row_stop"]),
                unit_start=int(seg["unit_start"]),
                unit_stop=int(seg["unit_stop"]),
                plan_digest=str(seg["plan_digest"]),
                n_windows=int(plan.n_windows),
                image_start=n_images,
                image_stop=n_images + len(images),
                file_start=n_files,
                file_stop=n_files + files,
            )
        )
        n_images += len(images)
        n_files += files
    # Same keys in the same places as a fresh store's document, less the per-image ones.
    new = {"segments": [s.to_json() for s in segments], "elodin_schema": SCHEMA_VERSION}
    return {k: new.get(k, v) for k, v in attrs.items() if k != "retired"}
