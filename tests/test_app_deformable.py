"""Deformable checkpoints on the page: picked from the list, every view checked against the
library's own analysis of the same photo (tests/test_deformable_analysis.py checks the library
against transformers and grid_sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from test_app_models import app_on, pick

from detr_viz import analyze, explain, faithfulness, load_model
from detr_viz.cache import nbytes
from detr_viz.display import display_to_original
from detr_viz.ui import resources

from apptest import SAMPLE, array, assert_clean, charts, click
from deformable_models import tiny_model

FAMILIES = ("rt_detr", "deformable_detr", "lw_detr")


@pytest.fixture(scope="module")
def deformable_dir(tmp_path_factory, weights_dir) -> Path:
    """The released stand-ins plus tiny random RT-DETR, Deformable DETR and LW-DETR, saved
    with save_pretrained (their image processors' defaults: no preprocessor_config.json)."""
    folder = tmp_path_factory.mktemp("deformable")
    for path in weights_dir.iterdir():
        (folder / path.name).symlink_to(path)
    for family in FAMILIES:
        tiny_model(family, dtype=torch.float32).save_pretrained(folder / family)
    remote = folder / "remote-code"  # asks for its own Python code
    tiny_model("rt_detr", dtype=torch.float32).save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(
        {**config, "auto_map": {"AutoModelForObjectDetection": "mine.Detector"}}))
    return folder


@pytest.fixture
def page(monkeypatch, deformable_dir, tmp_path):
    yield app_on(monkeypatch, deformable_dir, tmp_path)
    st.cache_resource.clear()


def figure(at, key: str) -> dict:
    """The page's Plotly figure whose element key is ``key``."""
    return json.loads(next(c.proto.spec for c in at.get("plotly_chart")
                           if c.proto.id.endswith(f"-{key}")))


def heat(at) -> np.ndarray:
    """The first decoder map on the page."""
    return array([d for d in charts(at)["decoder-grid"]["data"] if d["type"] == "heatmap"][0]["z"])


def library(folder: Path, family: str):
    return analyze(load_model(checkpoint=folder / family), SAMPLE.read_bytes())


def test_rt_detr_sampling_points_maps_references_and_its_dense_encoder(page, deformable_dir):
    page.run()
    pick(page, "rt_detr")
    assert_clean(page)
    a = library(deformable_dir, "rt_detr")
    best = a.detections(0.0)[0]
    assert any("RT-DETR" in s.value and "sampling points" in s.value for s in page.subheader)
    np.testing.assert_allclose(heat(page), a.decoder_attention(best.query), rtol=1e-5,
                               atol=1e-7)
    page.selectbox(key="dec-layer").set_value("layer 1").run()
    page.selectbox(key="dec-head").set_value("head 2").run()
    page.selectbox(key="dec-level").set_value(
        next(o for o in page.selectbox(key="dec-level").options if o.startswith("level 1"))).run()
    assert_clean(page)
    np.testing.assert_allclose(heat(page), a.decoder_attention(best.query, 0, 1, level=1),
                               rtol=1e-5, atol=1e-7)
    # the sampling points of layer 1, head 2, level 1: where the library puts them
    dots = [d for d in figure(page, "decoder-sampling")["data"]
            if d.get("mode") == "markers" and d.get("xaxis", "x") == "x" and "name" in d]
    assert [d["name"] for d in dots] == ["head 2"]
    points = a.sampling_points(best.query, layer=0)
    want = points.locations[1, 1].numpy()  # head 2, level 1: (points, 2)
    np.testing.assert_allclose(array(dots[0]["x"]), want[:, 0], rtol=1e-6)
    np.testing.assert_allclose(array(dots[0]["y"]), want[:, 1], rtol=1e-6)
    sizes, weights = array(dots[0]["marker"]["size"]), points.weights[1, 1].numpy()
    assert (np.argsort(sizes, kind="stable") == np.argsort(weights, kind="stable")).all()
    page.radio(key="smp-color").set_value("level").run()
    names = [d["name"] for d in figure(page, "decoder-sampling")["data"] if "legendgroup" in d]
    assert set(names) == {"level 1 (stride 16)"}
    # the references each layer started from, then the final box
    outline = [d for d in figure(page, "anchors")["data"]
               if d.get("text", "").startswith(f"query {best.query} ")]
    assert [d["text"].split(": ")[1] for d in outline] == [
        "reference of layer 1", "reference of layer 2", "final box"]
    x0, y0, x1, y1 = a.anchor_boxes(best.query)[1]
    np.testing.assert_allclose(array(outline[1]["x"]), [x0, x1, x1, x0, x0], rtol=1e-5)
    np.testing.assert_allclose(array(outline[1]["y"]), [y0, y0, y1, y1, y0], rtol=1e-5)
    # the dense AIFI encoder around a click
    click(page, 333, 222, 360, 240, t=1)
    assert_clean(page)
    point = display_to_original(333, 222, (360, 240), (600, 400))
    np.testing.assert_allclose(array(charts(page)["encoder-map"]["data"][0]["z"]),
                               a.encoder_attention(point), rtol=1e-5, atol=1e-7)
    page.radio(key="method").set_value(explain.ROLLOUT).run()  # through the sparse layers
    assert_clean(page)
    page.selectbox(key="dec-level").set_value("all levels").run()
    np.testing.assert_allclose(heat(page), explain.rollout(a).decoder_maps([best.query])[0],
                               rtol=1e-5, atol=1e-7)
    page.radio(key="method").set_value(explain.RELEVANCE).run()  # says why, draws nothing
    assert_clean(page)
    assert any("Relevance is not defined for RT-DETR" in i.value for i in page.info)
    assert "decoder-grid" not in charts(page)


def test_deformable_detr_encoder_tokens_on_each_level(page, deformable_dir):
    page.run()
    pick(page, "deformable_detr")
    assert_clean(page)
    a = library(deformable_dir, "deformable_detr")
    click(page, 120, 90, 360, 240, t=1)
    assert_clean(page)
    point = display_to_original(120, 90, (360, 240), (600, 400))
    np.testing.assert_allclose(array(charts(page)["encoder-map"]["data"][0]["z"]),
                               a.encoder_attention(point), rtol=1e-5, atol=1e-7)
    level = next(o for o in page.selectbox(key="enc-level").options if o.startswith("level 2"))
    page.selectbox(key="enc-level").set_value(level).run()
    page.radio(key="enc-direction").set_value("where the point looks").run()
    assert_clean(page)
    np.testing.assert_allclose(array(charts(page)["encoder-map"]["data"][0]["z"]),
                               a.encoder_attention(point, direction="outgoing", level=2),
                               rtol=1e-5, atol=1e-7)
    token = figure(page, "encoder-sampling")
    pts = a.encoder_points(point, level=2)
    assert token["layout"]["annotations"][0]["text"].startswith(f"token {pts.index}: level 2")
    dots = [d for d in token["data"] if "legendgroup" in d]
    assert len(dots) == a.num_levels  # coloured by level
    np.testing.assert_allclose(array(dots[0]["x"]), pts.locations[:, 0, :, 0].flatten().numpy(),
                               rtol=1e-6)
    page.toggle(key="enc-overview-on").set_value(True).run()  # every layer and head
    page.toggle(key="dec-overview-on").set_value(True).run()
    assert_clean(page)
    page.radio(key="method").set_value(explain.ROLLOUT).run()
    assert_clean(page)
    assert_sizes_are_current()


def assert_sizes_are_current():
    """What the page's cache counts for an analysis and a rollout is what they hold now: work
    they keep as they are read (clicked tokens, each query's rollout) counts against the
    budget."""
    cache = resources.cache()
    grown = [k for k, _ in cache.sizes() if k[0] in ("analysis", "rollout")]
    assert {k[0] for k in grown} == {"analysis", "rollout"}
    for key, size in cache.sizes():
        if key in grown:
            assert size == nbytes(cache.get(key, lambda: None)), key[0]


def test_faithfulness_scores_the_shown_level_and_ranks_the_methods_that_apply(
        page, deformable_dir):
    page.run()
    pick(page, "rt_detr")
    page.selectbox(key="dec-layer").set_value("layer 1").run()
    level = next(o for o in page.selectbox(key="dec-level").options if o.startswith("level 1"))
    page.selectbox(key="dec-level").set_value(level).run()
    assert_clean(page)
    assert not any("deletion AUC" in c.value for c in page.caption)  # nothing unasked
    page.button(key="score-page").click().run()
    assert_clean(page)
    model = load_model(checkpoint=deformable_dir / "rt_detr")
    a = analyze(model, SAMPLE.read_bytes())
    base = faithfulness.random_baseline(model, a)
    shown = [int(t["text"].split(":")[0].removeprefix("query ")) for t in
             charts(page)["decoder-grid"]["layout"]["annotations"]
             if t["text"].startswith("query ")]
    assert shown
    for query in shown:  # the shown map: layer 1, mean of heads, level 1's tokens only
        score = faithfulness.score_maps(model, a, query, {"map": a.decoder_tokens(
            [query], 0, None, level=1)[0]}, baseline=base)["map"]
        text = f"query {query}: " + score.summary(base.curves(query, score.label))
        assert any(c.value == text for c in page.caption), text
    # the ranking: raw attention and rollout (relevance is not defined here), level 1
    page.selectbox(key="rank-query").set_value(shown[0]).run()
    page.button(key="rank-go").click().run()
    assert_clean(page)
    table = page.dataframe[0].value
    assert set(table["method"]) == {explain.RAW, explain.ROLLOUT, "random order"}
    assert list(table["rank"]) == ["1", "2", "baseline"]  # the random row is not ranked
    roll = faithfulness.score_maps(model, a, shown[0], {"map": explain.rollout(a).decoder_tokens(
        [shown[0]], level=1)[0]}, baseline=base)["map"]
    row = table[table["method"] == explain.ROLLOUT].iloc[0]
    assert row["deletion AUC"] == pytest.approx(roll.deletion.auc, abs=1e-6)
    assert row["in the box"] == pytest.approx(roll.pointing, abs=1e-6)
    chance = table[table["method"] == "random order"].iloc[0]["in the box"]  # not "None"
    assert chance == pytest.approx(faithfulness.uniform_pointing(a, tuple(a.boxes_xyxy()[
        shown[0]])), abs=1e-9)


def test_lw_detr_without_an_encoder_and_beside_detr(page, deformable_dir):
    page.run()
    pick(page, "lw_detr")
    assert_clean(page)
    assert any("LW-DETR ViT has no transformer encoder" in i.value for i in page.info)
    for toggle in ("dbg-composite-on", "dbg-edges-on", "dbg-sanity-on"):
        page.toggle(key=toggle).set_value(True).run()
        assert_clean(page)
    assert any("Box edges are explained by relevance" in i.value for i in page.info)
    page.sidebar.selectbox(key="compare-with").set_value("R50").run()
    assert_clean(page)
    assert any("Side by side: lw_detr and R50" in s.value for s in page.subheader)
    assert "compare-decoder" in charts(page)


def test_bad_deformable_checkpoints_say_why_and_the_page_goes_on(page, deformable_dir, tmp_path):
    page.run()
    listed = [o for o in page.sidebar.selectbox(key="checkpoint").options
              if o.startswith("remote-code (")]
    assert listed and "never runs code" in listed[0]
    page.sidebar.selectbox(key="checkpoint").set_value(listed[0]).run()
    assert not page.exception
    assert any("auto_map" in e.value and "never runs code" in e.value for e in page.error)
    mismatched = tmp_path / "mismatched"
    tiny_model("d_fine", dtype=torch.float32).save_pretrained(mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "decoder_ffn_dim": 48}))
    page.sidebar.selectbox(key="checkpoint").set_value("A checkpoint path...").run()
    page.sidebar.text_input(key="checkpoint-path").input(str(mismatched)).run()
    assert not page.exception
    assert any("does not fit the model its config.json describes" in e.value
               for e in page.error)
    pick(page, "rt_detr")  # and the page goes on
    assert_clean(page)
    assert "decoder-grid" in charts(page)
