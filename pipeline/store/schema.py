"""What a fingerprint store holds: its schema version, variables and coordinates, and the
dtype and fill of every per-row variable the fingerprint stage writes (:func:`row_schema`),
declared once: :meth:`Store.create` makes the arrays from it and :func:`empty_rows` /
:func:`filled_rows` make a unit's rows from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "COORDS",
    "REQUIRED_VARIABLES",
    "SCHEMA_VERSION",
    "RowVariable",
    "empty_rows",
    "filled_rows",
    "row_schema",
]

SCHEMA_VERSION = 2
# Schema 1 kept every image's record in the root attrs (segments[*].images / inputs, retired);
# `elodin upgrade STORE` moves them into the images table.
REQUIRED_VARIABLES = ("fingerprint", "top_class", "top_prob", "valid", "masked_fraction")
COORDS = ("image", "x", "y", "width", "height", "ra", "dec")


@dataclasses.dataclass(frozen=True)
class RowVariable:
    """One per-row variable ``name(cutout, *dims)``: its dtype (``str`` for strings), the fill
    of an empty slot (also the Zarr fill value), and its trailing axes."""

    dtype: Any
    fill: Any
    tail: tuple[int, ...] = ()
    dims: tuple[str, ...] = ()

    def empty(self, n: int) -> np.ndarray:
        """``n`` empty slots of this variable (strings as Python objects)."""
        return np.full(
            (int(n), *self.tail), self.fill, dtype=object if self.dtype is str else self.dtype
        )


def row_schema(feature_dim: int, topk: int, dtype: str = "float32") -> dict[str, RowVariable]:
    """Every per-row variable of a store of ``feature_dim`` features (stored as ``dtype``) and
    ``topk`` classes, in the order :meth:`Store.create` makes them."""
    return {
        "fingerprint": RowVariable(dtype, np.nan, (int(feature_dim),), ("feature",)),
        "top_class": RowVariable("int32", -1, (int(topk),), ("topk",)),
        "top_prob": RowVariable("float32", np.nan, (int(topk),), ("topk",)),
        "valid": RowVariable("bool", False),
        "masked_fraction": RowVariable("float32", np.nan),
        "x": RowVariable("float64", np.nan),
        "y": RowVariable("float64", np.nan),
        "width": RowVariable("int32", 0),
        "height": RowVariable("int32", 0),
        "ra": RowVariable("float64", np.nan),
        "dec": RowVariable("float64", np.nan),
        "image": RowVariable(str, ""),
    }


def empty_rows(
    n: int, *, feature_dim: int, topk: int, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """``n`` empty slots of every per-row variable (``valid`` False), as the store fills them."""
    return {name: var.empty(n) for name, var in row_schema(feature_dim, topk, dtype).items()}


def filled_rows(
    n: int,
    parts: Mapping[str, Sequence[np.ndarray]],
    *,
    feature_dim: int,
    topk: int,
    dtype: str = "float32",
) -> dict[str, np.ndarray]:
    """A unit's ``n`` rows: each variable's ``parts`` (arrays, concatenated) in its first rows,
    empty slots after them; ``valid`` is True exactly for the rows filled (unless given).

    Every variable given must fill the same number of rows (at most ``n``).
    """
    rows = empty_rows(n, feature_dim=feature_dim, topk=topk, dtype=dtype)
    filled = set()
    for name, chunks in parts.items():
        if len(chunks):
            values = np.concatenate(list(chunks))
            rows[name][: len(values)] = values
            filled.add(len(values))
        else:
            filled.add(0)
    if len(filled) > 1:
        raise ValueError(f"variables fill different numbers of rows: {sorted(filled)}")
    m = filled.pop() if filled else 0
    if m > n:
        raise ValueError(f"{m} rows given for {n} slots")
    if "valid" not in parts:
        rows["valid"][:m] = True
    return rows
