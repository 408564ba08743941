"""The model picker on the page: a fine-tuned DETR found on disk or typed as a path, with its
class names, its own layers and heads, every method, and side by side with a released model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
import torchvision
from streamlit.testing.v1 import AppTest

from detr_viz import analyze, explain, load_model
from detr_viz.analysis import Analysis
from detr_viz.display import display_to_original
from detr_viz.model import build_model
from detr_viz.spec import ModelSpec
from detr_viz.testing import planted_state_dict
from detr_viz.ui.sidebar import A_PATH, OFFICIAL

from apptest import APP, SAMPLE, array, assert_clean, charts, click, query_titles

SPEC = ModelSpec(num_classes=3, labels=("class 0", "class 1", "class 2"), num_queries=50,
                 encoder_layers=4, decoder_layers=3, heads=4, d_model=128, ffn_dim=256,
                 name="checkpoint0049", official=False)
TITLE = "checkpoint0049 (DETR R50, 3 classes, 50 queries, 4+3 layers x 4 heads)"


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory, weights_dir) -> Path:
    """The released stand-ins plus a DETR-repository training checkpoint of another size."""
    folder = tmp_path_factory.mktemp("finetuned")
    for path in weights_dir.iterdir():
        (folder / path.name).symlink_to(path)
    torch.manual_seed(0)
    state = planted_state_dict(build_model(SPEC), sharpness=3.0)
    args = argparse.Namespace(nheads=4, dilation=False, backbone="resnet50", enc_layers=4,
                              dec_layers=3, lr=1e-4)
    torch.save({"model": state, "args": args, "epoch": 49}, folder / "checkpoint0049.pth")
    torch.save(state, folder / "bare.pth")  # no args: heads are assumed
    return folder


def app_on(monkeypatch, folder: Path, tmp_path: Path) -> AppTest:
    """The page with ``folder`` as $DETR_VIZ_WEIGHTS, threshold 0 (random weights: every query
    is shown), nothing cached from another test."""
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(folder))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=240)
    at.session_state["threshold"] = 0.0
    return at


@pytest.fixture
def page(monkeypatch, finetuned_dir, tmp_path) -> AppTest:
    yield app_on(monkeypatch, finetuned_dir, tmp_path)
    st.cache_resource.clear()


def decoder_titles(at: AppTest) -> list[str]:
    return query_titles(charts(at)["decoder-grid"])


def test_a_finetuned_checkpoint_is_one_click_away_with_its_names_layers_and_heads(
        page, finetuned_dir):
    page.run()
    options = page.sidebar.selectbox(key="checkpoint").options
    assert options[0] == OFFICIAL and options[-1] == A_PATH and TITLE in options
    assert any(o.startswith("bare (") for o in options)  # listed too: it loads
    page.sidebar.selectbox(key="checkpoint").set_value(TITLE).run()
    assert_clean(page)
    assert any(TITLE in c.value and c.value.endswith(" - on CPU") for c in page.caption)
    assert page.selectbox(key="dec-layer").options == ["layer 1", "layer 2", "layer 3 (last)"]
    assert page.selectbox(key="dec-layer").value == "layer 3 (last)"  # R50's was layer 6
    assert page.selectbox(key="enc-layer").options[-1] == "layer 4 (last)"
    assert page.selectbox(key="dec-head").options == ["mean of heads", "head 1", "head 2",
                                                      "head 3", "head 4"]
    model = load_model(checkpoint=finetuned_dir / "checkpoint0049.pth")
    analysis = analyze(model, SAMPLE.read_bytes())
    titles = decoder_titles(page)
    queries = [int(t.split(":")[0].removeprefix("query ")) for t in titles]
    assert queries and all(t.split(": ")[1].rsplit(" ", 1)[0] in SPEC.labels for t in titles)
    page.selectbox(key="dec-layer").set_value("layer 2").run()
    page.selectbox(key="dec-head").set_value("head 3").run()
    figure = charts(page)["decoder-grid"]
    heat = [d for d in figure["data"] if d["type"] == "heatmap"][0]
    np.testing.assert_allclose(array(heat["z"]), analysis.decoder_attention(queries[0], 1, 2),
                               rtol=1e-5, atol=1e-7)
    for method in (explain.ROLLOUT, explain.RELEVANCE):  # every method on the other sizes
        page.radio(key="method").set_value(method).run()
        assert_clean(page)
    relevance = explain.relevance(model, analysis, queries[:1])[0]
    got = [d for d in charts(page)["decoder-grid"]["data"] if d["type"] == "heatmap"][0]
    np.testing.assert_allclose(array(got["z"]), relevance, rtol=1e-4, atol=1e-6)


def test_labels_file_names_the_classes_and_a_wrong_one_says_why(page):
    page.run()
    page.sidebar.selectbox(key="checkpoint").set_value(TITLE).run()
    page.sidebar.file_uploader(key="labels-file").upload(
        "classes.txt", b"cat\ndog\nfox\n", "text/plain").run()
    assert_clean(page)
    names = {t.split(": ")[1].rsplit(" ", 1)[0] for t in decoder_titles(page)}
    assert names and names <= {"cat", "dog", "fox"}
    page.sidebar.file_uploader(key="labels-file").clear().upload(
        "coco.txt", b"person\nbicycle\n", "text/plain").run()
    assert not page.exception
    assert any("lists 2 names, but the checkpoint has 3 classes" in e.value for e in page.error)
    page.sidebar.file_uploader(key="labels-file").clear().run()
    assert_clean(page)  # the page works again without the file


def test_a_typed_path_and_what_the_checkpoint_does_not_record(page, finetuned_dir):
    page.run()
    page.sidebar.selectbox(key="checkpoint").set_value(A_PATH).run()
    assert_clean(page)
    assert any("Type the path of a checkpoint" in i.value for i in page.info)
    page.sidebar.text_input(key="checkpoint-path").input(str(finetuned_dir / "nope.pth")).run()
    assert not page.exception
    assert any("does not exist" in e.value for e in page.error)
    classifier = finetuned_dir.parent / "resnet18.pth"  # a classifier's state dict
    torch.save(torchvision.models.resnet18().state_dict(), classifier)
    page.sidebar.text_input(key="checkpoint-path").input(str(classifier)).run()
    assert not page.exception
    assert any("is not a DETR checkpoint: it has no class_embed.weight" in e.value
               and "keys such as conv1.weight" in e.value for e in page.error)
    page.sidebar.text_input(key="checkpoint-path").input(f'"{finetuned_dir / "bare.pth"}"').run()
    assert not page.exception
    assert any("assumed: 8 heads" in w.value for w in page.warning)
    assert len(page.selectbox(key="dec-head").options) == 9
    page.sidebar.selectbox(key="heads").set_value(4).run()
    assert_clean(page)
    assert not page.warning or not any("8 heads" in w.value for w in page.warning)
    assert len(page.selectbox(key="dec-head").options) == 5


def test_side_by_side_with_a_released_model(page):
    page.run()
    page.sidebar.selectbox(key="checkpoint").set_value(TITLE).run()
    page.sidebar.selectbox(key="compare-with").set_value("R50").run()
    assert_clean(page)
    assert any("Side by side: checkpoint0049 and R50" in s.value for s in page.subheader)
    assert "compare-decoder" in charts(page)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, weights_dir) -> Path:
    """The released stand-ins plus a Conditional DETR and a DAB-DETR (tiny, random weights)."""
    from test_families import CLASSES
    from test_hf_families import tiny_config

    folder = tmp_path_factory.mktemp("families")
    for path in weights_dir.iterdir():
        (folder / path.name).symlink_to(path)
    for index, (family, cls) in enumerate(CLASSES.items()):
        torch.manual_seed(20 + index)
        model = cls(tiny_config(family))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(folder / family.replace("_", "-"))
    return folder


@pytest.fixture
def family_page(monkeypatch, family_dir, tmp_path) -> AppTest:
    yield app_on(monkeypatch, family_dir, tmp_path)
    st.cache_resource.clear()


def pick(at: AppTest, name: str) -> None:
    title = next(o for o in at.sidebar.selectbox(key="checkpoint").options
                 if o.startswith(f"{name} ("))
    at.sidebar.selectbox(key="checkpoint").set_value(title).run()


def test_conditional_detr_on_the_page(family_page, family_dir):
    page = family_page
    page.run()
    pick(page, "conditional-detr")
    assert_clean(page)
    model = load_model(checkpoint=family_dir / "conditional-detr")
    analysis = analyze(model, SAMPLE.read_bytes())
    titles = decoder_titles(page)
    queries = [int(t.split(":")[0].removeprefix("query ")) for t in titles]
    assert queries == [d.query for d in analysis.detections(0.0)[:len(queries)]]
    assert all(t.split(": ")[1].rsplit(" ", 1)[0] in ("cat", "dog", "bird") for t in titles)
    heat = [d for d in charts(page)["decoder-grid"]["data"] if d["type"] == "heatmap"][0]
    np.testing.assert_allclose(array(heat["z"]), analysis.decoder_attention(queries[0]),
                               rtol=1e-5, atol=1e-7)
    terms = json.loads(next(c.proto.spec for c in page.get("plotly_chart")
                            if c.proto.id.endswith("terms")))
    names = [a["text"] for a in terms["layout"]["annotations"]]
    assert names[:len(queries)] == [f"query {q} · full" for q in queries]
    assert f"query {queries[0]} · spatial" in names and f"query {queries[0]} · content" in names
    overlays = [d for d in terms["data"] if d["type"] == "heatmap"]
    n = len(queries)
    spatial = analysis.decoder_attention(queries[0], term="spatial")
    np.testing.assert_allclose(array(overlays[2 * n]["z"]), spatial, rtol=1e-5, atol=1e-7)
    click(page, 333, 222, 360, 240, t=1)  # the encoder around a clicked point
    assert_clean(page)
    point = display_to_original(333, 222, (360, 240), (600, 400))
    np.testing.assert_allclose(array(charts(page)["encoder-map"]["data"][0]["z"]),
                               analysis.encoder_attention(point), rtol=1e-5, atol=1e-7)
    page.button(key="score-page").click().run()  # faithfulness through the token replay
    assert_clean(page)
    assert any(c.value.startswith(f"query {queries[0]}: deletion AUC") for c in page.caption)
    page.radio(key="method").set_value(explain.RELEVANCE).run()
    assert_clean(page)  # relevance from transformers' own attention and gradients
    heat = [d for d in charts(page)["decoder-grid"]["data"] if d["type"] == "heatmap"][0]
    np.testing.assert_allclose(array(heat["z"]), explain.relevance(model, analysis,
                                                                   queries[:1])[0],
                               rtol=1e-4, atol=1e-6 * np.abs(array(heat["z"])).max())
    page.toggle(key="dbg-sanity-on").set_value(True).run()  # needs a replay: says why
    assert any("The sanity check re-draws" in i.value and "transformers' code" in i.value
               for i in page.info)
    page.radio(key="method").set_value(explain.ROLLOUT).run()
    assert_clean(page)
    roll = explain.rollout(analysis).decoder_maps(queries[:1])[0]
    heat = [d for d in charts(page)["decoder-grid"]["data"] if d["type"] == "heatmap"][0]
    np.testing.assert_allclose(array(heat["z"]), roll, rtol=1e-4, atol=1e-7)


def test_a_style_change_redraws_the_maps_without_computing_them_again(family_page,
                                                                       monkeypatch):
    """An opacity move reruns the whole page: the decoder's and the terms' figures are drawn
    again with the new opacity from the maps computed before (the maps are kept apart from
    the figures)."""
    page = family_page
    page.run()
    pick(page, "conditional-detr")
    assert_clean(page)
    computed = []
    original = Analysis.decoder_attentions
    monkeypatch.setattr(Analysis, "decoder_attentions",
                        lambda self, *a, **k: computed.append(a) or original(self, *a, **k))
    next(s for s in page.sidebar.slider if s.label == "Opacity").set_value(0.3).run()
    assert_clean(page)
    assert computed == []
    terms = json.loads(next(c.proto.spec for c in page.get("plotly_chart")
                            if c.proto.id.endswith("terms")))
    for figure in (charts(page)["decoder-grid"], terms):
        overlays = [d for d in figure["data"] if d["type"] == "heatmap" and "opacity" in d]
        assert overlays and {d["opacity"] for d in overlays} == {0.3}


def test_dab_detr_anchors_and_a_comparison_with_detr(family_page, family_dir):
    page = family_page
    page.run()
    pick(page, "dab-detr")
    assert_clean(page)
    analysis = analyze(load_model(checkpoint=family_dir / "dab-detr"), SAMPLE.read_bytes())
    anchors = json.loads(next(c.proto.spec for c in page.get("plotly_chart")
                              if c.proto.id.endswith("anchors")))
    best = analysis.detections(0.0)[0]
    outline = [d for d in anchors["data"] if d.get("text", "").startswith(f"query {best.query} ")]
    assert [d["text"].split(": ")[1] for d in outline] == [
        "anchor of layer 1", "anchor of layer 2", "final box"]
    x0, y0, x1, y1 = analysis.anchor_boxes(best.query)[0]
    np.testing.assert_allclose(array(outline[0]["x"]), [x0, x1, x1, x0, x0], rtol=1e-5)
    page.sidebar.selectbox(key="compare-with").set_value("R50").run()
    assert_clean(page)
    assert any("Side by side: dab-detr and R50" in s.value for s in page.subheader)
    assert "compare-decoder" in charts(page)
