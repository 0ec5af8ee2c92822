"""Catalog cutouts: formats, RA/Dec through the WCS, x/y, outside rows, bad input, astrocut."""

from __future__ import annotations

import logging

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.catalog import catalog_to_windows, catalog_windows, plan_catalog, read_catalog
from pipeline.errors import CatalogError
from pipeline.sources import open_sources

SHAPE = (200, 300)  # ny, nx


def tan_wcs(crval=(150.1, 2.2), crpix=(151.3, 99.6), scale=0.2 / 3600) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)  # 1-based FITS convention
    rot = np.radians(12.0)
    w.wcs.cd = scale * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    return w


def write_image(path, wcs: WCS | None, *, seed=0, shape=SHAPE):
    data = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    header = wcs.to_header() if wcs is not None else None
    fits.PrimaryHDU(data, header=header).writeto(path)
    return str(path)


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "field.fits", tan_wcs())


def sky_positions(rng, wcs: WCS, n: int, margin=-0.4):
    """RA/Dec of random pixel positions inside the image (margin < 0: up to the edges)."""
    x = rng.uniform(-margin - 0.5 + 0.01, SHAPE[1] - 0.5 + margin, n)
    y = rng.uniform(-margin - 0.5 + 0.01, SHAPE[0] - 0.5 + margin, n)
    sky = wcs.pixel_to_world(x, y)
    return sky.ra.deg, sky.dec.deg


def centres(plan):
    w = plan.windows
    return w[:, 0] + (w[:, 2] - 1) / 2, w[:, 1] + (w[:, 3] - 1) / 2


@pytest.mark.parametrize("ext", ["csv", "ecsv", "fits", "parquet"])
def test_radec_rows_land_within_half_a_pixel(tmp_path, image, rng, ext):
    wcs = WCS(fits.getheader(image))
    ra, dec = sky_positions(rng, wcs, 300)
    path = tmp_path / f"cat.{ext}"
    Table({"ID": np.arange(300), "RA": ra, "DEC": dec}).write(path)
    table = read_catalog(path)
    assert table.meta["elodin"]["kind"] == "radec"
    src = open_sources([image])
    plans, report = catalog_to_windows(table, src, size=33, tile_size=64)
    assert report.n_placed == 300 and report.n_outside == 0
    plan = plans[0]
    rows = plan.input_index
    assert np.array_equal(np.sort(rows), np.arange(300))
    x_ref, y_ref = wcs.world_to_pixel(SkyCoord(ra[rows] * u.deg, dec[rows] * u.deg))
    cx, cy = centres(plan)
    assert np.all(np.abs(cx - x_ref) <= 0.5 + 1e-9) and np.all(np.abs(cy - y_ref) <= 0.5 + 1e-9)
    # Even sizes: centre on the pixel corner nearest the position.
    plan = catalog_to_windows(table, src, size=32, tile_size=64)[0][0]
    x_ref, y_ref = wcs.world_to_pixel(
        SkyCoord(ra[plan.input_index] * u.deg, dec[plan.input_index] * u.deg)
    )
    cx, cy = centres(plan)
    assert np.all(np.abs(cx - x_ref) <= 0.5 + 1e-9) and np.all(np.abs(cy - y_ref) <= 0.5 + 1e-9)


def test_xy_catalog_single_and_several_images(tmp_path, image, rng):
    x = rng.uniform(0, 299, 50)
    y = rng.uniform(0, 199, 50)
    path = tmp_path / "xy.csv"
    Table({"X_IMAGE": x, "Y_IMAGE": y}).write(path)
    src = open_sources([image])
    plans, report = catalog_to_windows(read_catalog(path), src, size=16, tile_size=64)
    assert report.n_placed == 50
    cx, cy = centres(plans[0])
    rows = plans[0].input_index
    assert np.all(np.abs(cx - x[rows]) <= 0.5) and np.all(np.abs(cy - y[rows]) <= 0.5)

    other = write_image(tmp_path / "other.fits", None, seed=1)
    both = open_sources([image, other])
    with pytest.raises(
        CatalogError, match=r"xy.csv: an x/y catalog over 2 images needs an 'image' column"
    ):
        catalog_to_windows(read_catalog(path), both, size=16, tile_size=64)
    named = tmp_path / "xy_named.csv"
    which = np.where(np.arange(50) % 2 == 0, "field.fits", "other")
    Table({"x": x, "y": y, "IMAGE": which}).write(named)
    plans, report = catalog_to_windows(read_catalog(named), both, size=16, tile_size=64)
    assert report.placed == {both[0].id: 25, both[1].id: 25}
    assert np.all(plans[0].input_index % 2 == 0) and np.all(plans[1].input_index % 2 == 1)
    assert all(np.all(p.tiles["image"] == i) for i, p in enumerate(plans))


def test_outside_rows_are_reported_not_dropped(tmp_path, image, rng, caplog):
    wcs = WCS(fits.getheader(image))
    ra, dec = sky_positions(rng, wcs, 20)
    ra[[3, 7]] += 1.0  # a degree away: off the 60" image
    ra[11] = (ra[11] + 180.0) % 360  # far side of the sky: the TAN projection folds it back in
    dec[11] = -dec[11]
    path = tmp_path / "cat.csv"
    Table({"ra": ra, "dec": dec}).write(path)
    with caplog.at_level(logging.WARNING, logger="pipeline.catalog"):
        plans, report = catalog_to_windows(
            read_catalog(path), open_sources([image]), size=8, tile_size=64
        )
    assert report.outside_rows.tolist() == [3, 7, 11]
    assert report.n_placed == 17 and plans[0].n_windows == 17
    assert "cat.csv: 3 of 20 rows fall outside every input image (rows 3, 7, 11)" in caplog.text
    # Nothing at all on the images: an error, not an empty run.
    Table({"ra": ra[[3, 7]], "dec": dec[[3, 7]]}).write(tmp_path / "off.csv")
    with pytest.raises(CatalogError, match="off.csv: none of the 2 rows falls on any input image"):
        catalog_to_windows(read_catalog(tmp_path / "off.csv"), open_sources([image]), size=8)


def test_overlapping_images_first_one_wins(tmp_path, rng):
    a = write_image(tmp_path / "a.fits", tan_wcs())
    b = write_image(tmp_path / "b.fits", tan_wcs(crpix=(101.3, 99.6)), seed=2)  # 50 px shift
    ra, dec = sky_positions(rng, tan_wcs(), 100)
    Table({"ra": ra, "dec": dec}).write(tmp_path / "cat.ecsv")
    src = open_sources([a, b])
    _, report = catalog_to_windows(read_catalog(tmp_path / "cat.ecsv"), src, size=8, tile_size=64)
    assert report.placed[src[0].id] == 100 and report.placed[src[1].id] == 0
    plan = plan_catalog(tmp_path / "cat.ecsv", src[::-1], size=8, tile_size=64)
    in_b = WCS(fits.getheader(b)).footprint_contains(SkyCoord(ra * u.deg, dec * u.deg))
    assert plan.images == (src[1].id, src[0].id)
    assert np.sum(plan.tiles["image"] == 0) > 0
    counts = np.bincount(plan.window_tiles(), minlength=plan.n_tiles)
    per_image = np.bincount(plan.tiles["image"], weights=counts)
    assert per_image.tolist() == [in_b.sum(), 100 - in_b.sum()]


def test_size_column_in_pixels_and_arcsec(tmp_path, image, rng):
    wcs = WCS(fits.getheader(image))
    ra, dec = sky_positions(rng, wcs, 10, margin=20)
    t = Table({"ra": ra, "dec": dec, "size": np.arange(10) + 5})
    t.write(tmp_path / "pix.csv")
    plan = catalog_to_windows(
        read_catalog(tmp_path / "pix.csv", config={"size-column": "SIZE"}), open_sources([image])
    )[0][0]
    assert np.array_equal(plan.windows[:, 2], plan.input_index + 5)
    # 0.2"/pixel: 4" is 20 pixels, whether the unit is on the column or in its name.
    t = Table({"ra": ra, "dec": dec, "diam": np.full(10, 4.0) * u.arcsec})
    t.write(tmp_path / "unit.ecsv")
    plan = catalog_to_windows(
        read_catalog(tmp_path / "unit.ecsv", config={"size_column": "diam"}), open_sources([image])
    )[0][0]
    assert np.all(plan.windows[:, 2] == 20)
    Table({"ra": ra, "dec": dec, "fov_arcsec": np.full(10, 2.0)}).write(tmp_path / "name.csv")
    plan = catalog_to_windows(
        read_catalog(tmp_path / "name.csv", config={"size-column": "fov_arcsec"}),
        open_sources([image]),
    )[0][0]
    assert np.all(plan.windows[:, 2] == 10) and np.all(plan.windows[:, 3] == 10)


# --------------------------------------------------------------------------- bad input


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_no_coordinate_columns_lists_what_was_found(tmp_path):
    Table({"id": [1, 2], "flux": [3.0, 4.0]}).write(tmp_path / "c.csv")
    with pytest.raises(CatalogError) as e:
        read_catalog(tmp_path / "c.csv")
    msg = one_line(e)
    assert msg.startswith(f"{tmp_path / 'c.csv'}: no coordinate columns")
    assert "found id, flux" in msg and "raj2000" in msg and "x_image" in msg
    Table({"RA": [1.0], "mag": [3.0]}).write(tmp_path / "half.csv")
    with pytest.raises(CatalogError, match=r"half.csv: has a ra column 'RA' but no dec column"):
        read_catalog(tmp_path / "half.csv")


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("size", "9.2e18", "9.2e+18 pixels"),  # once cast to int64: a negative side
        ("size", "1e300", "1e+300 pixels"),
        ("size", "65537", "65537 pixels"),
        ("size_arcsec", "1e300", "1e+300 arcsec (5e+300 pixels on image field)"),
    ],
)
def test_absurd_sizes_name_the_file_row_and_column(tmp_path, image, column, value, shown):
    """A size past the largest cutout side is one CatalogError line, never an int64 cast
    that wraps around (a negative side: a bare ValueError from the planner)."""
    path = tmp_path / "sizes.csv"
    path.write_text(f"x,y,{column}\n10,10,20\n20,20,{value}\n")
    table = read_catalog(path, config={"size-column": column})
    with pytest.raises(CatalogError) as e:
        catalog_to_windows(table, open_sources([image]), tile_size=64)
    assert one_line(e) == (
        f"{path}: row 1: size column '{column}' is {shown}, more than the largest cutout side "
        "(65536 pixels)"
    )


def test_the_largest_cutout_side_is_accepted(tmp_path, image):
    path = tmp_path / "sizes.csv"
    path.write_text("x,y,size\n10,10,65536\n")
    plans, _ = catalog_to_windows(
        read_catalog(path, config={"size-column": "size"}), open_sources([image]), tile_size=64
    )
    assert plans[0].windows[:, 2:].tolist() == [[65536, 65536]]


@settings(max_examples=60)
@given(size=st.floats(min_value=1e-300, allow_infinity=False, allow_nan=False))
@example(size=9.2e18)
@example(size=2.0**63)
@example(size=65536.5)
def test_any_positive_size_is_placed_or_refused_with_one_line(tmp_path_factory, size):
    from pipeline.tiling import MAX_WINDOW_SIDE

    tmp = tmp_path_factory.mktemp("size")
    img = write_image(tmp / "field.fits", None, shape=(32, 32))
    path = tmp / "c.csv"
    path.write_text(f"x,y,size\n10,10,{size!r}\n")
    table = read_catalog(path, config={"size-column": "size"})
    try:
        plans, _ = catalog_to_windows(table, open_sources([img]), tile_size=16)
    except CatalogError as e:
        assert "\n" not in str(e) and "row 0: size column 'size'" in str(e)
        assert round(size) > MAX_WINDOW_SIDE
        return
    assert plans[0].windows[0, 2] == max(1, round(size)) <= MAX_WINDOW_SIDE


def test_nan_and_text_coordinates_name_the_row(tmp_path):
    (tmp_path / "nan.csv").write_text("ra,dec\n150.1,2.2\n150.2,nan\n150.3,2.3\n")
    with pytest.raises(CatalogError) as e:
        read_catalog(tmp_path / "nan.csv")
    assert one_line(e) == f"{tmp_path / 'nan.csv'}: row 1: column 'dec' is NaN"
    (tmp_path / "text.csv").write_text("ra,dec\n150.1,2.2\n150.2,2.4\nhello,2.3\n")
    with pytest.raises(CatalogError) as e:
        read_catalog(tmp_path / "text.csv")
    assert one_line(e) == f"{tmp_path / 'text.csv'}: row 2: column 'ra' is not a number ('hello')"
    (tmp_path / "empty.csv").write_text("x,y\n1,2\n3,\n")
    with pytest.raises(CatalogError, match=r"empty.csv: row 1: column 'y' is empty"):
        read_catalog(tmp_path / "empty.csv")
    t = Table({"ra": [150.1, np.nan], "dec": [2.2, 2.3]})
    t.write(tmp_path / "nan.fits")
    with pytest.raises(CatalogError, match=r"nan.fits: row 1: column 'ra' is NaN$"):
        read_catalog(tmp_path / "nan.fits")


def test_unreadable_missing_and_unsupported_files(tmp_path):
    (tmp_path / "broken.fits").write_bytes(b"this is not a FITS file at all" * 10)
    with pytest.raises(CatalogError) as e:
        read_catalog(tmp_path / "broken.fits")
    assert one_line(e).startswith(f"{tmp_path / 'broken.fits'}: cannot read catalog (")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(CatalogError, match=r"broken.parquet: cannot read catalog"):
        read_catalog(tmp_path / "broken.parquet")
    with pytest.raises(CatalogError, match=r"missing.csv: no such catalog file"):
        read_catalog(tmp_path / "missing.csv")
    (tmp_path / "cat.txt").write_text("ra dec\n1 2\n")
    with pytest.raises(CatalogError) as e:
        read_catalog(tmp_path / "cat.txt")
    assert one_line(e) == (
        f"{tmp_path / 'cat.txt'}: unsupported catalog format '.txt' (use .fits, .csv, .ecsv or .parquet)"
    )


def test_radec_catalog_with_an_image_without_wcs(tmp_path, image):
    plain = write_image(tmp_path / "plain.fits", None)
    Table({"ra": [150.1], "dec": [2.2]}).write(tmp_path / "c.csv")
    with pytest.raises(CatalogError) as e:
        catalog_to_windows(read_catalog(tmp_path / "c.csv"), open_sources([image, plain]), size=8)
    msg = one_line(e)
    assert msg.startswith(f"{tmp_path / 'c.csv'}: RA/Dec catalog, but image plain")
    assert "plain.fits" in msg and "has no celestial WCS" in msg


# --------------------------------------------------------------------------- astrocut


def test_cutouts_equal_astrocut(tmp_path, rng):
    """Peer check: our catalog cutouts against astrocut's FITSCutout, same file, same sizes.

    Convention difference (also in docs/ARCHITECTURE.md): we start a window of side w at
    floor(x - (w - 1) / 2 + 0.5), so its centre is within half a pixel of the position; astrocut
    1.4 starts it at round(x - w / 2) (numpy's half-to-even), which puts the centre in [x - 1, x].
    The two agree when frac(x - w / 2) > 0.5; otherwise astrocut's box is one pixel lower. The
    test cuts both everywhere, checks equal pixels where the conventions agree and the one-pixel
    shift (ours the nearer) where they do not.
    """
    from astrocut import FITSCutout

    wcs = tan_wcs()
    path = write_image(tmp_path / "field.fits", wcs, seed=5)
    data = fits.getdata(path).astype(np.float32)
    src = open_sources([path])[0]
    xs = rng.uniform(-0.45, SHAPE[1] - 0.55, 24)
    ys = rng.uniform(-0.45, SHAPE[0] - 0.55, 24)
    xs[:4] = [0.2, 299.1, 150.7, 3.9]  # near the edges: both pad with NaN
    ys[:4] = [0.3, 198.9, 2.2, 150.4]
    sky = wcs.pixel_to_world(xs, ys)
    agree = 0
    for size in (15, 16):
        Table({"ra": sky.ra.deg, "dec": sky.dec.deg}).write(tmp_path / f"c{size}.csv")
        plan = plan_catalog(tmp_path / f"c{size}.csv", [src], size=size, tile_size=64)
        for (x0, y0, w, h), row in zip(plan.windows, plan.input_index, strict=True):
            ours = padded_read(src, x0, y0, w, h)
            theirs = FITSCutout([path], sky[row], cutout_size=size, fill_value=np.nan)
            theirs = next(iter(theirs.cutouts_by_file.values()))[0].data
            assert theirs.shape == ours.shape == (size, size)
            xp, yp = wcs.world_to_pixel(sky[row])
            ax0, ay0 = (int(np.round(v - size / 2)) for v in (xp, yp))
            for mine, theirs0, p in ((x0, ax0, xp), (y0, ay0, yp)):
                assert mine - theirs0 in (0, 1)
                assert abs(mine + (size - 1) / 2 - p) <= 0.5 + 1e-9
            if (x0, y0) == (ax0, ay0):
                agree += 1
                np.testing.assert_array_equal(ours, theirs)
            # Astrocut's pixels are the image's at its own box: same reader, same values.
            np.testing.assert_array_equal(theirs, padded_array(data, ax0, ay0, size, size))
    assert agree >= 5


def padded_array(data, x0, y0, w, h, fill=np.nan):
    out = np.full((h, w), fill, dtype=np.float32)
    ny, nx = data.shape
    ys, ye, xs, xe = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    if ys < ye and xs < xe:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = data[ys:ye, xs:xe]
    return out


def padded_read(src, x0, y0, w, h, fill=np.nan):
    ny, nx = src.shape
    out = np.full((h, w), fill, dtype=np.float32)
    ys, ye, xs, xe = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    out[ys - y0 : ye - y0, xs - x0 : xe - x0] = src.read(ys, ye, xs, xe)[0]
    return out


def place_one_by_one(table, sources, size: int) -> dict[str, list[int]]:
    """Reference: every image in turn offered every row not yet placed (the rows' first image)."""

    free = np.ones(len(table), bool)
    out = {}
    for s in sources:
        rows = np.flatnonzero(free)
        x, y = s.radec_to_pixel(np.asarray(table["ra"])[rows], np.asarray(table["dec"])[rows])
        _, inside = catalog_windows(x, y, size, s.shape)
        free[rows[inside]] = False
        out[s.id] = sorted(rows[inside].tolist())
    return out


def test_rows_go_to_their_first_image_when_images_are_offered_only_nearby_rows(tmp_path, rng):
    """Many overlapping and separate images, rows near, on and far from them: the same rows per
    image as offering every image every free row."""
    paths = [
        write_image(tmp_path / f"f{i}.fits", tan_wcs(crval=(150.1 + 0.01 * (i % 4), 2.2 + 0.012 * (i // 4))), seed=i)
        for i in range(8)
    ]  # fmt: skip
    src = open_sources(paths)
    ra = np.r_[rng.uniform(150.09, 150.14, 3000), rng.uniform(0, 360, 200)]
    dec = np.r_[rng.uniform(2.19, 2.24, 3000), rng.uniform(-90, 90, 200)]
    Table({"ra": ra, "dec": dec}).write(tmp_path / "cat.ecsv")
    table = read_catalog(tmp_path / "cat.ecsv")
    plans, report = catalog_to_windows(table, src, size=9, tile_size=64)
    expected = place_one_by_one(table, src, 9)
    assert {
        s.id: sorted(p.input_index.tolist()) for s, p in zip(src, plans, strict=True)
    } == expected
    assert report.n_placed == sum(len(v) for v in expected.values()) > 500


def test_footprints_are_computed_once_not_once_per_block(tmp_path, rng, monkeypatch):
    """Each image's footprint is several WCS projections: a catalog of many blocks computes
    it once, and places the same rows as one block does."""
    import pipeline.catalog as catalog

    paths = [
        write_image(tmp_path / f"f{i}.fits", tan_wcs(crval=(150.1 + 0.02 * i, 2.2)), seed=i)
        for i in range(3)
    ]
    src = open_sources(paths)
    table = Table({"ra": rng.uniform(150.08, 150.18, 500), "dec": rng.uniform(2.18, 2.22, 500)})
    whole, _ = catalog_to_windows(table, src, size=9, tile_size=64)
    calls = []
    real = catalog._footprints

    def counting(sources):
        calls.append(len(sources))
        return real(sources)

    monkeypatch.setattr(catalog, "_footprints", counting)
    monkeypatch.setattr(catalog, "_BLOCK_ROWS", 64)  # 8 blocks
    blocks, _ = catalog_to_windows(table, src, size=9, tile_size=64)
    assert calls == [3]
    assert [p.input_index.tolist() for p in blocks] == [p.input_index.tolist() for p in whole]
    assert sum(p.input_index.size for p in blocks) > 50


def test_a_catalog_of_a_million_rows_is_placed_in_bounded_memory(tmp_path, rng, monkeypatch):
    """10^6 rows over 16 small images, most rows on no image: each image projects only the
    rows near it, and the placement's memory is a few arrays of a block, not rows x images."""
    import tracemalloc

    from pipeline.sources.source import ImageSource

    paths = [
        write_image(tmp_path / f"f{i}.fits", tan_wcs(crval=(150.0 + 0.05 * (i % 4), 2.0 + 0.05 * (i // 4))), seed=i)
        for i in range(16)
    ]  # fmt: skip
    src = open_sources(paths)
    n = 10**6
    table = Table({"ra": rng.uniform(149.9, 150.3, n), "dec": rng.uniform(1.9, 2.3, n)})
    projected = []
    real = ImageSource.radec_to_pixel

    def counting(self, ra, dec):
        projected.append(np.size(ra))
        return real(self, ra, dec)

    monkeypatch.setattr(ImageSource, "radec_to_pixel", counting)
    tracemalloc.start()
    _, report = catalog_to_windows(table, src, size=16, tile_size=128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0 < report.n_placed < n // 10
    assert sum(projected) < 3 * report.n_placed  # not 16 x 10^6
    assert peak < 200 * 2**20
