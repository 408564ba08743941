"""One forward pass of DETR on one photo, kept as an immutable record to explore.

    analysis = analyze(model, "photo.heic")
    for det in analysis.detections(0.9):
        heatmap = analysis.decoder_attention(det.query)           # (h, w)
    around = analysis.encoder_attention((640, 480), layer=-1)     # (h, w), point in photo pixels

Everything a slider or a click needs is a cheap function of the record: the model never runs
again for another threshold, layer, head or reference point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from detr_viz.capture import AttentionFactors, TransformerInputs, capture
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid
from detr_viz.hf_replay import HFInputs
from detr_viz.image import load_image, preprocess
from detr_viz.matching import BoxMatch, match_box
from detr_viz.model import DETR
from detr_viz.spec import SAMPLING_FAMILIES, ModelSpec, class_name

Direction = Literal["incoming", "outgoing"]
INCOMING: Direction = "incoming"  # what looks at the point: the column (the notebook's reading)
OUTGOING: Direction = "outgoing"  # where the point looks: the row, sums to 1


def check_direction(direction: Direction) -> Direction:
    """``direction`` if it is :data:`INCOMING` or :data:`OUTGOING`; else an ArgumentError."""
    if direction not in (INCOMING, OUTGOING):
        raise ArgumentError(f"direction must be {INCOMING!r} or {OUTGOING!r}, not {direction!r}.")
    return direction


@dataclass(frozen=True)
class Detection:
    """One kept object query. ``box`` is (x0, y0, x1, y1) in original-image pixels."""

    query: int
    label: int
    name: str
    score: float
    box: tuple[float, float, float, float]


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Analysis:
    """A detector's predictions and attention for one image.

    ``spec``: the checkpoint (family, sizes, class names); Q queries and C classes below are
    ``spec.num_queries`` and ``spec.num_classes`` (100 and 91 for the released DETRs).
    ``probabilities``: (Q, C) float32 class probabilities (DETR: the softmax over the C + 1
    outputs without "no object");
    ``boxes``: (Q, 4) float32 normalised (cx, cy, w, h) relative to the image;
    ``encoder`` / ``decoder`` / ``decoder_self``: per layer, the exact attention factors of one
    image: encoder self-attention (h * w cells), decoder cross-attention (Q queries over the
    cells) and decoder self-attention (Q x Q);
    ``inputs``: what the transformer was given (CNN features after ``input_proj``, padding mask,
    position encoding), so that explanation methods can re-run it without the backbone; for
    families run in transformers' code, an :class:`~detr_viz.hf_replay.HFInputs` (the encoder
    tokens and the backbone's output) serving the same purpose.
    ``terms``: named parts of the decoder cross-attention, per layer (Conditional DETR and
    DAB-DETR: ``"content"`` and ``"spatial"``, each the softmax of its term of the logits
    alone; see :mod:`detr_viz.hf_capture`). ``anchors``: (decoder layers, Q, 4) normalised
    cxcywh box each decoder layer starts from (DAB-DETR); ``reference_points``: (Q, 2)
    normalised (cx, cy) of each query (Conditional DETR). ``pixels``: the model input
    (1, 3, H, W) for families run in transformers' code, which gradient methods run again
    (:mod:`detr_viz.explain_hf`); None for DETR, whose ``inputs`` suffice.
    """

    spec: ModelSpec
    grid: FeatureGrid
    probabilities: np.ndarray
    boxes: np.ndarray
    encoder: tuple[AttentionFactors, ...]
    decoder: tuple[AttentionFactors, ...]
    decoder_self: tuple[AttentionFactors, ...]
    inputs: TransformerInputs | HFInputs | None
    terms: Mapping[str, tuple[AttentionFactors, ...]] = field(default_factory=dict)
    anchors: np.ndarray | None = None
    reference_points: np.ndarray | None = None
    pixels: torch.Tensor | None = None

    sparse = False  # not a field: True for deformable models (detr_viz.deformable)

    @property
    def variant(self) -> str:
        """The checkpoint's name: the released variant's (``"detr_resnet50"``) or its own."""
        return self.spec.name

    @property
    def labels(self) -> tuple[str, ...]:
        """The name of each class index (``spec.labels``)."""
        return self.spec.labels

    @property
    def feature_hw(self) -> tuple[int, int]:
        """(h, w) of the CNN feature grid."""
        return self.grid.shape

    @property
    def stride(self) -> int:
        return self.grid.stride

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) of the oriented photo."""
        return self.grid.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the resized model input."""
        return self.grid.input_size

    @property
    def num_layers(self) -> int:
        """Encoder layers (see also :attr:`num_decoder_layers`; equal in the released DETRs)."""
        return len(self.encoder)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder)

    @property
    def num_heads(self) -> int:
        return self.encoder[0].num_heads

    @property
    def num_encoder_heads(self) -> int:
        """Heads of the encoder's attention (the same as :attr:`num_heads` in DETR)."""
        return self.num_heads

    @property
    def num_queries(self) -> int:
        return self.probabilities.shape[0]

    @property
    def scores(self) -> np.ndarray:
        """(Q,) best class probability of each query."""
        return self.probabilities.max(axis=1)

    def boxes_xyxy(self) -> np.ndarray:
        """(Q, 4) boxes as (x0, y0, x1, y1) in original-image pixels."""
        cx, cy, w, h = self.boxes.T
        width, height = self.original_size
        return np.stack(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
             (cy + h / 2) * height], axis=1,
        )

    def detections(self, threshold: float = 0.9) -> list[Detection]:
        """Queries whose best class probability is above ``threshold``, best first."""
        if not 0 <= threshold <= 1:
            raise ArgumentError(f"threshold {threshold} must be between 0 and 1.")
        labels = self.probabilities.argmax(axis=1)
        scores = self.scores
        boxes = self.boxes_xyxy()
        order = np.argsort(-scores, kind="stable")  # asked on every rerun of the page: no
        kept = order[scores[order] > threshold].tolist()  # Python loop over 300 queries
        return [
            Detection(q, int(labels[q]), class_name(self.labels, int(labels[q])), float(scores[q]),
                      tuple(float(v) for v in boxes[q]))
            for q in kept
        ]

    def queries_for_box(self, box_xyxy_in_photo_pixels, label: int | str | None = None,
                        k: int = 3) -> list[BoxMatch]:
        """The ``k`` object queries whose predicted boxes best match a box the user drew
        ((x0, y0, x1, y1) original-photo pixels), ranked by IoU, then by the probability of
        ``label`` (a class id or name of :attr:`labels`, the class the user expected): see
        :func:`detr_viz.matching.match_box`. ``match.sentence`` says what each predicted."""
        return match_box(self.boxes_xyxy(), self.probabilities, box_xyxy_in_photo_pixels,
                         self.original_size, label, k, labels=self.labels,
                         no_object=self.spec.family == "detr")

    def decoder_attention(
        self, query: int, layer: int = -1, head: int | None = None, term: str | None = None
    ) -> np.ndarray:
        """Cross-attention of object query ``query`` over the feature grid: (h, w) float32
        (``term``: one of :attr:`terms`, that part of it alone)."""
        return self.decoder_attentions([query], layer, head, term)[0]

    def decoder_attentions(
        self, queries: list[int], layer: int = -1, head: int | None = None,
        term: str | None = None,
    ) -> np.ndarray:
        """Cross-attention maps of several queries at once: (len(queries), h, w) float32."""
        queries = self.checked_queries(queries)
        if term is not None and term not in self.terms:
            have = ", ".join(self.terms) or "none"
            raise ArgumentError(f"{self.spec.architecture} has no {term!r} attention term "
                                f"(it has: {have}).")
        layers = self.decoder if term is None else self.terms[term]
        maps = self._layer(layers, layer).rows(queries, head)
        return maps.reshape(len(queries), *self.feature_hw)

    def anchor_boxes(self, query: int) -> np.ndarray:
        """(decoder layers, 4) xyxy photo pixels: the anchor box each decoder layer started
        from for ``query`` (DAB-DETR's iterative refinement), then the final box as the last
        row. ArgumentError for families without anchors."""
        if self.anchors is None:
            raise ArgumentError(f"{self.spec.architecture} has no anchor boxes per layer.")
        [query] = self.checked_queries([query])
        cx, cy, w, h = np.concatenate([self.anchors[:, query], self.boxes[query][None]]).T
        width, height = self.original_size
        return np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                         (cy + h / 2) * height], axis=1)

    def encoder_attention(
        self,
        point: tuple[float, float],
        layer: int = -1,
        head: int | None = None,
        direction: Direction = INCOMING,
    ) -> np.ndarray:
        """Encoder self-attention around the cell under ``point``: (h, w) float32.

        ``point`` is (x, y) in original-image pixels. ``direction="incoming"`` (the default,
        the classic notebook's reading) gives how much every cell attends to the point's cell;
        ``"outgoing"`` gives where the point's cell attends (that map sums to 1).
        """
        check_direction(direction)
        cell = self.grid.cell_index(*self.grid.cell_at(*point))
        factors = self._layer(self.encoder, layer)
        if direction == INCOMING:
            return factors.column(cell, head).reshape(self.feature_hw)
        return factors.row(cell, head).reshape(self.feature_hw)

    def checked_queries(self, queries: Sequence[int]) -> list[int]:
        """``queries`` as ints, each an object query of this analysis; else an ArgumentError."""
        out = [int(q) for q in queries]
        for q in out:
            if not 0 <= q < self.num_queries:
                raise ArgumentError(f"query {q} is out of range (0..{self.num_queries - 1}).")
        return out

    def _layer(self, layers: tuple[AttentionFactors, ...], layer: int) -> AttentionFactors:
        if not -len(layers) <= layer < len(layers):
            raise ArgumentError(f"layer {layer} is out of range (0..{len(layers) - 1}).")
        return layers[layer]


def analyze(
    model: DETR, image, *, short_side: int = 800, max_size: int = 1333
) -> Analysis:
    """Run ``model`` once on ``image`` (anything :func:`load_image` takes) and keep everything.

    Deformable families (:mod:`detr_viz.deformable`) take the photo through their own image
    processor and return a :class:`~detr_viz.deformable.DeformableAnalysis`. Otherwise the
    image is resized as DETR's evaluation transform does (short side ``short_side``, long
    side at most ``max_size``) and normalised with ImageNet statistics, in the model's dtype
    (float64 models give float64 attention factors: the test oracles use that), on the model's
    device; the record holds only CPU arrays and tensors, whatever that device.
    """
    if model.spec.family in SAMPLING_FAMILIES:  # its own image processor (detr_viz.deformable)
        from detr_viz.deformable import analyze_deformable

        return analyze_deformable(model, load_image(image))
    model_input = preprocess(load_image(image), short_side=short_side, max_size=max_size)
    if model.spec.family != "detr":  # run in transformers' code (detr_viz.families)
        from detr_viz.families import analyze_hf

        return analyze_hf(model, model_input)
    weight = model.query_embed.weight
    with torch.inference_mode(), capture(model, features=False) as cap:
        outputs = model(model_input.tensor.to(weight.device, weight.dtype))
        outputs = {k: v.cpu() for k, v in outputs.items()}
    grid = FeatureGrid(
        original_size=model_input.original_size,
        input_size=model_input.input_size,
        shape=tuple(cap.feature_mask.shape[-2:]),
        stride=model.stride,
    )
    probabilities = outputs["pred_logits"][0].softmax(-1)[:, :-1]
    encoder, decoder = range(cap.num_layers), range(cap.decoder_depth)
    return Analysis(
        spec=model.spec,
        grid=grid,
        probabilities=_frozen(probabilities.numpy()),
        boxes=_frozen(outputs["pred_boxes"][0].numpy()),
        encoder=tuple(cap.encoder_layer(i) for i in encoder),
        decoder=tuple(cap.decoder_layer(i) for i in decoder),
        decoder_self=tuple(cap.decoder_self_layer(i) for i in decoder),
        inputs=cap.inputs,
    )
