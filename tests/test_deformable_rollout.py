"""Rollout through deformable attention against a dense oracle.

The oracle builds every matrix in full, in float64: each encoder token's row and each query's row
from :func:`detr_viz.sampling.splat` (checked against grid_sample in
test_deformable_sampling.py), the decoder's self-attention from transformers' own
``output_attentions``, and applies DETR's rule with dense products. The library never forms an
S x S product; it must give the same maps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detr_viz import analyze, explain
from detr_viz.deformable_rollout import DeformableRollout, sampling_matrix
from detr_viz.families import load_family
from detr_viz.sampling import splat

from deformable_models import CLASSES, photo, small_processor, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("deformable_detr", "rt_detr", "rt_detr_v2_discrete", "d_fine", "lw_detr")


@pytest.fixture(scope="module")
def analyses(tmp_path_factory):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (120, 160, 3),
                                                              dtype=np.uint8))
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        tiny_model(family, dtype=torch.float32).save_pretrained(folder)
        small_processor(family).save_pretrained(folder)
        out[family] = analyze(load_family(folder, dtype=torch.float64), image)
    return out


def rows(stack, shapes, count: int, layer: int) -> np.ndarray:
    """(count, S): each row's splat over every level, concatenated in sequence order."""
    return np.stack([np.concatenate([m.numpy().ravel() for m in splat(stack, shapes, i, layer)])
                     for i in range(count)])


def residual(a: np.ndarray) -> np.ndarray:
    m = a + np.eye(a.shape[0])
    return m / m.sum(axis=1, keepdims=True)


def dense_rollout(a) -> np.ndarray:
    """(Q, S) DETR's rule on dense matrices."""
    cap, shapes = a.capture, a.capture.spatial_shapes
    total = sum(h * w for h, w in shapes)
    if cap.encoder is not None:
        layers = [residual(rows(cap.encoder, shapes, total, i))
                  for i in range(cap.encoder.weights.shape[0])]
    elif cap.dense_encoder is not None:
        start = cap.level_start_index[cap.dense_level]
        layers = []
        for attention in cap.dense_encoder:
            full = np.zeros((total, total))
            block = attention.double().mean(0).numpy()
            full[start:start + len(block), start:start + len(block)] = block
            layers.append(residual(full))
    else:
        layers = []
    r_qq = np.eye(a.num_queries)
    for attention in cap.decoder_self:
        r_qq = residual(attention.double().mean(0).numpy()) @ r_qq
    queries = cap.decoder.weights.shape[1]
    maps = r_qq.T @ rows(cap.decoder, shapes, queries, -1)
    for layer in reversed(layers):
        maps = maps @ layer
    return maps


@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_equals_the_dense_products(analyses, family):
    a = analyses[family]
    roll = explain.rollout(a)
    assert isinstance(roll, DeformableRollout)
    want = dense_rollout(a)
    got = roll.token_maps(range(a.num_queries))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    maps = roll.decoder_maps([0, 3])
    np.testing.assert_allclose(maps[1], a.on_grid(a.token_levels(want[3]), None), rtol=1e-6,
                               atol=1e-9)
    level = a.num_levels - 1
    np.testing.assert_allclose(roll.decoder_maps([3], level=level)[0],
                               a.on_grid(a.token_levels(want[3]), level), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr"])
def test_encoder_rollout_rows_and_columns(analyses, family):
    a = analyses[family]
    roll = explain.rollout(a)
    level = 1 if a.encoder_kind == "deformable" else a.capture.dense_level
    point = (70.0, 40.0)
    token = a.token_at(point, level)
    total = sum(h * w for h, w in a.level_shapes)
    product = np.eye(total)
    for layer in roll.layers:  # the dense R = M_L ... M_1
        product = layer.toarray() @ product
    for direction, values in (("outgoing", product[token]), ("incoming", product[:, token])):
        np.testing.assert_allclose(
            roll.encoder_map(point, direction, level=level if family == "deformable_detr" else 0),
            a.on_grid(a.token_levels(values), None), rtol=1e-5, atol=1e-8)
    assert abs(product[token].sum() - 1) < 1e-9  # rows of a product of row-stochastic M


def test_models_without_an_encoder_roll_out_the_decoder_only(analyses):
    a = analyses["lw_detr"]
    roll = explain.rollout(a)
    assert roll.layers == ()
    np.testing.assert_allclose(roll.token_maps([2])[0], dense_rollout(a)[2], rtol=1e-10)


@pytest.mark.parametrize("family", list(CLASSES))
def test_sampling_matrix_rows_are_the_splats(family):
    from detr_viz.sampling_capture import capture_sampling

    cap = capture_sampling(tiny_model(family), photo(family, 2))
    matrix = sampling_matrix(cap.decoder, cap.spatial_shapes, 1).toarray()
    np.testing.assert_allclose(matrix, rows(cap.decoder, cap.spatial_shapes,
                                            cap.decoder.weights.shape[1], 1),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("family", list(CLASSES))
def test_decoder_self_attention_is_transformers_own(family):
    from detr_viz.sampling_capture import capture_sampling

    model, image = tiny_model(family), photo(family, 5)
    cap = capture_sampling(model, image, self_attention=True)
    with torch.inference_mode():
        out = model(pixel_values=image, output_attentions=True)
    # LW-DETR and RF-DETR (no encoder) name their decoder's self-attention "attentions"
    theirs = out.decoder_attentions if "decoder_attentions" in out else out.attentions
    assert len(cap.decoder_self) == len(theirs) == 2
    # LW-DETR's eager attention takes its softmax in float32 whatever the model's dtype; the
    # capture recomputes it in the model's (float64): the same up to float32's rounding
    tolerance = 1e-7 if family == "lw_detr" else 1e-12
    for ours, reference in zip(cap.decoder_self, theirs, strict=True):
        torch.testing.assert_close(ours, reference[0], rtol=0, atol=tolerance)
