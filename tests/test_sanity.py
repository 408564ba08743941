"""The randomisation check: metrics against their definitions, the cascade against what each
method can depend on, and the caller's model left alone."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from detr_viz import explain, sanity
from detr_viz.explain import RAW, RELEVANCE

from conftest import double_model, small_analysis

STEPS = ("class and box heads", *(f"decoder layer {i}" for i in range(6, 0, -1)),
         *(f"encoder layer {i}" for i in range(6, 0, -1)))


def ssim_loop(a, b, size):
    """SSIM written out window by window (Wang et al. 2004, eq. 13), maps scaled to [0, 1]."""
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())
    values = []
    for r in range(a.shape[0] - size + 1):
        for c in range(a.shape[1] - size + 1):
            x, y = a[r:r + size, c:c + size].ravel(), b[r:r + size, c:c + size].ravel()
            cov = np.cov(x, y)  # sample (co)variances
            mx, my = x.mean(), y.mean()
            values.append((2 * mx * my + 1e-4) * (2 * cov[0, 1] + 9e-4)
                          / ((mx**2 + my**2 + 1e-4) * (cov[0, 0] + cov[1, 1] + 9e-4)))
    return np.mean(values)


def test_metrics_equal_their_definitions():
    rng = np.random.default_rng(0)
    a, b = rng.random((12, 15)), rng.random((12, 15))
    b[:3] = a[:3]  # partly alike
    ties = np.round(a * 4)  # many tied ranks
    assert sanity.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.ravel(), b.ravel())[0])
    assert sanity.spearman(ties, b) == pytest.approx(
        scipy.stats.spearmanr(ties.ravel(), b.ravel())[0])
    assert sanity.spearman(a, -a) == pytest.approx(-1)
    assert sanity.ssim(a, b) == pytest.approx(ssim_loop(a, b, 7), rel=1e-10)
    small = rng.random((3, 5)), rng.random((3, 5))  # a grid smaller than the window
    assert sanity.ssim(*small) == pytest.approx(ssim_loop(*small, 3), rel=1e-10)
    assert sanity.ssim(a, a * 5 + 2) == pytest.approx(1)  # each map is scaled to [0, 1]
    assert sanity.ssim(a, b) < 0.9 and sanity.spearman(a, b) < 0.5
    flat = np.zeros((4, 4))
    assert sanity.spearman(flat, flat) == 1 and sanity.spearman(flat, a[:4, :4]) == 0


def test_the_copy_shares_only_the_backbone():
    model = double_model("detr_resnet50")
    work = sanity.transformer_copy(model)
    assert work.backbone is model.backbone and work.input_proj is model.input_proj
    assert work.transformer is not model.transformer and work.class_embed is not model.class_embed
    names = [name for name, _ in sanity.cascade(work)]
    assert tuple(names) == STEPS


def test_raw_attention_changes_only_when_its_own_layer_or_one_below_is_redrawn(one_torch_thread):
    """Raw attention of decoder layer L depends on nothing above it: re-drawing the heads and
    the decoder layers above L leaves the map exactly as it was; re-drawing layer L changes it.
    """
    analysis, model = small_analysis(), double_model("detr_resnet50")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    query = int(np.argmax(analysis.scores))
    reports = []
    last = sanity.sanity_check(model, analysis, query, RAW, layer=-1,
                               progress=lambda done, total: reports.append((done, total)))
    assert last.steps == STEPS and last.maps.shape == (14, *analysis.feature_hw)
    assert reports == [(i, 13) for i in range(1, 14)]
    # "unchanged" is to float64 rounding: the original map comes from the captured forward and
    # each step's from a replay of the transformer (another summation order, ~1e-15 apart);
    # a re-drawn layer moves the map by more than 1e-3
    np.testing.assert_allclose(last.maps[1], last.maps[0], rtol=0, atol=1e-12)  # heads: same
    assert last.spearman[0] == pytest.approx(1) and last.ssim[0] == pytest.approx(1)
    assert np.abs(last.maps[2] - last.maps[0]).max() > 1e-3  # decoder layer 6 itself
    first = sanity.sanity_check(model, analysis, query, RAW, layer=0)
    for step in range(6):  # heads, decoder layers 6..2
        np.testing.assert_allclose(first.maps[step + 1], first.maps[0], rtol=0, atol=1e-12)
    assert np.abs(first.maps[7] - first.maps[0]).max() > 1e-3  # decoder layer 1 (and queries)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = sanity.sanity_check(model, analysis, query, RAW, layer=0)  # seeded
    np.testing.assert_array_equal(again.maps, first.maps)
    other = sanity.sanity_check(model, analysis, query, RAW, layer=0, seed=1)
    assert np.abs(other.maps[-1] - first.maps[-1]).max() > 1e-6


def test_relevance_on_fully_reinitialised_weights_differs(one_torch_thread):
    analysis, model = small_analysis(), double_model("detr_resnet50")
    query = int(np.argmax(analysis.scores))
    check = sanity.sanity_check(model, analysis, query, RELEVANCE)
    label = int(analysis.probabilities[query].argmax())
    assert check.label == label
    np.testing.assert_allclose(check.maps[0],
                               explain.relevance(model, analysis, [query], [label])[0])
    assert check.spearman[0] < 0.95  # the class head alone already moves a gradient method
    assert check.spearman[-1] < sanity.INSENSITIVE and not check.insensitive
    assert check.ssim[-1] < 0.9
    assert np.isfinite(check.maps).all()


def test_unknown_method_and_query_are_refused():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    with pytest.raises(sanity.explain.ArgumentError, match="Unknown method .saliency.; use one of"):
        sanity.sanity_check(model, analysis, 0, "saliency")
    with pytest.raises(sanity.explain.ArgumentError, match="out of range"):
        sanity.sanity_check(model, analysis, 100, RAW)
