"""Sampling points in photo pixels and the maps their weights make, for any deformable family.

Oracles: a splat map dotted with a level's values is what grid_sample (or the discrete lookup)
returns for those points, summed with the weights; its mass is the weight that fell inside the
map, measured by sampling a map of ones. Photo pixels: a location planted at a cell centre lands
on that cell's centre in the photo, with resize and padding, and the model's own valid-ratio
arithmetic (Deformable DETR's encoder references) lands each token on its own cell.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detr_viz.errors import ArgumentError
from detr_viz.sampling import InputFrame, level_strides, photo_pixels, sampling_points, splat
from detr_viz.sampling_capture import capture_sampling

from conftest import raises
from deformable_models import CLASSES, photo, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def captures():
    return {family: capture_sampling(tiny_model(family), photo(family, 9)) for family in CLASSES}


def sampled(points, weights, values, shape, sampler) -> torch.Tensor:
    """sum_p weight_p * value at point p, (d,), by grid_sample or the discrete lookup: values
    (h * w, d) row-major, points (N, 2) normalised, weights (N,)."""
    h, w = shape
    grid = values.T.reshape(1, -1, h, w)
    if sampler == "bilinear":
        at = F.grid_sample(grid, (2 * points - 1)[None, None], mode="bilinear",
                           padding_mode="zeros", align_corners=False)[0, :, 0]  # (d, N)
    else:
        col = (points[:, 0] * w + 0.5).to(torch.int64).clamp(0, w - 1)  # the family's code
        row = (points[:, 1] * h + 0.5).to(torch.int64).clamp(0, h - 1)
        at = grid[0][:, row, col]
    return at @ weights


@pytest.mark.parametrize("family", CLASSES)
def test_splat_dotted_with_values_is_the_samplers_sum(captures, family):
    cap = captures[family]
    stack, gen = cap.decoder, torch.Generator().manual_seed(3)
    for query, layer, head in ((0, 0, 0), (4, -1, 1), (6, 1, None)):
        maps = splat(stack, cap.spatial_shapes, query, layer, head)
        heads = range(2) if head is None else [head]
        for level, (shape, n) in enumerate(zip(cap.spatial_shapes, stack.points_per_level,
                                               strict=True)):
            values = torch.randn(shape[0] * shape[1], 3, generator=gen, dtype=torch.float64)
            expected = sum(sampled(stack.locations[layer, query, h, level, :n],
                                   stack.weights[layer, query, h, level, :n], values, shape,
                                   stack.sampler) for h in heads) / len(heads)
            assert maps[level].shape == shape
            torch.testing.assert_close(maps[level].flatten() @ values, expected, rtol=0,
                                       atol=1e-12)


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr", "rt_detr_v2_discrete"])
def test_splat_mass_is_the_weight_that_fell_inside(captures, family):
    """Measured by sampling a map of ones: a corner outside takes nothing (bilinear), a
    discrete point always lands (clamped), so its mass is its whole weight."""
    cap = captures[family]
    stack = cap.decoder
    for query in range(7):
        maps = splat(stack, cap.spatial_shapes, query, layer=1, head=0)
        for level, (shape, n) in enumerate(zip(cap.spatial_shapes, stack.points_per_level,
                                               strict=True)):
            ones = torch.ones(shape[0] * shape[1], 1, dtype=torch.float64)
            inside = sampled(stack.locations[1, query, 0, level, :n],
                             stack.weights[1, query, 0, level, :n], ones, shape, stack.sampler)
            torch.testing.assert_close(maps[level].sum(), inside[0], rtol=0, atol=1e-12)
            assert (maps[level] >= 0).all()
    if stack.sampler == "discrete":
        total = sum(m.sum() for m in splat(stack, cap.spatial_shapes, 0, 1, 0))
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))


def test_planted_cell_centres_land_on_their_centres_in_the_photo():
    """A 640 x 480 photo resized to 128 x 96 and padded to 160 x 128: the levels cover the
    padded input; the centre of cell (r, c) of a stride-s level is at photo pixel
    ((c + 0.5) s / 0.2, (r + 0.5) s / 0.2)."""
    frame = InputFrame(photo_size=(640, 480), input_size=(128, 96), padded_size=(160, 128))
    shapes = ((16, 20), (8, 10), (4, 5), (2, 3))
    assert level_strides(shapes, frame.padded_size) == (8, 16, 32, 64)
    cells = [(5, 9), (7, 9), (1, 0), (1, 2)]  # the second and last lie in the padding
    locations = torch.tensor([[[(c + 0.5) / w, (r + 0.5) / h]]
                              for (r, c), (h, w) in zip(cells, shapes, strict=True)],
                             dtype=torch.float64)  # (levels, 1 point, 2)
    got = photo_pixels(locations, shapes, frame)
    for level, ((r, c), s) in enumerate(zip(cells, (8, 16, 32, 64), strict=True)):
        assert got[level, 0].tolist() == pytest.approx([(c + 0.5) * s / 0.2,
                                                        (r + 0.5) * s / 0.2], abs=1e-9)
    corner = photo_pixels(torch.full((4, 1, 2), 0.5), shapes, frame)[0, 0]
    assert corner.tolist() == pytest.approx([400, 320])  # half the padded input: 80 / 0.2


def test_valid_ratios_put_each_encoder_token_on_its_own_cell():
    """Deformable DETR scales its references by the valid ratios of a padded input; the
    encoder's reference of token (r, c) of level l, on level l, is that cell's centre, and so
    must land on the cell's centre in the photo. Here through :func:`sampling_points`'s
    reference conversion (level 0) and :func:`photo_pixels` (every level)."""
    model = tiny_model("deformable_detr")
    mask = torch.zeros(1, 96, 128, dtype=torch.long)
    mask[:, :40, :60] = 1  # a 60 x 40 photo region, resized 2x from a 30 x 20 photo
    cap = capture_sampling(model, photo("deformable_detr"), mask, encoder=True)
    frame = InputFrame(photo_size=(30, 20), input_size=(60, 40), padded_size=(128, 96))
    strides = level_strides(cap.spatial_shapes, frame.padded_size)
    references = cap.encoder.references[0]  # (S, levels, 2), valid ratios below 1 applied
    for level, ((h, w), start) in enumerate(zip(cap.spatial_shapes, cap.level_start_index,
                                                strict=True)):
        for r, c in ((0, 0), (h // 2, w // 3), (h - 1, w - 1)):
            token = start + r * w + c
            xy = photo_pixels(references[token][:, None], cap.spatial_shapes, frame)[level, 0]
            centre = [(c + 0.5) * strides[level] / 2, (r + 0.5) * strides[level] / 2]
            assert xy.tolist() == pytest.approx(centre, abs=1e-9)
            if level == 0:
                point = sampling_points(cap, frame, token, layer=0, encoder=True)
                assert point.reference.tolist() == pytest.approx(centre, abs=1e-9)


def test_sampling_points_record(captures):
    cap = captures["d_fine"]
    frame = InputFrame(photo_size=(192, 128), input_size=(96, 64), padded_size=(96, 64))
    points = sampling_points(cap, frame, 3, layer=-1)
    assert (points.stack, points.index, points.layer) == ("decoder", 3, 1)
    assert points.locations.shape == (2, 3, 4, 2) and points.weights.shape == (2, 3, 4)
    assert points.points_per_level == (3, 2, 4) and points.strides == (8, 16, 32)
    assert points.locations[:, 1, 2:].isnan().all() and (points.weights[:, 1, 2:] == 0).all()
    box = cap.decoder.references[1][3, 0].double()  # (cx, cy, w, h), one for every level
    torch.testing.assert_close(points.reference, box * torch.tensor([192, 128, 192, 128]))
    xy = cap.decoder.locations[1, 3, :, 0, :3].double() * torch.tensor([192, 128])
    torch.testing.assert_close(points.locations[:, 0, :3], xy)  # 64 x 96 is 8 x 12 at 8


def test_bad_requests_say_what_to_do(captures):
    cap = captures["rt_detr"]
    frame = InputFrame(photo_size=(96, 64), input_size=(96, 64), padded_size=(96, 64))
    with raises(ArgumentError, "encoder=True"):
        sampling_points(cap, frame, 0, encoder=True)
    with raises(ArgumentError, "query 7", "0..6"):
        sampling_points(cap, frame, 7)
    with raises(ArgumentError, "head 2"):
        splat(cap.decoder, cap.spatial_shapes, 0, head=2)
    with raises(ArgumentError, "layer -3"):
        splat(cap.decoder, cap.spatial_shapes, 0, layer=-3)
    with raises(ArgumentError, "padding included"):
        level_strides(((5, 5),), (96, 64))
