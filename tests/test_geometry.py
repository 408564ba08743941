"""Coordinate bookkeeping: original pixels <-> model-input pixels <-> feature cells."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid


def grid(original=(4032, 3024), input_size=(1066, 800), stride=32):
    w_in, h_in = input_size
    shape = (math.ceil(h_in / stride), math.ceil(w_in / stride))
    return FeatureGrid(original, input_size, shape, stride)


def test_scale_differs_per_axis_after_rounding():
    g = grid()
    assert g.scale == (1066 / 4032, 800 / 3024)
    assert g.scale[0] != g.scale[1]


def test_image_corners_and_edges_map_to_corner_cells():
    for stride in (32, 16):
        g = grid(stride=stride)
        h, w = g.shape
        assert g.shape == ((25, 34) if stride == 32 else (50, 67))
        assert g.cell_at(0, 0) == (0, 0)
        assert g.cell_at(4032, 3024) == (h - 1, w - 1)  # the far edge itself
        assert g.cell_at(4031.99, 0) == (0, w - 1)
        with pytest.raises(ArgumentError, match="outside"):
            g.cell_at(4032.5, 10)
        with pytest.raises(ArgumentError, match="outside"):
            g.cell_at(-1, 10)


def test_last_cell_overhangs_and_is_clipped():
    g = grid()  # 1066 = 33 * 32 + 10: the last column covers only 10 input pixels
    x0, y0, x1, y1 = g.cell_bounds(0, 33)
    assert x0 == pytest.approx(33 * 32 / g.scale[0]) and x1 == 4032
    cx, _ = g.cell_center(0, 33)
    assert cx > 4032  # the centre of the overhanging cell lies past the image edge
    assert g.cell_at(x0 + 1, 5) == (0, 33)


def test_dc5_cells_are_half_the_size():
    g32, g16 = grid(stride=32), grid(stride=16)
    x, y = 1234.5, 2345.6
    r32, c32 = g32.cell_at(x, y)
    r16, c16 = g16.cell_at(x, y)
    assert (r16 // 2, c16 // 2) == (r32, c32)
    b32, b16 = g32.cell_bounds(r32, c32), g16.cell_bounds(r16, c16)
    assert b16[2] - b16[0] == pytest.approx((b32[2] - b32[0]) / 2)
    assert g16.cell_radius()[0] == pytest.approx(g32.cell_radius()[0] / 2)


@given(
    width=st.integers(1, 9000), height=st.integers(1, 9000),
    fx=st.floats(0, 1), fy=st.floats(0, 1), stride=st.sampled_from([16, 32]),
)
def test_point_lies_in_its_cell_and_cell_centre_maps_back(width, height, fx, fy, stride):
    input_size = (max(1, round(width * 0.37)), max(1, round(height * 0.41)))
    g = grid((width, height), input_size, stride)
    x, y = fx * width, fy * height
    row, col = g.cell_at(x, y)
    x0, y0, x1, y1 = g.cell_bounds(row, col)
    assert x0 - 1e-6 <= x <= x1 + 1e-6 and y0 - 1e-6 <= y <= y1 + 1e-6
    assert g.cell_of_index(g.cell_index(row, col)) == (row, col)
    cx, cy = g.cell_center(row, col)
    if cx <= width and cy <= height:  # centres past the edge belong to overhanging cells
        assert g.cell_at(cx, cy) == (row, col)


def test_grid_must_fit_the_stride():
    with pytest.raises(ValueError, match="does not fit"):
        FeatureGrid((640, 480), (1066, 800), (25, 34), 16)
