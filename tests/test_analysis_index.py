"""The FAISS neighbour index, its staleness, the k-NN graph: against brute-force numpy on real stores."""

from __future__ import annotations

import logging

import dask.config
import numpy as np
import pytest
from analysis_store import append_rows, build_store, store_digest

from pipeline import analysis
from pipeline.analysis import index as nn
from pipeline.cli import main
from pipeline.errors import StoreError
from pipeline.runner import absorb_rows
from pipeline.store import Store

D = 8


def blobs(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered rows (a few Gaussian groups of different widths), like fingerprints' PCA."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4, size=(12, d))
    which = rng.integers(0, len(centres), n)
    return (centres[which] + rng.normal(size=(n, d)) * rng.uniform(0.3, 1.5, (n, 1))).astype(
        np.float32
    )


def brute(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2"):
    if metric == "cosine":
        b = base / np.linalg.norm(base, axis=1, keepdims=True)
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = 1 - q.astype(np.float64) @ b.T.astype(np.float64)
    else:
        d = np.linalg.norm(queries[:, None, :].astype(np.float64) - base[None], axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


@pytest.mark.parametrize(
    ("kind", "minimum"), [("flat", 1.0), ("ivf", 0.95), ("ivfpq", 0.95), ("hnsw", 0.95)]
)
def test_recall_against_exact_for_each_kind(kind, minimum):
    X = blobs(4000, 16, seed=1)
    Q = blobs(50, 16, seed=2)
    model = nn.NeighborIndex(kind, nprobe=64).fit(X)
    assert model.kind_ == kind and model.n_indexed == len(X)
    dist, ids = model.kneighbors(Q, 10)
    _, true_i = brute(X, Q, 10)
    assert recall(ids, true_i) >= minimum
    if kind == "flat":
        np.testing.assert_array_equal(ids, true_i)
    # Distances are true L2 distances of the rows returned (exact vectors, or re-ranked).
    got = np.linalg.norm(X[ids].astype(np.float64) - Q[:, None, :], axis=2)
    tol = 1e-4 if kind != "ivfpq" else 1e-3
    np.testing.assert_allclose(dist, got, rtol=tol, atol=tol)


def test_cosine_and_auto_and_ids():
    X = blobs(600, D, seed=3)
    model = nn.NeighborIndex("auto", "cosine", auto_threshold=500).fit(X, ids=np.arange(600) * 3)
    assert model.kind_ == "ivfpq"  # auto: past the threshold
    flat = nn.NeighborIndex("flat", "cosine").fit(X[:100], ids=np.arange(100) + 7)
    d, i = flat.kneighbors(X[:4], 5)
    true_d, true_i = brute(X[:100], X[:4], 5, "cosine")
    np.testing.assert_array_equal(i, true_i + 7)
    np.testing.assert_allclose(d, true_d, atol=1e-5)
    d, i = flat.kneighbors(X[:1], 150)  # more than indexed: padded
    assert (i[0, 100:] == -1).all() and np.isinf(d[0, 100:]).all()


# ---------------------------------------------------------------------------- in a store
def make_store(path, n=900, seed=4):
    st, rows = build_store(path, blobs(n, 16, seed), chunk_rows=32)
    analysis.reduce(st.path, components=D)
    return st, rows


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def pca_of(st, rows):
    return Store.open(st.path).array("pca").oindex[np.asarray(rows)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_similar_uses_a_current_index_and_agrees_with_the_scan(store, metric):
    st, rows = store
    res = nn.build_index(st.path, kind="flat", metric=metric, progress=False)
    assert res.action == "built" and res.n_rows == len(rows)
    assert nn.index_status(st.path) == ("current", "the index covers the store")
    for q in (3, 400, 899):
        fast = analysis.similar(st.path, cutout=int(rows[q]), n=8, metric=metric)
        slow = analysis.similar(st.path, cutout=int(rows[q]), n=8, metric=metric, exact=True)
        assert fast.meta["search"] == "index" and slow.meta["search"] == "exact"
        np.testing.assert_array_equal(fast["index"], slow["index"])
        np.testing.assert_array_equal(fast["distance"], slow["distance"])
    # The other metric is not the index's: scanned.
    other = "cosine" if metric == "l2" else "l2"
    assert analysis.similar(st.path, cutout=int(rows[0]), metric=other).meta["search"] == "exact"
    # A second build with nothing new keeps the index.
    assert nn.build_index(st.path, kind="flat", metric=metric, progress=False).action == "kept"


def test_index_leaves_out_overlapping_windows(tmp_path):
    n = 400
    i = np.arange(n)
    coords = {
        "image": np.where(i < n // 2, "left", "right").astype(object),
        "x": 7.5 + 8 * ((i % (n // 2)) % 20),
        "y": 7.5 + 8 * ((i % (n // 2)) // 20),
        "width": np.full(n, 16),
        "height": np.full(n, 16),
        "ra": np.full(n, np.nan),
        "dec": np.full(n, np.nan),
    }
    # Neighbouring windows get similar vectors, so the nearest rows are the overlapping ones.
    X = blobs(n, 16, 5) * 0.1 + np.c_[coords["x"], coords["y"]].repeat(8, axis=1) / 8
    st, rows = build_store(tmp_path / "o.zarr", X, chunk_rows=32, coords=coords)
    analysis.reduce(st.path, components=D)
    nn.build_index(st.path, kind="hnsw", progress=False)
    q = int(rows[45])
    fast = analysis.similar(st.path, cutout=q, n=6, exclude_overlaps=True)
    slow = analysis.similar(st.path, cutout=q, n=6, exclude_overlaps=True, exact=True)
    assert fast.meta["search"] == "index"
    np.testing.assert_array_equal(fast["index"], slow["index"])
    near = analysis.similar(st.path, cutout=q, n=6)
    assert set(near["index"]) != set(fast["index"])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_extended_after_an_append_agrees_with_exact(store, kind, caplog):
    st, rows = store
    with dask.config.set({"elodin.analysis.index.nprobe": 10_000}):  # every list: exact
        nn.build_index(st.path, kind=kind, progress=False)
        st = Store.open(st.path, mode="r+")
        new = append_rows(st, blobs(100, 16, seed=9), image="img1")
        absorb_rows(st, st.segments[-1].row_start, st.n_rows)  # pca of the new rows, same PCA
        assert nn.index_status(st.path)[0] == "extendable"
        with caplog.at_level(logging.WARNING):
            t = analysis.similar(st.path, cutout=int(new[0]), n=5)
        assert t.meta["search"] == "exact" and "stale" in caplog.text
        res = nn.build_index(st.path, kind=kind, progress=False)
    assert res.action == "extended" and res.n_rows == len(rows) + len(new)
    assert nn.index_status(st.path)[0] == "current"
    model = nn.NeighborIndex.load(st.path)
    every = np.r_[rows, new]
    values = pca_of(st, np.sort(every))
    for q in (int(new[0]), int(new[50]), int(rows[10])):
        fast = analysis.similar(st.path, cutout=q, n=10)
        slow = analysis.similar(st.path, cutout=q, n=10, exact=True)
        assert fast.meta["search"] == "index"
        np.testing.assert_array_equal(fast["index"], slow["index"])
    _, ids = model.kneighbors(values[:5], 1)
    np.testing.assert_array_equal(ids[:, 0], np.sort(every)[:5])


def test_extension_past_the_refit_fraction_builds_again(store):
    st, rows = store
    nn.build_index(st.path, kind="ivf", progress=False)
    st = Store.open(st.path, mode="r+")
    append_rows(st, blobs(400, 16, seed=10), image="img1")  # 400 >= 25 % of 900
    absorb_rows(st, st.segments[-1].row_start, st.n_rows)
    res = nn.build_index(st.path, kind="ivf", progress=False)
    assert res.action == "built" and res.n_rows == len(rows) + 400


def test_stale_index_is_detected_and_not_used(store, caplog):
    st, rows = store
    nn.build_index(st.path, kind="flat", progress=False)
    analysis.reduce(st.path, components=D - 2)  # PCA refitted
    status, why = nn.index_status(st.path)
    assert status == "stale" and "PCA was refitted" in why
    with caplog.at_level(logging.WARNING):
        t = analysis.similar(st.path, cutout=int(rows[1]), n=4)
    assert t.meta["search"] == "exact" and "stale" in caplog.text
    with pytest.raises(StoreError, match="stale"):
        nn.neighbors(st.path, k=3, progress=False)
    nn.build_index(st.path, kind="flat", progress=False)
    assert nn.index_status(st.path)[0] == "current"
    Store.open(st.path, mode="r+").retire_image(0, "img0")
    status, why = nn.index_status(st.path)
    assert status == "stale" and "retired" in why


def test_basis_digest_covers_a_standardised_scale(tmp_path):
    """An index knows a basis by its mean and components, and by its scale once standardised;
    an unscaled basis keeps the digest it had before stores recorded a scale."""
    from pipeline.analysis.index.status import data_state

    st, _ = build_store(tmp_path / "s.zarr", blobs(300, 16, seed=5), chunk_rows=32)
    analysis.reduce(st.path, components=D, scale=False)
    st = Store.open(st.path, mode="r+")
    plain = data_state(st)["basis"]
    del Store.zarr(st.path, mode="r+")["pca_scale"]  # as a store reduced before scales
    assert data_state(st)["basis"] == plain
    st.write_array("pca_scale", np.full(16, 2.0), dims=("feature",))  # same components
    assert data_state(st)["basis"] != plain


def test_graph_equals_brute_force_and_feeds_outliers(store):
    st, rows = store
    nn.build_index(st.path, kind="flat", progress=False)
    res = nn.neighbors(st.path, k=6, progress=False)
    assert res.k == 6 and res.n_rows == len(rows)
    s = Store.open(st.path)
    ind, dist = s.array("neighbors")[...], s.array("neighbor_distance")[...]
    valid = s.array("valid")[...]
    assert (ind[~valid] == -1).all() and np.isnan(dist[~valid]).all()
    values = pca_of(st, rows)
    true_d, true_i = brute(values, values, 7)
    assert (true_i[:, 0] == np.arange(len(rows))).all()  # each row is its own nearest
    np.testing.assert_array_equal(ind[rows], rows[true_i[:, 1:]])
    np.testing.assert_allclose(dist[rows], true_d[:, 1:], rtol=1e-4, atol=1e-5)
    table = analysis.outliers(st.path, n=5, k=4)
    assert Store.open(st.path).attrs["outlier_score"]["method"] == "knn-graph"
    score = Store.open(st.path).array("outlier_score")[...][rows]
    np.testing.assert_allclose(score, true_d[:, 1:5].mean(axis=1), rtol=1e-4)
    assert table["index"][0] == rows[np.argmax(true_d[:, 1:5].mean(axis=1))]


def test_umap_takes_the_graph_as_its_precomputed_knn(tmp_path):
    st, rows = make_store(tmp_path / "u.zarr", n=200)
    nn.build_index(st.path, kind="flat", progress=False)
    nn.neighbors(st.path, k=6, progress=False)
    analysis.embed(st.path, method="umap", n_neighbors=5, sample_size=1000)
    info = Store.open(st.path).attrs["embedding"]
    assert info["precomputed_knn"] is True
    emb = Store.open(st.path).array("embedding")[...][rows]
    assert np.isfinite(emb).all()


# ------------------------------------------------------------------------------ the CLI
def test_command_line_bad_input(store, tmp_path, capsys):
    st, rows = store
    bare, _ = build_store(tmp_path / "bare.zarr", blobs(50, 4, 0))
    cases = [
        (["index", bare.path], "run `elodin reduce"),
        (["index", st.path, "--kind", "kd-tree"], "unknown index kind 'kd-tree'"),
        (["index", st.path, "--metric", "manhattan"], "unknown metric 'manhattan'"),
        (["index", st.path, "--space", "pixels"], "unknown index space 'pixels'"),
        (["neighbors", st.path], "no neighbour index; run `elodin index"),
    ]
    for argv, words in cases:
        before = store_digest(argv[1])
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("elodin: error:") and words in err and "\n" not in err
        assert store_digest(argv[1]) == before
    assert main(["index", st.path, "--kind", "flat", "--no-progress"]) == 0
    assert "flat index (l2, pca) of 900 rows" in capsys.readouterr().out
    before = store_digest(st.path)
    assert main(["neighbors", st.path, "-k", "900", "--no-progress"]) == 2
    assert "k = 900 neighbours need more than 900 indexed rows" in capsys.readouterr().err
    assert store_digest(st.path) == before
    # A damaged index is refused with one line, never used.
    arr = Store.open(st.path, mode="r+").array(nn.INDEX_VAR)
    arr[10:20] = 255 - arr[10:20]
    nn._CACHE.clear()  # a new process: this one holds the copy it loaded before the damage
    for argv in (
        ["similar", st.path, "--cutout", str(rows[0])],
        ["neighbors", st.path, "--no-progress"],
    ):
        before = store_digest(st.path)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "neighbour index is damaged (its checksum does not match)" in err
        assert "\n" not in err and store_digest(st.path) == before
    assert main(["similar", st.path, "--cutout", str(rows[0]), "--exact", "-n", "3"]) == 0
    assert main(["index", st.path, "--kind", "flat", "--rebuild", "--no-progress"]) == 0
    assert main(["neighbors", st.path, "-k", "3", "--no-progress"]) == 0
    assert "3 nearest neighbours of 900 rows" in capsys.readouterr().out


def test_run_builds_then_extends_the_index(store, tmp_path):
    import yaml

    from pipeline.runner import run

    st, rows = store
    cfg = tmp_path / "run.yaml"
    settings = {"run": {"store": st.path, "stages": ["reduce", "index", "neighbors"]}}
    settings["analysis"] = {"reduce": {"components": D}, "index": {"kind": "flat"}}
    cfg.write_text(yaml.safe_dump({"elodin": settings}))
    lines = run(cfg, progress=False).lines
    assert any("built a flat index" in line for line in lines)
    assert Store.open(st.path).attrs["neighbors"]["k"] == 20
    new = append_rows(Store.open(st.path, mode="r+"), blobs(60, 16, seed=12), image="img1")
    lines = run(cfg, incremental=True, progress=False).lines
    assert any("absorbed 60 new row(s)" in line for line in lines)
    assert any(f"extended a flat index (l2, pca) of {len(rows) + 60} rows" in x for x in lines)
    assert nn.index_status(st.path)[0] == "current"
    assert nn.graph_for(Store.open(st.path), 20) is not None  # the graph was written again
    fast = analysis.similar(st.path, cutout=int(new[3]), n=5)
    slow = analysis.similar(st.path, cutout=int(new[3]), n=5, exact=True)
    assert fast.meta["search"] == "index"
    np.testing.assert_array_equal(fast["index"], slow["index"])
