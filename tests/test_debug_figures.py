"""The debugging figures: every object at once, the edges' panels, the sanity-check curves."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from detr_viz.analysis import Detection
from detr_viz.debug_figures import composite_figure, edge_figure, owners, sanity_figure
from detr_viz.display import display_image
from detr_viz.errors import ArgumentError

from test_figures import GRID32, photo

DETECTIONS = [Detection(17, 47, "cup", 0.98, (100.0, 120.0, 300.0, 400.0)),
              Detection(4, 1, "person", 0.95, (500.0, 50.0, 900.0, 700.0)),
              Detection(42, 47, "cup", 0.91, (320.0, 100.0, 480.0, 380.0))]


@pytest.fixture(scope="module")
def display():
    return display_image(photo(), max_side=400)


def random_maps(n=3, seed=0):
    return np.random.default_rng(seed).random((n, *GRID32.shape)).astype(np.float32) ** 4


def test_owners_equal_a_cell_by_cell_loop():
    maps = random_maps() * np.array([1.0, 50.0, 0.01])[:, None, None]  # scales differ
    maps[2, 3, 4] = maps[2].max() * 2  # a new peak for map 2
    maps[:, 0, 0] = 0  # a cell nobody looks at
    owner, strength = owners(maps)
    for r in range(maps.shape[1]):
        for c in range(maps.shape[2]):
            scaled = [m[r, c] / m.max() for m in maps]
            assert owner[r, c] == int(np.argmax(scaled))
            assert strength[r, c] == pytest.approx(max(scaled), rel=1e-6)
    assert owner[3, 4] == 2 and strength[3, 4] == pytest.approx(1.0)
    assert owner[0, 0] == 0 and strength[0, 0] == 0
    assert owners(np.zeros((2, 3, 3)))[1].max() == 0  # all-zero maps: nothing drawn


def test_composite_gives_every_cell_to_one_detection(display):
    maps = random_maps()
    fig = go.Figure(composite_figure.spec(display, GRID32, DETECTIONS, maps, method="rollout"))
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    boxes = [t for t in fig.data if t.type == "scatter"]
    assert len(heatmaps) == len(boxes) == 3
    owner, strength = owners(maps)
    covered = np.zeros(GRID32.shape, int)
    for trace in heatmaps:
        query = int(trace.name.removeprefix("query "))
        i = [d.query for d in DETECTIONS].index(query)
        z = np.asarray(trace.z, dtype=np.float64)
        np.testing.assert_array_equal(~np.isnan(z), owner == i)
        np.testing.assert_allclose(z[owner == i], strength[owner == i], rtol=1e-6)
        assert f"query {query}: {DETECTIONS[i].name}" in trace.hovertemplate
        covered += ~np.isnan(z)
    assert (covered == 1).all()  # one owner per cell
    # legend by class: entries grouped under their class name, cups together
    titles = [b.legendgrouptitle.text for b in boxes]
    assert titles == ["cup", "cup", "person"]
    assert all(b.showlegend for b in boxes) and fig.layout.showlegend
    for b in boxes:
        det = next(d for d in DETECTIONS if b.name.startswith(f"query {d.query} "))
        x0, y0, x1, y1 = det.box
        assert (min(b.x), min(b.y), max(b.x), max(b.y)) == (x0, y0, x1, y1)
    assert "3 detections: rollout" in fig.layout.title.text


def test_composite_refuses_mismatched_maps_and_notes_no_detections(display):
    with pytest.raises(ArgumentError, match="need"):
        composite_figure.spec(display, GRID32, DETECTIONS, random_maps(2))
    empty = composite_figure(display, GRID32, [], np.zeros((0, *GRID32.shape)))
    assert "No detections" in empty.layout.annotations[0].text


def test_edge_panels_draw_each_edge_on_its_box(display):
    box = (100.0, 120.0, 300.0, 400.0)
    names = ("left", "top", "right", "bottom")
    fig = go.Figure(edge_figure.spec(display, GRID32, box, random_maps(4), names))
    edges = [t for t in fig.data if t.type == "scatter" and t.name.endswith(" edge")]
    assert [t.name for t in edges] == [f"{n} edge" for n in names]
    assert [(tuple(t.x), tuple(t.y)) for t in edges] == [
        ((100, 100), (120, 400)), ((100, 300), (120, 120)), ((300, 300), (120, 400)),
        ((100, 300), (400, 400))]
    assert [t.xaxis for t in edges] == ["x", "x2", "x3", "x4"]
    with pytest.raises(ArgumentError):
        edge_figure.spec(display, GRID32, box, random_maps(3), names)


def test_sanity_curves_say_which_map_ignores_the_weights():
    from detr_viz.sanity import SanityCheck

    steps = ("class and box heads", "decoder layer 6", "encoder layer 1")
    blind = SanityCheck("raw attention", 3, 1, steps, np.zeros((4, 2, 2)),
                        np.array([1.0, 0.95, 0.9]), np.array([1.0, 0.9, 0.85]))
    moved = SanityCheck("relevance", 3, 1, steps, np.zeros((4, 2, 2)),
                        np.array([0.6, 0.3, 0.1]), np.array([0.5, 0.2, 0.0]))
    fig = go.Figure(sanity_figure.spec([blind, moved]))
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["raw attention: does NOT depend on the weights",
                      "relevance: changes with the weights"]
    lines = {(t.name, t.xaxis): list(t.y) for t in fig.data}
    assert lines[("Spearman", "x2")] == [0.6, 0.3, 0.1] and lines[("SSIM", "x")][-1] == 0.85
    assert list(fig.data[0].x) == ["heads", "dec 6", "enc 1"]
    assert "No sanity check" in sanity_figure([]).layout.annotations[0].text
