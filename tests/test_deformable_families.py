"""Sampling points of every deformable family, with each attention module's output as oracle.

The oracle: each module's output recomputed from the captured locations and weights with a
plain sampler (``F.grid_sample`` on each level's values, or the discrete cell lookup where the
family samples that way), summed with the weights, then the module's output projection, equals
the module's own output in float64 to 1e-9. That proves the points recorded are the points used.
"""

from __future__ import annotations

import threading

import pytest
import torch

from detr_viz.errors import ArgumentError
from detr_viz.sampling_capture import capture_sampling

from conftest import raises
from deformable_models import (
    CLASSES,
    ModuleCalls,
    decoder_modules,
    hooks,
    photo,
    recompute,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in CLASSES}


@pytest.mark.parametrize("family", CLASSES)
def test_captured_points_give_every_decoder_modules_output(models, family):
    model = models[family]
    with ModuleCalls(decoder_modules(model)) as calls:
        cap = capture_sampling(model, photo(family))
    stack = cap.decoder
    assert len(calls.calls) == stack.locations.shape[0] == 2
    assert stack.locations.shape[1:3] == (7, 2)
    assert stack.weights.shape == stack.locations.shape[:-1]
    real = torch.cat([stack.locations[..., level, :n, :].flatten()
                      for level, n in enumerate(cap.decoder.points_per_level)])
    outside = (real < 0) | (real > 1)
    assert outside.any() and not outside.all()  # the zero padding (or clamping) is exercised
    worst = 0.0
    for layer, (module, bound, output) in enumerate(calls.calls):
        got = recompute(module, bound, stack.locations[layer], stack.weights[layer],
                        cap.spatial_shapes, stack.points_per_level, stack.sampler)
        torch.testing.assert_close(got, output, rtol=0, atol=1e-9)
        assert output.abs().max() > 1e-3  # not a comparison of zeros
        worst = max(worst, (got - output).abs().max().item())
        torch.testing.assert_close(stack.references[layer], bound["reference_points"][0],
                                   rtol=0, atol=0)
    print(f"{family}: decoder oracle max error {worst:.1e}")


@pytest.mark.parametrize("family", CLASSES)
def test_weights_sum_to_one_per_head_and_padding_weighs_nothing(models, family):
    cap = capture_sampling(models[family], photo(family, 1))
    totals = cap.decoder.weights.sum(dim=(-1, -2))  # (layers, Q, heads)
    torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-12)
    for level, n in enumerate(cap.decoder.points_per_level):
        assert (cap.decoder.weights[..., level, n:] == 0).all()
        assert cap.decoder.locations[..., level, n:, :].isnan().all()
        assert not cap.decoder.locations[..., level, :n, :].isnan().any()
    expected = {"d_fine": (3, 2, 4), "deimv2": (3, 2, 4)}.get(family,
                                                             (3,) * len(cap.spatial_shapes))
    assert cap.decoder.points_per_level == expected
    assert cap.decoder.sampler == ("discrete" if family.endswith("discrete") else "bilinear")


@pytest.mark.parametrize("family", ["rt_detr", "rt_detr_v2", "d_fine", "deimv2"])
def test_dense_encoder_is_transformers_own_attention(models, family):
    """AIFI is plain self-attention on one level: the capture equals what transformers returns
    with output_attentions (eager), float64, to 1e-12."""
    model = models[family]
    cap = capture_sampling(model, photo(family, 3), encoder=True)
    with torch.inference_mode():
        theirs = model(pixel_values=photo(family, 3), output_attentions=True)
    assert len(cap.dense_encoder) == len(theirs.encoder_attentions) == 1
    h, w = cap.spatial_shapes[cap.dense_level]
    for ours, reference in zip(cap.dense_encoder, theirs.encoder_attentions, strict=True):
        assert ours.shape == (2, h * w, h * w)
        torch.testing.assert_close(ours, reference[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.sum(-1), torch.ones(2, h * w, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["rt_detr_v2", "rt_detr_v2_discrete", "d_fine", "deimv2"])
def test_recomputed_locations_are_bit_for_bit_what_the_sampler_got(models, family, monkeypatch):
    """RT-DETRv2, D-FINE and DEIMv2: in float32, the dtype users run, the locations recomputed
    in the hook are the very numbers the sampling function received (spied on here, not in the
    library), and predictions are those of a plain run."""
    import transformers.models.rt_detr_v2.modeling_rt_detr_v2 as v2

    model = tiny_model(family, dtype=torch.float32)
    seen = []

    def spying(original):
        def spy(value, shapes, locations, *rest):
            seen.append(locations[0].detach().clone())
            return original(value, shapes, locations, *rest)

        return spy

    if family in ("d_fine", "deimv2"):  # each module holds its sampling function
        for module in decoder_modules(model):
            monkeypatch.setattr(module, "ms_deformable_attn_core",
                                spying(module.ms_deformable_attn_core))
    else:
        monkeypatch.setattr(v2, "multi_scale_deformable_attention_v2",
                            spying(v2.multi_scale_deformable_attention_v2))
    image = photo(family, 4).float()
    with torch.inference_mode():
        plain = model(pixel_values=image)
    seen.clear()
    before = hooks(model)
    cap = capture_sampling(model, image)
    assert torch.equal(cap.logits, plain.logits[0]) and torch.equal(cap.boxes, plain.pred_boxes[0])
    counts = list(cap.decoder.points_per_level)
    for layer, locations in enumerate(seen):
        ours = torch.cat([cap.decoder.locations[layer, :, :, level, :n]
                          for level, n in enumerate(counts)], dim=2)
        assert torch.equal(ours, locations)
    assert len(seen) == 2
    assert hooks(model) == before


@pytest.mark.parametrize("family", CLASSES)
def test_capture_leaves_predictions_bit_for_bit(family):
    """float32: capture on equals capture off bit for bit; the float32 points are judged by
    their distance from the float64 run of the same weights and image, relative to the model's
    own float32-vs-float64 drift measured here, and that bound is checked to be far below what
    a wrong capture (another layer's or query's points) would be off by."""
    model = tiny_model(family, seed=5, dtype=torch.float32)
    image = photo(family, 5)
    with torch.inference_mode():
        plain = model(pixel_values=image.float())
    before = hooks(model)
    cap = capture_sampling(model, image.float(), encoder=True)
    assert torch.equal(cap.logits, plain.logits[0]) and torch.equal(cap.boxes, plain.pred_boxes[0])
    assert hooks(model) == before
    exact = capture_sampling(tiny_model(family, seed=5), image)

    def far(a, b):
        return (a.double() - b).nan_to_num().abs().max().item()

    bound = 100 * max(far(cap.logits, exact.logits), far(cap.boxes, exact.boxes))
    assert far(cap.decoder.locations, exact.decoder.locations) <= bound
    assert far(cap.decoder.weights, exact.decoder.weights) <= bound
    truth = exact.decoder.locations
    wrong = (truth.flip(0), truth.roll(1, dims=1))  # layers swapped, queries shifted
    assert all(far(w, truth) > 100 * bound for w in wrong)


def test_hooks_are_removed_when_the_forward_fails(models):
    model = models["rt_detr_v2"]

    def fail(module, args):
        raise RuntimeError("boom")

    before = hooks(model)
    handle = model.model.decoder.layers[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_sampling(model, photo("rt_detr_v2"), encoder=True)
    finally:
        handle.remove()
    assert hooks(model) == before


def test_two_threads_see_only_their_own_points(models):
    model = models["d_fine"]
    alone = [capture_sampling(model, photo("d_fine", seed)) for seed in (6, 7)]
    before = hooks(model)
    together: dict[int, object] = {}
    barrier = threading.Barrier(2)

    failures = []

    def run(seed):
        barrier.wait()
        try:
            for _ in range(3):
                together[seed] = capture_sampling(model, photo("d_fine", seed))
        except Exception as error:  # a hook called half registered by the other thread, say
            failures.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (6, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for seed, solo in zip((6, 7), alone, strict=True):
        assert torch.equal(together[seed].decoder.locations.nan_to_num(),
                           solo.decoder.locations.nan_to_num())
    assert hooks(model) == before


def test_bad_requests_say_what_to_do(models):
    with raises(ArgumentError, "one RGB image"):
        capture_sampling(models["rt_detr"], torch.zeros(2, 3, 64, 96, dtype=torch.float64))
    with raises(ArgumentError, "model type", "rt_detr"):
        capture_sampling(torch.nn.Linear(2, 2), photo("rt_detr"))
