"""Re-run DETR's transformer and class head from captured inputs, without the backbone.

    logits = replay(model, analysis.inputs)                  # == the analysed logits
    logits = replay(model, analysis.inputs, src=masked)      # (B, 100, 92) for B variants

The backbone is ~80 % of a forward pass (R50 at 800x1066); explanation methods that need the
transformer again (gradients, token deletion) start from the captured ``input_proj`` features.
"""

from __future__ import annotations

from torch import Tensor

from detr_viz.capture import TransformerInputs
from detr_viz.model import DETR


def replay(model: DETR, inputs: TransformerInputs, src: Tensor | None = None,
           query_embed: Tensor | None = None) -> Tensor:
    """``pred_logits`` (B, 100, 92) of ``model``'s transformer and class head on ``inputs``.

    ``src`` (B, 256, h, w) replaces the captured features (same grid; B variants of one image:
    the captured mask and position encoding are shared); ``query_embed`` (100, 256) replaces
    the learnt object queries (a copy requiring grad puts the decoder's first self-attention,
    which sees nothing else, into a graph). Computed exactly as ``DETR.forward``
    does, so ``replay(model, cap.inputs)`` equals the captured forward's logits bit for bit.
    The inputs move to the model's device (captures are kept on the CPU); the logits stay there.
    """
    return model.class_embed(_decoded(model, inputs, src, query_embed))[-1]


def replay_outputs(model: DETR, inputs: TransformerInputs, src: Tensor | None = None,
                   query_embed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(pred_logits (B, 100, 92), pred_boxes (B, 100, 4))`` from one transformer run, as
    :func:`replay` (boxes normalised cxcywh, as ``DETR.forward`` returns them)."""
    hs = _decoded(model, inputs, src, query_embed)
    return model.class_embed(hs)[-1], model.bbox_embed(hs[-1]).sigmoid()


def _decoded(model: DETR, inputs: TransformerInputs, src: Tensor | None,
             query_embed: Tensor | None) -> Tensor:
    """The decoder's output of every layer, (6, B, 100, 256)."""
    src = inputs.src if src is None else src
    if src.shape[1:] != inputs.src.shape[1:]:
        raise ValueError(f"src must be (B, {', '.join(map(str, inputs.src.shape[1:]))}), "
                         f"not {tuple(src.shape)}")
    batch = src.shape[0]
    queries = model.query_embed.weight if query_embed is None else query_embed
    device = queries.device
    src = src.to(device)
    mask = inputs.mask.to(device).expand(batch, -1, -1)
    pos = inputs.pos.to(device).expand(batch, -1, -1, -1)
    return model.transformer(src, mask, queries, pos)[0]


def trainable_copy(inputs: TransformerInputs) -> TransformerInputs:
    """``inputs`` as ordinary tensors (outside inference mode), ``src`` requiring grad.

    Tensors captured under ``torch.inference_mode`` cannot enter an autograd graph; a copy can.
    Call inside ``torch.inference_mode(False)``.
    """
    return TransformerInputs(inputs.src.clone().requires_grad_(), inputs.mask.clone(),
                             inputs.pos.clone())
