"""Re-run a deformable detector on changed multi-level tokens, without its backbone.

    with record_tokens(model.hf, store): ...        # during analyze: the tokens, per level
    inputs = tokens_from(store, pixel_values, pixel_mask)
    logits = deformable_replay(model.hf, inputs, [levels_a, levels_b])   # (2, Q, C) raw logits

What :mod:`detr_viz.hf_replay` does for the dense families, for the seven deformable ones.
**The tokens** are what the transformer is given, one (C, h_l, w_l) map per feature level: the
input projections' outputs where the family has them (Deformable DETR's ``input_proj``, its
extra coarse levels included; RT-DETR's, RT-DETRv2's and D-FINE's ``encoder_input_proj``),
else the module that hands the transformer its levels (DEIMv2's ``conv_encoder``, LW-DETR's and
RF-DETR's ``backbone``, their projector included). Token deletion and insertion
(:mod:`detr_viz.faithfulness`) replace them and run the encoder and decoder again.

The backbone never runs again. The replay uses a private copy of the model (sharing its
parameters, made once per model) in which the backbone returns a stand-in of its recorded
output: the same structure, its masks, and in place of each feature map a zero tensor of its
shape expanded (no memory; the family reads only its shape, as the projections that would read
its values return the given tokens). The input pixels are likewise a shape only. The shared
model is never changed or hooked, so the page's other sessions are not affected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detr_viz.hf_replay import replay_copy

# model_type -> (the module whose output feeds the transformer, the per-level projections
# after it that make the tokens; None: that module's feature maps are the tokens)
SITES = {"deformable_detr": ("model.backbone", "model.input_proj"),
         "rt_detr": ("model.backbone", "model.encoder_input_proj"),
         "rt_detr_v2": ("model.backbone", "model.encoder_input_proj"),
         "d_fine": ("model.backbone", "model.encoder_input_proj"),
         "deimv2": ("model.conv_encoder", None),
         "lw_detr": ("model.backbone", None),
         "rf_detr": ("model.backbone", None)}


@dataclass(frozen=True)
class _Shape:
    """A recorded feature map the replay gives back as a shape only (zeros, expanded)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Slot:
    """Where token level ``level`` goes in the recorded output."""

    level: int


@dataclass(frozen=True, eq=False)
class DeformableInputs:
    """What one image (batch 1) gave a deformable detector's transformer.

    ``tokens[l]`` (1, C, h_l, w_l): level l's tokens, finest first (CPU, the model's dtype);
    ``site``: the output of the module before them (:data:`SITES`), feature maps replaced by
    :class:`_Shape` (or by :class:`_Slot`, where they are the tokens); ``pixel_shape`` (1, 3,
    H, W): the model input, padding included; ``pixel_mask`` (1, H, W) bool, True on the
    photo, or None where the input has no padding."""

    tokens: tuple[Tensor, ...]
    site: Any
    pixel_shape: tuple[int, int, int, int]
    pixel_mask: Tensor | None

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(t.shape[2]), int(t.shape[3])) for t in self.tokens)


def _is_map(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 4


def _recorded(value: Any, tokens: list[Tensor] | None) -> Any:
    """``value`` with its feature maps as shapes, or (``tokens`` given) as slots, the maps
    appended to ``tokens``; masks and anything else kept (detached, on the CPU)."""
    if _is_map(value):
        if tokens is None:
            return _Shape(tuple(value.shape), value.dtype)
        tokens.append(value.detach().cpu())
        return _Slot(len(tokens) - 1)
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, list | tuple):
        return type(value)(_recorded(v, tokens) for v in value)
    return value


def _rebuilt(value: Any, batch: int, tokens: Sequence[Tensor], device: torch.device) -> Any:
    """The recorded ``value`` for ``batch`` images: shapes as expanded zeros, slots filled."""
    if isinstance(value, _Shape):
        return torch.zeros((), dtype=value.dtype, device=device).expand(batch, *value.shape[1:])
    if isinstance(value, _Slot):
        return tokens[value.level]
    if isinstance(value, Tensor):
        return value.to(device).expand(batch, *value.shape[1:])
    if isinstance(value, list | tuple):
        return type(value)(_rebuilt(v, batch, tokens, device) for v in value)
    return value


@contextmanager
def record_tokens(model: nn.Module, store: dict) -> Iterator[None]:
    """Inside: the next forward of transformers' deformable ``model`` in this thread records
    in ``store`` its tokens ("tokens", a list by level) and the site's output ("site")."""
    site_path, projections = SITES[model.config.model_type]
    owner = threading.get_ident()
    mine = lambda: threading.get_ident() == owner  # noqa: E731

    def site_hook(module, args, out):
        if mine():
            if projections is None:
                store["tokens"] = []
            store["site"] = _recorded(out, store.get("tokens") if projections is None else None)

    def projection_hook(level):
        def hook(module, args, out):
            if mine():
                store.setdefault("by_level", {})[level] = out.detach().cpu()
        return hook

    handles = [model.get_submodule(site_path).register_forward_hook(site_hook)]
    if projections is not None:
        handles += [p.register_forward_hook(projection_hook(i))
                    for i, p in enumerate(model.get_submodule(projections))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if "by_level" in store:
        by_level = store.pop("by_level")
        store["tokens"] = [by_level[i] for i in sorted(by_level)]


def tokens_from(store: dict, pixel_values: Tensor, pixel_mask: Tensor | None
                ) -> DeformableInputs:
    """The :class:`DeformableInputs` of a forward recorded by :func:`record_tokens`."""
    mask = None if pixel_mask is None or bool(pixel_mask.all()) else pixel_mask.detach().bool()
    return DeformableInputs(tuple(store["tokens"]), store["site"], tuple(pixel_values.shape),
                            None if mask is None else mask.cpu())


def _paths(model: nn.Module) -> tuple[str, ...]:
    site, projections = SITES[model.config.model_type]
    if projections is None:
        return (site,)
    return (site, *(f"{projections}.{i}" for i in range(len(model.get_submodule(projections)))))


def deformable_replay(model: nn.Module, inputs: DeformableInputs,
                      sources: Sequence[Sequence[Tensor]]) -> Tensor:
    """Raw class logits (n, Q, C) of transformers' deformable ``model`` with its tokens
    replaced by each of ``sources`` (per level (C, h_l, w_l), the shapes of ``inputs.tokens``),
    all in one batch on the model's device; returned on the CPU."""
    if not sources:
        raise ValueError("no sources to replay")
    for levels in sources:
        if len(levels) != len(inputs.tokens) or any(
                tuple(t.shape) != tuple(r.shape[1:])
                for t, r in zip(levels, inputs.tokens, strict=True)):
            raise ValueError(f"sources must be {len(inputs.tokens)} levels of shapes "
                             f"{[tuple(r.shape[1:]) for r in inputs.tokens]}")
    paths = _paths(model)
    work, lock = replay_copy(model, paths)
    weight = next(model.parameters())
    device, dtype, batch = weight.device, weight.dtype, len(sources)
    tokens = [torch.stack([levels[i] for levels in sources]).to(device, dtype)
              for i in range(len(inputs.tokens))]
    pixels = torch.zeros((), dtype=dtype, device=device).expand(batch, *inputs.pixel_shape[1:])
    extra = {} if inputs.pixel_mask is None else {
        "pixel_mask": inputs.pixel_mask.to(device).expand(batch, -1, -1)}
    stand_ins = [work.get_submodule(path) for path in paths]
    with lock, torch.inference_mode():
        stand_ins[0].output = _rebuilt(inputs.site, batch, tokens, device)
        for stand_in, level in zip(stand_ins[1:], tokens, strict=False):
            stand_in.output = level
        try:
            return work(pixel_values=pixels, **extra).logits.cpu()
        finally:
            for stand_in in stand_ins:
                stand_in.output = None
