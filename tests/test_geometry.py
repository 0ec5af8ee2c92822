"""The one home of window geometry: the centre convention and its inverse, boxes, cutting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.geometry import (
    clip_boxes,
    cut_windows,
    read_box,
    shift_inside,
    window_centres,
    windows_from_centres,
)


def test_centre_convention_is_astropys_pixel_centre():
    # An odd window's centre is its middle pixel; an even one's the corner between the middle
    # four pixels (x = x0 + (w - 1) / 2).
    x, y = window_centres(np.array([[10, 20, 5, 5], [0, 0, 4, 6], [-3, 7, 1, 2]]))
    np.testing.assert_array_equal(x, [12.0, 1.5, -3.0])
    np.testing.assert_array_equal(y, [22.0, 2.5, 7.5])


@given(
    st.lists(
        st.tuples(
            st.integers(-(10**9), 10**9),
            st.integers(-(10**9), 10**9),
            st.integers(1, 2**16),
            st.integers(1, 2**16),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_windows_come_back_exactly_from_their_stored_centres(rows):
    windows = np.array(rows, dtype=np.int64)
    x, y = window_centres(windows)
    back = windows_from_centres(x, y, windows[:, 2], windows[:, 3])
    np.testing.assert_array_equal(back, windows)


def test_empty_slots_get_a_zero_corner():
    back = windows_from_centres([np.nan], [np.nan], [0], [0])
    np.testing.assert_array_equal(back, [[0, 0, 0, 0]])


def test_read_box_is_the_clipped_bounding_box():
    windows = np.array([[-4, 2, 8, 8], [20, 30, 8, 8]])
    assert read_box(windows, (36, 25)) == (2, 36, 0, 25)
    assert read_box(windows[1:], (100, 100)) == (30, 38, 20, 28)
    np.testing.assert_array_equal(clip_boxes(windows, (36, 25)), [[2, 10, 0, 4], [30, 36, 20, 25]])


def test_shift_inside_moves_only_windows_that_fit():
    windows = np.array([[-3, 5, 8, 8], [95, 97, 8, 8], [-2, -2, 200, 4]])
    out = shift_inside(windows, (100, 100))
    np.testing.assert_array_equal(out, [[0, 5, 8, 8], [92, 92, 8, 8], [-2, 0, 200, 4]])
    np.testing.assert_array_equal(windows[0], [-3, 5, 8, 8])  # the input is not changed


@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_cut_windows_pads_outside_the_image(fill):
    data = np.arange(2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
    box = (0, 6, 0, 7)
    inside = cut_windows(data, box, np.array([[1, 2, 3, 3], [4, 3, 3, 3]]), fill=fill)
    np.testing.assert_array_equal(inside[0], data[:, 2:5, 1:4])
    np.testing.assert_array_equal(inside[1], data[:, 3:6, 4:7])
    edge = cut_windows(data, box, np.array([[-1, 4, 3, 3]]), fill=fill)[0]
    np.testing.assert_array_equal(edge[:, :2, 1:], data[:, 4:6, 0:2])
    assert np.isnan(edge[:, 2, :]).all() if np.isnan(fill) else (edge[:, 2, :] == fill).all()
    assert np.isnan(edge[:, :, 0]).all() if np.isnan(fill) else (edge[:, :, 0] == fill).all()
