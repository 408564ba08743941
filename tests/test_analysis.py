"""The Analysis record: detections, attention accessors and their coordinate frames."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

import detr_viz
from detr_viz import INCOMING, OUTGOING, ArgumentError, DetrVizError, analyze
from detr_viz.capture import capture
from detr_viz.coco import COCO_CLASSES
from detr_viz.image import load_image, preprocess
from detr_viz.testing import planted_state_dict

from conftest import recipe_model


def photo(width=480, height=360, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def planted():
    model = detr_viz.build_model("detr_resnet50")
    model.load_state_dict(planted_state_dict(model))
    return model


@pytest.fixture(scope="module")
def case(planted):
    image = photo()
    small = dict(short_side=320, max_size=533)
    analysis = analyze(planted, image, **small)
    model_input = preprocess(load_image(image), **small)
    with torch.inference_mode(), capture(planted) as cap:
        outputs = planted(model_input.tensor)
    return analysis, outputs, cap


def test_public_api_names():
    for name in ("build_model", "load_model", "load_image", "analyze", "Analysis",
                 "DetrVizError", "capture"):
        assert hasattr(detr_viz, name)
    for error in ("ImageError", "WeightsError", "WeightsUnavailableError", "ArgumentError",
                  "CorruptCheckpointError", "WrongVariantError", "UnsafeCheckpointError"):
        assert issubclass(getattr(detr_viz, error), DetrVizError)


def test_sizes_grid_and_stride(case):
    analysis, outputs, cap = case
    assert analysis.original_size == (480, 360)
    assert analysis.input_size == (426, 320)
    assert analysis.feature_hw == (math.ceil(320 / 32), math.ceil(426 / 32)) == (10, 14)
    assert analysis.stride == 32 and isinstance(analysis.stride, int)
    assert tuple(cap.features.shape[-2:]) == analysis.feature_hw


def test_detections_follow_the_model_outputs(case):
    analysis, outputs, _ = case
    probs = outputs["pred_logits"][0].softmax(-1)[:, :-1]
    scores, labels = probs.max(-1)
    for threshold in (0.0, 0.5, 0.9):
        detections = analysis.detections(threshold)
        expected = {int(q) for q in torch.nonzero(scores > threshold).flatten()}
        assert {d.query for d in detections} == expected
        assert [d.score for d in detections] == sorted((d.score for d in detections),
                                                       reverse=True)
        for d in detections:
            assert d.label == int(labels[d.query]) and d.name == COCO_CLASSES[d.label]
            assert d.score == pytest.approx(float(scores[d.query]), abs=1e-6)
            cx, cy, w, h = outputs["pred_boxes"][0, d.query].tolist()
            expected_box = ((cx - w / 2) * 480, (cy - h / 2) * 360, (cx + w / 2) * 480,
                            (cy + h / 2) * 360)
            assert d.box == pytest.approx(expected_box, abs=1e-3)
    assert 0 < len(analysis.detections(0.9)) < len(analysis.detections(0.5))


def test_decoder_attention_is_the_captured_row_in_row_major_order(case):
    analysis, _, cap = case
    h, w = analysis.feature_hw
    for layer, head in [(-1, None), (0, 3), (5, 7)]:
        dense = cap.decoder_layer(layer).dense(head)  # (100, h * w)
        for query in (0, 42, 99):
            heatmap = analysis.decoder_attention(query, layer, head)
            assert heatmap.shape == (h, w) and heatmap.dtype == np.float32
            np.testing.assert_allclose(heatmap, dense[query].reshape(h, w), rtol=1e-5, atol=1e-6)
            assert heatmap.sum() == pytest.approx(1, abs=1e-5)


def column_tolerance(factors) -> float:
    """Columns are exp(logit - lse), rows a softmax: in float32 they differ by rounding of the
    logits, up to ~|logit| * 2**-24 relative (measured here 2.7e-7 at logits up to 75; the
    bound, 4.5e-6, depends on the CPU's kernels). A swapped direction is off by the weights."""
    logits = (factors.q[0] @ factors.k[0].transpose(1, 2)).abs().max().item()
    return 2 * logits * 2.0**-24


def test_encoder_directions_are_column_and_row(case):
    analysis, _, cap = case
    h, w = analysis.feature_hw
    dense = cap.encoder_layer(-1).dense()  # (h * w, h * w): row = query cell, column = key
    atol = column_tolerance(cap.encoder_layer(-1))
    x, y = 300.0, 100.0
    row, col = analysis.grid.cell_at(x, y)
    assert (row, col) == (int(y * 320 / 360 // 32), int(x * 426 / 480 // 32))
    cell = row * w + col
    incoming = analysis.encoder_attention((x, y))  # the default: the notebook's reading
    outgoing = analysis.encoder_attention((x, y), direction=OUTGOING)
    np.testing.assert_allclose(incoming, dense[:, cell].reshape(h, w), atol=atol)
    np.testing.assert_allclose(outgoing, dense[cell].reshape(h, w), atol=1e-6)  # both rows
    assert outgoing.sum() == pytest.approx(1, abs=1e-5)
    assert not np.allclose(incoming, outgoing)  # the planted last layer is not symmetric
    np.testing.assert_allclose(analysis.encoder_attention((x, y), direction=INCOMING), incoming)


def test_notebook_reading_matches_its_reshape(case):
    """The notebook: sattn = enc_attn[0].reshape(h, w, h, w); sattn[..., row, col]."""
    analysis, _, cap = case
    h, w = analysis.feature_hw
    sattn = cap.encoder_layer(-1).dense().reshape(h, w, h, w)
    row, col = 3, 11
    x, y = analysis.grid.cell_center(row, col)
    np.testing.assert_allclose(analysis.encoder_attention((x, y)), sattn[..., row, col],
                               atol=column_tolerance(cap.encoder_layer(-1)))


def test_image_corners_and_edges(case):
    analysis, _, _ = case
    h, w = analysis.feature_hw
    for point, cell in [((0, 0), (0, 0)), ((480, 360), (h - 1, w - 1)), ((480, 0), (0, w - 1))]:
        assert analysis.grid.cell_at(*point) == cell
        assert analysis.encoder_attention(point).shape == (h, w)
    with pytest.raises(ArgumentError, match="outside"):
        analysis.encoder_attention((481, 10))


def test_dc5_cells_are_half_the_size(planted):
    dc5 = detr_viz.build_model("detr_resnet50_dc5")
    dc5.load_state_dict(planted.state_dict())
    image = photo(320, 240)
    a32 = analyze(planted, image, short_side=256, max_size=427)
    a16 = analyze(dc5, image, short_side=256, max_size=427)
    assert a16.stride == 16 and a32.stride == 32
    assert a16.feature_hw == (math.ceil(256 / 16), math.ceil(341 / 16))
    for point in [(10.0, 10.0), (200.5, 123.4), (319.0, 239.0)]:
        r16, c16 = a16.grid.cell_at(*point)
        r32, c32 = a32.grid.cell_at(*point)
        assert (r16 // 2, c16 // 2) == (r32, c32)
        assert a16.grid.cell_radius()[0] == pytest.approx(a32.grid.cell_radius()[0] / 2)


def test_record_is_immutable(case):
    analysis, _, _ = case
    with pytest.raises(dataclasses.FrozenInstanceError):
        analysis.stride = 16
    with pytest.raises(ValueError):
        analysis.probabilities[0, 0] = 1.0


@pytest.mark.parametrize("call", [
    lambda a: a.detections(1.5),
    lambda a: a.decoder_attention(100),
    lambda a: a.decoder_attention(-1),
    lambda a: a.decoder_attention(0, layer=6),
    lambda a: a.decoder_attention(0, head=8),
    lambda a: a.encoder_attention((10, 10), direction="sideways"),
    lambda a: a.encoder_attention((-5, 10)),
])
def test_bad_arguments_are_clear_errors(case, call):
    with pytest.raises(DetrVizError):
        call(case[0])


def test_analyze_accepts_every_source(tmp_path):
    model = recipe_model("detr_resnet50")
    image = photo(96, 64)
    path = tmp_path / "p.png"
    image.save(path)
    small = dict(short_side=64, max_size=107)
    results = [analyze(model, source, **small) for source in
               (image, path, str(path), path.read_bytes(), open(path, "rb"))]  # noqa: SIM115
    for other in results[1:]:
        np.testing.assert_array_equal(other.probabilities, results[0].probabilities)
