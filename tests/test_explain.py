"""Rollout and relevance: the fast paths against dense float64 oracles, and their invariants."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from detr_viz import analyze, capture, explain
from detr_viz.analysis import INCOMING, OUTGOING
from detr_viz.capture import TransformerInputs
from detr_viz.replay import replay

import dense_oracle
from conftest import double_model, photo, recipe_model, small_analysis

TOL = 1e-10  # relative to the largest entry: float64 rounding is ~1e-16


def assert_close(fast, dense):
    fast, dense = np.asarray(fast), np.asarray(dense)
    assert fast.shape == dense.shape
    scale = max(np.abs(dense).max(), 1e-300)
    np.testing.assert_allclose(fast, dense, atol=TOL * scale, rtol=0)


def test_replay_reproduces_the_analysed_logits():
    model = recipe_model("detr_resnet50")
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode(), capture(model, features=False) as cap:
        expected = model(x)["pred_logits"]
        assert torch.equal(replay(model, cap.inputs), expected)
    analysis = small_analysis()
    logits, _ = dense_oracle.transformer(double_model("detr_resnet50"), analysis.inputs)
    with torch.inference_mode():
        ours = replay(double_model("detr_resnet50"), analysis.inputs)[0]
    assert_close(ours, logits.detach())


@pytest.mark.parametrize("variant", ["detr_resnet50", "detr_resnet50_dc5"])
def test_relevance_equals_the_dense_rules(variant):
    analysis = small_analysis(variant)
    model = double_model(variant)
    queries = [int(q) for q in np.argsort(-analysis.scores)[:3]] + [57]
    labels = [int(analysis.probabilities[q].argmax()) for q in queries]
    labels[-1] = 5  # any class can be explained, not only the predicted one
    fast = explain.relevance(model, analysis, queries, labels)
    assert fast.shape == (4, *analysis.feature_hw) and fast.dtype == np.float64
    for query, label, got in zip(queries, labels, fast, strict=True):
        dense, _ = dense_oracle.relevance(model, analysis.inputs, query, label)
        assert_close(got.ravel(), dense)
        assert (got >= 0).all() and got.max() > 0


def test_default_class_is_the_prediction():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    query = int(np.argmax(analysis.scores))
    label = int(analysis.probabilities[query].argmax())
    np.testing.assert_array_equal(explain.relevance(model, analysis, [query]),
                                  explain.relevance(model, analysis, [query], [label]))


def test_gradient_weighted_attention_equals_autograd_on_the_attention_matrices():
    """dy/dA = delta v^T: the fast path's gradients against autograd on explicit A."""
    analysis, model = small_analysis(), double_model("detr_resnet50")
    query = int(np.argmax(analysis.scores))
    label = int(analysis.probabilities[query].argmax())
    grads, attn = dense_oracle.attention_gradients(model, analysis.inputs, query, label)
    (deltas,), fused = explain._gradients(model, analysis,
                                         explain.class_target([query], [label]))
    assert set(deltas) == set(grads)
    for key, grad in grads.items():
        got = deltas[key][0] @ fused[key].v[0].transpose(1, 2)  # (H, L, S)
        assert_close(got, grad)
        expected = (grad * attn[key]).clamp(min=0).mean(0)
        assert_close(explain.mean_attention(fused[key], deltas[key])[0], expected)


def test_encoder_relevance_rows_and_columns_equal_the_dense_matrix():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    query = int(np.argmax(analysis.scores))
    label = int(analysis.probabilities[query].argmax())
    _, r_ii = dense_oracle.relevance(model, analysis.inputs, query, label)
    rel = explain.encoder_relevance(model, analysis, query)
    assert (rel.query, rel.label) == (query, label)
    hat = r_ii - torch.eye(r_ii.shape[0], dtype=r_ii.dtype)
    grid = analysis.grid
    for cell in range(grid.num_cells):
        point = grid.cell_center(*grid.cell_of_index(cell))
        point = (min(point[0], grid.original_size[0]), min(point[1], grid.original_size[1]))
        cell = grid.cell_index(*grid.cell_at(*point))
        assert_close(rel.encoder_map(point, OUTGOING).ravel(), hat[cell])
        assert_close(rel.encoder_map(point, INCOMING).ravel(), hat[:, cell])


@pytest.mark.parametrize("variant", ["detr_resnet50", "detr_resnet50_dc5"])
def test_rollout_equals_the_dense_products(variant):
    analysis, model = small_analysis(variant), double_model(variant)
    r_ii, r_qi = dense_oracle.rollout(model, analysis.inputs)
    roll = explain.rollout(analysis)
    assert_close(roll.decoder_maps(range(100)).reshape(100, -1), r_qi)
    grid = analysis.grid
    for row, col in [(0, 0), (1, 2), (grid.shape[0] - 1, grid.shape[1] - 1)]:
        x0, y0, x1, y1 = grid.cell_bounds(row, col)
        point, cell = ((x0 + x1) / 2, (y0 + y1) / 2), grid.cell_index(row, col)
        outgoing = roll.encoder_map(point, OUTGOING)
        assert_close(outgoing.ravel(), r_ii[cell])
        assert outgoing.sum() == pytest.approx(1, abs=1e-12)  # rows of a rollout sum to 1
        assert_close(roll.encoder_map(point, INCOMING).ravel(), r_ii[:, cell])


def forced_onto(analysis, cell: int):
    """``analysis`` re-run with every cell but ``cell`` marked as padding: all attention over
    image cells (encoder self and decoder cross) can only go to that one cell."""
    h, w = analysis.feature_hw
    mask = torch.ones(1, h, w, dtype=torch.bool)
    mask.view(-1)[cell] = False
    inputs = TransformerInputs(analysis.inputs.src, mask, analysis.inputs.pos)
    model = double_model(analysis.variant)
    with torch.inference_mode(), capture(model, features=False) as cap:
        replay(model, inputs)
    layers = range(6)
    return dataclasses.replace(
        analysis, inputs=inputs, encoder=tuple(cap.encoder_layer(i) for i in layers),
        decoder=tuple(cap.decoder_layer(i) for i in layers),
        decoder_self=tuple(cap.decoder_self_layer(i) for i in layers))


def test_attention_forced_onto_one_cell_gives_maps_concentrated_there():
    base = small_analysis()
    cell = 7
    analysis = forced_onto(base, cell)
    queries = [int(np.argmax(base.scores)), 3]
    raw = analysis.decoder_attentions(queries)
    roll = explain.rollout(analysis).decoder_maps(queries)
    rel = explain.relevance(double_model(analysis.variant), analysis, queries)
    for maps in (raw, roll, rel):
        flat = maps.reshape(len(queries), -1)
        assert (flat.argmax(1) == cell).all()
        assert flat[:, cell] / flat.sum(1) == pytest.approx(1, abs=1e-9)


def test_relevance_works_under_inference_mode_and_on_float32_models():
    """The page calls it from cached analyses made under inference mode."""
    model = recipe_model("detr_resnet50")
    analysis = analyze(model, photo(), short_side=96, max_size=128)
    with torch.inference_mode():
        maps = explain.relevance(model, analysis, [0, 1])
    assert maps.dtype == np.float32 and maps.shape == (2, *analysis.feature_hw)
    assert np.isfinite(maps).all() and (maps >= 0).all()


def test_targets_split_into_memory_chunks_give_the_same_maps(monkeypatch):
    analysis, model = small_analysis(), double_model("detr_resnet50")
    queries = [int(q) for q in np.argsort(-analysis.scores)[:3]]
    together = explain.relevance(model, analysis, queries)
    monkeypatch.setattr(explain, "MEMORY", 1)  # one target's encoder maps at a time
    np.testing.assert_array_equal(explain.relevance(model, analysis, queries), together)


def test_float32_relevance_stays_close_to_float64_with_small_logits():
    """A valid checkpoint with small logits (class head scaled by 1e-5) makes every
    gradient-weighted layer tiny, so ``R - I`` is tiny beside I: forming ``R 1 - 1`` in float32
    left the map 6-8 % off float64 on this photo; accumulated offsets keep it within 1e-3."""
    small = copy.deepcopy(recipe_model("detr_resnet50"))
    with torch.no_grad():
        small.class_embed.weight.mul_(1e-5)
        small.class_embed.bias.mul_(1e-5)
    small64 = copy.deepcopy(small).double()
    image = photo(320, 240)
    a32 = analyze(small, image, short_side=240, max_size=320)
    a64 = analyze(small64, image, short_side=240, max_size=320)
    queries = [int(q) for q in np.argsort(-a64.scores)[:3]]
    got, expected = explain.relevance(small, a32, queries), explain.relevance(small64, a64, queries)
    for one, reference in zip(got, expected, strict=True):
        error = np.abs(one - reference).max() / np.abs(reference).max()
        assert error < 1e-3, error
    query, label = queries[0], int(a64.probabilities[queries[0]].argmax())
    point = a64.grid.cell_center(2, 3)
    for direction in (INCOMING, OUTGOING):
        one = explain.encoder_relevance(small, a32, query, label).encoder_map(point, direction)
        reference = explain.encoder_relevance(small64, a64, query, label).encoder_map(
            point, direction)
        assert np.abs(one - reference).max() / np.abs(reference).max() < 1e-3
