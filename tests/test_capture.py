"""Capture is exact, leaves no hooks behind, and keeps concurrent callers apart."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from detr_viz.capture import capture
from detr_viz.errors import ArgumentError
from detr_viz.model import nested_tensor_from_tensor_list
from detr_viz.testing import recipe_input

from conftest import hooked_modules, recipe_model


def official_weights(model, x, layer_path):
    """Head-averaged weights as the notebook reads them: output[1] of a plain forward hook."""
    got = []
    module = eval(f"model.{layer_path}")  # noqa: S307 - fixed strings from this file
    hook = module.register_forward_hook(lambda m, i, o: got.append(o[1]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return got[0]


def test_hooks_are_gone_after_the_block_even_on_error():
    model = recipe_model("detr_resnet50")
    with capture(model):
        assert hooked_modules(model)
    assert hooked_modules(model) == []
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        raise RuntimeError("boom")
    assert hooked_modules(model) == []
    with pytest.raises(RuntimeError), capture(model):
        model(torch.zeros(1, 2, 64, 64))  # wrong channel count fails inside the forward
    assert hooked_modules(model) == []


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_rows_are_distributions_and_heads_average_to_the_mean(dtype, atol):
    """Rows (softmax) and columns (from the stored log-sum-exp) are the same matrix. float32
    columns are exp(logit - lse) with logits up to ~150 under the recipe weights, so their
    rounding is ~150 * 2**-24 relative: the float32 bound is loose, float64 is the real check."""
    model = copy.deepcopy(recipe_model("detr_resnet50")).to(dtype)
    with torch.inference_mode(), capture(model) as cap:
        model(recipe_input(160, 224).to(dtype))
    for factors in (cap.encoder_layer(2), cap.decoder_layer(-1)):
        dense = factors.dense()
        assert dense.dtype == np.dtype(str(dtype).removeprefix("torch."))
        np.testing.assert_allclose(dense.sum(-1), 1, atol=atol)
        per_head = np.stack([factors.dense(h) for h in range(8)])
        np.testing.assert_allclose(per_head.mean(0), dense, atol=atol)
        cols = factors.columns([0, 3, factors.shape[1] - 1])
        np.testing.assert_allclose(cols, dense[:, [0, 3, factors.shape[1] - 1]].T, atol=atol)


def test_padded_batch_matches_module_weights():
    """Two images of different sizes: padding keys get zero weight, as in the module itself.

    In float64: the fused kernel and the weight-building path round differently, and in float32
    that difference depends on the CPU (2.6e-6 on one Xeon); in float64 it is ~1e-16.
    """
    model = copy.deepcopy(recipe_model("detr_resnet50")).double()
    images = [recipe_input(128, 192)[0].double(), recipe_input(96, 160)[0].double()]
    batch = nested_tensor_from_tensor_list(images)
    for path in ("transformer.encoder.layers[3].self_attn",
                 "transformer.decoder.layers[5].multihead_attn"):
        expected = official_weights(model, batch, path)
        with torch.inference_mode(), capture(model) as cap:
            model(batch)
        layer = int(path.split("[")[1][0])
        factors = cap.encoder_layer(layer) if "encoder" in path else cap.decoder_layer(layer)
        for b in range(2):
            np.testing.assert_allclose(factors.dense(batch=b), expected[b].numpy(), atol=1e-12)
            cols = factors.columns(range(factors.shape[1]), batch=b).T
            np.testing.assert_allclose(cols, expected[b].numpy(), atol=1e-12)
        assert cap.feature_mask[1].any() and not cap.feature_mask[0].any()


def test_hooks_registered_later_still_see_head_averaged_weights():
    model = recipe_model("detr_resnet50")
    x = recipe_input(128, 128)
    expected = official_weights(model, x, "transformer.encoder.layers[5].self_attn")
    seen = []
    with torch.no_grad(), capture(model):
        handle = model.transformer.encoder.layers[5].self_attn.register_forward_hook(
            lambda m, i, o: seen.append(o[1])
        )
        model(x)
        handle.remove()
    assert seen[0].shape == expected.shape == (1, 16, 16)
    torch.testing.assert_close(seen[0], expected)


def test_selected_layers_only_and_clear_errors():
    model = recipe_model("detr_resnet50")
    with torch.inference_mode(), capture(model, features=False, encoder_layers=[-1],
                                         decoder_layers=[]) as cap:
        model(recipe_input(96, 96))
    assert cap.features is None and cap.calls == 1
    assert set(cap.encoder) == {5} and cap.decoder == {}
    assert cap.encoder_layer(-1) is cap.encoder_layer(5)
    with pytest.raises(ArgumentError, match="not captured"):
        cap.decoder_layer(0)
    with pytest.raises(ArgumentError, match="out of range"):
        cap.encoder_layer(6)
    with pytest.raises(ArgumentError, match="head 8"):
        cap.encoder_layer(5).row(0, head=8)
    with pytest.raises(ArgumentError, match="out of range"):
        capture(model, encoder_layers=[9]).__enter__()


def test_concurrent_threads_on_one_model_get_their_own_results():
    model = recipe_model("detr_resnet50")
    sizes = [(96, 128), (128, 96), (160, 160), (64, 192), (128, 128), (96, 96)]

    def run(size):
        with torch.inference_mode(), capture(model) as cap:
            out = model(recipe_input(*size))
        return out["pred_logits"], cap.features.shape, cap.encoder_layer(-1).dense(2), cap.calls

    sequential = [run(s) for s in sizes]
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(len(sizes))

    def worker(i):
        barrier.wait()
        for _ in range(2):
            results[i] = run(sizes[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (logits, shape, enc, calls) in enumerate(sequential):
        got_logits, got_shape, got_enc, got_calls = results[i]
        assert got_shape == shape and got_calls == calls == 1
        torch.testing.assert_close(got_logits, logits)
        np.testing.assert_allclose(got_enc, enc, atol=1e-6)
    assert hooked_modules(model) == []
