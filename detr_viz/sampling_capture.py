"""Where any deformable DETR samples, exactly, in one forward pass: one capture, seven families.

    cap = capture_sampling(model, pixel_values)          # transformers model, eval mode
    cap.decoder.locations[-1, 3]     # (heads, levels, points, 2): query 3, last decoder layer
    cap.decoder.weights[-1, 3]       # (heads, levels, points): their softmax weights
    cap.decoder.references[-1][3]    # (levels', 2 | 4): the reference it started from
    cap.dense_encoder[0]             # RT-DETR, D-FINE: (heads, S, S) AIFI self-attention

Families (``model.config.model_type``) and how their points are read:

- ``deformable_detr``, ``rt_detr``, ``lw_detr``, ``rf_detr``: the attention module hands the
  locations and softmax weights to its ``MultiScaleDeformableAttention`` child (``attn``); a
  forward pre-hook on that child copies the very tensors it is given.
- ``rt_detr_v2``, ``d_fine``, ``deimv2``: the module calls the function
  ``multi_scale_deformable_attention_v2``
  directly, so there is no child to hook. The weights are the module's second output (the very
  tensor); the locations are recomputed in a forward hook from the module's inputs, with the
  module's own ``sampling_offsets`` layer and its own formula in the same order
  (``reference[:2] + offsets * (1 / points of the level) * reference[2:] * offset_scale``): the
  same operations on the same tensors, so the same numbers (the tests check them bit for bit
  against what the sampler received). Their levels may have different point counts
  (``decoder_n_points`` a list): the record pads each level to the most points, with weight 0
  and location NaN on the padding; ``points_per_level`` says how many are real.
  ``decoder_method="discrete"`` (RT-DETRv2, D-FINE) samples no bilinear mix but the one cell
  ``clamp(floor(x * w_l + 0.5))`` (a half cell right of grid_sample's convention, as the code
  does it): ``sampler`` says which.

Locations are (x, y) normalised to level l's whole feature map (h_l, w_l), padding included, as
grid_sample reads them with ``align_corners=False`` (the module passes ``2 * location - 1``,
``padding_mode="zeros"``): (0, 0) the top-left corner of cell (0, 0), (1, 1) the bottom-right
corner of cell (h_l - 1, w_l - 1), cell centres at ((c + 0.5) / w_l, (r + 0.5) / h_l); bilinear
corners outside the map count as zero values. Locations are not clamped: a point may lie
outside [0, 1].
References are the module's ``reference_points`` as the module got them: (levels', 2) points or
(levels', 4) (cx, cy, w, h) boxes in the same frame, levels' = levels where the family scales
them per level by the valid ratios (Deformable DETR, LW-DETR, RF-DETR), 1 where one reference
serves every level (RT-DETR, D-FINE). :mod:`detr_viz.sampling` turns all of it into photo pixels.

Deformable encoders (Deformable DETR) record the same per token (S = sum h_l w_l, in sequence
order). RT-DETR's, RT-DETRv2's, D-FINE's and DEIMv2's (hybrid) encoders are dense (AIFI, a
plain transformer layer on one level, ``config.encode_proj_layers``): their softmax is
recomputed in a pre-hook from the query and key projections the module is about to make, as
:mod:`detr_viz.hf_capture` does, ``dense_encoder[i]`` (heads, S_l, S_l) for AIFI layer i.
LW-DETR, RF-DETR and DEIMv2's lite encoder have no transformer encoder.

Hooks return None (the forward is untouched: predictions are bit for bit those of a plain run),
exist only during :func:`capture_sampling`, are removed on any exit, and record only the calling
thread. Costs: ``benchmarks/deformable.py``.
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

# model_type -> (attribute of a decoder layer holding its deformable attention, how points are read)
FAMILIES = {"deformable_detr": ("encoder_attn", "child"), "rt_detr": ("encoder_attn", "child"),
            "lw_detr": ("cross_attn", "child"), "rf_detr": ("cross_attn", "child"),
            "rt_detr_v2": ("encoder_attn", "recompute"), "d_fine": ("encoder_attn", "recompute"),
            "deimv2": ("encoder_attn", "recompute")}


@dataclass(frozen=True, eq=False)
class SamplingStack:
    """Every layer of one stack of deformable attention, N queries (or tokens) each.

    ``locations`` (layers, N, heads, levels, points, 2) as the sampler read them (module
    docstring); ``weights`` (layers, N, heads, levels, points), each (layer, n, head) summing
    to 1 over its real points; ``references[i]`` (N, levels', 2 | 4): what layer i started from
    (a tuple: with box refinement and no two-stage Deformable DETR's layer 0 starts from points,
    the next layers from boxes). Detached CPU tensors in the model's dtype.
    ``points_per_level[l]``: real points per head on level l (the rest is padding);
    ``sampler``: "bilinear" (grid_sample) or "discrete" (one cell per point)."""

    locations: Tensor
    weights: Tensor
    references: tuple[Tensor, ...]
    points_per_level: tuple[int, ...]
    sampler: str = "bilinear"


@dataclass(frozen=True, eq=False)
class SamplingCapture:
    """One image through a deformable DETR: predictions and every sampling point.

    ``logits`` (Q, num_labels); ``probabilities`` = sigmoid(logits); ``boxes`` (Q, 4)
    ``pred_boxes``, normalised (cx, cy, w, h). ``input_size`` (W, H) of ``pixel_values``,
    padding included. ``spatial_shapes[l]`` = (h_l, w_l), finest first; ``level_start_index[l]``
    where level l starts in the flattened token sequence (each level row-major).
    ``decoder``, ``encoder`` (a deformable encoder's, when asked for). ``dense_encoder``: per
    AIFI layer (heads, S_l, S_l) softmax, rows the querying tokens of level ``dense_level``
    (row-major), or None. ``decoder_self``: per decoder layer, its self-attention softmax
    (heads, Q, Q), when asked for (``self_attention=True``)."""

    family: str
    logits: Tensor
    probabilities: Tensor
    boxes: Tensor
    input_size: tuple[int, int]
    spatial_shapes: tuple[tuple[int, int], ...]
    level_start_index: tuple[int, ...]
    decoder: SamplingStack
    encoder: SamplingStack | None = None
    dense_encoder: tuple[Tensor, ...] | None = None
    dense_level: int | None = None
    decoder_self: tuple[Tensor, ...] | None = None


@dataclass
class _Store:
    stacks: dict[str, dict[int, list]] = field(default_factory=lambda: {"decoder": {},
                                                                      "encoder": {}})
    dense: dict[int, Tensor] = field(default_factory=dict)
    decoder_self: dict[int, Tensor] = field(default_factory=dict)
    shapes: tuple[tuple[int, int], ...] = ()


def capture_sampling(model: nn.Module, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                     *, encoder: bool = False, self_attention: bool = False) -> SamplingCapture:
    """Run a transformers Deformable DETR, RT-DETR, RT-DETRv2, D-FINE, DEIMv2, LW-DETR or RF-DETR
    ``...ForObjectDetection`` once on ``pixel_values`` (1, 3, H, W) as its image processor
    makes them, in the model's dtype and device; ``pixel_mask`` (1, H, W), 1 on real pixels
    (None: no padding). ``encoder=True`` also records a deformable encoder's points (memory
    grows as S x heads x levels x points) and a dense encoder's softmax; ``self_attention``
    the decoder's self-attention softmax per layer (as for AIFI: recomputed in a pre-hook from
    the projections the module is about to make; what rollout needs). Returns a
    :class:`SamplingCapture` of detached CPU tensors in the model's dtype."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise ArgumentError(f"capture_sampling does not know model type {family!r}; it reads "
                            f"transformers' {', '.join(sorted(FAMILIES))} detectors.")
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[:2]) != (1, 3):
        raise ArgumentError(f"capture_sampling takes one RGB image (1, 3, H, W), not "
                            f"{tuple(pixel_values.shape)}.")
    store = _Store()
    extra = {} if pixel_mask is None else {"pixel_mask": pixel_mask}
    with _hooked(model, family, store, encoder, self_attention), torch.inference_mode():
        out = model(pixel_values=pixel_values, **extra)
    logits = out.logits[0].detach().cpu()
    decoder, deformable_encoder = _modules(model, family)
    levels = [i for i, _ in enumerate(store.shapes)]
    return SamplingCapture(
        family=family, logits=logits, probabilities=logits.sigmoid(),
        boxes=out.pred_boxes[0].detach().cpu(),
        input_size=(pixel_values.shape[3], pixel_values.shape[2]), spatial_shapes=store.shapes,
        level_start_index=tuple(int(sum(h * w for h, w in store.shapes[:i])) for i in levels),
        decoder=_stack(store.stacks["decoder"], decoder[0], len(levels)),
        encoder=(_stack(store.stacks["encoder"], deformable_encoder[0], len(levels))
                 if store.stacks["encoder"] else None),
        dense_encoder=tuple(store.dense[i] for i in sorted(store.dense)) if store.dense else None,
        dense_level=_dense_level(model) if store.dense else None,
        decoder_self=(tuple(store.decoder_self[i] for i in sorted(store.decoder_self))
                      if store.decoder_self else None),
    )


def _stack(layers: dict[int, list], module: nn.Module, levels: int) -> SamplingStack:
    order = sorted(layers)
    method = getattr(module, "method", getattr(module, "decoder_method", "default"))
    return SamplingStack(locations=torch.stack([layers[i][0] for i in order]),
                         weights=torch.stack([layers[i][1] for i in order]),
                         references=tuple(layers[i][2] for i in order),
                         points_per_level=tuple(int(n) for n in _counts(module, levels)),
                         sampler="discrete" if method == "discrete" else "bilinear")


def _counts(module: nn.Module, levels: int) -> list[int]:
    """Points per head on each level of ``module``."""
    counts = getattr(module, "n_points_list", getattr(module, "num_points_list", None))
    return list(counts) if counts else [module.n_points] * levels


def _dense_level(model: nn.Module) -> int:
    return int(model.config.encode_proj_layers[0])


def _modules(model: nn.Module, family: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """(decoder's deformable modules, deformable encoder's modules) in layer order."""
    attribute = FAMILIES[family][0]
    decoder = [getattr(layer, attribute) for layer in model.model.decoder.layers]
    encoder = ([layer.self_attn for layer in model.model.encoder.layers]
               if family == "deformable_detr" else [])
    return decoder, encoder


def _dense_modules(model: nn.Module, family: str) -> list[nn.Module]:
    if family not in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2"):
        return []
    aifis = getattr(model.model.encoder, "aifi", ())  # DEIMv2's lite encoder has none
    return [layer.self_attn for aifi in aifis for layer in aifi.layers]


def _copy(x: Tensor) -> Tensor:
    """Batch 0 of ``x``, detached, on the CPU, in storage the model can no longer touch."""
    return x[0].detach().to("cpu", copy=True)


def _padded(x: Tensor, counts: list[int], fill: float) -> Tensor:
    """(B, N, heads, sum(counts), ...) -> (B, N, heads, levels, max(counts), ...), ``fill`` on
    the slots a level does not have."""
    most = max(counts)
    parts = []
    for part in x.split(counts, dim=3):
        pad = part.new_full((*part.shape[:3], most - part.shape[3], *part.shape[4:]), fill)
        parts.append(torch.cat([part, pad], dim=3))
    return torch.stack(parts, dim=3)


def _recomputed_locations(module: nn.Module, bound: dict) -> Tensor:
    """RT-DETRv2's, D-FINE's and DEIMv2's sampling locations (B, N, heads, sum points, 2), as their
    forward computes them from the same inputs (box references only: their decoders give
    nothing else)."""
    hidden, reference = bound["hidden_states"], bound["reference_points"]
    if bound.get("position_embeddings") is not None:  # RT-DETRv2 adds them inside
        hidden = hidden + bound["position_embeddings"]
    if reference.shape[-1] != 4:
        raise ArgumentError("RT-DETRv2 and D-FINE sampling points are read for box references "
                            f"only, not {reference.shape[-1]}-wide ones.")
    batch, count = hidden.shape[:2]
    scale = getattr(module, "n_points_scale", getattr(module, "num_points_scale", None))
    offsets = module.sampling_offsets(hidden).reshape(batch, count, module.n_heads, -1, 2)
    offset = (offsets * scale.to(dtype=hidden.dtype).unsqueeze(-1)
              * reference[:, :, None, :, 2:] * module.offset_scale)
    return reference[:, :, None, :, :2] + offset


@contextmanager
def _hooked(model: nn.Module, family: str, store: _Store, encoder: bool,
            self_attention: bool = False) -> Iterator[None]:
    owner = threading.get_ident()
    decoder, deformable_encoder = _modules(model, family)
    targets = [("decoder", i, m) for i, m in enumerate(decoder)]
    if encoder:
        targets += [("encoder", i, m) for i, m in enumerate(deformable_encoder)]
    handles = []
    try:
        for part, index, module in targets:
            handles += _hook_deformable(module, FAMILIES[family][1], store, part, index, owner)
        for index, module in enumerate(_dense_modules(model, family) if encoder else []):
            handles.append(module.register_forward_pre_hook(
                _dense_hook(store.dense, index, owner), with_kwargs=True))
        selves = [layer.self_attn for layer in model.model.decoder.layers] if self_attention \
            else []
        for index, module in enumerate(selves):
            handles.append(module.register_forward_pre_hook(
                _dense_hook(store.decoder_self, index, owner), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook_deformable(module, how, store, part, index, owner) -> list:
    """Hooks recording one deformable module's [locations, weights, reference] (batch 0)."""
    signature = inspect.signature(module.forward)
    slot = store.stacks[part]

    # Another thread's forward may call these hooks half registered or half removed, without
    # their kwargs (torch keeps the with_kwargs flag in a second dict): the owner check comes
    # first, and the signatures take what they are given.
    def module_in(mod, args, *rest):
        if threading.get_ident() == owner:
            bound = signature.bind(*args, **rest[0]).arguments
            slot[index] = [None, None, _copy(bound["reference_points"])]
            store.shapes = tuple((int(h), int(w)) for h, w in bound["spatial_shapes_list"])

    if how == "child":
        child = inspect.signature(module.attn.forward)

        def sampler_in(mod, args, *rest):
            if threading.get_ident() == owner:
                bound = child.bind(*args, **rest[0]).arguments
                slot[index][:2] = [_copy(bound["sampling_locations"]),
                                   _copy(bound["attention_weights"])]

        return [module.register_forward_pre_hook(module_in, with_kwargs=True),
                module.attn.register_forward_pre_hook(sampler_in, with_kwargs=True)]

    def module_out(mod, args, *rest):
        if threading.get_ident() == owner:
            kwargs, output = rest
            bound = signature.bind(*args, **kwargs).arguments
            counts = _counts(mod, len(store.shapes))
            locations = _recomputed_locations(mod, bound)
            slot[index][:2] = [_copy(_padded(locations, counts, float("nan"))),
                               _copy(_padded(output[1], counts, 0.0))]

    return [module.register_forward_pre_hook(module_in, with_kwargs=True),
            module.register_forward_hook(module_out, with_kwargs=True)]


def _dense_hook(target: dict[int, Tensor], index: int, owner: int):
    """A pre-hook recording a plain self-attention's softmax (heads, L, L) into
    ``target[index]`` (AIFI, a decoder's self-attention), as the eager attention computes it
    from the same projections (position embeddings added to queries and keys)."""

    signature = None

    def hook(module, args, *rest):  # rest: (kwargs,), or () in another thread (see above)
        nonlocal signature
        if threading.get_ident() != owner:
            return
        signature = signature or inspect.signature(module.forward)
        bound = signature.bind(*args, **rest[0]).arguments
        hidden, position = bound["hidden_states"], bound.get("position_embeddings")
        given = hidden + position if position is not None else hidden
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        query = module.q_proj(given).view(shape).transpose(1, 2)  # (B, heads, S, d)
        key = module.k_proj(given).view(shape).transpose(1, 2)
        logits = torch.matmul(query, key.transpose(2, 3)) * module.scaling
        if bound.get("attention_mask") is not None:
            logits = logits + bound["attention_mask"]
        target[index] = _copy(logits.softmax(dim=-1))

    return hook
