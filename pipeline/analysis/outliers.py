"""Outlier scores: the mean distance of each row to its k nearest neighbours in PCA space.

Exact k-NN over all rows is quadratic (10^16 distance evaluations at 10^8 rows), so the
neighbours are looked up in a *reference set*: a uniform sample of ``reference-size`` valid
rows (default ``analysis.sample-size``) indexed once with scikit-learn's
:class:`~sklearn.neighbors.NearestNeighbors` (a KD-tree in the ~20 PCA dimensions). Every row
of the store is then scored against it block by block, on the Dask workers when there are
any; a row that is itself in the reference set does not count as its own neighbour.

Trade-off: when the reference set holds every valid row the score is the exact k-NN distance.
With a sample of ``m`` of ``N`` rows, each distance is that of the k-th neighbour at a density
``m / N`` times lower: scores grow by about ``(N / m)^(1/d_eff)``, uniformly in a region, so
the *ranking* (what an outlier list needs) is kept where the reference set samples the
density well. Isolated objects remain far from every reference row, so they still rank
first; what is lost is the resolution among rows in small dense groups of fewer than about
``k N / m`` members, which look like outliers. Raise ``reference-size`` to refine that, at
``O(m log m)`` build and ``O(N k log m)`` query cost.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin

from .. import config
from ..errors import ConfigError, StoreError
from ..store import Store
from . import _base

__all__ = ["KNNOutlier", "load_outliers", "outliers"]

logger = logging.getLogger(__name__)


def _score_block(
    nn, block: np.ndarray, positions: np.ndarray, ref_ids: np.ndarray, k: int
) -> np.ndarray:
    """Mean distance to the k nearest reference rows; rows at ``positions`` are reference rows
    ``ref_ids`` and skip themselves. NaN for empty slots."""
    block = np.asarray(block)
    out = np.full(len(block), np.nan, np.float32)
    ok = _base.finite_rows(block)
    if not ok.any():
        return out
    rows = np.flatnonzero(ok)
    n_ref = nn.n_samples_fit_
    dist, ind = nn.kneighbors(block[rows].astype(np.float64), n_neighbors=min(k + 1, n_ref))
    own = np.full(len(rows), -1, np.int64)
    if len(positions):
        where = np.searchsorted(rows, positions)
        own[where] = ref_ids
    # Drop each reference row's own entry (or, for the others, the (k+1)-th neighbour).
    is_self = ind == own[:, None]
    drop = np.where(is_self.any(axis=1), np.argmax(is_self, axis=1), dist.shape[1] - 1)
    keep = np.ones_like(dist, bool)
    if dist.shape[1] > k:
        keep[np.arange(len(rows)), drop] = False
    kept = dist[keep].reshape(len(rows), -1)[:, :k]
    out[rows] = kept.mean(axis=1)
    return out


class KNNOutlier(OutlierMixin, BaseEstimator):
    """k-NN distance outlier score against a reference sample (see the module docstring).

    Parameters
    ----------
    k : int
        Neighbours averaged.
    reference_size : int
        Rows in the reference set (all usable rows when fewer).
    contamination : float
        Fraction of rows :meth:`predict` calls outliers.
    random_state : int

    Attributes
    ----------
    reference_index_ : ndarray
        Rows of ``X`` in the reference set.
    nn_ : sklearn.neighbors.NearestNeighbors
        The index over them.
    """

    def __init__(
        self,
        k: int = 10,
        *,
        reference_size: int = 20000,
        contamination: float = 0.01,
        random_state: int | None = 0,
    ):
        self.k = k
        self.reference_size = reference_size
        self.contamination = contamination
        self.random_state = random_state

    def fit(self, X, y=None, *, sample: tuple[np.ndarray, np.ndarray] | None = None) -> KNNOutlier:
        from .reduce import _as_dask

        X = _as_dask(X)
        seed = 0 if self.random_state is None else int(self.random_state)
        if sample is None:
            index = _base.sample_index(_base.usable_mask(X), self.reference_size, seed=seed)
            values = _base.take_rows(X, index)
        else:
            index, values = sample
        self._fit_reference(index, values)
        scores = self._scores(X).compute()
        finite = scores[np.isfinite(scores)]
        self.threshold_ = (
            float(np.quantile(finite, 1 - self.contamination)) if len(finite) else np.inf
        )
        return self

    def _fit_reference(self, index: np.ndarray, values: np.ndarray) -> KNNOutlier:
        from sklearn.neighbors import NearestNeighbors

        if len(values) <= self.k:
            raise ValueError(
                f"k={self.k} neighbours need more than {self.k} usable rows, got {len(values)}"
            )
        self.nn_ = NearestNeighbors().fit(np.asarray(values, np.float64))
        self.reference_index_ = np.asarray(index, np.int64)
        self.n_features_in_ = np.asarray(values).shape[1]
        return self

    def _scores(self, X):
        import dask.array as da
        from dask import delayed

        from .reduce import _as_dask

        X = _as_dask(X)
        nn = delayed(self.nn_, name=f"knn-reference-{uuid.uuid4().hex}", traverse=False)
        parts = []
        for b, (blk, (_, where, pos)) in enumerate(
            zip(
                X.to_delayed().ravel(),
                _base.split_by_block(self.reference_index_, X.chunks[0]),
                strict=True,
            )
        ):
            task = delayed(_score_block)(nn, blk, pos, where, int(self.k))
            parts.append(da.from_delayed(task, shape=(X.chunks[0][b],), dtype=np.float32))
        return da.concatenate(parts) if parts else da.zeros((0,), dtype=np.float32)

    def score_samples(self, X):
        """Minus the k-NN distance (scikit-learn's convention: lower is more abnormal).

        Rows of ``X`` are matched to the reference set by position, so pass the array the
        model was fitted on (new data: every row is treated as outside the reference set).
        """
        return -np.asarray(self._scores(X).compute())

    def score_rows(self, X) -> np.ndarray:
        """Outlier score (mean distance to the ``k`` nearest reference rows) of new rows,
        none of them in the reference set; NaN for rows holding NaN (empty slots).

        What incremental absorption calls, block by block, on a model :func:`load_outliers`
        restored: the same numbers :func:`outliers` wrote for rows outside its sample.
        """
        none = np.zeros(0, np.int64)
        return _score_block(self.nn_, np.asarray(X), none, none, int(self.k))

    def predict(self, X):
        s = -self.score_samples(X)
        return np.where(s > self.threshold_, -1, 1)


def outliers(
    store: str | os.PathLike | Store,
    *,
    n: int | None = None,
    k: int | None = None,
    reference_size: int | None = None,
    seed: int | None = None,
    block_rows: int | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
):
    """Score every valid row, write ``outlier_score(cutout)`` and return the top ``n``.

    Parameters
    ----------
    store : path or Store
    n : int, optional
        Rows listed (default ``analysis.outliers.n``).
    k : int, optional
        Neighbours averaged (default ``analysis.outliers.k``).
    reference_size : int, optional
        Reference sample (default ``analysis.outliers.reference-size``, else ``sample-size``).
    seed, block_rows, client, scheduler, workers
        Sampling seed, rows per task, where the tasks run.

    Returns
    -------
    astropy.table.Table
        ``rank, index, image, x, y, ra, dec, score``, most outlying first.
    """
    from dask import delayed

    st = _base.open_store(store, mode="r+")
    _base.require(st, "pca", "reduce")
    n = config.get_int("analysis.outliers.n", override=n, minimum=1)
    k = config.get_int("analysis.outliers.k", override=k, minimum=1)
    ref = (
        reference_size
        if reference_size is not None
        else config.get("analysis.outliers.reference-size")
    )
    ref = config.get_int("analysis.sample-size", override=ref, minimum=2)
    seed = config.get_int("analysis.seed", override=seed, minimum=0)
    n_valid = _base.valid_count(st, stage="outliers")
    if n_valid <= k:
        raise ConfigError(
            f"{st.path}: k = {k} neighbours need more than {k} valid rows, the store has {n_valid}"
        )
    if min(ref, n_valid) <= k:
        raise ConfigError(f"reference size {ref} must exceed k = {k}")
    block = _base.block_rows(st, block_rows)
    from .index import graph_for

    # The store's k-NN graph (`elodin neighbors`), when current, gives every row's true k-NN
    # distance among all rows instead of the reference sample's.
    graph = graph_for(st, k)
    with _base.runner(client, scheduler=scheduler, workers=workers) as run, run.activate():
        if graph is not None:
            scores = _base.rows(st, "neighbor_distance", block=block)[:, :k].mean(axis=1)
            n_ref = n_valid
        else:
            X = _base.rows(st, "pca", block=block)
            index = _base.sample_valid(st, ref, seed=seed, block=block)
            model = KNNOutlier(k, reference_size=ref, random_state=seed)._fit_reference(
                index, _base.take_rows(X, index)
            )
            scores = model._scores(X)
            n_ref = len(index)
        st.create_row_array(
            "outlier_score",
            dtype="float32",
            fill=np.nan,
            attrs={"k": k, "reference_size": n_ref},
        )
        offsets = np.cumsum((0, *scores.chunks[0]))

        def block_top(values, start):
            top = _base.TopN(n, largest=True)
            top.add(values, np.arange(start, start + len(values)))
            return top.index, top.scores

        tops = [
            delayed(block_top)(b, int(offsets[i]))
            for i, b in enumerate(scores.to_delayed().ravel())
        ]
        _, found = run.compute(_base.write_rows(st, "outlier_score", scores), tops)
    top = _base.TopN(n, largest=True)
    for idx, sc in found:
        top.add(sc, idx)
    st.set_attrs(
        outlier_score={
            "method": "knn-mean-distance" if graph is None else "knn-graph",
            "k": k,
            "reference_size": n_ref,
            "exact": bool(n_ref == n_valid) and (graph is None or graph.get("kind") == "flat"),
            "seed": seed,
            # The rows the reference was drawn from: load_outliers draws it again from them.
            "n_rows": st.n_rows,
        }
    )
    table = _base.row_table(st, top.index, {"score": top.scores})
    table.add_column(np.arange(1, len(table) + 1), name="rank", index=0)
    table.meta.update({"k": k, "reference_size": n_ref})
    return table


def load_outliers(
    store: Store, *, upto: int | None = None, block_rows: int | None = None
) -> KNNOutlier:
    """The outlier model :func:`outliers` fitted, restored from what it recorded in the store.

    The reference set is drawn again with the recorded ``reference_size`` and ``seed`` from
    the valid rows the stage saw (the recorded ``n_rows``; ``upto`` for stores written before
    it was recorded), and indexed with the recorded ``k``: rows appended since are scored
    against the same reference and the same ``k`` (:meth:`KNNOutlier.score_rows`), whatever
    the configuration says now.

    Raises
    ------
    StoreError
        When the store has no outlier scores yet, or no fitted rows are left to score against.
    """
    _base.require(store, "outlier_score", "outliers")
    info = dict(store.attrs.get("outlier_score") or store.array("outlier_score").attrs)
    if "k" not in info or "reference_size" not in info:
        raise StoreError(
            f"{store.path}: the outlier scores record no k; run `elodin outliers {store.path}` again"
        )
    k = int(info["k"])
    ref = int(info["reference_size"])
    seed = int(info.get("seed", config.get_int("analysis.seed", minimum=0)))
    stop = int(info.get("n_rows", upto if upto is not None else store.n_rows))
    block = _base.block_rows(store, block_rows)
    index = _base.sample_valid(store, ref, seed=seed, block=block, stop=stop)
    if len(index) <= k:
        raise StoreError(
            f"{store.path}: the outlier reference has {len(index)} fitted row(s), k = {k} needs more"
        )
    values = np.asarray(store.array("pca").oindex[index], np.float64)
    model = KNNOutlier(k, reference_size=ref, random_state=seed)._fit_reference(index, values)
    model.method_ = str(info.get("method", "knn-mean-distance"))
    return model
