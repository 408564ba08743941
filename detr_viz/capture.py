"""Safe, exact capture of DETR's CNN features and attention for one forward pass.

    with capture(model) as cap:
        outputs = model(images)
    cap.features                                  # (B, 2048, h, w)
    cap.encoder[-1].row(i)                        # where feature cell i looks, (h * w,)
    cap.decoder[-1].rows([3, 7], head=2)          # two queries' cross-attention, (2, h * w)

Hooks exist only inside the ``with`` block and are removed on any exit, exceptions included.
Each hook records only calls made by the thread that opened the block, so one model shared by
many threads gives every caller its own, unmixed capture. Predictions are unchanged, bit for
bit: on detr-viz's own model (:class:`detr_viz.attention.MultiheadAttention`) capture takes the
factors that the fused attention path computes anyway; on any other model with the official
module paths (the torch hub DETR, say) it asks ``nn.MultiheadAttention`` for per-head weights
and factorises them. Hooks registered by others on the same modules still see the head-averaged
weights in ``output[1]`` (the model then takes the weight-building path for those modules).

Attention is stored as its exact factors rather than as dense matrices: per head the scaled
queries ``q`` (L, d), keys ``k`` (S, d) and the log of each row's softmax denominator ``lse``
(L,), so that ``weights[i, j] = exp(q_i . k_j - lse_i)``. That is 41 MB for all encoder layers
and heads of a DC5 model on an 800 x 1066 input, instead of 2.1 GB, and any row, column or
whole map is a small computation away.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from detr_viz.attention import CAPTURE_MARK, Fused, MultiheadAttention, observed
from detr_viz.errors import ArgumentError


@dataclass(frozen=True, eq=False)
class AttentionFactors:
    """One multi-head attention call, per head: ``weights = softmax(q k^T + padding)``.

    Tensors are detached CPU tensors in the model's dtype, with a leading batch dimension B:
    ``q`` (B, heads, L, d) already scaled by 1/sqrt(d); ``k`` (B, heads, S, d);
    ``lse`` (B, heads, L) log-sum-exp of each row of logits; ``key_padding`` (B, S) bool, True
    on padded keys (which get zero weight). For the encoder L = S = h * w (positions in
    row-major (y, x) order); for the decoder L = 100 object queries and S = h * w.
    Every accessor returns a NumPy array of that dtype; ``head=None`` means the mean over heads.
    """

    q: Tensor
    k: Tensor
    lse: Tensor
    key_padding: Tensor

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(L, S): number of query and key positions."""
        return self.q.shape[2], self.k.shape[2]

    def rows(self, indices: Sequence[int], head: int | None = None, batch: int = 0) -> np.ndarray:
        """Weights of the given query positions over all keys: (len(indices), S), rows sum to 1."""
        return self._reduce(self._row_weights(indices, head, batch), head)

    def columns(
        self, indices: Sequence[int], head: int | None = None, batch: int = 0
    ) -> np.ndarray:
        """Weights that every query position gives the given keys: (len(indices), L)."""
        return self._reduce(self._column_weights(indices, head, batch), head)

    def head_rows(self, indices: Sequence[int], batch: int = 0) -> np.ndarray:
        """:meth:`rows` of every head in one product: (heads, len(indices), S)."""
        return self._row_weights(indices, None, batch).numpy()

    def head_columns(self, indices: Sequence[int], batch: int = 0) -> np.ndarray:
        """:meth:`columns` of every head in one product: (heads, len(indices), L)."""
        return self._column_weights(indices, None, batch).numpy()

    def row(self, index: int, head: int | None = None, batch: int = 0) -> np.ndarray:
        return self.rows([index], head, batch)[0]

    def column(self, index: int, head: int | None = None, batch: int = 0) -> np.ndarray:
        return self.columns([index], head, batch)[0]

    def dense(self, head: int | None = None, batch: int = 0) -> np.ndarray:
        """The whole (L, S) weight matrix; large for DC5 encoders (45 MB per head)."""
        return self.rows(range(self.shape[0]), head, batch)

    def _row_weights(self, indices: Sequence[int], head: int | None, batch: int) -> Tensor:
        index = self._check(indices, self.shape[0], "query")
        q, k = self._select(head, batch)
        logits = q[:, index] @ k.transpose(1, 2) + self._bias(batch)  # (H, n, S)
        return logits.softmax(-1)

    def _column_weights(self, indices: Sequence[int], head: int | None, batch: int) -> Tensor:
        index = self._check(indices, self.shape[1], "key")
        q, k = self._select(head, batch)
        lse = self.lse[batch] if head is None else self.lse[batch, head : head + 1]
        logits = k[:, index] @ q.transpose(1, 2) - lse[:, None, :]  # (H, n, L)
        return logits.exp() * ~self.key_padding[batch, index][None, :, None]

    def _check(self, indices: Sequence[int], size: int, what: str) -> list[int]:
        index = [int(i) for i in indices]
        bad = [i for i in index if not -size <= i < size]
        if bad:
            raise ArgumentError(f"{what} position {bad[0]} is out of range (0..{size - 1}).")
        return index

    def _select(self, head: int | None, batch: int) -> tuple[Tensor, Tensor]:
        if head is None:
            return self.q[batch], self.k[batch]
        if not 0 <= head < self.num_heads:
            raise ArgumentError(f"head {head} is out of range (0..{self.num_heads - 1}).")
        return self.q[batch, head : head + 1], self.k[batch, head : head + 1]

    def _bias(self, batch: int) -> Tensor:
        bias = torch.zeros(self.shape[1], dtype=self.q.dtype)
        return bias.masked_fill(self.key_padding[batch], -math.inf)

    @staticmethod
    def _reduce(weights: Tensor, head: int | None) -> np.ndarray:
        return (weights.mean(0) if head is None else weights[0]).numpy()


def _factorise(module: nn.MultiheadAttention, args: tuple, kwargs: dict, weights: Tensor):
    """Exact factors of a sequence-first MHA call from its inputs and per-head weights.

    ``weights``: (B, H, L, S). The softmax denominator is recovered from each row's largest
    weight: lse_i = logit_ij* - log(w_ij*), which costs one pass over the weights instead of a
    second (L x S x d) matrix product.
    """
    query = args[0] if len(args) > 0 else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    padding = kwargs.get("key_padding_mask")
    heads, dim = module.num_heads, module.head_dim
    w_q, w_k, _ = module.in_proj_weight.chunk(3)
    b_q, b_k, _ = module.in_proj_bias.chunk(3)
    # (L, B, E) -> (B, H, L, d), the split nn.MultiheadAttention makes
    q = nn.functional.linear(query, w_q, b_q) * math.sqrt(1.0 / dim)
    k = nn.functional.linear(key, w_k, b_k)
    q = q.reshape(q.shape[0], -1, heads, dim).permute(1, 2, 0, 3).contiguous()
    k = k.reshape(k.shape[0], -1, heads, dim).permute(1, 2, 0, 3).contiguous()
    top_w, top_j = weights.max(dim=-1)  # (B, H, L)
    top_k = torch.gather(k, 2, top_j[..., None].expand(-1, -1, -1, dim))  # (B, H, L, d)
    lse = (q * top_k).sum(-1) - top_w.log()
    if padding is None:
        padding = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool)
    return AttentionFactors(q.detach().cpu(), k.detach().cpu(), lse.detach().cpu(),
                            padding.detach().cpu().bool())


def _detached(fused: Fused) -> AttentionFactors:
    pad = fused.key_padding
    if pad is None:
        pad = torch.zeros(fused.k.shape[0], fused.k.shape[2], dtype=torch.bool)
    return AttentionFactors(fused.q.detach().cpu(), fused.k.detach().cpu(),
                            fused.lse.detach().cpu(), pad.detach().cpu())


@dataclass(frozen=True, eq=False)
class TransformerInputs:
    """What ``model.transformer`` was called with: everything after the backbone.

    ``src`` (B, 256, h, w): CNN features after ``input_proj``; ``mask`` (B, h, w) bool, True on
    padding; ``pos`` (B, 256, h, w): the sine position encoding. Re-running the transformer on
    these (``detr_viz.replay``) reproduces the model's outputs without the backbone.
    """

    src: Tensor
    mask: Tensor
    pos: Tensor


@dataclass
class Capture:
    """What one ``with capture(model)`` block recorded (from the last forward pass inside it).

    ``features``: CNN feature map (B, 2048, h, w), or None if not requested;
    ``feature_mask``: (B, h, w) bool, True on padding;
    ``encoder`` / ``decoder`` / ``decoder_self``: layer index -> :class:`AttentionFactors` of
    the encoder self-attention, the decoder cross-attention (Q queries over h * w cells) and
    the decoder self-attention (Q x Q); ``inputs``: the transformer's
    :class:`TransformerInputs`; ``live``: with ``capture(live=True)``, (part, layer) -> the
    :class:`~detr_viz.attention.Fused` tensors as computed (part in "encoder", "decoder",
    "decoder_self"); ``calls``: backbone forward passes seen.
    """

    num_layers: int  # encoder layers
    num_decoder_layers: int | None = None  # None: as many as the encoder's
    features: Tensor | None = None
    feature_mask: Tensor | None = None
    encoder: dict[int, AttentionFactors] = field(default_factory=dict)
    decoder: dict[int, AttentionFactors] = field(default_factory=dict)
    decoder_self: dict[int, AttentionFactors] = field(default_factory=dict)
    inputs: TransformerInputs | None = None
    live: dict[tuple[str, int], Fused] = field(default_factory=dict)
    calls: int = 0

    @property
    def decoder_depth(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    def encoder_layer(self, layer: int) -> AttentionFactors:
        return self._layer(self.encoder, layer, "encoder", self.num_layers)

    def decoder_layer(self, layer: int) -> AttentionFactors:
        return self._layer(self.decoder, layer, "decoder", self.decoder_depth)

    def decoder_self_layer(self, layer: int) -> AttentionFactors:
        return self._layer(self.decoder_self, layer, "decoder self-attention",
                           self.decoder_depth)

    def _layer(self, store: dict, layer: int, kind: str, count: int) -> AttentionFactors:
        if not -count <= layer < count:
            raise ArgumentError(f"{kind} layer {layer} is out of range (0..{count - 1}).")
        layer %= count
        if layer not in store:
            raise ArgumentError(
                f"{kind} layer {layer} was not captured: run the model inside the"
                " `with capture(...)` block, in the thread that opened it, and include the layer."
            )
        return store[layer]


def _layers(selected: Sequence[int] | None, count: int) -> set[int]:
    if selected is None:
        return set(range(count))
    for i in selected:
        if not -count <= i < count:
            raise ArgumentError(f"layer {i} is out of range (0..{count - 1}).")
    return {i % count for i in selected}


@contextmanager
def capture(
    model: nn.Module,
    *,
    features: bool = True,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    decoder_self_layers: Sequence[int] | None = None,
    live: bool = False,
) -> Iterator[Capture]:
    """Record CNN features and per-head attention of ``model``'s forward passes in this thread.

    ``encoder_layers`` / ``decoder_layers`` / ``decoder_self_layers``: indices to capture (None:
    all; [] none). Works on any model with the official module paths (``backbone[-2]``,
    ``transformer.encoder.layers[i].self_attn``, ``transformer.decoder.layers[i].multihead_attn``
    and ``.self_attn``). ``live=True`` (detr-viz's model only, for methods that differentiate
    through attention) also keeps each call's tensors as computed, graph included, in
    ``Capture.live`` (their log-sum-exp outside the graph); inside such a block other hooks on
    these modules see ``output[1] = None``.
    """
    owner = threading.get_ident()
    enc = model.transformer.encoder.layers
    dec = model.transformer.decoder.layers
    result = Capture(num_layers=len(enc), num_decoder_layers=len(dec))
    targets = [(enc[i].self_attn, "encoder", i) for i in _layers(encoder_layers, len(enc))]
    targets += [(dec[i].multihead_attn, "decoder", i) for i in _layers(decoder_layers, len(dec))]
    targets += [(dec[i].self_attn, "decoder_self", i)
                for i in _layers(decoder_self_layers, len(dec))]
    if live and not all(isinstance(m, MultiheadAttention) for m, _, _ in targets):
        raise ArgumentError("capture(live=True) needs detr-viz's model (detr_viz.load_model or "
                            "build_model): its attention modules give the factors with a graph.")

    # Other threads may call these hooks, even with the kwargs argument missing while another
    # thread registers or removes hooks (torch reads its hook tables twice), so the owner
    # check comes before anything else and the signatures take what they are given.
    def ask(part, index, module, args, *kwargs):
        if threading.get_ident() != owner:
            return None
        if live or (isinstance(module, MultiheadAttention) and not observed(module)):
            def keep(fused: Fused) -> None:
                getattr(result, part)[index] = _detached(fused)
                if live:
                    result.live[(part, index)] = fused
            return args, {**kwargs[0], "need_weights": False, "on_fused": keep,
                          "lse_in_graph": not live}
        return args, {**kwargs[0], "need_weights": True, "average_attn_weights": False}

    def record_attention(part, index, module, args, *kwargs_and_output):
        if threading.get_ident() != owner:
            return None
        kwargs, (attn_output, weights) = kwargs_and_output
        if weights is None:  # the fused path: ``keep`` has the factors already
            return None
        getattr(result, part)[index] = _factorise(module, args, kwargs, weights)
        # hooks registered after ours see what the unhooked call returns: head-averaged weights
        return attn_output, weights.mean(dim=1)

    def record_features(module, args, output):
        if threading.get_ident() == owner:
            if features:
                result.features = output["0"].tensors.detach().cpu()
            result.feature_mask = output["0"].mask.detach().cpu()
            result.calls += 1

    def record_inputs(module, args, kwargs):
        if threading.get_ident() == owner:
            names = ("src", "mask", "query_embed", "pos_embed")
            given = {**dict(zip(names, args, strict=False)), **kwargs}
            src, mask, pos = given["src"], given["mask"], given["pos_embed"]
            keep = (lambda t: t) if live else (lambda t: t.detach().cpu())
            result.inputs = TransformerInputs(keep(src), keep(mask), keep(pos))

    handles = []
    try:
        handles.append(model.backbone[-2].register_forward_hook(record_features))
        handles.append(model.transformer.register_forward_pre_hook(record_inputs,
                                                                   with_kwargs=True))
        for module, part, index in targets:
            pre, post = partial(ask, part, index), partial(record_attention, part, index)
            setattr(post, CAPTURE_MARK, True)  # reads output[1] only to factorise it
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield result
    finally:
        for handle in handles:
            handle.remove()
