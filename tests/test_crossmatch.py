"""Cross-matching cutouts with external catalogs: tables (astropy) and HATS catalogs (lsdb).

Every test plants counterparts at known offsets below the radius around chosen cutouts, and
decoys far beyond it, and checks that exactly the planted pairs come back, with their
separations; the bad inputs get one line and write nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from analysis_store import build_store, store_digest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from pipeline import analysis
from pipeline.analysis.crossmatch import match_xyz, unit_xyz
from pipeline.cli import main
from pipeline.errors import CatalogError, ConfigError, StoreError
from pipeline.store import Store
from pipeline.testing import error_lines

RADIUS = 2.0  # arcsec; cutout centres lie 16 arcsec apart


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store of 200 cutouts (PCA, clusters) and a catalog with planted counterparts.

    Returns the store, the catalog Table, the expected pairs {(store index, id): separation}
    and the nearest pair of each matched cutout.
    """
    work = tmp_path_factory.mktemp("xmatch")
    rng = np.random.default_rng(8)
    st, rows = build_store(work / "s.zarr", rng.normal(size=(200, 6)), chunk_rows=32)
    analysis.reduce(st.path, components=3)
    analysis.cluster(st.path, n_clusters=3)
    ds = Store.open(st.path).dataset()
    chosen = np.sort(rng.choice(rows, 25, replace=False))
    centres = SkyCoord(ds.ra.values[chosen] * u.deg, ds.dec.values[chosen] * u.deg)
    seps = rng.uniform(0.2, 1.5, 25)
    pos = centres.directional_offset_by(rng.uniform(0, 360, 25) * u.deg, seps * u.arcsec)
    # A second counterpart, further but still inside the radius, for 8 of them.
    second = rng.choice(25, 8, replace=False)
    seps2 = rng.uniform(1.6, 1.9, 8)
    pos2 = centres[second].directional_offset_by(rng.uniform(0, 360, 8) * u.deg, seps2 * u.arcsec)
    # Decoys: between cutouts (>= 11 arcsec from every centre) and far away on the sky.
    between = SkyCoord(
        (ds.ra.values[rows[:40]] - 8 / 3600 / np.cos(np.radians(2))) * u.deg,
        (ds.dec.values[rows[:40]] + 8 / 3600) * u.deg,
    )
    far = SkyCoord(rng.uniform(0, 100, 20) * u.deg, rng.uniform(-60, 60, 20) * u.deg)
    ra = np.r_[pos.ra.deg, pos2.ra.deg, between.ra.deg, far.ra.deg]
    dec = np.r_[pos.dec.deg, pos2.dec.deg, between.dec.deg, far.dec.deg]
    n = len(ra)
    cat = Table(
        {
            "id": np.arange(1000, 1000 + n),
            "ra": ra,
            "dec": dec,
            "mag": rng.uniform(18, 25, n),
            "name": [f"src{i}" for i in range(n)],
        }
    )
    expected = {(int(chosen[k]), 1000 + k): seps[k] for k in range(25)}
    expected |= {(int(chosen[k]), 1025 + i): seps2[i] for i, k in enumerate(second)}
    nearest = {(int(chosen[k]), 1000 + k): seps[k] for k in range(25)}
    return st, cat, expected, nearest


def _pairs(t) -> dict:
    return {
        (int(i), int(j)): float(d)
        for i, j, d in zip(t["index"], t["id"], t["_dist_arcsec"], strict=True)
    }


def _check(pairs: dict, expected: dict) -> None:
    assert set(pairs) == set(expected)
    for key, sep in expected.items():
        assert pairs[key] == pytest.approx(sep, abs=1e-6)


STORE_COLUMNS = {"index", "image", "x", "y", "width", "height", "ra", "dec", "cluster"}
STORE_COLUMNS |= {"pca_0", "pca_1", "pca_2"}
CATALOG_COLUMNS = {"id", "ra_cat", "dec_cat", "mag", "name", "_dist_arcsec"}


def test_match_xyz_keeps_pairs_within_the_radius():
    left = unit_xyz([10.0, 10.0, 50.0], [0.0, 20.0, 0.0])
    right = unit_xyz([10.0, 10.0 + 1.5 / 3600, 10.0 + 2.5 / 3600, 80.0], [0.0, 0.0, 0.0, 0.0])
    i, j, d = match_xyz(left, right, 2.0)
    assert i.tolist() == [0, 0] and j.tolist() == [0, 1]
    np.testing.assert_allclose(d, [0.0, 1.5], atol=1e-7)
    i, j, d = match_xyz(left, right, 2.0, nearest=True)
    assert i.tolist() == [0] and j.tolist() == [0]


@pytest.mark.parametrize(
    ("ext", "names"),
    [
        ("ecsv", ("ra", "dec")),
        ("fits", ("RA", "DEC")),
        ("csv", ("RAJ2000", "DEJ2000")),
        ("parquet", ("ra_deg", "dec_deg")),
    ],
)
def test_table_crossmatch_returns_exactly_the_planted_pairs(planted, tmp_path, ext, names):
    st, cat, expected, _ = planted
    t = cat.copy()
    t.rename_columns(["ra", "dec"], list(names))
    t.write(tmp_path / f"cat.{ext}")
    result = analysis.crossmatch(st.path, tmp_path / f"cat.{ext}", radius=RADIUS, progress=False)
    _check(_pairs(result), expected)
    renamed = {n if n not in STORE_COLUMNS else f"{n}_cat" for n in names}
    assert (
        set(result.colnames) == STORE_COLUMNS | (CATALOG_COLUMNS - {"ra_cat", "dec_cat"}) | renamed
    )
    assert str(result["ra"].unit) == "deg" and str(result["_dist_arcsec"].unit) == "arcsec"
    # The catalog's values travel with each pair.
    by_id = {int(i): k for k, i in enumerate(cat["id"])}
    for row in result[:5]:
        assert row["name"] == cat["name"][by_id[int(row["id"])]]
    assert list(result["index"]) == sorted(result["index"])


def test_nearest_keeps_the_closest_counterpart(planted, tmp_path, capsys):
    st, cat, expected, nearest = planted
    cat.write(tmp_path / "cat.ecsv")
    result = analysis.crossmatch(st.path, tmp_path / "cat.ecsv", radius=RADIUS, nearest=True)
    _check(_pairs(result), nearest)
    out = tmp_path / "nearest.parquet"
    argv = ["crossmatch", st.path, str(tmp_path / "cat.ecsv"), "--radius", "2", "--nearest"]
    assert main([*argv, "-o", str(out), "--no-progress"]) == 0
    assert f"{out}: {len(nearest)} pairs within 2 arcsec" in capsys.readouterr().out
    back = Table.read(out)
    _check(_pairs(back), nearest)
    assert str(back["ra"].unit) == "deg" and str(back["x"].unit) == "pix"
    # All within the radius from the command line, written as FITS.
    assert main([*argv[:-1], "-o", str(tmp_path / "all.fits"), "--no-progress"]) == 0
    _check(_pairs(Table.read(tmp_path / "all.fits")), expected)


@pytest.fixture(scope="module")
def hats_catalog(planted, tmp_path_factory):
    """The planted catalog as a HATS collection with a margin cache, written by lsdb."""
    import lsdb

    _, cat, _, _ = planted
    path = tmp_path_factory.mktemp("hatscat") / "planted"
    lsdb.from_dataframe(
        cat.to_pandas(),
        catalog_name="planted",
        ra_column="ra",
        dec_column="dec",
        highest_order=9,  # the store straddles two order-9 pixels: matches cross the border
        partition_rows=80,
        margin_threshold=10.0,
    ).write_catalog(path, progress_bar=False)
    return path


def test_hats_crossmatch_returns_exactly_the_planted_pairs(planted, hats_catalog, tmp_path):
    import lsdb

    st, _, expected, nearest = planted
    right = lsdb.open_catalog(hats_catalog)
    assert right.margin is not None and len(right.get_healpix_pixels()) > 2
    result = analysis.crossmatch(st.path, hats_catalog, radius=RADIUS, progress=False)
    assert isinstance(result, lsdb.Catalog)
    df = result.compute(progress_bar=False)
    _check(_pairs(df), expected)
    assert set(df.columns) == STORE_COLUMNS | CATALOG_COLUMNS
    df = analysis.crossmatch(
        st.path, hats_catalog, radius=RADIUS, nearest=True, progress=False
    ).compute(progress_bar=False)
    _check(_pairs(df), nearest)


def test_hats_crossmatch_writes_hats_and_tables(planted, hats_catalog, tmp_path, capsys):
    import lsdb

    st, _, expected, _ = planted
    argv = ["crossmatch", st.path, str(hats_catalog), "--radius", "2", "--no-progress", "-o"]
    assert main([*argv, str(tmp_path / "m.hats")]) == 0
    assert f"{len(expected)} pairs" in capsys.readouterr().out
    _check(_pairs(lsdb.open_catalog(tmp_path / "m.hats").compute(progress_bar=False)), expected)
    assert main([*argv, str(tmp_path / "m.ecsv")]) == 0
    t = Table.read(tmp_path / "m.ecsv")
    _check(_pairs(t), expected)
    assert str(t["dec"].unit) == "deg"
    assert main([*argv, str(tmp_path / "m.vot")]) == 0
    t = Table.read(tmp_path / "m.vot")
    _check(_pairs(t), expected)
    assert t["ra"].meta["ucd"] == "pos.eq.ra;meta.main" and str(t["x"].unit) == "pix"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ecsv", "m.hats", "m.vot"]


def test_table_crossmatch_written_as_hats(planted, tmp_path):
    import lsdb

    st, cat, expected, _ = planted
    cat.write(tmp_path / "cat.fits")
    r = analysis.crossmatch_file(st.path, tmp_path / "cat.fits", tmp_path / "m.hats", radius=RADIUS)
    assert r.n_rows == len(expected)
    df = lsdb.open_catalog(tmp_path / "m.hats").compute(progress_bar=False)
    _check(_pairs(df), expected)


def test_crossmatch_on_a_process_cluster(planted, hats_catalog, tmp_path, client):
    st, cat, expected, _ = planted
    cat.write(tmp_path / "cat.parquet")
    table = analysis.crossmatch(
        st.path, tmp_path / "cat.parquet", radius=RADIUS, client=client, block_rows=64
    )
    _check(_pairs(table), expected)
    analysis.crossmatch_file(
        st.path, hats_catalog, tmp_path / "m.parquet", radius=RADIUS, client=client, progress=False
    )
    _check(_pairs(Table.read(tmp_path / "m.parquet")), expected)


# ----------------------------------------------------------------------------- bad inputs
def _no_wcs_store(path):
    n = 30
    coords = {
        "image": np.full(n, "img0", dtype=object),
        "x": np.arange(n, dtype=float),
        "y": np.zeros(n),
        "width": np.full(n, 16),
        "height": np.full(n, 16),
        "ra": np.full(n, np.nan),
        "dec": np.full(n, np.nan),
    }
    return build_store(path, np.random.default_rng(2).normal(size=(n, 4)), coords=coords)[0]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("radius-zero", "radius must be a positive number of arcseconds, got 0"),
        ("radius-negative", "radius must be a positive number of arcseconds, got -1"),
        ("radius-nan", "radius must be a positive number of arcseconds, got nan"),
        ("xy-only", "no RA/Dec columns (found pixel columns x / y)"),
        ("no-coordinates", "no coordinate columns"),
        ("garbage", "cannot read catalog"),
        ("missing", "no such catalog file"),
        ("not-hats", "not a HATS catalog"),
        ("no-wcs-table", "none of the 30 valid rows has sky coordinates"),
        ("no-wcs-hats", "none of the 30 valid rows has sky coordinates"),
        ("extension", "unknown catalog extension '.txt'"),
        ("margin", "radius 30 arcsec is wider than its margin cache (10 arcsec)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    planted, hats_catalog, tmp_path, capsys, case, words
):
    st, cat, _, _ = planted
    store, catalog, radius, out = st.path, tmp_path / "cat.ecsv", "2", tmp_path / "m.parquet"
    cat.write(catalog)
    if case.startswith("radius"):
        radius = {"radius-zero": "0", "radius-negative": "-1", "radius-nan": "nan"}[case]
    elif case == "xy-only":
        Table({"x": [1.0, 2.0], "y": [3.0, 4.0]}).write(catalog, overwrite=True)
    elif case == "no-coordinates":
        Table({"a": [1.0], "b": [2.0]}).write(catalog, overwrite=True)
    elif case == "garbage":
        catalog = tmp_path / "broken.fits"
        catalog.write_bytes(b"SIMPLE  = T / not really a FITS file")
    elif case == "missing":
        catalog = tmp_path / "nowhere.ecsv"
    elif case == "not-hats":
        catalog = tmp_path / "a_directory"
        catalog.mkdir()
    elif case.startswith("no-wcs"):
        store = _no_wcs_store(tmp_path / "nowcs.zarr").path
        if case == "no-wcs-hats":
            catalog = hats_catalog
    elif case == "extension":
        out = tmp_path / "m.txt"
    elif case == "margin":
        catalog, radius = hats_catalog, "30"  # its margin cache is 10 arcsec wide
    before = store_digest(store)
    inputs = {p.name for p in tmp_path.iterdir()}
    code = main(["crossmatch", store, str(catalog), "--radius", radius, "-o", str(out)])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert store_digest(store) == before
    assert {p.name for p in tmp_path.iterdir()} == inputs


def test_bad_input_raises_elodin_errors_from_the_api(planted, tmp_path):
    st, cat, _, _ = planted
    cat.write(tmp_path / "cat.ecsv")
    with pytest.raises(ConfigError, match="positive"):
        analysis.crossmatch(st.path, tmp_path / "cat.ecsv", radius=-3)
    with pytest.raises(CatalogError, match="no such catalog file"):
        analysis.crossmatch(st.path, tmp_path / "none.fits", radius=1)
    with pytest.raises(StoreError, match="sky coordinates"):
        analysis.crossmatch(
            _no_wcs_store(tmp_path / "w.zarr").path, tmp_path / "cat.ecsv", radius=1
        )
