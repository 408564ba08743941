"""Figures of Conditional DETR's and DAB-DETR's own views, from plain arrays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr_viz.analysis import Detection
from detr_viz.display import display_image
from detr_viz.family_figures import anchors_figure, terms_grid
from detr_viz.figures import NO_DETECTIONS
from detr_viz.geometry import FeatureGrid

GRID = FeatureGrid(original_size=(160, 96), input_size=(160, 96), shape=(3, 5), stride=32)
DISPLAY = display_image(Image.new("RGB", (160, 96), (90, 90, 90)))
DETS = [Detection(4, 1, "dog", 0.9, (10.0, 20.0, 80.0, 90.0)),
        Detection(9, 2, "cat", 0.8, (50.0, 5.0, 150.0, 60.0))]


def test_terms_grid_has_a_row_per_term_and_shows_each_map():
    rng = np.random.default_rng(0)
    maps = {k: rng.random((2, 3, 5)) for k in ("full", "content", "spatial")}
    spec = terms_grid.spec(DISPLAY, GRID, DETS, maps)
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    assert titles == [f"query {q} · {k}" for k in maps for q in (4, 9)]
    overlays = [t for t in spec["data"] if t["type"] == "heatmap"]
    for i, (kind, query) in enumerate((k, j) for k in maps for j in range(2)):
        np.testing.assert_allclose(np.asarray(overlays[i]["z"], dtype=float),
                                   maps[kind][query], rtol=1e-6)
    with pytest.raises(ValueError, match=r"maps\['spatial'\] must be \(2, 3, 5\)"):
        terms_grid.spec(DISPLAY, GRID, DETS, {**maps, "spatial": maps["spatial"][:1]})
    blank = terms_grid.spec(DISPLAY, GRID, [], {})
    assert NO_DETECTIONS in str(blank["layout"])


def test_anchors_figure_draws_each_layer_and_the_final_box():
    trail = np.array([[0, 0, 100, 80], [5, 10, 90, 80], [10, 20, 80, 90]], dtype=float)
    spec = anchors_figure.spec(DISPLAY, DETS[:1], [trail])
    outlines = [t for t in spec["data"] if t.get("text", "").startswith("query 4")]
    assert [t["text"] for t in outlines] == ["query 4 (dog): anchor of layer 1",
                                             "query 4 (dog): anchor of layer 2",
                                             "query 4 (dog): final box"]
    assert outlines[-1]["line"]["dash"] == "solid" and outlines[0]["line"]["dash"] == "dash"
    assert outlines[0]["opacity"] < outlines[1]["opacity"] < outlines[2]["opacity"]
    assert list(outlines[2]["x"]) == [10, 80, 80, 10, 10]
    centres = [t for t in spec["data"] if t.get("mode") == "lines+markers"][0]
    np.testing.assert_allclose(np.asarray(centres["x"], float), [50, 47.5, 45])
    assert NO_DETECTIONS in str(anchors_figure.spec(DISPLAY, [], [])["layout"])
