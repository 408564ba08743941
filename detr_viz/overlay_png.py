"""A map drawn over its photo as a PNG: what the command line writes for each detection.

The map (h, w) is on the feature grid; cell (r, c) covers model-input pixels
[c s, (c + 1) s) x [r s, (r + 1) s), which is stretched onto the original photo by the exact
scale of :class:`~detr_viz.geometry.FeatureGrid` (cells overhanging the input are cut off), so
a cell lands on the photo exactly where the page draws it. No matplotlib: a small colour table.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid

# viridis at 5 stops (dark blue -> yellow), interpolated to 256 entries
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                  dtype=np.float64)
LUT = np.stack([np.interp(np.linspace(0, 4, 256), np.arange(5), _STOPS[:, c])
                for c in range(3)], axis=1).astype(np.uint8)  # (256, 3)


def map_on_photo(attention: np.ndarray, grid: FeatureGrid) -> np.ndarray:
    """(H, W) float32 in original pixels: each pixel the value of the cell it lies in.

    ``attention``: (h, w) on ``grid``; pixel centres are mapped to model-input pixels by the
    grid's scale, then to cells by the stride."""
    z = np.asarray(attention, dtype=np.float32)
    if z.shape != grid.shape:
        raise ArgumentError(f"map of shape {z.shape} for a {grid.shape} feature grid.")
    (width, height), (sx, sy), s = grid.original_size, grid.scale, grid.stride
    rows = np.minimum(((np.arange(height) + 0.5) * sy // s).astype(int), grid.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * sx // s).astype(int), grid.shape[1] - 1)
    return z[rows[:, None], cols[None, :]]


def overlay_png(photo: Image.Image, attention: np.ndarray, grid: FeatureGrid,
                box: tuple[float, float, float, float] | None = None, *, opacity: float = 0.55,
                max_side: int = 1024) -> bytes:
    """PNG bytes: ``photo`` (RGB, original pixels, size ``grid.original_size``) with the map
    coloured (viridis, 0 to the map's maximum) at ``opacity`` and ``box`` (x0, y0, x1, y1,
    original pixels) outlined; scaled so that the longer side is at most ``max_side``."""
    if photo.size != grid.original_size:
        raise ArgumentError(f"photo of size {photo.size} for a grid of {grid.original_size}.")
    values = np.clip(map_on_photo(attention, grid), 0, None)
    top = float(values.max())
    index = (values / top * 255).astype(np.uint8) if top > 0 else np.zeros(values.shape, np.uint8)
    colours = LUT[index].astype(np.float32)
    blended = (1 - opacity) * np.asarray(photo.convert("RGB"), np.float32) + opacity * colours
    image = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
    if box is not None:
        width = max(2, round(max(image.size) / 300))
        ImageDraw.Draw(image).rectangle(box, outline=(255, 64, 64), width=width)
    scale = min(1.0, max_side / max(image.size))
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
