"""numba's on-disk cache of compiled functions, kept under Elodin's cache dir.

umap-learn and pynndescent compile their numba kernels the first time a process uses them:
tens of seconds on every ``elodin embed``, far more than the map of a few thousand rows costs.
numba can keep compiled code on disk, but only for functions declared with ``cache=True``:
pynndescent declares it for most of its distances and tree code, umap-learn for one function
(measured with umap-learn 0.5.12 / pynndescent 0.7.0; see benchmarks/README.md).

- :func:`configure` points ``NUMBA_CACHE_DIR`` at :func:`directory` (unless the user set it),
  so every cached function lands there rather than in ``__pycache__`` beside an installed
  package, which is often read-only. It must run before numba is first imported (numba reads
  the variable then); the CLI calls it at start and :func:`environment` gives the same setting
  to the worker processes :mod:`pipeline.compute` starts.
- :func:`enable` gives every other numba function of umap-learn and pynndescent an on-disk
  cache, as ``cache=True`` would have (``Dispatcher.enable_caching``, what the decorator
  calls). Functions numba cannot cache (those that take another jitted function as an argument,
  or hold large global arrays: pynndescent's NN-descent) are compiled again in each process;
  numba says so with a NumbaWarning, which the callers silence.

numba checks a cached function against its own source file only, not against the files of
the functions it calls, so the directory is named after the numba, umap-learn and pynndescent
versions: an upgrade starts a fresh cache instead of loading code built from the old sources.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import config

__all__ = ["ENV", "PACKAGES", "configure", "directory", "enable", "environment"]

logger = logging.getLogger(__name__)

ENV = "NUMBA_CACHE_DIR"
# Packages whose numba functions :func:`enable` caches.
PACKAGES = ("umap", "pynndescent")
_DISTRIBUTIONS = ("numba", "umap-learn", "pynndescent")
_done: set[str] = set()
_ours: str | None = None  # the value configure() put in the environment


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in _DISTRIBUTIONS:
        try:
            parts.append(f"{dist}-{version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist}-none")
    return "_".join(parts)


def directory() -> Path:
    """Where compiled functions are cached: ``NUMBA_CACHE_DIR`` when the user set it, else
    ``numba/<versions>`` under config ``cache-dir`` (default: the user's cache dir, e.g.
    ``~/.cache/elodin/numba/...`` beside ``~/.cache/elodin/models``)."""
    given = os.environ.get(ENV)
    if given and given != _ours:
        return Path(given)
    configured = config.get("cache-dir", None)
    if configured:
        base = Path(os.path.expanduser(str(configured)))
    else:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("elodin"))
    return base / "numba" / _versions()


def environment() -> dict[str, str]:
    """Environment variables for worker processes: the same numba cache as this process."""
    return {ENV: str(directory())}


def configure() -> Path:
    """Point this process's numba cache at :func:`directory` and return it.

    Call it before numba is imported; when numba already is, its configuration is reloaded, so
    functions given a cache from now on (:func:`enable`, later imports) use the directory.
    """
    global _ours
    path = directory()
    os.environ[ENV] = _ours = str(path)
    if "numba" in sys.modules:
        from numba.core import config as numba_config

        numba_config.reload_config()
    return path


def enable(packages: Sequence[str] = PACKAGES, modules: Mapping | None = None) -> int:
    """Give the not yet cached numba functions of ``packages``' imported modules an on-disk
    cache; returns how many were given one.

    Cheap to call again: modules already seen are skipped. A function compiled before this
    call keeps its compiled code and is saved the next time it compiles for new types.
    """
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    configure()
    modules = sys.modules if modules is None else modules
    count = 0
    for name, module in list(modules.items()):
        if name in _done or module is None or name.split(".")[0] not in packages:
            continue
        _done.add(name)
        for value in list(vars(module).values()):
            if (
                isinstance(value, Dispatcher)
                and isinstance(value._cache, NullCache)
                and getattr(value.py_func, "__module__", "").split(".")[0] in packages
            ):
                value.enable_caching()
                count += 1
    if count:
        logger.debug("numba cache for %d functions in %s", count, directory())
    return count
