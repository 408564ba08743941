"""Figures of the families' own views (terms, anchors, sampling points), from plain arrays."""

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


def points(locations, reference, weights=None):
    import torch

    from detr_viz.sampling import SamplingPoints

    locations = torch.tensor(locations, dtype=torch.float64)  # (heads, levels, points, 2)
    weights = torch.full(locations.shape[:3], 0.5, dtype=torch.float64) if weights is None \
        else torch.tensor(weights, dtype=torch.float64)
    return SamplingPoints("decoder", 4, 1, locations, weights,
                          torch.tensor(reference, dtype=torch.float64), ((3, 5), (2, 3)),
                          (32, 64), (2, 2), "bilinear")


def test_sampling_zoom_holds_the_box_reference_and_points_inside_the_photo():
    from detr_viz.family_figures import zoom_region

    pts = points([[[[30.0, 40.0], [500.0, 50.0]], [[12.0, 70.0], [float("nan")] * 2]]],
                 [40.0, 50.0, 20.0, 10.0])  # a point past the photo, a padding slot
    x0, y0, x1, y1 = zoom_region(pts, (25.0, 35.0, 60.0, 80.0), (160, 96))
    assert 0 <= x0 <= 12 and 0 <= y0 <= 35 and 60 <= x1 <= 160 and 80 <= y1 <= 96
    assert (x1 - x0) / (y1 - y0) == pytest.approx(160 / 96)  # the photo's aspect
    assert x1 < 160  # the point at x = 500 (outside the photo) did not widen it
    whole = zoom_region(pts, (0.0, 0.0, 160.0, 96.0), (160, 96))
    assert whole == pytest.approx((0, 0, 160, 96))


def test_sampling_figure_draws_each_point_by_weight_and_hides_padding():
    from detr_viz.family_figures import sampling_figure

    photo = Image.new("RGB", (160, 96), (90, 90, 90))
    pts = points([[[[30.0, 40.0], [50.0, 50.0]], [[12.0, 70.0], [float("nan")] * 2]],
                  [[[80.0, 20.0], [90.0, 30.0]], [[100.0, 60.0], [110.0, 70.0]]]],
                 [40.0, 50.0], weights=[[[0.1, 0.4], [0.5, 0.0]], [[0.25, 0.25], [0.3, 0.2]]])
    spec = sampling_figure.spec(photo, DETS[:1], [pts], color_by="head")
    dots = [t for t in spec["data"] if t.get("legendgroup")]
    assert [d["name"] for d in dots] == ["head 1", "head 2"]
    assert np.asarray(dots[0]["x"]).tolist() == [30.0, 50.0, 12.0]  # the padding slot dropped
    sizes = np.asarray(dots[0]["marker"]["size"])
    assert sizes[1] > sizes[0] and sizes[2] == sizes.max()  # area grows with weight
    by_level = sampling_figure.spec(photo, DETS[:1], [pts], color_by="level", level=1)
    names = [t["name"] for t in by_level["data"] if t.get("legendgroup")]
    assert names == ["level 1 (stride 64)"]
    crosses = [t for t in spec["data"] if t.get("text") == "reference point"]
    assert crosses and crosses[0]["x"] == [40.0]
