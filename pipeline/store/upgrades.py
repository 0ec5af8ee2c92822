"""``elodin upgrade STORE``: convert a store of an older schema to the current one, in place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import StoreError
from ._common import _jsonable
from .core import Store
from .images import IMAGES_GROUP
from .layout import Segment, image_rows, pack_units
from .plans import _write_plan_ids
from .schema import SCHEMA_VERSION

__all__ = ["upgrade"]


def upgrade(path: str | os.PathLike) -> str:
    """Convert a store of an older schema to the current one, in place; returns what was done.

    Schema 1 kept every image's record in the root attrs (``segments[*].images`` and
    ``inputs``, ``retired``): rewritten at every append and parsed at every open. The records
    move into the images table in the order a fresh run writes them (each segment's plan
    order, retired records where they were), the segments get their table ranges, and the
    root attrs lose the per-image facts. Runs under the writer lock; the root attrs are
    rewritten last, in one write, so an upgrade that fails before that leaves the store as it
    was (a partly written ``images/`` group is removed).
    """
    import zarr

    path = str(path)
    with Store.lock(path, command=f"elodin upgrade {path}"):
        if not Store.exists(path):
            raise StoreError(f"{path}: no fingerprint store here")
        group = zarr.open_group(path, mode="r+", zarr_format=3)
        attrs = group.attrs.asdict()
        schema = attrs.get("elodin_schema")
        if schema == SCHEMA_VERSION:
            return f"{path}: already at schema {SCHEMA_VERSION}; nothing to do"
        if schema != 1:
            raise StoreError(
                f"{path}: cannot upgrade schema {schema!r} (this Elodin reads {SCHEMA_VERSION})"
            )
        fresh = IMAGES_GROUP not in group
        if not fresh:  # left by an upgrade that failed before its commit
            del group[IMAGES_GROUP]
        store = Store(path, group)
        plans = [
            group["plans"][str(i)]
            for i in range(len(attrs.get("segments") or []))
            if "plans" in group and str(i) in group["plans"]
        ]
        try:
            new_attrs = _upgrade_v1(store, attrs)
            for p in plans:
                if "images" in p.attrs:
                    _write_plan_ids(p, p.attrs["images"])
        except BaseException as e:
            if IMAGES_GROUP in group:
                del group[IMAGES_GROUP]
            for p in plans:
                if "images" in p.attrs and "images" in p.array_keys():
                    del p["images"]
            if isinstance(e, OSError):
                raise StoreError(
                    f"{path}: cannot write to the store ({e.strerror or e}); "
                    "it is unchanged, still at schema 1"
                ) from None
            raise
        # The commit: one write of the whole root document.
        group.attrs.put(_jsonable(new_attrs))
        for p in plans:  # the ids are in their arrays now (load_plan reads those first)
            if "images" in p.attrs:
                p.attrs.put({k: v for k, v in p.attrs.asdict().items() if k != "images"})
        st = Store.open(path, mode="r")
        return (
            f"{path}: upgraded from schema 1 to {SCHEMA_VERSION} "
            f"({len(st.images())} image record(s) moved into {IMAGES_GROUP}/)"
        )


def _upgrade_v1(store: Store, attrs: Mapping[str, Any]) -> dict:
    """Write schema 1's per-image records into the images table; return the new root attrs.

    Nothing in the root document changes here (the caller commits), so a run killed half way
    leaves a schema-1 store with an uncommitted ``images/`` group that the next upgrade
    replaces.
    """
    retired = list(attrs.get("retired") or [])
    chunk_rows = int(attrs["chunk_rows"])
    segments: list[Segment] = []
    n_images = n_files = 0
    for index, seg in enumerate(attrs.get("segments") or []):
        plan = store.load_plan(index)
        if plan is None:
            raise StoreError(
                f"{store.path}: segment {index} has no saved plan; the store cannot be upgraded"
            )
        inputs = dict(seg.get("inputs") or {})
        reasons: dict[str, dict] = {}
        for r in retired:
            if int(r.get("segment", -1)) == index:
                inputs[str(r["id"])] = {k: r.get(k) for k in ("files", "source", "limits")}
                reasons[str(r["id"])] = r
        # The plan's order is the order the run appended its images in (retired ones too).
        images = [i for i in plan.images if i]
        missing = [i for i in images if i not in inputs]
        if missing:
            raise StoreError(
                f"{store.path}: segment {index} records no input for image {missing[0]!r}; "
                "the store cannot be upgraded"
            )
        layout = pack_units(plan.tile_start, chunk_rows=chunk_rows)
        row_start = int(seg["row_start"])
        if layout.n_rows != int(seg["row_stop"]) - row_start or layout.n_units != int(
            seg["unit_stop"]
        ) - int(seg["unit_start"]):
            raise StoreError(
                f"{store.path}: segment {index}'s rows or units do not follow from its saved "
                "plan; the store cannot be upgraded"
            )
        rows = image_rows(plan, layout)
        rows = np.where(rows >= 0, rows + row_start, -1)
        files = store._append_images(images, inputs, rows, n_images, n_files, segment=index)
        table = store._group[IMAGES_GROUP]
        for k, img in enumerate(images):
            if img in reasons:
                r = reasons[img]
                table["retired_rows"][n_images + k] = int(r.get("rows", 0))
                table["retired_reason"][n_images + k] = str(r.get("reason", ""))
                table["retired"][n_images + k] = True
        segments.append(
            Segment(
                row_start=row_start,
                row_stop=int(seg["row_stop"]),
                unit_start=int(seg["unit_start"]),
                unit_stop=int(seg["unit_stop"]),
                plan_digest=str(seg["plan_digest"]),
                n_windows=int(plan.n_windows),
                image_start=n_images,
                image_stop=n_images + len(images),
                file_start=n_files,
                file_stop=n_files + files,
            )
        )
        n_images += len(images)
        n_files += files
    # Same keys in the same places as a fresh store's document, less the per-image ones.
    new = {"segments": [s.to_json() for s in segments], "elodin_schema": SCHEMA_VERSION}
    return {k: new.get(k, v) for k, v in attrs.items() if k != "retired"}
