"""One query's (or token's) sampling points on the photo, and the maps their weights make.

    frame = InputFrame(photo_size=(640, 480), input_size=(800, 600), padded_size=(800, 608))
    points = sampling_points(cap, frame, query=3, layer=-1)   # SamplingPoints, photo pixels
    points.locations[head, level, point]                      # (x, y) photo pixels
    maps = splat(cap.decoder, cap.spatial_shapes, 3, layer=-1, head=None)  # per level (h_l, w_l)

Family-agnostic: ``cap`` is a :class:`~detr_viz.sampling_capture.SamplingCapture` of any family.

Frames (see :mod:`detr_viz.geometry`). The model's input is the photo resized to
``input_size`` and padded on the right and bottom to ``padded_size`` (the size of
``pixel_values``; no padding: the same). Feature level l is an (h_l, w_l) grid over the padded
input at stride s_l: cell c covers model-input pixels [c s_l, (c + 1) s_l), the last cells
overhanging the input when it is not a multiple of s_l. A captured location is normalised to
the level's whole grid, padding included (what grid_sample reads, and what the valid ratios of
Deformable DETR, LW-DETR and RF-DETR have already been applied to), so it sits at model-input
pixel x w_l s_l and at photo pixel x w_l s_l / sx, sx = input width / photo width (y alike).
A location at the centre of cell (r, c) therefore lands on that cell's centre in the photo;
padding only widens the grid (the photo stays at the top-left) and changes nothing else. The
same normalised point may land a few pixels apart on two levels, exactly as their cells do.
References are converted on level 0's grid (the finest), as the module used them there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from detr_viz.errors import ArgumentError


@dataclass(frozen=True)
class InputFrame:
    """Where the photo sits in the model input: sizes (W, H) in pixels of the photo, of the
    photo resized (``input_size``), and of ``pixel_values`` with its padding."""

    photo_size: tuple[int, int]
    input_size: tuple[int, int]
    padded_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): model-input pixels per photo pixel."""
        return (self.input_size[0] / self.photo_size[0], self.input_size[1] / self.photo_size[1])


@dataclass(frozen=True, eq=False)
class SamplingPoints:
    """Where one query (decoder) or token (encoder) of one layer samples, in photo pixels.

    ``locations`` (heads, levels, points, 2): (x, y) photo pixels, float64, NaN on padding
    slots (a level with fewer points); ``weights`` (heads, levels, points), each head summing to
    1, 0 on padding. ``reference``: (2,) point (x, y) or (4,) box (cx, cy, w, h), photo pixels.
    ``level_shapes[l]`` = (h_l, w_l), ``strides[l]`` in model-input pixels per cell,
    ``points_per_level[l]`` real points; ``sampler`` "bilinear" or "discrete"."""

    stack: str
    index: int
    layer: int
    locations: Tensor
    weights: Tensor
    reference: Tensor
    level_shapes: tuple[tuple[int, int], ...]
    strides: tuple[int, ...]
    points_per_level: tuple[int, ...]
    sampler: str


def level_strides(shapes: tuple[tuple[int, int], ...], padded_size: tuple[int, int]
                  ) -> tuple[int, ...]:
    """Stride s_l of each (h_l, w_l) level over a (W, H) padded input: the power of two with
    (ceil(H / s), ceil(W / s)) = (h_l, w_l) (ResNet, HGNet: convolutions pad the last cell),
    else the power of two whose cells stop less than two cells short of each edge (a ViT
    drops the last partial patch, and LW-DETR's projectors rescale its grid: 66 patches of 16
    over 1066 pixels make 132 cells of 8 and 33 of 32), else the smallest integer that fits
    either way (a DINOv2 patch of 14); ArgumentError if none does."""
    w_in, h_in = padded_size

    def fits(s: int, h: int, w: int) -> bool:
        return (math.ceil(h_in / s), math.ceil(w_in / s)) == (h, w)

    def cropped(s: int, h: int, w: int) -> bool:
        return 0 <= h_in - h * s < 2 * s and 0 <= w_in - w * s < 2 * s

    strides = []
    for h, w in shapes:
        found = next((2**k for k in range(12) if fits(2**k, h, w)), None)
        found = found or next((2**k for k in range(12) if cropped(2**k, h, w)), None)
        found = found or next((s for s in range(1, 2049) if fits(s, h, w)), None)
        found = found or next((s for s in range(1, 2049) if cropped(s, h, w)), None)
        if found is None:
            raise ArgumentError(f"a {h}x{w} feature level fits no stride of a {w_in}x{h_in} "
                                "input; give the size of pixel_values, padding included.")
        strides.append(found)
    return tuple(strides)


def photo_pixels(locations: Tensor, shapes: tuple[tuple[int, int], ...],
                 frame: InputFrame) -> Tensor:
    """``locations`` (..., levels, points, 2), normalised per level as captured -> (x, y)
    photo pixels, float64, (0, 0) the photo's top-left corner (module docstring)."""
    if locations.shape[-3] != len(shapes) or locations.shape[-1] != 2:
        raise ArgumentError(f"locations of shape {tuple(locations.shape)} do not have "
                            f"(..., {len(shapes)} levels, points, 2).")
    return locations.double() * _per_unit(shapes, frame)[:, None, :]  # (levels, 1, 2)


def reference_pixels(reference: Tensor, shapes: tuple[tuple[int, int], ...],
                     frame: InputFrame) -> Tensor:
    """References (..., 2) points or (..., 4) (cx, cy, w, h) boxes, normalised on level 0's
    grid as the module used them -> photo pixels, float64."""
    per_unit = _per_unit(shapes, frame)[0]
    return reference.double() * (per_unit if reference.shape[-1] == 2 else per_unit.repeat(2))


def _per_unit(shapes, frame: InputFrame) -> Tensor:
    """(levels, 2): photo pixels per unit of normalised x and y on each level."""
    (sx, sy), strides = frame.scale, level_strides(shapes, frame.padded_size)
    return torch.tensor([[w * s / sx, h * s / sy] for (h, w), s in zip(shapes, strides,
                                                                       strict=True)],
                        dtype=torch.float64)


def sampling_points(capture, frame: InputFrame, index: int, layer: int = -1, *,
                    encoder: bool = False) -> SamplingPoints:
    """Query ``index``'s sampling points in decoder ``layer`` (negative counts from the end),
    or token ``index``'s in a deformable encoder's layer with ``encoder=True``, in photo
    pixels. ``capture``: a :class:`~detr_viz.sampling_capture.SamplingCapture`."""
    stack = _stack(capture, encoder)
    layers, count = stack.weights.shape[:2]
    layer = _checked("layer", layer, layers)
    index = _checked("token" if encoder else "query", index, count)
    shapes = capture.spatial_shapes
    reference = reference_pixels(stack.references[layer][index, 0], shapes, frame)
    return SamplingPoints(
        stack="encoder" if encoder else "decoder", index=index, layer=layer,
        locations=photo_pixels(stack.locations[layer, index], shapes, frame),
        weights=stack.weights[layer, index].double(), reference=reference,
        level_shapes=shapes, strides=level_strides(shapes, frame.padded_size),
        points_per_level=stack.points_per_level, sampler=stack.sampler)


def splat(stack, shapes: tuple[tuple[int, int], ...], index: int, layer: int = -1,
          head: int | None = None) -> tuple[Tensor, ...]:
    """Per level l, the (h_l, w_l) float64 map of the weights of ``index``'s points in
    ``layer`` and ``head`` (None: the mean of heads) of ``stack`` (a
    :class:`~detr_viz.sampling_capture.SamplingStack`), spread with the very coefficients the
    sampler used: grid_sample's bilinear ones (``align_corners=False``, corners outside the
    map take nothing), or the whole weight on the one cell a discrete sampler reads. So
    ``maps[l].flatten() @ values_l`` (values (h_l * w_l, d), row-major) is the sampler's
    weighted sum on level l."""
    layers, count, heads = stack.weights.shape[:3]
    layer, index = _checked("layer", layer, layers), _checked("query", index, count)
    if head is not None:
        _checked("head", head, heads)
    chosen = slice(None) if head is None else slice(head, head + 1)
    xy = stack.locations[layer, index, chosen]  # (heads', levels, points, 2)
    weight = stack.weights[layer, index, chosen].double() / xy.shape[0]
    maps = []
    for level, ((h, w), n) in enumerate(zip(shapes, stack.points_per_level, strict=True)):
        points, share = xy[:, level, :n].reshape(-1, 2), weight[:, level, :n].reshape(-1)
        spread = splat_level if stack.sampler == "bilinear" else _splat_discrete
        maps.append(spread(points, share, (h, w)))
    return tuple(maps)


def splat_level(locations: Tensor, weights: Tensor, shape: tuple[int, int]) -> Tensor:
    """The weights (N,) of points at ``locations`` (N, 2), normalised to a (h, w) map as
    grid_sample's ``align_corners=False`` reads them, spread over the map's cells with the
    bilinear coefficients grid_sample samples with: (h, w) float64. A corner outside the map
    (grid_sample's zero padding) takes nothing, so the map sums to the weight total only for
    points at least half a cell inside the map."""
    h, w = shape
    u = locations[:, 0].double() * w - 0.5  # cell coordinates, centres at integers
    v = locations[:, 1].double() * h - 0.5
    u0, v0 = u.floor(), v.floor()
    fu, fv, weights = u - u0, v - v0, weights.double()
    out = torch.zeros(h * w, dtype=torch.float64)
    for dy, dx, share in ((0, 0, (1 - fv) * (1 - fu)), (0, 1, (1 - fv) * fu),
                          (1, 0, fv * (1 - fu)), (1, 1, fv * fu)):
        x, y = u0 + dx, v0 + dy
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        out.index_add_(0, (y * w + x)[inside].long(), (weights * share)[inside])
    return out.view(h, w)


def _splat_discrete(locations: Tensor, weights: Tensor, shape: tuple[int, int]) -> Tensor:
    """RT-DETRv2's and D-FINE's ``decoder_method="discrete"``: each weight goes whole to cell
    (clamp(floor(y h + 0.5)), clamp(floor(x w + 0.5))) of the (h, w) map, as their code reads
    it (its int64 cast truncates, which the clamp makes the same as floor)."""
    h, w = shape
    col = (locations[:, 0].double() * w + 0.5).floor().clamp(0, w - 1).long()
    row = (locations[:, 1].double() * h + 0.5).floor().clamp(0, h - 1).long()
    out = torch.zeros(h * w, dtype=torch.float64)
    return out.index_add_(0, row * w + col, weights.double()).view(h, w)


def _stack(capture, encoder: bool):
    stack = capture.encoder if encoder else capture.decoder
    if stack is None:
        raise ArgumentError("this capture has no encoder sampling points: capture with "
                            "encoder=True (and a family with a deformable encoder).")
    return stack


def _checked(what: str, value: int, count: int) -> int:
    if not -count <= value < count:
        raise ArgumentError(f"{what} {value} is out of range (0..{count - 1}).")
    return value % count
