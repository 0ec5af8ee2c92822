"""Done markers: one empty object per finished work unit, sharded by unit number.

A unit's marker is ``done/<unit // SHARD_UNITS:06d>/<unit:010d>``, written by the one task that
wrote the unit's rows, after them. Asking which units of a segment are done lists only the
shards its unit range overlaps (:func:`done_units`), so a resume costs what the segment holds,
not every marker the store ever got.

Stores made before the markers were sharded kept them flat (``done/<unit:010d>``); their
``done/`` group does not record ``shard_units``, and for them the flat markers are read (and
cleared) too. No upgrade moves them: they stay valid, and only such stores pay the flat
listing (see docs/ARCHITECTURE.md, "Done markers").
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["DONE_GROUP", "SHARD_UNITS", "done_attrs"]

DONE_GROUP = "done"
SHARD_UNITS = 4096


def done_attrs() -> dict:
    """The attributes of a new store's ``done/`` group (``shard_units`` marks the layout)."""
    return {"about": "one empty object per finished work unit", "shard_units": SHARD_UNITS}


def _shard(unit: int) -> str:
    return f"{int(unit) // SHARD_UNITS:06d}"


def marker(root: str, unit: int) -> str:
    """The path of unit ``unit``'s marker under the store root ``root``."""
    return f"{root}/{DONE_GROUP}/{_shard(unit)}/{int(unit):010d}"


def has_flat_markers(fs, root: str) -> bool:
    """True for a store made before the markers were sharded (its ``done/`` group does not
    record ``shard_units``): flat markers may be there."""
    try:
        meta = json.loads(fs.cat_file(f"{root}/{DONE_GROUP}/zarr.json"))
    except (FileNotFoundError, ValueError):
        return False
    return "shard_units" not in ((meta.get("attributes") or {}) if isinstance(meta, dict) else {})


def mark_done(fs, root: str, unit: int) -> None:
    path = marker(root, unit)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write("done\n")


def _names(fs, directory: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return []


def done_units(fs, root: str, units: range | None = None, *, flat: bool = False) -> set[int]:
    """Units whose marker exists, of ``units`` (None: all).

    Lists the shards ``units`` overlaps, one listing each (all of them for None); with
    ``flat`` (:func:`has_flat_markers`) also the flat markers at the top of ``done/``.
    """
    top = f"{root}/{DONE_GROUP}"
    if units is None:
        shards = [n for n in _names(fs, top) if len(n) == 6 and n.isdigit()]
    elif len(units) == 0:
        return set()
    else:
        lo, hi = min(units[0], units[-1]), max(units[0], units[-1])
        shards = [f"{s:06d}" for s in range(lo // SHARD_UNITS, hi // SHARD_UNITS + 1)]
    found = {int(n) for s in shards for n in _names(fs, f"{top}/{s}") if n.isdigit()}
    if flat:
        found |= {int(n) for n in _names(fs, top) if len(n) == 10 and n.isdigit()}
    return found if units is None else {u for u in found if u in units}


def clear_done(fs, root: str, units: Iterable[int], *, flat: bool = False) -> None:
    """Remove the markers of ``units`` (a unit without one is left as it is); with ``flat``
    also their flat markers, so a unit redone since its flat marker is not left done."""
    for u in units:
        paths = [marker(root, u)] + ([f"{root}/{DONE_GROUP}/{int(u):010d}"] if flat else [])
        for path in paths:
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
