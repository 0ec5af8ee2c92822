"""The quadratic clusterings (Ward, affinity propagation, HDBSCAN) fitted on a uniform sample,
every other row assigned to its nearest centroid: :class:`SampleClusterer`; HDBSCAN's sizes
chosen from the rows it sees: :func:`hdbscan_sizes`."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from .kmeans import _as_dask, _nearest, _sample

__all__ = ["SampleClusterer", "hdbscan_sizes"]


def hdbscan_sizes(
    n_rows: int, min_cluster_size: int | None = None, min_samples: int | None = None
) -> tuple[int, int]:
    """HDBSCAN's ``(min_cluster_size, min_samples)`` for a fit on ``n_rows`` rows.

    Unset values follow the rule of ``analysis.cluster`` in elodin.yaml:
    ``min_cluster_size = max(5, round(n_rows / 100))`` and
    ``min_samples = max(2, round(log10(n_rows)))``, neither above ``n_rows``.
    """
    n = max(int(n_rows), 2)
    mcs = max(5, round(n / 100)) if min_cluster_size is None else int(min_cluster_size)
    ms = max(2, round(math.log10(n))) if min_samples is None else int(min_samples)
    return min(mcs, n), min(ms, n)


# ----------------------------------------------------------------------- sample-fitted methods
class SampleClusterer(ClusterMixin, BaseEstimator):
    """A quadratic clustering fitted on a sample; other rows go to the nearest centroid.

    Parameters
    ----------
    algorithm : {"agglomerative", "affinity", "hdbscan"}
    n_clusters : int
        Groups cut from the Ward tree (agglomerative only).
    sample_size : int
    min_cluster_size, min_samples : int, optional
        HDBSCAN's smallest group and the neighbours that make a row a core point; None: from
        the rows fitted (:func:`hdbscan_sizes`).
    cluster_selection_method : {"eom", "leaf"}
        HDBSCAN's choice of groups from its tree.
    damping, preference, max_iter
        Affinity propagation's parameters.
    random_state : int

    Attributes
    ----------
    cluster_centers_ : (k, n_features) ndarray
        Centroid of each group's sampled members (affinity: the exemplars).
    sample_index_, sample_labels_ : ndarray
        The sampled rows and the labels the fit gave them (-1: HDBSCAN noise).
    n_clusters_ : int
    min_cluster_size_, min_samples_ : int
        The HDBSCAN sizes used (hdbscan only).
    """

    def __init__(
        self,
        algorithm: str = "agglomerative",
        *,
        n_clusters: int = 8,
        sample_size: int = 20000,
        min_cluster_size: int | None = None,
        min_samples: int | None = None,
        cluster_selection_method: str = "eom",
        damping: float = 0.9,
        preference: float | None = None,
        max_iter: int = 1000,
        random_state: int | None = 0,
    ):
        self.algorithm = algorithm
        self.n_clusters = n_clusters
        self.sample_size = sample_size
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.cluster_selection_method = cluster_selection_method
        self.damping = damping
        self.preference = preference
        self.max_iter = max_iter
        self.random_state = random_state

    def _model(self, n_rows: int):
        from sklearn.cluster import HDBSCAN, AffinityPropagation, AgglomerativeClustering

        if self.algorithm == "agglomerative":
            return AgglomerativeClustering(n_clusters=self.n_clusters, linkage="ward")
        if self.algorithm == "affinity":
            return AffinityPropagation(
                damping=self.damping,
                preference=self.preference,
                max_iter=self.max_iter,
                random_state=self.random_state,
            )
        if self.algorithm == "hdbscan":
            self.min_cluster_size_, self.min_samples_ = hdbscan_sizes(
                n_rows, self.min_cluster_size, self.min_samples
            )
            return HDBSCAN(
                min_cluster_size=self.min_cluster_size_,
                min_samples=self.min_samples_,
                cluster_selection_method=self.cluster_selection_method,
                copy=True,
            )
        raise ValueError(f"unknown algorithm {self.algorithm!r}")

    def fit(
        self, X, y=None, *, sample: tuple[np.ndarray, np.ndarray] | None = None
    ) -> SampleClusterer:
        from sklearn.exceptions import ConvergenceWarning

        X = _as_dask(X)
        seed = 0 if self.random_state is None else int(self.random_state)
        index, values = sample if sample is not None else _sample(X, self.sample_size, seed)
        if self.algorithm == "agglomerative" and len(values) < self.n_clusters:
            raise ValueError(
                f"n_clusters={self.n_clusters} is more than the {len(values)} sampled rows"
            )
        model = self._model(len(values))
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                labels = model.fit_predict(values)
            except ConvergenceWarning:
                raise ValueError(
                    f"affinity propagation did not converge in {self.max_iter} iterations on {len(values)} rows; "
                    "raise analysis.cluster.affinity-max-iter or damping"
                ) from None
        labels = np.asarray(labels, np.int32)
        ids = np.unique(labels[labels >= 0])
        # Consecutive ids 0..k-1 whatever the method numbered them.
        remap = np.full(int(labels.max()) + 2 if len(labels) else 1, -1, np.int32)
        remap[ids] = np.arange(len(ids), dtype=np.int32)
        labels = np.where(labels >= 0, remap[labels], -1).astype(np.int32)
        if self.algorithm == "affinity" and len(ids):
            centers = np.asarray(model.cluster_centers_, np.float64)[ids]
        else:
            centers = np.array([values[labels == c].mean(axis=0) for c in range(len(ids))]).reshape(
                len(ids), values.shape[1]
            )
        self.cluster_centers_ = centers
        self.sample_index_ = index
        self.sample_labels_ = labels
        self.n_clusters_ = len(ids)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X):
        """Nearest-centroid labels (-1 for NaN rows, or everywhere when no group was found)."""
        import dask.array as da

        if isinstance(X, da.Array):
            return X.map_blocks(_nearest, self.cluster_centers_, drop_axis=1, dtype=np.int32)
        return _nearest(np.asarray(X), self.cluster_centers_)
