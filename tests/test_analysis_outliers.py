"""k-NN distance outlier scores over real stores."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_store import build_store, store_digest

from pipeline import analysis
from pipeline.errors import ConfigError
from pipeline.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(21)
    X = rng.normal(size=(700, 10)).astype(np.float32)
    X[333] += 25.0  # one far-away point
    X[100] += 8.0  # a milder one
    st, rows = build_store(tmp_path_factory.mktemp("out") / "s.zarr", X, chunk_rows=32)
    analysis.reduce(st.path, components=10)
    return st, rows


def test_exact_scores_when_every_row_is_in_the_reference(store):
    st, rows = store
    table = analysis.outliers(st.path, n=5, k=4, reference_size=10**6, block_rows=64)
    ds = Store.open(st.path).dataset()
    pca = ds.pca.values[rows].astype(np.float64)
    d = np.linalg.norm(pca[:, None] - pca[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, :4].mean(axis=1)
    np.testing.assert_allclose(ds.outlier_score.values[rows], expected, rtol=1e-5)
    assert np.isnan(ds.outlier_score.values[~ds.valid.values]).all()
    assert table["index"][0] == rows[333] and table["index"][1] == rows[100]
    np.testing.assert_allclose(table["score"], np.sort(expected)[::-1][:5], rtol=1e-5)
    assert Store.open(st.path).attrs["outlier_score"]["exact"] is True


def test_far_point_ranks_first_against_a_small_reference(store):
    st, rows = store
    table = analysis.outliers(st.path, n=3, k=5, reference_size=150, block_rows=64)
    assert table["index"][0] == rows[333]
    assert table.meta["reference_size"] == 150
    scores = Store.open(st.path).dataset().outlier_score.values[rows]
    assert np.isfinite(scores).all()


def test_bad_input(store, tmp_path):
    st, _ = store
    before = store_digest(st.path)
    with pytest.raises(ConfigError, match="reference size 5 must exceed k = 10"):
        analysis.outliers(st.path, k=10, reference_size=5)
    assert store_digest(st.path) == before
    small, _ = build_store(tmp_path / "small.zarr", np.random.default_rng(0).normal(size=(6, 4)))
    analysis.reduce(small.path, components=2)
    with pytest.raises(ConfigError, match="need more than 10 valid rows, the store has 6"):
        analysis.outliers(small.path, k=10)
