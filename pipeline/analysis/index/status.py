"""Whether the saved index still covers the store, decided from a few attrs.

When it is built, the index records the *state* of the store it covers (:func:`data_state`:
the PCA basis or the model, the segments and whether each was complete, the retired images).
That state reads no row and hashes no data, so :func:`index_status` is cheap: an index whose
state is not the store's is stale (``similar`` falls back to the exact scan) or, when the store
only gained segments, extendable (:func:`pipeline.analysis.index.build_index` adds them).
:func:`usable_index` is what a query asks: the saved index if it serves it, else why not.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...store import Store
from .. import _base
from .persist import _index_attrs, _package, load_base

__all__ = ["data_state", "index_status", "usable_index"]

logger = logging.getLogger(__name__)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def data_state(store: Store, space: str = "pca") -> dict[str, Any]:
    """What an index over ``space`` depends on, cheaply: the PCA basis (or the model), the
    segments (rows, plan, complete or not) and the retired images. Reads no row."""
    attrs = store.attrs
    if space == "pca":
        names = _base.names(store)
        if not {"pca_mean", "pca_components"} <= names:
            basis = None
        else:
            parts = [
                np.ascontiguousarray(store.array(name)[...], np.float64).tobytes()
                for name in ("pca_mean", "pca_components")
            ]
            scale = store.array("pca_scale")[...] if "pca_scale" in names else None
            if scale is not None and np.any(scale != 1):
                # Only a standardised basis adds its scale: an unscaled one keeps the digest
                # its indexes were built with before stores recorded a scale.
                parts.append(np.ascontiguousarray(scale, np.float64).tobytes())
            basis = _digest(*parts)
    else:
        basis = _digest(
            str(attrs.get("model_sha256")).encode(), str(attrs.get("fingerprint_dtype")).encode()
        )
    done = store.done_units()
    segments = [
        [
            s.row_start,
            s.row_stop,
            s.plan_digest,
            all(u in done for u in range(s.unit_start, s.unit_stop)),
        ]
        for s in store.segments
    ]
    # Retiring is for good: which records are retired says what changed (one bool a record).
    retired = np.flatnonzero(store.images().column("retired")).astype(np.int64)
    return {
        "space": space,
        "basis": basis,
        "segments": segments,
        "retired": _digest(retired.tobytes()),
        "n_retired": len(retired),
    }


def _compare(built: Mapping, now: Mapping) -> tuple[str, str]:
    if built.get("space") != now["space"] or built.get("basis") != now["basis"]:
        what = "the PCA was refitted" if now["space"] == "pca" else "the fingerprints changed"
        return "stale", f"{what} since the index was built"
    if built.get("retired") != now["retired"]:
        return "stale", (
            f"rows were retired since the index was built "
            f"({built.get('n_retired', 0)} retired image(s) then, {now['n_retired']} now)"
        )
    old, cur = [list(s) for s in built.get("segments", [])], [list(s) for s in now["segments"]]
    if cur[: len(old)] != old:
        return "stale", "the store's rows changed since the index was built"
    if len(cur) > len(old):
        return "extendable", f"{len(cur) - len(old)} new segment(s) since the index was built"
    return "current", "the index covers the store"


def index_status(store: str | os.PathLike | Store) -> tuple[str, str]:
    """``(status, why)``: ``missing``, ``current``, ``extendable`` (new segments only: not usable
    as is, but :func:`build_index` can add them) or ``stale``. Reads only attrs."""
    st = _base.open_store(store)
    meta = _index_attrs(st)
    if meta is None or "state" not in meta:
        return "missing", "the store has no neighbour index"
    return _compare(meta["state"], data_state(st, meta["state"].get("space", "pca")))


def usable_index(st: Store, *, metric: str, space: str = "pca", codes: bool = False):
    """The saved index when it serves ``metric`` queries in ``space`` and matches the store's
    data, else ``(None, why)``; a stale one is reported as a warning, never used.

    ``codes``: for an ``ivfpq`` index, only its IVF-PQ part (:func:`load_base`; a sixth of
    the bytes), for a caller that re-ranks the candidates itself from the stored vectors.
    """
    status, why = index_status(st)
    if status == "missing":
        return None, why
    meta = _index_attrs(st) or {}
    if status != "current":
        logger.warning(
            "%s: the neighbour index is stale (%s); scanning every row instead (run `elodin index %s` to update it)",
            st.path,
            why,
            st.path,
        )
        return None, f"stale: {why}"
    if meta.get("metric") != metric or meta.get("space") != space:
        return None, f"the index is {meta.get('metric')} over {meta.get('space')}"
    if codes:
        base = load_base(st, meta)
        if base is not None:
            return base, "current"
    index, _ = _package().load_index(st)
    return index, "current"
