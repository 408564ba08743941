"""Figures of what makes a family worth looking at: Conditional DETR's content and spatial terms,
DAB-DETR's anchor boxes through the decoder layers. Pure functions from records to figures.

    terms_grid(display, grid, detections, {"full": m, "content": c, "spatial": s})
    anchors_figure(display, detections, [analysis.anchor_boxes(d.query) for d in detections])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from detr_viz.analysis import Detection
from detr_viz.display import DisplayImage
from detr_viz.figures import (
    NO_DETECTIONS,
    PALETTE,
    _blank,
    _check_display,
    _public,
    _style,
    box_trace,
    overlay_trace,
    panels,
    photo_axes,
    photo_trace,
)
from detr_viz.geometry import FeatureGrid


@_public
def terms_grid(
    display: DisplayImage, grid: FeatureGrid, detections: Sequence[Detection],
    maps: Mapping[str, np.ndarray], *, opacity: float = 0.6, colorscale: str = "Viridis",
    height_per_row: int = 230,
) -> dict:
    """One row per named map kind (e.g. "full", "content", "spatial"; each (n, h, w) for the n
    ``detections``), one column per detection: the photo with the box and that map overlaid,
    titled "query 17 · spatial". Each map is scaled to its own range."""
    _check_display(display, grid)
    n = len(detections)
    if n == 0:
        return _blank(NO_DETECTIONS, height_per_row)
    kinds = list(maps)
    for kind in kinds:
        if maps[kind].shape != (n, *grid.shape):
            raise ValueError(f"maps[{kind!r}] must be ({n}, {grid.shape[0]}, {grid.shape[1]}), "
                             f"not {maps[kind].shape}")
    titles = [f"query {d.query} · {kind}" for kind in kinds for d in detections]
    spec = panels(len(kinds), n, titles, min(0.02, 1 / max(n - 1, 1)), 0.05)
    for r, kind in enumerate(kinds):
        for i, det in enumerate(detections):
            k = r * n + i + 1
            spec["data"] += [photo_trace(display, k),
                             overlay_trace(maps[kind][i], grid, opacity, colorscale, False, k),
                             box_trace(det.box, PALETTE[i % len(PALETTE)], None, k)]
            photo_axes(spec, display.original_size, k)
    return _style(spec, len(kinds) * height_per_row, None)


@_public
def anchors_figure(
    display: DisplayImage, detections: Sequence[Detection], boxes: Sequence[np.ndarray],
    height: int = 520,
) -> dict:
    """The photo with each detection's box through the decoder layers: ``boxes[i]`` is
    (layers + 1, 4) xyxy photo pixels, the anchor each layer started from, then the final box
    (:meth:`detr_viz.analysis.Analysis.anchor_boxes`). Earlier anchors are dashed and fainter,
    the final box solid; a line joins the centres (the refinement's path); hover names the
    layer."""
    if not detections:
        return _blank(NO_DETECTIONS, height)
    data = [photo_trace(display)]
    for i, (det, trail) in enumerate(zip(detections, boxes, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        steps = len(trail)
        for j, (x0, y0, x1, y1) in enumerate(trail):
            final = j == steps - 1
            what = "final box" if final else f"anchor of layer {j + 1}"
            data.append({
                "type": "scatter", "x": [x0, x1, x1, x0, x0], "y": [y0, y0, y1, y1, y0],
                "mode": "lines", "showlegend": False, "hoverinfo": "text",
                "text": f"query {det.query} ({det.name}): {what}",
                "opacity": 1.0 if final else 0.35 + 0.5 * j / max(steps - 1, 1),
                "line": {"color": color, "width": 3 if final else 1.5,
                         "dash": "solid" if final else "dash"}})
        centres = (trail[:, :2] + trail[:, 2:]) / 2
        data.append({"type": "scatter", "x": centres[:, 0], "y": centres[:, 1],
                     "mode": "lines+markers", "showlegend": False, "hoverinfo": "skip",
                     "line": {"color": color, "width": 1}, "marker": {"size": 5}})
    spec = {"data": data, "layout": {}}
    photo_axes(spec, display.original_size)
    return _style(spec, height, "Anchor boxes through the decoder layers (dashed: the anchor "
                  "each layer started from, fainter = earlier; solid: the final box)")
