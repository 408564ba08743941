"""The page's newer views through AppTest: the first open, the explanation methods, the
overview grid, faithfulness scores and the side-by-side comparison, each against the library."""

from __future__ import annotations

import numpy as np
import pytest

from detr_viz import compare, explain, faithfulness, overview
from detr_viz.analysis import INCOMING
from detr_viz.model import Transformer

from apptest import DC5, R50, SAMPLE, array, assert_clean, charts, query_titles


def top_maps(figure: dict) -> list[np.ndarray]:
    """The decoder grid's top-row maps (feature resolution), left to right."""
    heatmaps = [d for d in figure["data"] if d["type"] == "heatmap"]
    return [array(h["z"]) for h in heatmaps[0::2]]  # each query: its map, then its overlay


def shown_queries(figure: dict) -> list[int]:
    return [int(t.split(":")[0].removeprefix("query ")) for t in query_titles(figure)]


@pytest.fixture
def transformer_runs(monkeypatch) -> list[int]:
    """Counts every run of the transformer (analyze, relevance and faithfulness all use it)."""
    calls: list[int] = []
    original = Transformer.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", counted)
    return calls


def test_first_open_shows_the_drop_zone_the_sample_and_the_camera_switch(app):
    app.run()
    assert_clean(app)
    assert app.file_uploader(key="upload").value is None  # the drop zone, from the first open
    assert any("Showing the sample photo" in c.value for c in app.caption)
    assert app.toggle(key="use-camera").value is False and not app.camera_input
    assert app.radio(key="method").value == explain.RAW


def test_methods_show_the_library_maps_and_nothing_reruns_afterwards(app, oracle,
                                                                     transformer_runs):
    analysis, model = oracle(SAMPLE.read_bytes()), oracle.model(R50)
    app.run()
    figure = charts(app)["decoder-grid"]
    queries = shown_queries(figure)
    for got, want in zip(top_maps(figure), analysis.decoder_attentions(queries), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    point = app.session_state[next(k for k in app.session_state if str(k).startswith("points-"))]
    app.radio(key="method").set_value(explain.ROLLOUT).run()
    assert_clean(app)
    roll = explain.rollout(analysis)
    for got, want in zip(top_maps(charts(app)["decoder-grid"]), roll.decoder_maps(queries),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(array(charts(app)["encoder-map"]["data"][0]["z"]),
                               roll.encoder_map(point[-1], INCOMING), rtol=1e-5, atol=1e-8)
    before = len(transformer_runs)
    app.radio(key="method").set_value(explain.RELEVANCE).run()
    assert_clean(app)
    # one forward with a graph for all shown queries, one for the encoder's explained detection
    assert len(transformer_runs) == before + 2
    figure = charts(app)["decoder-grid"]
    assert all("relevance for" in t for t in query_titles(figure))
    expected = explain.relevance(model, analysis, queries)
    for got, want in zip(top_maps(figure), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())
    runs = len(transformer_runs)
    for threshold in (0.95, 0.9):  # fewer, then the same detections: all cached
        app.slider(key="threshold").set_value(threshold).run()
        assert_clean(app)
    app.radio(key="method").set_value(explain.ROLLOUT).run()
    app.radio(key="method").set_value(explain.RELEVANCE).run()
    assert len(transformer_runs) == runs  # switching back and forth computes nothing
    app.slider(key="threshold").set_value(0.5).run()  # more detections: only those are new
    shown = shown_queries(charts(app)["decoder-grid"])
    assert len(transformer_runs) == runs + (1 if set(shown) - set(queries) else 0)


def test_layer_and_head_drive_the_maps_and_the_overview(app, oracle):
    analysis = oracle(SAMPLE.read_bytes())
    app.run()
    app.selectbox(key="dec-layer").set_value("layer 3").run()
    app.selectbox(key="dec-head").set_value("head 4").run()
    figure = charts(app)["decoder-grid"]
    queries = shown_queries(figure)
    for got, want in zip(top_maps(figure), analysis.decoder_attentions(queries, 2, 3),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    app.toggle(key="dec-overview-on").set_value(True).run()
    assert_clean(app)
    grid = charts(app)["dec-overview"]
    assert [d["type"] for d in grid["data"]] == ["image", "scatter"]  # one picture, not 54
    texts = grid["data"][1]["hovertext"] if "hovertext" in grid["data"][1] else \
        grid["data"][1]["text"]
    assert len(texts) == 6 * 9
    maps = overview.decoder_overview(analysis, queries[0])
    peak = np.unravel_index(maps[2, 3].argmax(), maps[2, 3].shape)
    assert any("layer 3" in t and "head 4" in t and f"row {peak[0]}, col {peak[1]}" in t
               for t in texts)
    heads = charts(app)["dec-heads"]
    assert len({d.get("legendgroup") or d.get("name") for d in heads["data"]
                if "head" in str(d.get("name", ""))}) == 8


def test_scores_appear_on_demand_and_equal_the_library(app, oracle):
    analysis, model = oracle(SAMPLE.read_bytes()), oracle.model(R50)
    kept = analysis.detections(0.9)
    threshold = float(kept[0].score) - 1e-6 if len(kept) > 1 else 0.9  # one detection shown
    threshold = min(threshold, 0.999)
    app.session_state["threshold"] = threshold
    app.run()
    assert not any("deletion AUC" in c.value for c in app.caption)  # nothing computed unasked
    app.button(key="score-page").click().run()
    assert_clean(app)
    shown = shown_queries(charts(app)["decoder-grid"])
    base = faithfulness.random_baseline(model, analysis)
    for query in shown:
        score = faithfulness.score_maps(model, analysis, query,
                                        {"map": analysis.decoder_attention(query)},
                                        baseline=base)["map"]
        text = f"query {query}: " + score.summary(base.curves(query, score.label))
        assert any(c.value == text for c in app.caption), text


def test_side_by_side_matches_detections_and_shows_each_grid(app, oracle, forwards):
    a, b = oracle(SAMPLE.read_bytes()), oracle(SAMPLE.read_bytes(), DC5)
    app.run()
    app.selectbox(key="compare-with").set_value("R50-DC5").run()
    assert_clean(app)
    runs = len(forwards)
    app.slider(key="threshold").set_value(0.95).run()  # a slider: no model runs again
    app.slider(key="threshold").set_value(0.9).run()
    assert len(forwards) == runs
    figures = charts(app)
    matching = compare.match_detections(a.detections(0.9), b.detections(0.9))
    assert any(f"{len(matching.pairs)} objects found by both" in c.value for c in app.caption)
    shapes = {array(d["z"]).shape for d in figures["compare-decoder"]["data"]
              if d["type"] == "heatmap"}
    if matching.pairs:
        assert shapes == {(25, 38), (50, 75)}
    encoder = figures["compare-encoder"]
    point = app.session_state[next(k for k in app.session_state if str(k).startswith("points-"))]
    outlines = [d for d in encoder["data"] if d.get("name", "").endswith(" px")]
    for grid in (a.grid, b.grid):
        x0, y0, x1, y1 = grid.cell_bounds(*grid.cell_at(*point[-1]))
        assert any(min(d["x"]) == pytest.approx(x0) and max(d["y"]) == pytest.approx(y1)
                   for d in outlines)
    assert {array(d["z"]).shape for d in encoder["data"] if d["type"] == "heatmap"} == {
        (25, 38), (50, 75)}
