"""Gradient-weighted attention of a family run in transformers' code (Conditional DETR,
DAB-DETR), for the relevance rules of :mod:`detr_viz.explain`.

The rule is DETR's (Chefer, Gur & Wolf 2021, without LRP): every attention map A weighted by
the gradient of the explained scalar y, ``Abar = mean_heads((dy/dA * A)^+)``, then propagated
through encoder self-attention, decoder self-attention and cross-attention exactly as for DETR.
It carries over unchanged because these decoders have DETR's residual structure: each layer's
self-attention and cross-attention add their output to the queries (post-norm), and the
encoder's self-attention adds to the cells. For Conditional DETR and DAB-DETR A is the full
cross-attention, ``softmax(content + spatial)``: the weights the model multiplies the values
by, so ``dy/dA`` is the sensitivity to exactly the map the page shows.

How: one forward of transformers' model on the analysed input (``Analysis.pixels``) with
``output_attentions=True`` (eager: the weights are in the graph), the graph cut at the input
projection (the backbone is not differentiated) and the learned queries made leaves (so the
first decoder self-attention, which sees nothing else, is in the graph too); then one
``autograd.grad`` per explained scalar for every attention at once. Memory: (heads, N, N) per
encoder layer per scalar, transiently (stride 32 at 800 x 1066: 23 MB a layer; DC5: 360 MB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from detr_viz.analysis import Analysis
from detr_viz.errors import ArgumentError

Target = Callable[[Tensor, Tensor], Tensor]  # (logits (Q, C), boxes (Q, 4)) -> (n,)
_QUERIES = ("query_position_embeddings", "query_refpoint_embeddings")  # Conditional, DAB


@contextmanager
def _differentiable(model: nn.Module) -> Iterator[None]:
    """Inside: the input projection's output is a leaf requiring grad, and so are the learned
    queries; both undone on any exit."""
    inner = model.model
    handle = inner.input_projection.register_forward_hook(
        lambda module, args, out: out.detach().requires_grad_())
    queries = [getattr(inner, n).weight for n in _QUERIES if hasattr(inner, n)]
    before = [q.requires_grad for q in queries]
    try:
        for q in queries:
            q.requires_grad_(True)
        yield
    finally:
        handle.remove()
        for q, flag in zip(queries, before, strict=True):
            q.requires_grad_(flag)


def hf_cams(model, analysis: Analysis, target: Target, count: int
            ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """For the ``count`` scalars of ``target``: each encoder layer's ``Abar`` (n, N, N), and
    each decoder layer's (self-attention (n, Q, Q), cross-attention (n, Q, N)); CPU tensors in
    the model's dtype. ``model`` is the analysed :class:`~detr_viz.families.HFDetector`."""
    if analysis.pixels is None:
        raise ArgumentError("This analysis kept no model input to differentiate; analyse the "
                            "photo again with detr_viz.analyze.")
    hf = model.hf
    weight = next(hf.parameters())
    pixels = analysis.pixels.to(weight.device, weight.dtype)
    with torch.inference_mode(False), torch.enable_grad(), _differentiable(hf):
        out = hf(pixel_values=pixels, output_attentions=True)
        scalars = target(out.logits[0], out.pred_boxes[0])
        if scalars.shape != (count,):
            raise ArgumentError(f"the target gave {tuple(scalars.shape)} scalars for {count} "
                                "queries.")
        maps = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
        cams: list[list[Tensor]] = [[] for _ in maps]
        for scalar in scalars:
            grads = torch.autograd.grad(scalar, maps, retain_graph=True, allow_unused=True)
            for store, a, g in zip(cams, maps, grads, strict=True):
                g = torch.zeros_like(a) if g is None else g  # a map y does not depend on
                store.append((g * a).clamp(min=0).mean(1)[0].detach().cpu())  # (L, S)
    stacked = [torch.stack(c) for c in cams]
    layers = len(out.encoder_attentions)
    decoder = len(out.decoder_attentions)
    selfs, crosses = stacked[layers:layers + decoder], stacked[layers + decoder:]
    return stacked[:layers], list(zip(selfs, crosses, strict=True))
