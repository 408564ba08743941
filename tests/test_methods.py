"""The methods registry: each method's maps are the library's, computed once, and a method
that cannot explain a model says why instead of returning another method's maps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from detr_viz import explain, methods
from detr_viz.errors import ArgumentError
from detr_viz.explain import RAW, RELEVANCE, ROLLOUT
from detr_viz.methods import METHOD, Explainer, decoder_maps, encoder_maps, get_method

from conftest import double_model, small_analysis


@pytest.fixture(scope="module")
def source():
    analysis = small_analysis()
    return Explainer(double_model("detr_resnet50"), analysis)


def test_every_method_gives_the_librarys_maps(source):
    a = source.analysis
    np.testing.assert_array_equal(decoder_maps(source, RAW, [3, 7], 2, 1),
                                  a.decoder_attentions([3, 7], 2, 1))
    np.testing.assert_array_equal(decoder_maps(source, ROLLOUT, [3]),
                                  explain.rollout(a).decoder_maps([3]))
    np.testing.assert_allclose(decoder_maps(source, RELEVANCE, [7, 3]),
                               explain.relevance(source.model, a, [7, 3]), rtol=1e-12)
    point = (40.0, 30.0)
    np.testing.assert_array_equal(encoder_maps(source, RAW, [point], 1, None, "outgoing")[0],
                                  a.encoder_attention(point, 1, None, "outgoing"))
    np.testing.assert_allclose(
        encoder_maps(source, RELEVANCE, [point], target=3)[0],
        explain.encoder_relevance(source.model, a, 3).encoder_map(point), rtol=1e-12)
    assert decoder_maps(source, ROLLOUT, []).shape == (0, *a.feature_hw)


def test_results_are_computed_once(monkeypatch):
    source = Explainer(double_model("detr_resnet50"), small_analysis())
    calls = []
    real = explain.relevance
    monkeypatch.setattr(explain, "relevance", lambda m, a, q: calls.append(list(q)) or real(
        m, a, q))
    first = source.relevance([1, 2])
    again = source.relevance([2, 5, 1])
    assert calls == [[1, 2], [5]]  # only the new query is computed
    np.testing.assert_array_equal(again[[0, 2]], first[[1, 0]])
    assert source.rollout() is source.rollout()


def test_what_each_method_declares():
    assert METHOD[RAW].tag(2, 5) == "raw attention L2 H5" and METHOD[ROLLOUT].tag(2, 5) == ROLLOUT
    assert METHOD[RELEVANCE].explains_class and METHOD[RELEVANCE].replays
    assert not METHOD[ROLLOUT].replays and methods.METHODS == explain.METHODS
    with pytest.raises(ArgumentError, match="Unknown method 'gradcam'; use one of raw"):
        get_method("gradcam")


def test_a_method_that_cannot_run_says_why(source):
    with pytest.raises(ArgumentError, match="explains one detection; there is none"):
        encoder_maps(source, RELEVANCE, [(10.0, 10.0)])
    captured_only = dataclasses.replace(source.analysis, inputs=None)
    why = METHOD[RELEVANCE].unavailable(captured_only)
    assert "re-runs the model with gradients" in why and "analyse the photo again" in why
    with pytest.raises(ArgumentError, match="kept no input to run it on"):
        decoder_maps(Explainer(source.model, captured_only), RELEVANCE, [1])
    assert "kept no tokens" in methods.replay_unavailable(
        captured_only, "Faithfulness scores re-run the transformer")
    assert methods.redraw_unavailable(source.analysis, "The sanity check") is None
    assert METHOD[RAW].unavailable(captured_only) is None
