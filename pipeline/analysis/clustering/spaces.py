"""What the clustering stage speaks: its algorithms and its feature spaces (the vocabulary of
``reduce --features``), with the old names of the spaces as deprecated aliases."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from .. import _base

__all__ = ["ALGORITHMS", "DEPRECATED_FEATURES", "SAMPLED", "SPACES", "feature_space"]

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
