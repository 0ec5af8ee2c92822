"""The estimator: :class:`NeighborIndex`, a scikit-learn-like wrapper around one FAISS index.

``fit`` / ``kneighbors`` in memory; ``save`` / ``load`` go through :mod:`.persist` (the
chunked, checksummed bytes in the store). The kinds and metrics are described in the package
docstring (:mod:`pipeline.analysis.index`). The FAISS helpers here (row preparation, distances,
the per-process cache of deserialised indexes, one OpenMP thread inside a task) are shared by
the block tasks of :mod:`.build` and :mod:`.graph`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from ...store import Store
from .. import _base

__all__ = ["KINDS", "METRICS", "NeighborIndex"]

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
METRICS = ("l2", "cosine")


# --------------------------------------------------------------------------------- faiss
def _faiss():
    import faiss

    return faiss


def _prepare(x, metric: str) -> np.ndarray:
    """Rows as contiguous float32, unit length for ``cosine`` (a zero row stays zero)."""
    x = np.ascontiguousarray(np.asarray(x, np.float32))
    if metric == "cosine" and len(x):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.ascontiguousarray(x / np.where(norm > 0, norm, 1))
    return x


def _distance(d2: np.ndarray, metric: str) -> np.ndarray:
    d2 = np.maximum(np.asarray(d2, np.float64), 0.0)
    return d2 / 2 if metric == "cosine" else np.sqrt(d2)


_CACHE: dict[str, Any] = {}


def _cached(token: str, blob: np.ndarray):
    """The FAISS index of ``blob``, deserialised once per process (workers get many blocks)."""
    index = _CACHE.get(token)
    if index is None:
        if len(_CACHE) > 4:
            _CACHE.clear()
        index = _CACHE[token] = _faiss().deserialize_index(np.asarray(blob, np.uint8))
    return index


class _OneThread:
    """FAISS's OpenMP on one thread inside a block task: the parallelism is the tasks'."""

    def __enter__(self):
        f = _faiss()
        self.before = f.omp_get_max_threads()
        f.omp_set_num_threads(1)

    def __exit__(self, *exc):
        _faiss().omp_set_num_threads(self.before)


# -------------------------------------------------------------------------------- estimator
class NeighborIndex(BaseEstimator):
    """Nearest rows by FAISS (see the module docstring for the kinds).

    Parameters
    ----------
    kind : {"auto", "flat", "ivf", "ivfpq", "hnsw"}
    metric : {"l2", "cosine"}
    nlist : int, optional
        Inverted lists (IVF kinds). Default about ``4 sqrt(rows)``, at most a 39th of the
        training rows (FAISS's minimum per centroid).
    nprobe : int
        Lists visited per query (IVF kinds).
    pq_m, pq_bits : int, optional
        PQ sub-quantisers (default ``d / 2`` when ``d`` is even, else ``d``) and bits per code
        (8, fewer when the training sample is too small for 256 centroids).
    rerank : int
        ``ivfpq``: candidates re-ranked exactly per neighbour asked (FAISS's ``k_factor``).
    hnsw_m, ef_construction, ef_search : int
        HNSW's links per node and search breadths.
    train_size : int
        Rows the trained kinds are trained on (a uniform sample).
    auto_threshold : int
        ``auto``: ``flat`` below this many rows, ``ivfpq`` from it.
    random_state : int

    Attributes
    ----------
    index_ : faiss.Index
    ids_ : ndarray of int64
        The row (of the array given to :meth:`fit`, or the ids given) of each indexed vector.
    kind_ : str
        The kind in use (``auto`` resolved).
    params_ : dict
        The parameters in use.
    n_features_in_, n_train_
    """

    def __init__(
        self,
        kind: str = "auto",
        metric: str = "l2",
        *,
        nlist: int | None = None,
        nprobe: int = 32,
        pq_m: int | None = None,
        pq_bits: int = 8,
        rerank: int = 8,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        train_size: int = 100_000,
        auto_threshold: int = 1_000_000,
        random_state: int | None = 0,
    ):
        self.kind = kind
        self.metric = metric
        self.nlist = nlist
        self.nprobe = nprobe
        self.pq_m = pq_m
        self.pq_bits = pq_bits
        self.rerank = rerank
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.train_size = train_size
        self.auto_threshold = auto_threshold
        self.random_state = random_state

    # -- building --------------------------------------------------------------------------
    def _factory(self, n_rows: int, d: int, n_train: int) -> tuple[str, str, dict]:
        if self.kind not in KINDS:
            raise ValueError(
                f"unknown index kind {self.kind!r} (expected one of {', '.join(KINDS)})"
            )
        if self.metric not in METRICS:
            raise ValueError(
                f"unknown metric {self.metric!r} (expected one of {', '.join(METRICS)})"
            )
        kind = self.kind
        if kind == "auto":
            kind = "flat" if n_rows < self.auto_threshold else "ivfpq"
        params: dict[str, Any] = {}
        if kind == "flat":
            return kind, "Flat", params
        if kind == "hnsw":
            params.update(m=int(self.hnsw_m), ef_construction=int(self.ef_construction))
            params["ef_search"] = int(self.ef_search)
            return kind, f"HNSW{int(self.hnsw_m)}", params
        nlist = self.nlist or round(4 * float(np.sqrt(max(n_rows, 1))))
        nlist = int(max(1, min(nlist, n_train // 39 or 1)))
        params.update(nlist=nlist, nprobe=int(min(self.nprobe, nlist)))
        # Past ~16k lists a flat coarse quantiser costs more per query than the lists themselves.
        quantiser = "_HNSW32" if nlist >= 16384 else ""
        if kind == "ivf":
            return kind, f"IVF{nlist}{quantiser},Flat", params
        m = int(self.pq_m or (d // 2 if d % 2 == 0 else d))
        if d % m:
            raise ValueError(f"pq_m = {m} must divide the dimension {d}")
        bits = int(min(self.pq_bits, max(1, int(np.log2(max(2, n_train // 39))))))
        params.update(pq_m=m, pq_bits=bits, rerank=int(self.rerank))
        return kind, f"IVF{nlist}{quantiser},PQ{m}x{bits},RFlat", params

    def train(self, sample, *, n_rows: int) -> NeighborIndex:
        """Make the empty index for ``n_rows`` rows and train it on ``sample`` (usable rows)."""
        f = _faiss()
        sample = _prepare(sample, self.metric)
        n, d = sample.shape
        if n == 0:
            raise ValueError("no usable rows to train the index on")
        self.kind_, self.factory_, self.params_ = self._factory(n_rows, d, n)
        index = f.index_factory(d, self.factory_, f.METRIC_L2)
        if self.kind_ == "hnsw":
            index.hnsw.efConstruction = self.params_["ef_construction"]
        if not index.is_trained:
            seed = 0 if self.random_state is None else int(self.random_state)
            ivf = f.extract_index_ivf(index)
            # Ten k-means passes, and 64 rows per PQ centroid, place the centroids as well as
            # FAISS's 25 and 256 for re-ranked search, at a fraction of the training time.
            ivf.cp.seed, ivf.cp.niter = seed, 10
            if self.kind_ == "ivfpq":
                pq = f.downcast_index(ivf).pq
                pq.cp.seed, pq.cp.niter, pq.cp.max_points_per_centroid = seed, 10, 64
            index.train(sample)
        self.index_ = index
        self._tune()
        self.ids_ = np.zeros(0, np.int64)
        self.n_features_in_ = d
        self.n_train_ = n
        return self

    def _tune(self) -> None:
        f = _faiss()
        p = self.params_
        if "nprobe" in p:
            f.extract_index_ivf(self.index_).nprobe = p["nprobe"]
        if "rerank" in p:
            f.downcast_index(self.index_).k_factor = float(p["rerank"])
        if "ef_search" in p:
            f.downcast_index(self.index_).hnsw.efSearch = p["ef_search"]

    def encoder(self) -> np.ndarray | None:
        """Bytes of the trained, empty IVF part that block tasks encode rows with (None for the
        kinds that add raw vectors)."""
        if self.kind_ not in ("ivf", "ivfpq"):
            return None
        f = _faiss()
        ivf = f.downcast_index(self.index_.base_index) if self.kind_ == "ivfpq" else self.index_
        if ivf.ntotal:
            ivf = f.clone_index(ivf)
            ivf.reset()
        return f.serialize_index(ivf)

    def add_encoded(self, ids: np.ndarray, vectors: np.ndarray, codes: np.ndarray | None):
        """Append prepared rows (and their IVF codes from :meth:`encoder`'s index)."""
        f = _faiss()
        if len(ids) == 0:
            return self
        if codes is None:
            self.index_.add(vectors)
        elif self.kind_ == "ivf":
            self.index_.add_sa_codes(codes)
        else:
            base = f.downcast_index(self.index_.base_index)
            base.add_sa_codes(codes)
            f.downcast_index(self.index_.refine_index).add(vectors)
            self.index_.ntotal = base.ntotal
        self.ids_ = np.concatenate([self.ids_, np.asarray(ids, np.int64)])
        return self

    def add(self, X, ids=None) -> NeighborIndex:
        """Add the usable rows of ``X`` (numpy) without training again; ``ids`` default to
        ``len(self.ids_) + row``."""
        X = np.asarray(X)
        ok = _base.finite_rows(X)
        ids = (
            np.arange(len(X), dtype=np.int64) + (int(self.ids_.max()) + 1 if len(self.ids_) else 0)
            if ids is None
            else np.asarray(ids, np.int64)
        )
        vecs = _prepare(X[ok], self.metric)
        self.index_.add(vecs)
        self.ids_ = np.concatenate([self.ids_, ids[ok]])
        return self

    def fit(self, X, y=None, ids=None) -> NeighborIndex:
        """Train on a uniform sample of the usable rows of ``X`` and add all of them.

        ``X`` numpy or dask (added block by block); rows holding NaN are skipped; ``ids``
        (default the row positions) name the rows in the answers.
        """
        from ..reduce import _as_dask

        X = _as_dask(X)
        seed = 0 if self.random_state is None else int(self.random_state)
        mask = _base.usable_mask(X)
        sample = _base.take_rows(X, _base.sample_index(mask, self.train_size, seed=seed))
        n_rows = int(mask.sum().compute())
        self.train(sample, n_rows=n_rows)
        ids = np.arange(X.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        start = 0
        for b in range(X.numblocks[0]):
            block = np.asarray(X.blocks[b].compute())
            self.add(block, ids[start : start + len(block)])
            start += len(block)
        return self

    # -- querying --------------------------------------------------------------------------
    @property
    def n_indexed(self) -> int:
        return int(self.index_.ntotal)

    def kneighbors(self, X, n_neighbors: int = 10, return_distance: bool = True):
        """The ``n_neighbors`` nearest indexed rows of each row of ``X``.

        Returns ``(distances, ids)`` (or ``ids``), each ``(len(X), n_neighbors)``, nearest
        first; where fewer rows exist, ids are -1 and distances inf.
        """
        k = int(n_neighbors)
        if k < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {k}")
        q = _prepare(np.atleast_2d(X), self.metric)
        if q.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {q.shape[1]} features, the index has {self.n_features_in_}")
        if len(q) < 64:
            # A few queries: OpenMP's start-up and spinning cost more than they save (50x on a
            # loaded machine); batches (the graph) use every thread.
            with _OneThread():
                d2, pos = self.index_.search(q, k)
        else:
            d2, pos = self.index_.search(q, k)
        found = pos >= 0
        ids = np.where(found, self.ids_[np.where(found, pos, 0)], -1)
        if not return_distance:
            return ids
        return np.where(found, _distance(d2, self.metric), np.inf), ids

    # -- persistence -----------------------------------------------------------------------
    def to_bytes(self) -> np.ndarray:
        return _faiss().serialize_index(self.index_)

    def _meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind_,
            "requested_kind": self.kind,
            "metric": self.metric,
            "factory": self.factory_,
            "params": self.params_,
            "n_features": int(self.n_features_in_),
            "n_train": int(self.n_train_),
        }

    @classmethod
    def _from(cls, blob: np.ndarray, ids: np.ndarray, meta: Mapping[str, Any]) -> NeighborIndex:
        self = cls(meta.get("requested_kind", meta["kind"]), meta["metric"])
        self.index_ = _faiss().deserialize_index(np.asarray(blob, np.uint8))
        self.ids_ = np.asarray(ids, np.int64)
        self.kind_, self.factory_ = meta["kind"], meta["factory"]
        self.params_ = dict(meta["params"])
        self.n_features_in_, self.n_train_ = int(meta["n_features"]), int(meta["n_train"])
        if self.index_.ntotal != len(self.ids_):
            raise ValueError(f"{self.index_.ntotal} vectors but {len(self.ids_)} ids")
        return self

    def save(self, store: str | os.PathLike | Store, *, attrs: Mapping | None = None) -> str:
        """Write the index into ``store`` (see :mod:`.persist`); returns its SHA-256."""
        from .persist import save_index

        return save_index(self, store, attrs=attrs)

    @classmethod
    def load(cls, store: str | os.PathLike | Store) -> NeighborIndex:
        """The index saved in ``store``; :class:`StoreError` when there is none or it is damaged."""
        from .persist import load_index

        index, _ = load_index(store)
        return index
