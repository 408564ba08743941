"""One model interface for every family: describe and vet a checkpoint, load it, run it once.

    spec = describe_family(folder)            # ModelSpec, from config.json alone
    model = load_family(folder)               # a Detector: .spec, .stride, forward -> logits, boxes
    analysis = analyze(model, photo)          # the same Analysis record as for DETR

DETR is detr-viz's own model (:mod:`detr_viz.model`, loaded by :mod:`detr_viz.weights`).
Conditional DETR and DAB-DETR run in transformers' code (imported only when one is loaded),
wrapped in :class:`HFDetector`, and are captured exactly by :mod:`detr_viz.hf_capture`. The page
and the methods never ask which family they hold: they read the :class:`~detr_viz.spec.ModelSpec`
and the :class:`~detr_viz.analysis.Analysis`, and methods that cannot run on a family say why
(:meth:`detr_viz.methods.Method.unavailable`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detr_viz.analysis import Analysis, _frozen
from detr_viz.deformable import DEFORMABLE, describe_deformable, load_deformable
from detr_viz.errors import WrongVariantError
from detr_viz.geometry import FeatureGrid
from detr_viz.hf_capture import capture_hf
from detr_viz.hf_checkpoint import import_transformers
from detr_viz.hf_families import FAMILIES, open_hf_family, read_family_config
from detr_viz.hf_replay import HFInputs, record_inputs
from detr_viz.image import ModelInput
from detr_viz.labels import Labels, config_names
from detr_viz.spec import ModelSpec


def hf_family_of(path: str | os.PathLike[str]) -> str | None:
    """The transformers ``model_type`` of the checkpoint folder (or file in one) at ``path``
    if it is a family run in transformers' code (``"conditional_detr"``, ``"dab-detr"``);
    else None (DETR, another model, no or unreadable config.json: the DETR path reports it)."""
    path = Path(path).expanduser()
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in FAMILIES or model_type in DEFORMABLE else None


def describe_family(path: str | os.PathLike[str], *, labels: Labels | None = None,
                    heads: int | None = None, dilation: bool | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a Conditional DETR or DAB-DETR checkpoint, from config.json;
    ``heads`` and ``dilation`` (what a DETR checkpoint may not record) must agree with it.
    Deformable families: :func:`detr_viz.deformable.describe_deformable`."""
    if hf_family_of(path) in DEFORMABLE:
        _no_settings(path, heads, dilation)
        return describe_deformable(path, labels=labels)
    return _spec(path, _read_config(path), labels, heads, dilation)


def _read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The vetted config.json of the checkpoint folder (or a file in it) at ``path``."""
    path = Path(path).expanduser()
    return read_family_config(path.parent if path.is_file() else path)


def _spec(path: str | os.PathLike[str], config: dict[str, Any], labels: Labels | None,
          heads: int | None, dilation: bool | None) -> ModelSpec:
    """describe_family's answer from the config.json it read."""
    info = open_hf_family(path, config)
    dc5 = info.stride == 16
    for what, given, recorded in (("heads", heads, info.encoder_heads),
                                  ("DC5 dilation", dilation, dc5)):
        if given is not None and given != recorded:
            raise WrongVariantError(f"{info.folder} was trained with {what} = {recorded!r} (its "
                                    f"config.json says so), not {given!r}; leave that setting "
                                    "empty.")
    if info.decoder_heads != info.encoder_heads:
        raise WrongVariantError(f"{info.folder}: encoder and decoder heads differ "
                                f"({info.encoder_heads} and {info.decoder_heads}); detr-viz "
                                "shows one head count per model.")
    names = config_names(info.labels, labels)
    from detr_viz.weights import checkpoint_name  # weights imports this module lazily too

    return ModelSpec(
        family=FAMILIES[config["model_type"]][0], backbone=info.backbone.removeprefix("timm "),
        dilation=dc5, num_classes=info.num_labels, num_queries=info.num_queries,
        encoder_layers=info.encoder_layers, decoder_layers=info.decoder_layers,
        heads=info.encoder_heads, d_model=info.d_model,
        ffn_dim=int(config.get("encoder_ffn_dim", 2048)), labels=names,
        name=checkpoint_name(info.folder), source=str(path), official=False)


def _no_settings(path, heads: int | None, dilation: bool | None) -> None:
    """Deformable checkpoints record their heads and strides: nothing to set."""
    if heads is not None or dilation:
        raise WrongVariantError(f"{path} records its heads and feature levels in config.json; "
                                "leave heads and DC5 empty.")


class HFDetector(nn.Module):
    """A transformers Conditional DETR or DAB-DETR with its :class:`ModelSpec`.

    ``forward(pixel_values (B, 3, H, W))`` returns ``pred_logits`` (B, Q, C): raw class
    logits, one sigmoid per class (no "no object" output), and ``pred_boxes`` (B, Q, 4)
    normalised cxcywh, as transformers computes them.
    """

    def __init__(self, hf: nn.Module, spec: ModelSpec):
        super().__init__()
        self.hf, self.spec = hf, spec

    @property
    def stride(self) -> int:
        return self.spec.stride

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        out = self.hf(pixel_values=pixel_values)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}


def load_family(path: str | os.PathLike[str], *, labels: Labels | None = None,
                heads: int | None = None, dilation: bool | None = None,
                dtype: torch.dtype = torch.float32) -> HFDetector:
    """The checkpoint at ``path`` as an :class:`HFDetector` (CPU, eval mode, no gradients);
    a deformable family's as a :class:`~detr_viz.deformable.DeformableDetector`."""
    if hf_family_of(path) in DEFORMABLE:
        _no_settings(path, heads, dilation)
        return load_deformable(path, labels=labels, dtype=dtype)
    config = _read_config(path)  # read once: the spec and the model agree
    spec = _spec(path, config, labels, heads, dilation)
    import_transformers(spec.architecture)  # what load_hf_family imports, checked here
    from detr_viz.hf_families import load_hf_family

    model = load_hf_family(path, dtype=dtype, config=config)
    return HFDetector(model, spec).eval().requires_grad_(False)


def analyze_hf(model: HFDetector, model_input: ModelInput) -> Analysis:
    """One captured forward of ``model`` on ``model_input`` as an :class:`Analysis` (see
    :func:`detr_viz.analysis.analyze`): sigmoid probabilities, the encoder tokens and the
    backbone's output for replays (:mod:`detr_viz.hf_replay`), the content and spatial terms
    of the cross-attention, DAB-DETR's anchors per layer."""
    weight = next(model.parameters())
    recorded: dict = {}
    with record_inputs(model.hf, recorded):
        cap = capture_hf(model.hf, model_input.tensor.to(weight.device, weight.dtype))
    grid = FeatureGrid(original_size=model_input.original_size,
                       input_size=model_input.input_size, shape=cap.grid, stride=model.stride)
    return Analysis(
        spec=model.spec, grid=grid, probabilities=_frozen(cap.probabilities.numpy()),
        boxes=_frozen(cap.boxes.numpy()), encoder=cap.encoder, decoder=cap.decoder,
        decoder_self=cap.decoder_self,
        inputs=HFInputs(recorded["src"], cap.padding[None].clone(), recorded["backbone"]),
        terms={"content": cap.content, "spatial": cap.spatial},
        anchors=None if cap.anchors is None else _frozen(np.asarray(cap.anchors.numpy())),
        reference_points=None if cap.reference_points is None else _frozen(
            cap.reference_points.numpy()),
        pixels=model_input.tensor.detach().cpu(),
    )
