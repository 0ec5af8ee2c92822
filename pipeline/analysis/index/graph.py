"""The k-NN graph of every valid row, by batched queries of the saved index: :func:`neighbors`.

``neighbors(cutout, neighbor)`` holds each row's nearest store rows (the row itself left out)
and ``neighbor_distance(cutout, neighbor)`` their distances; :func:`graph_for` says whether a
stage (outliers, the embedding, the report) may use them instead of querying again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid

import numpy as np

from ... import config
from ...errors import ConfigError, StoreError
from ...store import Store
from .. import _base
from ._tasks import _bar, _in_flight
from .build import SPACES
from .estimator import _CACHE, NeighborIndex, _OneThread
from .persist import _package
from .status import _compare, data_state, index_status

__all__ = ["GRAPH_DIST_VAR", "GRAPH_VAR", "NeighborsResult", "graph_for", "neighbors"]

logger = logging.getLogger(__name__)

GRAPH_VAR, GRAPH_DIST_VAR = "neighbors", "neighbor_distance"


def _graph_block(path: str, variable: str, start: int, stop: int, index_ref, k: int):
    """Each usable row's ``k`` nearest other indexed rows: (ids, distances), -1/NaN elsewhere."""
    g = Store.zarr(path)
    valid = np.asarray(g["valid"][start:stop], bool)
    x = np.asarray(g[variable][start:stop], np.float32)
    ok = valid & np.isfinite(x).all(axis=1)
    ind = np.full((stop - start, k), -1, np.int64)
    dist = np.full((stop - start, k), np.nan, np.float32)
    rows = np.flatnonzero(ok)
    if not len(rows):
        return ind, dist
    token, blob, ids, meta = index_ref
    model = _CACHE.get(token)
    if model is None:
        model = _CACHE[token] = NeighborIndex._from(blob, ids, meta)
    with _OneThread():
        d, i = model.kneighbors(x[rows], k + 1)
    me = (start + rows)[:, None]
    is_self = i == me
    # Drop the row's own entry, or the (k+1)-th when the row was not returned (ties, approximate).
    drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), k)
    keep = np.ones_like(i, bool)
    keep[np.arange(len(rows)), drop] = False
    ind[rows] = i[keep].reshape(len(rows), k)
    dist[rows] = np.where(np.isfinite(d[keep]), d[keep], np.nan).reshape(len(rows), k)
    return ind, dist


@dataclasses.dataclass
class NeighborsResult:
    store: str
    k: int
    n_rows: int
    kind: str
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.store}: the {self.k} nearest neighbours of {self.n_rows} rows -> neighbors, "
            f"neighbor_distance (from the {self.kind} index, in {self.seconds:.1f} s)"
        )


def neighbors(
    store: str | os.PathLike | Store,
    *,
    k: int | None = None,
    block_rows: int | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> NeighborsResult:
    """Write the k-NN graph of every valid row: ``neighbors(cutout, neighbor)`` (store rows,
    nearest first, the row itself left out; -1 in empty slots) and
    ``neighbor_distance(cutout, neighbor)``, by batched queries of the saved index on the
    workers. The index must cover the store (``elodin index`` first).
    """
    import dask.array as da
    from dask import delayed

    t0 = time.perf_counter()
    k = config.get_int("analysis.neighbors.k", override=k, minimum=1)
    st = _base.open_store(store, mode="r+")
    status, why = index_status(st)
    if status == "missing":
        raise StoreError(f"{st.path}: no neighbour index; run `elodin index {st.path}` first")
    if status != "current":
        raise StoreError(
            f"{st.path}: the neighbour index is stale ({why}); run `elodin index {st.path}` first"
        )
    model, meta = _package().load_index(st)
    if k >= model.n_indexed:
        raise ConfigError(
            f"{st.path}: k = {k} neighbours need more than {k} indexed rows, the index has {model.n_indexed}"
        )
    variable = SPACES[meta.get("space", "pca")]
    block = _base.block_rows(st, block_rows)
    with _base.runner(client, scheduler=scheduler, workers=workers) as run:
        ref = delayed(
            (f"graph-{meta['sha256']}", model.to_bytes(), model.ids_, model._meta()),
            name=f"neighbor-index-{uuid.uuid4().hex}",
            traverse=False,
        )
        attrs = {
            "k": k,
            "index_sha256": meta["sha256"],
            "metric": model.metric,
            "kind": model.kind_,
        }
        st.create_row_array(
            GRAPH_VAR, tail=(k,), dims=("neighbor",), dtype="int64", fill=-1, attrs=attrs
        )
        st.create_row_array(
            GRAPH_DIST_VAR, tail=(k,), dims=("neighbor",), dtype="float32", fill=np.nan, attrs=attrs
        )
        ranges = [(a, min(st.n_rows, a + block)) for a in range(0, st.n_rows, block)]
        waves = _in_flight(run)
        with _bar(st.n_rows, "neighbors", progress) as bar:
            for w in range(0, len(ranges), waves):
                part = ranges[w : w + waves]
                inds, dists = [], []
                for a, b in part:
                    t = delayed(_graph_block, nout=2)(st.path, variable, a, b, ref, k)
                    inds.append(da.from_delayed(t[0], shape=(b - a, k), dtype=np.int64))
                    dists.append(da.from_delayed(t[1], shape=(b - a, k), dtype=np.float32))
                a0, b1 = part[0][0], part[-1][1]
                run.compute(
                    _store_rows(st, GRAPH_VAR, da.concatenate(inds), a0),
                    _store_rows(st, GRAPH_DIST_VAR, da.concatenate(dists), a0),
                )
                bar.update(b1 - a0)
    st.set_attrs(neighbors={**attrs, "state": meta["state"], "space": meta.get("space", "pca")})
    result = NeighborsResult(st.path, k, model.n_indexed, model.kind_, time.perf_counter() - t0)
    logger.info("%s", result)
    return result


def _store_rows(st: Store, name: str, data, start: int):
    import dask.array as da

    target = Store.zarr(st.path, name, mode="r+")
    return da.store(
        data, target, regions=(slice(start, start + data.shape[0]),), lock=False, compute=False
    )


def graph_for(store: Store, k: int, *, metric: str = "l2") -> dict | None:
    """The attrs of the store's k-NN graph when it has at least ``k`` neighbours per row in
    ``metric`` over ``pca`` and still matches the store's data; else None."""
    names = _base.names(store)
    info = store.attrs.get("neighbors")
    if not info or not {GRAPH_VAR, GRAPH_DIST_VAR} <= names:
        return None
    if (
        info.get("metric") != metric
        or info.get("space", "pca") != "pca"
        or int(info.get("k", 0)) < k
    ):
        return None
    if _compare(info.get("state", {}), data_state(store, "pca"))[0] != "current":
        logger.warning(
            "%s: the k-NN graph is stale (the store changed since); not using it", store.path
        )
        return None
    if store.array(GRAPH_VAR).shape[0] != store.n_rows:
        return None
    return info
