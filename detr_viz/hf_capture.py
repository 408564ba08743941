"""Exact attention of a Hugging Face Conditional DETR or DAB-DETR in one forward pass.

    model = load_hf_family(folder)                    # detr_viz.hf_families
    cap = capture_hf(model, preprocess(image).tensor)
    cap.probabilities                                 # (Q, num_labels) sigmoid scores
    cap.decoder[-1].rows([3], head=0)                 # query 3's cross-attention, (1, h * w)
    cap.spatial[-1].rows([3], head=0)                 # its spatial term alone (Figure 1 of the
                                                      # Conditional DETR paper)

Every attention is stored as :class:`~detr_viz.capture.AttentionFactors` (per head scaled ``q``,
``k``, the log-sum-exp ``lse`` of each row's logits, and ``key_padding``), so that
``factors.dense(head)`` is the softmax transformers computes. A forward pre-hook on each
attention module recomputes the query and key projections the module is about to make from
its inputs (the same ``nn.Linear`` calls on the same tensors: the same numbers); a forward hook
takes ``lse`` from the weights the eager module computed anyway (one pass, as
:mod:`detr_viz.capture` does), and hands the caller what it would have had without hooks. The
model runs once, with ``output_attentions=False``; hooks exist only during :func:`capture_hf`,
are removed on any exit, and record only the calling thread. Costs: see
``benchmarks/hf_families.py``.

DAB-DETR takes its softmax in float32 whatever the model's dtype: a float64 DAB-DETR's weights,
and so its factors here, are within about 1e-7 of the exact softmax of its float64 logits (its
content and spatial terms, computed here, are exact).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from detr_viz.capture import AttentionFactors
from detr_viz.errors import ArgumentError


@dataclass(frozen=True, eq=False)
class HFCapture:
    """One image through a Conditional DETR or DAB-DETR: predictions and every attention.

    ``logits`` (Q, num_labels) as the model returns them; ``probabilities`` = sigmoid(logits):
    independent per-class scores, no "no object" class. ``boxes`` (Q, 4): the model's
    ``pred_boxes``, normalised (cx, cy, w, h) in [0, 1] of the model input (trained, as DETR,
    to be relative to its unpadded part when a ``pixel_mask`` pads it). ``grid`` (h, w): the
    feature grid; ``padding`` (h, w) bool, True on feature cells that only cover padding. Per
    layer (tuples, layer 0 first): ``encoder`` self-attention (L = S = h * w, cells in
    row-major (y, x) order), ``decoder`` cross-attention (L = Q, S = h * w), ``decoder_self``
    (Q x Q). All factors have batch 1.

    ``content`` and ``spatial`` split each ``decoder`` layer: its logits per head are
    (q_c . k_c + q_s . k_s) / sqrt(2 d) (d = d_model / heads), query and key per head being the
    concatenation of a content part (q_c from the decoder embedding; k_c from the encoder
    output) and a spatial part (q_s from the sine embedding of the query's reference point or
    DAB-DETR's anchor, transformed by the decoder embedding; k_s from the cells' sine position
    embedding). ``content`` is softmax(q_c . k_c / sqrt(2 d)) and ``spatial`` is
    softmax(q_s . k_s / sqrt(2 d)): each term alone, with the full attention's scaling, padded
    keys excluded; so ``decoder`` = content * spatial, renormalised per row. In the first
    decoder layer (and every layer of a DAB-DETR with ``keep_query_pos``) transformers adds the
    query's positional projection to q_c and the cells' positional projection to k_c, so there
    the content term carries position too, exactly as the model computes it.

    ``reference_points`` (Q, 2), Conditional DETR only: each query's reference point (cx, cy),
    normalised to the input, the same for every layer. ``anchors`` (decoder_layers, Q, 4),
    DAB-DETR only: the anchor box (cx, cy, w, h), normalised, that each decoder layer starts
    from (layer 0: sigmoid of the learned anchors; layer i: refined by layers 0..i-1).
    """

    family: str  # "conditional_detr" | "dab_detr"
    logits: Tensor
    probabilities: Tensor
    boxes: Tensor
    grid: tuple[int, int]
    padding: Tensor
    encoder: tuple[AttentionFactors, ...]
    decoder: tuple[AttentionFactors, ...]
    decoder_self: tuple[AttentionFactors, ...]
    content: tuple[AttentionFactors, ...]
    spatial: tuple[AttentionFactors, ...]
    reference_points: Tensor | None = None
    anchors: Tensor | None = None


@dataclass
class _Store:
    encoder: dict[int, AttentionFactors] = field(default_factory=dict)
    decoder: dict[int, AttentionFactors] = field(default_factory=dict)
    decoder_self: dict[int, AttentionFactors] = field(default_factory=dict)
    content: dict[int, AttentionFactors] = field(default_factory=dict)
    spatial: dict[int, AttentionFactors] = field(default_factory=dict)
    mask: Tensor | None = None  # (B, h, w) bool, True on real cells (transformers' convention)
    points: Tensor | None = None


def capture_hf(model: nn.Module, pixel_values: Tensor, pixel_mask: Tensor | None = None
               ) -> HFCapture:
    """Run ``model`` once on ``pixel_values`` (1, 3, H, W), ImageNet-normalised as
    :func:`detr_viz.image.preprocess` gives it, in the model's dtype and device; ``pixel_mask``
    (1, H, W), 1 on real pixels, 0 on padding (None: no padding). Returns an :class:`HFCapture`
    of detached CPU tensors in the model's dtype."""
    family = {"conditional_detr": "conditional_detr", "dab-detr": "dab_detr"}.get(
        getattr(getattr(model, "config", None), "model_type", None))
    if family is None:
        raise ArgumentError("capture_hf needs a Conditional DETR or DAB-DETR model from "
                            "detr_viz.hf_families.load_hf_family.")
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[:2]) != (1, 3):
        raise ArgumentError(f"capture_hf takes one RGB image (1, 3, H, W), not "
                            f"{tuple(pixel_values.shape)}.")
    store = _Store()
    with _hooked(model, family, store), torch.inference_mode():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    logits = out.logits[0].detach().cpu()
    return HFCapture(
        family=family, logits=logits, probabilities=logits.sigmoid(),
        boxes=out.pred_boxes[0].detach().cpu(), grid=tuple(store.mask.shape[1:]),
        padding=~store.mask[0].cpu(), encoder=_ordered(store.encoder),
        decoder=_ordered(store.decoder), decoder_self=_ordered(store.decoder_self),
        content=_ordered(store.content), spatial=_ordered(store.spatial),
        reference_points=store.points if family == "conditional_detr" else None,
        anchors=store.points if family == "dab_detr" else None,
    )


def _ordered(layers: dict[int, AttentionFactors]) -> tuple[AttentionFactors, ...]:
    return tuple(layers[i] for i in sorted(layers))


def _factors(q: Tensor, k: Tensor, padding: Tensor | None) -> AttentionFactors:
    """Factors of softmax(q k^T) over keys, ``padding`` (B, S) True -> excluded (or None).
    ``q`` (B, H, L, d) already scaled, ``k`` (B, H, S, d)."""
    logits = q @ k.transpose(-1, -2)  # (B, H, L, S)
    if padding is not None and padding.any():
        logits = logits.masked_fill(padding[:, None, None, :], -torch.inf)
    return _detached(q, k, torch.logsumexp(logits, dim=-1), padding)


def _from_weights(q: Tensor, k: Tensor, weights: Tensor, padding: Tensor | None
                  ) -> AttentionFactors:
    """Factors of an attention whose weights (B, H, L, S) the model computed: the log of each
    row's softmax denominator from its largest weight, lse_i = q_i . k_j* - log(w_ij*), one pass
    over the weights instead of another (L x S x d) product and exp."""
    top_w, top_j = weights.max(dim=-1)  # (B, H, L)
    top_k = torch.gather(k, 2, top_j[..., None].expand(-1, -1, -1, k.shape[-1]))
    return _detached(q, k, (q * top_k).sum(-1) - top_w.log(), padding)


def _detached(q: Tensor, k: Tensor, lse: Tensor, padding: Tensor | None) -> AttentionFactors:
    if padding is None:
        padding = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    return AttentionFactors(q.detach().contiguous().cpu(), k.detach().contiguous().cpu(),
                            lse.detach().cpu(), padding.detach().cpu())


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, heads * d) -> (B, heads, L, d), the split transformers makes."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


# Each recipe: (the module's bound call arguments) -> scaled q, k, both (B, H, L|S, d)
def _cond_encoder(m, a):
    x = a["hidden_states"] + a["position_embeddings"]
    heads = x.shape[-1] // m.head_dim
    return _heads(m.q_proj(x), heads) * m.scaling, _heads(m.k_proj(x), heads)


def _cond_decoder_self(m, a):
    h, pos = a["hidden_states"], a["query_position_embeddings"]
    heads = h.shape[-1] // m.head_dim
    q = m.q_content_proj(h) + m.q_pos_proj(pos)
    return _heads(q, heads) * m.scaling, _heads(m.k_content_proj(h) + m.k_pos_proj(pos), heads)


def _cond_cross(m, a):
    q, k = m.q_content_proj(a["hidden_states"]), m.k_content_proj(a["encoder_hidden_states"])
    k_pos = m.k_pos_proj(a["encoder_position_embeddings"])
    if a.get("query_position_embeddings") is not None:  # the first layer only
        q, k = q + m.q_pos_proj(a["query_position_embeddings"]), k + k_pos
    heads = m.num_attention_heads
    q_sine = _heads(m.q_pos_sine_proj(a["query_sine_embed"]), heads)
    q = torch.cat([_heads(q, heads), q_sine], dim=-1) * m.scaling
    return q, torch.cat([_heads(k, heads), _heads(k_pos, heads)], dim=-1)


def _dab_encoder(m, a):
    x = a["hidden_states"] + a["object_queries"]
    return _heads(m.q_proj(x) * m.scaling, m.num_heads), _heads(m.k_proj(x), m.num_heads)


def _dab_attention(m, a):  # DabDetrAttention: q and k come in projected (and concatenated)
    heads = m.attention_heads
    return _heads(a["hidden_states"] * m.scaling, heads), _heads(a["key_states"], heads)


def _targets(model: nn.Module, family: str) -> list[tuple[nn.Module, str, int, Callable]]:
    """(module, part, layer, recipe) for every attention call of the model."""
    enc, dec = model.model.encoder.layers, model.model.decoder.layers
    if family == "conditional_detr":
        found = [(layer.self_attn, "encoder", i, _cond_encoder) for i, layer in enumerate(enc)]
        found += [(layer.self_attn, "decoder_self", i, _cond_decoder_self)
                  for i, layer in enumerate(dec)]
        return found + [(layer.encoder_attn, "decoder", i, _cond_cross)
                        for i, layer in enumerate(dec)]
    found = [(layer.self_attn, "encoder", i, _dab_encoder) for i, layer in enumerate(enc)]
    found += [(layer.self_attn.self_attn, "decoder_self", i, _dab_attention)
              for i, layer in enumerate(dec)]
    return found + [(layer.cross_attn.cross_attn, "decoder", i, _dab_attention)
                    for i, layer in enumerate(dec)]


@contextmanager
def _hooked(model: nn.Module, family: str, store: _Store) -> Iterator[None]:
    owner = threading.get_ident()
    pending: dict[tuple[str, int], tuple[Tensor, Tensor, bool]] = {}

    # Another thread's forward may call these hooks without ``kwargs`` while this thread
    # registers or removes them (torch reads its hook tables twice): the owner check comes
    # first, and the signatures take what they are given.
    def before(part, index, recipe, module, args, *given):
        if threading.get_ident() != owner:
            return None
        (kwargs,) = given
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        asked = bound.get("output_attentions", True)  # Conditional DETR's always return them
        pending[part, index] = (*recipe(module, bound), asked)
        if asked:
            return None
        # DAB-DETR's modules compute the weights anyway; have them returned (see ``after``)
        return args, {**kwargs, "output_attentions": True}

    def after(part, index, module, args, *given):
        if threading.get_ident() != owner or (part, index) not in pending:
            return None
        _, output = given  # (kwargs, output)
        q, k, asked = pending.pop((part, index))
        padding = None if part == "decoder_self" else ~store.mask.flatten(1)
        getattr(store, part)[index] = _from_weights(q, k, output[1], padding)
        if part == "decoder":  # per head q = [q_c, q_s], k = [k_c, k_s]: split the halves
            (q_c, q_s), (k_c, k_s) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
            store.content[index] = _factors(q_c, k_c, padding)
            store.spatial[index] = _factors(q_s, k_s, padding)
        return None if asked else (output[0], None)  # what the caller would have seen

    def features(module, args, output):  # [(feature map, mask)] per stage, the last is used
        if threading.get_ident() == owner:
            store.mask = output[-1][1].detach()

    def points(module, args, output):
        if threading.get_ident() != owner:
            return
        refs = output.reference_points if hasattr(output, "reference_points") else output[-1]
        # Conditional DETR: (Q, B, 2); DAB-DETR: (decoder layers, B, Q, 4); batch 0 of either
        store.points = refs[:, 0].detach().cpu()

    conv = model.model.backbone  # DAB-DETR wraps it with its position embedding
    conv = conv if family == "conditional_detr" else conv.conv_encoder
    handles = []
    try:
        handles.append(conv.register_forward_hook(features))
        handles.append(model.model.decoder.register_forward_hook(points))
        for module, part, index, recipe in _targets(model, family):
            pre, post = _partial(before, part, index, recipe), _partial(after, part, index)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _partial(hook, *bound):
    return lambda module, *call: hook(*bound, module, *call)
