"""Deformable attention's sampling points on the photo, and the maps their weights make.

    grids = level_grids(cap.spatial_shapes, original_size, cap.input_size)
    xy = photo_pixels(cap.locations[-1, 3], grids)     # (heads, levels, points, 2) photo pixels
    maps = splat(cap, query=3, layer=-1, head=None)    # per level (h_l, w_l), mean of heads

Frames (see :mod:`detr_viz.geometry`): a location (x, y) normalised to level l's feature map
(:mod:`detr_viz.deformable_capture`) is at x * w_l feature cells from the map's left edge, and
feature cell c of a level with stride s covers model-input pixels [c s, (c + 1) s); so the
location is at model-input pixel x * w_l * s_l, and at photo pixel x * w_l * s_l / sx. Since
w_l = ceil(W_in / s_l), level l's map may overhang the input by up to s_l - 1 pixels on the
right and bottom: the same normalised location lands a few pixels apart on different levels,
exactly as the model's features do. (The model's boxes are normalised to the input itself.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid


def level_grids(shapes: tuple[tuple[int, int], ...], original_size: tuple[int, int],
                input_size: tuple[int, int]) -> tuple[FeatureGrid, ...]:
    """One :class:`FeatureGrid` per level: ``shapes[l]`` = (h_l, w_l), sizes (W, H) in pixels of
    the photo and of the (unpadded) model input. Each level's stride is the smallest power of
    two s with (ceil(H_in / s), ceil(W_in / s)) = (h_l, w_l), as a ResNet and Deformable DETR's
    stride-2 extra levels give it; ArgumentError if none fits (a padded input, say)."""
    w_in, h_in = input_size
    grids = []
    for h, w in shapes:
        stride = next((2**k for k in range(16)
                       if (math.ceil(h_in / 2**k), math.ceil(w_in / 2**k)) == (h, w)), None)
        if stride is None:
            raise ArgumentError(f"a {h}x{w} feature level fits no power-of-two stride of a "
                                f"{w_in}x{h_in} input; give the size of the unpadded input the "
                                "model was run on.")
        grids.append(FeatureGrid(original_size=original_size, input_size=input_size,
                                 shape=(h, w), stride=stride))
    return tuple(grids)


def photo_pixels(locations: Tensor, grids: tuple[FeatureGrid, ...]) -> Tensor:
    """``locations`` (..., levels, points, 2) normalised per level as captured -> the same
    points as (x, y) photo pixels, float64, (0, 0) the photo's top-left corner."""
    if locations.shape[-3] != len(grids) or locations.shape[-1] != 2:
        raise ArgumentError(f"locations of shape {tuple(locations.shape)} do not have "
                            f"(..., {len(grids)} levels, points, 2).")
    per_pixel = torch.tensor([[g.shape[1] * g.stride / g.scale[0], g.shape[0] * g.stride
                               / g.scale[1]] for g in grids], dtype=torch.float64)
    return locations.double() * per_pixel[:, None, :]  # (levels, 1, 2) broadcasts


def splat_level(locations: Tensor, weights: Tensor, shape: tuple[int, int]) -> Tensor:
    """The weights of points at ``locations`` (N, 2), normalised to a (h, w) map as
    grid_sample's ``align_corners=False`` reads them, spread over the map's cells with the
    bilinear coefficients grid_sample samples with: (h, w) float64. A corner outside the map
    (grid_sample's zero padding) takes nothing, so the map sums to the weight total only for
    points at least half a cell inside the map. ``splat_level(...).flatten() @ values`` (values
    (h * w, d), row-major) is what grid_sample returns, summed with the weights."""
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


def splat(capture, query: int, layer: int = -1, head: int | None = None, *,
          encoder: bool = False) -> tuple[Tensor, ...]:
    """Per level l, the (h_l, w_l) float64 map of the weights of ``query``'s sampling points in
    ``layer`` (negative counts from the end) and ``head`` (None: the mean of heads), splatted
    by :func:`splat_level`. ``capture``: a :class:`~detr_viz.deformable_capture.
    DeformableCapture`; ``encoder=True`` reads its encoder record, ``query`` being a token."""
    locations, weights = ((capture.encoder_locations, capture.encoder_weights) if encoder
                          else (capture.locations, capture.weights))
    if locations is None:
        raise ArgumentError("this capture has no encoder sampling points: capture with "
                            "encoder=True.")
    layers, queries, heads = weights.shape[:3]
    for what, value, count in (("layer", layer, layers), ("query", query, queries)):
        if not -count <= value < count:
            raise ArgumentError(f"{what} {value} is out of range (0..{count - 1}).")
    if head is not None and not 0 <= head < heads:
        raise ArgumentError(f"head {head} is out of range (0..{heads - 1}).")
    chosen = slice(None) if head is None else slice(head, head + 1)
    xy, wt = locations[layer, query, chosen], weights[layer, query, chosen]  # (h', L, P, ...)
    share = 1.0 / xy.shape[0]
    return tuple(splat_level(xy[:, level].reshape(-1, 2), wt[:, level].reshape(-1) * share,
                             shape) for level, shape in enumerate(capture.spatial_shapes))
