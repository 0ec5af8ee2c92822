"""The demo on the real Hubble Deep Field: its FITS input and approximate WCS, sky positions
in its store, and the query by sky position it shows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.demo import hdf_centre, hubble_deep_field, run_demo
from pipeline.store import Store


@pytest.fixture(scope="module")
def demo(tmp_path_factory, model_cache):
    # The sliding store and PCA only: what the sky-position query needs (the full demo also
    # runs blobs and every later stage).
    out = tmp_path_factory.mktemp("demo")
    lines = list(run_demo(out, workers=1, methods=("sliding",), stages=("reduce",)))
    return out, lines


def test_demo_input_is_a_fits_cube_right_way_up_on_the_sky(tmp_path):
    import skimage.data
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    path = hubble_deep_field(tmp_path)
    assert path.suffix == ".fits"
    with fits.open(path) as hdul:
        data, w = hdul[0].data, WCS(hdul[0].header).celestial
    rgb = skimage.data.hubble_deep_field()  # (872, 1000, 3), top row first
    assert data.shape == (3, 872, 1000)
    # FITS rows go up: the PNG's top row is the FITS file's last.
    np.testing.assert_array_equal(data[:, -1], rgb[0].T)
    np.testing.assert_array_equal(data[:, 0], rgb[-1].T)
    field = SkyCoord("12h36m49.4s", "+62d12m58s", frame="icrs")
    centre = w.pixel_to_world((1000 - 1) / 2, (872 - 1) / 2)
    assert centre.separation(field).arcsec < 0.01
    np.testing.assert_allclose(proj_plane_pixel_scales(w) * 3600, 0.04, rtol=1e-9)
    # North up (Dec grows towards the PNG's top), East left (RA grows towards x = 0).
    top, bottom = w.pixel_to_world(499.5, 871), w.pixel_to_world(499.5, 0)
    left, right = w.pixel_to_world(0, 435.5), w.pixel_to_world(999, 435.5)
    assert top.dec > centre.dec > bottom.dec
    assert left.ra > centre.ra > right.ra


def test_demo_store_has_sky_positions_near_the_field(demo):
    from astropy.coordinates import SkyCoord

    out, _ = demo
    ds = Store.open(out / "hdf-sliding.zarr").dataset()
    valid = ds.valid.values
    assert valid.sum() == 224
    ra, dec = ds.ra.values[valid], ds.dec.values[valid]
    assert np.isfinite(ra).all() and np.isfinite(dec).all()
    sep = SkyCoord(ra, dec, unit="deg").separation(SkyCoord(*hdf_centre(), unit="deg"))
    # 1000 x 872 pixels of 0.04": every window centre within the half-diagonal (26.5").
    assert sep.arcsec.max() < 26.6 and sep.arcsec.min() < 2


def test_demo_shows_a_query_by_sky_position(demo):
    out, lines = demo
    ra, dec = hdf_centre()
    shown = [x for x in lines if "--radec" in x]
    assert shown == [f"  elodin similar {out / 'hdf-sliding.zarr'} --radec {ra:.5f} {dec:.5f} -n 5"]
    at = lines.index(shown[0])
    assert "arcsec from the position" in lines[at + 1]
    assert len(lines[at + 3 : at + 8]) == 5 and lines[at + 3].split()[0] == "1"


def test_cli_similar_radec_on_the_demo_store(demo, capsys):
    from pipeline.cli import main

    out, _ = demo
    ra, dec = hdf_centre()
    code = main(["similar", str(out / "hdf-sliding.zarr"), "--radec", str(ra), str(dec), "-n", "3"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"query: RA {ra} Dec {dec} (l2)")
    assert len([x for x in text.splitlines() if x.split() and x.split()[0] in "123"]) == 3


def test_demo_blobs_store_fingerprints_every_detected_source(tmp_path, model_cache):
    """The demo's blob run: windows sized to their sources, many sizes a work unit (a batch
    filled across tiles once mixed sizes and failed here; the suite never ran blobs whole)."""
    lines = list(run_demo(tmp_path, workers=1, methods=("blobs",), stages=()))
    st = Store.open(tmp_path / "hdf-blobs.zarr")
    assert any(line.startswith("blobs:") for line in lines)
    valid = st.array("valid")[...]
    assert valid.sum() > 100 and np.isfinite(st.array("fingerprint")[...][valid]).all()
    sizes = st.array("width")[...][valid]
    assert len(np.unique(sizes)) > 3  # windows of many sizes went through
