"""Blob detection per tile: sources on tile borders and corners found exactly once."""

from __future__ import annotations

import warnings

import dask.config
import numpy as np
import pytest
from astropy.io import fits

from pipeline.detect import (
    detect_plan,
    detect_tile,
    detect_windows,
    detection_options,
    detection_tiles,
    shift_inside,
)
from pipeline.errors import ConfigError
from pipeline.sources import ImageSource, open_sources


def fits_source(path, data):
    fits.PrimaryHDU(data).writeto(path)
    return open_sources([str(path)])[0]


@pytest.fixture
def reads(monkeypatch):
    """Every box read through ImageSource.read (a spy: the real reader still runs)."""
    seen = []
    real = ImageSource.read

    def spy(self, y0, y1, x0, x1):
        seen.append((y0, y1, x0, x1))
        return real(self, y0, y1, x0, x1)

    monkeypatch.setattr(ImageSource, "read", spy)
    return seen


def gaussian_field(rng, shape, sources, *, sky=100.0, noise=1.0):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    # A gentle sky gradient (0.2 sigma per background box) exercises the background subtraction.
    img = sky + 0.003 * xx - 0.002 * yy + rng.normal(0.0, noise, shape)
    for x, y, amp, sigma in sources:
        img += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


def border_sources(rng, tile: int, shape):
    """Sources on the tile borders (x = k * tile - 0.5 is the line between two tiles), at the
    corners where four tiles meet, on the first pixel of a tile, and jittered around them."""
    ny, nx = shape
    borders = [k * tile - 0.5 for k in range(1, max(ny, nx) // tile)]
    pos = []
    for b in borders:
        for along in (40.0, *borders, 330.0):
            for d in (0.0, 0.5, float(rng.uniform(-0.6, 0.6))):
                pos += [(b + d, along), (along, b + d)]
    keep = []
    for p in pos:  # inside the image, apart from each other so each is one blob
        if (
            p[0] < nx - 8
            and p[1] < ny - 8
            and all(np.hypot(p[0] - q[0], p[1] - q[1]) > 14 for q in keep)
        ):
            keep.append(p)
    return [(x, y, float(rng.uniform(20, 60)), float(rng.uniform(1.5, 3.0))) for x, y in keep]


@pytest.mark.parametrize("seed", [0, 1])
def test_border_and_corner_sources_found_exactly_once(tmp_path, seed, reads):
    rng = np.random.default_rng(seed)
    shape, tile = (384, 448), 128
    sources = border_sources(rng, tile, shape)
    assert sum(1 for x, y, *_ in sources if (x + 0.5) % tile == 0 and (y + 0.5) % tile == 0) >= 4
    img = gaussian_field(rng, shape, sources)
    src = fits_source(tmp_path / "synthetic.fits", img)
    opts = {"min_size": 16, "max_size": 64}

    plan = detect_plan(src, tile_size=tile, **opts)
    whole = detect_windows(img, **opts)

    assert plan.n_windows == len(whole) == len(sources)
    cx, cy = plan.centres()
    for x, y, *_ in sources:
        assert np.sum(np.hypot(cx - x, cy - y) < 2.0) == 1, (x, y)
    # Same sources as on the whole image: each tiled window has a whole-image twin nearby.
    wx = whole[:, 0] + (whole[:, 2] - 1) / 2
    wy = whole[:, 1] + (whole[:, 3] - 1) / 2
    for x, y in zip(cx, cy, strict=True):
        assert np.min(np.hypot(wx - x, wy - y)) <= 1.5
    # Only tile reads, never the whole image: each read is a detection box (core + halo).
    _, boxes = detection_tiles(shape, tile_size=tile, halo=64)
    assert sorted(reads) == sorted(map(tuple, boxes.tolist()))
    assert all((y1 - y0) * (x1 - x0) < shape[0] * shape[1] for y0, y1, x0, x1 in reads)
    assert plan.images == (src.id,)


def test_tile_claims_are_disjoint_and_inside_their_read_box(tmp_path):
    rng = np.random.default_rng(3)
    shape, tile = (256, 256), 128
    sources = border_sources(rng, tile, shape)
    img = gaussian_field(rng, shape, sources)
    src = fits_source(tmp_path / "s.fits", img)
    cores, reads = detection_tiles(shape, tile_size=tile, halo=64)
    per_tile = [
        detect_tile(src, c, r, min_size=16, max_size=64) for c, r in zip(cores, reads, strict=True)
    ]
    assert sum(len(w) for w in per_tile) == len(sources)
    for w, (ry0, ry1, rx0, rx1) in zip(per_tile, reads, strict=True):
        assert np.all(np.maximum(w[:, 0], 0) >= rx0) and np.all(
            np.minimum(w[:, 0] + w[:, 2], 256) <= rx1
        )
        assert np.all(np.maximum(w[:, 1], 0) >= ry0) and np.all(
            np.minimum(w[:, 1] + w[:, 3], 256) <= ry1
        )


def test_window_is_centred_and_sized_by_extent(rng):
    img = gaussian_field(rng, (200, 200), [(80.3, 120.7, 80.0, 2.5), (150.0, 40.0, 400.0, 6.0)])
    w = detect_windows(img, min_size=8, max_size=200, scale=2.0, deblend=False)
    assert len(w) == 2
    cx = w[:, 0] + (w[:, 2] - 1) / 2
    cy = w[:, 1] + (w[:, 3] - 1) / 2
    order = np.argsort(cx)
    assert abs(cx[order[0]] - 80.3) <= 0.5 + 0.1 and abs(cy[order[0]] - 120.7) <= 0.6
    assert abs(cx[order[1]] - 150.0) <= 0.6 and abs(cy[order[1]] - 40.0) <= 0.6
    assert w[order[1], 2] > w[order[0], 2]  # the wider source gets the larger window
    assert np.all(w[:, 2] == w[:, 3])
    clipped = detect_windows(img, min_size=30, max_size=40, scale=2.0, deblend=False)
    assert np.all((clipped[:, 2] >= 30) & (clipped[:, 2] <= 40))


def test_deblending_splits_a_close_pair(rng):
    pair = [(60.0, 60.0, 60.0, 2.0), (69.0, 60.0, 60.0, 2.0)]
    img = gaussian_field(rng, (128, 128), pair)
    assert len(detect_windows(img, deblend=True, min_size=8)) == 2
    assert len(detect_windows(img, deblend=False, min_size=8)) == 1


def test_nothing_to_detect_is_quiet(rng):
    cases = [
        np.full((64, 64), 5.0, np.float32),
        np.full((64, 64), np.nan, np.float32),
        rng.normal(0, 1, (64, 64)).astype(np.float32),
        np.zeros((3, 3), np.float32),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in cases:
            assert detect_windows(data, nsigma=6.0).shape == (0, 4)


def test_masked_pixels_and_bands(tmp_path, rng):
    img = gaussian_field(rng, (160, 160), [(40.0, 40.0, 50.0, 2.0), (120.0, 110.0, 50.0, 2.0)])
    img[:, 70:90] = np.nan  # a chip gap
    w = detect_windows(img, min_size=8)
    assert len(w) == 2
    cube = np.stack([img, img * 2.0, img + 3.0])
    src = fits_source(tmp_path / "cube.fits", cube)
    assert src.n_bands == 3
    plan = detect_plan(src, tile_size=64, min_size=8, max_size=32)
    assert plan.n_windows == 2


def test_plan_shifts_edge_windows_inside_the_image(tmp_path, rng):
    """The planner the fingerprint stage runs moves windows passing the image edge inward,
    where they fit: a source in a corner is cut from real pixels, not padding."""
    shape = (160, 192)
    corner = [(4.0, 5.0, 80.0, 2.5), (186.0, 154.0, 80.0, 2.5), (96.0, 80.0, 80.0, 2.5)]
    img = gaussian_field(rng, shape, corner)
    src = fits_source(tmp_path / "corner.fits", img)
    opts = {"min_size": 32, "max_size": 32}
    raw = detect_windows(img, **opts)
    assert len(raw) == 3 and (raw[:, :2] < 0).any()  # unshifted, two windows pass the edge
    plan = detect_plan([src], tile_size=64, **opts)
    w = plan.windows
    assert plan.n_windows == 3
    assert np.all(w[:, 0] >= 0) and np.all(w[:, 0] + w[:, 2] <= shape[1])
    assert np.all(w[:, 1] >= 0) and np.all(w[:, 1] + w[:, 3] <= shape[0])
    # The window inside the image stays where detection put it.
    assert {tuple(r) for r in w.tolist()} >= {
        tuple(r)
        for r in raw.tolist()
        if r[0] >= 0 and r[1] >= 0 and r[0] + 32 <= 192 and r[1] + 32 <= 160
    }
    # A window larger than the image along an axis is left to the reader's padding there.
    big = shift_inside(np.array([[-5, -3, 300, 20]]), shape)
    assert big.tolist() == [[-5, 0, 300, 20]]


def test_fingerprint_plans_blobs_with_this_planner(tmp_path, rng):
    """The fingerprint stage's blob plan is this planner's, edge shifting included."""
    import importlib

    fp = importlib.import_module("pipeline.fingerprint")
    img = gaussian_field(rng, (128, 128), [(3.0, 60.0, 80.0, 2.5), (70.0, 70.0, 80.0, 2.5)])
    src = fits_source(tmp_path / "edge.fits", img)
    with dask.config.set({"elodin.cutouts.min-size": 32, "elodin.cutouts.max-size": 32}):
        got = fp._plan_blobs(None, [src], tile_size=64, first_index=0)
        want = detect_plan([src], tile_size=64)
    np.testing.assert_array_equal(got.windows, want.windows)
    assert got.n_windows == 2 and got.windows[:, 0].min() == 0


def test_options_come_from_config_and_are_checked():
    opts = detection_options()
    assert opts == {
        "nsigma": 3.0,
        "npixels": 10,
        "deblend": True,
        "scale": 2.0,
        "min_size": 32,
        "max_size": 128,
    }
    with pytest.raises(ConfigError, match="min-size"):
        detection_options(min_size=64, max_size=32)
