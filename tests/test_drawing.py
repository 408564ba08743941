"""Shapes drawn into images never raise: ``pixel_box`` against a pixel-set oracle, and the
click image's cell outline (``marked``) on every cell of photos of extreme sizes."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from detr_viz.display import pixel_box
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid
from detr_viz.image import resized_hw
from detr_viz.ui.encoder import marked
from detr_viz.ui.resources import CLICK_SIDE, Photo

coordinate = st.floats(-50, 1050, allow_nan=False)
side = st.integers(1, 1000)


def covered(a: float, b: float, n: int) -> list[int]:
    """Oracle: the pixels i of a line of n whose span [i, i + 1) meets [a, b)."""
    return [i for i in range(n) if i + 1 > a and i < b]


@given(coordinate, coordinate, coordinate, coordinate, side, side)
def test_pixel_box_is_inside_ordered_and_drawable(x0, y0, x1, y1, w, h):
    left, top, right, bottom = box = pixel_box((x0, y0, x1, y1), (w, h))
    assert 0 <= left <= right < w and 0 <= top <= bottom < h
    image = Image.new("RGB", (w, h))
    ImageDraw.Draw(image).rectangle(box, outline="red", width=2)
    ImageDraw.Draw(image).ellipse(box, fill="red")
    assert np.asarray(image)[top:bottom + 1, left:right + 1].any()  # something was drawn


@given(coordinate, coordinate, side)
def test_pixel_box_covers_exactly_the_pixels_the_span_meets(a, b, n):
    first, _, last, _ = pixel_box((a, 0, b, 1), (n, 1))
    hit = covered(min(a, b), max(a, b), n)
    if hit and max(a, b) > min(a, b):
        assert (first, last) == (hit[0], hit[-1])
    else:  # empty or off the image: the nearest pixel
        assert first == last == min(max(math.floor(min(a, b)), 0), n - 1)


@pytest.mark.parametrize("box,size", [((0, 0, 1, 1), (0, 5)), ((0, math.nan, 1, 1), (5, 5)),
                                      ((0, 0, math.inf, 1), (5, 5))])
def test_pixel_box_refuses_an_empty_image_or_a_box_that_is_not_finite(box, size):
    with pytest.raises(ArgumentError):
        pixel_box(box, size)


def _photo_and_grid(width: int, height: int, stride: int) -> tuple[Photo, FeatureGrid]:
    """A Photo with only what ``marked`` reads (the click copy is sized as get_photo sizes it)
    and the feature grid DETR's default transform gives the photo."""
    h_in, w_in = resized_hw(width, height)
    grid = FeatureGrid((width, height), (w_in, h_in), (math.ceil(h_in / stride),
                                                        math.ceil(w_in / stride)), stride)
    scale = min(1.0, CLICK_SIDE / max(width, height))
    click = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
    photo = Photo("digest", types.SimpleNamespace(width=width, height=height), None, None, click)
    return photo, grid


@pytest.mark.parametrize("stride", [32, 16])
@pytest.mark.parametrize("size", [(1, 1), (2, 5000), (5000, 2), (20000, 100), (100, 20000),
                                  (1333, 1), (721, 3), (4032, 3)])
def test_marked_outlines_every_cell_of_extreme_photos(size, stride):
    photo, grid = _photo_and_grid(*size, stride)
    analysis = types.SimpleNamespace(grid=grid)
    width, height = size
    rows, cols = grid.shape
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = grid.cell_bounds(r, c)
            for point in [(x0, y0), (x1, y1), ((x0 + x1) / 2, (y0 + y1) / 2)]:
                image = marked(photo, analysis, point)
                assert image.size == photo.click.size
                red = np.asarray(image)[..., 0] > 0
                px = min(int(point[0] * image.width / width), image.width - 1)
                py = min(int(point[1] * image.height / height), image.height - 1)
                assert red[py, px], (point, (r, c))  # the marker covers the clicked pixel
    for corner in [(0, 0), (width, 0), (0, height), (width, height)]:
        marked(photo, analysis, corner)
    assert not np.asarray(marked(photo, analysis, None)).any()  # no point: the photo as is
