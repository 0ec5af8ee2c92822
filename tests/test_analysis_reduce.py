"""Exact incremental PCA over real Zarr stores with empty slots, against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_store import append_rows, build_store, store_digest
from sklearn.decomposition import PCA

from pipeline import analysis
from pipeline.analysis import ExactPCA
from pipeline.errors import ConfigError, StoreError
from pipeline.store import Store


def structured(rng, n: int, d: int = 48) -> np.ndarray:
    """Rows with a decaying spectrum and a large common offset (like CNN features)."""
    basis = rng.normal(size=(d, d)) * np.geomspace(5, 0.05, d)[:, None]
    return (rng.normal(size=(n, d)) @ basis + 30.0).astype(np.float32)


def test_estimator_matches_sklearn_and_skips_nan_rows(rng):
    X = structured(rng, 700)
    with_gaps = np.insert(X, [10, 10, 300], np.nan, axis=0)
    ours = ExactPCA(10).fit(with_gaps)
    ref = PCA(10, svd_solver="full").fit(X)
    assert ours.n_samples_seen_ == len(X)
    np.testing.assert_allclose(
        ours.explained_variance_ratio_, ref.explained_variance_ratio_, atol=1e-6
    )
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.mean_, ref.mean_, atol=1e-4)
    # Same sign convention as scikit-learn, so the components themselves agree.
    np.testing.assert_allclose(ours.components_, ref.components_, atol=1e-3)
    np.testing.assert_allclose(ours.transform(X), ref.transform(X), atol=2e-3)
    assert np.isnan(ours.transform(with_gaps)[10]).all()


def test_variance_threshold_matches_sklearn(rng):
    X = structured(rng, 400)
    ours = ExactPCA(variance=0.9).fit(X)
    ref = PCA(0.9, svd_solver="full").fit(X)
    assert ours.n_components_ == ref.n_components_


def test_reduce_store_equals_sklearn_on_valid_rows(tmp_path, rng):
    X = structured(rng, 900)
    st, rows = build_store(tmp_path / "s.zarr", X, chunk_rows=32)
    assert st.n_rows > len(X)  # the packing left empty slots
    result = analysis.reduce(st.path, components=10, block_rows=128)
    ref = PCA(10).fit(X)
    ds = Store.open(st.path).dataset()
    ratio = ds.pca_explained_variance_ratio.values
    assert result.n_components == 10 and result.n_rows == len(X)
    assert np.abs(ratio - ref.explained_variance_ratio_).max() < 1e-3
    pca = ds.pca.values
    np.testing.assert_allclose(pca[rows], ref.transform(X), atol=5e-3 * np.abs(pca[rows]).max())
    empty = ~ds.valid.values
    assert empty.any() and np.isnan(pca[empty]).all()
    assert ds.pca_components.dims == ("component", "feature")
    assert Store.open(st.path).attrs["pca"]["n_components"] == 10


def test_update_with_appended_rows_equals_fit_on_all(tmp_path, rng):
    X1, X2 = structured(rng, 500), structured(np.random.default_rng(7), 300)
    st, _ = build_store(tmp_path / "s.zarr", X1, chunk_rows=32)
    first = analysis.reduce(st.path, components=8, block_rows=128)
    assert first.rows_read == st.n_rows
    append_rows(st, X2, image="img1")
    updated = analysis.reduce(st.path, components=8, block_rows=128)
    # Only the new segment was read; the first came from the saved sums.
    assert updated.segments_reused == 1
    assert updated.rows_read == st.segments[1].row_stop - st.segments[1].row_start
    ds = Store.open(st.path).dataset()
    ref = PCA(8).fit(np.concatenate([X1, X2]))
    np.testing.assert_allclose(
        ds.pca_explained_variance_ratio.values, ref.explained_variance_ratio_, atol=1e-5
    )
    refit = analysis.reduce(st.path, components=8, block_rows=128, refit=True)
    assert refit.segments_reused == 0
    ds2 = Store.open(st.path).dataset()
    np.testing.assert_allclose(
        ds2.pca_explained_variance_ratio.values, ds.pca_explained_variance_ratio.values, rtol=1e-6
    )
    np.testing.assert_allclose(
        np.abs(ds2.pca_components.values), np.abs(ds.pca_components.values), atol=1e-6
    )


def _standardised(X: np.ndarray) -> np.ndarray:
    sd = X.std(axis=0, ddof=1)
    return (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def test_scaled_pca_is_sklearn_on_standardised_rows_and_stays_updatable(tmp_path, rng):
    # Blocks whose spreads differ ten thousandfold, as the pooled stages of `:stages:zoom3`
    # do tenfold, and one feature that never varies.
    spread = np.repeat(np.geomspace(0.01, 100.0, 4), 12).astype(np.float32)
    X1, X2 = structured(rng, 500) * spread, structured(np.random.default_rng(7), 300) * spread
    X1[:, 5] = X2[:, 5] = 3.0
    st, rows = build_store(tmp_path / "s.zarr", X1, chunk_rows=32)
    analysis.reduce(st.path, components=8, block_rows=128, scale=True)
    new = append_rows(st, X2, image="img1")
    updated = analysis.reduce(st.path, components=8, block_rows=128, scale=True)
    assert updated.segments_reused == 1 and "(standardised)" in str(updated)

    X = np.concatenate([X1, X2]).astype(np.float64)
    ref = PCA(8).fit(_standardised(X))
    ds = Store.open(st.path).dataset()
    np.testing.assert_allclose(
        ds.pca_explained_variance_ratio.values, ref.explained_variance_ratio_, atol=1e-5
    )
    pca = ds.pca.values[np.concatenate([rows, new])]
    want = ref.transform(_standardised(X))
    np.testing.assert_allclose(pca, want, atol=2e-3 * np.abs(want).max())
    sd = X.std(axis=0, ddof=1)
    sd[5] = 1.0  # a feature that does not vary is left as it is
    np.testing.assert_allclose(ds.pca_scale.values, sd, rtol=1e-4)
    assert Store.open(st.path).attrs["pca"]["scale"] is True
    restored = analysis.load_pca(Store.open(st.path))
    np.testing.assert_allclose(restored.transform(X2), ds.pca.values[new], atol=1e-4)

    # Without it the PCA sees little but the widest block: another basis, scale ones.
    plain = analysis.reduce(st.path, components=8, block_rows=128, scale=False)
    ds = Store.open(st.path).dataset()
    assert "(standardised)" not in str(plain) and (ds.pca_scale.values == 1).all()
    assert Store.open(st.path).attrs["pca"]["scale"] is False
    np.testing.assert_allclose(
        ds.pca_explained_variance_ratio.values, PCA(8).fit(X).explained_variance_ratio_, atol=1e-5
    )

    def share_of_widest(components: np.ndarray) -> float:
        return float((components[:, 36:] ** 2).sum() / (components**2).sum())

    assert share_of_widest(ds.pca_components.values) > 0.99
    assert share_of_widest(ref.components_) < 0.5


@pytest.mark.parametrize(
    ("setting", "features", "model", "scaled"),
    [
        ("auto", "fingerprint", "efficientnet-lite0:native:stages:zoom3:rot4", True),
        ("auto", "fingerprint", "efficientnet-lite0:native:stages:zoom3:rot4@fp16", True),
        ("auto", "fingerprint", "efficientnet-lite0:native:multi:rot8", True),
        ("auto", "fingerprint", "efficientnet-lite2:native:stages", True),
        ("auto", "fingerprint", "efficientnet-lite0:native:zoom3:rot4", False),  # the head alone
        ("auto", "fingerprint", "efficientnet-lite0:native:rot8", False),
        ("auto", "fingerprint", "efficientnet-lite0", False),
        ("auto", "pixels", "efficientnet-lite0:native:stages:zoom3:rot4", False),
        ("auto", "fingerprint", "synthetic", False),  # a user model this machine has no card of
        ("auto", "fingerprint", None, False),
        (True, "pixels", "synthetic", True),
        ("True", "fingerprint", "efficientnet-lite0:native:rot8", True),
        ("Auto", "fingerprint", "efficientnet-lite0:native:stages:zoom3:rot4", True),
        (None, "fingerprint", "efficientnet-lite0:native:stages:zoom3:rot4", True),
        ("false", "fingerprint", "efficientnet-lite0:native:stages:zoom3:rot4", False),
        (False, "fingerprint", "efficientnet-lite0:native:stages:zoom3:rot4", False),
    ],
)
def test_auto_scale_standardises_features_of_several_depths(setting, features, model, scaled):
    from pipeline.analysis.reduce import scales_features

    assert scales_features(setting, features=features, model=model) is scaled


def test_a_store_reduced_before_scales_loads_unscaled(tmp_path, rng):
    """Stores reduced before ``pca_scale`` existed were not standardised: ``load_pca`` projects
    new rows exactly as their ``pca`` was projected."""
    X = structured(rng, 300)
    st, rows = build_store(tmp_path / "old.zarr", X, chunk_rows=32)
    analysis.reduce(st.path, components=6, scale=False)
    del Store.zarr(st.path, mode="r+")["pca_scale"]
    pca = analysis.load_pca(Store.open(st.path))
    assert (pca.scale_ == 1).all() and pca.scale is False
    stored = Store.open(st.path).dataset().pca.values[rows]
    np.testing.assert_allclose(pca.transform(X), stored, atol=1e-4)


def test_reduce_standardises_the_default_models_fingerprints_by_default(tmp_path, rng):
    from analysis_store import ATTRS

    from pipeline import config

    assert config.get("analysis.reduce.scale") == "auto"
    model = config.get("model.name")
    attrs = {**ATTRS, "model": model}
    X = structured(rng, 200) * np.repeat([0.1, 10.0], 24).astype(np.float32)
    st, _ = build_store(tmp_path / "default.zarr", X, chunk_rows=32, attrs=attrs)
    assert "(standardised)" in str(analysis.reduce(st.path, components=4))
    assert Store.open(st.path).attrs["pca"]["scale"] is True
    plain = {**ATTRS, "model": "efficientnet-lite0:native:rot8"}
    st, _ = build_store(tmp_path / "rot8.zarr", X, chunk_rows=32, attrs=plain)
    assert "(standardised)" not in str(analysis.reduce(st.path, components=4))


def test_unfinished_segment_is_counted_but_not_saved(tmp_path, rng):
    X1, X2 = structured(rng, 300), structured(np.random.default_rng(8), 200)
    st, _ = build_store(tmp_path / "s.zarr", X1, chunk_rows=32)
    append_rows(st, X2, image="img1", done=False)
    result = analysis.reduce(st.path, components=5, block_rows=64)
    assert result.n_rows == 500
    acc = Store.open(st.path).array("pca_accum_sum")
    assert acc.attrs["segments"] == [0] and acc.attrs["n"] == 300


def test_new_pca_drops_results_of_the_old_one(tmp_path, rng):
    st, _ = build_store(tmp_path / "s.zarr", structured(rng, 300), chunk_rows=32)
    analysis.reduce(st.path, components=5)
    analysis.cluster(st.path, n_clusters=3)
    analysis.reduce(st.path, components=6)
    ds = Store.open(st.path).dataset()  # opens: no dimension conflicts left behind
    assert "cluster" not in ds and "cluster_centers" not in ds and ds.sizes["component"] == 6


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"components": 500}, ConfigError, "more than min(valid rows, features)"),
        ({"components": 3, "variance": 0.9}, ConfigError, "not both"),
        ({"variance": 1.5}, ConfigError, "(0, 1]"),
        ({"features": "pixel"}, ConfigError, "unknown PCA features 'pixel'"),
        ({"scale": "often"}, ConfigError, "reduce.scale: expected auto, true or false"),
        ({"features": "pixels", "pixel_side": 2}, ConfigError, "pixel-side: must be >= 4"),
    ],
)
def test_bad_input_one_line_and_store_unchanged(tmp_path, rng, kwargs, error, words):
    st, _ = build_store(tmp_path / "s.zarr", structured(rng, 100), chunk_rows=32)
    before = store_digest(st.path)
    with pytest.raises(error) as e:
        analysis.reduce(st.path, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert store_digest(st.path) == before


def test_empty_store_is_refused(tmp_path, rng):
    st, _ = build_store(tmp_path / "s.zarr", np.zeros((0, 8), np.float32))
    before = store_digest(st.path)
    with pytest.raises(StoreError, match="no valid rows"):
        analysis.reduce(st.path)
    assert store_digest(st.path) == before


def test_configured_components_shrink_to_a_small_store(tmp_path, rng):
    # The configured 20 on a 12-row store (a small blob run) keeps what exists; an explicit
    # --components that large is still refused.
    st, _ = build_store(tmp_path / "s.zarr", structured(rng, 12), chunk_rows=16)
    assert analysis.reduce(st.path).n_components == 12
    with pytest.raises(ConfigError, match="--components 20 is more than"):
        analysis.reduce(st.path, components=20)
