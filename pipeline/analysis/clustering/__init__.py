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

Modules: :mod:`.spaces` (the algorithms and feature spaces), :mod:`.kmeans` (k-means, the block
kernels, :func:`load_kmeans`), :mod:`.sampled` (the sample-fitted methods, HDBSCAN's sizes) and
:mod:`.stage` (:func:`cluster`).
"""

from __future__ import annotations

from .kmeans import StreamingKMeans, load_kmeans
from .sampled import SampleClusterer, hdbscan_sizes
from .spaces import ALGORITHMS
from .spaces import DEPRECATED_FEATURES as DEPRECATED_FEATURES
from .spaces import SPACES as SPACES
from .spaces import _warned as _warned
from .spaces import feature_space as feature_space
from .stage import ClusterResult, cluster

__all__ = [
    "ALGORITHMS",
    "ClusterResult",
    "SampleClusterer",
    "StreamingKMeans",
    "cluster",
    "hdbscan_sizes",
    "load_kmeans",
]
