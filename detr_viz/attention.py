"""Multi-head attention whose fast path also yields the exact attention factors.

``nn.MultiheadAttention`` gives a caller two choices: the attention weights (``need_weights=True``,
every (heads, L, S) matrix built in memory: 359 MB per DC5 encoder layer) or speed
(``need_weights=False``, a fused kernel that never builds them, 3-4x faster on a DC5 encoder).
:class:`MultiheadAttention` keeps the first exactly as torch has it and makes the second also
return what any weight can be rebuilt from: per head the scaled queries ``q``, the keys ``k`` and
each row's log-sum-exp ``lse``, ``weights[i, j] = exp(q_i . k_j - lse_i)``.

The fused kernel (``F.scaled_dot_product_attention``, public API) does not return the log-sum-exp,
so one extra "sink" key is appended whose logit for query i is ``t_i`` and whose value is an
indicator column e (0 for every real key). The kernel then returns, per row,

    o_i = (sum_j w'_ij [v_j, 0]) + w'_sink [0, 1],   w'_sink = exp(t_i) / (exp(t_i) + Z_i)

with ``Z_i = exp(lse_i)``, so the real output is ``o_i[:d] / (1 - p_i)`` and
``lse_i = t_i + log(1 - p_i) - log(p_i)`` where ``p_i = o_i[d]``. With ``t_i`` the mean logit over
the valid keys, ``lse_i >= t_i + log(S)`` (Jensen), so ``p_i <= 1 / (1 + S)`` and the division is
well conditioned. A row so peaked that ``p_i`` underflows (``lse_i - t_i`` beyond ~70 in float32)
gets its log-sum-exp computed directly. Cost: one more key and one more value column, +1 head
dimension (measured ~14% on the attention kernel alone, ~2% of a DC5 forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

CAPTURE_MARK = "_detr_viz_capture"  # attribute on hooks that never read output[1]
_UNDERFLOW = {torch.float32: 1e-30, torch.float64: 1e-290}
_BLOCK = 256  # rows per block when a log-sum-exp is computed directly


class Fused(NamedTuple):
    """Everything one fused attention call computed, as live tensors (graph kept if any).

    ``q`` (B, H, L, d) scaled by 1/sqrt(d); ``k``, ``v`` (B, H, S, d); ``lse`` (B, H, L);
    ``heads`` (B, H, L, d): each head's attention output before ``out_proj``;
    ``key_padding`` (B, S) bool, True on padded keys, or None.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    lse: Tensor
    heads: Tensor
    key_padding: Tensor | None


OnFused = Callable[[Fused], None]


def observed(module: nn.Module) -> bool:
    """Whether a forward hook that may read ``output[1]`` (the weights) watches ``module``.

    Hooks marked with :data:`CAPTURE_MARK` (detr-viz's own capture) do not count: they take the
    exact factors instead. Global module hooks count.
    """
    tables = (module._forward_hooks, _module._global_forward_hooks)
    return any(not getattr(hook, CAPTURE_MARK, False) for t in tables for hook in t.values())


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters, same state dict) with a factor-giving fast path.

    With ``need_weights=True`` (the default) it is exactly ``nn.MultiheadAttention``. With
    ``need_weights=False`` in eval mode, sequence-first, without ``attn_mask`` it runs
    :func:`fused_attention`, returns ``(output, None)`` and, if ``on_fused`` is given, hands it
    the :class:`Fused` tensors of the call. ``lse_in_graph=False`` (for gradients through the
    call, as relevance takes them) runs the output through the plain fused kernel, whose
    backward is ~20 % faster (head dimension 32, not 33), and the log-sum-exp, which gradients
    never need, in a second pass without a graph.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False, *,
                on_fused: OnFused | None = None, lse_in_graph: bool = True):
        plain = (need_weights or attn_mask is not None or is_causal or self.training
                 or self.batch_first or query.dim() != 3)
        if plain:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        out, fused = fused_attention(self, query, key, value, key_padding_mask, lse_in_graph)
        if on_fused is not None:
            on_fused(fused)
        return out, None


def _heads(x: Tensor, heads: int) -> Tensor:
    """(L, B, E) -> (B, H, L, d): the split ``nn.MultiheadAttention`` makes."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).permute(1, 2, 0, 3)


def fused_attention(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None = None,
                    lse_in_graph: bool = True) -> tuple[Tensor, Fused]:
    """``mha(query, key, value, key_padding_mask)[0]`` through one fused kernel, plus the factors.

    Sequence-first: query (L, B, E), key and value (S, B, E); ``key_padding_mask`` (B, S) bool,
    True on padding. Returns the output (L, B, E) and the :class:`Fused` tensors.
    ``lse_in_graph=False``: see :class:`MultiheadAttention`.
    """
    heads, dim = mha.num_heads, mha.head_dim
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = _heads(F.linear(query, w_q, b_q), heads) * math.sqrt(1.0 / dim)
    k = _heads(F.linear(key, w_k, b_k), heads)
    v = _heads(F.linear(value, w_v, b_v), heads)
    pad = key_padding_mask.bool() if key_padding_mask is not None else None
    if lse_in_graph:
        out_heads, lse = _with_sink(q, k, v, pad)
    else:
        keep = None if pad is None or not pad.any() else ~pad[:, None, None, :]
        out_heads = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0)
        with torch.no_grad():
            _, lse = _with_sink(q.detach(), k.detach(), v.detach(), pad)
    out = out_heads.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], heads * dim)
    out = mha.out_proj(out)
    return out, Fused(q, k, v, lse, out_heads, pad)


def _with_sink(q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each head's attention output (B, H, L, d) and log-sum-exp (B, H, L) from one fused call
    with the sink key (module docstring)."""
    heads, dim = q.shape[1], q.shape[-1]
    k_mean = _mean_key(k, pad)  # (B, H, 1, d)
    t = (q * k_mean).sum(-1, keepdim=True)  # (B, H, L, 1): the sink's logit, each row's mean
    b, _, s, _ = k.shape
    zeros_k, ones = k.new_zeros(b, heads, s, 1), k.new_ones(b, heads, 1, 1)
    sink_k = torch.cat([k.new_zeros(b, heads, 1, dim), ones], dim=-1)
    k_aug = torch.cat([torch.cat([k, zeros_k], dim=-1), sink_k], dim=2)  # (B, H, S + 1, d + 1)
    v_aug = torch.cat([torch.cat([v, zeros_k], dim=-1), sink_k], dim=2)
    q_aug = torch.cat([q, t], dim=-1)  # q_aug . sink = t; q_aug . [k_j, 0] = q . k_j
    mask = None
    if pad is not None and pad.any():
        keep = torch.cat([~pad, pad.new_ones(b, 1)], dim=1)  # the sink is always attended
        mask = keep[:, None, None, :]
    o = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, scale=1.0)
    p = o[..., dim]  # (B, H, L): the sink's weight
    out_heads = o[..., :dim] / (1 - p)[..., None]
    lse = t[..., 0] + torch.log1p(-p) - torch.log(p)
    return out_heads, _repair_underflow(lse, p, q, k, pad)


def _mean_key(k: Tensor, pad: Tensor | None) -> Tensor:
    """Mean of the valid keys per batch item and head: (B, H, 1, d)."""
    if pad is None:
        return k.mean(dim=2, keepdim=True)
    valid = (~pad).to(k.dtype)[:, None, :, None]  # (B, 1, S, 1)
    return (k * valid).sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True)


def _repair_underflow(lse: Tensor, p: Tensor, q: Tensor, k: Tensor, pad: Tensor | None) -> Tensor:
    """Rows whose sink weight underflowed get ``logsumexp(q_i k^T)`` computed directly."""
    bad = p < _UNDERFLOW.get(p.dtype, 1e-30)
    if not bad.any():
        return lse
    lse = lse.clone()
    for b, h in {(int(b), int(h)) for b, h, _ in bad.nonzero().tolist()}:
        rows = bad[b, h].nonzero()[:, 0]
        keys = k[b, h] if pad is None else k[b, h][~pad[b]]
        for start in range(0, len(rows), _BLOCK):
            block = rows[start:start + _BLOCK]
            lse[b, h, block] = torch.logsumexp(q[b, h, block] @ keys.T, dim=-1)
    return lse
