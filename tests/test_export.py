"""Exports hold exactly what the page shows, in the frames the README documents."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from PIL import Image

from detr_viz import OUTGOING, analyze, export
from detr_viz.errors import ArgumentError
from detr_viz.testing import planted_state_dict

from conftest import recipe_model


@pytest.fixture(scope="module")
def analysis():
    model = recipe_model("detr_resnet50")
    planted = type(model)(model.variant).eval()
    planted.load_state_dict(planted_state_dict(planted))
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((400, 300))
    return analyze(planted, image, short_side=256, max_size=427)


VIEW = export.View(threshold=0.8, encoder_layer=2, encoder_head=4, decoder_layer=-1,
                   decoder_head=3, direction=OUTGOING, points=((10.0, 20.0), (399.0, 299.0)))


def test_npz_holds_the_shown_view(analysis):
    data = np.load(io.BytesIO(export.to_npz(analysis, VIEW)))
    kept = analysis.detections(0.8)
    assert 0 < len(kept) < 100
    np.testing.assert_array_equal(data["queries"], [d.query for d in kept])
    np.testing.assert_allclose(data["boxes_xyxy"], [d.box for d in kept], rtol=1e-6)
    assert list(data["names"]) == [d.name for d in kept]
    np.testing.assert_allclose(
        data["decoder_maps"], analysis.decoder_attentions([d.query for d in kept], -1, 3))
    for i, point in enumerate(VIEW.points):
        np.testing.assert_allclose(
            data["encoder_maps"][i], analysis.encoder_attention(point, 2, 4, OUTGOING))
    assert tuple(data["feature_hw"]) == analysis.feature_hw
    assert int(data["stride"]) == 32
    assert tuple(data["original_size"]) == (400, 300)
    settings = json.loads(str(data["settings"]))
    assert settings == {"variant": "detr_resnet50", "model": "R50 (official COCO DETR R50)",
                        "checkpoint": None, "official_release": None,  # built, not loaded
                        "threshold": 0.8, "method": "raw attention",
                        "encoder_layer": 2, "encoder_head": 4, "decoder_layer": 5,
                        "decoder_head": 3, "direction": "outgoing", "relevance_target": None}
    assert json.loads(str(data["faithfulness"])) == []


def test_json_equals_npz(analysis):
    as_json = json.loads(export.to_json(analysis, VIEW))
    data = np.load(io.BytesIO(export.to_npz(analysis, VIEW)))
    for key in ("queries", "boxes_xyxy", "decoder_maps", "encoder_maps", "feature_hw"):
        np.testing.assert_allclose(np.array(as_json[key]), data[key], rtol=1e-6)


def test_empty_view_exports_empty_arrays(analysis):
    view = export.View(threshold=1.0)
    data = np.load(io.BytesIO(export.to_npz(analysis, view)))
    h, w = analysis.feature_hw
    assert data["decoder_maps"].shape == (0, h, w)
    assert data["encoder_maps"].shape == (0, h, w)
    assert data["boxes_xyxy"].shape == (0, 4)


def test_html_embeds_plotly_once_and_escapes_titles():
    figures = [("A <b>", go.Figure(go.Scatter(y=[1, 2]))), ("B", go.Figure())]
    page = export.figures_html(figures, title="x & y")
    one = pio.to_html(figures[0][1], include_plotlyjs=True)  # carries all of plotly.js (MBs)
    assert len(one) > 1_000_000 and len(page) < 1.2 * len(one)
    assert page.count("Plotly.newPlot") == 2
    assert "A &lt;b&gt;" in page and "x &amp; y" in page


def test_other_methods_export_the_maps_shown_and_the_scores(analysis):
    from detr_viz import explain, faithfulness

    view = dataclasses.replace(VIEW, method=explain.ROLLOUT)
    kept = [d.query for d in analysis.detections(view.threshold)]
    roll = explain.rollout(analysis)
    with pytest.raises(ArgumentError, match="rollout maps"):
        export.to_npz(analysis, view)
    dec = roll.decoder_maps(kept)
    enc = [roll.encoder_map(p, OUTGOING) for p in view.points]
    curve = faithfulness.Curve(np.linspace(0, 1, 3), np.array([0.9, 0.5, 0.1]))
    score = faithfulness.Score(kept[0], 7, curve, curve, 0.25)
    data = np.load(io.BytesIO(export.to_npz(analysis, view, dec, enc, {kept[0]: {"rollout":
                                                                                  score}})))
    np.testing.assert_allclose(data["decoder_maps"], dec)
    np.testing.assert_allclose(data["encoder_maps"], np.stack(enc))
    record = json.loads(str(data["faithfulness"]))
    assert record == [{"query": kept[0], "label": 7, "method": "rollout",
                       "deletion_auc": curve.auc, "insertion_auc": curve.auc, "pointing": 0.25,
                       "fractions": [0.0, 0.5, 1.0], "deletion": [0.9, 0.5, 0.1],
                       "insertion": [0.9, 0.5, 0.1]}]
    as_json = json.loads(export.to_json(analysis, view, dec, enc, {kept[0]: {"rollout": score}}))
    assert as_json["faithfulness"] == record and as_json["settings"]["method"] == "rollout"
    with pytest.raises(ArgumentError, match="method"):
        export.View(method="saliency")
