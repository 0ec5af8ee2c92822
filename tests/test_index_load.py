"""Loading the saved neighbour index: uncompressed chunks, each checked against its own SHA-256;
an index saved before the per-chunk digests still loads (one SHA-256); damage anywhere is refused."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from analysis_store import append_rows, build_store

from pipeline import analysis
from pipeline.analysis import index as nn
from pipeline.errors import StoreError
from pipeline.runner import absorb_rows
from pipeline.store import Store


def blobs(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4, size=(8, d))
    return (centres[rng.integers(0, 8, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture
def store(tmp_path, monkeypatch):
    # Small chunks, so the index's bytes span several and each is checked on its own.
    monkeypatch.setattr(nn, "_BYTE_CHUNK", 4096)
    st, rows = build_store(tmp_path / "s.zarr", blobs(600, 16, 1), chunk_rows=32)
    analysis.reduce(st.path, components=8)
    nn.build_index(st.path, kind="flat", progress=False)
    return st, rows


def test_chunks_are_uncompressed_and_each_has_a_digest(store):
    st, _ = store
    arr = Store.open(st.path).array(nn.INDEX_VAR)
    meta = dict(arr.attrs.asdict())
    assert arr.compressors == ()
    assert meta["chunk_bytes"] == 4096
    assert len(meta["chunk_sha256"]) == -(-meta["nbytes"] // 4096) > 2
    nn._CACHE.clear()
    model, _ = nn.load_index(st.path)
    assert model.n_indexed == 600


@pytest.mark.parametrize("where", ["first", "last"])
def test_damage_in_any_chunk_is_refused(store, where):
    st, rows = store
    arr = Store.open(st.path, mode="r+").array(nn.INDEX_VAR)
    a = 10 if where == "first" else arr.shape[0] - 20
    arr[a : a + 10] = 255 - arr[a : a + 10]
    nn._CACHE.clear()
    with pytest.raises(StoreError, match=r"damaged \(its checksum does not match\)"):
        nn.load_index(st.path)
    with pytest.raises(StoreError, match="damaged"):
        analysis.similar(st.path, cutout=int(rows[0]), n=3)


def test_an_index_saved_with_one_digest_still_loads_and_is_checked(store):
    st, rows = store
    arr = Store.open(st.path, mode="r+").array(nn.INDEX_VAR)
    meta = dict(arr.attrs.asdict())
    del meta["chunk_bytes"], meta["chunk_sha256"]
    arr.attrs.clear()
    arr.attrs.update(meta)
    nn._CACHE.clear()
    assert analysis.similar(st.path, cutout=int(rows[0]), n=3).meta["search"] == "index"
    arr[5] = 255 - arr[5]
    nn._CACHE.clear()
    with pytest.raises(StoreError, match="checksum does not match"):
        nn.load_index(st.path)


def test_stale_after_retire_refit_or_append_without_reading_the_index(store, caplog, monkeypatch):
    """Staleness is decided from the facts recorded at build (PCA basis, segments, retired
    images): the index's bytes are not even read for a stale one."""
    st, rows = store
    reads = []
    real = nn._read_checked
    monkeypatch.setattr(nn, "_read_checked", lambda *a, **k: reads.append(1) or real(*a, **k))
    nn._CACHE.clear()
    assert analysis.similar(st.path, cutout=int(rows[0]), n=3).meta["search"] == "index"
    assert reads == [1]
    s = Store.open(st.path, mode="r+")
    new = append_rows(s, blobs(50, 16, 2), image="img1")
    absorb_rows(s, s.segments[-1].row_start, s.n_rows)
    nn._CACHE.clear()
    with caplog.at_level(logging.WARNING):
        t = analysis.similar(st.path, cutout=int(rows[0]), n=3)
    assert t.meta["search"] == "exact" and "new segment" in caplog.text and reads == [1]
    nn.build_index(st.path, kind="flat", progress=False)
    analysis.reduce(st.path, components=6)
    assert nn.index_status(st.path) == (
        "stale",
        "the PCA was refitted since the index was built",
    )
    nn.build_index(st.path, kind="flat", progress=False)
    Store.open(st.path, mode="r+").retire_image(0, "img0")
    status, why = nn.index_status(st.path)
    assert status == "stale" and "retired" in why
    reads.clear()
    nn._CACHE.clear()
    assert analysis.similar(st.path, cutout=int(new[0]), n=3).meta["search"] == "exact"
    assert reads == []


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_one_off_query_loads_only_the_ivfpq_codes_and_agrees_with_the_scan(
    tmp_path, monkeypatch, metric
):
    """``similar`` reads the ivfpq index's IVF-PQ part alone and re-ranks its candidates from
    ``pca``: with every list probed its answer is the exact scan's; damage there is refused."""
    import dask.config

    monkeypatch.setattr(nn, "_BYTE_CHUNK", 4096)
    st, rows = build_store(tmp_path / "s.zarr", blobs(3000, 16, 3), chunk_rows=64)
    analysis.reduce(st.path, components=8)
    with dask.config.set({"elodin.analysis.index.nprobe": 10_000}):
        nn.build_index(st.path, kind="ivfpq", metric=metric, progress=False)
    meta = dict(Store.open(st.path).array(nn.INDEX_VAR).attrs.asdict())
    base = Store.open(st.path).array(nn.BASE_VAR)
    assert meta["kind"] == "ivfpq" and base.shape[0] < meta["nbytes"] / 2
    loaded = []
    real = nn.load_index
    monkeypatch.setattr(nn, "load_index", lambda *a, **k: loaded.append(1) or real(*a, **k))
    nn._CACHE.clear()
    for q in (int(rows[0]), int(rows[1234]), int(rows[-1])):
        fast = analysis.similar(st.path, cutout=q, n=10, metric=metric)
        slow = analysis.similar(st.path, cutout=q, n=10, metric=metric, exact=True)
        assert fast.meta["search"] == "index"
        np.testing.assert_array_equal(fast["index"], slow["index"])
        np.testing.assert_allclose(fast["distance"], slow["distance"], rtol=1e-6)
    assert loaded == []  # the full index (with its vectors) was never read
    arr = Store.open(st.path, mode="r+").array(nn.BASE_VAR)
    arr[100:110] = 255 - arr[100:110]
    nn._CACHE.clear()
    with pytest.raises(StoreError, match=r"damaged \(its checksum does not match\)"):
        analysis.similar(st.path, cutout=int(rows[0]), n=3, metric=metric)
