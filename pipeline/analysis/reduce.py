"""Incremental PCA of the fingerprints: exact, one streaming pass, parallel, updatable.

Algorithm
---------
PCA needs only the mean and the covariance of the rows. Each block task (on the Dask workers
when there are any) reads one block of rows, drops empty slots, and returns its row count, its
column sums and its cross-product matrix ``X^T X`` (D x D: 2304 x 2304 for the default model),
taken about a fixed shift vector so that the later subtraction of the mean loses no precision;
the sums are added in a tree and the client solves one symmetric eigenproblem
(``numpy.linalg.eigh``). This is:

- *exact*: the same components as :class:`sklearn.decomposition.PCA` on all rows (up to the
  float32 arithmetic inside a block), unlike :class:`sklearn.decomposition.IncrementalPCA` or
  dask-ml's, which approximate through a sequence of truncated SVDs that depend on the block
  order;
- *one pass* over the store, every block independent, so it is parallel across workers and
  its memory is one block plus a ``D x D`` float64 accumulator per task, not rows;
- *updatable*: the sums of finished store segments are kept in the store
  (``pca_accum_sum``, ``pca_accum_cross``, ``pca_accum_shift``), so after new images are
  fingerprinted ``elodin reduce`` reads only the new segments and adds their sums; the result
  equals a fit on all rows;
- *standardised or not*: the covariance's diagonal gives each feature's spread, so the PCA of
  the standardised features (the correlation matrix, ``scale=True``; ``analysis.reduce.scale``)
  comes from the same sums, as exact and as updatable. :func:`scales_features` says when.

The cost is ``O(N D^2)`` flops for the cross products (``D = 1280``: about 3.3 TFLOP per 10^6
rows, float32 BLAS; 10.6 at the default model's 2304) and ``O(D^3)`` once on the client, cheap
next to the pass. The ``features="pixels"`` baseline (PCA of the stretched cutout pixels,
resampled to a small side, as sdss_clustering did) re-reads each valid row's window from its
source image and goes through the same estimator.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.extmath import svd_flip

from .. import config
from ..errors import ConfigError, StoreError
from ..store import Store
from . import _base
from .pixels import PixelFeatures

__all__ = [
    "ExactPCA",
    "PCAResult",
    "PixelFeatures",
    "ReduceSettings",
    "feature_scale",
    "load_pca",
    "reduce",
    "reduce_settings",
    "scales_features",
]

logger = logging.getLogger(__name__)

FEATURES = ("fingerprint", "pixels")
# Variables made stale by a new `pca` / `pca_pixels` (they were computed in the old basis).
DERIVED = {
    "fingerprint": ("cluster", "cluster_centers", "cluster_size", "embedding", "outlier_score"),
    "pixels": ("cluster_pixels", "cluster_pixels_centers", "cluster_pixels_size"),
}
# Per feature space: output variable, accumulator prefix and dimension names.
SPACES: Mapping[str, Mapping[str, str]] = {
    "fingerprint": {"out": "pca", "feature": "feature", "component": "component"},
    "pixels": {"out": "pca_pixels", "feature": "pixel", "component": "pixel_component"},
}


# -------------------------------------------------------------------------------- estimator
def _moments(block: np.ndarray, shift: np.ndarray, sub_rows: int):
    """Row count, column sums and ``X^T X`` of the usable rows of ``block`` about ``shift``."""
    block = np.asarray(block)
    block = block[_base.finite_rows(block)]
    d = block.shape[1]
    s1 = np.zeros(d, np.float64)
    s2 = np.zeros((d, d), np.float64)
    shift32 = shift.astype(np.float32)
    # Sub-blocks bound the float32 temporaries; the float64 sums take the rest of the range.
    for i in range(0, len(block), sub_rows):
        x = block[i : i + sub_rows].astype(np.float32) - shift32
        s1 += x.sum(axis=0, dtype=np.float64)
        s2 += x.T @ x
    return np.int64(len(block)), s1, s2


def feature_scale(variances: np.ndarray, means: np.ndarray, n: int) -> np.ndarray:
    """What a standardised PCA divides each feature by: its standard deviation, or 1 where the
    feature does not vary. "Does not vary" is scikit-learn's ``StandardScaler`` rule: a variance
    within the rounding of summing ``n`` values of its mean and spread (float64 epsilon)."""
    var = np.clip(np.asarray(variances, np.float64), 0.0, None)
    mean = np.asarray(means, np.float64)
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return np.where(constant, 1.0, np.sqrt(var))


def _as_dask(X, block_rows: int = 65536):
    import dask.array as da

    if isinstance(X, da.Array):
        return X
    X = np.asarray(X)
    return da.from_array(X, chunks=(min(block_rows, max(1, len(X))), *X.shape[1:]))


class ExactPCA(TransformerMixin, BaseEstimator):
    """Exact PCA from streamed first and second moments (see the module docstring).

    Parameters
    ----------
    n_components : int, optional
        Components kept (default 20 when ``variance`` is not given either).
    variance : float, optional
        Keep the fewest components whose explained variance ratios sum past this fraction
        (``0 < variance <= 1``), as ``sklearn.decomposition.PCA(n_components=0.99)`` does.
    scale : bool
        Standardise each feature (divide by its standard deviation, ``ddof=1``) before the
        PCA: the components of the correlation matrix instead of the covariance, as R's
        ``prcomp(scale. = TRUE)``. Solved from the same accumulators, so it stays exact and
        updatable. Features that do not vary are left unscaled.
    sub_rows : int
        Rows per float32 cross product inside a block (bounds its temporaries).

    Attributes
    ----------
    n_samples_seen_, mean_, components_, explained_variance_, explained_variance_ratio_,
    singular_values_, n_components_, n_features_in_
        As in :class:`sklearn.decomposition.PCA` (of the standardised features when ``scale``).
    scale_
        What each feature is divided by after the mean is taken away (ones without ``scale``).
    shift_, sum_, cross_
        The accumulators: rows are summed as ``x - shift_``; ``sum_`` is their sum and
        ``cross_`` their ``X^T X``. Save them to update the fit later with new rows.

    Notes
    -----
    ``fit`` and ``partial_fit`` take a numpy or dask array; rows holding a NaN are skipped (the
    store's empty slots). Dask arrays are computed with the current dask scheduler, on the
    workers of a distributed client when one is active.
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        variance: float | None = None,
        scale: bool = False,
        sub_rows: int = 8192,
    ):
        self.n_components = n_components
        self.variance = variance
        self.scale = scale
        self.sub_rows = sub_rows

    # -- accumulation ---------------------------------------------------------------------
    def _reset(self) -> None:
        fitted = ("shift_", "sum_", "cross_", "n_samples_seen_", "components_", "mean_", "scale_")
        for name in fitted:
            self.__dict__.pop(name, None)

    def accumulate(self, X) -> ExactPCA:
        """Add the moments of the usable rows of ``X`` without solving (see :meth:`finalize`)."""
        import dask
        from dask import delayed

        X = _as_dask(X)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D array, got shape {X.shape}")
        if not hasattr(self, "shift_"):
            self.shift_ = self._first_rows_mean(X)
            d = X.shape[1]
            self.sum_ = np.zeros(d)
            self.cross_ = np.zeros((d, d))
            self.n_samples_seen_ = 0
        if X.shape[1] != len(self.shift_):
            raise ValueError(f"X has {X.shape[1]} features, the fit has {len(self.shift_)}")
        if X.shape[0] == 0:
            return self
        parts = [delayed(_moments)(b, self.shift_, self.sub_rows) for b in X.to_delayed().ravel()]
        (n, s1, s2) = dask.compute(_base.tree_sum(parts))[0]
        self.n_samples_seen_ += int(n)
        self.sum_ = self.sum_ + s1
        self.cross_ = self.cross_ + s2
        self.n_features_in_ = X.shape[1]
        return self

    @staticmethod
    def _first_rows_mean(X) -> np.ndarray:
        # Any vector inside the data's range removes the cancellation of E[xx] - E[x]E[x];
        # the mean of the first usable rows is one, and it costs one block at most.
        for b in range(X.numblocks[0]):
            block = np.asarray(X.blocks[b].compute())
            block = block[_base.finite_rows(block)]
            if len(block):
                return block[:4096].mean(axis=0, dtype=np.float64)
        return np.zeros(X.shape[1])

    def set_accumulators(
        self, *, n: int, shift: np.ndarray, sums: np.ndarray, cross: np.ndarray
    ) -> ExactPCA:
        """Start from saved accumulators (e.g. read back from a store)."""
        self.shift_ = np.asarray(shift, np.float64)
        self.sum_ = np.asarray(sums, np.float64).copy()
        self.cross_ = np.asarray(cross, np.float64).copy()
        self.n_samples_seen_ = int(n)
        self.n_features_in_ = len(self.shift_)
        return self

    def accumulators(self) -> dict[str, Any]:
        return {
            "n": self.n_samples_seen_,
            "shift": self.shift_,
            "sums": self.sum_.copy(),
            "cross": self.cross_.copy(),
        }

    # -- solving ---------------------------------------------------------------------------
    def finalize(self) -> ExactPCA:
        """Solve the eigenproblem of the accumulated covariance."""
        n = getattr(self, "n_samples_seen_", 0)
        if n < 2:
            raise ValueError(f"PCA needs at least 2 usable rows, got {n}")
        m = self.sum_ / n
        cov = (self.cross_ - n * np.outer(m, m)) / (n - 1)
        cov = (cov + cov.T) / 2
        if self.scale:
            scale = feature_scale(np.diag(cov), self.shift_ + m, n)
            cov = cov / np.outer(scale, scale)
        else:
            scale = np.ones(len(cov))
        w, v = np.linalg.eigh(cov)
        w = np.clip(w[::-1], 0.0, None)
        v = v[:, ::-1]
        total = float(np.trace(cov))
        ratio = w / total if total > 0 else np.zeros_like(w)
        k = self._n_kept(ratio, n, len(w))
        comps = v[:, :k].T.copy()
        # sklearn's sign convention (svd_flip on Vt): the largest |loading| of each component > 0.
        _, comps = svd_flip(None, comps, u_based_decision=False)
        self.mean_ = self.shift_ + m
        self.scale_ = scale
        self.components_ = comps
        self.explained_variance_ = w[:k].copy()
        self.explained_variance_ratio_ = ratio[:k].copy()
        self.singular_values_ = np.sqrt(w[:k] * (n - 1))
        self.n_components_ = k
        self.noise_variance_ = float(w[k : min(n, len(w))].mean()) if k < min(n, len(w)) else 0.0
        return self

    def _n_kept(self, ratio: np.ndarray, n: int, d: int) -> int:
        limit = min(n, d)
        if self.variance is not None:
            if self.n_components is not None:
                raise ValueError("give n_components or variance, not both")
            v = float(self.variance)
            if not 0 < v <= 1:
                raise ValueError(f"variance must be in (0, 1], got {v}")
            cum = np.cumsum(ratio)
            return int(min(np.searchsorted(cum, v, side="right") + 1, limit))
        k = 20 if self.n_components is None else int(self.n_components)
        if not 1 <= k <= limit:
            raise ValueError(
                f"n_components={k} must be between 1 and min(n_samples, n_features) = {limit}"
            )
        return k

    # -- sklearn API ---------------------------------------------------------------------------
    def fit(self, X, y=None) -> ExactPCA:
        self._reset()
        return self.accumulate(X).finalize()

    def partial_fit(self, X, y=None) -> ExactPCA:
        return self.accumulate(X).finalize()

    def transform(self, X):
        """Project rows; NaN rows stay NaN. Lazy for dask input."""
        import dask.array as da

        mean = self.mean_.astype(np.float32)
        # Dividing a feature by its scale is dividing its row of the projection.
        scale = getattr(self, "scale_", None)
        comps_t = self.components_.T / (1.0 if scale is None else np.asarray(scale)[:, None])
        comps_t = comps_t.astype(np.float32)
        if isinstance(X, da.Array):
            return X.map_blocks(
                _project, mean, comps_t, chunks=(X.chunks[0], (comps_t.shape[1],)), dtype=np.float32
            )
        return _project(np.asarray(X), mean, comps_t)


def _project(block: np.ndarray, mean: np.ndarray, comps_t: np.ndarray) -> np.ndarray:
    return ((np.asarray(block, dtype=np.float32) - mean) @ comps_t).astype(np.float32)


# ------------------------------------------------------------------------------ store level
@dataclasses.dataclass(frozen=True)
class ReduceSettings:
    """The ``analysis.reduce`` settings with the flags applied, checked.

    Attributes
    ----------
    features : {"fingerprint", "pixels"}
    components : int or None
        None when ``variance`` decides.
    variance : float or None
    explicit : bool
        ``components`` was given, not configured (more than the store has is then an error).
    scale : bool or "auto"
        Resolved against a store's model by :func:`scales_features`.
    pixel_side : int or None
        The side the pixel baseline resamples to (``features="pixels"`` only).
    """

    features: str
    components: int | None
    variance: float | None
    explicit: bool
    scale: bool | str
    pixel_side: int | None = None


def reduce_settings(
    *,
    components: int | None = None,
    variance: float | None = None,
    features: str | None = None,
    scale: bool | str | None = None,
    pixel_side: int | None = None,
) -> ReduceSettings:
    """The settings :func:`reduce` runs with; a bad one is a one-line :class:`ConfigError`
    (``elodin run`` checks them before it writes anything)."""
    kind = _base.choice(
        config.get("analysis.reduce.features", override=features), "PCA features", FEATURES
    )
    if components is not None and variance is not None:
        raise ConfigError("give --components or --variance, not both")
    explicit = components is not None
    if components is None and variance is None:
        variance = config.get("analysis.reduce.variance")
        if variance is None:
            components = config.get_int("analysis.reduce.components", minimum=1)
    if variance is not None:
        variance = config.get_float("analysis.reduce.variance", override=variance)
        if not 0 < variance <= 1:
            raise ConfigError(f"--variance must be in (0, 1], got {variance}")
        components = None
    elif int(components) < 1:
        raise ConfigError(f"--components must be >= 1, got {components}")
    side = (
        config.get_int("analysis.reduce.pixel-side", override=pixel_side, minimum=4)
        if kind == "pixels"
        else None
    )
    setting = _scale_setting(config.get("analysis.reduce.scale", override=scale))
    return ReduceSettings(kind, components, variance, explicit, setting, side)


def _scale_setting(value: Any) -> bool | str:
    """``analysis.reduce.scale`` as True, False or ``"auto"`` (null: auto; any case)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(text, "auto")
    raise ConfigError(
        f"config elodin.analysis.reduce.scale: expected auto, true or false, got {value!r}"
    )


def scales_features(setting: Any, *, features: str, model: str | None) -> bool:
    """Whether :func:`reduce` standardises the features before its PCA.

    ``setting`` is ``analysis.reduce.scale``: true, false or ``auto``. ``auto`` standardises
    the fingerprints of a built-in model whose features are pooled from several depths of the
    network (:attr:`pipeline.models.ModelCard.pooled_stages`: ``:multi``, ``:stages``, the
    default model among them): their spreads differ tenfold from one depth to another
    (variances a hundredfold), so a plain PCA draws little on the early stages. Nothing else:
    the head's features share one scale (zoomed or not), and standardising the pixel baseline
    lifts the sky noise of its corners to the centre's weight (both score the same or lower
    standardised on ``benchmarks/bench_quality.py``; figures in docs/fingerprints.md).
    """
    setting = _scale_setting(setting)
    if setting != "auto":
        return setting
    if features != "fingerprint" or not model:
        return False
    from ..errors import ModelError
    from ..models import resolve
    from ..models.recorded import parse_record

    try:
        return resolve(parse_record(model)[0]).pooled_stages
    except ModelError:  # a user model this machine has no card of (user cards never pool stages)
        return False


@dataclasses.dataclass
class PCAResult:
    """What :func:`reduce` did."""

    store: str
    features: str
    variable: str
    n_rows: int
    n_components: int
    explained_variance_ratio: np.ndarray
    rows_read: int
    segments_reused: int
    scaled: bool = False

    def __str__(self) -> str:
        total = float(np.sum(self.explained_variance_ratio))
        reuse = (
            f"; {self.segments_reused} segment(s) reused from the saved sums"
            if self.segments_reused
            else ""
        )
        scaled = " (standardised)" if self.scaled else ""
        return (
            f"{self.store}: PCA of {self.features}{scaled} on {self.n_rows} rows -> "
            f"{self.variable}: "
            f"{self.n_components} components explain {100 * total:.2f} % of the variance "
            f"(first: {', '.join(f'{100 * r:.1f}' for r in self.explained_variance_ratio[:5])} %){reuse}"
        )


def _complete_segments(store: Store) -> set[int]:
    done = store.done_units()
    return {
        i
        for i, s in enumerate(store.segments)
        if all(u in done for u in range(s.unit_start, s.unit_stop))
    }


def _saved(store: Store, prefix: str, signature: Mapping) -> tuple[dict | None, list[int]]:
    names = _base.names(store)
    keys = [f"{prefix}_accum_{k}" for k in ("sum", "cross", "shift")]
    if not all(k in names for k in keys):
        return None, []
    group = Store.zarr(store.path)
    meta = group[keys[0]].attrs.asdict()
    if meta.get("signature") != dict(signature):
        return None, []
    acc = {
        "n": int(meta["n"]),
        "sums": group[keys[0]][...],
        "cross": group[keys[1]][...],
        "shift": group[keys[2]][...],
    }
    return acc, [int(s) for s in meta.get("segments", [])]


def _save(
    store: Store,
    prefix: str,
    dims: tuple[str, str],
    acc: Mapping,
    segments: list[int],
    signature: Mapping,
) -> None:
    feat, feat_t = dims
    store.write_array(f"{prefix}_accum_shift", acc["shift"], dims=(feat,))
    store.write_array(f"{prefix}_accum_cross", acc["cross"], dims=(feat, feat_t))
    store.write_array(
        f"{prefix}_accum_sum",
        acc["sums"],
        dims=(feat,),
        attrs={"n": int(acc["n"]), "segments": sorted(segments), "signature": dict(signature)},
    )


def reduce(
    store: str | os.PathLike | Store,
    *,
    components: int | None = None,
    variance: float | None = None,
    features: str | None = None,
    pixel_side: int | None = None,
    block_rows: int | None = None,
    refit: bool = False,
    scale: bool | str | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> PCAResult:
    """PCA of the store's fingerprints (or cutout pixels), written back into the store.

    Parameters
    ----------
    store : path or Store
        The fingerprint store.
    components, variance : optional
        Components kept, or the explained-variance fraction to reach (not both); defaults from
        ``elodin.analysis.reduce``.
    features : {"fingerprint", "pixels"}, optional
        ``fingerprint`` (CNN features, writes ``pca``) or ``pixels`` (the baseline: stretched
        cutout pixels resampled to ``pixel_side``, writes ``pca_pixels``).
    pixel_side : int, optional
        Side the pixel baseline resamples each cutout to (default ``analysis.reduce.pixel-side``).
    block_rows : int, optional
        Rows per task (whole store chunks).
    refit : bool
        Ignore the saved sums and read every row again.
    scale : bool or "auto", optional
        Standardise each feature before the PCA (default ``analysis.reduce.scale``; ``auto``:
        see :func:`scales_features`). The saved sums serve either way.
    client, scheduler, workers
        Where the block tasks run (see :func:`pipeline.analysis._base.runner`).

    Returns
    -------
    PCAResult

    Notes
    -----
    Writes ``pca(cutout, component)`` float32 (NaN in empty slots), ``pca_mean(feature)``,
    ``pca_scale(feature)`` (ones when not standardised), ``pca_components(component, feature)``,
    ``pca_explained_variance(component)``, ``pca_explained_variance_ratio(component)`` and the
    accumulators (``pca_accum_*``) of the store segments that were complete; the pixel baseline
    writes the same under ``pca_pixels`` with dims ``pixel`` and ``pixel_component``. A new
    ``pca`` removes the variables computed from the old one (``cluster``, ``embedding``,
    ``outlier_score`` ...).
    """
    st = _base.open_store(store, mode="r+")
    settings = reduce_settings(
        components=components,
        variance=variance,
        features=features,
        scale=scale,
        pixel_side=pixel_side,
    )
    kind, components, variance = settings.features, settings.components, settings.variance
    explicit = settings.explicit
    standardise = scales_features(settings.scale, features=kind, model=st.attrs.get("model"))
    n_valid = _base.valid_count(st, stage="reduce")
    block = _base.block_rows(st, block_rows)
    space = SPACES[kind]
    prefix = space["out"]

    with _base.runner(client, scheduler=scheduler, workers=workers) as run:
        if kind == "fingerprint":
            X = _base.rows(st, "fingerprint", block=block)
            signature = {"features": "fingerprint", "model_sha256": st.attrs.get("model_sha256")}
        else:
            side = settings.pixel_side
            reader = PixelFeatures.from_store(st, side=side)
            X = reader.array(block=block, n_rows=st.n_rows)
            signature = {
                "features": "pixels",
                "side": side,
                "channels": reader.channels,
                "preprocess": st.attrs.get("preprocess"),
            }
        signature = _jsonable(signature)
        pca = ExactPCA(
            None if variance is not None else int(components), variance=variance, scale=standardise
        )
        saved, covered = (None, []) if refit else _saved(st, prefix, signature)
        if saved is not None:
            pca.set_accumulators(**saved)
        complete = _complete_segments(st)
        segs = st.segments
        new_complete = [i for i in sorted(complete) if i not in covered]
        partial = [i for i in range(len(segs)) if i not in complete]
        d = X.shape[1]
        if n_valid < 2:
            raise StoreError(f"{st.path}: PCA needs at least 2 valid rows, the store has {n_valid}")
        if components is not None and int(components) > min(n_valid, d) and not explicit:
            # The configured default on a small store (the demo's blobs): keep what exists.
            logger.warning(
                "%s: %d components configured, %d possible; keeping %d",
                st.path,
                components,
                min(n_valid, d),
                min(n_valid, d),
            )
            components = min(n_valid, d)
            pca.n_components = components
        if components is not None and int(components) > min(n_valid, d):
            raise ConfigError(
                f"{st.path}: --components {components} is more than min(valid rows, features) = {min(n_valid, d)}"
            )
        rows_read = 0
        snapshot = None
        with run.activate():
            for i in new_complete:
                pca.accumulate(X[segs[i].row_start : segs[i].row_stop])
                rows_read += segs[i].row_stop - segs[i].row_start
            if hasattr(pca, "shift_") and (new_complete or saved is None):
                snapshot = (pca.accumulators(), [*covered, *new_complete])
            for i in partial:
                pca.accumulate(X[segs[i].row_start : segs[i].row_stop])
                rows_read += segs[i].row_stop - segs[i].row_start
            if not hasattr(pca, "shift_"):
                raise StoreError(f"{st.path}: the store has no segments to analyse")
            try:
                pca.finalize()
            except ValueError as e:
                raise ConfigError(f"{st.path}: {e} ({n_valid} valid rows)") from None
            if snapshot is not None:
                _save(
                    st,
                    prefix,
                    (space["feature"], space["feature"] + "_t"),
                    snapshot[0],
                    snapshot[1],
                    signature,
                )
            k = pca.n_components_
            comp_dim, feat_dim = space["component"], space["feature"]
            gone = _base.drop_variables(st, DERIVED[kind])
            if gone:
                logger.warning(
                    "%s: removed %s (computed from the previous %s)",
                    st.path,
                    ", ".join(gone),
                    prefix,
                )
            st.create_row_array(prefix, tail=(k,), dims=(comp_dim,), dtype="float32", fill=np.nan)
            st.write_array(f"{prefix}_mean", pca.mean_, dims=(feat_dim,))
            st.write_array(f"{prefix}_scale", pca.scale_, dims=(feat_dim,))
            st.write_array(f"{prefix}_components", pca.components_, dims=(comp_dim, feat_dim))
            st.write_array(
                f"{prefix}_explained_variance", pca.explained_variance_, dims=(comp_dim,)
            )
            st.write_array(
                f"{prefix}_explained_variance_ratio",
                pca.explained_variance_ratio_,
                dims=(comp_dim,),
            )
            run.compute(_base.write_rows(st, prefix, pca.transform(X)))
    info = {
        "features": kind,
        "n_components": int(k),
        "variance": variance,
        "scale": bool(standardise),
        "n_rows": int(pca.n_samples_seen_),
        "explained_variance_ratio_sum": float(np.sum(pca.explained_variance_ratio_)),
        **(
            {"pixel_side": signature["side"], "channels": signature["channels"]}
            if kind == "pixels"
            else {}
        ),
    }
    st.set_attrs(**{prefix: info})
    result = PCAResult(
        st.path,
        kind,
        prefix,
        int(pca.n_samples_seen_),
        int(k),
        pca.explained_variance_ratio_,
        rows_read,
        len(covered),
        bool(standardise),
    )
    logger.info("%s", result)
    return result


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def load_pca(store: Store, *, features: str = "fingerprint") -> ExactPCA:
    """The fitted PCA saved in a store (mean, scale and components), ready to ``transform`` new
    rows."""

    prefix = SPACES[features]["out"]
    _base.require(
        store,
        f"{prefix}_components",
        "reduce" if features == "fingerprint" else "reduce --features pixels",
    )
    group = Store.zarr(store.path)
    pca = ExactPCA(
        n_components=int(group[f"{prefix}_components"].shape[0]),
        scale=bool((store.attrs.get(prefix) or {}).get("scale", False)),
    )
    pca.mean_ = group[f"{prefix}_mean"][...]
    # Stores reduced before 2026-12-06 have no scale: they were not standardised.
    has_scale = f"{prefix}_scale" in group
    pca.scale_ = group[f"{prefix}_scale"][...] if has_scale else np.ones(len(pca.mean_))
    pca.components_ = group[f"{prefix}_components"][...]
    pca.explained_variance_ = group[f"{prefix}_explained_variance"][...]
    pca.explained_variance_ratio_ = group[f"{prefix}_explained_variance_ratio"][...]
    pca.n_components_ = pca.components_.shape[0]
    pca.n_features_in_ = pca.components_.shape[1]
    return pca
