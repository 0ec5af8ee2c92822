"""2-D maps of the fingerprints (from their PCA): UMAP or t-SNE, fitted on a sample.

Both are fitted on a uniform sample of ``analysis.sample-size`` valid rows of ``pca``; every
other row is then placed by the fitted model's own out-of-sample ``transform``, block by
block (on the Dask workers when there are any), so all rows get a position and none of the
fitting's quadratic cost grows with the survey:

- UMAP (umap-learn): ``UMAP.transform`` finds each new row's neighbours among the sample
  with the model's NN-descent index and optimises its position against the fixed sample
  embedding. The model is built with ``force_approximation_algorithm=True`` so that the index
  exists for small samples too (umap-learn otherwise falls back to brute force, which makes
  ``transform`` slow below 4096 rows).
- t-SNE (openTSNE): ``TSNEEmbedding.transform`` places new rows against the fixed reference
  embedding the same way. It costs about ten times more per row than UMAP's (measured: about
  3 s per 1000 rows on one core), so for survey-sized stores UMAP is the practical map;
  t-SNE is there for sample-sized ones and comparisons with Elodin-NN.

Sampled rows keep their fitted position. umap-learn's numba kernels are compiled once and kept
on disk under Elodin's cache dir (:mod:`pipeline.numba_cache`), for this process and the
workers; pynndescent's NN-descent cannot be cached by numba and compiles again in every
process (about half of what a small map costs, see benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import uuid
import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .. import config, numba_cache
from ..errors import StoreError
from ..store import Store
from . import _base

__all__ = [
    "METHODS",
    "EmbedResult",
    "SampleEmbedding",
    "StoredEmbedding",
    "embed",
    "load_embedding",
]

logger = logging.getLogger(__name__)

METHODS = ("umap", "tsne")


def _transform_block(
    model, block: np.ndarray, positions: np.ndarray, fitted: np.ndarray, n_components: int
) -> np.ndarray:
    """Embed the usable rows of ``block``; rows at ``positions`` take ``fitted`` instead."""
    block = np.asarray(block)
    out = np.full((len(block), n_components), np.nan, np.float32)
    ok = _base.finite_rows(block)
    if len(positions):
        ok[positions] = False
    if ok.any():
        if "umap" in sys.modules:  # on a worker: cache what the transform compiles
            numba_cache.enable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[ok] = np.asarray(model.transform(block[ok].astype(np.float32)), np.float32)
    if len(positions):
        out[positions] = fitted
    return out


class SampleEmbedding(TransformerMixin, BaseEstimator):
    """UMAP or t-SNE fitted on a sample of the usable rows; ``transform`` places any rows.

    Parameters
    ----------
    method : {"umap", "tsne"}
    n_components : int
    sample_size : int
    n_neighbors, min_dist
        UMAP's (``n_neighbors`` is capped below the sample size).
    perplexity
        t-SNE's (capped at a third of the sample size).
    random_state : int

    Attributes
    ----------
    model_ : umap.UMAP or openTSNE.TSNEEmbedding
    sample_index_ : ndarray
        Rows of ``X`` the model was fitted on.
    embedding_ : (n_sample, n_components) ndarray
        Their positions.
    """

    def __init__(
        self,
        method: str = "umap",
        *,
        n_components: int = 2,
        sample_size: int = 20000,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        perplexity: float = 30.0,
        random_state: int | None = 0,
    ):
        self.method = method
        self.n_components = n_components
        self.sample_size = sample_size
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.perplexity = perplexity
        self.random_state = random_state

    def fit(
        self,
        X,
        y=None,
        *,
        sample: tuple[np.ndarray, np.ndarray] | None = None,
        knn: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> SampleEmbedding:
        """Fit on a sample of ``X`` (or the given ``(index, values)``). ``knn``: UMAP's
        precomputed k-NN of the sample rows (positions into the sample, each row itself
        first), so UMAP does not build its own; the model then cannot place other rows."""
        from .reduce import _as_dask

        X = _as_dask(X)
        seed = 0 if self.random_state is None else int(self.random_state)
        if sample is None:
            index = _base.sample_index(_base.usable_mask(X), self.sample_size, seed=seed)
            values = _base.take_rows(X, index)
        else:
            index, values = sample
        values = np.asarray(values, np.float32)
        n = len(values)
        if n < 4:
            raise ValueError(f"an embedding needs at least 4 usable rows, got {n}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.method == "umap":
                numba_cache.configure()  # before numba is imported
                import umap

                numba_cache.enable()

                model = umap.UMAP(
                    n_components=self.n_components,
                    n_neighbors=int(min(self.n_neighbors, n - 1)),
                    min_dist=self.min_dist,
                    random_state=self.random_state,
                    n_jobs=1,
                    force_approximation_algorithm=True,
                    **({} if knn is None else {"precomputed_knn": knn}),
                ).fit(values)
                embedding = model.embedding_
                # The first transform builds the search index in place, which is not thread
                # safe: do it here, once, before blocks are transformed in parallel (a pickled
                # model carries the prepared index to the workers).
                if knn is None:
                    model.transform(values[:2])
            elif self.method == "tsne":
                from openTSNE import TSNE

                model = TSNE(
                    n_components=self.n_components,
                    perplexity=float(min(self.perplexity, max(1.0, (n - 1) / 3))),
                    random_state=self.random_state,
                    n_jobs=1,
                ).fit(values)
                embedding = np.asarray(model)
            else:
                raise ValueError(f"unknown embedding method {self.method!r}")
        self.model_ = model
        self.sample_index_ = np.asarray(index, np.int64)
        self.embedding_ = np.asarray(embedding, np.float32)
        self.n_features_in_ = values.shape[1]
        return self

    def transform(self, X):
        """Place rows with the fitted model (NaN rows stay NaN). Lazy for dask input."""
        import dask.array as da

        if isinstance(X, da.Array):
            return self._blocks(X, np.zeros(0, np.int64))
        return _transform_block(
            self.model_,
            np.asarray(X),
            np.zeros(0, np.int64),
            np.zeros((0, self.n_components), np.float32),
            self.n_components,
        )

    def _blocks(self, X, sample_index: np.ndarray):
        """Dask array of positions for every row; rows in ``sample_index`` keep ``embedding_``."""
        import dask.array as da
        from dask import delayed

        model = delayed(self.model_, name=f"embedding-model-{uuid.uuid4().hex}", traverse=False)
        parts = []
        blocks = X.to_delayed().ravel()
        for b, (blk, (_, where, pos)) in enumerate(
            zip(blocks, _base.split_by_block(sample_index, X.chunks[0]), strict=True)
        ):
            task = delayed(_transform_block)(
                model, blk, pos, self.embedding_[where], self.n_components
            )
            parts.append(
                da.from_delayed(task, shape=(X.chunks[0][b], self.n_components), dtype=np.float32)
            )
        return (
            da.concatenate(parts) if parts else da.zeros((0, self.n_components), dtype=np.float32)
        )


@dataclasses.dataclass
class EmbedResult:
    store: str
    method: str
    n_rows: int
    sample_size: int
    params: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.store}: {self.method} map of {self.n_rows} rows -> embedding (fitted on {self.sample_size} rows, the rest transformed)"


def embed(
    store: str | os.PathLike | Store,
    *,
    method: str | None = None,
    n_components: int = 2,
    sample_size: int | None = None,
    n_neighbors: int | None = None,
    min_dist: float | None = None,
    perplexity: float | None = None,
    seed: int | None = None,
    block_rows: int | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> EmbedResult:
    """Map every valid row of ``pca`` to 2-D and write ``embedding(cutout, embedding_dim)``.

    Parameters
    ----------
    store : path or Store
    method : {"umap", "tsne"}, optional
        Default ``analysis.embed.method``.
    n_components : int
        Dimensions of the map.
    sample_size, n_neighbors, min_dist, perplexity, seed : optional
        Defaults from ``elodin.analysis``.
    block_rows, client, scheduler, workers
        Rows per task and where the tasks run.

    Returns
    -------
    EmbedResult
    """
    st = _base.open_store(store, mode="r+")
    method = _base.choice(
        config.get("analysis.embed.method", override=method), "embedding method", METHODS
    )
    _base.require(st, "pca", "reduce")
    size = config.get_int("analysis.sample-size", override=sample_size, minimum=4)
    seed = config.get_int("analysis.seed", override=seed, minimum=0)
    params = {
        "n_neighbors": config.get_int(
            "analysis.embed.n-neighbors", override=n_neighbors, minimum=2
        ),
        "min_dist": config.get_float("analysis.embed.min-dist", override=min_dist),
        "perplexity": config.get_float("analysis.embed.perplexity", override=perplexity),
    }
    n_valid = _base.valid_count(st, stage="embed")
    if n_valid < 4:
        raise StoreError(
            f"{st.path}: an embedding needs at least 4 valid rows, the store has {n_valid}"
        )
    block = _base.block_rows(st, block_rows)
    with _base.runner(client, scheduler=scheduler, workers=workers) as run, run.activate():
        X = _base.rows(st, "pca", block=block)
        index = _base.sample_valid(st, size, seed=seed, block=block)
        values = _base.take_rows(X, index)
        model = SampleEmbedding(
            method, n_components=n_components, sample_size=size, random_state=seed, **params
        )
        knn = _graph_knn(st, index, params["n_neighbors"], n_valid) if method == "umap" else None
        model.fit(X, sample=(index, values), knn=knn)
        st.create_row_array(
            "embedding",
            tail=(n_components,),
            dims=("embedding_dim",),
            dtype="float32",
            fill=np.nan,
            attrs={"method": method},
        )
        run.compute(_base.write_rows(st, "embedding", model._blocks(X, index)))
    info = {
        "method": method,
        "n_components": n_components,
        "sample_size": len(index),
        "seed": seed,
        "precomputed_knn": knn is not None,
        # The rows the sample was drawn from: load_embedding draws it again from them.
        "n_rows": st.n_rows,
        **params,
    }
    st.set_attrs(embedding=info)
    result = EmbedResult(st.path, method, n_valid, len(index), info)
    logger.info("%s", result)
    return result


def _graph_knn(st: Store, index: np.ndarray, n_neighbors: int, n_valid: int):
    """The store's k-NN graph (``elodin neighbors``) as UMAP's precomputed k-NN of the sample
    ``index``, when the sample is every valid row (a subsample's neighbours would lie outside
    it) and the graph is current with at least ``n_neighbors - 1`` neighbours; else None."""
    from .index import graph_for

    m = min(n_neighbors, len(index) - 1)
    if len(index) != n_valid or graph_for(st, m - 1) is None:
        return None
    ind = np.asarray(st.array("neighbors").oindex[index])[:, : m - 1]
    dist = np.asarray(st.array("neighbor_distance").oindex[index])[:, : m - 1]
    pos = np.searchsorted(index, ind)
    if (ind < 0).any() or not np.array_equal(index[np.minimum(pos, len(index) - 1)], ind):
        return None
    own = np.arange(len(index))[:, None]
    return (
        np.hstack([own, pos]).astype(np.int64),
        np.hstack([np.zeros((len(index), 1), np.float32), dist]).astype(np.float32),
    )


class StoredEmbedding(TransformerMixin, BaseEstimator):
    """A fitted map restored from the store: places new rows among the fitted sample.

    The UMAP / t-SNE model itself is not kept in the store (it is neither small nor portable),
    so a new row is placed at the mean position of its ``n_neighbors`` nearest sample rows in
    PCA space: the fitted rows' positions stay as they are, and a row like fitted ones lands
    among them.

    Parameters
    ----------
    n_neighbors : int
        Sample rows averaged (the ``n_neighbors`` the map was fitted with).

    Attributes
    ----------
    sample_index_ : ndarray
        Store rows of the sample the map was fitted on.
    reference_ : (n_sample, n_pca) ndarray
        Their ``pca`` rows.
    embedding_ : (n_sample, n_components) ndarray
        Their fitted positions.
    method_ : str
    """

    def __init__(self, n_neighbors: int = 15):
        self.n_neighbors = n_neighbors

    def fit(self, X, y=None, *, positions: np.ndarray) -> StoredEmbedding:
        from sklearn.neighbors import NearestNeighbors

        self.reference_ = np.asarray(X, np.float64)
        self.embedding_ = np.asarray(positions, np.float32)
        self.n_features_in_ = self.reference_.shape[1]
        self.nn_ = NearestNeighbors().fit(self.reference_)
        return self

    def transform(self, X) -> np.ndarray:
        """Positions of the rows of ``X`` (numpy); NaN for rows holding NaN."""
        X = np.asarray(X)
        out = np.full((len(X), self.embedding_.shape[1]), np.nan, np.float32)
        ok = _base.finite_rows(X)
        if ok.any():
            m = min(int(self.n_neighbors), len(self.reference_))
            _, ind = self.nn_.kneighbors(X[ok].astype(np.float64), n_neighbors=m)
            out[ok] = self.embedding_[ind].mean(axis=1)
        return out


def load_embedding(
    store: Store, *, upto: int | None = None, block_rows: int | None = None
) -> StoredEmbedding:
    """The map :func:`embed` fitted, restored from what it recorded in the store.

    Its sample is drawn again with the recorded ``sample_size`` and ``seed`` from the valid
    rows the stage saw (the recorded ``n_rows``; ``upto`` for stores written before it was
    recorded); new rows are placed among it by :class:`StoredEmbedding` with the recorded
    ``n_neighbors``, whatever the configuration says now.

    Raises
    ------
    StoreError
        When the store has no embedding yet, or none of its fitted rows has a position.
    """
    _base.require(store, "embedding", "embed")
    info = dict(store.attrs.get("embedding") or {})
    if "sample_size" not in info:
        raise StoreError(
            f"{store.path}: the embedding records no sample; run `elodin embed {store.path}` again"
        )
    stop = int(info.get("n_rows", upto if upto is not None else store.n_rows))
    block = _base.block_rows(store, block_rows)
    index = _base.sample_valid(
        store,
        int(info["sample_size"]),
        seed=int(info.get("seed", config.get_int("analysis.seed", minimum=0))),
        block=block,
        stop=stop,
    )
    values = np.asarray(store.array("pca").oindex[index], np.float64)
    positions = np.asarray(store.array("embedding").oindex[index], np.float32)
    keep = _base.finite_rows(values) & _base.finite_rows(positions)
    if not keep.any():
        raise StoreError(f"{store.path}: no fitted row has a map position to place new rows by")
    model = StoredEmbedding(int(info.get("n_neighbors", 15))).fit(
        values[keep], positions=positions[keep]
    )
    model.sample_index_ = index[keep]
    model.method_ = str(info.get("method", ""))
    return model
