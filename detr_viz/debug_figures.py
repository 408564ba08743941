"""Figures for debugging detections: every object at once (the DETR paper's Figure 6), the
box edges' maps, the queries that matched a drawn box, and the randomisation check's curves.

Pure functions of records and arrays, drawn in the frames of :mod:`detr_viz.figures` (photo in
original pixels, y down; maps on the feature grid). ``builder.spec(...)`` gives the plain dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from plotly.colors import hex_to_rgb

from detr_viz.errors import ArgumentError
from detr_viz.figures import (
    PALETTE,
    Spec,
    _blank,
    _box,
    _check_display,
    _describe,
    _detection_maps,
    _on,
    _overlay,
    _photo,
    _photo_axes,
    _public,
    _style,
    panels,
)
from detr_viz.geometry import FeatureGrid

if TYPE_CHECKING:  # types only: importing figures must not pull in torch
    from detr_viz.analysis import Detection
    from detr_viz.display import DisplayImage
    from detr_viz.sanity import SanityCheck

NO_DETECTIONS = "No detections above the threshold — lower it in the sidebar."


def owners(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which map owns each cell, and how strongly: ``(owner (h, w) int, strength (h, w))``.

    ``maps`` (n, h, w), n >= 1: each is scaled to its own peak (1.0; an all-zero map stays 0),
    a cell belongs to the map with the largest scaled value there (the lowest index on ties)
    and ``strength`` is that value in [0, 1].
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or not len(maps):
        raise ArgumentError(f"maps must be (n, h, w) with n >= 1, not shape {maps.shape}.")
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    scaled = maps / np.where(peaks > 0, peaks, 1.0)[:, None, None]
    owner = scaled.argmax(axis=0)
    return owner, np.take_along_axis(scaled, owner[None], 0)[0]


def _rgba(color: str, alpha: float) -> str:
    r, g, b = hex_to_rgb(color) if color.startswith("#") else (255, 255, 255)
    return f"rgba({r},{g},{b},{alpha})"


@_public
def composite_figure(display: DisplayImage, grid: FeatureGrid, detections: list[Detection],
                     maps: np.ndarray, *, method: str = "", smooth: bool = False,
                     height: int = 560) -> Spec:
    """The photo with every detection's (h, w) map in the detection's own colour and its box.

    ``maps``: (n, h, w), one per detection, any scale (each is scaled to its peak). Every
    cell shows the detection whose scaled map is largest there (:func:`owners`), opaque in
    proportion to that value; hovering a cell names the query; the legend groups detections
    by class (clicking an entry hides that detection's map and box).
    """
    maps = _detection_maps(display, grid, detections, maps)
    n = len(detections)
    if n == 0:
        return _blank(NO_DETECTIONS, height)
    owner, strength = owners(maps)
    spec: Spec = {"data": [_photo(display)], "layout": {"legend": {"groupclick": "toggleitem"}}}
    order = sorted(range(n), key=lambda i: (detections[i].name, i))  # legend by class
    for i in order:
        det, color = detections[i], PALETTE[i % len(PALETTE)]
        z = np.where(owner == i, strength, np.nan).astype(np.float32)
        layer = _overlay(z, grid, 1.0, [[0, _rgba(color, 0.0)], [1, _rgba(color, 0.85)]],
                         smooth)
        layer.update(zmin=0, zmax=1, name=f"query {det.query}", legendgroup=f"q{det.query}",
                     hovertemplate=f"query {det.query}: {det.name} {det.score:.2f}<br>"
                                   "%{z:.2f} of its peak<extra></extra>")
        box = _box(det.box, color, _describe(det))
        box.update(showlegend=True, name=f"query {det.query} ({det.score:.2f})",
                   legendgroup=f"q{det.query}", legendgrouptitle={"text": det.name})
        spec["data"] += [layer, box]
    _photo_axes(spec, display.original_size)
    title = f"{n} detection{'s' if n != 1 else ''}" + (f": {method}" if method else "")
    _style(spec, height, title)
    spec["layout"]["showlegend"] = True
    return spec


@_public
def edge_figure(display: DisplayImage, grid: FeatureGrid, box: tuple[float, float, float, float],
                maps: np.ndarray, names: Sequence[str], *, opacity: float = 0.6,
                colorscale: str = "Viridis", smooth: bool = False, height: int = 300) -> Spec:
    """One panel per box edge: the photo, that edge's (h, w) map, the box with the edge drawn
    thick. ``maps`` (4, h, w) in the order of ``names`` (left, top, right, bottom)."""
    _check_display(display, grid)
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape != (len(names), *grid.shape):
        raise ArgumentError(f"edge maps have shape {maps.shape}, not {(len(names), *grid.shape)}.")
    x0, y0, x1, y1 = box
    lines = {"left": ([x0, x0], [y0, y1]), "top": ([x0, x1], [y0, y0]),
             "right": ([x1, x1], [y0, y1]), "bottom": ([x0, x1], [y1, y1])}
    spec = panels(1, len(names), [f"{name} edge" for name in names], 0.02, 0.0)
    for k, (name, z) in enumerate(zip(names, maps, strict=True), start=1):
        edge_x, edge_y = lines[name]
        spec["data"] += [
            _photo(display, k), _overlay(z, grid, opacity, colorscale, smooth, k),
            _box(box, "white", None, k),
            _on({"type": "scatter", "x": edge_x, "y": edge_y, "mode": "lines",
                 "line": {"color": "red", "width": 6}, "hoverinfo": "skip",
                 "showlegend": False, "name": f"{name} edge"}, k)]
        _photo_axes(spec, display.original_size, k)
    return _style(spec, height, None)


@_public
def sanity_figure(checks: Sequence[SanityCheck], height: int = 320) -> Spec:
    """One small panel per checked method: Spearman and SSIM of each step's map with the
    original (x: the cascade's steps, top first), titled with the verdict."""
    if not checks:
        return _blank("No sanity check run yet.", height)
    titles = [f"{c.method}: " + ("does NOT depend on the weights" if c.insensitive
                                 else "changes with the weights") for c in checks]
    spec = panels(1, len(checks), titles, 0.06, 0.0)
    for k, check in enumerate(checks, start=1):
        x = [s.replace("decoder layer ", "dec ").replace("encoder layer ", "enc ")
             .replace("class and box heads", "heads") for s in check.steps]
        for name, values, color in (("Spearman", check.spearman, PALETTE[0]),
                                    ("SSIM", check.ssim, PALETTE[1])):
            spec["data"].append(_on({
                "type": "scatter", "x": x, "y": [float(v) for v in values],
                "mode": "lines+markers", "name": name, "legendgroup": name,
                "showlegend": k == 1, "line": {"color": color},
                "hovertemplate": f"{name} after re-drawing %{{x}}: %{{y:.2f}}<extra></extra>"},
                k))
        layout = spec["layout"]
        layout[f"yaxis{'' if k == 1 else k}"].update(range=[-1.05, 1.05], title=(
            {"text": "similarity to the original"} if k == 1 else None))
        layout[f"xaxis{'' if k == 1 else k}"].update(tickangle=-60, type="category")
    _style(spec, height, None)
    spec["layout"]["showlegend"] = True
    spec["layout"]["margin"] = {"l": 50, "r": 4, "t": 36, "b": 70}
    return spec
