"""Caches of open files, per thread, and of decoded pixels, per process (never pickled): an LRU keyed by path, size and mtime, so a
rewritten file is reopened.

Part of :mod:`pipeline.sources` (moved from ``sources.py`` unchanged).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


_FITS_HANDLES = 8


_ZARR_HANDLES = 8


_TIFF_HANDLES = 8


# Decoded PIL images are shared by every thread of a process (read-only arrays): a PNG or
# JPEG cannot be read in part, so a per-thread cache decoded it again for every work unit's
# prefetch thread (18 decodes of a 14-Mpx PNG for one 3,465-window job).
_PIL_ARRAYS = 2


class _Handles(OrderedDict):
    """One thread's handles; closes them when the thread ends and its locals are dropped."""

    def __init__(self, close: Callable[[Any], None] | None):
        super().__init__()
        self.close = close

    def pop_and_close(self, *, last: bool) -> None:
        _, old = self.popitem(last=last)
        if self.close is not None:
            try:
                self.close(old)
            except Exception:  # closing a stale handle must never fail a read
                logger.debug("closing a cached handle failed", exc_info=True)

    def __del__(self) -> None:
        try:
            while self:
                self.pop_and_close(last=True)
        except Exception:  # at interpreter exit, module globals (the logger) may be gone
            pass


class _ThreadLRU:
    """A per-thread LRU of open handles; ``close`` is called on eviction and thread exit.

    Per thread so that Dask worker threads never share a file position or a lazily loaded
    astropy structure, and need no locks.
    """

    def __init__(self, maxsize: int, close: Callable[[Any], None] | None = None):
        self.maxsize = maxsize
        self.close = close
        self._local = threading.local()

    def _entries(self) -> _Handles:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = _Handles(self.close)
        return entries

    def get(self, key: Any, factory: Callable[[], Any]) -> Any:
        entries = self._entries()
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        value = factory()
        entries[key] = value
        while len(entries) > self.maxsize:
            entries.pop_and_close(last=False)
        return value

    def clear(self) -> None:
        entries = self._entries()
        while entries:
            entries.pop_and_close(last=True)


class _SharedLRU:
    """A process-wide LRU of immutable values (decoded pixels), safe across threads.

    A value is made once per key even when several threads ask at the same time: each key
    has its own lock, held while the factory runs, so other keys are not blocked.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()
        self._making: dict[Any, threading.Lock] = {}

    def get(self, key: Any, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            making = self._making.setdefault(key, threading.Lock())
        with making:
            with self._lock:
                if key in self._entries:  # made by another thread while this one waited
                    return self._entries[key]
            value = factory()
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
            with self._lock:
                self._entries[key] = value
                self._making.pop(key, None)
                while len(self._entries) > self.maxsize:
                    self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
