"""Coordinate frames: original-image pixels <-> model-input pixels <-> CNN feature cells.

Three frames, all continuous with (0, 0) at the top-left corner of the top-left pixel:
- original pixels: the oriented photo the user gave, x in [0, W], y in [0, H];
- model-input pixels: the resized image, x_in = x * sx, y_in = y * sy (sx and sy differ
  slightly, because both sides are rounded to whole pixels);
- feature cells: (row, col) on the (h, w) grid of the CNN output, h = ceil(H_in / stride).
  Cell (r, c) covers model-input pixels [c * s, (c + 1) * s) x [r * s, (r + 1) * s); the last
  row and column overhang the image when H_in or W_in is not a multiple of the stride.
Sequences of cells (the attention matrices) are in row-major order: index = row * w + col.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from detr_viz.errors import ArgumentError


@dataclass(frozen=True)
class FeatureGrid:
    """How one image maps onto the feature grid of one model.

    ``original_size`` and ``input_size`` are (width, height) in pixels; ``shape`` is the
    feature grid (h, w); ``stride`` is in model-input pixels per cell (32, or 16 for DC5).
    """

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    shape: tuple[int, int]
    stride: int

    def __post_init__(self):
        (w_in, h_in), (h, w), s = self.input_size, self.shape, self.stride
        if (math.ceil(h_in / s), math.ceil(w_in / s)) != (h, w):
            raise ValueError(
                f"feature grid {h}x{w} does not fit a {w_in}x{h_in} input at stride {s}"
            )

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): model-input pixels per original pixel."""
        return (
            self.input_size[0] / self.original_size[0],
            self.input_size[1] / self.original_size[1],
        )

    @property
    def num_cells(self) -> int:
        return self.shape[0] * self.shape[1]

    def cell_at(self, x: float, y: float) -> tuple[int, int]:
        """The (row, col) cell holding original-pixel point (x, y); the image edge included."""
        width, height = self.original_size
        if not (0 <= x <= width and 0 <= y <= height):
            raise ArgumentError(
                f"point ({x:g}, {y:g}) is outside the {width}x{height} image."
            )
        sx, sy = self.scale
        row = min(int(y * sy // self.stride), self.shape[0] - 1)
        col = min(int(x * sx // self.stride), self.shape[1] - 1)
        return row, col

    def cell_index(self, row: int, col: int) -> int:
        """Position of cell (row, col) in the flattened, row-major sequence."""
        self._check_cell(row, col)
        return row * self.shape[1] + col

    def cell_of_index(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_cells:
            raise ArgumentError(f"cell index {index} is out of range (0..{self.num_cells - 1}).")
        return divmod(index, self.shape[1])

    def cell_center(self, row: int, col: int) -> tuple[float, float]:
        """Centre of cell (row, col) in original pixels; past the edge for an overhanging cell."""
        self._check_cell(row, col)
        sx, sy = self.scale
        return (col + 0.5) * self.stride / sx, (row + 0.5) * self.stride / sy

    def cell_bounds(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of cell (row, col) in original pixels, clipped to the image."""
        self._check_cell(row, col)
        sx, sy = self.scale
        s, (width, height) = self.stride, self.original_size
        return (
            col * s / sx,
            row * s / sy,
            min((col + 1) * s / sx, width),
            min((row + 1) * s / sy, height),
        )

    def cell_radius(self) -> tuple[float, float]:
        """Half a cell, in original pixels along x and y: the marker size for a chosen cell."""
        sx, sy = self.scale
        return self.stride / 2 / sx, self.stride / 2 / sy

    def _check_cell(self, row: int, col: int) -> None:
        h, w = self.shape
        if not (0 <= row < h and 0 <= col < w):
            raise ArgumentError(f"cell ({row}, {col}) is outside the {h}x{w} feature grid.")
