"""The fast pixel -> ICRS path (wcslib's ``Wcsprm`` alone) against astropy's full WCS."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Wcsprm

from pipeline.sources._common import (
    _celestial_header,
    _fast_celestial_header,
    _fast_wcsprm,
    _pixel_to_icrs,
    _sky_transform,
)


def _header(**cards) -> fits.Header:
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = 200
    h["NAXIS2"] = 100
    for k, v in {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 359.99,
        "CRVAL2": -30.0,
        "CRPIX1": 100.0,
        "CRPIX2": 50.0,
        "CD1_1": -2e-4,
        "CD1_2": 1e-5,
        "CD2_1": 1e-5,
        "CD2_2": 2e-4,
        **cards,
    }.items():
        h[k] = v
    return h


def _astropy(text: str, x, y):
    sky = WCS(fits.Header.fromstring(text)).celestial.pixel_to_world(x, y).icrs
    return sky.ra.deg, sky.dec.deg


CASES = {
    "icrs": ({"RADESYS": "ICRS"}, True),
    "no radesys (ICRS by default)": ({}, True),
    "sin projection": ({"CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "RADESYS": "ICRS"}, True),
    "fk5 (astropy converts)": ({"RADESYS": "FK5", "EQUINOX": 2000.0}, False),
    "galactic (astropy converts)": ({"CTYPE1": "GLON-TAN", "CTYPE2": "GLAT-TAN"}, False),
    "sip (astropy applies it)": (
        {
            "CTYPE1": "RA---TAN-SIP",
            "CTYPE2": "DEC--TAN-SIP",
            "A_ORDER": 2,
            "B_ORDER": 2,
            "A_2_0": 1e-5,
            "B_0_2": 1e-5,
        },
        False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pixel_to_icrs_equals_astropy(name):
    cards, fast = CASES[name]
    text = _celestial_header(_header(**cards), label=name)
    assert text is not None
    assert isinstance(_fast_wcsprm(text), Wcsprm) is fast
    assert isinstance(_sky_transform(text), Wcsprm) is fast  # the one the workers use
    rng = np.random.default_rng(3)
    x = rng.uniform(-50, 250, size=(7, 5))
    y = rng.uniform(-50, 150, size=(7, 5))
    ra, dec = _pixel_to_icrs(text, x, y)
    want_ra, want_dec = _astropy(text, x, y)
    assert ra.shape == x.shape
    # Same sky positions to well under a micro-arcsecond; RA wrapped into [0, 360).
    np.testing.assert_allclose(dec, want_dec, rtol=0, atol=1e-10)
    dra = (ra - want_ra + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(dra, 0.0, atol=1e-10)
    assert np.all((ra >= 0) & (ra < 360))


def test_image_source_uses_the_same_transform(tmp_path):
    from pipeline.sources import open_sources

    path = tmp_path / "a.fits"
    fits.PrimaryHDU(np.zeros((100, 200), np.float32), header=_header(RADESYS="ICRS")).writeto(path)
    (src,) = open_sources([str(path)])
    ra, dec = src.pixel_to_radec([0.0, 10.5], [3.0, 99.0])
    want_ra, want_dec = _astropy(src.wcs_header, np.array([0.0, 10.5]), np.array([3.0, 99.0]))
    np.testing.assert_allclose(dec, want_dec, atol=1e-10)
    np.testing.assert_allclose((ra - want_ra + 180) % 360 - 180, 0, atol=1e-10)
    assert src.pixel_to_radec([], [])[0].shape == (0,)


@pytest.mark.parametrize(
    "data,cards,plain",
    [
        (np.arange(60 * 40, dtype=">f4").reshape(60, 40), {}, True),
        (np.arange(60 * 40, dtype=">i2").reshape(60, 40), {}, True),
        # astropy scales these on read: no positioned reads
        (np.arange(60 * 40, dtype=">i2").reshape(60, 40), {"BZERO": 32768, "BSCALE": 1}, False),
    ],
)
def test_plain_fits_boxes_are_read_without_astropy(tmp_path, data, cards, plain):
    from pipeline.sources import open_sources

    path = tmp_path / "b.fits"
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)])
    for k, v in cards.items():
        hdul[1].header[k] = v
    hdul.writeto(path)
    (src,) = open_sources([str(path)])
    (part,) = src.parts
    assert (part.plain is not None) is plain
    want = fits.getdata(path, 1).astype(np.float32)
    np.testing.assert_array_equal(src.read(5, 50, 3, 37)[0], want[5:50, 3:37])
    np.testing.assert_array_equal(src.read(0, 60, 0, 40)[0], want)


# Headers as files write them, beside whether wcslib alone may turn them into the stored text.
HEADERS = {
    **{name: (cards, fast) for name, (cards, fast) in CASES.items()},
    "cdelt, crota2": ({"CD1_1": None, "CDELT1": -1e-4, "CDELT2": 1e-4, "CROTA2": 12.0}, True),
    "upper-case units": ({"CUNIT1": "DEG", "CUNIT2": "DEG"}, True),
    "dates, other cards": (
        {"DATE-OBS": "2020-01-01T00:00:00", "MJD-OBS": 58849.0, "OBJECT": "x", "EXPTIME": 3.0},
        True,
    ),
    "ncp (fixed to sin)": ({"CTYPE1": "RA---NCP", "CTYPE2": "DEC--NCP"}, True),
    "zpn with pv": ({"CTYPE1": "RA---ZPN", "CTYPE2": "DEC--ZPN", "PV2_1": 1.0, "PV2_3": 0.2}, True),
    "equinox only (fk5)": ({"EQUINOX": 2000.0}, False),
    "dec, ra axes": ({"CTYPE1": "DEC--TAN", "CTYPE2": "RA---TAN"}, False),
    "no celestial axes": ({"CTYPE1": "X", "CTYPE2": "Y"}, False),
    "distortion names in a value": ({"OBJECT": "DP1 A_ORDER field"}, True),
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_fast_header_is_astropys_text(name):
    """The probe's wcslib path writes exactly the text astropy's WCS would, or steps aside."""
    cards, fast = HEADERS[name]
    h = _header(**{k: v for k, v in cards.items() if v is not None})
    if cards.get("CD1_1", 0) is None:
        for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            del h[k]
    text = _fast_celestial_header(h.tostring().encode("ascii"))
    assert (text is not None) is fast
    if fast:
        assert text == _celestial_header(h, label=name)


def test_probe_builds_no_astropy_wcs_for_a_plain_patch(tmp_path, monkeypatch):
    """Probing a plain RA/Dec patch reads its header block and never builds astropy's WCS
    (about 3 ms a patch); a header wcslib alone cannot take still goes through astropy."""
    from pipeline.sources import clear_caches, open_sources

    built = []
    init = WCS.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(WCS, "__init__", counting)
    plain = tmp_path / "p.fits"
    fits.PrimaryHDU(np.zeros((100, 200), np.float32), header=_header()).writeto(plain)
    (src,) = open_sources([str(plain)])
    assert built == []
    assert src.wcs_header == _celestial_header(_header(), label="p")
    fk5 = tmp_path / "q.fits"
    fits.PrimaryHDU(
        np.zeros((100, 200), np.float32), header=_header(RADESYS="FK5", EQUINOX=2000.0)
    ).writeto(fk5)
    clear_caches()
    (other,) = open_sources([str(fk5)])
    assert built and other.wcs_header is not None


def test_stored_headers_carry_no_padding():
    """What an image record holds: the cards up to END, not the blanks that pad a FITS header
    to 2880 bytes (most of a small WCS's block); astropy and wcslib read it back."""
    for cards in ({}, {"RADESYS": "FK5", "EQUINOX": 2000.0}):  # wcslib's path, astropy's
        text = _celestial_header(_header(**cards), label="x")
        assert len(text) % 80 == 0 and text.endswith("END".ljust(80)) and len(text) < 2880
        assert WCS(fits.Header.fromstring(text)).has_celestial
        assert _sky_transform(text) is not None
