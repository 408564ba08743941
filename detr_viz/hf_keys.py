"""Rename a Hugging Face ``DetrForObjectDetection`` state dict to the official DETR key names.

Both key generations are read. transformers 4.x names (what the files on the Hub hold) are first
renamed as transformers 5.x itself renames them on load (``transformers/conversion_mapping.py``,
entry ``"DetrModel"``: ``backbone.conv_encoder`` -> ``backbone``, ``out_proj`` -> ``o_proj``,
``layers.N.fc1`` -> ``layers.N.mlp.fc1``); 5.x names then map to the official ones (the inverse
of ``benchmarks/hf_detr.py``), q/k/v projections concatenated into ``in_proj_weight`` /
``in_proj_bias``. Both backbone layouts: timm's ResNet (torchvision module names, so only the
prefix changes) and transformers' own ResNet (``embedder.embedder.convolution``,
``encoder.stages.i.layers.j.shortcut``, ``...layer.k.convolution`` / ``normalization``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_LEGACY = [  # transformers 4.x -> 5.x, as transformers 5 renames DetrModel keys on load
    (r"backbone\.conv_encoder\.", "backbone."),
    (r"\.out_proj\.", ".o_proj."),
    (r"layers\.(\d+)\.fc([12])\.", r"layers.\1.mlp.fc\2."),
]
_LAYER = r"model\.(encoder|decoder)\.layers\.(\d+)\."
_RENAMES = [  # transformers 5.x -> official DETR, for everything but q/k/v and the backbone
    (r"model\.input_projection\.", "input_proj."),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (r"class_labels_classifier\.", "class_embed."),
    (r"bbox_predictor\.layers\.", "bbox_embed.layers."),
    (r"model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (_LAYER + r"self_attn\.o_proj\.", r"transformer.\1.layers.\2.self_attn.out_proj."),
    (_LAYER + r"encoder_attn\.o_proj\.", r"transformer.\1.layers.\2.multihead_attn.out_proj."),
    (_LAYER + r"mlp\.fc([12])\.", r"transformer.\1.layers.\2.linear\3."),
    (_LAYER + r"self_attn_layer_norm\.", r"transformer.\1.layers.\2.norm1."),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
     r"transformer.decoder.layers.\1.norm2."),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
]
_QKV = re.compile(_LAYER + r"(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)")
_BACKBONE = "model.backbone.model."


def to_detr_state_dict(hf: dict[str, Tensor], *, timm_backbone: bool) -> dict[str, Tensor]:
    """``hf`` (a DetrForObjectDetection state dict, 4.x or 5.x names) under official DETR names.

    Tensors are shared, not copied, except the concatenated ``in_proj_*``. Keys that map to
    nothing are kept as they are, so :func:`~detr_viz.weights.check_state_dict` reports them.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for name, tensor in hf.items():
        if name.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in _LEGACY:
            name = re.sub(pattern, replacement, name)
        if m := _QKV.fullmatch(name):
            kind, layer, attn, proj, leaf = m.groups()
            ours = "self_attn" if attn == "self_attn" else "multihead_attn"
            fused = f"transformer.{kind}.layers.{layer}.{ours}.in_proj_{leaf}"
            qkv.setdefault(fused, {})[proj] = tensor
        elif name.startswith(_BACKBONE):
            rest = name.removeprefix(_BACKBONE)
            out["backbone.0.body." + (rest if timm_backbone else _resnet_name(rest))] = tensor
        else:
            out[_rename(name)] = tensor
    for name, parts in qkv.items():  # a missing q, k or v leaves in_proj missing: reported
        if parts.keys() == {"q", "k", "v"}:
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _rename(name: str) -> str:
    for pattern, replacement in _RENAMES:
        new, count = re.subn(f"^{pattern}", replacement, name)
        if count:
            return new
    return name


def _resnet_name(rest: str) -> str:
    """transformers' ResNet module name -> torchvision's (unknown names are kept)."""
    part = {"convolution": "conv", "normalization": "bn"}
    if m := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", rest):
        return f"{part[m[1]]}1.{m[2]}"
    m = re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.(.+)", rest)
    if not m:
        return rest
    where, inner = f"layer{int(m[1]) + 1}.{m[2]}.", m[3]
    if s := re.fullmatch(r"shortcut\.(convolution|normalization)\.(\w+)", inner):
        return f"{where}downsample.{0 if s[1] == 'convolution' else 1}.{s[2]}"
    if s := re.fullmatch(r"layer\.(\d)\.(convolution|normalization)\.(\w+)", inner):
        return f"{where}{part[s[2]]}{int(s[1]) + 1}.{s[3]}"
    return rest
