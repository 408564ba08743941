"""The model's structure matches the official DETR: state dict, module paths, strides."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from detr_viz.errors import ArgumentError, DetrVizError
from detr_viz.model import VARIANTS, build_model, get_variant
from detr_viz.testing import recipe_input

from conftest import recipe_model

MANIFEST = {
    "detr_resnet50": "detr_resnet50",
    "detr_resnet50_dc5": "detr_resnet50",
    "detr_resnet101": "detr_resnet101",
    "detr_resnet101_dc5": "detr_resnet101",
}


def read_manifest(path):
    rows = path.read_text().splitlines()[1:]
    out = []
    for row in rows:
        key, shape, dtype = row.split("\t")
        out.append((key, tuple(int(d) for d in shape.split("x")) if shape else (), dtype))
    return out


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("building a model must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_matches_official_manifest(variant, reference_dir, no_network):
    model = build_model(variant)
    got = [
        (k, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for k, t in model.state_dict().items()
    ]
    assert got == read_manifest(reference_dir / f"{MANIFEST[variant]}.keys.tsv")
    assert not model.training


def test_loading_ignores_num_batches_tracked():
    model = build_model("detr_resnet50")
    state = model.state_dict()
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(7)
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("variant,stride", [("detr_resnet50", 32), ("detr_resnet50_dc5", 16),
                                            ("detr_resnet101", 32), ("detr_resnet101_dc5", 16)])
def test_stride_is_read_off_the_backbone_and_fits_feature_shape(variant, stride):
    model = recipe_model(variant)
    assert model.stride == stride == get_variant(variant).stride
    for h, w in [(97, 130), (64, 64)]:
        feats = []
        hook = model.backbone[-2].register_forward_hook(lambda m, i, o, f=feats: f.append(o))
        with torch.no_grad():
            model(recipe_input(h, w))
        hook.remove()
        assert feats[0]["0"].tensors.shape[-2:] == (math.ceil(h / stride), math.ceil(w / stride))


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ArgumentError, match="detr_resnet50_dc5") as info:
        build_model("detr_resnet152")
    assert isinstance(info.value, DetrVizError)


def test_classic_notebook_hooks_run_verbatim():
    """The snippet of the classic DETR attention notebook, unchanged, against our model."""
    model = recipe_model("detr_resnet50")
    img = recipe_input(256, 320)
    conv_features, enc_attn_weights, dec_attn_weights = [], [], []
    hooks = [
        model.backbone[-2].register_forward_hook(lambda self, input, output: conv_features.append(output)),  # noqa: E501
        model.transformer.encoder.layers[-1].self_attn.register_forward_hook(lambda self, input, output: enc_attn_weights.append(output[1])),  # noqa: E501
        model.transformer.decoder.layers[-1].multihead_attn.register_forward_hook(lambda self, input, output: dec_attn_weights.append(output[1])),  # noqa: E501
    ]
    outputs = model(img)
    for hook in hooks:
        hook.remove()
    conv_features = conv_features[0]
    enc_attn_weights = enc_attn_weights[0]
    dec_attn_weights = dec_attn_weights[0]
    h, w = conv_features['0'].tensors.shape[-2:]
    assert (h, w) == (8, 10)
    assert outputs["pred_logits"].shape == (1, 100, 92)
    assert outputs["pred_boxes"].shape == (1, 100, 4)
    sattn = enc_attn_weights[0].reshape((h, w, h, w))
    assert sattn.shape == (8, 10, 8, 10)
    assert dec_attn_weights[0, 5].view(h, w).shape == (8, 10)
    torch.testing.assert_close(dec_attn_weights.sum(-1), torch.ones(1, 100))
    assert not any(m._forward_hooks for m in model.modules())
