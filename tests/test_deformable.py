"""Deformable DETR's sampling points in its three variants, with and without padding.

Plain (reference points), with box refinement (layer 0 from points, the next from refined
boxes) and two-stage (boxes from the encoder's proposals); a padded input gives valid ratios
below 1, which the module applies to its references. The oracle (every decoder and encoder
module's output recomputed from the captured points, float64, 1e-9) and the location formula
(reference x valid ratio + offset, transformers' rule recomputed from the module's input) hold
in each. The family-agnostic behaviour (hooks, threads, float32) is tested in
``test_deformable_families.py``.
"""

from __future__ import annotations

import pytest
import torch

from detr_viz.sampling_capture import capture_sampling

from deformable_models import ModuleCalls, photo, recompute, tiny_model

VARIANTS = {"plain": {"with_box_refine": False}, "box_refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True,
                          "two_stage_num_proposals": 7}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built():
    return {name: tiny_model("deformable_detr", seed=i, **extra)
            for i, (name, extra) in enumerate(VARIANTS.items())}


def padded_mask() -> torch.Tensor:
    """Real pixels in the top-left 60 x 40 of the 128 x 96 input."""
    mask = torch.zeros(1, 96, 128, dtype=torch.long)
    mask[:, :40, :60] = 1
    return mask


def assert_oracle(calls, stack, shapes):
    assert len(calls.calls) == stack.locations.shape[0] == 2
    for layer, (module, bound, output) in enumerate(calls.calls):
        got = recompute(module, bound, stack.locations[layer], stack.weights[layer], shapes,
                        stack.points_per_level, stack.sampler)
        torch.testing.assert_close(got, output, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "padded"])
def test_captured_points_give_every_modules_output(built, variant, masked):
    model, mask = built[variant], padded_mask() if masked else None
    decoder = [layer.encoder_attn for layer in model.model.decoder.layers]
    encoder = [layer.self_attn for layer in model.model.encoder.layers]
    with ModuleCalls(decoder) as from_decoder, ModuleCalls(encoder) as from_encoder:
        cap = capture_sampling(model, photo("deformable_detr"), mask, encoder=True)
    assert cap.spatial_shapes == ((12, 16), (6, 8), (3, 4), (2, 2))
    assert cap.level_start_index == (0, 192, 240, 252)
    assert cap.decoder.locations.shape == (2, 7, 2, 4, 3, 2)
    assert cap.encoder.locations.shape == (2, 256, 2, 4, 2, 2)
    assert cap.encoder.points_per_level == (2, 2, 2, 2)  # encoder_n_points, not the decoder's 3
    every = torch.cat([cap.decoder.locations.flatten(), cap.encoder.locations.flatten()])
    outside = (every < 0) | (every > 1)
    assert outside.any() and not outside.all()  # the zero padding is exercised
    assert_oracle(from_decoder, cap.decoder, cap.spatial_shapes)
    assert_oracle(from_encoder, cap.encoder, cap.spatial_shapes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_locations_are_reference_times_valid_ratio_plus_offset(built, variant):
    """transformers' rule, recomputed from each module's input; with a padded input the
    references carry the valid ratios (below 1) per level."""
    model = built[variant]
    decoder = [layer.encoder_attn for layer in model.model.decoder.layers]
    with ModuleCalls(decoder) as calls:
        cap = capture_sampling(model, photo("deformable_detr", 1), padded_mask())
    widths = [r.shape[-1] for r in cap.decoder.references]
    assert widths == {"plain": [2, 2], "box_refine": [2, 4], "two_stage": [4, 4]}[variant]
    shapes = torch.tensor(cap.spatial_shapes, dtype=torch.float64).flip(-1)  # (levels, (w, h))
    for layer, (module, bound, _) in enumerate(calls.calls):
        ref = cap.decoder.references[layer]  # (Q, levels, 2 | 4)
        assert not torch.equal(ref[:, 0], ref[:, -1])  # scaled per level by its valid ratio
        query = bound["hidden_states"] + bound["position_embeddings"]
        offsets = module.sampling_offsets(query)[0].view(7, 2, 4, 3, 2)
        if ref.shape[-1] == 2:
            expected = ref[:, None, :, None] + offsets / shapes[:, None]
        else:
            expected = ref[:, None, :, None, :2] + offsets / 3 * ref[:, None, :, None, 2:] * 0.5
        torch.testing.assert_close(cap.decoder.locations[layer], expected, rtol=0, atol=1e-12)
    if variant != "plain":  # refined: layer 1 starts from layer 0's output box
        assert not torch.equal(cap.decoder.references[0][..., :2],
                               cap.decoder.references[1][..., :2])


@pytest.mark.parametrize("variant", VARIANTS)
def test_capture_leaves_predictions_bit_for_bit(built, variant):
    """float32: capture on equals capture off bit for bit; float32 points sit within 100 x the
    model's own float32-vs-float64 drift (measured here) of the float64 run's, a bound far below
    what another layer's or query's points would be off by."""
    model = tiny_model("deformable_detr", seed=list(VARIANTS).index(variant),
                       dtype=torch.float32, **VARIANTS[variant])
    image = photo("deformable_detr", 4)  # float64; the float32 runs get it rounded
    with torch.inference_mode():
        plain = model(pixel_values=image.float())
    cap = capture_sampling(model, image.float(), encoder=True)
    assert torch.equal(cap.logits, plain.logits[0]) and torch.equal(cap.boxes, plain.pred_boxes[0])
    exact = capture_sampling(built[variant], image, encoder=True)

    def far(a, b):
        return (a.double() - b).abs().max().item()

    bound = 100 * max(far(cap.logits, exact.logits), far(cap.boxes, exact.boxes))
    for got, truth in ((cap.decoder, exact.decoder), (cap.encoder, exact.encoder)):
        assert far(got.locations, truth.locations) <= bound
        assert far(got.weights, truth.weights) <= bound
        wrong = (truth.locations.flip(0), truth.locations.roll(1, dims=1))
        assert all(far(w, truth.locations) > 100 * bound for w in wrong)
