"""Re-run a family from transformers' code on changed encoder tokens, without its backbone.

    inputs = record_inputs(...)          # during analyze: the tokens and the backbone's output
    logits = hf_replay(model, analysis, [src_a, src_b])      # (2, Q, C), as the model gives them

What :mod:`detr_viz.replay` does for detr-viz's DETR, for Conditional DETR and DAB-DETR: token
deletion and insertion (:mod:`detr_viz.faithfulness`) replace the encoder tokens (the input
projection's output) and run the transformer again. The backbone never runs again: the replay
uses a private copy of the model (:func:`replay_copy`, made once per analysed model and kept)
whose backbone returns the output recorded during the analysis, and the copy's input projection
returns the given tokens. The shared model is never changed, so other users of it (the page's
other sessions) are not affected.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class HFInputs:
    """What a transformers family's transformer was given for one image (batch 1).

    ``src`` (1, d, h, w): the input projection's output, the encoder tokens; ``mask``
    (1, h, w) bool, True on padding cells; ``backbone``: the backbone module's output as it
    returned it (tensors on the CPU), which :func:`hf_replay` hands back instead of running it.
    """

    src: Tensor
    mask: Tensor
    backbone: Any


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


def _cpu(value: Any) -> Any:
    return _to(value, torch.device("cpu")) if not isinstance(value, Tensor) else \
        value.detach().cpu()


@contextmanager
def record_inputs(model: nn.Module, store: dict) -> Iterator[None]:
    """Inside: the next forward of ``model`` (transformers' model) in this thread records its
    backbone's output and its input projection's output in ``store`` ("backbone", "src")."""
    owner = threading.get_ident()
    inner = model.model

    def keep(name):
        def hook(module, args, out):
            if threading.get_ident() == owner:
                store[name] = _cpu(out) if name == "backbone" else out.detach().cpu()
        return hook

    handles = [inner.backbone.register_forward_hook(keep("backbone")),
               inner.input_projection.register_forward_hook(keep("src"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Recorded(nn.Module):
    """A module that returns what it is told to (``output``): what the real backbone returned
    for the analysed image, or the tokens a replay puts in."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args, **kwargs):
        return self.output


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def replay_copy(model: nn.Module, paths: tuple[str, ...] = ("model.backbone",)
                ) -> tuple[nn.Module, threading.Lock]:
    """A copy of transformers' ``model`` sharing its parameters' values but not its modules,
    the submodules at ``paths`` (dotted names, ``model.get_submodule``'s) each replaced by a
    :class:`_Recorded` whose output the caller sets (made once per model: a model has one set
    of paths), and the lock that serialises its use."""
    with _LOCK:
        if model not in _COPIES:
            memo = {id(model.get_submodule(path)): _Recorded() for path in paths}
            for t in (*model.parameters(), *model.buffers()):  # shared: no second copy
                memo[id(t)] = t
            _COPIES[model] = (copy.deepcopy(model, memo), threading.Lock())
        return _COPIES[model]


def hf_replay(model: nn.Module, pixels: Tensor, inputs: HFInputs,
              sources: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(logits (n, Q, C), boxes (n, Q, 4)) of transformers' ``model`` with the encoder tokens
    replaced by each of ``sources`` ((d, h, w) each, the shape of ``inputs.src[0]``); run on
    the model's device, returned on the CPU. ``pixels``: the analysed input (only its shape and
    padding are used: the backbone is not run)."""
    work, lock = replay_copy(model)
    device = next(model.parameters()).device
    logits, boxes = [], []
    with lock, torch.inference_mode():
        work.model.backbone.output = _to(inputs.backbone, device)
        current: dict[str, Tensor] = {}
        handle = work.model.input_projection.register_forward_hook(
            lambda module, args, out: current["src"].to(out.device, out.dtype))
        try:
            for src in sources:
                if src.shape != inputs.src.shape[1:]:
                    raise ValueError(f"src must be {tuple(inputs.src.shape[1:])}, not "
                                     f"{tuple(src.shape)}")
                current["src"] = src[None]
                out = work(pixel_values=pixels.to(device, next(work.parameters()).dtype))
                logits.append(out.logits[0].cpu())
                boxes.append(out.pred_boxes[0].cpu())
        finally:
            handle.remove()
            work.model.backbone.output = None
    return torch.stack(logits), torch.stack(boxes)
