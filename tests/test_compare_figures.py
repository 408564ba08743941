"""Side-by-side figures of two backbones: each map on its own grid, each clicked cell outlined."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr_viz.analysis import Detection
from detr_viz.compare import Match
from detr_viz.compare_figures import (
    CELL_COLORS,
    NO_MATCHES,
    comparison_figure,
    encoder_comparison_figure,
)
from detr_viz.display import display_image
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid

ORIGINAL = (1000, 750)
GRID32 = FeatureGrid(ORIGINAL, (1066, 800), (25, 34), 32)
GRID16 = FeatureGrid(ORIGINAL, (1066, 800), (50, 67), 16)


@pytest.fixture(scope="module")
def display():
    return display_image(Image.new("RGB", ORIGINAL, "gray"), max_side=400)


def det(query, name="cup", score=0.98, box=(100.0, 50.0, 420.0, 380.0)) -> Detection:
    return Detection(query=query, label=47, name=name, score=score, box=box)


def one_hot(grid, row, col) -> np.ndarray:
    z = np.zeros(grid.shape, np.float32)
    z[row, col] = 1
    return z


def rect(trace) -> tuple[float, float, float, float]:
    return min(trace.x), min(trace.y), max(trace.x), max(trace.y)


def test_each_pair_is_drawn_on_its_own_grid(display):
    pairs = [Match(det(17), det(4, score=0.91, box=(98.0, 55.0, 410.0, 371.0)), 0.912),
             Match(det(3, "spoon", 0.95), det(60, "spoon", 0.99), 0.7)]
    maps_a = np.stack([one_hot(GRID32, 2, 3), one_hot(GRID32, 24, 33)])
    maps_b = np.stack([one_hot(GRID16, 5, 7), one_hot(GRID16, 49, 66)])
    fig = comparison_figure(display, GRID32, GRID16, pairs, maps_a, maps_b,
                            labels=("R50", "R50-DC5"))
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 4 and len([t for t in fig.data if t.type == "image"]) == 4
    for trace, grid, z in zip(heat, [GRID32, GRID16] * 2, [maps_a[0], maps_b[0], maps_a[1],
                                                           maps_b[1]], strict=True):
        (sx, sy), s = grid.scale, grid.stride
        assert np.asarray(trace.z).shape == grid.shape
        np.testing.assert_array_equal(np.asarray(trace.z), z)
        assert (trace.dx, trace.dy) == pytest.approx((s / sx, s / sy))
        assert (trace.x0, trace.y0) == pytest.approx((s / sx / 2, s / sy / 2))
    assert heat[1].dx == pytest.approx(heat[0].dx / 2)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["R50 · query 17: cup 0.98 · IoU 0.91",
                      "R50-DC5 · query 4: cup 0.91 · IoU 0.91",
                      "R50 · query 3: spoon 0.95 · IoU 0.70",
                      "R50-DC5 · query 60: spoon 0.99 · IoU 0.70"]
    boxes = [t for t in fig.data if t.type == "scatter"]
    assert [rect(b) for b in boxes[:2]] == [pairs[0].a.box, pairs[0].b.box]
    assert "IoU 0.91" in boxes[1].text and "query 4" in boxes[1].text
    assert [t.xaxis for t in heat] == ["x", "x2", "x3", "x4"]  # one panel each
    for suffix in ("", "2", "3", "4"):
        assert tuple(fig.layout[f"yaxis{suffix}"].range) == (750, 0)


def test_no_pairs_gives_a_note(display):
    fig = comparison_figure(display, GRID32, GRID16, [], np.zeros((0, 25, 34)), [])
    assert not fig.data and fig.layout.annotations[0].text == NO_MATCHES


def test_maps_must_fit_their_grids(display):
    pair = [Match(det(1), det(2), 0.8)]
    with pytest.raises(ArgumentError, match="need"):
        comparison_figure(display, GRID32, GRID16, pair, np.zeros((1, 25, 34)),
                          np.zeros((1, 25, 34)))  # B's map on A's grid
    with pytest.raises(ArgumentError, match="analyse"):
        comparison_figure(display_image(Image.new("RGB", (640, 480))), GRID32, GRID16, pair,
                          np.zeros((1, 25, 34)), np.zeros((1, 50, 67)))


@pytest.mark.parametrize("point", [(640.3, 480.9), (10.0, 10.0), (1000.0, 750.0), (47.0, 33.0)])
def test_encoder_comparison_outlines_both_cells_in_both_panels(display, point):
    cell_a, cell_b = GRID32.cell_at(*point), GRID16.cell_at(*point)
    fig = encoder_comparison_figure(display, GRID32, GRID16, point, one_hot(GRID32, *cell_a),
                                    one_hot(GRID16, *cell_b), labels=("R50", "DC5"))
    outlines = [t for t in fig.data if t.type == "scatter" and t.name != "point"]
    assert len(outlines) == 4
    for panel, axis in enumerate(("x", "x2")):
        mine = [t for t in outlines if t.xaxis == axis]
        np.testing.assert_allclose([rect(t) for t in mine],  # rows: (x0, y0, x1, y1)
                                   [GRID32.cell_bounds(*cell_a), GRID16.cell_bounds(*cell_b)],
                                   rtol=1e-9)
        assert [t.line.color for t in mine] == list(CELL_COLORS)
        assert [t.showlegend for t in mine] == [panel == 0] * 2  # one legend entry per model
    assert outlines[0].name == f"R50 cell {cell_a}, 32 px"
    assert outlines[1].name == f"DC5 cell {cell_b}, 16 px"
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [np.asarray(t.z).shape for t in heat] == [(25, 34), (50, 67)]
    assert [a.text for a in fig.layout.annotations] == [
        f"R50: cell {cell_a} of 25x34 (stride 32)", f"DC5: cell {cell_b} of 50x67 (stride 16)"]
    (mark,) = [t for t in fig.data if t.name == "point" and t.xaxis == "x"]
    assert (mark.x[0], mark.y[0]) == point
    assert fig.layout.showlegend is True

