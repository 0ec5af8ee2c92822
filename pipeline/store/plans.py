"""Each segment's plan kept in the store (``plans/<segment>/``), so a resume maps every
window to the same row without planning again (blob detection included).

A data plan (blobs, a catalog) keeps its ``windows``; a formula plan (sliding, full frame:
:mod:`pipeline.windowgrid`) keeps its grid instead, the images' shapes as ``grid_shapes`` and
the rest in the group's ``grid`` attribute, so a plan of 10^9 windows is its tiles and a few
numbers per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__: list[str] = []

_TILE_FIELDS = ("image", "ty0", "ty1", "tx0", "tx1", "ry0", "ry1", "rx0", "rx1")
# Rows per chunk of a plan's arrays (tiles of 10^6-tile plans are read whole, but written
# and read in pieces a codec handles well).
_CHUNK_ROWS = 1 << 18


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


def save_plan(root, index: int, plan) -> None:
    """Write ``plan`` as segment ``index``'s plan into the store group ``root``."""
    group = root.require_group("plans").require_group(str(index))
    tiles = (
        np.stack([plan.tiles[f].astype(np.int64) for f in _TILE_FIELDS], axis=1)
        if plan.n_tiles
        else np.zeros((0, 9), np.int64)
    )
    arrays = [("tile_start", plan.tile_start), ("tiles", tiles)]
    if plan.grid is None:
        arrays.append(("windows", plan.windows))
    else:
        arrays.append(("grid_shapes", plan.grid.shapes))
        group.attrs["grid"] = plan.grid.to_attrs()
    for name, data in arrays:
        data = np.asarray(data, dtype=np.int64)
        chunks = (max(1, min(data.shape[0], _CHUNK_ROWS)), *data.shape[1:])
        arr = group.create_array(
            name, shape=data.shape, dtype="int64", chunks=chunks, overwrite=True
        )
        if data.size:
            arr[...] = data
    _write_plan_ids(group, plan.images)


def load_plan(root, index: int):
    """The plan saved for segment ``index`` in the store group ``root`` (None if never saved)."""
    from ..tiling import TILE_DTYPE, Plan

    try:
        group = root["plans"][str(index)]
        tiles_2d = group["tiles"][...]
        tile_start = group["tile_start"][...]
        grid = None
        windows = None
        if "grid" in group.attrs:
            from ..windowgrid import WindowGrid

            grid = WindowGrid.from_attrs(group.attrs["grid"], group["grid_shapes"][...])
        else:
            windows = group["windows"][...].reshape(-1, 4)
    except KeyError:
        return None
    tiles = np.zeros(len(tiles_2d), TILE_DTYPE)
    for i, f in enumerate(_TILE_FIELDS):
        tiles[f] = tiles_2d[:, i]
    if "images" in group.array_keys():
        ids = tuple(str(v) for v in group["images"][...])
    else:  # schema 1 kept the ids in the plan group's attrs
        ids = tuple(group.attrs["images"])
    return Plan(ids, tiles, windows, tile_start, grid=grid)
