"""Box-edge relevance: against the dense float64 rules and autograd on explicit attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detr_viz import analyze, edges, explain
from detr_viz.replay import replay_outputs

import dense_oracle
from conftest import double_model, photo, recipe_model, small_analysis

TOL = 1e-10  # relative to the largest entry, as in test_explain


def assert_close(fast, dense):
    fast, dense = np.asarray(fast), np.asarray(dense)
    assert fast.shape == dense.shape
    np.testing.assert_allclose(fast, dense, atol=TOL * max(np.abs(dense).max(), 1e-300), rtol=0)


def oracle_edge(query: int, edge: int, size: tuple[int, int]):
    """Edge ``edge`` of ``query``'s box in photo pixels, outward: -x0, -y0, x1, y1."""
    def target(logits, boxes):
        cx, cy, w, h = boxes[query]
        width, height = size
        return [-(cx - w / 2) * width, -(cy - h / 2) * height, (cx + w / 2) * width,
                (cy + h / 2) * height][edge]
    return target


def test_replayed_boxes_are_the_analysed_ones():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    with torch.inference_mode():
        logits, boxes = replay_outputs(model, analysis.inputs)
    np.testing.assert_array_equal(boxes[0].float().numpy(), analysis.boxes)
    _, dense, _ = dense_oracle.outputs(model, analysis.inputs)
    assert_close(boxes[0], dense.detach())
    edge_values = edges.edge_target(3, analysis.original_size)(logits[0], boxes[0])
    np.testing.assert_allclose(edge_values.numpy() * edges.OUTWARD, analysis.boxes_xyxy()[3],
                               rtol=1e-6)


@pytest.mark.parametrize("variant", ["detr_resnet50", "detr_resnet50_dc5"])
def test_edge_relevance_equals_the_dense_rules(variant):
    analysis, model = small_analysis(variant), double_model(variant)
    query = int(np.argmax(analysis.scores))
    maps = edges.edge_relevance(model, analysis, query)
    assert maps.shape == (4, *analysis.feature_hw) and maps.dtype == np.float64
    for edge, got in enumerate(maps):
        target = oracle_edge(query, edge, analysis.original_size)
        dense, _ = dense_oracle.relevance(model, analysis.inputs, query, target=target)
        assert_close(got.ravel(), dense)
        assert (got >= 0).all() and got.max() > 0
    # the edges are not the class: each map is its own explanation
    label_map = explain.relevance(model, analysis, [query])[0]
    assert all(np.abs(m / m.max() - label_map / label_map.max()).max() > 1e-3 for m in maps)


def test_edge_gradients_equal_autograd_and_batched_equals_looped():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    query = 17
    target = edges.edge_target(query, analysis.original_size)
    batched, fused = explain._gradients(model, analysis, target, batched=True)
    looped, _ = explain._gradients(model, analysis, target, batched=False)
    for edge in range(4):
        grads, attn = dense_oracle.attention_gradients(
            model, analysis.inputs, query, target=oracle_edge(query, edge, analysis.original_size))
        assert set(batched[edge]) == set(grads)
        for key, grad in grads.items():
            assert_close(batched[edge][key][0] @ fused[key].v[0].transpose(1, 2), grad)
            assert_close(looped[edge][key], batched[edge][key])
    np.testing.assert_allclose(edges.edge_relevance(model, analysis, query, batched=True),
                               edges.edge_relevance(model, analysis, query), rtol=0,
                               atol=1e-12)


def test_edge_relevance_on_a_float32_model_is_close_to_float64():
    model = recipe_model("detr_resnet50")
    image = photo(160, 96)
    analysis = analyze(model, image, short_side=96, max_size=160)
    with torch.inference_mode():  # the page calls it from analyses made under inference mode
        got = edges.edge_relevance(model, analysis, 5)
    expected = edges.edge_relevance(double_model("detr_resnet50"), small_analysis(), 5)
    assert got.dtype == np.float32
    for one, reference in zip(got, expected, strict=True):
        assert np.abs(one - reference).max() / np.abs(reference).max() < 1e-3


def test_a_bad_query_is_refused():
    with pytest.raises(explain.ArgumentError, match="out of range"):
        edges.edge_relevance(double_model("detr_resnet50"), small_analysis(), 100)
