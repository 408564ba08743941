"""Hugging Face ``DetrForObjectDetection`` with detr-viz's weights, for a like-for-like timing.

Built from a config only (``use_pretrained_backbone=False``, nothing fetched from any hub), then
loaded with our state dict renamed to HF's names by :func:`to_hf_state_dict`, and checked by
:func:`compare` (logits, boxes and attention maps against ours on the same input).

Backbones, as transformers 5.x allows them (``DetrConfig`` there has no ``backbone=`` /
``use_timm_backbone`` fields any more; they are only read once to build ``backbone_config``):
- R50: ``use_timm_backbone=False``: transformers' own ResNet-50 (``ResNetBackbone``, v1.5: stride
  in the 3x3 conv, like torchvision), out_features ``stage4``.
- R50-DC5: transformers' own ResNet has no dilation; the config documents ``dilation=True`` as
  "only supported when use_timm_backbone=True", so DC5 uses the timm backbone (``timm``'s
  ``resnet50`` with ``output_stride=16``: layer4 dilated, its first block undilated, as in
  torchvision's ``replace_stride_with_dilation``). timm module names equal torchvision's.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

HF_ATTENTION = ("sdpa", "eager")  # sdpa is HF's default; output_attentions=True needs eager


def hf_config(variant: str):
    from transformers import DetrConfig, ResNetConfig

    dilation = variant.endswith("_dc5")
    if not variant.startswith("detr_resnet50"):
        raise ValueError(f"only the ResNet-50 variants are set up here, not {variant}")
    if dilation:  # timm backbone config built by DetrConfig itself, pretrained=False
        kwargs = {"use_timm_backbone": True, "backbone": "resnet50", "dilation": True,
                  "use_pretrained_backbone": False}
    else:  # an explicit ResNet-50 config: naming backbone="resnet50" makes transformers 5
        # ask the Hub whether a repo of that name exists, which must not happen here
        kwargs = {"use_timm_backbone": False, "dilation": False,
                  "backbone_config": ResNetConfig(out_features=["stage4"])}
    config = DetrConfig(num_labels=91, num_queries=100, auxiliary_loss=False, **kwargs)
    return config


def hf_model(variant: str, our_state: dict[str, Tensor], attn_implementation: str = "sdpa"):
    """An eval-mode HF DETR of ``variant`` holding exactly ``our_state`` (strict load)."""
    from transformers import DetrForObjectDetection

    config = hf_config(variant)
    model = DetrForObjectDetection(config).eval()  # transformers picks sdpa by default
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    timm = config.backbone_config.model_type == "timm_backbone"
    state = to_hf_state_dict(our_state, timm_backbone=timm)
    expected = model.state_dict()
    extra = sorted(set(expected) - set(state))
    missing = sorted(set(state) - set(expected))
    bad = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if extra or missing or bad:
        raise RuntimeError(f"key mapping is wrong: HF-only {extra[:5]}, ours-only {missing[:5]}, "
                           f"shape mismatches {bad[:5]}")
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model


_LAYER = r"transformer\.(encoder|decoder)\.layers\.(\d+)\."
_RENAMES = [  # (our regex, HF replacement) for everything but in_proj and the backbone
    (r"^input_proj\.", "model.input_projection."),
    (r"^query_embed\.weight$", "model.query_position_embeddings.weight"),
    (r"^class_embed\.", "class_labels_classifier."),
    (r"^bbox_embed\.layers\.", "bbox_predictor.layers."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (_LAYER + r"self_attn\.out_proj\.", r"model.\1.layers.\2.self_attn.o_proj."),
    (_LAYER + r"multihead_attn\.out_proj\.", r"model.\1.layers.\2.encoder_attn.o_proj."),
    (_LAYER + r"linear1\.", r"model.\1.layers.\2.mlp.fc1."),
    (_LAYER + r"linear2\.", r"model.\1.layers.\2.mlp.fc2."),
    (r"transformer\.encoder\.layers\.(\d+)\.norm1\.",
     r"model.encoder.layers.\1.self_attn_layer_norm."),
    (r"transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.final_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.",
     r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.",
     r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
]


def _backbone_name(name: str, timm_backbone: bool) -> str:
    """``backbone.0.body.<torchvision name>`` -> HF backbone name."""
    rest = name.removeprefix("backbone.0.body.")
    if timm_backbone:  # timm's ResNet uses torchvision's module names
        return "model.backbone.model." + rest
    prefix = "model.backbone.model."
    if m := re.fullmatch(r"(conv1|bn1)\.(.+)", rest):
        part = "convolution" if m[1] == "conv1" else "normalization"
        return f"{prefix}embedder.embedder.{part}.{m[2]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(.+)", rest)
    if not m:
        raise KeyError(f"unexpected backbone key {name}")
    stage, block, kind, index, leaf = int(m[1]) - 1, m[2], m[3], int(m[4]), m[5]
    where = f"{prefix}encoder.stages.{stage}.layers.{block}."
    if kind == "downsample.":
        part = "convolution" if index == 0 else "normalization"
        return f"{where}shortcut.{part}.{leaf}"
    part = "convolution" if kind == "conv" else "normalization"
    return f"{where}layer.{index - 1}.{part}.{leaf}"


def to_hf_state_dict(ours: dict[str, Tensor], *, timm_backbone: bool) -> dict[str, Tensor]:
    """Rename (and split the fused q/k/v projections of) a detr-viz / official DETR state dict."""
    out: dict[str, Tensor] = {}
    for name, tensor in ours.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith("backbone.0.body."):
            out[_backbone_name(name, timm_backbone)] = tensor
            continue
        m = re.fullmatch(_LAYER + r"(self_attn|multihead_attn)\.in_proj_(weight|bias)", name)
        if m:
            kind, layer, attn, leaf = m.groups()
            hf_attn = "self_attn" if attn == "self_attn" else "encoder_attn"
            for proj, part in zip("qkv", tensor.chunk(3), strict=True):
                out[f"model.{kind}.layers.{layer}.{hf_attn}.{proj}_proj.{leaf}"] = part.clone()
            continue
        for pattern, replacement in _RENAMES:
            new, count = re.subn(pattern, replacement, name)
            if count:
                out[new] = tensor
                break
        else:
            raise KeyError(f"no HF name for {name}")
    return out


def compare(our_model, hf_sdpa, hf_eager, pixel_values: Tensor) -> dict[str, float]:
    """Max |difference| of HF's outputs from ours on ``pixel_values`` (1, 3, H, W).

    logits and pred_boxes from both HF attention implementations; the last decoder layer's
    cross-attention (all heads) and 64 rows of the last encoder layer's self-attention (all
    heads) from HF eager with ``output_attentions=True`` against detr-viz's capture.
    """
    from detr_viz import capture

    with torch.inference_mode():
        with capture(our_model, features=False) as cap:
            ours = our_model(pixel_values)
        sdpa = hf_sdpa(pixel_values=pixel_values)
        eager = hf_eager(pixel_values=pixel_values, output_attentions=True)
    cross = eager.cross_attentions[-1][0]  # (heads, 100, S)
    cells = cross.shape[-1]
    rows = list(range(0, cells, max(1, cells // 64)))[:64]
    our_cross = torch.stack([torch.from_numpy(cap.decoder[5].rows(range(100), head=h))
                             for h in range(cross.shape[0])])
    enc = eager.encoder_attentions[-1][0][:, rows]  # (heads, 64, S)
    our_enc = torch.stack([torch.from_numpy(cap.encoder[5].rows(rows, head=h))
                           for h in range(enc.shape[0])])
    return {
        "logits (sdpa)": (sdpa.logits - ours["pred_logits"]).abs().max().item(),
        "pred_boxes (sdpa)": (sdpa.pred_boxes - ours["pred_boxes"]).abs().max().item(),
        "logits (eager)": (eager.logits - ours["pred_logits"]).abs().max().item(),
        "pred_boxes (eager)": (eager.pred_boxes - ours["pred_boxes"]).abs().max().item(),
        "decoder cross-attn, last layer": (cross - our_cross).abs().max().item(),
        "encoder self-attn, last layer (64 rows)": (enc - our_enc).abs().max().item(),
        "logits scale (max |ours|)": ours["pred_logits"].abs().max().item(),
    }
