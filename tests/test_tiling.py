"""Planning: sliding counts, edge policies, ownership, read boxes, WCS centres."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.catalog import catalog_windows
from pipeline.errors import ConfigError, InputError
from pipeline.geometry import window_radec
from pipeline.tiling import (
    EDGE_POLICIES,
    TILE_DTYPE,
    Plan,
    assign_windows,
    full_window,
    owner_pixels,
    plan_image,
    sliding_count,
    sliding_windows,
    tile_grid,
)

SETTINGS = settings(max_examples=60, deadline=None)


def brute_starts(length: int, size: int, stride: int, edge: str) -> list[int]:
    """The edge policies written out as loops, independently of the closed formula."""
    starts = []
    k = 0
    if edge == "pad":
        while k * stride < length:
            starts.append(k * stride)
            if k * stride + size >= length:
                break
            k += 1
        return starts
    while k * stride + size <= length:
        starts.append(k * stride)
        k += 1
    if edge == "shift" and starts and starts[-1] + size < length:
        starts.append(length - size)
    return starts


def check_plan(plan: Plan, shape, *, expected: np.ndarray, tile_size: int, pad_ok: bool):
    """Invariants every plan keeps, against the windows it was made from."""
    ny, nx = shape
    w = plan.windows
    assert plan.tiles.dtype == TILE_DTYPE
    assert plan.tile_start[0] == 0 and plan.tile_start[-1] == plan.n_windows
    assert np.all(np.diff(plan.tile_start) > 0), "a tile without windows was kept"
    # Union over tiles is the whole set, no duplicates beyond those given.
    got = np.concatenate([plan.tile_windows(t) for t in range(plan.n_tiles)] or [w[:0]])
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    if not pad_ok:
        assert np.all(w[:, 0] >= 0) and np.all(w[:, 1] >= 0)
        assert np.all(w[:, 0] + w[:, 2] <= nx) and np.all(w[:, 1] + w[:, 3] <= ny)
    t = plan.tiles
    assert np.all((t["ty0"] >= 0) & (t["ty1"] <= ny) & (t["tx0"] >= 0) & (t["tx1"] <= nx))
    assert np.all((t["ry0"] >= 0) & (t["ry1"] <= ny) & (t["rx0"] >= 0) & (t["rx1"] <= nx))
    assert np.all(t["ty0"] % tile_size == 0) and np.all(t["tx0"] % tile_size == 0)
    # One owner: the tile whose core holds the (clipped) owner pixel; window in its read box.
    tile_of = plan.window_tiles()
    px, py = owner_pixels(w, shape)
    tw = t[tile_of]
    assert np.all((tw["tx0"] <= px) & (px < tw["tx1"]) & (tw["ty0"] <= py) & (py < tw["ty1"]))
    assert np.all(np.maximum(w[:, 0], 0) >= tw["rx0"])
    assert np.all(np.maximum(w[:, 1], 0) >= tw["ry0"])
    assert np.all(np.minimum(w[:, 0] + w[:, 2], nx) <= tw["rx1"])
    assert np.all(np.minimum(w[:, 1] + w[:, 3], ny) <= tw["ry1"])
    # Distinct tiles, row-major order of windows within each tile.
    keys = t["ty0"] * (nx + 1) + t["tx0"]
    assert np.unique(keys).size == keys.size
    for k in range(plan.n_tiles):
        tw_ = plan.tile_windows(k)
        order = np.lexsort((tw_[:, 0], tw_[:, 1]))
        assert np.array_equal(order, np.arange(len(tw_)))


lengths = st.integers(1, 400)
sizes = st.integers(1, 80)
strides = st.integers(1, 100)
edges = st.sampled_from(EDGE_POLICIES)


@SETTINGS
@given(length=lengths, size=sizes, stride=strides, edge=edges)
def test_sliding_count_follows_the_formula(length, size, stride, edge):
    starts = brute_starts(length, size, stride, edge)
    assert sliding_count(length, size=size, stride=stride, edge=edge) == len(starts)
    if edge == "pad" or length >= size:
        w = sliding_windows((7 + size, length), size=size, stride=stride, edge=edge)
        assert sorted(set(w[:, 0].tolist())) == starts


@SETTINGS
@given(ny=lengths, nx=lengths, size=sizes, stride=strides, edge=edges)
def test_windows_inside_the_image_unless_pad(ny, nx, size, stride, edge):
    if edge != "pad" and (nx < size or ny < size):
        with pytest.raises(InputError, match="smaller than one"):
            sliding_windows((ny, nx), size=size, stride=stride, edge=edge)
        return
    w = sliding_windows((ny, nx), size=size, stride=stride, edge=edge)
    assert w.dtype == np.int64 and w.shape[1] == 4
    assert np.all(w[:, 2:] == size)
    assert len({tuple(r) for r in w.tolist()}) == len(w)
    # Every window starts inside the image; only pad windows reach past it.
    assert np.all((w[:, 0] >= 0) & (w[:, 0] < nx) & (w[:, 1] >= 0) & (w[:, 1] < ny))
    passes = (w[:, 0] + size > nx) | (w[:, 1] + size > ny)
    if edge != "pad":
        assert not passes.any()
    # Row-major order.
    assert np.array_equal(np.lexsort((w[:, 0], w[:, 1])), np.arange(len(w)))


@SETTINGS
@given(ny=lengths, nx=lengths, size=sizes, data=st.data())
def test_shift_covers_every_pixel(ny, nx, size, data):
    size = min(size, nx, ny)
    stride = data.draw(st.integers(1, size))
    w = sliding_windows((ny, nx), size=size, stride=stride, edge="shift")
    covered = np.zeros((ny, nx), dtype=bool)
    for x0, y0, ww, hh in w:
        covered[y0 : y0 + hh, x0 : x0 + ww] = True
    assert covered.all()


@SETTINGS
@given(
    ny=st.integers(1, 300),
    nx=st.integers(1, 300),
    size=st.integers(1, 70),
    stride=st.integers(1, 90),
    edge=edges,
    tile_size=st.integers(1, 130),
)
def test_sliding_plan_owns_every_window_once(ny, nx, size, stride, edge, tile_size):
    if edge != "pad" and (nx < size or ny < size):
        return
    expected = sliding_windows((ny, nx), size=size, stride=stride, edge=edge)
    fast = plan_image(
        (ny, nx), method="sliding", size=size, stride=stride, edge=edge, tile_size=tile_size
    )
    check_plan(fast, (ny, nx), expected=expected, tile_size=tile_size, pad_ok=edge == "pad")
    # The vectorised per-band construction equals the generic sort-based assignment.
    generic = assign_windows(expected, (ny, nx), tile_size=tile_size)
    assert np.array_equal(fast.windows, generic.windows)
    assert np.array_equal(fast.tiles, generic.tiles)
    assert np.array_equal(fast.tile_start, generic.tile_start)


@SETTINGS
@given(
    ny=st.integers(1, 300),
    nx=st.integers(1, 300),
    tile_size=st.integers(1, 130),
    data=st.data(),
)
def test_assign_arbitrary_windows(ny, nx, tile_size, data):
    # Catalog / blob style windows: any size, passing the edges, duplicates allowed.
    n = data.draw(st.integers(0, 40))
    x0 = data.draw(st.lists(st.integers(-60, nx + 10), min_size=n, max_size=n))
    y0 = data.draw(st.lists(st.integers(-60, ny + 10), min_size=n, max_size=n))
    side = data.draw(st.lists(st.integers(1, 70), min_size=n, max_size=n))
    windows = np.array([x0, y0, side, side], dtype=np.int64).T.reshape(-1, 4)
    if n > 3:
        windows[-1] = windows[0]
        windows[-2] = windows[0]
    plan = assign_windows(windows, (ny, nx), tile_size=tile_size, image_index=2, image_id="m")
    check_plan(plan, (ny, nx), expected=windows, tile_size=tile_size, pad_ok=True)
    assert np.array_equal(np.sort(plan.input_index), np.arange(n))
    assert np.array_equal(windows[plan.input_index], plan.windows)
    # Plan order: by tile, then y0, then x0; equal windows keep their input order.
    px, py = owner_pixels(windows, (ny, nx))
    tile = (py // tile_size) * nx + px // tile_size
    assert np.array_equal(plan.input_index, np.lexsort((windows[:, 0], windows[:, 1], tile)))
    assert plan.images == ("", "", "m") and np.all(plan.tiles["image"] == 2)


def test_tiles_without_windows_are_dropped():
    windows = np.array([[10, 10, 5, 5], [300, 10, 5, 5], [12, 8, 5, 5]])
    plan = assign_windows(windows, (400, 400), tile_size=100)
    assert plan.n_tiles == 2 and plan.n_windows == 3
    assert plan.tiles[0]["tx0"] == 0 and plan.tiles[1]["tx0"] == 300
    # Within the first tile, row-major: (12, 8) before (10, 10).
    assert plan.tile_windows(0).tolist() == [[12, 8, 5, 5], [10, 10, 5, 5]]
    assert plan.input_index.tolist() == [2, 0, 1]
    assert (plan.tiles[0]["rx0"], plan.tiles[0]["rx1"]) == (10, 17)
    assert (plan.tiles[0]["ry0"], plan.tiles[0]["ry1"]) == (8, 15)


def test_tile_grid_and_full_window():
    grid = tile_grid((250, 130), tile_size=100)
    assert grid.tolist() == [
        [0, 100, 0, 100],
        [0, 100, 100, 130],
        [100, 200, 0, 100],
        [100, 200, 100, 130],
        [200, 250, 0, 100],
        [200, 250, 100, 130],
    ]
    plan = plan_image((250, 130), method="full", tile_size=100)
    assert plan.windows.tolist() == [[0, 0, 130, 250]] == full_window((250, 130)).tolist()
    # Owner pixel (65, 125) is in tile (100..200, 0..100); it reads the whole image.
    t = plan.tiles[0]
    assert (t["ty0"], t["tx0"], t["ry0"], t["ry1"], t["rx0"], t["rx1"]) == (
        100,
        0,
        0,
        250,
        0,
        130,
    )


def test_small_image_per_policy():
    for edge in ("drop", "shift"):
        with pytest.raises(InputError) as e:
            plan_image(
                (80, 100), image_id="deep.fits", method="sliding", size=128, edge=edge, tile_size=64
            )
        msg = str(e.value)
        assert "\n" not in msg
        assert (
            f"image deep.fits (100x80) is smaller than one 128-pixel cutout under edge policy '{edge}'"
            in msg
        )
    plan = plan_image((80, 100), method="sliding", size=128, edge="pad", tile_size=64)
    assert plan.windows.tolist() == [[0, 0, 128, 128]]
    t = plan.tiles[0]
    assert (t["ry1"], t["rx1"]) == (80, 100)  # read box clipped; the reader pads


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"size": 0}, "cutouts.size"),
        ({"size": -4}, "cutouts.size"),
        ({"size": 16, "stride": 0}, "cutouts.stride"),
        ({"size": 16, "stride": -1}, "cutouts.stride"),
        ({"size": 16.5}, "cutouts.size"),
        ({"size": 16, "edge": "wrap"}, "cutouts.edge"),
        ({"size": 16, "tile_size": 0}, "tiling.tile-size"),
    ],
)
def test_bad_config_is_a_config_error(kwargs, key):
    kwargs = {"method": "sliding", "tile_size": 64, **kwargs}
    with pytest.raises(ConfigError, match=key):
        plan_image((100, 100), **kwargs)


def test_unknown_method():
    with pytest.raises(ConfigError, match="cutouts.method"):
        plan_image((10, 10), method="grid", tile_size=8)


def test_gaps_and_dropped_strip_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.tiling"):
        sliding_windows((100, 100), size=16, stride=20, edge="drop")
    text = caplog.text
    assert "stride 20 > size 16 leaves gaps of 4 pixels" in text
    # Starts 0..80, last window ends at 96: 4 columns and 4 rows uncovered.
    assert "leaves the last 4 column(s) and 4 row(s)" in text


def test_catalog_windows_centres_within_half_a_pixel(rng):
    x = rng.uniform(-5, 105, 500)
    y = rng.uniform(-5, 85, 500)
    sizes = rng.integers(1, 40, 500)
    w, inside = catalog_windows(x, y, sizes, (80, 100))
    cx = w[:, 0] + (w[:, 2] - 1) / 2
    cy = w[:, 1] + (w[:, 3] - 1) / 2
    assert np.all(np.abs(cx - x) <= 0.5) and np.all(np.abs(cy - y) <= 0.5)
    assert np.array_equal(inside, (x >= -0.5) & (x < 99.5) & (y >= -0.5) & (y < 79.5))
    w, inside = catalog_windows([np.nan, 3.0], [1.0, np.inf], 8, (80, 100))
    assert not inside.any()


def celestial_wcs(shape) -> WCS:
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [nx / 2 + 0.3, ny / 2 - 0.7]
    w.wcs.cd = np.array([[-1.1e-4, 2e-6], [3e-6, 1.0e-4]])
    return w


@pytest.mark.parametrize("size", [63, 64])
def test_window_centre_radec_matches_astropy(size):
    shape = (300, 400)
    wcs = celestial_wcs(shape)
    plan = plan_image(shape, method="sliding", size=size, stride=37, edge="pad", tile_size=128)
    ra, dec = window_radec(plan.windows, wcs)
    for (x0, y0, w, h), r, d in zip(plan.windows[::7], ra[::7], dec[::7], strict=True):
        # The centre seen from the cutout's own WCS (astropy slicing shifts CRPIX).
        sub = wcs[y0 : y0 + h, x0 : x0 + w] if x0 + w <= 400 and y0 + h <= 300 else None
        direct = wcs.pixel_to_world(x0 + (w - 1) / 2, y0 + (h - 1) / 2)
        assert abs(direct.ra.deg - r) < 1e-9 and abs(direct.dec.deg - d) < 1e-9
        if sub is not None:
            own = sub.pixel_to_world((w - 1) / 2, (h - 1) / 2)
            assert abs(own.ra.deg - r) < 1e-9 and abs(own.dec.deg - d) < 1e-9
    ra, dec = window_radec(plan.windows, None)
    assert np.all(np.isnan(ra)) and np.all(np.isnan(dec))


def test_concat_plans_of_several_images():
    a = plan_image((100, 100), image_index=0, image_id="a", method="sliding", size=32, tile_size=64)
    b = plan_image((50, 70), image_index=1, image_id="b", method="sliding", size=32, tile_size=64)
    both = Plan.concat([a, b])
    assert both.images == ("a", "b")
    assert both.n_tiles == a.n_tiles + b.n_tiles and both.n_windows == a.n_windows + b.n_windows
    assert np.array_equal(both.tile_windows(a.n_tiles), b.tile_windows(0))
    assert np.array_equal(both.tiles["image"], np.r_[[0] * a.n_tiles, [1] * b.n_tiles])
    with pytest.raises(ValueError, match="image number 0"):
        Plan.concat([a, plan_image((40, 40), image_id="c", method="full", tile_size=64)])
    assert Plan.concat([]).n_tiles == 0
