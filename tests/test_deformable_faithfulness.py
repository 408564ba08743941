"""Faithfulness scores for the deformable families: the replay on changed tokens, deletion and
insertion over every level's tokens, the pointing game on each level's cells.

The replay is checked against the whole model (backbone included) with its token modules'
outputs replaced by a forward hook: the plain way to feed a model other tokens. The curves are
checked against that same plain run, step by step, with the order built by hand. float64
throughout (tiny models with random weights, saved and loaded as a user's checkpoint).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers as tf
from test_deformable_analysis import FAMILIES, analysed, random_photo, saved

from detr_viz import analyze, faithfulness
from detr_viz.deformable import model_inputs
from detr_viz.deformable_replay import SITES, deformable_replay
from detr_viz.errors import ArgumentError
from detr_viz.explain import RAW, ROLLOUT, rollout
from detr_viz.families import load_family
from detr_viz.methods import Explainer, decoder_maps, decoder_tokens, replay_unavailable
from detr_viz.sampling import splat

from conftest import raises
from deformable_models import hooks, small_processor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photo():
    return random_photo(11)


@pytest.fixture(scope="module")
def analyses(tmp_path_factory, photo):
    return analysed(saved(tmp_path_factory), photo)


def plain_run(model, photo, levels) -> torch.Tensor:
    """Raw logits (Q, C) of the whole model on ``photo``, backbone included, its tokens
    replaced by ``levels`` (per level (C, h, w)) where its code makes them."""
    hf = model.hf
    site, projections = SITES[hf.config.model_type]
    if projections is not None:
        handles = [p.register_forward_hook(lambda m, a, o, i=i: levels[i][None])
                   for i, p in enumerate(hf.get_submodule(projections))]
    else:
        def swap(module, args, out):
            given = iter(levels)

            def put(value):
                if isinstance(value, torch.Tensor) and value.is_floating_point() \
                        and value.dim() == 4:
                    return next(given)[None]
                return type(value)(put(v) for v in value) if isinstance(
                    value, list | tuple) else value
            return put(out)
        handles = [hf.get_submodule(site).register_forward_hook(swap)]
    pixels, mask, _ = model_inputs(model, photo)
    try:
        with torch.inference_mode():
            extra = {} if mask is None else {"pixel_mask": mask}
            return hf(pixel_values=pixels.double(), **extra).logits[0]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_equals_the_whole_model_given_those_tokens(analyses, photo, family):
    model, a = analyses[family]
    assert a.inputs.shapes == a.level_shapes  # every level the decoder reads is a token level
    unchanged = [t[0] for t in a.inputs.tokens]
    g = torch.Generator().manual_seed(3)
    changed = [[t + torch.randn(t.shape, generator=g, dtype=t.dtype) for t in unchanged]
               for _ in range(2)]
    before = hooks(model.hf)
    got = deformable_replay(model.hf, a.inputs, [unchanged, *changed])
    assert hooks(model.hf) == before  # the shared model is never hooked
    probabilities = got[0].sigmoid().numpy()
    np.testing.assert_allclose(probabilities, a.probabilities, rtol=0, atol=1e-6)  # float32 record
    np.testing.assert_allclose(got[0], plain_run(model, photo, unchanged), rtol=0, atol=1e-12)
    for k, levels in enumerate(changed):
        expected = plain_run(model, photo, levels)
        np.testing.assert_allclose(got[k + 1], expected, rtol=0, atol=1e-10)
        assert float((expected - got[0]).abs().max()) > 1e-3  # the change mattered


def by_hand(model, a, photo, values: np.ndarray, query: int, label: int, steps: int):
    """(deletion, insertion) probabilities of ``label`` for ``query``, one plain run per step:
    tokens ranked by ``values``, ties in the random baseline's order (seed 0), the deleted
    token of level l replaced by level l's mean token over the photo's cells."""
    tokens = [t[0].flatten(1) for t in a.inputs.tokens]
    flat = torch.cat(tokens, 1)
    ends = np.cumsum([0] + [t.shape[1] for t in tokens])
    valid = a.photo_tokens()
    mean = torch.cat([flat[:, valid[(valid >= s) & (valid < e)]].mean(1, keepdim=True)
                      .expand(-1, e - s) for s, e in zip(ends[:-1], ends[1:], strict=True)], 1)
    random = torch.randperm(len(valid), generator=torch.Generator().manual_seed(0)).numpy()
    rank = {int(valid[p]): r for r, p in enumerate(random)}
    order = sorted(valid.tolist(), key=lambda t: (-values[t], rank[t]))

    def prob(src):
        levels = [src[:, s:e].reshape(-1, h, w) for s, e, (h, w) in
                  zip(ends[:-1], ends[1:], a.inputs.shapes, strict=True)]
        return float(plain_run(model, photo, levels)[query, label].sigmoid())

    curves = []
    for base, fill in ((flat, mean), (mean, flat)):
        curve = []
        for f in np.linspace(0, 1, steps + 1):
            src = base.clone()
            chosen = order[:round(f * len(valid))]
            src[:, chosen] = fill[:, chosen]
            curve.append(prob(src))
        curves.append(np.array(curve))
    return curves


@pytest.mark.parametrize("family", ["deformable_detr", "rt_detr", "lw_detr"])
def test_curves_equal_deleting_and_inserting_by_hand(analyses, photo, family):
    model, a = analyses[family]
    query = int(a.probabilities.max(1).argmax())
    values = decoder_tokens(Explainer(model, a), RAW, [query], layer=-1)[0]
    assert (values == 0).sum() > 0  # ties: tokens the points never read
    got = faithfulness.score_maps(model, a, query, {"raw": values}, steps=4)["raw"]
    deletion, insertion = by_hand(model, a, photo, values, query, got.label, steps=4)
    np.testing.assert_allclose(got.deletion.probability, deletion, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.insertion.probability, insertion, rtol=0, atol=1e-10)
    assert got.deletion.probability[0] == pytest.approx(a.probabilities[query, got.label],
                                                        abs=1e-6)


def test_a_map_without_weight_scores_as_the_random_order(analyses):
    model, a = analyses["rt_detr_v2"]
    base = faithfulness.random_baseline(model, a, steps=4, seed=2)
    score = faithfulness.score_maps(model, a, 1, {"none": np.zeros(a.num_tokens)},
                                    steps=4, baseline=base)["none"]
    deletion, insertion = base.curves(1, score.label)
    np.testing.assert_allclose(score.deletion.probability, deletion.probability, atol=1e-12)
    np.testing.assert_allclose(score.insertion.probability, insertion.probability, atol=1e-12)
    assert np.isnan(score.pointing)


@pytest.mark.parametrize("method", [RAW, ROLLOUT])
@pytest.mark.parametrize("level", [None, 0, 2])
def test_token_values_are_each_levels_weights_and_draw_the_decoder_maps(analyses, method,
                                                                         level):
    model, a = analyses["deformable_detr"]
    source = Explainer(model, a)
    values = decoder_tokens(source, method, [0, 3], layer=-1, head=None, level=level)
    for v, query in zip(values, [0, 3], strict=True):  # from the capture directly
        want = (splat(a.capture.decoder, a.level_shapes, query, a.num_decoder_layers - 1)
                if method == RAW else a.token_levels(rollout(a).token_maps([query])[0]))
        chosen = range(a.num_levels) if level is None else [level]
        np.testing.assert_allclose(np.concatenate(
            [want[i].numpy().ravel() if i in chosen else np.zeros(want[i].numel())
             for i in range(a.num_levels)]), v, rtol=1e-12, atol=0)
    drawn = decoder_maps(source, method, [0, 3], layer=-1, head=None, level=level)
    for v, m in zip(values, drawn, strict=True):
        np.testing.assert_allclose(a.on_grid(a.token_levels(v), None), m, atol=1e-6)
    if level is not None:  # one level: the others hold nothing
        start, (h, w) = a.capture.level_start_index[level], a.level_shapes[level]
        assert values[:, :start].sum() == 0 and values[:, start + h * w:].sum() == 0


def test_pointing_counts_each_level_on_its_own_cells(analyses):
    model, a = analyses["rt_detr"]  # 64 x 96 input: every level fits the input exactly
    values = decoder_tokens(Explainer(model, a), RAW, [0, 1, 2])
    for query, v in enumerate(values):
        box = tuple(a.boxes_xyxy()[query])
        drawn = a.on_grid(a.token_levels(v), None)  # the finest grid, levels spread by area
        assert faithfulness.token_pointing(a, v, box) == pytest.approx(
            faithfulness.pointing_energy(drawn, a.grid, box), abs=1e-12)
    one = np.zeros(a.num_tokens)
    start = a.capture.level_start_index[2]  # level 2: 2 x 3 cells of 32 px over a 160 px photo
    one[start + 1] = 1.0  # cell (0, 1): photo x 53.3..106.7, y 0..60
    assert faithfulness.token_pointing(a, one, (80.0, 0.0, 160.0, 120.0)) == pytest.approx(
        (106.667 - 80) / 53.333, abs=1e-3)


def test_a_drawn_map_is_refused_with_what_to_pass(analyses):
    model, a = analyses["rt_detr"]
    with raises(ArgumentError, "scored as token values"):
        faithfulness.score_maps(model, a, 0, {"drawn": a.decoder_attention(0)})


def test_levels_made_after_the_encoder_have_no_tokens_and_say_so(tmp_path, photo):
    resnet = tf.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64],
                                   depths=[1, 1, 1, 1], layer_type="basic",
                                   out_features=["stage2", "stage3", "stage4"])
    config = tf.RTDetrConfig(
        backbone_config=resnet, encoder_hidden_dim=16, encoder_in_channels=[16, 32, 64],
        encoder_ffn_dim=32, encoder_attention_heads=2, d_model=16, num_queries=7,
        decoder_in_channels=[16, 16, 16], decoder_ffn_dim=32, decoder_n_points=3,
        decoder_layers=2, decoder_attention_heads=2, num_denoising=0, num_feature_levels=4,
        id2label={0: "cat"})
    tf.RTDetrForObjectDetection(config).save_pretrained(tmp_path)
    small_processor("rt_detr").save_pretrained(tmp_path)
    model = load_family(tmp_path, dtype=torch.float64)
    a = analyze(model, photo)
    assert a.num_levels == 4 and len(a.inputs.tokens) == 3
    why = replay_unavailable(a, "Faithfulness scores re-run the transformer")
    assert "levels 8x12, 4x6, 2x3, 1x2" in why and "tokens on 8x12, 4x6, 2x3" in why
    with raises(ArgumentError, "the levels its encoder adds have no tokens"):
        faithfulness.random_baseline(model, a)
    assert "kept no tokens" in replay_unavailable(dataclasses.replace(a, inputs=None), "X")
