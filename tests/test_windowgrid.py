"""Formula plans (:mod:`pipeline.windowgrid`): the same tiles, counts and windows as the data
plans :func:`pipeline.tiling.plan_image` lists, derived a tile at a time; nothing per window."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError, ImageInputError, InputError
from pipeline.tiling import EDGE_POLICIES, Plan, plan_image
from pipeline.windowgrid import WindowGrid, plan_grid

SETTINGS = settings(max_examples=60, deadline=None)


def reference(shapes, ids, **kw) -> Plan:
    return Plan.concat(
        [plan_image(s, image_index=i, image_id=ids[i], **kw) for i, s in enumerate(shapes)]
    )


@SETTINGS
@given(
    shapes=st.lists(st.tuples(st.integers(1, 260), st.integers(1, 260)), min_size=1, max_size=4),
    same=st.booleans(),
    method=st.sampled_from(["sliding", "sliding", "full"]),
    size=st.integers(1, 70),
    stride=st.integers(1, 90),
    edge=st.sampled_from(EDGE_POLICIES),
    tile_size=st.integers(1, 150),
    data=st.data(),
)
def test_a_formula_plan_is_the_listed_plan(
    shapes, same, method, size, stride, edge, tile_size, data
):
    if same:
        shapes = [shapes[0]] * len(shapes)
    ids = [f"im{i}" for i in range(len(shapes))]
    kw = dict(method=method, size=size, stride=stride, edge=edge, tile_size=tile_size)
    try:
        ref = reference(shapes, ids, **kw)
    except InputError as e:
        with pytest.raises(ImageInputError) as got:
            plan_grid(shapes, image_ids=ids, **kw)
        assert str(got.value) == str(e)  # the first image that does not fit, named alike
        assert ids[got.value.image_index] in str(e)
        return
    plan = plan_grid(shapes, image_ids=ids, **kw)
    assert plan.is_formula and plan.windows is None
    assert plan.images == ref.images
    assert np.array_equal(plan.tiles, ref.tiles)
    assert np.array_equal(plan.tile_start, ref.tile_start)
    assert np.array_equal(plan.all_windows(), ref.windows)
    lo = data.draw(st.integers(0, ref.n_windows))
    hi = data.draw(st.integers(lo, ref.n_windows))
    assert np.array_equal(plan.window_range(lo, hi), ref.windows[lo:hi])
    assert all(
        np.array_equal(plan.tile_windows(t), ref.tile_windows(t)) for t in range(plan.n_tiles)
    )


def test_the_grid_round_trips_through_attrs_and_fixes_the_digest():
    shapes = [(300, 200), (300, 200), (90, 120)]
    plan = plan_grid(shapes, method="sliding", size=32, stride=16, tile_size=64, image_ids="abc")
    back = WindowGrid.from_attrs(plan.grid.to_attrs(), plan.grid.shapes)
    assert back.to_attrs() == plan.grid.to_attrs()
    assert np.array_equal(back.shapes, plan.grid.shapes)
    other = plan_grid(shapes, method="sliding", size=32, stride=8, tile_size=64, image_ids="abc")
    assert (
        plan.digest()
        == plan_grid(
            shapes, method="sliding", size=32, stride=16, tile_size=64, image_ids="abc"
        ).digest()
    )
    assert plan.digest() != other.digest()


def test_the_edge_codes_in_the_digest_do_not_change():
    """Stored plans' digests hold these codes: full frame 0, shift 1, pad 2, drop 3."""
    codes = {
        edge: int(plan_grid([(64, 64)], method="sliding", size=8, edge=edge, tile_size=32).grid.to_array()[3])
        for edge in EDGE_POLICIES
    }  # fmt: skip
    assert codes == {"shift": 1, "pad": 2, "drop": 3}
    assert plan_grid([(64, 64)], method="full", tile_size=32).grid.to_array()[3] == 0


def test_a_survey_of_patches_is_planned_without_a_window_list():
    """10^4 patches of 4096^2 (4 tiles each, 4 x 10^7 windows): the plan holds tiles only."""
    shapes = np.tile([[4096, 4096]], (10_000, 1))
    plan = plan_grid(shapes, method="sliding", size=64, tile_size=2048)
    assert plan.n_tiles == 40_000 and plan.n_windows == 10_000 * 64 * 64
    held = plan.tiles.nbytes + plan.tile_start.nbytes + plan.grid.shapes.nbytes
    assert held < 100 * plan.n_tiles  # bytes per tile, none per window
    last = plan.tile_windows(plan.n_tiles - 1)
    assert last.shape == (1024, 4) and last[-1].tolist() == [4032, 4032, 64, 64]


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="cutouts.size"):
        plan_grid([(10, 10)], method="sliding", size=0, tile_size=8)
    with pytest.raises(ConfigError, match="tiling.tile-size"):
        plan_grid([(10, 10)], method="sliding", size=4, tile_size=-1)
    with pytest.raises(ConfigError, match="no window grid"):
        plan_grid([(10, 10)], method="blobs", tile_size=8)
    with pytest.raises(ImageInputError, match="empty pixel grid") as e:
        plan_grid([(10, 10), (0, 5)], method="full", tile_size=8)
    assert e.value.image_index == 1
    back = pickle.loads(pickle.dumps(e.value))
    assert (str(back), back.image_index) == (str(e.value), 1)


def test_a_formula_plan_is_not_concatenated_with_others():
    a = plan_grid([(10, 10)], method="full", tile_size=8)
    assert Plan.concat([a]) is a
    with pytest.raises(ValueError, match="at once"):
        Plan.concat([a, a])


def test_a_formula_plan_is_saved_as_its_grid_and_maps_images_to_the_same_rows(tmp_path):
    import zarr

    from pipeline.store import pack_units
    from pipeline.store.layout import image_rows
    from pipeline.store.plans import load_plan, save_plan

    shapes = [(300, 200), (70, 90), (300, 200), (40, 40)]
    kw = dict(method="sliding", size=32, stride=24, edge="pad", tile_size=64)
    plan = plan_grid(shapes, image_ids=["a", "b", "c", "d"], **kw)
    listed = reference(shapes, ["a", "b", "c", "d"], **kw)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    save_plan(root, 0, plan)
    assert "windows" not in root["plans"]["0"]  # the grid, not 32 bytes per window
    back = load_plan(root, 0)
    assert back.is_formula and back.images == plan.images and back.digest() == plan.digest()
    assert np.array_equal(back.all_windows(), listed.windows)
    layout = pack_units(plan.tile_start, chunk_rows=16)
    # Rows per image from the tiles' first and last windows, as from every window's row.
    rows = layout.window_rows()
    img = np.repeat(listed.tiles["image"], np.diff(listed.tile_start))
    expected = [[rows[img == i].min(), rows[img == i].max() + 1] for i in range(4)]
    assert image_rows(back, layout).tolist() == expected
