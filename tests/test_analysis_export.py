"""The catalog (Parquet, FITS, ECSV through astropy) and the analysis command line."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_store import build_store, store_digest
from astropy.table import Table

from pipeline import analysis
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.store import Store


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    rng = np.random.default_rng(31)
    centers = rng.normal(size=(3, 8)) * 6
    X = (centers[rng.integers(0, 3, 300)] + rng.normal(size=(300, 8))).astype(np.float32)
    st, rows = build_store(tmp_path_factory.mktemp("exp") / "s.zarr", X, chunk_rows=32)
    analysis.reduce(st.path, components=4)
    analysis.cluster(st.path, n_clusters=3)
    analysis.embed(st.path, method="tsne", sample_size=120)
    analysis.outliers(st.path, n=5)
    return st, rows


@pytest.mark.parametrize("ext", ["parquet", "fits", "ecsv"])
def test_catalog_round_trips_valid_rows_with_units(analysed, tmp_path, ext):
    st, rows = analysed
    result = analysis.export(st.path, tmp_path / f"cat.{ext}", block_rows=64)
    t = Table.read(tmp_path / f"cat.{ext}")
    ds = Store.open(st.path).dataset()
    assert len(t) == len(rows) == result.n_rows
    np.testing.assert_array_equal(t["index"], rows)
    assert {
        "image",
        "x",
        "y",
        "ra",
        "dec",
        "cluster",
        "embedding_0",
        "embedding_1",
        "outlier_score",
    } <= set(t.colnames)
    assert str(t["ra"].unit) == "deg" and str(t["dec"].unit) == "deg" and str(t["x"].unit) == "pix"
    np.testing.assert_allclose(t["ra"], ds.ra.values[rows])
    np.testing.assert_array_equal(t["cluster"], ds.cluster.values[rows])
    np.testing.assert_allclose(t["embedding_1"], ds.embedding.values[rows, 1])
    np.testing.assert_allclose(t["outlier_score"], ds.outlier_score.values[rows])
    assert set(t["image"]) == {"img0"}


def test_unknown_extension(analysed, tmp_path):
    st, _ = analysed
    with pytest.raises(
        ConfigError,
        match=r"cat\.xlsx: unknown catalog extension '\.xlsx'; use \.parquet, \.fits or \.ecsv",
    ):
        analysis.export(st.path, tmp_path / "cat.xlsx")
    assert not list(tmp_path.iterdir())


def test_command_line_runs_every_stage(tmp_path, capsys):
    rng = np.random.default_rng(3)
    st, rows = build_store(tmp_path / "cli.zarr", rng.normal(size=(200, 6)), chunk_rows=32)
    path = st.path
    assert main(["reduce", path, "--components", "3"]) == 0
    assert "3 components" in capsys.readouterr().out
    assert main(["cluster", path, "--algorithm", "agglomerative", "--n-clusters", "4"]) == 0
    assert "4 clusters" in capsys.readouterr().out
    assert main(["embed", path, "--method", "tsne", "--sample-size", "80"]) == 0
    assert main(["outliers", path, "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "score" in out and len(out.strip().splitlines()) >= 5
    assert main(["similar", path, "--cutout", str(rows[0]), "-n", "4", "--metric", "cosine"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"query: cutout {rows[0]} (cosine)") and "distance" in out
    assert main(["export", path, "-o", str(tmp_path / "cat.ecsv")]) == 0
    assert len(Table.read(tmp_path / "cat.ecsv")) == 200


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["cluster", "{store}"], "run `elodin reduce"),
        (
            ["cluster", "{store}", "--algorithm", "spectral"],
            "unknown clustering algorithm 'spectral'",
        ),
        (
            ["similar", "{store}", "--cutout", "3", "--metric", "hamming"],
            "unknown metric 'hamming'",
        ),
        (["export", "{store}", "-o", "{tmp}/cat.txt"], "unknown catalog extension '.txt'"),
        (["reduce", "{tmp}/nowhere.zarr"], "no fingerprint store here"),
    ],
)
def test_command_line_errors_are_one_line(tmp_path, capsys, argv, words):
    st, _ = build_store(tmp_path / "bad.zarr", np.random.default_rng(0).normal(size=(40, 4)))
    before = store_digest(st.path)
    code = main([a.format(store=st.path, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("elodin: error: ") and words in err and "\n" not in err
    assert store_digest(st.path) == before
