"""The clustering stage: :func:`cluster` groups a store's rows (k-means over all of them, the
quadratic methods on a sample), writes the labels, centres and sizes, and reports the quality
(silhouette and Davies-Bouldin of a sample, noise left out) as a :class:`ClusterResult`."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from ... import config
from ...errors import ConfigError, StoreError
from ...store import Store
from .. import _base
from .kmeans import StreamingKMeans, _assign_block, _bincount_labels, _nearest
from .sampled import SampleClusterer
from .spaces import AFFINITY_DEFAULT_SAMPLE, ALGORITHMS, HDBSCAN_SELECTIONS, SPACES, feature_space

__all__ = ["ClusterResult", "cluster"]

logger = logging.getLogger(__name__)


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
