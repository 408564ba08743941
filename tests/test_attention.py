"""The fused attention path: same output as nn.MultiheadAttention, exact factors, right choice."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import detr_viz.attention as attention
from detr_viz.attention import MultiheadAttention, fused_attention, observed
from detr_viz.capture import capture
from detr_viz.testing import recipe_input

from conftest import recipe_model


def pair(dtype=torch.float64, seed=0):
    """Our module and a plain nn.MultiheadAttention with the same weights."""
    torch.manual_seed(seed)
    ours = MultiheadAttention(64, 4).to(dtype).eval()
    with torch.no_grad():
        ours.in_proj_weight.mul_(4)  # peakier rows than the default init
    plain = nn.MultiheadAttention(64, 4).to(dtype).eval()
    plain.load_state_dict(ours.state_dict())
    return ours, plain


@pytest.mark.parametrize("padded", [False, True])
def test_fused_output_and_factors_equal_the_weight_building_path(padded):
    ours, plain = pair()
    q, k, v = (torch.randn(n, 2, 64, dtype=torch.float64) for n in (7, 11, 11))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    if padded:
        pad[1, 8:] = True
    out, weights = plain(q, k, v, key_padding_mask=pad, average_attn_weights=False)
    fused_out, fused = fused_attention(ours, q, k, v, pad)
    torch.testing.assert_close(fused_out, out, atol=1e-13, rtol=0)
    rebuilt = torch.exp(fused.q @ fused.k.transpose(-1, -2) - fused.lse[..., None])
    rebuilt = rebuilt.masked_fill(pad[:, None, None, :], 0)
    torch.testing.assert_close(rebuilt, weights, atol=1e-13, rtol=0)
    torch.testing.assert_close(fused.heads @ torch.ones(16, dtype=torch.float64),
                               (weights @ fused.v).sum(-1), atol=1e-12, rtol=0)


def test_module_takes_the_fused_path_only_without_need_weights():
    ours, plain = pair()
    x = torch.randn(5, 1, 64, dtype=torch.float64)
    seen = []
    out, weights = ours(x, x, x, need_weights=False, on_fused=seen.append)
    assert weights is None and len(seen) == 1
    torch.testing.assert_close(out, plain(x, x, x)[0], atol=1e-13, rtol=0)
    out, weights = ours(x, x, x, on_fused=seen.append)  # the default: exactly torch's module
    assert weights.shape == (1, 5, 5) and len(seen) == 1
    torch.testing.assert_close(weights, plain(x, x, x)[1], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_too_peaked_for_the_sink_get_an_exact_log_sum_exp(dtype):
    """One key far above the mean: the sink weight underflows, the direct path takes over."""
    ours, _ = pair(dtype)
    x = torch.randn(6, 1, 64, dtype=dtype)
    x[0] *= 400 if dtype == torch.float32 else 4000
    _, fused = fused_attention(ours, x, x, x)
    logits = fused.q @ fused.k.transpose(-1, -2)
    assert (logits.amax(-1) - logits.mean(-1)).max() > (80 if dtype == torch.float32 else 800)
    expected = torch.logsumexp(logits.double(), -1)
    # Rounding bound: a logit's error is a few ulps of sum_k |q_k k_k|, and lse (sink path:
    # t + log1p(-p) - log(p), t the mean logit) carries that of the largest term it adds, so the
    # error scales with the row's largest |q| . |k|, not with |lse| (rows with big opposite logits
    # end near 0). 16 ulps of that scale holds on any CPU; a wrong or unrepaired row is off by O(1).
    scale = (fused.q.abs() @ fused.k.abs().transpose(-1, -2)).amax(-1).double()
    error = (fused.lse.double() - expected).abs()
    assert (error <= 16 * torch.finfo(dtype).eps * scale).all(), (error / scale).max()
    assert torch.isfinite(fused.heads).all()


def test_only_foreign_forward_hooks_count_as_watching():
    module, _ = pair()
    assert not observed(module)
    handle = module.register_forward_hook(lambda m, i, o: None)
    assert observed(module)
    handle.remove()

    def ours(m, i, o):
        return None

    setattr(ours, attention.CAPTURE_MARK, True)
    handle = module.register_forward_hook(ours)
    assert not observed(module)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert observed(module)
    finally:
        handle.remove()


def test_an_unwatched_forward_never_builds_attention_weights(monkeypatch):
    model = recipe_model("detr_resnet50")
    x = recipe_input(96, 128)
    with torch.inference_mode():
        expected = model(x)["pred_logits"]

    def refuse(*args, **kwargs):
        raise AssertionError("built the (heads, L, S) weights")

    monkeypatch.setattr(nn.functional, "multi_head_attention_forward", refuse)
    with torch.inference_mode():
        assert torch.equal(model(x)["pred_logits"], expected)
        with capture(model) as cap:
            assert torch.equal(model(x)["pred_logits"], expected)
    assert len(cap.encoder) == len(cap.decoder) == 6


def test_capture_of_a_model_with_plain_torch_attention_gives_the_same_factors():
    """The official torch hub DETR has nn.MultiheadAttention: capture factorises its weights."""
    ours = copy.deepcopy(recipe_model("detr_resnet50")).double()
    official = copy.deepcopy(ours)
    for layer in [*official.transformer.encoder.layers, *official.transformer.decoder.layers]:
        for name in ("self_attn", "multihead_attn"):
            if hasattr(layer, name):
                plain = nn.MultiheadAttention(256, 8).double().eval()
                plain.load_state_dict(getattr(layer, name).state_dict())
                setattr(layer, name, plain)
    x = recipe_input(128, 160).double()
    with torch.inference_mode(), capture(ours) as a, capture(official) as b:
        out_a, out_b = ours(x), official(x)
    torch.testing.assert_close(out_a["pred_logits"], out_b["pred_logits"], atol=1e-12, rtol=0)
    for layer in (0, 5):
        for fa, fb in ((a.encoder_layer(layer), b.encoder_layer(layer)),
                       (a.decoder_layer(layer), b.decoder_layer(layer))):
            np.testing.assert_allclose(fa.dense(), fb.dense(), atol=1e-12)
            np.testing.assert_allclose(fa.lse, fb.lse, atol=1e-10)
