"""Elodin: survey-scale image fingerprinting with ImageNet CNNs on Dask.

The public API is re-exported here; each name lives in the module that owns its job.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import config as config  # registers the defaults with dask.config at import
from .errors import ElodinError

try:
    __version__ = version("elodin-pipeline")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["ElodinError", "__version__", "config"]
