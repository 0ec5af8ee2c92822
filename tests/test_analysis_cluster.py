"""Clustering in PCA space over real stores: k-means against scikit-learn, sample-fitted
methods with nearest-centroid assignment, errors that leave the store unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_store import build_store, store_digest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from pipeline import analysis
from pipeline.analysis import SampleClusterer, StreamingKMeans
from pipeline.errors import ConfigError, StoreError
from pipeline.store import Store


def blobs(rng, n: int, k: int = 5, d: int = 12, spread: float = 1.0):
    centers = rng.normal(size=(k, d)) * 4
    labels = rng.integers(0, k, n)
    return (centers[labels] + rng.normal(size=(n, d)) * spread).astype(np.float32), labels


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    # Shared by the tests of this module: each one checks only what its own call wrote.
    X, labels = blobs(np.random.default_rng(5), 1500)
    st, rows = build_store(tmp_path_factory.mktemp("reduced") / "s.zarr", X, chunk_rows=64, tile=50)
    analysis.reduce(st.path, components=6, block_rows=256)
    return st, rows, labels


def test_streaming_kmeans_inertia_within_2_percent_of_sklearn(rng):
    # Overlapping blobs so the optimum is not trivial; the start sees only a fifth of the rows.
    X, _ = blobs(rng, 3000, k=8, d=6, spread=2.5)
    with_gaps = np.insert(X, [0, 1000, 1000], np.nan, axis=0)
    ours = StreamingKMeans(8, sample_size=600, random_state=1).fit(with_gaps)
    ref = KMeans(8, n_init=20, random_state=0).fit(X)
    assert abs(ours.inertia_ - ref.inertia_) / ref.inertia_ < 0.02
    labels = ours.predict(with_gaps)
    assert labels[0] == -1 and (labels[1:1000] >= 0).all()
    assert ours.counts_.sum() == len(X)


def test_kmeans_store_labels_and_model(reduced):
    st, rows, truth = reduced
    result = analysis.cluster(
        st.path, algorithm="kmeans", n_clusters=5, sample_size=400, block_rows=256
    )
    ds = Store.open(st.path).dataset()
    labels = ds.cluster.values
    assert labels.dtype == np.int32
    assert (labels[~ds.valid.values] == -1).all() and (labels[rows] >= 0).all()
    assert adjusted_rand_score(truth, labels[rows]) > 0.95
    assert sum(result.sizes.values()) == len(rows)
    assert ds.cluster_centers.shape == (5, 6) and ds.cluster_centers.dims == (
        "cluster_id",
        "component",
    )
    assert result.silhouette > 0.5 and result.davies_bouldin < 1.0
    assert Store.open(st.path).attrs["cluster"]["algorithm"] == "kmeans"
    # The written labels are the nearest centres of the written model.
    pca = ds.pca.values[rows]
    d = ((pca[:, None, :] - ds.cluster_centers.values[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels[rows], d.argmin(1))


@pytest.mark.parametrize("algorithm", ["agglomerative", "affinity", "hdbscan"])
def test_sample_fitted_methods_assign_every_row(reduced, algorithm):
    st, rows, truth = reduced
    result = analysis.cluster(
        st.path, algorithm=algorithm, n_clusters=5, sample_size=300, block_rows=256
    )
    ds = Store.open(st.path).dataset()
    labels = ds.cluster.values
    assert (labels[~ds.valid.values] == -1).all()
    assert adjusted_rand_score(truth, labels[rows]) > 0.9
    assert result.n_clusters == ds.sizes["cluster_id"]
    assert result.params["sample_size"] == 300


def test_sampled_rows_keep_their_fitted_labels_and_noise(rng):
    X, _ = blobs(rng, 600, k=3, d=4, spread=0.5)
    X[::50] = rng.uniform(-30, 30, size=X[::50].shape)  # scattered points HDBSCAN calls noise
    model = SampleClusterer("hdbscan", sample_size=300, min_cluster_size=15).fit(X)
    assert (model.sample_labels_ == -1).any()
    # Every non-sampled row goes to a group; only sampled rows can be noise.
    labels = model.predict(X)
    assert (labels >= 0).all()
    np.testing.assert_allclose(
        model.cluster_centers_,
        [
            X[model.sample_index_][model.sample_labels_ == c].mean(0)
            for c in range(model.n_clusters_)
        ],
        rtol=1e-5,
    )


def test_store_keeps_hdbscan_noise_of_sampled_rows_only(tmp_path, rng):
    X, _ = blobs(rng, 800, k=3, d=4, spread=0.5)
    X[::40] = rng.uniform(-30, 30, size=X[::40].shape)
    st, rows = build_store(tmp_path / "s.zarr", X, chunk_rows=32)
    analysis.reduce(st.path, components=4)
    result = analysis.cluster(st.path, algorithm="hdbscan", sample_size=400, block_rows=64)
    labels = Store.open(st.path).dataset().cluster.values[rows]
    assert result.sizes[-1] > 0
    assert (labels == -1).sum() == result.sizes[-1]
    assert sum(result.sizes.values()) == len(rows)


def test_cluster_before_reduce(tmp_path, rng):
    st, _ = build_store(tmp_path / "s.zarr", blobs(rng, 50)[0])
    before = store_digest(st.path)
    with pytest.raises(StoreError, match=r"run `elodin reduce .*s\.zarr` first"):
        analysis.cluster(st.path)
    assert store_digest(st.path) == before


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (
            {"n_clusters": 5000},
            StoreError,
            "5000 clusters asked for, but the store has only 1500 valid rows",
        ),
        ({"n_clusters": 900, "sample_size": 500}, ConfigError, "raise --sample-size"),
        ({"algorithm": "dbscan"}, ConfigError, "unknown clustering algorithm 'dbscan'"),
        # The feature space is named as reduce names it (fingerprint | pixels).
        ({"features": "pixles"}, ConfigError, "unknown clustering input"),
        ({"features": "pixels"}, StoreError, "run `elodin reduce --features pixels"),
    ],
)
def test_bad_input_one_line_and_store_unchanged(reduced, kwargs, error, words):
    st, _, _ = reduced
    before = store_digest(st.path)
    with pytest.raises(error) as e:
        analysis.cluster(st.path, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert store_digest(st.path) == before


def test_feature_space_is_named_as_reduce_names_it(reduced, caplog):
    """`--features fingerprint|pixels` in every stage; the old `--on pca|pca_pixels` (and the
    API's features="pca") still work, give the same clusters and warn once."""
    import importlib
    import warnings

    from pipeline.cli import main

    clustering = importlib.import_module("pipeline.analysis.clustering")
    st, _, _ = reduced
    analysis.cluster(st.path, n_clusters=5, features="fingerprint")
    labels = Store.open(st.path).dataset().cluster.values.copy()
    clustering._warned.clear()
    with pytest.warns(FutureWarning, match="'pca' is deprecated: say 'fingerprint'"):
        analysis.cluster(st.path, n_clusters=5, features="pca")
    np.testing.assert_array_equal(Store.open(st.path).dataset().cluster.values, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is quiet
        assert clustering.feature_space("pca") == "fingerprint"
    with caplog.at_level("WARNING", logger="pipeline.cli"):
        assert main(["cluster", st.path, "--n-clusters", "5", "--on", "pca"]) == 0
    assert "--on pca is deprecated: use --features fingerprint" in caplog.text
    np.testing.assert_array_equal(Store.open(st.path).dataset().cluster.values, labels)
    assert main(["cluster", st.path, "--n-clusters", "5", "--features", "fingerprint"]) == 0
    assert analysis.load_kmeans(Store.open(st.path)).cluster_centers_.shape == (5, 6)


# ------------------------------------------------------------------- hdbscan on a real image
@pytest.fixture(scope="module")
def hdf_store(tmp_path_factory, model_cache):
    """The demo's sliding store: the real Hubble Deep Field, 64-pixel windows (224 rows)."""
    from pipeline.demo import hubble_deep_field
    from pipeline.fingerprint import fingerprint

    work = tmp_path_factory.mktemp("hdf")
    store = work / "hdf.zarr"
    fingerprint(
        [hubble_deep_field(work)],
        store,
        method="sliding",
        size=64,
        tile_size=256,
        chunk_rows=64,
        workers=1,
        progress=False,
    )
    analysis.reduce(store)
    return store


def test_hdbscan_defaults_find_groups_on_the_hubble_deep_field(hdf_store):
    # scikit-learn's defaults (min_samples = min_cluster_size = 10) call all 224 rows noise.
    result = analysis.cluster(hdf_store, algorithm="hdbscan")
    n = Store.open(hdf_store).dataset().valid.values.sum()
    assert n == 224
    assert result.n_clusters >= 2 and result.sizes.get(-1, 0) < n
    assert result.note is None
    # The sizes chosen from the data are recorded with the labels.
    params = Store.open(hdf_store).attrs["cluster"]["params"]
    assert (params["min_cluster_size"], params["min_samples"]) == analysis.hdbscan_sizes(224)
    assert params["min_cluster_size_from"] == params["min_samples_from"] == "data"
    assert params["cluster_selection_method"] == "eom"


def test_hdbscan_sizes_follow_the_rows():
    assert analysis.hdbscan_sizes(224) == (5, 2)
    assert analysis.hdbscan_sizes(3120) == (31, 3)
    assert analysis.hdbscan_sizes(20000) == (200, 4)
    assert analysis.hdbscan_sizes(3) == (3, 2)  # never more than the rows
    assert analysis.hdbscan_sizes(500, 40, 7) == (40, 7)


def test_all_noise_is_said_in_one_line_with_what_to_change(tmp_path, rng, caplog, capsys):
    from pipeline.cli import main

    X = rng.uniform(-1, 1, size=(200, 4)).astype(np.float32)  # no structure at all
    st, rows = build_store(tmp_path / "s.zarr", X, chunk_rows=32)
    analysis.reduce(st.path, components=4)
    with caplog.at_level("WARNING", logger="pipeline.analysis.clustering"):
        code = main(
            [
                "cluster",
                st.path,
                "--algorithm",
                "hdbscan",
                "--min-cluster-size",
                "60",
                "--min-samples",
                "30",
            ]
        )
    assert code == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "sampled rows noise" in x]
    assert "all 200 sampled rows noise" in line and "--min-cluster-size 30" in line
    assert "--min-samples 15" in line and "--algorithm kmeans" in line
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [line]
    assert (Store.open(st.path).dataset().cluster.values[rows] == -1).all()
    params = Store.open(st.path).attrs["cluster"]["params"]
    assert (params["min_cluster_size"], params["min_samples"]) == (60, 30)
    assert params["min_cluster_size_from"] == "set"


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("cluster-selection", "tree", "'tree' is not one of eom, leaf"),
        ("min-samples", 0, "min-samples: must be >= 1"),
        ("min-cluster-size", 1, "min-cluster-size: must be >= 2"),
    ],
)
def test_bad_hdbscan_settings_refused_before_writing(reduced, setting, value, words):
    import dask.config

    st, _, _ = reduced
    before = store_digest(st.path)
    with (
        dask.config.set({f"elodin.analysis.cluster.{setting}": value}),
        pytest.raises(ConfigError, match=words),
    ):
        analysis.cluster(st.path, algorithm="hdbscan")
    assert store_digest(st.path) == before
