"""Similarity at survey scale: a FAISS index of the store's vectors, kept inside the store.

:class:`NeighborIndex` is a scikit-learn-like wrapper (``fit`` / ``kneighbors`` / ``save`` /
``load``) around one FAISS index; :func:`build_index` makes it for a store and
:func:`neighbors` writes the k-NN graph of every valid row with it.

Kinds
    ``flat`` (exact scan, 4 d bytes per vector), ``hnsw`` (graph, exact vectors),
    ``ivf`` (inverted lists of exact vectors), ``ivfpq`` (inverted lists of PQ codes, the
    candidates re-ranked exactly against the full vectors: FAISS's ``IVF..,PQ..,RFlat``, with an
    HNSW coarse quantiser when the lists are many) and ``auto``: ``flat`` below
    ``analysis.index.auto-threshold`` rows (about 10^6, where one exact scan still takes tens
    of milliseconds), ``ivfpq`` above.

Metrics
    ``l2`` and ``cosine`` (the vectors normalised, FAISS's L2 on them; ``1 - cos = |a - b|^2 / 2``),
    the same distances :func:`pipeline.analysis.similar` computes.

Building
    The trained part (coarse centroids, PQ codebooks) is fitted on a uniform sample of
    ``train-size`` valid rows. The rows are then read block by block by tasks (on the Dask
    workers when there are any), which also do the costly part of adding them to an IVF index
    (assigning each row to its list and encoding it, ``sa_encode``); the client appends the
    encoded blocks in row order, a bounded number of blocks in flight. The index is merged once,
    on the client, because a query against one index costs one lookup while shards cost one per
    shard; at 10^9 rows the arithmetic in benchmarks/README.md says how to shard by segment.

In the store
    ``neighbor_index(index_byte)`` holds :func:`faiss.serialize_index`'s bytes (16 MiB chunks,
    uncompressed: they barely compress and a query process must not pay for decompressing) and
    ``neighbor_index_ids(index_position)`` the store row of each indexed vector; an ``ivfpq``
    index also keeps its IVF-PQ part alone in ``neighbor_index_base`` (codes and lists, ~24 B a
    vector), which a one-off query loads instead of the whole (152 B a vector) and re-ranks
    its candidates from ``pca`` (:func:`load_base`). The attrs of
    ``neighbor_index`` record the kind, metric, space and parameters, the number of rows, the
    SHA-256 of the bytes and of each chunk (checked on load, the chunks on parallel threads: a
    damaged index is refused, never half-used), a digest of the vectors it was built from, and
    the *state* of the store it covers (the PCA basis, the segments and whether each was
    complete, the retired images). That state is a few facts read from attrs, so deciding
    whether an index is current reads no row and hashes no data. An index whose state is not the
    store's is stale: :func:`index_status` says why, ``similar`` falls back to the exact scan,
    and :func:`build_index` extends it (new segments, fewer new rows than ``run.refit-fraction``
    of those it was built on) or builds it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from .. import config
from ..errors import ConfigError, StoreError
from ..store import Store
from . import _base

__all__ = [
    "KINDS",
    "METRICS",
    "SPACES",
    "IndexResult",
    "NeighborIndex",
    "NeighborsResult",
    "build_index",
    "data_state",
    "graph_for",
    "index_status",
    "load_index",
    "neighbors",
]

logger = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
METRICS = ("l2", "cosine")
SPACES = {"pca": "pca", "fingerprint": "fingerprint"}
INDEX_VAR = "neighbor_index"
IDS_VAR = "neighbor_index_ids"
BASE_VAR = "neighbor_index_base"
GRAPH_VAR, GRAPH_DIST_VAR = "neighbors", "neighbor_distance"
_BYTE_CHUNK = 16 << 20


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
        from .reduce import _as_dask

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
        """Write the index into ``store`` (see the module docstring); returns its SHA-256."""
        import zarr

        st = _base.open_store(store)
        blob = self.to_bytes()
        sha = hashlib.sha256(blob.tobytes()).hexdigest()
        group = zarr.open_group(st.path, mode="r+", zarr_format=3)
        # The bytes' attrs go last: an index cut short by a crash fails its checksum on load.
        ids = group.create_array(
            IDS_VAR,
            shape=(len(self.ids_),),
            dtype="int64",
            chunks=(max(1, min(len(self.ids_), 1 << 22)),),
            dimension_names=("index_position",),
            overwrite=True,
        )
        if len(self.ids_):
            ids[...] = self.ids_
        chunk = max(1, min(len(blob), _BYTE_CHUNK))
        # Uncompressed (FAISS's bytes barely compress, and a query process must not pay
        # decompression), with one SHA-256 per chunk: load reads and checks the chunks in
        # parallel instead of hashing 10^8 bytes on one thread.
        arr = group.create_array(
            INDEX_VAR,
            shape=(len(blob),),
            dtype="uint8",
            chunks=(chunk,),
            compressors=None,
            dimension_names=("index_byte",),
            overwrite=True,
        )
        arr[...] = blob
        view = memoryview(blob)
        chunk_sha = [
            hashlib.sha256(view[a : a + chunk]).hexdigest() for a in range(0, len(blob), chunk)
        ]
        extra: dict[str, Any] = {}
        if self.kind_ == "ivfpq":
            # The IVF-PQ part alone (codes and ids, ~24 B a vector, no full vectors): what a
            # one-off query (`elodin similar`) loads, re-ranking its candidates from `pca`.
            base = _faiss().serialize_index(_faiss().downcast_index(self.index_.base_index))
            extra["base_sha256"] = _write_bytes(group, BASE_VAR, base, of=sha)
        arr.attrs.update(
            json.loads(
                json.dumps(
                    {
                        **self._meta(),
                        **dict(attrs or {}),
                        "n_rows": int(self.n_indexed),
                        "nbytes": len(blob),
                        "sha256": sha,
                        "chunk_bytes": chunk,
                        "chunk_sha256": chunk_sha,
                        **extra,
                    }
                )
            )
        )
        return sha

    @classmethod
    def load(cls, store: str | os.PathLike | Store) -> NeighborIndex:
        """The index saved in ``store``; :class:`StoreError` when there is none or it is damaged."""
        index, _ = load_index(store)
        return index


# ------------------------------------------------------------------------------ the store
def _index_attrs(st: Store) -> dict | None:
    if INDEX_VAR not in _base.names(st):
        return None
    return dict(st.array(INDEX_VAR).attrs.asdict())


def load_index(
    store: str | os.PathLike | Store, *, cache: bool = True
) -> tuple[NeighborIndex, dict]:
    """The saved index and its attrs, checksum verified (cached per process by checksum, so
    the explorer and a Python session query it without reading it again; ``cache=False``:
    a private copy, to extend)."""
    st = _base.open_store(store)
    meta = _index_attrs(st)
    if meta is None:
        raise StoreError(f"{st.path}: no neighbour index; run `elodin index {st.path}` first")
    damaged = f"{st.path}: the neighbour index is damaged"
    fix = f"; run `elodin index {st.path} --rebuild`"
    if not meta.get("sha256") or IDS_VAR not in _base.names(st):
        raise StoreError(f"{damaged} (its write did not finish){fix}")
    key = f"{st.path}:{meta['sha256']}"
    hit = _CACHE.get(key) if cache else None
    if hit is not None:
        return hit, meta
    index = _read_index(st, meta, meta)
    if cache:
        if len(_CACHE) > 4:
            _CACHE.clear()
        _CACHE[key] = index
    return index, meta


def _write_bytes(group, name: str, blob: np.ndarray, *, of: str) -> str:
    """``blob`` as an uncompressed byte array with its SHA-256 and per-chunk digests in its
    attrs (``of``: the SHA-256 of the index it belongs to); returns its SHA-256."""
    chunk = max(1, min(len(blob), _BYTE_CHUNK))
    arr = group.create_array(
        name,
        shape=(len(blob),),
        dtype="uint8",
        chunks=(chunk,),
        compressors=None,
        dimension_names=(f"{name}_byte",),
        overwrite=True,
    )
    arr[...] = blob
    view = memoryview(blob)
    sha = hashlib.sha256(view).hexdigest()
    arr.attrs.update(
        {
            "of": of,
            "nbytes": len(blob),
            "sha256": sha,
            "chunk_bytes": chunk,
            "chunk_sha256": [
                hashlib.sha256(view[a : a + chunk]).hexdigest() for a in range(0, len(blob), chunk)
            ],
        }
    )
    return sha


def load_base(st: Store, meta: Mapping) -> NeighborIndex | None:
    """The IVF-PQ part of the saved ``ivfpq`` index (no exact vectors: its distances are PQ
    estimates, to be re-ranked), checksum verified; None when there is none (other kinds, an
    index saved before it was kept). Cached per process like :func:`load_index`."""
    if meta.get("kind") != "ivfpq" or not meta.get("base_sha256"):
        return None
    names = _base.names(st)
    if BASE_VAR not in names or IDS_VAR not in names:
        return None
    key = f"{st.path}:{meta['sha256']}:base"
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    bmeta = dict(st.array(BASE_VAR).attrs.asdict())
    if bmeta.get("of") != meta["sha256"] or bmeta.get("sha256") != meta["base_sha256"]:
        return None  # left by another index: not this one's
    index = _read_index(st, meta, bmeta, name=BASE_VAR)
    index.kind_ = "ivfpq-codes"
    if len(_CACHE) > 4:
        _CACHE.clear()
    _CACHE[key] = index
    return index


def _read_index(
    st: Store, meta: Mapping, saved: Mapping, *, name: str = INDEX_VAR
) -> NeighborIndex:
    """The index saved in array ``name`` (its attrs ``saved``), checksum verified and
    deserialised; anything wrong is one StoreError line saying to rebuild."""
    damaged = f"{st.path}: the neighbour index is damaged"
    fix = f"; run `elodin index {st.path} --rebuild`"
    try:
        blob, intact = _read_checked(st, saved, name=name)
        ids = np.asarray(st.array(IDS_VAR)[...], np.int64)
    except Exception as e:  # zarr raises several types for a missing or corrupt chunk
        raise StoreError(f"{damaged} ({type(e).__name__}: {e}){fix}") from None
    if not intact:
        raise StoreError(f"{damaged} (its checksum does not match){fix}")
    try:
        return NeighborIndex._from(blob, ids, meta)
    except (RuntimeError, ValueError, KeyError) as e:
        raise StoreError(f"{damaged} ({' '.join(str(e).split())[:120]}){fix}") from None


def _read_checked(st: Store, meta: Mapping, *, name: str = INDEX_VAR) -> tuple[np.ndarray, bool]:
    """The index's bytes and whether they are the ones saved.

    Each chunk is read and hashed on its own thread (file reads and hashlib release the
    GIL), against the per-chunk SHA-256 recorded by :meth:`NeighborIndex.save`; an index
    saved before those were recorded is checked against its one SHA-256.
    """
    from concurrent.futures import ThreadPoolExecutor

    arr = st.array(name)
    n = int(arr.shape[0])
    if n != meta.get("nbytes"):
        return np.zeros(0, np.uint8), False
    chunk, digests = meta.get("chunk_bytes"), meta.get("chunk_sha256")
    if not chunk or not digests:
        blob = np.asarray(arr[...], np.uint8)
        return blob, hashlib.sha256(blob.tobytes()).hexdigest() == meta["sha256"]
    chunk = int(chunk)
    if len(digests) != -(-n // chunk):
        return np.zeros(0, np.uint8), False
    blob = np.empty(n, np.uint8)

    def one(i: int) -> bool:
        a = i * chunk
        part = np.asarray(arr[a : a + chunk], np.uint8)
        blob[a : a + len(part)] = part
        return hashlib.sha256(part).hexdigest() == digests[i]

    with ThreadPoolExecutor(min(len(digests), os.cpu_count() or 1, 8)) as pool:
        ok = all(pool.map(one, range(len(digests))))
    return blob, ok


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
            basis = _digest(
                np.ascontiguousarray(store.array("pca_mean")[...], np.float64).tobytes(),
                np.ascontiguousarray(store.array("pca_components")[...], np.float64).tobytes(),
            )
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


# ---------------------------------------------------------------------------- block tasks
def _read_block(path: str, variable: str, start: int, stop: int, metric: str, encoder):
    """Usable rows of ``[start, stop)``: (row ids, prepared vectors, IVF codes or None, digest)."""
    import zarr

    g = zarr.open_group(path, mode="r", zarr_format=3)
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


def _graph_block(path: str, variable: str, start: int, stop: int, index_ref, k: int):
    """Each usable row's ``k`` nearest other indexed rows: (ids, distances), -1/NaN elsewhere."""
    import zarr

    g = zarr.open_group(path, mode="r", zarr_format=3)
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


def _waves(run: _base.Runner, tasks: list, *, size: int):
    """Compute ``tasks`` a few at a time (bounded client memory), in order."""
    for i in range(0, len(tasks), size):
        yield from run.compute(*tasks[i : i + size])


def _in_flight(run: _base.Runner) -> int:
    if run.client is not None:
        try:
            return 2 * max(1, len(run.client.scheduler_info(n_workers=-1)["workers"])) + 2
        except (TypeError, KeyError):
            return 8
    return 2 * (os.cpu_count() or 1)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="row",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        desc=desc,
    )


# ------------------------------------------------------------------------------ store level
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
                    model, _ = load_index(st, cache=False)
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
    index, _ = load_index(st)
    return index, "current"


# --------------------------------------------------------------------------------- the graph
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
    model, meta = load_index(st)
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
    import zarr

    target = zarr.open_array(f"{st.path.rstrip('/')}/{name}", mode="r+", zarr_format=3)
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
