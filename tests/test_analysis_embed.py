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


# -------------------------------------------------------------------------- numba's cache
def _index_files(cache) -> dict:
    """numba's index files under the cache: path -> (mtime_ns, bytes)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.rglob("*.nbi")}


# A cold cache compiles every umap-learn / pynndescent kernel: minutes on a loaded machine.
@pytest.mark.timeout(2400)
def test_a_second_process_reuses_the_numba_cache(tmp_path, rng):
    import os
    import subprocess
    import sys

    X = rng.normal(size=(300, 16)).astype(np.float32)
    st, _ = build_store(tmp_path / "s.zarr", X, chunk_rows=64)
    analysis.reduce(st.path, components=8)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["ELODIN__CACHE_DIR"] = str(cache)
    cmd = [sys.executable, "-m", "pipeline.cli", "embed", st.path, "--sample-size", "200"]

    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr
    after_first = _index_files(cache / "numba")
    umap_index = {p for p in after_first if p.parent.name.startswith("umap_")}
    # umap-learn declares cache=True for one function only; these are cached because Elodin
    # gave them a cache.
    names = {p.name.split("-")[0] for p in umap_index}
    assert {"umap_.smooth_knn_dist", "layouts._optimize_layout_euclidean_single_epoch"} <= names
    assert any(p.parent.name.startswith("pynndescent_") for p in after_first)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr
    after_second = _index_files(cache / "numba")
    # The second process loaded umap-learn's kernels: no index written again, none added.
    assert {p: after_second[p] for p in umap_index} == {p: after_first[p] for p in umap_index}
    assert {p for p in after_second if p.parent.name.startswith("umap_")} == umap_index
    kept = [p for p in after_first if after_second.get(p) == after_first[p]]
    assert len(kept) >= 0.8 * len(after_first)


def test_local_workers_cache_umap_kernels_in_the_same_directory(reduced, tmp_path, monkeypatch):
    import dask.config
    from distributed import Client

    from pipeline import numba_cache
    from pipeline.compute import local_cluster

    def seen_on_worker():
        import os
        import sys

        from numba.core.caching import NullCache

        umap_ = sys.modules["umap.umap_"]
        return os.environ.get("NUMBA_CACHE_DIR"), not isinstance(
            umap_.smooth_knn_dist._cache, NullCache
        )

    st, _, _ = reduced
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)  # the workers' only source: compute
    # The workers read the cache dir from the environment too (the session's model cache, set by
    # conftest): point it at the same place as this test's config.
    monkeypatch.setenv("ELODIN__CACHE_DIR", str(tmp_path / "cache"))
    with (
        dask.config.set({"elodin.cache-dir": str(tmp_path / "cache")}),
        local_cluster(workers=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        analysis.embed(st.path, method="umap", sample_size=200, block_rows=128, client=client)
        (seen,) = client.run(seen_on_worker).values()
        assert seen == (str(numba_cache.directory()), True)
    assert str(tmp_path / "cache" / "numba") in seen[0]
