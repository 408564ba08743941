"""The debugging section, driven with AppTest, checked against the library as the oracle."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from detr_viz import sanity
from detr_viz.debug_figures import owners
from detr_viz.edges import edge_relevance
from detr_viz.explain import RAW

from apptest import SAMPLE, array, assert_clean, charts

DIGEST = hashlib.sha256(SAMPLE.read_bytes()).hexdigest()


def chart(at, key: str) -> dict:
    found = [json.loads(e.proto.spec) for e in at.get("plotly_chart") if e.proto.id.endswith(key)]
    assert len(found) == 1, [e.proto.id for e in at.get("plotly_chart")]
    return found[0]


def corner(app, x: float, y: float, t: int, size: tuple[int, int]) -> None:
    """A click on the box-drawing photo at (x, y) original pixels (display = original size)."""
    width, height = size
    app.session_state[f"dbg-click-{DIGEST}"] = {"x": x - 0.5, "y": y - 0.5, "width": width,
                                                "height": height, "unix_time": t}
    app.run()


def test_views_stay_off_until_asked_and_the_composite_gives_each_cell_one_query(app, oracle):
    app.run()
    assert_clean(app)
    assert not [k for k in charts(app) if k.endswith(("composite", "why-not", "edges",
                                                      "sanity"))]
    app.toggle(key="dbg-composite-on").set_value(True).run()
    assert_clean(app)
    analysis = oracle(SAMPLE.read_bytes())
    kept = analysis.detections(0.9)
    spec = chart(app, "composite")
    heatmaps = [t for t in spec["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == len(kept) >= 2
    owner, _ = owners(analysis.decoder_attentions([d.query for d in kept]))
    for trace in heatmaps:
        i = [f"query {d.query}" for d in kept].index(trace["name"])
        np.testing.assert_array_equal(~np.isnan(array(trace["z"])), owner == i)


def test_why_not_finds_the_query_of_a_drawn_box_and_explains_the_expected_class(app, oracle):
    app.run()
    app.toggle(key="dbg-box-on").set_value(True).run()
    analysis = oracle(SAMPLE.read_bytes())
    size = analysis.original_size
    width, height = size
    box = analysis.detections(0.9)[0].box  # clipped to the photo: what a user can draw
    x0, y0 = max(box[0], 0) + 1, max(box[1], 0) + 1
    x1, y1 = min(box[2], width) - 1, min(box[3], height) - 1
    app.selectbox(key="dbg-label").set_value("dog").run()
    corner(app, x0, y0, 1, size)
    assert any("Click two corners" in i.value for i in app.info)
    corner(app, x1, y1, 2, size)
    assert_clean(app)
    expected = analysis.queries_for_box((x0, y0, x1, y1), "dog")
    assert expected[0].iou > 0.5
    sentences = [m.value for m in app.markdown if "found this box" in m.value]
    assert [s.split("**")[1] for s in sentences] == [m.sentence for m in expected]
    assert "'dog'" in sentences[0] and "**dog" in sentences[0]  # the expected class, in bold
    target = expected[0]
    titles = [a["text"] for a in chart(app, "why-not")["layout"]["annotations"]]
    assert titles[0].startswith(f"query {target.query}: IoU")
    corner(app, x0, y0, 3, size)  # a third click starts a new box: one corner again
    corner(app, x0, y0, 4, size)  # the same point twice: no area, a message and no crash
    assert not app.exception
    assert any("no area" in e.value for e in app.error)
    assert "decoder-grid" in charts(app)  # the rest of the page still works


def test_edges_and_the_sanity_check_show_what_the_library_computes(app, oracle):
    app.run()
    app.toggle(key="dbg-edges-on").set_value(True).run()
    app.toggle(key="dbg-sanity-on").set_value(True).run()
    assert_clean(app)
    analysis, model = oracle(SAMPLE.read_bytes()), oracle.model()
    query = analysis.detections(0.9)[0].query
    expected = edge_relevance(model, analysis, query)
    maps = [array(t["z"]) for t in chart(app, "edges")["data"] if t["type"] == "heatmap"]
    assert len(maps) == 4
    for got, want in zip(maps, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert not [e for e in app.get("plotly_chart") if e.proto.id.endswith("sanity")]
    app.button(key="dbg-sanity-run").click().run()
    assert_clean(app)
    check = sanity.sanity_check(model, analysis, query, RAW)
    lines = {t["name"]: array(t["y"]) for t in chart(app, "sanity")["data"]}
    np.testing.assert_allclose(lines["Spearman"], check.spearman, rtol=1e-6)
    np.testing.assert_allclose(lines["SSIM"], check.ssim, rtol=1e-6)
    assert not app.get("progress")  # the bar is gone once the check is done
