"""Building (or extending) the store's neighbour index: :func:`build_index`.

The trained part (coarse centroids, PQ codebooks) is fitted on a uniform sample of
``train-size`` valid rows. The rows are then read block by block by tasks (on the Dask workers
when there are any), which also do the costly part of adding them to an IVF index (assigning
each row to its list and encoding it, ``sa_encode``); the client appends the encoded blocks in
row order, a bounded number of blocks in flight. The index is merged once, on the client,
because a query against one index costs one lookup while shards cost one per shard; at 10^9
rows the arithmetic in benchmarks/README.md says how to shard by segment. An index whose store
only gained segments is extended (fewer new rows than ``run.refit-fraction`` of those it was
built on) or built again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid

import numpy as np

from ... import config
from ...errors import StoreError
from ...store import Store
from .. import _base
from ._tasks import _bar, _in_flight, _waves
from .estimator import KINDS, METRICS, NeighborIndex, _cached, _OneThread, _prepare
from .persist import INDEX_VAR, _index_attrs, _package
from .status import _compare, _digest, data_state

__all__ = ["SPACES", "IndexResult", "build_index"]

logger = logging.getLogger(__name__)

SPACES = {"pca": "pca", "fingerprint": "fingerprint"}


# ---------------------------------------------------------------------------- block tasks
def _read_block(path: str, variable: str, start: int, stop: int, metric: str, encoder):
    """Usable rows of ``[start, stop)``: (row ids, prepared vectors, IVF codes or None, digest)."""
    g = Store.zarr(path)
    valid = np.asarray(g["valid"][start:stop], bool)
    x = np.asarray(g[variable][start:stop], np.float32)
    ok = valid & np.isfinite(x).all(axis=1)
    ids = (start + np.flatnonzero(ok)).astype(np.int64)
    vecs = _prepare(x[ok], metric)
    codes = None
    if encoder is not None and len(ids):
        token, blob = encoder
        with _OneThread():
            codes = _cached(token, blob).sa_encode(vecs)
    return ids, vecs, codes, _digest(ids.tobytes(), vecs.tobytes())


@dataclasses.dataclass
class IndexResult:
    """What :func:`build_index` did."""

    store: str
    kind: str
    metric: str
    space: str
    n_rows: int
    nbytes: int
    action: str
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.store}: {self.action} {'an' if self.kind[0] in 'aeiou' else 'a'} {self.kind} index ({self.metric}, {self.space}) of "
            f"{self.n_rows} rows, {self.nbytes / max(self.n_rows, 1):.0f} bytes per row, "
            f"in {self.seconds:.1f} s"
        )


def _settings(kind, space, metric) -> tuple[str, str, str]:
    kind = _base.choice(config.get("analysis.index.kind", override=kind), "index kind", KINDS)
    space = _base.choice(
        config.get("analysis.index.space", override=space), "index space", tuple(SPACES)
    )
    metric = _base.choice(config.get("analysis.index.metric", override=metric), "metric", METRICS)
    return kind, space, metric


def _estimator(kind: str, metric: str, seed: int) -> NeighborIndex:
    nlist = config.get("analysis.index.nlist")
    pq_m = config.get("analysis.index.pq-m")
    return NeighborIndex(
        kind,
        metric,
        nlist=None if nlist is None else config.get_int("analysis.index.nlist", minimum=1),
        nprobe=config.get_int("analysis.index.nprobe", minimum=1),
        pq_m=None if pq_m is None else config.get_int("analysis.index.pq-m", minimum=1),
        pq_bits=config.get_int("analysis.index.pq-bits", minimum=1),
        rerank=config.get_int("analysis.index.rerank", minimum=1),
        hnsw_m=config.get_int("analysis.index.hnsw-m", minimum=2),
        ef_construction=config.get_int("analysis.index.ef-construction", minimum=1),
        ef_search=config.get_int("analysis.index.ef-search", minimum=1),
        train_size=config.get_int("analysis.index.train-size", minimum=1),
        auto_threshold=config.get_int("analysis.index.auto-threshold", minimum=1),
        random_state=seed,
    )


def build_index(
    store: str | os.PathLike | Store,
    *,
    kind: str | None = None,
    space: str | None = None,
    metric: str | None = None,
    rebuild: bool = False,
    refit_fraction: float | None = None,
    seed: int | None = None,
    block_rows: int | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> IndexResult:
    """Build (or extend) the store's neighbour index and save it in the store.

    Parameters
    ----------
    store : path or Store
    kind, space, metric : optional
        Defaults from ``analysis.index`` (``auto``, ``pca``, ``l2``).
    rebuild : bool
        Build from scratch even when the saved index could be extended.
    refit_fraction : float, optional
        An index of the same settings whose store only gained segments is extended (no
        training) while the new rows are fewer than this fraction of the rows it was built
        on (default ``run.refit-fraction``); otherwise it is built again.
    seed, block_rows, client, scheduler, workers, progress
        Sampling seed, rows per task, where the tasks run, the progress bar.

    Returns
    -------
    IndexResult
    """
    from dask import delayed

    t0 = time.perf_counter()
    kind, space, metric = _settings(kind, space, metric)
    st = _base.open_store(store, mode="r+")
    variable = SPACES[space]
    if space == "pca":
        _base.require(st, "pca", "reduce")
    fraction = float(
        refit_fraction if refit_fraction is not None else config.get("run.refit-fraction", 0.25)
    )
    seed = config.get_int("analysis.seed", override=seed, minimum=0)
    n_valid = _base.valid_count(st, stage="index")
    block = _base.block_rows(st, block_rows)
    est = _estimator(kind, metric, seed)
    state = data_state(st, space)
    meta = _index_attrs(st)
    start = 0
    model = None
    if meta is not None and not rebuild:
        status, _why = _compare(meta.get("state", {}), state)
        same = (
            meta.get("requested_kind"),
            meta.get("metric"),
            meta.get("state", {}).get("space"),
        ) == (kind, metric, space)
        if same and status == "current":
            return IndexResult(
                st.path,
                meta["kind"],
                metric,
                space,
                int(meta["n_rows"]),
                int(meta["nbytes"]),
                "kept",
                time.perf_counter() - t0,
            )
        if same and status == "extendable":
            covered = len(meta["state"]["segments"])
            start = st.segments[covered].row_start
            new = n_valid - int(meta["n_rows"])
            if new < fraction * int(meta.get("trained_on", meta["n_rows"])):
                try:
                    model, _ = _package().load_index(st, cache=False)
                except StoreError as e:
                    logger.warning("%s; building it again", e)
                    start = 0
            else:
                start = 0
    with _base.runner(client, scheduler=scheduler, workers=workers) as run, run.activate():
        if model is None:
            start = 0
            X = _base.rows(st, variable, block=block)
            index = _base.sample_valid(st, est.train_size, seed=seed, block=block)
            sample = _base.take_rows(X, index)
            sample = sample[_base.finite_rows(sample)]
            est.train(sample, n_rows=n_valid)
            model, action, content = est, "built", []
        else:
            action, content = "extended", [meta.get("content_digest", "").encode()]
        blob = model.encoder()
        encoder = (
            delayed(
                (f"encoder-{uuid.uuid4().hex}", blob),
                name=f"index-encoder-{uuid.uuid4().hex}",
                traverse=False,
            )
            if blob is not None
            else None
        )
        ranges = [(a, min(st.n_rows, a + block)) for a in range(start, st.n_rows, block)]
        tasks = [delayed(_read_block)(st.path, variable, a, b, metric, encoder) for a, b in ranges]
        with _bar(st.n_rows - start, f"index ({model.kind_})", progress) as bar:
            for (a, b), (ids, vecs, codes, digest) in zip(
                ranges, _waves(run, tasks, size=_in_flight(run)), strict=True
            ):
                model.add_encoded(ids, vecs, codes)
                content.append(digest.encode())
                bar.update(b - a)
    sha = model.save(
        st,
        attrs={
            "space": space,
            "state": state,
            "content_digest": _digest(*content),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "trained_on": (
                int(meta.get("trained_on", meta["n_rows"]))
                if action == "extended"
                else int(model.n_indexed)
            ),
        },
    )
    nbytes = int(st.array(INDEX_VAR).shape[0])
    st.set_attrs(
        neighbor_index={
            "kind": model.kind_,
            "metric": metric,
            "space": space,
            "n_rows": model.n_indexed,
            "sha256": sha,
        }
    )
    result = IndexResult(
        st.path,
        model.kind_,
        metric,
        space,
        model.n_indexed,
        nbytes,
        action,
        time.perf_counter() - t0,
    )
    logger.info("%s", result)
    return result
