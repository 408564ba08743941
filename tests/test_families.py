"""Conditional DETR and DAB-DETR behind the one model interface: ``load_model``, ``analyze``,
the methods registry and the catalog, with transformers' own eager attention as the oracle."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from test_hf_families import tiny_config  # noqa: E402
from transformers import (  # noqa: E402
    ConditionalDetrForObjectDetection,
    DabDetrForObjectDetection,
)

from detr_viz import analyze, explain, load_model  # noqa: E402
from detr_viz.catalog import find_checkpoints  # noqa: E402
from detr_viz.download import WEIGHTS_ENV  # noqa: E402
from detr_viz.errors import ArgumentError, NotADetrCheckpointError, WrongVariantError  # noqa: E402
from detr_viz.families import HFDetector  # noqa: E402
from detr_viz.image import load_image, preprocess  # noqa: E402
from detr_viz.methods import (  # noqa: E402
    METHOD,
    Explainer,
    decoder_maps,
    encoder_maps,
    redraw_unavailable,
    replay_unavailable,
)
from detr_viz.weights import describe_checkpoint  # noqa: E402

from conftest import files_read  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
CLASSES = {"conditional_detr": ConditionalDetrForObjectDetection,
           "dab_detr": DabDetrForObjectDetection}
NAMES = ("cat", "dog", "bird")
PHOTO = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 80, 3), np.uint8))
SIZE = {"short_side": 96, "max_size": 128}  # a 3 x 4 feature grid


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for index, (family, cls) in enumerate(CLASSES.items()):
        torch.manual_seed(10 + index)
        model = cls(tiny_config(family))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out[family] = tmp_path_factory.mktemp(family.replace("_", "-"))
        model.save_pretrained(out[family])
    return out


@pytest.mark.parametrize("family", CLASSES)
def test_load_model_reads_the_family_and_analyze_gives_the_same_record(folders, family):
    model = load_model(checkpoint=folders[family])
    assert isinstance(model, HFDetector)
    spec = model.spec
    assert (spec.family, spec.num_classes, spec.labels, spec.num_queries) == (family, 3, NAMES, 7)
    assert (spec.encoder_layers, spec.decoder_layers, spec.heads, spec.d_model) == (2, 2, 2, 32)
    assert spec == describe_checkpoint(folders[family]) and spec.stride == 32
    analysis = analyze(model, PHOTO, **SIZE)
    assert analysis.feature_hw == (3, 4) and analysis.inputs.src.shape == (1, 32, 3, 4)
    assert not analysis.inputs.mask.any()  # no padding: every cell is a token of the photo
    assert analysis.probabilities.shape == (7, 3) and analysis.num_heads == 2
    dets = analysis.detections(0.0)
    assert [d.name for d in dets] == [NAMES[d.label] for d in dets] and len(dets) == 7
    assert set(analysis.terms) == {"content", "spatial"}
    for layer in range(2):  # the full map is content x spatial, renormalised (both families)
        full = analysis.decoder_attentions(list(range(7)), layer, 1)
        product = (analysis.decoder_attentions(list(range(7)), layer, 1, "content")
                   * analysis.decoder_attentions(list(range(7)), layer, 1, "spatial"))
        np.testing.assert_allclose(full, product / product.sum(axis=(1, 2), keepdims=True),
                                   rtol=1e-4, atol=1e-6)
    match = analysis.queries_for_box(dets[0].box, k=1)[0]
    assert match.no_object is None and "no object" not in match.sentence


def test_loading_reads_config_json_once_so_spec_and_model_come_from_one_reading(folders,
                                                                             monkeypatch):
    from detr_viz import families, hf_families

    read = files_read(monkeypatch, hf_families)
    model = families.load_family(folders["dab_detr"])
    assert read.count("config.json") == 1
    assert (model.spec.decoder_layers, model.spec.num_queries) == (
        model.hf.config.decoder_layers, model.hf.config.num_queries) == (2, 7)


@pytest.mark.parametrize("family", CLASSES)
def test_captured_attention_is_transformers_own_in_float64(folders, family):
    """Per layer and head, against ``output_attentions=True`` of the same weights. DAB-DETR
    takes its softmax in float32 even in a float64 model (see detr_viz.hf_capture), so it is
    compared within 1e-6; Conditional DETR within 1e-9."""
    model = load_model(checkpoint=folders[family]).double()
    analysis = analyze(model, PHOTO, **SIZE)
    x = preprocess(load_image(PHOTO), **SIZE).tensor.double()
    with torch.inference_mode():
        want = model.hf(pixel_values=x, output_attentions=True)
    atol = 1e-9 if family == "conditional_detr" else 1e-6
    for layer in range(2):
        for head in range(2):
            np.testing.assert_allclose(
                analysis.decoder_attentions(list(range(7)), layer, head).reshape(7, -1),
                want.cross_attentions[layer][0, head], rtol=0, atol=atol)
            np.testing.assert_allclose(analysis.encoder[layer].dense(head),
                                       want.encoder_attentions[layer][0, head], rtol=0, atol=atol)
            np.testing.assert_allclose(analysis.decoder_self[layer].dense(head),
                                       want.decoder_attentions[layer][0, head], rtol=0, atol=atol)
    np.testing.assert_allclose(analysis.probabilities, want.logits[0].sigmoid(), rtol=1e-6)
    assert want.cross_attentions[-1].std() > 1e-3


def test_export_of_a_family_analysis(folders):
    """The download holds the family's own names, layer count and maps, and says which model."""
    import io

    from detr_viz import export
    from detr_viz.analysis import OUTGOING

    analysis = analyze(load_model(checkpoint=folders["conditional_detr"]), PHOTO, **SIZE)
    view = export.View(threshold=0.0, decoder_layer=-1, decoder_head=1, encoder_layer=0,
                       encoder_head=None, direction=OUTGOING, points=((5.0, 7.0), (79.0, 59.0)))
    data = np.load(io.BytesIO(export.to_npz(analysis, view)))
    queries = [d.query for d in analysis.detections(0.0)]
    np.testing.assert_array_equal(data["queries"], queries)
    assert set(data["names"]) <= set(NAMES) and len(queries) == 7
    np.testing.assert_allclose(data["decoder_maps"], analysis.decoder_attentions(queries, 1, 1))
    np.testing.assert_allclose(data["encoder_maps"][1],
                               analysis.encoder_attention((79.0, 59.0), 0, None, OUTGOING))
    assert tuple(data["feature_hw"]) == (3, 4) and int(data["stride"]) == 32
    settings = json.loads(str(data["settings"]))
    assert settings["decoder_layer"] == 1 and settings["encoder_head"] == "mean"
    assert settings["model"] == analysis.spec.title and "Conditional DETR" in settings["model"]
    as_json = json.loads(export.to_json(analysis, view))
    np.testing.assert_allclose(np.array(as_json["decoder_maps"]), data["decoder_maps"])
    with pytest.raises(ArgumentError, match="feature levels .level 1. are a deformable"):
        export.to_npz(analysis, export.View(threshold=0.0, decoder_level=1))  # never ignored


def test_dab_detr_anchor_boxes_through_the_layers(folders):
    model = load_model(checkpoint=folders["dab_detr"])
    analysis = analyze(model, PHOTO, **SIZE)
    boxes = analysis.anchor_boxes(3)
    assert boxes.shape == (3, 4)  # the anchor of each of 2 layers, then the final box
    np.testing.assert_allclose(boxes[-1], analysis.boxes_xyxy()[3], rtol=1e-5)
    width, height = analysis.original_size
    cx, cy, w, h = analysis.anchors[1, 3]
    np.testing.assert_allclose(boxes[1], [(cx - w / 2) * width, (cy - h / 2) * height,
                                          (cx + w / 2) * width, (cy + h / 2) * height],
                               rtol=1e-5)
    conditional = analyze(load_model(checkpoint=folders["conditional_detr"]), PHOTO, **SIZE)
    with pytest.raises(ArgumentError, match="no anchor boxes"):
        conditional.anchor_boxes(0)
    assert conditional.reference_points.shape == (7, 2)


@pytest.mark.parametrize("family", CLASSES)
def test_methods_say_what_they_can_explain(folders, family):
    model = load_model(checkpoint=folders[family])
    analysis = analyze(model, PHOTO, **SIZE)
    source = Explainer(model, analysis)
    roll = decoder_maps(source, explain.ROLLOUT, [0, 5])
    np.testing.assert_allclose(roll, explain.rollout(analysis).decoder_maps([0, 5]))
    assert encoder_maps(source, explain.RAW, [(10, 10)])[0].shape == (3, 4)
    assert decoder_maps(source, explain.RELEVANCE, [0]).shape == (1, 3, 4)
    assert replay_unavailable(analysis, "Faithfulness scores re-run the transformer") is None
    why = redraw_unavailable(analysis, "The sanity check re-draws the transformer's weights")
    assert why and "transformers' code" in why and "relevance explain it" in why
    kept_nothing = dataclasses.replace(analysis, pixels=None)
    with pytest.raises(ArgumentError, match="kept no input"):
        decoder_maps(Explainer(model, kept_nothing), explain.RELEVANCE, [0])
    assert METHOD[explain.ROLLOUT].unavailable(analysis) is None


def test_user_values_and_labels_for_a_family(folders, tmp_path):
    folder = folders["conditional_detr"]
    with pytest.raises(WrongVariantError, match="heads = 2 .its config.json says so., not 8"):
        load_model(checkpoint=folder, heads=8)
    model = load_model(checkpoint=folder, labels=["ant", "bee", "cow"])
    assert model.spec.labels == ("ant", "bee", "cow")
    with pytest.raises(ArgumentError, match="lists 2 names, but the checkpoint has 3 classes"):
        load_model(checkpoint=folder, labels=["ant", "bee"])


def test_unsupported_model_types_say_what_is_supported(folders, tmp_path):
    yolos = tmp_path / "yolos"
    shutil.copytree(folders["conditional_detr"], yolos)
    config = json.loads((yolos / "config.json").read_text())
    (yolos / "config.json").write_text(json.dumps(config | {"model_type": "yolos"}))
    with pytest.raises(NotADetrCheckpointError, match="yolos.*Conditional DETR"):
        load_model(checkpoint=yolos)


def test_the_catalog_lists_the_families(monkeypatch, folders, tmp_path):
    weights = tmp_path / "weights"
    for family, folder in folders.items():
        shutil.copytree(folder, weights / family)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    found = {f.path.name: f.spec for f in find_checkpoints()}
    assert found["conditional_detr"].architecture.startswith("Conditional DETR")
    assert found["dab_detr"].title.startswith("dab_detr (DAB-DETR ")


def test_without_transformers_the_message_says_what_to_install(folders, monkeypatch):
    import builtins

    from detr_viz.errors import MissingDependencyError

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(MissingDependencyError, match="pip install -r requirements.txt"):
        load_model(checkpoint=folders["conditional_detr"])


@pytest.mark.parametrize("family", CLASSES)
def test_relevance_follows_detrs_rule_in_float64(folders, family):
    """Oracle: the rule in full matrices (tests/dense_oracle.py's handle_residual), with
    ``dy/dA`` from a graph through the whole model (pixels and learned queries as leaves)."""
    from dense_oracle import handle_residual

    model = load_model(checkpoint=folders[family]).double()
    analysis = analyze(model, PHOTO, **SIZE)
    queries, classes = [0, 4], [1, 2]
    got = explain.relevance(model, analysis, queries, classes)
    inner = model.hf.model
    embedding = getattr(inner, "query_position_embeddings", None) or inner.query_refpoint_embeddings
    for i, (query, label) in enumerate(zip(queries, classes, strict=True)):
        embedding.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                pixels = analysis.pixels.double().requires_grad_()
                out = model.hf(pixel_values=pixels, output_attentions=True)
                maps = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
                grads = torch.autograd.grad(out.logits[0, query, label], maps)
        finally:
            embedding.weight.requires_grad_(False)
        cams = [(g * a).clamp(min=0).mean(1)[0].detach() for g, a in zip(grads, maps,
                                                                         strict=True)]
        enc, dec_self, cross = cams[:2], cams[2:4], cams[4:]
        n, q = enc[0].shape[0], dec_self[0].shape[0]
        r_ii = torch.eye(n, dtype=torch.float64)
        for a in enc:
            r_ii = r_ii + a @ r_ii
        r_qq, r_qi = torch.eye(q, dtype=torch.float64), torch.zeros(q, n, dtype=torch.float64)
        for s, c in zip(dec_self, cross, strict=True):
            r_qq, r_qi = r_qq + s @ r_qq, r_qi + s @ r_qi
            r_qi = r_qi + handle_residual(r_qq).T @ (c @ handle_residual(r_ii))
        want = r_qi[query].reshape(analysis.feature_hw).numpy()
        assert want.max() > 0
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12 * want.max())
    point = (30.0, 20.0)
    rel = explain.encoder_relevance(model, analysis, 4, 2)
    assert rel.encoder_map(point).shape == analysis.feature_hw
    assert METHOD[explain.RELEVANCE].unavailable(analysis) is None


def test_box_edge_relevance_for_a_family(folders):
    """Edges use the same gradient path: each edge's map is the relevance of that box
    coordinate, so the left and right edges' maps differ."""
    from detr_viz.edges import edge_relevance

    model = load_model(checkpoint=folders["dab_detr"]).double()
    analysis = analyze(model, PHOTO, **SIZE)
    maps = edge_relevance(model, analysis, 3)
    assert maps.shape == (4, 3, 4) and np.isfinite(maps).all() and maps.max() > 0
    assert not np.allclose(maps[0], maps[2])


@pytest.mark.parametrize("family", CLASSES)
def test_token_replay_and_faithfulness_for_a_family(folders, family):
    """The replay (backbone skipped, a private copy of the model) gives what the whole model
    gives with the same encoder tokens substituted at its input projection; faithfulness then
    scores a map as for DETR."""
    from detr_viz import faithfulness
    from detr_viz.hf_replay import hf_replay

    model = load_model(checkpoint=folders[family]).double()
    analysis = analyze(model, PHOTO, **SIZE)
    src = analysis.inputs.src[0]
    changed = src.clone()
    changed[:, 1, 2] = src.mean((1, 2))  # one token replaced by the mean token
    logits, boxes = hf_replay(model.hf, analysis.pixels, analysis.inputs, [src, changed])
    with torch.inference_mode():
        unchanged = model.hf(pixel_values=analysis.pixels.double())
    np.testing.assert_allclose(logits[0], unchanged.logits[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(logits[0].sigmoid(), analysis.probabilities, atol=1e-7)  # float32
    handle = model.hf.model.input_projection.register_forward_hook(
        lambda module, args, out: changed[None])
    try:
        with torch.inference_mode():
            want = model.hf(pixel_values=analysis.pixels.double())
    finally:
        handle.remove()
    np.testing.assert_allclose(logits[1], want.logits[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(boxes[1], want.pred_boxes[0], rtol=0, atol=1e-12)
    assert not torch.allclose(logits[0], logits[1])  # the change reached the outputs
    query = analysis.detections(0.0)[0]
    raw = analysis.decoder_attention(query.query)
    base = faithfulness.random_baseline(model, analysis, steps=3)
    score = faithfulness.score_maps(model, analysis, query.query, {"raw": raw}, steps=3,
                                    baseline=base)["raw"]
    assert score.deletion.probability[0] == pytest.approx(query.score, rel=1e-6)
    assert len(score.deletion.probability) == 4 and 0 <= score.pointing <= 1


def test_command_line_on_a_conditional_detr(folders, tmp_path, capsys):
    import csv

    from detr_viz.cli import main

    photo = tmp_path / "in" / "p.jpg"
    photo.parent.mkdir()
    PHOTO.save(photo, quality=95)
    out = tmp_path / "out"
    status = main(["analyze", str(photo), "--checkpoint", str(folders["conditional_detr"]),
                   "--methods", "raw,relevance", "--threshold", "0", "--out", str(out),
                   "--short-side", "96", "--max-size", "128"])
    assert status == 0, capsys.readouterr().err
    assert "(Conditional DETR" in capsys.readouterr().err
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["name"] for r in rows} <= set(NAMES)
    assert main(["evaluate", str(out), "--steps", "2", "--bootstrap", "10"]) == 0
