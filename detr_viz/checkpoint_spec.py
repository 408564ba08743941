"""Describe a DETR checkpoint of any size from its own files: shapes, its record, the user.

Shapes tell the number of classes and queries, the hidden and feed-forward sizes, the number of
encoder and decoder layers and the backbone depth. What shapes cannot tell (the number of heads,
DC5 dilation) comes from the checkpoint's own record (a DETR training checkpoint's ``args``, an
``argparse.Namespace``; a Hugging Face ``config.json``), else from the caller, else a stated
default that the record lists in ``ModelSpec.assumed``. Class names: the caller's labels, else
``id2label``, else COCO's for a 91-class head, else ``"class 7"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from detr_viz.coco import COCO_CLASSES
from detr_viz.errors import NotADetrCheckpointError, WrongVariantError
from detr_viz.labels import Labels, default_labels, read_labels
from detr_viz.spec import ModelSpec

DEFAULT_HEADS = 8  # DETR's default --nheads
_BLOCKS = {6: "resnet50", 23: "resnet101"}  # bottleneck blocks in layer3
_SEGMENTATION = ("bbox_attention.", "mask_head.")  # DETRsegm's heads, on top of "detr."


def detection_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without ``num_batches_tracked``; a segmentation DETR (DETRsegm: ``detr.*``
    plus mask heads) gives its detector, which is all detr-viz explains."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if "detr.class_embed.weight" in state:
        state = {k.removeprefix("detr."): v for k, v in state.items()
                 if k.startswith("detr.") and not k.startswith(_SEGMENTATION)}
    return state


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def detr_spec(
    state: Mapping[str, Tensor],
    *,
    name: str,
    source: str,
    record: Mapping[str, Any] | None = None,
    heads: int | None = None,
    dilation: bool | None = None,
    labels: Labels | None = None,
    record_labels: tuple[str, ...] | None = None,
) -> ModelSpec:
    """The :class:`ModelSpec` of a DETR state dict under the official key names.

    ``record``: what the checkpoint says of itself, as DETR's ``args`` fields (``nheads``,
    ``dilation``, ``backbone``, ``pre_norm``, ``position_embedding``); ``heads`` and
    ``dilation``: the caller's values, which must agree with the record; ``labels``: see
    :func:`detr_viz.labels.read_labels`; ``record_labels``: names the checkpoint carries.
    Raises :class:`NotADetrCheckpointError` (no DETR heads) or :class:`WrongVariantError`
    (a DETR that detr-viz cannot rebuild, saying why).
    """
    record = dict(record or {})
    if not {"class_embed.weight", "query_embed.weight"} <= state.keys():
        raise NotADetrCheckpointError(
            f"{source} is not a DETR checkpoint: it has no class_embed.weight and "
            "query_embed.weight (keys such as " + ", ".join(list(state)[:3]) + ").")
    _refuse_unsupported(state, record, source)
    num_queries, d_model = state["query_embed.weight"].shape
    layers = {part: _count(state, f"transformer.{part}.layers.") for part in ("encoder", "decoder")}
    if not all(layers.values()) or "transformer.encoder.layers.0.linear1.weight" not in state:
        raise NotADetrCheckpointError(f"{source} has DETR's heads but no transformer layers "
                                      "(transformer.encoder.layers.0...).")
    assumed: list[str] = []
    heads = _pick("heads", heads, record.get("nheads"), DEFAULT_HEADS, source, assumed)
    dilation = bool(_pick("DC5 dilation", dilation, record.get("dilation"), False, source,
                          assumed))
    num_classes = state["class_embed.weight"].shape[0] - 1
    if labels is not None:
        names = read_labels(labels, num_classes)
    elif record_labels is not None:
        names = read_labels(list(record_labels), num_classes, f"{source}'s own labels")
    elif num_classes == len(COCO_CLASSES):
        names = COCO_CLASSES
        assumed.append("COCO class names (91 classes; give a labels file if they are others)")
    else:
        names = default_labels(num_classes)
    return ModelSpec(
        family="detr", backbone=_backbone(state, record, source), dilation=dilation,
        num_classes=num_classes, num_queries=num_queries, encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"], heads=heads, d_model=d_model,
        ffn_dim=state["transformer.encoder.layers.0.linear1.weight"].shape[0], labels=names,
        name=name, source=source, official=False, assumed=tuple(assumed),
    )


def _pick(what: str, given: Any, recorded: Any, default: Any, source: str,
          assumed: list[str]) -> Any:
    if recorded is not None and given is not None and given != recorded:
        raise WrongVariantError(f"{source} was trained with {what} = {recorded!r} (its own "
                                f"record says so), not {given!r}; leave that setting empty.")
    if recorded is not None:
        return recorded
    if given is not None:
        return given
    shown = f"{default} heads" if what == "heads" else f"no {what}"
    assumed.append(f"{shown} (the checkpoint does not record it)")
    return default


def _backbone(state: Mapping[str, Tensor], record: Mapping[str, Any], source: str) -> str:
    blocks = _count(state, "backbone.0.body.layer3.")
    if "backbone.0.body.layer3.0.conv3.weight" not in state or blocks not in _BLOCKS:
        raise WrongVariantError(
            f"{source} has a backbone detr-viz cannot rebuild ({blocks} blocks in layer3, "
            "bottleneck: " + str("backbone.0.body.layer3.0.conv3.weight" in state) + "); "
            "supported are ResNet-50 and ResNet-101.")
    backbone = _BLOCKS[blocks]
    said = record.get("backbone")
    if said is not None and said != backbone:
        raise WrongVariantError(f"{source} says its backbone is {said}, but its tensors are a "
                                f"{backbone}'s; the file is damaged or was edited.")
    return backbone


def _refuse_unsupported(state: Mapping[str, Tensor], record: Mapping[str, Any],
                        source: str) -> None:
    why = []
    if record.get("pre_norm") or "transformer.encoder.norm.weight" in state:
        why.append("it is a pre-norm DETR (--pre_norm)")
    if record.get("position_embedding") in ("learned", "v3") or "backbone.1.row_embed.weight" \
            in state:
        why.append("it uses learned position embeddings (--position_embedding learned)")
    if why:
        raise WrongVariantError(f"{source} is a DETR that detr-viz cannot rebuild yet: "
                                + "; ".join(why) + ". Supported: post-norm DETR with sine "
                                "position encoding (the DETR repository's defaults).")
