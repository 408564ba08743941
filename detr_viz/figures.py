"""Plotly figures of detections and attention maps: pure functions of records and arrays.

Photos are drawn in ORIGINAL-pixel coordinates: x right in [0, W], y DOWN in [0, H] (the y
axis is reversed), one unit per original pixel on both axes, whatever the size of the
displayed JPEG. Feature maps are (h, w) arrays on the CNN grid: row 0 is the top row.
Plotly places an image pixel or a heatmap cell with its CENTRE at x0 (+ i * dx), so a trace
spanning [0, W] starts at x0 = dx / 2.

Every builder returns a ``go.Figure``; ``builder.spec(...)`` returns the same figure as a
plain dict ({"data": [...], "layout": {...}}). Figures are assembled as such dicts and wrapped
without Plotly's validation, which cost 10-20x the arithmetic on every slider move (52 ms ->
3.5 ms for a page of 4 decoder maps); the page skips Plotly's object model altogether (the
dicts go to the browser as they are). The tests validate every builder's output instead
(``tests/test_figures.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from detr_viz.display import DisplayImage
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid

if TYPE_CHECKING:  # a type only: importing figures must not pull in torch
    from detr_viz.analysis import Detection

COLORSCALES = ("Viridis", "Inferno", "Magma", "Cividis", "Jet")
PALETTE = tuple(qualitative.Plotly)
NO_DETECTIONS = "No detections above the threshold — lower it in the sidebar."
NO_POINTS = "No points chosen — click the photo to pick one."
Box = tuple[float, float, float, float]
Spec = dict  # {"data": [trace dicts], "layout": {...}}
_MARGIN = {"l": 4, "r": 4, "t": 36, "b": 4}


def _public(build_spec):
    """A builder returning a ``go.Figure``; ``builder.spec(...)`` gives the same figure as the
    plain dict, for callers that skip Plotly's object model (the page: ~40 ms a figure)."""

    @functools.wraps(build_spec)
    def build(*args, **kwargs) -> go.Figure:
        return figure(build_spec(*args, **kwargs))

    build.spec = build_spec
    return build


@_public
def detections_figure(
    display: DisplayImage, detections: list[Detection], height: int = 500
) -> Spec:
    """The photo with one outlined, hoverable box per detection (boxes in original pixels)."""
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(detections))]
    boxes = [_box(d.box, c, _describe(d)) for d, c in zip(detections, colors, strict=True)]
    labels = [
        {"x": d.box[0], "y": d.box[1], "text": f"{d.name} {d.score:.2f}", "showarrow": False,
         "xanchor": "left", "yanchor": "top", "bgcolor": c, "font": {"color": "white", "size": 12},
         "xref": "x", "yref": "y"}
        for d, c in zip(detections, colors, strict=True)
    ]
    spec = {"data": [_photo(display), *boxes], "layout": {"annotations": labels}}
    n = len(detections)
    title = f"{n} detection{'s' if n != 1 else ''}" if n else NO_DETECTIONS
    _photo_axes(spec, display.original_size)
    return _style(spec, height, title)


@_public
def attention_heatmap(
    attention: np.ndarray, title: str, colorscale: str = "Viridis", height: int = 400,
    show_scale: bool = False, marker_cell: tuple[int, int] | None = None,
) -> Spec:
    """An (h, w) map at feature resolution, axes in cell indices, row 0 at the top."""
    z = _as_map(attention)
    spec = {"data": [_cell_heatmap(z, colorscale, show_scale)], "layout": {"shapes": []}}
    if marker_cell is not None:
        r, c = marker_cell
        spec["layout"]["shapes"].append({"type": "rect", "x0": c - 0.5, "x1": c + 0.5,
                                         "y0": r - 0.5, "y1": r + 0.5, "xref": "x", "yref": "y",
                                         "line": {"color": "red", "width": 2}})
    _cell_axes(spec, z.shape)
    return _style(spec, height, title)


@_public
def attention_overlay(
    display: DisplayImage, attention: np.ndarray, grid: FeatureGrid, *, opacity: float = 0.6,
    colorscale: str = "Viridis", smooth: bool = False, box: Box | None = None,
    marker: tuple[float, float, float, float] | None = None, title: str | None = None,
    height: int = 500,
) -> Spec:
    """The photo with the (h, w) map drawn over it where each cell truly lies.

    ``box`` (x0, y0, x1, y1) and ``marker`` (x, y, rx, ry), an ellipse, are in original pixels.
    """
    _check_display(display, grid)
    spec = {"data": [_photo(display), _overlay(attention, grid, opacity, colorscale, smooth)],
            "layout": {"shapes": []}}
    if box is not None:
        spec["data"].append(_box(box, "white", None))
    if marker is not None:
        spec["layout"]["shapes"].append(_marker(marker))
    _photo_axes(spec, display.original_size)
    return _style(spec, height, title)


@_public
def decoder_grid(
    display: DisplayImage, grid: FeatureGrid, detections: list[Detection], maps: np.ndarray,
    *, opacity: float = 0.6, colorscale: str = "Viridis", smooth: bool = False,
    height_per_row: int = 260, titles: Sequence[str] | None = None,
) -> Spec:
    """The notebook's figure for a page of n detections: 2 rows x n columns.

    Top: each query's (n, h, w) ``maps[i]`` at feature resolution, titled "query 17: cup 0.98"
    (or ``titles[i]``); bottom: the photo with that query's box and its map overlaid. n = 0
    gives a note. Axes: panel (row, col) uses ``x{k}`` / ``y{k}`` with k = row * n + col + 1.
    """
    maps = _detection_maps(display, grid, detections, maps)
    n = len(detections)
    if n == 0:
        return _blank(NO_DETECTIONS, 2 * height_per_row)
    if titles is None:
        titles = [f"query {d.query}: {d.name} {d.score:.2f}" for d in detections]
    spec = panels(2, n, list(titles) + [""] * n, min(0.02, 1 / max(n - 1, 1)), 0.06)
    for i, (det, attention) in enumerate(zip(detections, maps, strict=True)):
        top, bottom = i + 1, n + i + 1
        spec["data"].append(_cell_heatmap(attention, colorscale, False, top))
        _cell_axes(spec, grid.shape, top)
        spec["data"] += [_photo(display, bottom),
                         _overlay(attention, grid, opacity, colorscale, smooth, bottom),
                         _box(det.box, PALETTE[i % len(PALETTE)], _describe(det), bottom)]
        _photo_axes(spec, display.original_size, bottom)
    return _style(spec, 2 * height_per_row, None)


@_public
def encoder_panels(
    display: DisplayImage, grid: FeatureGrid, points: Sequence[tuple[float, float]],
    maps: Sequence[np.ndarray], *, opacity: float = 0.6, colorscale: str = "Viridis",
    smooth: bool = False, title_fmt: str = "point ({x:.0f}, {y:.0f}) -> cell ({row}, {col})",
    height: int = 400,
) -> Spec:
    """Encoder self-attention around each chosen point, panels side by side.

    ``points``: (x, y) in original pixels; ``maps[i]``: (h, w) map of point i. Each panel marks
    the point's cell with a circle of radius stride / 2 (input pixels) at the cell centre.
    ``title_fmt`` is formatted with x, y, row and col.
    """
    _check_display(display, grid)
    if len(points) != len(maps):
        raise ArgumentError(f"{len(points)} points but {len(maps)} attention maps.")
    if not points:
        return _blank(NO_POINTS, height)
    cells = [grid.cell_at(x, y) for x, y in points]
    titles = [title_fmt.format(x=x, y=y, row=r, col=c)
              for (x, y), (r, c) in zip(points, cells, strict=True)]
    spec = panels(1, len(points), titles, 0.02, 0.0)
    for i, (attention, cell) in enumerate(zip(maps, cells, strict=True)):
        k = i + 1
        spec["data"] += [_photo(display, k), _overlay(attention, grid, opacity, colorscale,
                                                      smooth, k)]
        spec["layout"]["shapes"].append(
            _marker((*grid.cell_center(*cell), *grid.cell_radius()), k))
        _photo_axes(spec, display.original_size, k)
    return _style(spec, height, None)


# --- building blocks (also used by overview_figures and compare_figures) --------------------

def panels(rows: int, cols: int, titles: Sequence[str], h_spacing: float,
           v_spacing: float) -> Spec:
    """An empty spec laid out as make_subplots does: panel k = row * cols + col + 1 (from the
    top left) owns axes x{k} / y{k} over its domain, titled ``titles[k - 1]``."""
    width = (1 - (cols - 1) * h_spacing) / cols
    height = (1 - (rows - 1) * v_spacing) / rows if rows > 1 else 1.0
    layout: dict = {"annotations": [], "shapes": []}
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c + 1
            x0, y1 = c * (width + h_spacing), 1 - r * (height + v_spacing)
            layout[_axis("x", k)] = {"domain": [x0, x0 + width], "anchor": _ref("y", k)}
            layout[_axis("y", k)] = {"domain": [max(y1 - height, 0.0), y1],
                                     "anchor": _ref("x", k)}
            if titles[k - 1]:
                layout["annotations"].append({
                    "text": titles[k - 1], "x": x0 + width / 2, "y": y1, "xref": "paper",
                    "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                    "showarrow": False, "font": {"size": 12}})
    return {"data": [], "layout": layout}


def _axis(letter: str, k: int) -> str:
    return f"{letter}axis" if k == 1 else f"{letter}axis{k}"


def _ref(letter: str, k: int) -> str:
    return letter if k == 1 else f"{letter}{k}"


def _on(trace: dict, k: int) -> dict:
    trace["xaxis"], trace["yaxis"] = _ref("x", k), _ref("y", k)
    return trace


def _photo(display: DisplayImage, k: int = 1) -> dict:
    """The photo spanning exactly [0, W] x [0, H]: pixel i's centre is at (i + 0.5) * dx."""
    dx, dy = display.pixel_size
    return _on({"type": "image", "source": display.source, "x0": dx / 2, "y0": dy / 2,
                "dx": dx, "dy": dy, "hoverinfo": "skip", "name": "photo"}, k)


def _overlay(attention: np.ndarray, grid: FeatureGrid, opacity: float, colorscale: str,
             smooth: bool, k: int = 1) -> dict:
    """(h, w) map whose cell (r, c) spans original pixels [c*s/sx, (c+1)*s/sx) x (rows)."""
    z = _as_map(attention)
    if z.shape != grid.shape:
        raise ArgumentError(f"attention map has shape {z.shape} but the feature grid is "
                            f"{grid.shape[0]}x{grid.shape[1]}.")
    (sx, sy), s = grid.scale, grid.stride
    dx, dy = s / sx, s / sy
    # plotly.js gives a heatmap point's [row, col] as pointNumber: no (h, w) grid of hover
    # strings to send (300 KB for five DC5 panels)
    return _on({"type": "heatmap", "z": z, "x0": dx / 2, "dx": dx, "y0": dy / 2, "dy": dy,
                "zsmooth": "best" if smooth else False, "opacity": opacity,
                "colorscale": colorscale, "showscale": False,
                "hovertemplate": "row %{pointNumber[0]}, col %{pointNumber[1]}: %{z:.4g}"
                                 "<extra></extra>", "name": "attention"}, k)


def _cell_heatmap(z: np.ndarray, colorscale: str, show_scale: bool, k: int = 1) -> dict:
    """(h, w) map with cell (r, c) centred on x = c, y = r."""
    return _on({"type": "heatmap", "z": _as_map(z), "x0": 0, "dx": 1, "y0": 0, "dy": 1,
                "colorscale": colorscale, "showscale": show_scale,
                "hovertemplate": "row %{y}, col %{x}: %{z:.4g}<extra></extra>",
                "name": "attention"}, k)


def _box(box: Box, color: str, hover: str | None, k: int = 1) -> dict:
    """A closed rectangle outline (x0, y0, x1, y1); hovering anywhere inside shows ``hover``."""
    x0, y0, x1, y1 = box
    return _on({"type": "scatter", "x": [x0, x1, x1, x0, x0], "y": [y0, y0, y1, y1, y0],
                "mode": "lines", "line": {"color": color, "width": 3}, "fill": "toself",
                "fillcolor": "rgba(0,0,0,0)", "hoveron": "fills+points" if hover else "points",
                "text": hover, "hoverinfo": "text" if hover else "skip", "showlegend": False,
                "name": "box"}, k)


def _describe(det: Detection) -> str:
    x0, y0, x1, y1 = (round(v) for v in det.box)
    return (f"query {det.query}<br>class {det.name}<br>score {det.score:.2f}"
            f"<br>box ({x0}, {y0}, {x1}, {y1})")


def _marker(marker: tuple[float, float, float, float], k: int = 1) -> dict:
    """An ellipse (x, y, rx, ry) in the data frame of panel k, as a layout shape."""
    x, y, rx, ry = marker
    return {"type": "circle", "x0": x - rx, "x1": x + rx, "y0": y - ry, "y1": y + ry,
            "xref": _ref("x", k), "yref": _ref("y", k), "line": {"color": "red", "width": 2}}


def _photo_axes(spec: Spec, size: tuple[int, int], k: int = 1) -> None:
    """Clip to [0, W] x [H, 0] (y down), one unit per pixel on both axes, no ticks."""
    width, height = size
    layout = spec["layout"]
    layout.setdefault(_axis("x", k), {}).update(range=[0, width], constrain="domain",
                                                visible=False)
    layout.setdefault(_axis("y", k), {}).update(
        range=[height, 0], scaleanchor=_ref("x", k), scaleratio=1, constrain="domain",
        constraintoward="top", visible=False)


def _cell_axes(spec: Spec, shape: tuple[int, int], k: int = 1) -> None:
    """Cell-index axes, row 0 at the top, square cells."""
    h, w = shape
    layout = spec["layout"]
    layout.setdefault(_axis("x", k), {}).update(range=[-0.5, w - 0.5], constrain="domain",
                                                visible=False)
    layout.setdefault(_axis("y", k), {}).update(
        range=[h - 0.5, -0.5], scaleanchor=_ref("x", k), scaleratio=1, constrain="domain",
        constraintoward="top", visible=False)


def _as_map(attention: np.ndarray) -> np.ndarray:
    z = np.asarray(attention, dtype=np.float32)
    if z.ndim != 2:
        raise ArgumentError(f"an attention map must be 2-D (h, w), not shape {z.shape}.")
    return z


def _check_display(display: DisplayImage, grid: FeatureGrid) -> None:
    if tuple(display.original_size) != tuple(grid.original_size):
        raise ArgumentError(f"the photo is {display.original_size} but the analysis was of a "
                            f"{grid.original_size} image; analyse this photo first.")


def _detection_maps(display: DisplayImage, grid: FeatureGrid, detections: Sequence,
                    maps: np.ndarray) -> np.ndarray:
    """``maps`` as float32 (n, h, w), one per detection on ``grid``, after checking that
    ``display`` shows the analysed photo."""
    _check_display(display, grid)
    maps = np.asarray(maps, dtype=np.float32)
    n = len(detections)
    if maps.shape != (n, *grid.shape):
        raise ArgumentError(f"maps have shape {maps.shape}; {n} detections on a "
                            f"{grid.shape[0]}x{grid.shape[1]} grid need {(n, *grid.shape)}.")
    return maps


def _blank(message: str, height: int) -> Spec:
    spec = {"data": [], "layout": {
        "annotations": [{"text": message, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                         "showarrow": False, "font": {"size": 16}}],
        "xaxis": {"visible": False}, "yaxis": {"visible": False}}}
    return _style(spec, height, None)


def _style(spec: Spec, height: int, title: str | None) -> Spec:
    spec["layout"].update(height=height, margin=_MARGIN, showlegend=False,
                          plot_bgcolor="rgba(0,0,0,0)", title={"text": title} if title else None)
    return spec


def figure(spec: Spec) -> go.Figure:
    """``go.Figure(spec)`` without Plotly's per-property validation (tests validate instead).

    ``_validate`` is a keyword of Plotly's figure constructor since 4.x; should it ever go,
    the validating constructor is the fallback.
    """
    try:
        return go.Figure(spec, _validate=False)
    except TypeError:  # a Plotly without the keyword (tests/test_ui_charts.py)
        return go.Figure(spec)


# The building blocks of the other figure modules (overview_figures, compare_figures), so that
# every figure draws in the same frames: the photo spans [0, W] x [0, H] with y down, and a
# map's cells lie where the feature grid puts them.
photo_trace = _photo
overlay_trace = _overlay
box_trace = _box
marker_shape = _marker
photo_axes = _photo_axes
check_display = _check_display

def blank_figure(message: str, height: int) -> go.Figure:
    return figure(_blank(message, height))


def style_figure(spec: Spec, height: int, title: str | None) -> go.Figure:
    return figure(_style(spec, height, title))
