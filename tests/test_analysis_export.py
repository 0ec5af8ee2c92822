"""The catalog (Parquet, FITS, ECSV, VOTable through astropy; HATS for lsdb) and the analysis
command line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from analysis_store import build_store, store_digest
from astropy.table import Table

from pipeline import analysis
from pipeline.cli import main
from pipeline.errors import ConfigError, StoreError
from pipeline.store import Store
from pipeline.testing import error_lines

LABELS = np.array(["", "lens", "merger", "star"])


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
    # A label per row, as the explorer writes them (a string variable, "" for unlabelled).
    label = Store.open(st.path, mode="r+").create_row_array("label", dtype=str, fill="")
    label[rows] = LABELS[np.arange(len(rows)) % len(LABELS)]
    return st, rows


CATALOG_COLUMNS = {
    "index",
    "image",
    "x",
    "y",
    "width",
    "height",
    "ra",
    "dec",
    "cluster",
    "embedding_0",
    "embedding_1",
    "outlier_score",
    "pca_0",
    "pca_1",
    "pca_2",
    "pca_3",
    "label",
}


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
    assert set(t.colnames) == CATALOG_COLUMNS
    np.testing.assert_allclose(t["pca_3"], ds.pca.values[rows, 3])
    np.testing.assert_array_equal(t["label"], LABELS[np.arange(len(rows)) % len(LABELS)])


@pytest.mark.parametrize("ext", ["vot", "xml"])
def test_votable_round_trips_with_units_and_ucds(analysed, tmp_path, ext):
    st, rows = analysed
    analysis.export(st.path, tmp_path / f"cat.{ext}", block_rows=64)
    t = Table.read(tmp_path / f"cat.{ext}", format="votable")
    ds = Store.open(st.path).dataset()
    assert set(t.colnames) == CATALOG_COLUMNS
    np.testing.assert_array_equal(t["index"], rows)
    assert str(t["ra"].unit) == "deg" and str(t["dec"].unit) == "deg"
    assert str(t["x"].unit) == "pix" and str(t["y"].unit) == "pix"
    assert t["ra"].meta["ucd"] == "pos.eq.ra;meta.main"
    assert t["dec"].meta["ucd"] == "pos.eq.dec;meta.main"
    np.testing.assert_allclose(t["dec"], ds.dec.values[rows])
    np.testing.assert_allclose(t["x"], ds.x.values[rows])
    np.testing.assert_allclose(t["outlier_score"], ds.outlier_score.values[rows], rtol=1e-6)
    np.testing.assert_array_equal(t["label"], LABELS[np.arange(len(rows)) % len(LABELS)])


def test_hats_export_opens_in_lsdb_with_the_valid_rows(analysed, tmp_path):
    import lsdb

    st, rows = analysed
    before = store_digest(st.path)
    # Few rows per partition, so the 300 rows spread over several HEALPix partitions.
    result = analysis.export(
        st.path, tmp_path / "cat.hats", block_rows=64, partition_rows=120, progress=False
    )
    cat = lsdb.open_catalog(tmp_path / "cat.hats")
    assert len(cat.get_healpix_pixels()) > 1
    assert cat.hc_structure.catalog_info.ra_column == "ra"
    df = cat.compute(progress_bar=False).sort_values("index")
    ds = Store.open(st.path).dataset()
    assert result.n_rows == len(df) == len(rows)
    assert set(df.columns) == CATALOG_COLUMNS == set(result.columns)
    np.testing.assert_array_equal(df["index"].to_numpy(), rows)
    np.testing.assert_allclose(df["ra"].to_numpy(), ds.ra.values[rows])
    np.testing.assert_allclose(df["dec"].to_numpy(), ds.dec.values[rows])
    np.testing.assert_array_equal(df["cluster"].to_numpy(), ds.cluster.values[rows])
    np.testing.assert_allclose(df["embedding_0"].to_numpy(), ds.embedding.values[rows, 0])
    np.testing.assert_allclose(df["pca_2"].to_numpy(), ds.pca.values[rows, 2])
    np.testing.assert_array_equal(
        df["label"].to_numpy(str), LABELS[np.arange(len(rows)) % len(LABELS)]
    )
    assert set(df["image"]) == {"img0"}
    # Indexed and partitioned by HEALPix as hats does: _healpix_29 of each row's position,
    # every row in exactly one partition pixel, no partition over the threshold.
    from hats.pixel_math.spatial_index import compute_spatial_index, healpix_to_spatial_index

    index = df.index.to_numpy(np.int64)
    np.testing.assert_array_equal(index, compute_spatial_index(df["ra"], df["dec"]))
    inside = np.zeros(len(df), int)
    for p in cat.get_healpix_pixels():
        lo, hi = healpix_to_spatial_index(p.order, [p.pixel, p.pixel + 1])
        n = int(np.count_nonzero((index >= lo) & (index < hi)))
        assert 0 < n <= 120
        inside += (index >= lo) & (index < hi)
    assert (inside == 1).all()
    assert store_digest(st.path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.hats"]


def test_hats_export_replaces_an_old_catalog_whole(analysed, tmp_path):
    import lsdb

    st, rows = analysed
    out = tmp_path / "cat.hats"
    analysis.export(st.path, out, progress=False)
    analysis.export(st.path, out, pca_components=1, progress=False)
    df = lsdb.open_catalog(out).compute(progress_bar=False)
    assert len(df) == len(rows) and "pca_0" in df.columns and "pca_1" not in df.columns
    with pytest.raises(ConfigError, match="exists"):
        analysis.export(st.path, out, overwrite=False)


def _coords_with_gaps(n: int, missing: np.ndarray) -> dict:
    i = np.arange(n)
    dec = 2.0 + (i // 8) * 16 / 3600
    ra = 150.0 - (i % 8) * 16 / 3600 / np.cos(np.deg2rad(dec))
    ra[missing], dec[missing] = np.nan, np.nan
    return {
        "image": np.full(n, "img0", dtype=object),
        "x": 7.5 + 16.0 * (i % 8),
        "y": 7.5 + 16.0 * (i // 8),
        "width": np.full(n, 16),
        "height": np.full(n, 16),
        "ra": ra,
        "dec": dec,
    }


def test_hats_export_leaves_out_rows_without_sky_coordinates(tmp_path, caplog):
    import lsdb

    n = 90
    missing = np.zeros(n, bool)
    missing[::7] = True  # 13 rows from images without a celestial WCS
    X = np.random.default_rng(4).normal(size=(n, 6))
    st, rows = build_store(tmp_path / "gaps.zarr", X, coords=_coords_with_gaps(n, missing))
    with caplog.at_level(logging.WARNING, logger="pipeline.analysis.hats"):
        result = analysis.export(st.path, tmp_path / "gaps.hats", progress=False)
    assert "13 of 90 valid rows have no sky coordinates" in caplog.text
    df = lsdb.open_catalog(tmp_path / "gaps.hats").compute(progress_bar=False)
    assert result.n_rows == len(df) == 77
    assert sorted(df["index"]) == sorted(rows[~missing])


def test_hats_export_refuses_a_store_without_sky_coordinates(tmp_path, capsys):
    n = 40
    X = np.random.default_rng(5).normal(size=(n, 4))
    st, _ = build_store(tmp_path / "nowcs.zarr", X, coords=_coords_with_gaps(n, np.ones(n, bool)))
    before = store_digest(st.path)
    with pytest.raises(StoreError, match="none of the 40 valid rows has sky coordinates"):
        analysis.export(st.path, tmp_path / "out.hats", progress=False)
    code = main(["export", st.path, "-o", str(tmp_path / "out2"), "--format", "hats"])
    (err,) = error_lines(capsys.readouterr().err)
    assert code == 2 and "sky coordinates" in err
    assert store_digest(st.path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nowcs.zarr"]


def test_command_line_exports_hats_by_format(analysed, tmp_path, capsys):
    import lsdb

    st, rows = analysed
    out = tmp_path / "catalog_dir"
    assert main(["export", st.path, "-o", str(out), "--format", "hats", "--no-progress"]) == 0
    assert f"{out}: {len(rows)} rows" in capsys.readouterr().out
    assert len(lsdb.open_catalog(out).compute(progress_bar=False)) == len(rows)


def test_unknown_extension(analysed, tmp_path):
    st, _ = analysed
    with pytest.raises(
        ConfigError,
        match=r"cat\.xlsx: unknown catalog extension '\.xlsx'; use \.parquet, \.fits, \.ecsv",
    ):
        analysis.export(st.path, tmp_path / "cat.xlsx")
    assert not list(tmp_path.iterdir())


def test_command_line_runs_every_stage(tmp_path, capsys):
    rng = np.random.default_rng(3)
    st, rows = build_store(tmp_path / "cli.zarr", rng.normal(size=(200, 6)), chunk_rows=32)
    path = st.path
    assert main(["reduce", path, "--components", "3", "--scale"]) == 0
    assert "(standardised) on 200 rows" in capsys.readouterr().out
    assert main(["reduce", path, "--components", "3", "--no-scale"]) == 0
    out = capsys.readouterr().out
    assert "3 components" in out and "standardised" not in out
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
        (
            ["export", "{store}", "-o", "{tmp}/cat.fits", "--workers", "2"],
            "only apply to a HATS export",
        ),
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


@pytest.mark.parametrize("seed", range(12))
def test_hats_partitioning_equals_hats_generate_alignment(seed):
    """The sparse partitioning gives hats' own partitions (its dense version loops in Python
    over every pixel of the sky)."""
    import hats.pixel_math.healpix_shim as hp
    from hats.pixel_math import generate_alignment

    from pipeline.analysis.hats import alignment

    rng = np.random.default_rng(seed)
    order = 6
    n = int(rng.integers(100, 3000))
    # Clustered fields plus a sprinkle over the whole sky.
    ra = np.r_[
        rng.normal(rng.uniform(0, 360), rng.uniform(0.5, 20), n) % 360, rng.uniform(0, 360, 50)
    ]
    dec = np.r_[rng.normal(rng.uniform(-60, 60), rng.uniform(0.5, 10), n), rng.uniform(-90, 90, 50)]
    histogram = np.bincount(
        hp.radec2pix(order, ra, np.clip(dec, -89.9, 89.9)), minlength=hp.order2npix(order)
    )
    threshold = int(rng.integers(histogram.max(), 4 * histogram.max() + 10))
    if seed == 0:  # everything fits in one pixel: hats still stops at order 1, not 0
        threshold = int(histogram.sum())
    ref = generate_alignment(
        histogram,
        highest_order=order,
        threshold=threshold,
        drop_empty_siblings=True,
        use_lower_order=True,
    )
    at = hp.npix2order(len(ref))  # hats answers at the order it settled on
    pixels = np.flatnonzero(histogram)
    orders, partition, used = alignment(pixels, histogram[pixels], order, threshold)
    assert used == threshold
    expected = [ref[p >> (2 * (order - at))][:2] for p in pixels]
    assert [(int(o), int(q)) for o, q in zip(orders, partition, strict=True)] == [
        (int(o), int(q)) for o, q in expected
    ]
