"""The store's writer lock (``locks/writer.json``): one run adds to a store at a time.

A run that writes takes it before the store exists; a second run is refused with one line
naming the holder. A lock left by a killed run on this host (pid gone, reused, a zombie, or the
host rebooted) is taken over with a warning; one from another host cannot be checked and is
refused with the command that clears it (``elodin unlock``). See :meth:`Store.lock`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ._common import _fs

__all__ = ["LOCKS_GROUP", "LOCK_FILE", "LockInfo", "WriterLock"]

logger = logging.getLogger(__name__)

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
    # The installed script, or `python -m pipeline.cli` (argv[0] is pipeline/cli/__main__.py).
    if Path(argv[0]).name in ("elodin", "__main__.py", "app.py"):
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


def lock_holder(path: str) -> LockInfo | None:
    """Who holds the writer lock of the store at ``path`` (None: nobody)."""
    fs, _, lock_file = _lock_paths(path)
    return _read_lock(fs, lock_file)


def other_writer(path: str) -> bool:
    """True while a run other than this thread's holds (or may hold) the lock on ``path``."""
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


def unlock(path: str, *, force: bool = False) -> LockInfo | None:
    """Remove the writer lock; returns whom it named (None: there was none). A lock held by
    a live process on this host is refused unless ``force``."""
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
