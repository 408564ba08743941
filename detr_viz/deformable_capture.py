"""Where a Hugging Face Deformable DETR's attention samples, exactly, in one forward pass.

    model = DeformableDetrForObjectDetection(...)     # transformers, eval mode
    cap = capture_deformable(model, preprocess(image).tensor)
    cap.locations[-1, 3]     # (heads, levels, points, 2): query 3's sampling points, last layer
    cap.weights[-1, 3]       # (heads, levels, points): their softmax weights
    cap.references[-1][3]    # (2,) point or (4,) box the last layer started from

transformers' ``DeformableDetrMultiscaleDeformableAttention`` computes, per query, head, level
and point, a location = reference (scaled by the level's valid ratio) + offset, and hands the
locations with the softmax weights to ``MultiScaleDeformableAttention`` (its ``attn`` child),
which samples each level's values with ``F.grid_sample``. A forward pre-hook on that child
copies the very tensors it is given (nothing recomputed, so nothing can differ); hooks on the
decoder copy the reference points each layer starts from. Hooks return None (the forward is
untouched: predictions are bit for bit those of a plain run), exist only during
:func:`capture_deformable`, are removed on any exit, and record only the calling thread.
Costs: ``benchmarks/deformable.py``.

Location convention, as grid_sample uses it: ``locations[..., l, p, :]`` = (x, y) normalised
to level l's whole feature map (h_l, w_l), padding included: (0, 0) is the top-left corner of
cell (0, 0), (1, 1) the bottom-right corner of cell (h_l - 1, w_l - 1). The module passes
``2 * location - 1`` to ``grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)``, so the point sits at cell coordinates (x * w_l - 0.5, y * h_l - 0.5)
with cell centres at integers, and the bilinear corners outside the map count as zero values.
Locations are not clamped: a point may lie outside [0, 1]. With a ``pixel_mask`` the reference
points are normalised to the unpadded image and the module multiplies them by the level's
``valid_ratios`` (real cells / all cells along x and y) before adding offsets; the offsets are
divided by (w_l, h_l) for point references, or scaled by half the box size / points for box
references (two-stage and box-refined layers). :mod:`detr_viz.deformable_maps` turns locations
into photo pixels and splats the weights onto each level's grid.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from detr_viz.errors import ArgumentError


@dataclass(frozen=True, eq=False)
class DeformableCapture:
    """One image through a Deformable DETR: predictions and every decoder sampling point.

    ``logits`` (Q, num_labels) as the model returns them; ``probabilities`` = sigmoid(logits),
    independent per-class scores. ``boxes`` (Q, 4): ``pred_boxes``, normalised (cx, cy, w, h) of
    the unpadded model input. ``input_size`` (W, H): the size of ``pixel_values``.
    ``spatial_shapes[l]`` = (h_l, w_l) of feature level l (finest first); ``level_start_index[l]``
    = where level l starts in the flattened (sum h_l * w_l) token sequence, each level row-major.
    ``valid_ratios`` (levels, 2): (x, y) fraction of real (unpadded) cells per level, all ones
    without a ``pixel_mask``.

    ``locations`` (decoder layers, Q, heads, levels, points, 2): (x, y) as grid_sample is given
    them (see the module docstring), in the model's dtype. ``weights`` (decoder layers, Q, heads,
    levels, points): after the softmax over levels x points, so each (layer, query, head) sums
    to 1. ``references[i]`` (Q, 2) point (x, y) or (Q, 4) box (cx, cy, w, h), normalised to the
    unpadded input: what decoder layer i started from, before the valid-ratio scaling. A tuple,
    not one tensor, because with box refinement and no two-stage the first layer starts from
    points and the next ones from refined boxes.

    ``encoder_locations`` (encoder layers, S, heads, levels, points, 2) and ``encoder_weights``
    (encoder layers, S, heads, levels, points), S = sum h_l * w_l tokens in sequence order: the
    same for the encoder's self-attention, when asked for (None otherwise).
    """

    logits: Tensor
    probabilities: Tensor
    boxes: Tensor
    input_size: tuple[int, int]
    spatial_shapes: tuple[tuple[int, int], ...]
    level_start_index: tuple[int, ...]
    valid_ratios: Tensor
    locations: Tensor
    weights: Tensor
    references: tuple[Tensor, ...]
    encoder_locations: Tensor | None = None
    encoder_weights: Tensor | None = None

    @property
    def heads(self) -> int:
        return self.weights.shape[2]

    @property
    def levels(self) -> int:
        return len(self.spatial_shapes)

    @property
    def points(self) -> int:
        return self.weights.shape[4]


@dataclass
class _Store:
    decoder: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    encoder: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    shapes: tuple[tuple[int, int], ...] = ()
    starts: tuple[int, ...] = ()
    first: Tensor | None = None  # the decoder's initial reference points (B, Q, 2|4)
    ratios: Tensor | None = None  # (B, levels, 2)
    refined: Tensor | None = None  # (B, layers, Q, 2|4): the reference after each layer


def capture_deformable(model: nn.Module, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                       *, encoder: bool = False) -> DeformableCapture:
    """Run transformers' ``DeformableDetrForObjectDetection`` once on ``pixel_values`` (1, 3, H,
    W), ImageNet-normalised, in the model's dtype and device; ``pixel_mask`` (1, H, W), 1 on real
    pixels (None: no padding). ``encoder=True`` also records the encoder's sampling points (S
    queries per layer: memory grows as S x heads x levels x points). Returns a
    :class:`DeformableCapture` of detached CPU tensors in the model's dtype."""
    if getattr(getattr(model, "config", None), "model_type", None) != "deformable_detr":
        raise ArgumentError("capture_deformable needs transformers' "
                            "DeformableDetrForObjectDetection (model_type deformable_detr).")
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[:2]) != (1, 3):
        raise ArgumentError(f"capture_deformable takes one RGB image (1, 3, H, W), not "
                            f"{tuple(pixel_values.shape)}.")
    store = _Store()
    with _hooked(model, store, encoder), torch.inference_mode():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    logits = out.logits[0].detach().cpu()
    layers = len(store.decoder)
    starts = [store.first[0]] + [store.refined[0, i] for i in range(layers - 1)]
    return DeformableCapture(
        logits=logits, probabilities=logits.sigmoid(), boxes=out.pred_boxes[0].detach().cpu(),
        input_size=(pixel_values.shape[3], pixel_values.shape[2]), spatial_shapes=store.shapes,
        level_start_index=store.starts, valid_ratios=store.ratios[0],
        locations=_stacked(store.decoder, 0), weights=_stacked(store.decoder, 1),
        references=tuple(r.detach().to("cpu", copy=True) for r in starts),
        encoder_locations=_stacked(store.encoder, 0) if encoder else None,
        encoder_weights=_stacked(store.encoder, 1) if encoder else None,
    )


def _stacked(layers: dict[int, tuple[Tensor, Tensor]], part: int) -> Tensor:
    return torch.stack([layers[i][part] for i in sorted(layers)])


def _copy(x: Tensor) -> Tensor:
    """Batch 0 of ``x``, detached, on the CPU, in storage the model can no longer touch."""
    return x[0].detach().to("cpu", copy=True)


@contextmanager
def _hooked(model: nn.Module, store: _Store, encoder: bool) -> Iterator[None]:
    owner = threading.get_ident()
    deformable = model.model.decoder.layers[0].encoder_attn.attn
    signature = inspect.signature(deformable.forward)

    # Another thread's forward may call these hooks while this thread registers or removes
    # them: the owner check comes first, and the signatures take what they are given.
    def sampler(part, index, module, args, *given):
        if threading.get_ident() != owner:
            return None
        bound = signature.bind(*args, **(given[0] if given else {})).arguments
        locations, weights = bound["sampling_locations"], bound["attention_weights"]
        getattr(store, part)[index] = (_copy(locations), _copy(weights))
        store.shapes = tuple((int(h), int(w)) for h, w in bound["value_spatial_shapes_list"])
        store.starts = tuple(int(i) for i in bound["level_start_index"])
        return None

    def decoder_in(module, args, kwargs):
        if threading.get_ident() == owner:
            store.first = kwargs["reference_points"].detach()
            store.ratios = kwargs["valid_ratios"].detach().to("cpu", copy=True)

    def decoder_out(module, args, kwargs, output):
        if threading.get_ident() == owner:
            store.refined = output.intermediate_reference_points.detach()

    targets = [(layer.encoder_attn.attn, "decoder", i)
               for i, layer in enumerate(model.model.decoder.layers)]
    if encoder:
        targets += [(layer.self_attn.attn, "encoder", i)
                    for i, layer in enumerate(model.model.encoder.layers)]
    handles = []
    try:
        decoder = model.model.decoder
        handles.append(decoder.register_forward_pre_hook(decoder_in, with_kwargs=True))
        handles.append(decoder.register_forward_hook(decoder_out, with_kwargs=True))
        for module, part, index in targets:
            hook = _partial(sampler, part, index)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _partial(hook, *bound):
    return lambda module, *call: hook(*bound, module, *call)
