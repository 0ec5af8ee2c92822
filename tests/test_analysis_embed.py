"""UMAP and t-SNE maps fitted on a sample, every other row transformed, over real stores."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_store import build_store, store_digest
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from pipeline import analysis
from pipeline.analysis import SampleEmbedding
from pipeline.errors import ConfigError, StoreError
from pipeline.store import Store


@pytest.fixture
def reduced(tmp_path, rng):
    centers = rng.normal(size=(4, 16)) * 5
    truth = rng.integers(0, 4, 500)
    X = (centers[truth] + rng.normal(size=(500, 16))).astype(np.float32)
    st, rows = build_store(tmp_path / "s.zarr", X, chunk_rows=32)
    analysis.reduce(st.path, components=8)
    return st, rows, truth


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_map_places_every_valid_row_and_keeps_groups(reduced, method):
    st, rows, truth = reduced
    result = analysis.embed(st.path, method=method, sample_size=200, block_rows=128)
    ds = Store.open(st.path).dataset()
    emb = ds.embedding.values
    assert emb.shape == (st.n_rows, 2) and emb.dtype == np.float32
    assert np.isfinite(emb[rows]).all() and np.isnan(emb[~ds.valid.values]).all()
    assert result.sample_size == 200 and ds.embedding.dims == ("cutout", "embedding_dim")
    # Transformed rows land among the sampled rows of their own group.
    acc = cross_val_score(KNeighborsClassifier(5), emb[rows], truth, cv=3).mean()
    assert acc > 0.95
    assert Store.open(st.path).attrs["embedding"]["method"] == method


def test_sampled_rows_keep_their_fitted_positions(rng):
    X = rng.normal(size=(300, 5)).astype(np.float32)
    model = SampleEmbedding("tsne", sample_size=120, perplexity=10).fit(X)
    placed = model._blocks(
        __import__("dask.array").array.from_array(X, chunks=64), model.sample_index_
    ).compute()
    np.testing.assert_array_equal(placed[model.sample_index_], model.embedding_)
    assert np.isfinite(placed).all()


def test_bad_method_and_missing_pca(tmp_path, reduced, rng):
    st, _, _ = reduced
    before = store_digest(st.path)
    with pytest.raises(ConfigError, match="unknown embedding method 'pca'"):
        analysis.embed(st.path, method="pca")
    assert store_digest(st.path) == before
    bare, _ = build_store(tmp_path / "bare.zarr", rng.normal(size=(20, 4)))
    with pytest.raises(StoreError, match="run `elodin reduce"):
        analysis.embed(bare.path)
