"""Figures and the display image: the geometry a user sees must land where the model looked."""

from __future__ import annotations

import base64
import io

import numpy as np
import plotly.colors
import pytest
from PIL import Image

from detr_viz.analysis import Detection
from detr_viz.display import DisplayImage, display_image, display_to_original, jpeg_bytes
from detr_viz.errors import ArgumentError
from detr_viz.figures import (
    COLORSCALES,
    NO_DETECTIONS,
    attention_heatmap,
    attention_overlay,
    decoder_grid,
    detections_figure,
    encoder_panels,
)
from detr_viz.geometry import FeatureGrid

ORIGINAL = (1000, 750)
GRID32 = FeatureGrid(ORIGINAL, (1066, 800), (25, 34), 32)
GRID16 = FeatureGrid(ORIGINAL, (1066, 800), (50, 67), 16)


def photo(size=ORIGINAL) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], 128), axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.fixture(scope="module")
def display() -> DisplayImage:
    return display_image(photo(), max_side=400)  # 400x300: display != original size


def one_hot(grid: FeatureGrid, row: int, col: int) -> np.ndarray:
    z = np.zeros(grid.shape, np.float32)
    z[row, col] = 1
    return z


def traces(fig, kind):
    return [t for t in fig.data if t.type == kind]


def cell_rect(trace, row, col):
    """Edges of heatmap cell (row, col): plotly centres cell c on x0 + c * dx."""
    cx, cy = trace.x0 + col * trace.dx, trace.y0 + row * trace.dy
    return cx - trace.dx / 2, cy - trace.dy / 2, cx + trace.dx / 2, cy + trace.dy / 2


def image_extent(trace, size):
    """Edges of an image trace: plotly centres pixel i on x0 + i * dx."""
    left, top = trace.x0 - trace.dx / 2, trace.y0 - trace.dy / 2
    return left, top, left + size[0] * trace.dx, top + size[1] * trace.dy


def detection(query=17, name="cup", score=0.9812, box=(100.4, 50.6, 420.2, 380.9)):
    return Detection(query=query, label=47, name=name, score=score, box=box)


@pytest.mark.parametrize("grid", [GRID32, GRID16], ids=["stride32", "dc5"])
@pytest.mark.parametrize("where", [(0, 0), (3, 7), (-1, -1), (-1, 0)])
def test_one_hot_cell_lands_on_its_cell_bounds(display, grid, where):
    h, w = grid.shape
    row, col = where[0] % h, where[1] % w
    fig = attention_overlay(display, one_hot(grid, row, col), grid)
    (heat,) = traces(fig, "heatmap")
    z = np.asarray(heat.z)
    assert z.shape == grid.shape
    r, c = np.unravel_index(np.argmax(z), z.shape)
    x0, y0, x1, y1 = cell_rect(heat, r, c)
    bx0, by0, bx1, by1 = grid.cell_bounds(row, col)
    assert (x0, y0) == pytest.approx((bx0, by0), abs=1e-9)
    # cell_bounds clips an overhanging last cell to the image; the axes do the same
    assert (min(x1, ORIGINAL[0]), min(y1, ORIGINAL[1])) == pytest.approx((bx1, by1), abs=1e-9)
    assert heat.zsmooth is False and heat.showscale is False


def test_overhanging_cell_is_clipped_by_the_axes(display):
    fig = attention_overlay(display, one_hot(GRID32, 0, 33), GRID32)
    (heat,) = traces(fig, "heatmap")
    assert cell_rect(heat, 0, 33)[2] > ORIGINAL[0]  # 1066 = 33 * 32 + 10
    assert tuple(fig.layout.xaxis.range) == (0, ORIGINAL[0])


def test_dc5_cells_are_half_the_size(display):
    h32 = traces(attention_overlay(display, one_hot(GRID32, 0, 0), GRID32), "heatmap")[0]
    h16 = traces(attention_overlay(display, one_hot(GRID16, 0, 0), GRID16), "heatmap")[0]
    assert h16.dx == pytest.approx(h32.dx / 2) and h16.dy == pytest.approx(h32.dy / 2)
    assert h32.dx == pytest.approx(32 * 1000 / 1066) and h32.dy == pytest.approx(32 * 750 / 800)


@pytest.mark.parametrize("max_side", [400, 1024, 97])
def test_photo_spans_exactly_the_original_pixels(max_side):
    shown = display_image(photo(), max_side=max_side)
    fig = attention_overlay(shown, one_hot(GRID32, 1, 1), GRID32)
    (image,) = traces(fig, "image")
    assert image.source == shown.source
    assert image_extent(image, shown.display_size) == pytest.approx((0, 0, *ORIGINAL))


def test_axes_are_original_pixels_y_down_equal_aspect(display):
    for fig in (detections_figure(display, [detection()]),
                attention_overlay(display, one_hot(GRID32, 0, 0), GRID32)):
        assert tuple(fig.layout.xaxis.range) == (0, 1000)
        assert tuple(fig.layout.yaxis.range) == (750, 0)  # y runs downwards
        assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.yaxis.scaleratio == 1
        assert fig.layout.xaxis.visible is False and fig.layout.height == 500


def test_feature_heatmap_is_not_transposed_and_row_zero_is_on_top():
    z = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    z[0, 7] = 99  # top-right corner
    fig = attention_heatmap(z, "map", marker_cell=(1, 6))
    (heat,) = traces(fig, "heatmap")
    np.testing.assert_array_equal(np.asarray(heat.z), z)  # z[0] is the first row drawn
    assert heat.transpose is not True
    assert (heat.x0, heat.dx, heat.y0, heat.dy) == (0, 1, 0, 1)  # cell (r, c) at x=c, y=r
    assert tuple(fig.layout.xaxis.range) == (-0.5, 7.5)
    assert tuple(fig.layout.yaxis.range) == (4.5, -0.5)  # reversed: y = 0 (row 0) on top
    assert fig.layout.yaxis.scaleanchor == "x"  # square cells
    assert "row %{y}, col %{x}: %{z:.4g}" in heat.hovertemplate
    (square,) = fig.layout.shapes
    assert (square.x0, square.x1, square.y0, square.y1) == (5.5, 6.5, 0.5, 1.5)


def test_detection_outline_and_hover(display):
    dets = [detection(), detection(query=3, name="dining table", score=0.9, box=(0, 0, 1000, 750))]
    fig = detections_figure(display, dets)
    boxes = traces(fig, "scatter")
    assert len(boxes) == 2 and len({b.line.color for b in boxes}) == 2
    for det, outline in zip(dets, boxes, strict=True):
        x, y = list(outline.x), list(outline.y)
        assert (x[0], y[0]) == (x[-1], y[-1])  # closed
        assert (min(x), min(y), max(x), max(y)) == pytest.approx(det.box)
        assert f"query {det.query}" in outline.text and det.name in outline.text
        assert f"{det.score:.2f}" in outline.text
    assert "box (100, 51, 420, 381)" in boxes[0].text
    labels = [a.text for a in fig.layout.annotations]
    assert labels == ["cup 0.98", "dining table 0.90"]
    assert (fig.layout.annotations[0].x, fig.layout.annotations[0].y) == (100.4, 50.6)


def test_no_detections_shows_the_photo_and_a_note(display):
    fig = detections_figure(display, [])
    assert [t.type for t in fig.data] == ["image"]
    assert fig.layout.title.text == NO_DETECTIONS


@pytest.mark.parametrize("n", [0, 1, 30])
def test_decoder_grid_builds_two_rows_per_page(display, n):
    dets = [detection(query=q, score=0.99 - q / 100) for q in range(n)]
    maps = np.stack([one_hot(GRID32, q % 25, q) for q in range(n)]) if n else np.zeros((0, 25, 34))
    fig = decoder_grid(display, GRID32, dets, maps)
    if n == 0:
        assert not fig.data and NO_DETECTIONS in fig.layout.annotations[0].text
        return
    kinds = [t.type for t in fig.data]
    assert kinds.count("heatmap") == 2 * n and kinds.count("image") == n
    assert kinds.count("scatter") == n
    top = [t for t in fig.data if t.type == "heatmap" and t.dx == 1]
    assert [t.xaxis for t in top] == ["x" if i == 0 else f"x{i + 1}" for i in range(n)]
    photos = traces(fig, "image")
    assert [t.xaxis for t in photos] == [f"x{n + i + 1}" for i in range(n)]
    layout = fig.layout
    for i in range(2 * n):  # each subplot keeps its own aspect
        suffix = "" if i == 0 else str(i + 1)
        assert layout[f"yaxis{suffix}"].scaleanchor == f"x{suffix}"
    assert tuple(layout[f"yaxis{n + 1}"].range) == (750, 0)
    titles = [a.text for a in layout.annotations if a.text]
    assert titles[0] == "query 0: cup 0.99" and len(titles) == n


def test_encoder_panel_marks_the_cell_centre(display):
    points = [(10.0, 10.0), (640.3, 480.9), (1000.0, 750.0)]
    maps = [one_hot(GRID16, *GRID16.cell_at(*p)) for p in points]
    fig = encoder_panels(display, GRID16, points, maps)
    assert [t.type for t in fig.data] == ["image", "heatmap"] * 3
    rx, ry = GRID16.cell_radius()
    for i, (point, circle) in enumerate(zip(points, fig.layout.shapes, strict=True)):
        row, col = GRID16.cell_at(*point)
        assert circle.type == "circle" and circle.xref == ("x" if i == 0 else f"x{i + 1}")
        centre = ((circle.x0 + circle.x1) / 2, (circle.y0 + circle.y1) / 2)
        assert centre == pytest.approx(GRID16.cell_center(row, col))
        assert (circle.x1 - circle.x0, circle.y1 - circle.y0) == pytest.approx((2 * rx, 2 * ry))
    # 480.9 * 800 / 750 / 16 = 32.06 and 640.3 * 1066 / 1000 / 16 = 42.66
    assert fig.layout.annotations[1].text == "point (640, 481) -> cell (32, 42)"
    assert not encoder_panels(display, GRID16, [], []).data


def test_mismatched_shapes_raise_argument_errors(display):
    with pytest.raises(ArgumentError, match="25x34"):
        attention_overlay(display, np.zeros((50, 67)), GRID32)
    with pytest.raises(ArgumentError, match="2-D"):
        attention_heatmap(np.zeros((2, 3, 4)), "t")
    with pytest.raises(ArgumentError, match="need"):
        decoder_grid(display, GRID32, [detection()], np.zeros((2, 25, 34)))
    with pytest.raises(ArgumentError, match="points"):
        encoder_panels(display, GRID32, [(1, 1)], [])
    with pytest.raises(ArgumentError, match="analyse"):
        attention_overlay(display_image(photo((640, 480))), np.zeros((25, 34)), GRID32)


def test_colorscales_exist_in_plotly():
    named = set(plotly.colors.named_colorscales())
    assert 3 <= len(COLORSCALES) <= 8
    assert all(name.lower() in named for name in COLORSCALES)


def test_display_to_original_corners_and_pixel_centres():
    display_size, original = (400, 300), (1000, 750)
    assert display_to_original(-0.5, -0.5, display_size, original) == (0, 0)
    assert display_to_original(399.5, 299.5, display_size, original) == (1000, 750)
    assert display_to_original(0, 0, display_size, original) == (1.25, 1.25)
    assert display_to_original(399, 299, display_size, original) == (998.75, 748.75)
    assert display_to_original(199, 149, display_size, original) == (498.75, 373.75)
    assert display_to_original(-20, 400, display_size, original) == (0, 750)  # clamped
    assert display_to_original(5, 5, original, original) == (5.5, 5.5)  # same size: centre


@pytest.mark.parametrize("size", [(1000, 750), (300, 4000), (50, 40), (1024, 1)])
def test_display_image_never_upsizes_and_keeps_aspect(size):
    image = photo(size)
    shown = display_image(image, max_side=512)
    w, h = shown.display_size
    assert shown.original_size == size
    assert max(w, h) == min(512, max(size))
    assert w <= size[0] and h <= size[1]
    scale = min(1, 512 / max(size))
    assert abs(w - size[0] * scale) <= 1 and abs(h - size[1] * scale) <= 1  # aspect kept
    prefix = "data:image/jpeg;base64,"
    assert shown.source.startswith(prefix)
    decoded = Image.open(io.BytesIO(base64.b64decode(shown.source[len(prefix):])))
    assert decoded.format == "JPEG" and decoded.size == (w, h) and decoded.mode == "RGB"


def test_jpeg_bytes_converts_and_validates():
    data, size = jpeg_bytes(Image.new("RGBA", (2000, 1000)), max_side=100, quality=70)
    assert data[:2] == b"\xff\xd8" and size == (100, 50)
    with pytest.raises(ArgumentError):
        jpeg_bytes(photo(), max_side=0)
    with pytest.raises(ArgumentError):
        jpeg_bytes(photo(), quality=101)


def every_figure(display):
    """One figure of each builder (of every figure module), on the 32 and 16 px grids."""
    from detr_viz import compare_figures, overview_figures
    from detr_viz.compare import Match
    from detr_viz.figures import attention_overlay

    dets = [Detection(i, 1, "person", 0.9, (10.0 * i, 20.0, 300.0, 400.0)) for i in range(3)]
    m32, m16 = one_hot(GRID32, 3, 4), one_hot(GRID16, 7, 9)
    pairs = [Match(dets[0], dets[1], 0.8)]
    maps = np.random.default_rng(0).random((6, 9, *GRID32.shape))
    yield detections_figure(display, dets)
    yield attention_heatmap(m32, "t", marker_cell=(3, 4))
    yield attention_overlay(display, m16, GRID16, box=(1, 2, 3, 4), marker=(5, 6, 7, 8))
    yield decoder_grid(display, GRID32, dets, np.stack([m32] * 3))
    yield decoder_grid(display, GRID32, [], np.zeros((0, *GRID32.shape)))
    yield encoder_panels(display, GRID16, [(10, 10), (900, 700)], [m16, m16])
    yield overview_figures.overview_figure(maps, shown=(2, None))
    yield overview_figures.head_overlay_figure(display, GRID32, maps[0, :8], point=(50, 60),
                                               box=(1, 2, 300, 400))
    yield compare_figures.comparison_figure(display, GRID32, GRID16, pairs, m32[None], m16[None])
    yield compare_figures.encoder_comparison_figure(display, GRID32, GRID16, (100, 120), m32,
                                                    m16)


def test_every_builder_passes_plotly_validation(display):
    """The builders skip Plotly's validation for speed; here every property is validated."""
    import plotly.graph_objects as go

    for fig in every_figure(display):
        spec = fig.to_dict()
        validated = go.Figure(spec)  # raises ValueError on any unknown or invalid property
        assert len(validated.data) == len(spec["data"])


@pytest.mark.parametrize("rows,cols,hs,vs", [(2, 1, 0.02, 0.06), (2, 4, 0.02, 0.06),
                                             (1, 3, 0.02, 0.0), (3, 2, 0.02, 0.06)])
def test_panel_domains_equal_make_subplots(rows, cols, hs, vs):
    from plotly.subplots import make_subplots

    from detr_viz.figures import panels

    titles = [f"t{i}" for i in range(rows * cols)]
    ours = panels(rows, cols, titles, hs, vs)["layout"]
    theirs = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=hs,
                           vertical_spacing=vs).layout
    for k in range(1, rows * cols + 1):
        suffix = "" if k == 1 else str(k)
        for axis in ("x", "y"):
            np.testing.assert_allclose(ours[f"{axis}axis{suffix}"]["domain"],
                                       theirs[f"{axis}axis{suffix}"].domain, atol=1e-12)
    for mine, plotly_title in zip(ours["annotations"], theirs.annotations, strict=True):
        assert (mine["text"], mine["x"], mine["y"]) == pytest.approx(
            (plotly_title.text, plotly_title.x, plotly_title.y))
