"""Explanations beyond raw attention: attention rollout and gradient-weighted relevance.

    roll = rollout(analysis)                          # once per analysis
    roll.decoder_maps([17, 42])                       # (2, h, w) per detected query
    roll.encoder_map((640, 480), OUTGOING)            # (h, w) around a photo point
    maps = relevance(model, analysis, [17, 42])       # (2, h, w), each for its predicted class
    rel = encoder_relevance(model, analysis, 17)      # the encoder part, for clicks
    rel.encoder_map((640, 480), INCOMING)

**Rollout** (Abnar & Zuidema, ACL 2020): each encoder layer's head-averaged attention with the
residual added and rows renormalised, ``M_l = (A_l + I) / rowsum``, multiplied through the
layers, ``R = M_6 ... M_1``. A clicked cell i reads ``R[i, :]`` ("where the point looks",
rows sum to 1) or ``R[:, i]`` ("what looks at the point"). A decoder query t follows the
authors' DETR baseline (Chefer et al. 2021, ``generate_rollout``): ``(R_qq[:, t])^T C R`` with
``R_qq`` the rollout of the decoder self-attention and ``C`` the last layer's cross-attention.

**Relevance** (Chefer, Gur & Wolf, ICCV 2021, the variant without LRP as in the authors' DETR
notebook): for query t and class c, every attention map A of the transformer is weighted by the
gradient of the logit ``y = logits[t, c]``, ``Abar = mean_heads((dy/dA * A)^+)``, and propagated:
encoder ``R_ii += Abar R_ii``; per decoder layer, self-attention ``R_qq += Abar R_qq``,
``R_qi += Abar R_qi``, then cross-attention ``R_qi += norm(R_qq)^T Abar norm(R_ii)`` where
``norm(R) = (R - I) / rowsum(R - I) + I``; the map is row t of ``R_qi``. A row of ``R - I``
that sums to 0 stays 0 under ``norm`` (the reference code turns it into NaN and then drops
the whole update of that layer; we keep the rest of the layer).

Cost. Nothing here forms an (h w) x (h w) product of matrices: the encoder part of both methods
is vector-matrix products through the six layers (O(L N^2)), which is what makes DC5 (N = 3350)
possible on a CPU. Gradients come from one transformer forward with a graph (backbone skipped,
:mod:`detr_viz.replay`) and one backward per explained query; ``dy/dA = delta v^T`` (delta the
gradient at the attention output, v the values), so no (heads, N, N) gradient is kept either.
Arrays are in the factors' dtype (float32 for a float32 model; float64 for the test oracles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from detr_viz.analysis import INCOMING, OUTGOING, Analysis, Direction, check_direction
from detr_viz.attention import Fused
from detr_viz.capture import AttentionFactors, capture
from detr_viz.errors import ArgumentError
from detr_viz.model import DETR
from detr_viz.replay import replay_outputs, trainable_copy

RAW, ROLLOUT, RELEVANCE = "raw attention", "rollout", "relevance"  # the methods, as named
METHODS = (RAW, ROLLOUT, RELEVANCE)
BLOCK = 128  # rows of an (N, N) map built at once, one head at a time: 1.7 MB for DC5
MEMORY = 768 * 2**20  # bytes of gradient-weighted encoder maps kept at once (see relevance)


# --- dense maps, block by block ------------------------------------------------------------

def mean_attention(factors: AttentionFactors | Fused, deltas: Tensor | None = None,
                   batch: int = 0) -> Tensor:
    """Head-averaged attention (L, S) of one batch item, built ``BLOCK`` rows and one head at a
    time (every temporary stays in cache; measured 5x faster than all heads at once for DC5).

    With ``deltas`` (n, H, L, d), gradients at the attention output for n explained targets, it
    is Chefer's gradient-weighted map of each, ``mean_h(relu(delta_h v_h^T) * A_h)`` (n, L, S),
    sharing each block of A between the targets (needs ``factors.v``).
    """
    q, k, lse = factors.q[batch].contiguous(), factors.k[batch], factors.lse[batch]
    pad = factors.key_padding[batch] if factors.key_padding is not None else None
    heads, length, size = q.shape[0], q.shape[1], k.shape[1]
    kt, neg_lse = k.transpose(1, 2).contiguous(), -lse[..., None]  # (H, d, S), (H, L, 1)
    vt = None if deltas is None else factors.v[batch].transpose(1, 2).contiguous()
    out = q.new_zeros(1 if deltas is None else deltas.shape[0], length, size)
    for i in range(0, length, BLOCK):
        rows = slice(i, i + BLOCK)
        for h in range(heads):
            a = torch.addmm(neg_lse[h, rows], q[h, rows], kt[h]).exp_()  # (b, S)
            if pad is not None:
                a.masked_fill_(pad, 0.0)
            if deltas is None:
                out[0, rows] += a
                continue
            for target, delta in enumerate(deltas):
                out[target, rows].addcmul_(a, torch.mm(delta[h, rows], vt[h]).clamp_(min=0))
    out /= heads
    return out[0] if deltas is None else out


def _chain_rows(layers: Sequence[Tensor], v: Tensor, residual: bool = True) -> Tensor:
    """``v^T P_last ... P_first`` with ``P = I + layer`` (or ``layer``), for v (n, N) as rows;
    layers (N, N), or (n, N, N) with one matrix per row of v."""
    for layer in reversed(layers):
        product = (v[:, None] @ layer)[:, 0]
        v = v + product if residual else product
    return v


def _chain_columns(layers: Sequence[Tensor], u: Tensor, residual: bool = True) -> Tensor:
    """``P_last ... P_first u`` with ``P = I + layer`` (or ``layer``), vectors as rows (n, N)."""
    for layer in layers:
        product = (u[:, None] @ layer.transpose(-1, -2))[:, 0]
        u = u + product if residual else product
    return u


def _offset_rows(layers: Sequence[Tensor], v: Tensor) -> Tensor:
    """``v^T (P_last ... P_first - I)`` with ``P = I + layer``, (n, N), without cancellation.

    Tracks the offset from the start vector, ``d <- d + (v + d) A``, instead of subtracting
    ``v`` from the product at the end: when the layers are small (a checkpoint with small
    logits has small gradients), ``v^T P - v`` loses the digits that make the answer.
    """
    d = torch.zeros_like(v)
    for layer in reversed(layers):
        d = d + ((v + d)[:, None] @ layer)[:, 0]
    return d


def _offset_columns(layers: Sequence[Tensor], u: Tensor) -> Tensor:
    """``(P_last ... P_first - I) u`` with ``P = I + layer``, (n, N), as :func:`_offset_rows`."""
    d = torch.zeros_like(u)
    for layer in layers:
        d = d + ((u + d)[:, None] @ layer.transpose(-1, -2))[:, 0]
    return d


def _normalised(hat: Tensor) -> Tensor:
    """Chefer's eq. 8-9: ``(R - I)`` with rows scaled to sum 1 (zero rows stay 0), plus I.

    ``hat``: ``R - I`` (..., Q, Q), a batch of square matrices (kept as such, not formed from
    R: see :func:`_offset_rows`)."""
    eye = torch.eye(hat.shape[-1], dtype=hat.dtype, device=hat.device)
    sums = hat.sum(-1, keepdim=True)
    return torch.where(sums > 0, hat / sums.where(sums > 0, 1.0), 0.0) + eye


def _cell(analysis: Analysis, point: tuple[float, float]) -> int:
    return analysis.grid.cell_index(*analysis.grid.cell_at(*point))


# --- rollout -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Rollout:
    """Attention rollout of one analysis: encoder layers kept dense, decoder queries done.

    ``layers``: the six (N, N) encoder matrices ``M_l`` (residual added, rows renormalised),
    N = h * w in row-major order; ``queries``: (100, h, w) the decoder rollout of every query.
    """

    analysis: Analysis
    layers: tuple[Tensor, ...]
    queries: np.ndarray

    def decoder_maps(self, queries: Sequence[int]) -> np.ndarray:
        """(n, h, w) rollout maps of the given object queries."""
        return self.queries[self.analysis.checked_queries(queries)]

    def encoder_map(self, point: tuple[float, float],
                    direction: Direction = INCOMING) -> np.ndarray:
        """(h, w) rollout at the cell under ``point`` (original pixels): its column (incoming,
        what draws on the point) or its row (outgoing, what the point draws on; sums to 1)."""
        check_direction(direction)
        cell = _cell(self.analysis, point)
        first, rest = (self.layers[-1], self.layers[:-1]) if direction == OUTGOING else \
            (self.layers[0].T, self.layers[1:])
        start = first[cell][None]  # e_i^T M_last (or M_first e_i): one row, no product needed
        chain = _chain_rows if direction == OUTGOING else _chain_columns
        return chain(rest, start, residual=False)[0].reshape(self.analysis.feature_hw).numpy()


def _rollout_matrix(attention: Tensor) -> Tensor:
    """``(A + I) / rowsum(A + I)``: the residual connection, rows renormalised (the paper)."""
    m = attention + torch.eye(attention.shape[0], dtype=attention.dtype)
    return m / m.sum(-1, keepdim=True)


def query_rollout(layers: Sequence[Tensor]) -> Tensor:
    """R_qq = M_last ... M_first: the decoder's self-attention rolled out, from each layer's
    head-averaged (Q, Q) attention."""
    r_qq = _rollout_matrix(layers[0])
    for attention in layers[1:]:
        r_qq = _rollout_matrix(attention) @ r_qq
    return r_qq


def rollout(analysis: Analysis) -> Rollout:
    """Attention rollout of ``analysis`` (see the module docstring); ~0.5 s for DC5 on 2 cores.
    A deformable model's: :func:`detr_viz.deformable_rollout.deformable_rollout` (the same rule
    on its sparse sampling matrices)."""
    if analysis.sparse:
        from detr_viz.deformable_rollout import deformable_rollout

        return deformable_rollout(analysis)
    layers = tuple(_rollout_matrix(mean_attention(f)) for f in analysis.encoder)
    r_qq = query_rollout([mean_attention(f) for f in analysis.decoder_self])
    w = r_qq.T @ mean_attention(analysis.decoder[-1])  # (100, N): row t = R_qq[:, t]^T C
    maps = _chain_rows(layers, w, residual=False)
    return Rollout(analysis, layers, maps.reshape(-1, *analysis.feature_hw).numpy())


# --- relevance -----------------------------------------------------------------------------

Target = Callable[[Tensor, Tensor], Tensor]  # (logits (Q, C + 1), boxes (Q, 4)) -> (n,)


def _gradients(model: DETR, analysis: Analysis, target: Target, batched: bool = False):
    """The gradient of each scalar of ``target`` at every attention output.

    ``target`` maps the replayed image's ``pred_logits`` (Q, C + 1) and ``pred_boxes`` (Q, 4,
    normalised cxcywh) to the n explained scalars (n,); e.g. ``logits[queries, classes]``.
    Returns ``(grads, fused)``: per target ``{(part, layer): delta (1, H, L, d)}``, and the
    live attention tensors of the one forward pass (detached), keyed the same way. One forward
    with a graph (from the captured transformer inputs: no backbone), then one backward per
    target, or with ``batched`` one vmapped backward for all (``is_grads_batched``). For
    queries the loop was measured 3-5 % faster than vmap (``benchmarks/explain.py``); for the
    four box edges of one query, see ``benchmarks/debugging.py``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        inputs = trainable_copy(analysis.inputs)
        queries_embed = model.query_embed.weight.detach().clone().requires_grad_()
        with capture(model, features=False, live=True) as cap:
            logits, boxes = replay_outputs(model, inputs, inputs.src, queries_embed)
        keys = sorted(cap.live)
        heads = [cap.live[key].heads for key in keys]
        targets = target(logits[0], boxes[0])
        if batched:
            eye = torch.eye(len(targets), dtype=targets.dtype)
            every = torch.autograd.grad(targets, heads, eye, is_grads_batched=True)
            grads = [dict(zip(keys, (g[i] for g in every), strict=True))
                     for i in range(len(targets))]
        else:
            grads = [dict(zip(keys, torch.autograd.grad(one, heads, retain_graph=True),
                              strict=True)) for one in targets]
        fused = {key: Fused(*(t.detach() if t is not None else None for t in cap.live[key]))
                 for key in keys}
    return grads, fused


def class_target(queries: Sequence[int], classes: Sequence[int]) -> Target:
    """The logits ``logits[query, class]`` of each pair: what :func:`relevance` explains."""
    return lambda logits, boxes: logits[list(queries), list(classes)]


def _classes(analysis: Analysis, queries: list[int], classes: Sequence[int] | None) -> list[int]:
    if classes is None:
        return [int(c) for c in analysis.probabilities[queries].argmax(axis=1)]
    if len(classes) != len(queries):
        raise ArgumentError(f"{len(classes)} classes for {len(queries)} queries.")
    bad = [c for c in classes if not 0 <= int(c) < analysis.probabilities.shape[1]]
    if bad:
        last = analysis.probabilities.shape[1] - 1
        raise ArgumentError(f"class {bad[0]} is out of range (0..{last}).")
    return [int(c) for c in classes]


def _decoder_rows(grads: list[dict], fused: dict, queries: list[int], layers: int) -> Tensor:
    """``w = R_qi[query]`` before the encoder, for each target: (n, N) (see :func:`rows_of`)."""
    def cam(key):
        return mean_attention(fused[key], torch.cat([g[key] for g in grads]))

    return rows_of(((cam(("decoder_self", i)), cam(("decoder", i))) for i in range(layers)),
                   queries)


def rows_of(layers, queries: list[int]) -> Tensor:
    """``w = R_qi[query]`` before the encoder, for each target: (n, N), from each decoder
    layer's gradient-weighted (self-attention (n, Q, Q), cross-attention (n, Q, N)), first
    layer first.

    The decoder rules with ``norm(R_ii)`` factored out: ``R_qi = W norm(R_ii)`` with
    ``W <- (I + S_l) W + norm(R_qq)^T C_l``, since the encoder's ``norm(R_ii)`` is the same in
    every layer's cross-attention update. All targets at once: (n, Q, Q) and (n, Q, N) batches.
    ``hat`` is ``R_qq - I``, updated as ``hat <- hat + S (I + hat)``.
    """
    hat, w = None, None
    for s, c in layers:
        hat = s if hat is None else hat + s + s @ hat
        w = torch.zeros_like(c) if w is None else w + s @ w
        w = w + _normalised(hat).transpose(1, 2) @ c
    return w[torch.arange(len(queries)), queries]


def _encoder_layers(grads: list[dict], fused: dict, layers: int) -> list[Tensor]:
    """Each encoder layer's gradient-weighted attention for the given targets: (n, N, N)."""
    return [mean_attention(fused[("encoder", i)],
                           torch.cat([g[("encoder", i)] for g in grads])) for i in range(layers)]


def _relevance_map(encoder: list[Tensor], w: Tensor) -> Tensor:
    """``w^T norm(R_ii)`` with ``R_ii = (I + A_6) ... (I + A_1)``, by vector products only.

    ``norm(R_ii) = D^-1 (R_ii - I) + I`` with D the row sums of ``R_ii - I``. Both ``(R_ii - I) 1``
    and ``y^T (R_ii - I)`` are accumulated as offsets (:func:`_offset_rows`): forming ``R_ii 1``
    and subtracting 1 left the float32 map 13 % off the float64 one for a checkpoint with small
    logits (class head scaled by 1e-5); accumulated, ~1 %.
    ``encoder``: per layer (n, N, N) for n targets; ``w`` (n, N). Returns (n, N).
    """
    sums = _offset_columns(encoder, torch.ones_like(w))  # (n, N)
    y = torch.where(sums > 0, w / sums.where(sums > 0, 1.0), 0.0)
    return _offset_rows(encoder, y) + w


def _chunk(analysis: Analysis) -> int:
    """How many targets' encoder maps fit in :data:`MEMORY` (6 x N x N each)."""
    cells, itemsize = analysis.grid.num_cells, analysis.encoder[0].q.element_size()
    return max(1, MEMORY // (analysis.num_layers * cells * cells * itemsize))


def relevance(model: DETR, analysis: Analysis, queries: Sequence[int],
              classes: Sequence[int] | None = None) -> np.ndarray:
    """Chefer relevance maps (n, h, w) of ``queries``, each for its ``classes`` entry (default:
    the query's predicted class). ``model`` must be the analysed one (detr-viz's DETR).

    The encoder maps of :func:`_chunk` targets at a time are kept (DC5 float32: 270 MB each).
    """
    queries = analysis.checked_queries(queries)
    classes = _classes(analysis, queries, classes)
    return target_relevance(model, analysis, queries, class_target(queries, classes))


def target_relevance(model: DETR, analysis: Analysis, queries: Sequence[int], target: Target,
                     batched: bool = False) -> np.ndarray:
    """Chefer relevance maps (n, h, w) of any n scalars of the outputs: ``target`` (see
    :func:`_gradients`) gives them, ``queries[i]`` is the object query scalar i belongs to
    (its row of ``R_qi`` is the map). Relevance of class logits and of box edges alike."""
    queries = analysis.checked_queries(queries)
    h, w = analysis.feature_hw
    if not queries:
        return analysis.encoder[0].q.new_zeros(0, h, w).numpy()
    if analysis.spec.family != "detr":  # a family run in transformers' code
        from detr_viz.explain_hf import hf_cams

        encoder, decoder = hf_cams(model, analysis, target, len(queries))
        maps = _relevance_map(encoder, rows_of(decoder, queries))
        return maps.reshape(-1, h, w).cpu().numpy()
    grads, fused = _gradients(model, analysis, target, batched)
    if len(grads) != len(queries):
        raise ArgumentError(f"the target gave {len(grads)} scalars for {len(queries)} queries.")
    layers, step, maps = analysis.num_layers, _chunk(analysis), []
    for i in range(0, len(queries), step):
        part = grads[i:i + step]
        rows = _decoder_rows(part, fused, queries[i:i + step], analysis.num_decoder_layers)
        maps.append(_relevance_map(_encoder_layers(part, fused, layers), rows))
    return torch.cat(maps).reshape(-1, h, w).cpu().numpy()


@dataclass(frozen=True, eq=False)
class EncoderRelevance:
    """The encoder's relevance matrix ``R_ii`` for one explained (query, class), kept as its six
    gradient-weighted layers ``A_l`` (N, N); rows and columns of ``R_ii - I`` on demand."""

    analysis: Analysis
    query: int
    label: int
    layers: tuple[Tensor, ...]

    def encoder_map(self, point: tuple[float, float],
                    direction: Direction = INCOMING) -> np.ndarray:
        """(h, w): relevance, for this detection, that flows into the cell under ``point`` from
        every cell (outgoing: its row of ``R_ii - I``) or from it to every cell (incoming: its
        column). The identity (the cell's own residual path) is left out."""
        check_direction(direction)
        e = torch.zeros(1, self.layers[0].shape[-1], dtype=self.layers[0].dtype)
        e[0, _cell(self.analysis, point)] = 1
        offset = _offset_rows if direction == OUTGOING else _offset_columns
        return offset(self.layers, e)[0].reshape(self.analysis.feature_hw).numpy()


def encoder_relevance(model: DETR, analysis: Analysis, query: int,
                      label: int | None = None) -> EncoderRelevance:
    """:class:`EncoderRelevance` of ``query`` for class ``label`` (default: its prediction)."""
    queries = analysis.checked_queries([query])
    labels = _classes(analysis, queries, None if label is None else [label])
    if analysis.spec.family != "detr":  # a family run in transformers' code
        from detr_viz.explain_hf import hf_cams

        encoder, _ = hf_cams(model, analysis, class_target(queries, labels), 1)
        return EncoderRelevance(analysis, queries[0], labels[0],
                                tuple(layer[0].cpu() for layer in encoder))
    grads, fused = _gradients(model, analysis, class_target(queries, labels))
    layers = tuple(layer[0].cpu() for layer in _encoder_layers(grads, fused, analysis.num_layers))
    return EncoderRelevance(analysis, queries[0], labels[0], layers)
