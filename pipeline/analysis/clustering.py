"""Groups of fingerprints in PCA space: k-means over all rows; agglomerative (Ward), affinity
propagation and HDBSCAN on a sample, every other row assigned to its nearest centroid.

k-means
    :class:`StreamingKMeans`: k-means++ with ``n_init`` restarts (scikit-learn's
    :class:`~sklearn.cluster.KMeans`) on a random sample gives the start, then exact Lloyd
    iterations stream over *all* rows block by block (each task returns per-cluster sums,
    counts and inertia; the client adds them and moves the centres) until the centres move
    less than ``tol``. This minimises the true k-means objective over all rows, which
    :class:`~sklearn.cluster.MiniBatchKMeans` (one noisy pass) does not reach, and unlike
    dask-ml's KMeans it needs no persisted array: a pass reads the ``pca`` variable (N x 20
    float32, small next to the fingerprints) once, and a good start from the sample keeps the
    passes few. The result is the same algorithm as scikit-learn's Lloyd KMeans.

agglomerative, affinity, hdbscan
    Their memory or time is quadratic in the rows, so :class:`SampleClusterer` fits them on a
    uniform sample (``analysis.sample-size`` rows; affinity propagation at most 5000 by
    default, as it keeps three n x n float64 matrices) and summarises each group by the centroid
    of its members (affinity propagation: its exemplar). Sampled rows keep the label they got
    in the fit (HDBSCAN's noise label ``-1`` included); every other row takes the label of its
    nearest centroid, so only sampled rows can be noise.

hdbscan's sizes
    Fingerprints in PCA space are one dense cloud (empty sky, faint smudges) with small, sparse
    groups of sources around it; scikit-learn's default ``min_samples = min_cluster_size`` calls
    all of it noise on real images (every row of the Hubble Deep Field's 224 sliding windows).
    :func:`hdbscan_sizes` scales both with the rows HDBSCAN sees instead: ``min_cluster_size``
    1 % of them (at least 5) and ``min_samples`` only slowly (``log10`` of the rows, at least
    2): on sliding windows of the HDF (224 to 3120 rows) a ``min_samples`` of a fifth of
    ``min_cluster_size`` already called 97 % of 3120 rows noise, 2 to 3 left a quarter to a
    third noise. ``eom`` selection keeps a few large groups; ``leaf`` finds more, smaller ones
    and calls three quarters of the rows noise.

Quality is reported as the silhouette and Davies–Bouldin scores of a sample (noise left out).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from .. import config
from ..errors import ConfigError, StoreError
from ..store import Store
from . import _base

__all__ = [
    "ALGORITHMS",
    "ClusterResult",
    "SampleClusterer",
    "StreamingKMeans",
    "cluster",
    "hdbscan_sizes",
    "load_kmeans",
]

logger = logging.getLogger(__name__)

ALGORITHMS = ("kmeans", "agglomerative", "affinity", "hdbscan")
SAMPLED = ("agglomerative", "affinity", "hdbscan")
AFFINITY_DEFAULT_SAMPLE = 5000
HDBSCAN_SELECTIONS = ("eom", "leaf")
# Per feature space (the vocabulary of ``reduce --features``): the reduction grouped, the
# variables written and their dimension names.
SPACES: Mapping[str, Mapping[str, str]] = {
    "fingerprint": {
        "in": "pca",
        "out": "cluster",
        "centers": "cluster_centers",
        "sizes": "cluster_size",
        "id": "cluster_id",
        "component": "component",
    },
    "pixels": {
        "in": "pca_pixels",
        "out": "cluster_pixels",
        "centers": "cluster_pixels_centers",
        "sizes": "cluster_pixels_size",
        "id": "pixel_cluster_id",
        "component": "pixel_component",
    },
}
# The names ``cluster`` took before it spoke ``reduce``'s vocabulary (``--on pca|pca_pixels``).
DEPRECATED_FEATURES = {"pca": "fingerprint", "pca_pixels": "pixels"}
_warned: set[str] = set()


def feature_space(value: str | None, *, flag: str = "features") -> str:
    """The feature space ``fingerprint`` or ``pixels``; the old names ``pca`` and
    ``pca_pixels`` still work and warn once per process (a FutureWarning)."""
    value = "fingerprint" if value is None else value
    if value in DEPRECATED_FEATURES:
        new = DEPRECATED_FEATURES[value]
        if value not in _warned:
            _warned.add(value)
            warnings.warn(
                f"{flag}={value!r} is deprecated: say {new!r} (the feature space, as reduce does)",
                FutureWarning,
                stacklevel=3,
            )
        return new
    return _base.choice(value, "clustering input", tuple(SPACES))


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
    from .reduce import _as_dask as as_dask

    return as_dask(X)


def _sample(X, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform sample of the usable rows of a dask array: (sorted row indices, values)."""
    index = _base.sample_index(_base.usable_mask(X), size, seed=seed)
    return index, np.asarray(_base.take_rows(X, index), np.float64)


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


# ------------------------------------------------------------------------------- store level
@dataclasses.dataclass
class ClusterResult:
    """What :func:`cluster` found: sizes (label -> rows, ``-1`` = noise) and quality."""

    store: str
    algorithm: str
    variable: str
    n_clusters: int
    sizes: dict[int, int]
    silhouette: float
    davies_bouldin: float
    inertia: float | None
    params: dict[str, Any]
    #: One line when the method found no group at all (every row noise), saying what to change.
    note: str | None = None

    def lines(self) -> list[str]:
        head = f"{self.store}: {self.algorithm} -> {self.variable}: {self.n_clusters} clusters"
        quality = f"silhouette {self.silhouette:.3f}, Davies-Bouldin {self.davies_bouldin:.3f} (on a sample)"
        if self.inertia is not None:
            quality += f", inertia {self.inertia:.6g}"
        out = [head, quality, f"{'cluster':>8} {'rows':>10}"]
        out += [f"{label:>8} {count:>10}" for label, count in sorted(self.sizes.items())]
        if self.note:
            out.append(self.note)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _no_group_note(path: str, model: SampleClusterer, n_rows: int, n_valid: int) -> str:
    """The one line saying that a fit found no group, and what to change."""
    if model.algorithm != "hdbscan":
        return f"{path}: {model.algorithm} found no group in the sample; every row is labelled -1"
    mcs, ms = model.min_cluster_size_, model.min_samples_
    larger = ", a larger --sample-size" if n_rows < n_valid else ""
    return (
        f"{path}: hdbscan called all {n_rows} sampled rows noise (min_cluster_size {mcs}, "
        f"min_samples {ms}, {model.cluster_selection_method}), so every row is labelled -1; "
        f"try --min-cluster-size {max(2, mcs // 2)} --min-samples {max(1, ms // 2)}{larger} "
        "or --algorithm kmeans"
    )


def _quality(
    values: np.ndarray, labels: np.ndarray, *, limit: int, seed: int
) -> tuple[float, float]:
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    keep = labels >= 0
    values, labels = values[keep], labels[keep]
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return float("nan"), float("nan")
    if len(values) > limit:
        pick = np.random.default_rng(seed).choice(len(values), limit, replace=False)
        values, labels = values[pick], labels[pick]
        if len(np.unique(labels)) < 2:
            return float("nan"), float("nan")
    return float(silhouette_score(values, labels)), float(davies_bouldin_score(values, labels))


def cluster(
    store: str | os.PathLike | Store,
    *,
    algorithm: str | None = None,
    n_clusters: int | None = None,
    sample_size: int | None = None,
    features: str = "fingerprint",
    min_cluster_size: int | None = None,
    min_samples: int | None = None,
    seed: int | None = None,
    block_rows: int | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> ClusterResult:
    """Group the store's rows in PCA space and write the labels.

    Parameters
    ----------
    store : path or Store
    algorithm : {"kmeans", "agglomerative", "affinity", "hdbscan"}, optional
        Default ``analysis.cluster.algorithm``.
    n_clusters : int, optional
        k-means and agglomerative (affinity propagation and HDBSCAN find their own number).
    sample_size : int, optional
        Rows the sample-fitted methods (and the k-means start) see; default
        ``analysis.cluster.sample-size``, else ``analysis.sample-size`` (affinity: at most 5000).
    features : {"fingerprint", "pixels"}
        The feature space, as ``reduce`` names it: group the PCA of the CNN fingerprints
        (``pca``, writes ``cluster``) or of the pixel baseline (``pca_pixels``, writes
        ``cluster_pixels``). The old names ``"pca"`` / ``"pca_pixels"`` still work, with a
        FutureWarning.
    min_cluster_size, min_samples : int, optional
        HDBSCAN's; default ``analysis.cluster.min-cluster-size`` / ``min-samples``, which when
        null are chosen from the sampled rows (:func:`hdbscan_sizes`).
    seed, block_rows, client, scheduler, workers
        Sampling seed, rows per task, where tasks run.

    Returns
    -------
    ClusterResult

    Notes
    -----
    Writes ``cluster(cutout)`` int32 (-1 in empty slots and for HDBSCAN's sampled noise),
    ``cluster_centers(cluster_id, component)``, ``cluster_size(cluster_id)`` and the store attr
    ``cluster`` (algorithm, parameters, quality). When HDBSCAN finds no group, every row is
    -1 and the result's ``note`` (also logged as a warning) says which settings to change.
    """
    st = _base.open_store(store, mode="r+")
    features = feature_space(features)
    space = SPACES[features]
    algo = _base.choice(
        config.get("analysis.cluster.algorithm", override=algorithm),
        "clustering algorithm",
        ALGORITHMS,
    )
    _base.require(
        st, space["in"], "reduce" if features == "fingerprint" else "reduce --features pixels"
    )
    k = config.get_int("analysis.cluster.n-clusters", override=n_clusters, minimum=1)
    seed = config.get_int("analysis.seed", override=seed, minimum=0)
    size = sample_size if sample_size is not None else config.get("analysis.cluster.sample-size")
    if size is None:
        size = config.get_int("analysis.sample-size", minimum=2)
        if algo == "affinity":
            size = min(size, AFFINITY_DEFAULT_SAMPLE)
    size = config.get_int("analysis.cluster.sample-size", override=size, minimum=2)
    n_valid = _base.valid_count(st, stage="cluster")
    if algo in ("kmeans", "agglomerative") and k > n_valid:
        raise StoreError(
            f"{st.path}: {k} clusters asked for, but the store has only {n_valid} valid rows"
        )
    if algo in ("kmeans", "agglomerative") and k > min(size, n_valid):
        raise ConfigError(
            f"{k} clusters asked for, but {algo} starts from a sample of {min(size, n_valid)} rows; raise --sample-size"
        )
    hdbscan_settings: dict[str, Any] = {}
    if algo == "hdbscan":
        # Checked before anything is written; null sizes are chosen from the sample below.
        for key, given, low in (
            ("min-cluster-size", min_cluster_size, 2),
            ("min-samples", min_samples, 1),
        ):
            value = config.get(f"analysis.cluster.{key}", override=given)
            hdbscan_settings[key] = (
                None
                if value is None
                else config.get_int(f"analysis.cluster.{key}", override=value, minimum=low)
            )
        hdbscan_settings["selection"] = config.get_choice(
            "analysis.cluster.cluster-selection", HDBSCAN_SELECTIONS
        )
    block = _base.block_rows(st, block_rows)
    params: dict[str, Any] = {"sample_size": int(min(size, n_valid)), "seed": seed}
    note = None

    with _base.runner(client, scheduler=scheduler, workers=workers) as run, run.activate():
        X = _base.rows(st, space["in"], block=block)
        index = _base.sample_valid(st, size, seed=seed, block=block)
        values = np.asarray(_base.take_rows(X, index), np.float64)
        inertia = None
        if algo == "kmeans":
            model = StreamingKMeans(
                k,
                sample_size=size,
                n_init=config.get_int("analysis.cluster.n-init", minimum=1),
                max_iter=config.get_int("analysis.cluster.max-iter", minimum=1),
                tol=config.get_float("analysis.cluster.tol"),
                random_state=seed,
            ).fit(X, sample=(index, values))
            labels_x = model.predict(X)
            sample_labels = _nearest(values, model.cluster_centers_)
            inertia = model.inertia_
            params.update(n_clusters=k, n_iter=model.n_iter_, n_init=model.n_init, tol=model.tol)
        else:
            model = SampleClusterer(
                algo,
                n_clusters=k,
                sample_size=size,
                min_cluster_size=hdbscan_settings.get("min-cluster-size"),
                min_samples=hdbscan_settings.get("min-samples"),
                cluster_selection_method=hdbscan_settings.get("selection", "eom"),
                damping=config.get_float("analysis.cluster.affinity-damping"),
                preference=config.get("analysis.cluster.affinity-preference"),
                max_iter=config.get_int("analysis.cluster.affinity-max-iter", minimum=1),
                random_state=seed,
            )
            try:
                model.fit(X, sample=(index, values))
            except ValueError as e:
                raise ConfigError(f"{st.path}: {e}") from None
            if model.n_clusters_ == 0:
                note = _no_group_note(st.path, model, len(values), n_valid)
                logger.warning("%s", note)
            sample_labels = model.sample_labels_
            parts = _base.split_by_block(index, X.chunks[0])
            import dask.array as da
            from dask import delayed

            blocks = X.to_delayed().ravel()
            labels_x = (
                da.concatenate(
                    [
                        da.from_delayed(
                            delayed(_assign_block)(
                                b, model.cluster_centers_, pos_in_block, sample_labels[where]
                            ),
                            shape=(X.chunks[0][i],),
                            dtype=np.int32,
                        )
                        for i, (b, (_, where, pos_in_block)) in enumerate(
                            zip(blocks, parts, strict=True)
                        )
                    ]
                )
                if len(blocks)
                else da.zeros((0,), dtype=np.int32)
            )
            if algo == "agglomerative":
                params["n_clusters"] = k
            elif algo == "hdbscan":
                params.update(
                    min_cluster_size=model.min_cluster_size_,
                    min_samples=model.min_samples_,
                    cluster_selection_method=model.cluster_selection_method,
                    # "data": chosen from the sampled rows (hdbscan_sizes), "set": given.
                    min_cluster_size_from="data" if model.min_cluster_size is None else "set",
                    min_samples_from="data" if model.min_samples is None else "set",
                )
            else:
                params.update(damping=model.damping, preference=model.preference)
        centers = model.cluster_centers_
        n_found = len(centers)
        st.create_row_array(space["out"], dtype="int32", fill=-1, attrs={"algorithm": algo})
        from dask import delayed

        count_parts = [delayed(_bincount_labels)(b, n_found) for b in labels_x.to_delayed().ravel()]
        # One compute: the labels are made once, then both stored and counted.
        _, counts = run.compute(
            _base.write_rows(st, space["out"], labels_x), _base.tree_sum(count_parts)
        )
        noise = int(np.count_nonzero(sample_labels < 0))
    counts = np.asarray(counts, np.int64).reshape(n_found)
    sizes = {int(i): int(c) for i, c in enumerate(counts)}
    if noise:
        sizes[-1] = noise
    quality_limit = config.get_int("analysis.cluster.quality-sample", minimum=10)
    sil, dbi = _quality(values, sample_labels, limit=quality_limit, seed=seed)
    st.write_array(
        space["centers"],
        centers.astype(np.float64).reshape(n_found, X.shape[1]),
        dims=(space["id"], space["component"]),
    )
    st.write_array(space["sizes"], counts.astype(np.int64), dims=(space["id"],))
    result = ClusterResult(
        st.path, algo, space["out"], n_found, sizes, sil, dbi, inertia, params, note
    )
    st.set_attrs(
        **{
            space["out"]: {
                "algorithm": algo,
                "input": space["in"],
                "n_clusters": n_found,
                "params": params,
                "silhouette": sil,
                "davies_bouldin": dbi,
                "inertia": inertia,
                "noise_rows": noise,
            }
        }
    )
    logger.info("%s", result.lines()[0])
    return result


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
