"""Stretch: intervals against astropy, the Hubble Deep Field contact sheet, NaN policy, bands."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from astropy.visualization import (
    AsinhStretch,
    LogStretch,
    ManualInterval,
    PercentileInterval,
    SqrtStretch,
    ZScaleInterval,
    make_lupton_rgb,
)
from PIL import Image

from pipeline.errors import ConfigError, InputError
from pipeline.preprocess import (
    INTERVALS,
    STRETCHES,
    asinh_stretch,
    check_image_sample,
    image_limits_for,
    interval_limits,
    preprocess_settings,
    stretch_cutouts,
    zscale_limits,
)

CUTOUT = {"scope": "cutout"}


def galaxy_cutouts(rng, n=40, bands=1, size=32):
    """Sky + noise + one exponential blob of random brightness per cutout."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = rng.normal(100.0, 3.0, (n, bands, size, size))
    for i in range(n):
        x, y = rng.uniform(4, size - 4, 2)
        flux = 10 ** rng.uniform(1, 3.5)
        out[i] += flux * np.exp(-np.hypot(xx - x, yy - y) / rng.uniform(1, 4))
    return out.astype(np.float32)


def test_zscale_matches_astropy(rng):
    cut = galaxy_cutouts(rng, n=60, size=64)[:, 0]
    cut[0] = 7.0  # constant
    cut[1, :5] = np.nan  # partly masked: goes through astropy itself
    cut[2, 3, 4] = np.inf
    cut[3] = rng.integers(0, 3, (64, 64))  # few distinct values
    small = rng.normal(0, 1, (5, 3, 3))  # fewer samples than min_npixels
    for planes in (cut, small):
        got = zscale_limits(planes)
        ref = np.array([ZScaleInterval().get_limits(p) for p in planes])
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    assert np.isnan(zscale_limits(np.full((1, 8, 8), np.nan))).all()


def test_percentile_and_minmax_match_numpy(rng):
    planes = rng.normal(0, 1, (30, 17, 13))
    planes[0, :3] = np.nan
    planes[1] = np.nan
    s = preprocess_settings({"interval": "percentile", "percentile": 98.0})
    got = interval_limits(planes, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on the all-NaN row
        ref = np.nanpercentile(planes.reshape(30, -1), [1.0, 99.0], axis=1).T
        mm = np.stack([np.nanmin(planes, axis=(1, 2)), np.nanmax(planes, axis=(1, 2))], 1)
    np.testing.assert_allclose(got, ref, rtol=1e-12, equal_nan=True)
    ok = PercentileInterval(98.0).get_limits(planes[5])
    np.testing.assert_allclose(got[5], ok)
    got = interval_limits(planes, preprocess_settings({"interval": "minmax"}))
    np.testing.assert_allclose(got, mm, equal_nan=True)


@pytest.mark.parametrize(
    "stretch, astro",
    [("asinh", AsinhStretch(a=0.1)), ("sqrt", SqrtStretch()), ("log", LogStretch(a=1000.0))],
)
def test_cutout_scope_is_astropy_interval_plus_stretch(rng, stretch, astro):
    cut = galaxy_cutouts(rng, n=12)
    rgb, frac = stretch_cutouts(cut, config={"interval": "zscale", "stretch": stretch, **CUTOUT})
    for i in range(len(cut)):
        ref = (astro + ZScaleInterval())(cut[i, 0].astype(np.float64))
        for ch in range(3):  # one band replicated
            np.testing.assert_allclose(rgb[i, ch], ref, atol=2e-6)
    assert np.all(frac == 0)


@pytest.mark.parametrize("a", [0.02, 0.1, 1.0, 5.0])
def test_vectorised_asinh_equals_astropy(rng, a):
    """The fast asinh stretch is astropy's AsinhStretch to float32 precision everywhere in
    [0, 1], the tiny values where its series takes over included; NaN stays NaN."""
    v = np.concatenate(
        [
            rng.random(100_000, dtype=np.float32),
            rng.random(10_000, dtype=np.float32) * np.float32(0.02 * a),  # around the switch
            np.array([0.0, 1.0, 1e-30, 0.01 * a, np.nextafter(0.01 * a, 1)], np.float32),
        ]
    )
    ref = AsinhStretch(a=a)(v.astype(np.float64), clip=True)
    got = asinh_stretch(np.append(v, np.float32(np.nan)), a=a)
    assert got.dtype == np.float32 and np.isnan(got[-1])
    np.testing.assert_allclose(got[:-1], ref, atol=1e-6, rtol=5e-5)


def test_output_contract_for_every_option(rng):
    cut = galaxy_cutouts(rng, n=6, bands=3)
    cut[0, 1, :4, :4] = np.nan
    for interval in INTERVALS:
        for stretch in STRETCHES:
            for scope in ("cutout", "image"):
                cfg = {"interval": interval, "stretch": stretch, "scope": scope}
                cfg.update({"vmin": 90.0, "vmax": 400.0} if interval == "fixed" else {})
                lim = image_limits_for(cut.transpose(1, 0, 2, 3).reshape(3, -1), cfg)
                for rgb_mode in ("linear", "lupton"):
                    out, frac = stretch_cutouts(
                        cut, config={**cfg, "rgb": rgb_mode}, image_limits=lim
                    )
                    assert out.dtype == np.float32 and out.flags.c_contiguous
                    assert out.shape == (6, 3, 32, 32) and frac.shape == (6,)
                    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_linear_rgb_stretches_each_band_alone(rng):
    cut = galaxy_cutouts(rng, n=5, bands=3)
    cut[:, 1] *= 10.0
    rgb, _ = stretch_cutouts(cut, config=CUTOUT)
    for b in range(3):
        alone, _ = stretch_cutouts(cut[:, b : b + 1], config=CUTOUT)
        np.testing.assert_array_equal(rgb[:, b], alone[:, 0])


def test_lupton_is_astropys(rng):
    cut = galaxy_cutouts(rng, n=4, bands=3)
    cfg = {"rgb": "lupton", "interval": "percentile", "lupton-q": 8.0, "lupton-stretch": 0.5}
    cfg.update(CUTOUT)
    rgb, _ = stretch_cutouts(cut, config=cfg)
    s = preprocess_settings(cfg)
    for i in range(len(cut)):
        lim = interval_limits(cut[i], s)
        norm = [(cut[i, b] - lim[b, 0]) / (lim[b, 1] - lim[b, 0]) for b in range(3)]
        ref = make_lupton_rgb(
            *norm,
            interval=ManualInterval(vmin=0, vmax=1),
            stretch=0.5,
            Q=8.0,
            output_dtype=np.float64,
        )
        np.testing.assert_allclose(np.moveaxis(rgb[i], 0, -1), ref, atol=1e-5)


def test_masked_fraction_is_exact_and_fill_follows_config(rng):
    cut = galaxy_cutouts(rng, n=3, bands=3)
    cut[0, 0, 0, :10] = np.nan  # 10 pixels, one band
    cut[0, :, 5, :6] = np.inf  # 6 pixels, every band
    cut[0, 2, 5, :3] = np.nan  # overlaps the previous row: no new pixels
    cut[1, 1, 10:20, 10:15] = np.nan  # 50 pixels
    rgb, frac = stretch_cutouts(cut, config=CUTOUT)
    np.testing.assert_array_equal(frac, np.array([16, 50, 0], np.float32) / (32 * 32))
    assert np.all(rgb[0, :, 0, :10] == 0) and np.all(rgb[0, :, 5, :6] == 0)
    rgb, _ = stretch_cutouts(cut, config={"nan-fill": 0.5, **CUTOUT})
    assert np.all(rgb[1, :, 10:20, 10:15] == 0.5)
    assert np.isfinite(rgb).all()


def test_all_nan_cutout_is_zeros_without_warnings(rng):
    cut = galaxy_cutouts(rng, n=3, bands=1)
    cut[1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for interval in ("zscale", "percentile", "minmax"):
            rgb, frac = stretch_cutouts(cut, config={"interval": interval, **CUTOUT})
            assert np.all(rgb[1] == 0) and frac[1] == 1.0 and frac[0] == 0.0
            assert rgb[0].max() > 0.5
        lim = image_limits_for(cut[[0, 2]].reshape(1, -1), {"scope": "image"})
        rgb, frac = stretch_cutouts(cut, config={"scope": "image"}, image_limits=lim)
        assert np.all(rgb[1] == 0) and frac[1] == 1.0


def test_all_nan_image_is_an_input_error():
    sample = np.full((1, 1000), np.nan, np.float32)
    sample[0, :10] = np.inf

    class Src:
        id = "empty.fits"

    with pytest.raises(InputError, match=r"^image empty.fits: every sampled pixel is NaN/inf$"):
        check_image_sample(Src(), sample)
    with pytest.raises(InputError, match="every sampled pixel"):
        image_limits_for(sample, image="empty.fits")


def test_bands_to_channels(rng):
    cut = galaxy_cutouts(rng, n=4, bands=5)
    for b in range(5):
        cut[:, b] += 50.0 * b
    with pytest.raises(
        ConfigError, match=r"image deep.fits has 5 bands: set elodin.preprocess.bands"
    ):
        stretch_cutouts(cut, config=CUTOUT, image="deep.fits")
    with pytest.raises(ConfigError, match=r"image deep.fits has 5 band\(s\) \(0..4\), no band 7"):
        stretch_cutouts(cut, config={"bands": [0, 7, 2], **CUTOUT}, image="deep.fits")
    with pytest.raises(ConfigError, match="expected one or three band indices"):
        stretch_cutouts(cut, config={"bands": [0, 1], **CUTOUT})
    with pytest.raises(ConfigError, match="has 2 bands"):
        stretch_cutouts(cut[:, :2], config=CUTOUT, image="pair.fits")
    picked, _ = stretch_cutouts(cut, config={"bands": [4, 2, 0], **CUTOUT})
    direct, _ = stretch_cutouts(cut[:, [4, 2, 0]], config=CUTOUT)
    np.testing.assert_array_equal(picked, direct)
    one, _ = stretch_cutouts(cut, config={"bands": [3], **CUTOUT})
    assert np.array_equal(one[:, 0], one[:, 1]) and np.array_equal(one[:, 0], one[:, 2])


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"interval": "histeq"}, "preprocess.interval"),
        ({"stretch": "gamma"}, "preprocess.stretch"),
        ({"scope": "tile"}, "preprocess.scope"),
        ({"interval": "fixed"}, "preprocess.vmin / vmax"),
        ({"interval": "fixed", "vmin": 3.0, "vmax": 1.0}, "preprocess.vmin / vmax"),
        ({"nan-fill": "max"}, "preprocess.nan-fill"),
        ({"nan-fill": 2.0}, "preprocess.nan-fill"),
        ({"percentile": 0}, "preprocess.percentile"),
        ({"asinh_a": -1}, "preprocess.asinh-a"),
        ({"percentile": float("nan")}, "preprocess.percentile"),
        ({"asinh-a": float("inf")}, "preprocess.asinh-a"),
        ({"interval": "fixed", "vmin": 0.0, "vmax": float("inf")}, "preprocess.vmax"),
        ({"gamma": 2}, "preprocess.gamma"),
    ],
)
def test_bad_settings_are_config_errors(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        stretch_cutouts(np.zeros((1, 1, 4, 4), np.float32), config=cfg)


def test_image_scope_needs_limits():
    with pytest.raises(ValueError, match="image_limits"):
        stretch_cutouts(np.zeros((1, 1, 4, 4), np.float32), config={"scope": "image"})


# --------------------------------------------------------------------------- the demo data


def contact_sheet(rgb: np.ndarray, path, ncol: int = 16) -> None:
    n, _, s, _ = rgb.shape
    nrow = -(-n // ncol)
    canvas = np.ones((nrow * (s + 2), ncol * (s + 2), 3), np.float32)
    for i, c in enumerate(rgb):
        r, q = divmod(i, ncol)
        canvas[r * (s + 2) : r * (s + 2) + s, q * (s + 2) : q * (s + 2) + s] = np.moveaxis(c, 0, -1)
    Image.fromarray(np.round(canvas * 255).astype(np.uint8)).save(path)


def test_hubble_deep_field_contact_sheet(tmp_path):
    from skimage import data

    hdf = np.moveaxis(data.hubble_deep_field().astype(np.float32), -1, 0)  # (3, 872, 1000)
    size = 64
    starts = [
        (x, y) for y in range(0, 872 - size + 1, size) for x in range(0, 1000 - size + 1, size)
    ]
    cut = np.stack([hdf[:, y : y + size, x : x + size] for x, y in starts])
    cut[5, :, 10:20, 30:40] = np.nan  # a masked patch in one cutout
    limits = image_limits_for(hdf.reshape(3, -1))  # the defaults: scope image, percentile, asinh
    assert preprocess_settings()["scope"] == "image"
    rgb, frac = stretch_cutouts(cut, image_limits=limits)

    contact_sheet(rgb[:128], tmp_path / "hdf-contact-sheet.png")
    shutil.copy(tmp_path / "hdf-contact-sheet.png", "/tmp/elodin-contact-sheet.png")

    assert rgb.dtype == np.float32 and rgb.shape == (len(cut), 3, size, size)
    assert np.isfinite(rgb).all() and rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert frac[5] == 100 / size**2 and np.count_nonzero(frac) == 1
    lum = rgb.mean(axis=1)
    # Dark sky: most pixels of most cutouts are sky.
    assert np.median(lum) < 0.3
    assert np.median(np.median(lum.reshape(len(cut), -1), axis=1)) < 0.3
    # Not clipped to black either: the sky keeps its noise.
    assert np.percentile(lum, 5) > 0.02
    # Bright galaxy cores are high: the cutout holding the image's brightest pixel.
    total = hdf.sum(axis=0)
    by, bx = np.unravel_index(np.argmax(total[: 13 * size, : 15 * size]), (13 * size, 15 * size))
    k = starts.index((bx // size * size, by // size * size))
    assert lum[k].max() > 0.9
    # A galaxy shows structure: the brightest cutout spans a wide range of levels, not a
    # white disc on black.
    levels = np.histogram(lum[k], bins=10, range=(0, 1))[0]
    assert np.count_nonzero(levels) >= 8


def test_image_limits_from_a_real_source(tmp_path, rng):
    from astropy.io import fits

    from pipeline.sources import open_sources, sample_pixels

    data = rng.normal(10.0, 2.0, (3, 120, 90)).astype(np.float32)
    data[1] += 100.0
    fits.PrimaryHDU(data).writeto(tmp_path / "cube.fits")
    src = open_sources([str(tmp_path / "cube.fits")])[0]
    lim = image_limits_for(src)
    assert lim.shape == (3, 2)
    ref = np.percentile(sample_pixels(src), [0.25, 99.75], axis=1).T
    np.testing.assert_allclose(lim, ref, rtol=1e-6)
    fits.PrimaryHDU(np.full((40, 50), np.nan, np.float32)).writeto(tmp_path / "blank.fits")
    blank = open_sources([str(tmp_path / "blank.fits")])[0]
    with pytest.raises(InputError, match=rf"^image {blank.id}: every sampled pixel is NaN/inf$"):
        image_limits_for(blank)
