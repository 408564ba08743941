"""Slow, dense float64 oracles of the explanation rules, written the way the papers state them.

Nothing here shares code with ``detr_viz.explain``: DETR's transformer is re-written with
explicit (heads, L, S) attention matrices kept in the autograd graph, ``dy/dA`` comes from
autograd on those matrices, and the relevance and rollout matrices are formed in full (N x N),
exactly as in the authors' ``ExplanationGenerator.py`` (with zero rows of ``R - I`` kept zero).
Use small grids only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _mha(module, query: Tensor, key: Tensor, value: Tensor, pad: Tensor | None):
    """One attention call, single image, (L, E) inputs; returns output (L, E), A (H, L, S)."""
    heads, e = module.num_heads, module.embed_dim
    d = e // heads
    w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    b_q, b_k, b_v = module.in_proj_bias.chunk(3)

    def split(x):
        return x.view(x.shape[0], heads, d).transpose(0, 1)

    q = split(query @ w_q.T + b_q) / math.sqrt(d)
    k, v = split(key @ w_k.T + b_k), split(value @ w_v.T + b_v)
    logits = q @ k.transpose(1, 2)
    if pad is not None:
        logits = logits.masked_fill(pad, -math.inf)
    attention = logits.softmax(-1)
    out = (attention @ v).transpose(0, 1).reshape(query.shape[0], e)
    return F.linear(out, module.out_proj.weight, module.out_proj.bias), attention


def transformer(model, inputs) -> tuple[Tensor, dict[tuple[str, int], Tensor]]:
    """Logits (100, 92) of image 0 and every attention matrix, keyed (part, layer)."""
    logits, _, attn = outputs(model, inputs)
    return logits, attn


def outputs(model, inputs) -> tuple[Tensor, Tensor, dict[tuple[str, int], Tensor]]:
    """Logits (100, 92), boxes (100, 4) normalised cxcywh of image 0 and every attention
    matrix, keyed (part, layer).

    The features and the object queries are fresh leaves requiring grad, so that every
    attention matrix (also the first decoder self-attention) is in the autograd graph.
    """
    src = inputs.src[0].flatten(1).T.clone().requires_grad_()  # (N, C)
    pos = inputs.pos[0].flatten(1).T.clone()
    pad = inputs.mask[0].flatten()
    pad = pad if pad.any() else None
    attn = {}
    for i, layer in enumerate(model.transformer.encoder.layers):
        a, attn[("encoder", i)] = _mha(layer.self_attn, src + pos, src + pos, src, pad)
        src = layer.norm1(src + a)
        src = layer.norm2(src + layer.linear2(F.relu(layer.linear1(src))))
    query_pos = model.query_embed.weight.detach().clone().requires_grad_()
    tgt = torch.zeros_like(query_pos)
    for i, layer in enumerate(model.transformer.decoder.layers):
        a, attn[("decoder_self", i)] = _mha(layer.self_attn, tgt + query_pos, tgt + query_pos,
                                            tgt, None)
        tgt = layer.norm1(tgt + a)
        a, attn[("decoder", i)] = _mha(layer.multihead_attn, tgt + query_pos, src + pos, src, pad)
        tgt = layer.norm2(tgt + a)
        tgt = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
    hs = model.transformer.decoder.norm(tgt)
    x = hs
    for i, linear in enumerate(model.bbox_embed.layers):  # DETR's box MLP, written out
        x = linear(x) if i == len(model.bbox_embed.layers) - 1 else F.relu(linear(x))
    return model.class_embed(hs), x.sigmoid(), attn


def handle_residual(r: Tensor) -> Tensor:
    """Eq. 8-9: subtract I, normalise rows to sum 1 (rows summing to 0 stay 0), add I."""
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    hat = r - eye
    sums = hat.sum(-1, keepdim=True)
    hat = torch.where(sums > 0, hat / torch.where(sums > 0, sums, torch.ones_like(sums)), 0)
    return hat + eye


def attention_gradients(model, inputs, query: int, label: int | None = None, target=None):
    """``dy/dA`` and A for every attention matrix, y = logits[query, label], or
    y = target(logits, boxes) for any scalar of the outputs."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, boxes, attn = outputs(model, inputs)
        keys = list(attn)
        y = logits[query, label] if target is None else target(logits, boxes)
        grads = torch.autograd.grad(y, [attn[k] for k in keys])
    return {k: g for k, g in zip(keys, grads, strict=True)}, {k: a.detach() for k, a in
                                                              attn.items()}


def relevance(model, inputs, query: int, label: int | None = None,
              target=None) -> tuple[Tensor, Tensor]:
    """Chefer et al. 2021 without LRP, in full matrices: (R_qi[query] (N,), R_ii (N, N)),
    for logits[query, label] or for the scalar ``target(logits, boxes)``."""
    grads, attn = attention_gradients(model, inputs, query, label, target)

    def cam(key):  # rule 5
        return (grads[key] * attn[key]).clamp(min=0).mean(0)

    layers = len(model.transformer.encoder.layers)
    n = attn[("encoder", 0)].shape[-1]
    q = attn[("decoder_self", 0)].shape[-1]
    r_ii = torch.eye(n, dtype=torch.float64)
    for i in range(layers):  # rule 6 on the image tokens
        r_ii = r_ii + cam(("encoder", i)) @ r_ii
    r_qq, r_qi = torch.eye(q, dtype=torch.float64), torch.zeros(q, n, dtype=torch.float64)
    for i in range(layers):
        s = cam(("decoder_self", i))  # rules 6 and 7
        r_qq, r_qi = r_qq + s @ r_qq, r_qi + s @ r_qi
        r_qi = r_qi + handle_residual(r_qq).T @ (cam(("decoder", i)) @ handle_residual(r_ii))
    return r_qi[query], r_ii


def rollout(model, inputs) -> tuple[Tensor, Tensor]:
    """Abnar & Zuidema with the residual, in full: (R_ii (N, N), R_qi (100, N)) as in the
    authors' DETR baseline (``R_qq^T C_last R_ii``)."""
    with torch.inference_mode(False):
        _, attn = transformer(model, inputs)
    attn = {k: a.detach() for k, a in attn.items()}

    def joint(part):
        matrices = []
        for i in range(len(model.transformer.encoder.layers)):
            a = attn[(part, i)].mean(0)
            a = a + torch.eye(a.shape[0], dtype=a.dtype)
            matrices.append(a / a.sum(-1, keepdim=True))
        out = matrices[0]
        for m in matrices[1:]:
            out = m @ out
        return out

    r_ii, r_qq = joint("encoder"), joint("decoder_self")
    last = attn[("decoder", len(model.transformer.decoder.layers) - 1)].mean(0)
    return r_ii, r_qq.T @ (last @ r_ii)
