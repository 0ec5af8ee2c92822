"""Ctrl-C and SIGTERM that stick.

A signal handler runs between two bytecodes of the main thread, wherever that is; when it is
inside a garbage-collector callback or a ``__del__`` (distributed's GC diagnostics run one at
every collection), the ``KeyboardInterrupt`` it raises is printed as "Exception ignored in ..."
and dropped, and the run goes on as if nothing happened. So the handler also records the
signal: loops that wait on progress call :func:`raise_if_interrupted` at each step, and the
command ends as interrupted even if the first ``KeyboardInterrupt`` was lost.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["handled", "install", "interrupted", "raise_if_interrupted", "restore"]

_received: list[int] = []


def _handler(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt


def install() -> dict[int, Any] | None:
    """Handle SIGINT and SIGTERM (scancel, kubectl delete, a job timeout) like Ctrl-C, and
    remember them; returns the handlers replaced (None outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _received.clear()
    return {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, Any] | None) -> None:
    """Put back the handlers :func:`install` replaced."""
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)


def interrupted() -> bool:
    """Whether SIGINT or SIGTERM arrived since :func:`install`."""
    return bool(_received)


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a signal arrived (its first one may have been lost)."""
    if _received:
        raise KeyboardInterrupt


def handled() -> None:
    """Forget the signals so far: the command took them as its normal end (a server stopped
    with Ctrl-C), not as an interruption."""
    _received.clear()
