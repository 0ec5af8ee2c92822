"""k-means over every row: :class:`StreamingKMeans` (exact Lloyd passes streamed block by block,
see :mod:`pipeline.analysis.clustering`), the block kernels every clusterer assigns rows with,
and :func:`load_kmeans`, which restores a store's clustering to ``predict`` new rows."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from ...store import Store
from .. import _base
from .spaces import SPACES, feature_space

__all__ = ["StreamingKMeans", "load_kmeans"]


# ------------------------------------------------------------------------------ block kernels
def _sq_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    d = (
        (x * x).sum(axis=1)[:, None]
        - 2.0 * x @ centers.T
        + (centers * centers).sum(axis=1)[None, :]
    )
    return np.maximum(d, 0.0)


def _nearest(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Label of the nearest centre for each usable row, -1 for empty slots."""
    block = np.asarray(block)
    out = np.full(len(block), -1, np.int32)
    ok = _base.finite_rows(block)
    if ok.any() and len(centers):
        out[ok] = np.argmin(_sq_dist(block[ok], centers), axis=1).astype(np.int32)
    return out


def _lloyd_stats(block: np.ndarray, centers: np.ndarray):
    """Per-cluster sums and counts of the block's rows, and their inertia, for one Lloyd step."""
    block = np.asarray(block)
    x = block[_base.finite_rows(block)].astype(np.float64)
    k, d = centers.shape
    if len(x) == 0:
        return np.zeros((k, d)), np.zeros(k, np.int64), 0.0
    dist = _sq_dist(x, centers)
    lab = np.argmin(dist, axis=1)
    sums = np.zeros((k, d))
    np.add.at(sums, lab, x)
    counts = np.bincount(lab, minlength=k).astype(np.int64)
    return sums, counts, float(dist[np.arange(len(x)), lab].sum())


def _assign_block(
    block: np.ndarray, centers: np.ndarray, positions: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Nearest-centre labels, with sampled rows (``positions`` in the block) keeping ``labels``."""
    out = _nearest(block, centers)
    if len(positions):
        out[positions] = labels
    return out


def _bincount_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0], minlength=n)[:n].astype(np.int64)


def _as_dask(X):
    from ..reduce import _as_dask as as_dask

    return as_dask(X)


def _sample(X, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform sample of the usable rows of a dask array: (sorted row indices, values)."""
    index = _base.sample_index(_base.usable_mask(X), size, seed=seed)
    return index, np.asarray(_base.take_rows(X, index), np.float64)


# ----------------------------------------------------------------------------------- k-means
class StreamingKMeans(ClusterMixin, BaseEstimator):
    """Exact Lloyd k-means streamed over blocks, started from k-means++ on a sample.

    Parameters
    ----------
    n_clusters : int
    sample_size : int
        Rows the k-means++ start (with ``n_init`` restarts) is fitted on.
    n_init, max_iter, tol, random_state
        As :class:`sklearn.cluster.KMeans` (``tol`` relative to the mean feature variance).

    Attributes
    ----------
    cluster_centers_ : (n_clusters, n_features) ndarray
    inertia_ : float
        Sum of squared distances of all usable rows to their centre.
    n_iter_ : int
        Lloyd passes over all rows.
    counts_ : (n_clusters,) ndarray
        Rows per cluster.

    Notes
    -----
    ``X`` is a numpy or dask array; rows holding NaN (empty slots) are skipped and labelled -1.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        sample_size: int = 20000,
        n_init: int = 10,
        max_iter: int = 100,
        tol: float = 1e-4,
        random_state: int | None = 0,
    ):
        self.n_clusters = n_clusters
        self.sample_size = sample_size
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(
        self, X, y=None, *, sample: tuple[np.ndarray, np.ndarray] | None = None
    ) -> StreamingKMeans:
        import dask
        from dask import delayed
        from sklearn.cluster import KMeans

        X = _as_dask(X)
        seed = 0 if self.random_state is None else int(self.random_state)
        index, values = sample if sample is not None else _sample(X, self.sample_size, seed)
        if len(values) < self.n_clusters:
            raise ValueError(
                f"n_clusters={self.n_clusters} is more than the {len(values)} usable rows"
            )
        start = KMeans(self.n_clusters, n_init=self.n_init, random_state=self.random_state).fit(
            values
        )
        centers = start.cluster_centers_.astype(np.float64)
        tol = self.tol * float(np.mean(np.var(values, axis=0)))
        blocks = X.to_delayed().ravel()
        self.n_iter_ = 0
        for _ in range(max(1, self.max_iter)):
            parts = [delayed(_lloyd_stats)(b, centers) for b in blocks]
            sums, counts, inertia = dask.compute(_base.tree_sum(parts))[0]
            self.n_iter_ += 1
            new = centers.copy()
            filled = counts > 0
            new[filled] = sums[filled] / counts[filled, None]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= tol:
                break
        # The inertia and counts of the final centres (one more pass keeps them exact).
        parts = [delayed(_lloyd_stats)(b, centers) for b in blocks]
        _, counts, inertia = dask.compute(_base.tree_sum(parts))[0]
        self.cluster_centers_ = centers
        self.inertia_ = float(inertia)
        self.counts_ = np.asarray(counts)
        self.n_features_in_ = X.shape[1]
        self.sample_index_ = index
        return self

    def predict(self, X):
        """Nearest-centre labels (-1 for NaN rows); lazy for dask input."""
        import dask.array as da

        if isinstance(X, da.Array):
            return X.map_blocks(_nearest, self.cluster_centers_, drop_axis=1, dtype=np.int32)
        return _nearest(np.asarray(X), self.cluster_centers_)


def load_kmeans(store: Store, *, features: str = "fingerprint") -> StreamingKMeans:
    """The clustering saved in a store, ready to ``predict`` new rows (like dask-ml's
    ``KMeans.predict``, it needs only the centres).

    Parameters
    ----------
    store : Store
    features : {"fingerprint", "pixels"}
        The feature space the clustering was fitted in.

    Returns
    -------
    StreamingKMeans
        ``cluster_centers_`` (and ``counts_``) as stored, the settings the stage recorded.
        For the sample-fitted algorithms the centres are their groups' centroids, and
        ``predict`` gives a new row the label of the nearest one: what :func:`cluster` did
        for every row outside its sample. ``algorithm_`` says which algorithm it was.
    """
    features = feature_space(features)
    space = SPACES[features]
    _base.require(
        store,
        space["centers"],
        "cluster" if features == "fingerprint" else "cluster --features pixels",
    )
    info = dict(store.attrs.get(space["out"]) or {})
    params = dict(info.get("params") or {})
    centers = np.asarray(store.array(space["centers"])[...], np.float64)
    model = StreamingKMeans(
        n_clusters=int(info.get("n_clusters", len(centers))),
        n_init=int(params.get("n_init", 10)),
        tol=float(params.get("tol", 1e-4)),
    )
    model.cluster_centers_ = centers
    model.n_features_in_ = centers.shape[1] if centers.ndim == 2 else 0
    model.n_iter_ = int(params.get("n_iter", 0))
    model.inertia_ = info.get("inertia")
    model.algorithm_ = str(info.get("algorithm", "kmeans"))
    try:
        model.counts_ = np.asarray(store.array(space["sizes"])[...], np.int64)
    except KeyError:
        model.counts_ = None
    return model
