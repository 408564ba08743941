"""Two backbones side by side: pure figures of matched detections and of one clicked point.

Each panel draws the photo in original pixels (x in [0, W], y down) and a map on ITS OWN
feature grid, with :func:`detr_viz.figures.overlay_trace`: a stride-32 map and a DC5
(stride-16) map of the same photo each lie where their cells truly are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from detr_viz import figures
from detr_viz.compare import Match
from detr_viz.display import DisplayImage
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid

NO_MATCHES = "No object found by both models — lower the threshold in the sidebar."
CELL_COLORS = ("red", "cyan")  # the clicked cell of model A, of model B


def comparison_figure(
    display: DisplayImage, grid_a: FeatureGrid, grid_b: FeatureGrid, pairs: Sequence[Match],
    maps_a: np.ndarray, maps_b: np.ndarray, *, labels: tuple[str, str] = ("A", "B"),
    opacity: float = 0.6, colorscale: str = "Viridis", smooth: bool = False,
    height_per_row: int = 320,
) -> go.Figure:
    """One row per matched pair: A's decoder map and B's, each over the photo on its own grid.

    ``maps_a``: (n, *grid_a.shape), the map of ``pairs[i].a.query`` at row i; ``maps_b`` the
    same on ``grid_b``; n = len(pairs). Each panel outlines its own detection's box (original
    pixels) and is titled "R50 · query 17: cup 0.98 · IoU 0.91". No pairs gives a note.
    """
    for grid in (grid_a, grid_b):
        figures.check_display(display, grid)
    maps_a, maps_b = _stack(maps_a, len(pairs), grid_a), _stack(maps_b, len(pairs), grid_b)
    if not pairs:
        return figures.blank_figure(NO_MATCHES, height_per_row)
    titles = [f"{label} · query {d.query}: {d.name} {d.score:.2f} · IoU {pair.iou:.2f}"
              for pair in pairs for label, d in zip(labels, (pair.a, pair.b), strict=True)]
    spec = figures.panels(len(pairs), 2, titles, 0.02, min(0.06, 0.3 / len(pairs)))
    for i, pair in enumerate(pairs):
        colour = figures.PALETTE[i % len(figures.PALETTE)]
        for col, (grid, attention, det) in enumerate(
            [(grid_a, maps_a[i], pair.a), (grid_b, maps_b[i], pair.b)]
        ):
            k = 2 * i + col + 1
            _add_panel(spec, display, grid, attention, k, opacity, colorscale, smooth)
            spec["data"].append(figures.box_trace(det.box, colour, _describe(det, pair.iou), k))
    return figures.style_figure(spec, height_per_row * len(pairs), None)


def encoder_comparison_figure(
    display: DisplayImage, grid_a: FeatureGrid, grid_b: FeatureGrid, point: tuple[float, float],
    map_a: np.ndarray, map_b: np.ndarray, *, labels: tuple[str, str] = ("A", "B"),
    opacity: float = 0.6, colorscale: str = "Viridis", smooth: bool = False, height: int = 420,
) -> go.Figure:
    """The encoder map of one clicked ``point`` (x, y original pixels) in A and in B.

    ``map_a`` is (h, w) on ``grid_a``, ``map_b`` on ``grid_b``. The point lands in a cell of
    each grid (a 32 px cell and, for DC5, a 16 px one): both panels outline BOTH cells, A's in
    red and B's in cyan (legend), at ``grid.cell_bounds(*grid.cell_at(*point))``.
    """
    grids = (grid_a, grid_b)
    for grid in grids:
        figures.check_display(display, grid)
    cells = [grid.cell_at(*point) for grid in grids]
    titles = [f"{label}: cell {cell} of {g.shape[0]}x{g.shape[1]} (stride {g.stride})"
              for label, cell, g in zip(labels, cells, grids, strict=True)]
    spec = figures.panels(1, 2, titles, 0.02, 0.0)
    for k, (grid, attention) in enumerate(zip(grids, (map_a, map_b), strict=True), start=1):
        _add_panel(spec, display, grid, attention, k, opacity, colorscale, smooth)
        for label, cell, g, colour in zip(labels, cells, grids, CELL_COLORS, strict=True):
            outline = figures.box_trace(g.cell_bounds(*cell), colour, f"{label}: cell {cell}", k)
            outline.update(name=f"{label} cell {cell}, {g.stride} px", legendgroup=label,
                           showlegend=k == 1, line={"color": colour, "width": 2})
            spec["data"].append(outline)
        spec["data"].append(_point(point, k))
    fig = figures.style_figure(spec, height, None)
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.02, "yanchor": "top"})
    return fig


def _add_panel(spec: dict, display: DisplayImage, grid: FeatureGrid, attention: np.ndarray,
               k: int, opacity: float, colorscale: str, smooth: bool) -> None:
    """The photo and ``attention`` (h, w) on ``grid`` in panel k, photo axes."""
    spec["data"] += [figures.photo_trace(display, k),
                     figures.overlay_trace(attention, grid, opacity, colorscale, smooth, k)]
    figures.photo_axes(spec, display.original_size, k)


def _point(point: tuple[float, float], k: int) -> dict:
    x, y = point
    trace = {"type": "scatter", "x": [x], "y": [y], "mode": "markers", "showlegend": False,
             "name": "point", "marker": {"symbol": "x", "size": 6, "color": "white",
                                         "line": {"color": "black", "width": 1}},
             "hovertemplate": f"point ({x:.0f}, {y:.0f})<extra></extra>"}
    trace["xaxis"], trace["yaxis"] = ("x", "y") if k == 1 else (f"x{k}", f"y{k}")
    return trace


def _describe(det, iou: float) -> str:
    x0, y0, x1, y1 = (round(v) for v in det.box)
    return (f"query {det.query}<br>class {det.name}<br>score {det.score:.2f}<br>IoU {iou:.2f}"
            f"<br>box ({x0}, {y0}, {x1}, {y1})")


def _stack(maps: np.ndarray, n: int, grid: FeatureGrid) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    if n == 0 and maps.size == 0:
        return maps.reshape(0, *grid.shape)
    if maps.shape != (n, *grid.shape):
        raise ArgumentError(f"maps have shape {maps.shape}; {n} matched pairs on a "
                            f"{grid.shape[0]}x{grid.shape[1]} grid need {(n, *grid.shape)}.")
    return maps
