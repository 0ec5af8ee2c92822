"""Elodin: survey-scale image fingerprinting with ImageNet CNNs on Dask.

The public API, re-exported here and imported on first use (so ``import pipeline`` stays
light and a worker that only runs inference never imports the analysis stack)::

    from pipeline import connect, fingerprint, reduce, cluster, embed, outliers, similar, export
    with connect("local") as client:
        fingerprint(["field.fits"], "field.zarr", client=client)
    reduce("field.zarr"); cluster("field.zarr"); make_report("field.zarr", "report/")
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import config as config  # registers the defaults with dask.config at import
from .errors import ElodinError

try:
    __version__ = version("elodin-pipeline")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

# name -> module that owns it
_API = {
    "connect": "compute",
    "fingerprint": "fingerprint",
    "FingerprintResult": "fingerprint",
    "Store": "store",
    "open_sources": "sources",
    "ImageSource": "sources",
    "stretch_cutouts": "preprocess",
    "run": "runner",
    "make_report": "report",
    "reduce": "analysis",
    "cluster": "analysis",
    "embed": "analysis",
    "outliers": "analysis",
    "similar": "analysis",
    "export": "analysis",
    "export_hats": "analysis",
    "crossmatch": "analysis",
    "build_index": "analysis",
    "neighbors": "analysis",
    "NeighborIndex": "analysis",
    "get_session": "models",
    "resolve_model": "models",
}

__all__ = ["ElodinError", "__version__", "config", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module = importlib.import_module(f".{_API[name]}", __name__)
    value = getattr(module, "resolve" if name == "resolve_model" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
