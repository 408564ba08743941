"""The overview grid (one composed image, clickable) and the per-head top-cells overlay."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from plotly.colors import sample_colorscale, unlabel_rgb

from detr_viz.display import display_image
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid
from detr_viz.overview_figures import (
    head_overlay_figure,
    overview_figure,
    overview_pick,
    tiling,
)

ORIGINAL = (1000, 750)
GRID32 = FeatureGrid(ORIGINAL, (1066, 800), (25, 34), 32)
GRID16 = FeatureGrid(ORIGINAL, (1066, 800), (50, 67), 16)


@pytest.fixture(scope="module")
def display():
    rgb = np.zeros((ORIGINAL[1], ORIGINAL[0], 3), np.uint8)
    return display_image(Image.fromarray(rgb), max_side=400)


def random_maps(shape=(5, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((6, 9, *shape)).astype(np.float32)


def decoded(fig) -> np.ndarray:
    (image,) = [t for t in fig.data if t.type == "image"]
    prefix = "data:image/png;base64,"
    assert image.source.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image.source[len(prefix):]))))


def colour(colorscale: str, level: float) -> tuple[int, ...]:
    return tuple(round(v) for v in unlabel_rgb(sample_colorscale(colorscale, [level])[0]))


def head_label(column: int) -> str:
    return "mean of heads" if column == 8 else f"head {column + 1}"


def test_overview_is_one_image_and_one_marker_trace():
    fig = overview_figure(random_maps())
    assert [t.type for t in fig.data] == ["image", "scatter"]  # not 54 subplots
    assert "xaxis2" not in fig.layout and "yaxis2" not in fig.layout
    markers = fig.data[1]
    assert len(markers.x) == 54 and markers.marker.opacity == 0
    assert fig.layout.hoverdistance == -1  # the nearest centre: anywhere on a thumbnail


@pytest.mark.parametrize("cell_px, gap", [(None, 2), (1, 0), (3, 5)])
def test_peak_pixel_of_each_thumbnail_is_its_brightest(cell_px, gap):
    maps = random_maps((4, 6))
    fig = overview_figure(maps, colorscale="Viridis", cell_px=cell_px, gap=gap)
    rgba = decoded(fig)
    layout = tiling(maps, cell_px, gap)
    assert rgba.shape == (layout.size[1], layout.size[0], 4)
    (tw, th), p = layout.tile, layout.cell_px
    luminance = rgba[..., :3].astype(float) @ [0.299, 0.587, 0.114]
    for layer, column in np.ndindex(6, 9):
        z = maps[layer, column]
        r, c = np.unravel_index(z.argmax(), z.shape)
        x, y = layout.origin(layer, column)
        tile = luminance[y : y + th, x : x + tw]
        peak = rgba[y + r * p, x + c * p]
        assert tuple(peak[:3]) == colour("Viridis", 1.0) and peak[3] == 255
        assert luminance[y + r * p, x + c * p] == tile.max()  # Viridis: brighter is higher
        lr, lc = np.unravel_index(z.argmin(), z.shape)
        assert tuple(rgba[y + lr * p + p - 1, x + lc * p + p - 1, :3]) == colour("Viridis", 0)
    if gap:
        assert rgba[:, layout.tile[0] : layout.tile[0] + gap, 3].max() == 0  # gaps: transparent


def test_composed_image_spans_its_axes_with_row_zero_on_top():
    maps = np.zeros((6, 9, 5, 7), np.float32)
    maps[:, :, 0, 6] = 1  # top-right cell of every map
    fig = overview_figure(maps, cell_px=2, gap=1)
    rgba, layout = decoded(fig), tiling(maps, 2, 1)
    x, y = layout.origin(3, 8)
    assert tuple(rgba[y, x + 6 * 2, :3]) == colour("Viridis", 1.0)  # not transposed or flipped
    assert tuple(rgba[y + 8, x, :3]) == colour("Viridis", 0.0)
    image = fig.data[0]
    assert (image.x0 - image.dx / 2, image.y0 - image.dy / 2, image.dx, image.dy) == (0, 0, 1, 1)
    width, height = layout.size
    xr, yr = fig.layout.xaxis.range, fig.layout.yaxis.range
    assert xr[0] < 0 and xr[1] > width and yr[0] > height and yr[1] < 0  # y runs down
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1


def test_hover_names_layer_head_and_peak():
    maps = random_maps()
    markers = overview_figure(maps).data[1]
    layout = tiling(maps)
    (tw, th) = layout.tile
    seen = set()
    for x, y, (layer, head), text in zip(markers.x, markers.y, markers.customdata,
                                         markers.hovertext, strict=True):
        column = 8 if head == -1 else head
        seen.add((layer, column))
        r, c = np.unravel_index(maps[layer, column].argmax(), (5, 7))
        assert text.startswith(f"layer {layer + 1}, {head_label(column)}<br>")
        assert f"peak cell (row {r}, col {c})" in text
        ox, oy = layout.origin(layer, column)
        assert ox < x < ox + tw and oy < y < oy + th  # the marker sits on its own thumbnail
    assert seen == {(layer, column) for layer in range(6) for column in range(9)}


def test_axis_labels_name_layers_and_heads():
    fig = overview_figure(random_maps())
    assert list(fig.layout.xaxis.ticktext) == [f"head {i}" for i in range(1, 9)] + ["mean"]
    assert list(fig.layout.yaxis.ticktext) == [f"layer {i}" for i in range(1, 7)]
    layout = tiling(random_maps())
    assert fig.layout.xaxis.tickvals[8] == layout.center(0, 8)[0]
    assert fig.layout.yaxis.tickvals[5] == layout.center(5, 0)[1]


@pytest.mark.parametrize("shown, column", [((5, None), 8), ((0, 3), 3)])
def test_shown_layer_and_head_are_outlined(shown, column):
    maps = random_maps()
    layout = tiling(maps)
    (rect,) = overview_figure(maps, shown=shown).layout.shapes
    x, y = layout.origin(shown[0], column)
    tw, th = layout.tile
    assert rect.x0 < x and rect.y0 < y and rect.x1 > x + tw and rect.y1 > y + th
    assert rect.x0 > x - layout.gap - 1 and rect.x1 < x + tw + layout.gap + 1  # not a neighbour
    assert not overview_figure(maps).layout.shapes
    with pytest.raises(ArgumentError, match="not in the overview"):
        overview_figure(maps, shown=(6, 0))
    with pytest.raises(ArgumentError, match="not in the overview"):
        overview_figure(maps, shown=(0, 8))  # the mean is head None, not 8


def streamlit_selection(point_index: int, customdata) -> dict:
    """The state st.plotly_chart(on_select="rerun", selection_mode="points") returns for one
    clicked point (streamlit 1.67: plotly's event point with snake_case keys)."""
    point = {"curve_number": 1, "point_number": point_index, "point_index": point_index,
             "x": 100.5, "y": 40.0, "customdata": customdata}
    return {"selection": {"points": [point], "point_indices": [point_index], "box": [],
                          "lasso": []}}


def test_pick_decodes_the_clicked_thumbnail():
    markers = overview_figure(random_maps()).data[1]
    for index in (0, 22, 8, 53):
        layer, head = markers.customdata[index]
        expected = (index // 9, None if index % 9 == 8 else index % 9)
        assert overview_pick(streamlit_selection(index, list(markers.customdata[index]))) \
            == expected == (layer, None if head == -1 else head)
    state = streamlit_selection(22, [2, 4])
    assert overview_pick(state["selection"]) == (2, 4)  # the inner dict works too
    empty = {"selection": {"points": [], "point_indices": [], "box": [], "lasso": []}}
    assert overview_pick(empty) is None and overview_pick(None) is None
    assert overview_pick({"selection": {"points": [{"x": 1, "y": 2}]}}) is None


def test_pick_reads_streamlits_own_state_object():
    """What the page gets: the frontend's JSON string, deserialised by Streamlit (1.67's
    internal serde) into a PlotlyState; an empty state (no click yet, or a click that
    deselected) picks nothing."""
    from streamlit.elements.plotly_chart import PlotlyChartSelectionSerde

    serde = PlotlyChartSelectionSerde()
    state = serde.deserialize(json.dumps(streamlit_selection(53, [5, -1])))
    assert overview_pick(state) == (5, None) and overview_pick(state.selection) == (5, None)
    assert overview_pick(serde.deserialize(None)) is None


def cell_rects(trace) -> list[tuple[float, float, float, float]]:
    """The closed rectangles of a None-separated outline trace, as (x0, y0, x1, y1)."""
    xs, ys, rects = list(trace.x), list(trace.y), []
    while xs:
        n = xs.index(None)
        rects.append((min(xs[:n]), min(ys[:n]), max(xs[:n]), max(ys[:n])))
        assert (xs[0], ys[0]) == (xs[n - 1], ys[n - 1])
        xs, ys = xs[n + 1 :], ys[n + 1 :]
    return rects


@pytest.mark.parametrize("grid", [GRID32, GRID16], ids=["stride32", "dc5"])
def test_head_overlay_draws_each_heads_top_cells_at_their_bounds(display, grid):
    h, w = grid.shape
    maps = np.zeros((8, h, w), np.float32)
    planted = {head: [((3 * head + i) % h, (5 * head + 2 * i) % w) for i in range(3)]
               for head in range(8)}
    for head, cells in planted.items():
        for rank, (r, c) in enumerate(cells):
            maps[head, r, c] = 1 - rank / 10  # rank 0 highest
    maps[:, h - 1, w - 1] = 0.01  # below every planted cell: not in the top 3
    fig = head_overlay_figure(display, grid, maps, k=3, point=(640.3, 480.9))
    outlines = [t for t in fig.data if t.type == "scatter" and t.fill == "toself"]
    assert [t.name for t in outlines] == [f"head {i}" for i in range(1, 9)]
    assert all(t.showlegend for t in outlines) and fig.layout.showlegend is True
    for head, trace in enumerate(outlines):
        expected = [grid.cell_bounds(r, c) for r, c in planted[head]]
        np.testing.assert_allclose(cell_rects(trace), expected, rtol=1e-9)  # rows: x0 y0 x1 y1
        centres = [t for t in fig.data if t.type == "scatter" and t is not trace
                   and t.legendgroup == trace.legendgroup]
        assert len(centres) == 1 and len(centres[0].x) == 3
        assert centres[0].hovertext[0].startswith(f"head {head + 1}, #1: cell {planted[head][0]}")
    assert len({t.line.color for t in outlines}) == 8
    (circle,) = fig.layout.shapes  # the reference point's cell
    centre = ((circle.x0 + circle.x1) / 2, (circle.y0 + circle.y1) / 2)
    assert centre == pytest.approx(grid.cell_center(*grid.cell_at(640.3, 480.9)))
    assert tuple(fig.layout.yaxis.range) == (750, 0)


def test_head_overlay_rejects_maps_of_another_grid(display):
    with pytest.raises(ArgumentError, match="heads, 25, 34"):
        head_overlay_figure(display, GRID32, np.zeros((8, 50, 67)), k=2)
    with pytest.raises(ArgumentError, match="k must"):
        head_overlay_figure(display, GRID32, np.zeros((8, 25, 34)), k=0)
