"""Errors that reach the user as one clear line.

Everything the user can cause (a bad file, a bad flag, a store made by another model) raises a
subclass of :class:`ElodinError` whose message names the file (and HDU, row, key) and what is
wrong. The command line prints that message alone, without a traceback, and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "ConfigError",
    "ElodinError",
    "ImageInputError",
    "InputError",
    "ModelError",
    "StoreError",
]


class ElodinError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 2


class ConfigError(ElodinError):
    """A configuration file, key or value is wrong."""


class InputError(ElodinError):
    """An input image (FITS, Zarr, PNG, ...) cannot be used."""


class ImageInputError(InputError):
    """An input image cannot be used, known by its position among the inputs.

    Raised by code that sees shapes, not files (planning); its caller maps ``image_index``
    back to the file to name.
    """

    def __init__(self, message: str, *, image_index: int):
        super().__init__(message)
        self.image_index = image_index

    def __reduce__(self):
        # Exceptions pickle as cls(*args), which would drop the keyword (a Dask worker's
        # error comes back to the client pickled).
        import functools

        return functools.partial(type(self), image_index=self.image_index), self.args


class CatalogError(InputError):
    """A catalog file or one of its rows cannot be used."""


class ModelError(ElodinError):
    """A model name, ONNX file or model card cannot be used."""


class StoreError(ElodinError):
    """A fingerprint store is missing, malformed, locked or incompatible."""
