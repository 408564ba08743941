"""Figures of what makes a family worth looking at: Conditional DETR's content and spatial terms,
DAB-DETR's anchor boxes (and any deformable model's reference boxes) through the decoder layers,
a deformable model's sampling points. Pure functions from records to figures.

    terms_grid(display, grid, detections, {"full": m, "content": c, "spatial": s})
    anchors_figure(display, detections, [analysis.anchor_boxes(d.query) for d in detections])
    sampling_figure(display, detections, [analysis.sampling_points(d.query) for d in ...])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from detr_viz.analysis import Detection
from detr_viz.display import DisplayImage, display_image
from detr_viz.figures import (
    NO_DETECTIONS,
    PALETTE,
    _blank,
    _check_display,
    _on,
    _public,
    _style,
    box_trace,
    overlay_trace,
    panels,
    photo_axes,
    photo_trace,
)
from detr_viz.geometry import FeatureGrid
from detr_viz.sampling import SamplingPoints

COLOR_BY = ("head", "level")


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
    height: int = 520, kind: str = "anchor",
) -> dict:
    """The photo with each detection's box through the decoder layers: ``boxes[i]`` is
    (layers + 1, 4) xyxy photo pixels, the anchor each layer started from, then the final box
    (:meth:`detr_viz.analysis.Analysis.anchor_boxes`). Earlier anchors are dashed and fainter,
    the final box solid; a line joins the centres (the refinement's path); hover names the
    layer. ``kind``: what the boxes are called ("anchor"; "reference" for deformable models,
    whose first reference may be a point: a box of size 0)."""
    if not detections:
        return _blank(NO_DETECTIONS, height)
    data = [photo_trace(display)]
    for i, (det, trail) in enumerate(zip(detections, boxes, strict=True)):
        color = PALETTE[i % len(PALETTE)]
        steps = len(trail)
        for j, (x0, y0, x1, y1) in enumerate(trail):
            final = j == steps - 1
            what = "final box" if final else f"{kind} of layer {j + 1}"
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
    return _style(spec, height, f"{kind.capitalize()} boxes through the decoder layers "
                  f"(dashed: the {kind} each layer started from, fainter = earlier; solid: the "
                  "final box)")


def _dot_sizes(weights: np.ndarray, largest: float) -> np.ndarray:
    """Marker diameters in pixels: area proportional to weight, 3 px for a weight of 0 up to
    15 px for the largest weight in the figure."""
    return 3 + 12 * np.sqrt(np.clip(weights, 0, None) / max(largest, 1e-12))


@_public
def sampling_figure(
    photo: Image.Image, detections: Sequence[Detection], points: Sequence[SamplingPoints],
    *, color_by: str = "head", head: int | None = None, level: int | None = None,
    zoom: bool = True, side: int = 360, quality: int = 80, height: int | None = None,
    title: str | None = None, titles: Sequence[str] | None = None,
) -> dict:
    """One panel per detection: the photo, the detection's box (solid), the reference its
    layer started from (dashed white box, or a white cross for a point), and every sampling
    point of that layer (``points[i]``, photo pixels) as a dot whose area is its weight,
    coloured by head or by level (``color_by``); ``head``, ``level``: that head's or level's
    points only (None: all). Hover gives head, level (stride), point, weight and position.

    ``photo``: the oriented original. With ``zoom`` each panel shows the region of its box,
    reference and points inside the photo (:func:`zoom_region`), as a JPEG crop at most
    ``side`` pixels wide (sharp however small the region); else the whole photo. Points
    outside the panel are not drawn (the caption should say how many fall outside the photo).
    ``titles``: one per panel (default: query, class and layer)."""
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY}, not {color_by!r}")
    n = len(detections)
    if n == 0:
        return _blank(NO_DETECTIONS, height or 300)
    largest = max(float(p.weights.max()) for p in points)
    titles = titles or [f"query {d.query} ({d.name}), layer {p.layer + 1}"
                        for d, p in zip(detections, points, strict=True)]
    spec = panels(1, n, titles, min(0.02, 1 / max(n - 1, 1)), 0.05)
    shown_groups: set[int] = set()
    width, tall = photo.size
    for i, (det, pts) in enumerate(zip(detections, points, strict=True)):
        k = i + 1
        region = zoom_region(pts, det.box, photo.size) if zoom else (0, 0, width, tall)
        spec["data"].append(_crop_trace(photo, region, side, quality, k))
        xy = pts.locations.numpy()  # (heads, levels, points, 2)
        weights = pts.weights.numpy()
        heads, levels, count = weights.shape
        head_of, level_of, _ = np.indices((heads, levels, count))
        real = ~np.isnan(xy[..., 0])
        if level is not None:
            real &= level_of == level
        if head is not None:
            real &= head_of == head
        for group in range(heads if color_by == "head" else levels):
            where = np.argwhere(real & ((head_of if color_by == "head" else level_of) == group))
            if not len(where):
                continue
            h, lv, p = where.T
            w, at = weights[h, lv, p], xy[h, lv, p]
            name = (f"head {group + 1}" if color_by == "head"
                    else f"level {group} (stride {pts.strides[group]})")
            spec["data"].append(_on({
                "type": "scatter", "x": at[:, 0], "y": at[:, 1], "mode": "markers",
                "name": name, "legendgroup": name, "showlegend": group not in shown_groups,
                "marker": {"size": _dot_sizes(w, largest), "color": PALETTE[group % len(PALETTE)],
                           "opacity": 0.75, "line": {"color": "white", "width": 0.5}},
                "hovertemplate": [
                    f"head {a + 1}, level {b} (stride {pts.strides[b]}), point {c + 1}<br>"
                    f"weight {wt:.3f} at ({x:.0f}, {y:.0f})<extra></extra>"
                    for a, b, c, wt, (x, y) in zip(h, lv, p, w, at, strict=True)]}, k))
            shown_groups.add(group)
        spec["data"] += [_reference_trace(pts.reference.numpy(), k),  # over the dots
                         box_trace(det.box, PALETTE[i % len(PALETTE)], None, k)]
        photo_axes(spec, photo.size, k)
        x0, y0, x1, y1 = region
        spec["layout"][f"xaxis{k if k > 1 else ''}"]["range"] = [x0, x1]
        spec["layout"][f"yaxis{k if k > 1 else ''}"]["range"] = [y1, y0]
    # as tall as a panel of the photo's aspect in a column of the page (~1100 px wide)
    height = height or int(min(360, 1100 / max(n, 2) * tall / width) + 70)
    spec = _style(spec, height, title)
    spec["layout"].update(showlegend=True, legend={"orientation": "h", "y": -0.02,
                                                   "yanchor": "top"})
    return spec


def zoom_region(points: SamplingPoints, box, size: tuple[int, int], *, margin: float = 0.2,
                least: float = 0.2) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) photo pixels around a query's box, its reference and its sampling
    points inside the photo, widened by ``margin`` of its size on each side, at least
    ``least`` of the photo's width, of the photo's aspect ratio, inside the photo."""
    width, height = size
    xy = points.locations.numpy().reshape(-1, 2)
    xy = xy[~np.isnan(xy[:, 0])]
    xy = xy[(xy[:, 0] >= 0) & (xy[:, 0] <= width) & (xy[:, 1] >= 0) & (xy[:, 1] <= height)]
    ref = points.reference.numpy()
    if ref.shape[0] == 4:
        cx, cy, w, h = ref
        ref = np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy + h / 2]])
    corners = np.clip(np.concatenate([xy, ref.reshape(-1, 2),
                                      np.reshape(box, (2, 2))]), 0, [width, height])
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    span_x = max((x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin) * width / height,
                 least * width)
    span_x = min(span_x, width)
    span_y = span_x * height / width
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - span_x / 2, 0), width - span_x)
    top = min(max(cy - span_y / 2, 0), height - span_y)
    return float(left), float(top), float(left + span_x), float(top + span_y)


def _crop_trace(photo: Image.Image, region, side: int, quality: int, k: int) -> dict:
    """The ``region`` (x0, y0, x1, y1) of ``photo`` as an image trace in photo pixels."""
    x0, y0, x1, y1 = region
    box = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
    shown = display_image(photo.crop(box), side, quality)
    dx, dy = shown.pixel_size
    return _on({"type": "image", "source": shown.source, "x0": box[0] + dx / 2,
                "y0": box[1] + dy / 2, "dx": dx, "dy": dy, "hoverinfo": "skip",
                "name": "photo"}, k)


def _reference_trace(reference: np.ndarray, k: int) -> dict:
    """The layer's reference: a dashed white box (cx, cy, w, h), or a white cross (x, y)."""
    if reference.shape[0] == 2:
        return _on({"type": "scatter", "x": [reference[0]], "y": [reference[1]],
                    "mode": "markers", "marker": {"symbol": "x-thin", "size": 14,
                                                  "line": {"color": "white", "width": 3}},
                    "showlegend": False, "hoverinfo": "text", "text": "reference point"}, k)
    cx, cy, w, h = reference
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    return _on({"type": "scatter", "x": [x0, x1, x1, x0, x0], "y": [y0, y0, y1, y1, y0],
                "mode": "lines", "line": {"color": "white", "width": 2, "dash": "dash"},
                "showlegend": False, "hoverinfo": "text", "text": "reference box"}, k)
