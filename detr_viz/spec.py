"""What a checkpoint is: one typed record, read once, carried by the model and its analyses.

    spec = model.spec                     # ModelSpec(family="detr", backbone="resnet50", ...)
    spec.stride, spec.labels[7], spec.title

A released COCO DETR is :func:`official_spec`; any other checkpoint (fine-tuned DETR, another
family) is described by :mod:`detr_viz.checkpoint_spec` from its own files. Nothing downstream
re-derives the family, sizes or class names from a variant string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from detr_viz.coco import COCO_CLASSES
from detr_viz.errors import ArgumentError

FAMILIES = {"detr": "DETR", "conditional_detr": "Conditional DETR", "dab_detr": "DAB-DETR",
            "deformable_detr": "Deformable DETR", "rt_detr": "RT-DETR", "rt_detr_v2": "RT-DETRv2",
            "d_fine": "D-FINE", "deimv2": "DEIMv2", "lw_detr": "LW-DETR", "rf_detr": "RF-DETR"}
# deformable families: sampling points instead of dense attention (detr_viz.deformable)
SAMPLING_FAMILIES = frozenset({"deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "deimv2",
                               "lw_detr", "rf_detr"})
BACKBONES = {"resnet50": "R50", "resnet101": "R101"}
OFFICIAL_SHORT = {"detr_resnet50": "R50", "detr_resnet50_dc5": "R50-DC5",
                  "detr_resnet101": "R101", "detr_resnet101_dc5": "R101-DC5"}


@dataclass(frozen=True)
class ModelSpec:
    """One detector checkpoint: family, architecture sizes, class names, and where it came from.

    ``labels[i]`` names the classifier's output ``i`` (``len(labels) == num_classes``; DETR's
    extra "no object" output is not a class). ``assumed`` lists what the checkpoint did not
    record and a default filled in (e.g. ``"8 heads"``), so a page can say so.
    """

    family: str = "detr"  # a key of FAMILIES
    backbone: str = "resnet50"  # torchvision ResNet name
    dilation: bool = False  # DC5: last stage dilated, stride 16
    num_classes: int = 91
    num_queries: int = 100
    encoder_layers: int = 6
    decoder_layers: int = 6
    heads: int = 8
    d_model: int = 256
    ffn_dim: int = 2048
    labels: tuple[str, ...] = COCO_CLASSES
    name: str = "detr_resnet50"  # official variant name, or the checkpoint's file/folder name
    source: str = ""  # the checkpoint's path ("" for a model built from scratch)
    official: bool = True  # one of the four released COCO DETR architectures
    assumed: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ArgumentError(f"Unknown family {self.family!r}; one of {', '.join(FAMILIES)}.")
        if len(self.labels) != self.num_classes:
            raise ArgumentError(f"{len(self.labels)} labels for {self.num_classes} classes.")
        if self.d_model % self.heads:
            raise ArgumentError(f"hidden size {self.d_model} is not divisible by {self.heads} "
                                "heads; give the number of heads the model was trained with.")

    @property
    def stride(self) -> int:
        """Input pixels per feature cell: 32, or 16 with DC5."""
        return 16 if self.dilation else 32

    @property
    def short(self) -> str:
        """A few characters for titles and legends: ``"R50-DC5"``, ``"my-model"``."""
        return OFFICIAL_SHORT.get(self.name, self.name) if self.official else self.name

    @property
    def architecture(self) -> str:
        """``"DETR R50-DC5"``, ``"Conditional DETR R101"``."""
        dc5 = "-DC5" if self.dilation else ""
        return f"{FAMILIES[self.family]} {BACKBONES.get(self.backbone, self.backbone)}{dc5}"

    @property
    def title(self) -> str:
        """One line for a model picker: name, family and backbone, classes, queries, layers."""
        if self.official:
            return f"{self.short} (official COCO {self.architecture})"
        return (f"{self.name} ({self.architecture}, {self.num_classes} classes, "
                f"{self.num_queries} queries, {self.encoder_layers}+{self.decoder_layers} "
                f"layers x {self.heads} heads)")


def official_spec(variant: str) -> ModelSpec:
    """The record of a released COCO DETR (``"detr_resnet50"``, ..., ``"detr_resnet101_dc5"``)."""
    from detr_viz.model import get_variant  # the variant table lives with the model

    v = get_variant(variant)
    return ModelSpec(backbone=v.backbone, dilation=v.dilation, name=v.name)


def class_name(labels: tuple[str, ...], index: int) -> str:
    """``labels[index]``, or ``"class 7"`` for an index without a name."""
    return labels[index] if 0 <= index < len(labels) and labels[index] else f"class {index}"
