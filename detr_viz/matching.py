"""Which object queries predicted a given box: "why not this one?" for a missed object.

    matches = match_box(analysis.boxes_xyxy(), analysis.probabilities, (x0, y0, x1, y1),
                        label="dog")                  # or analysis.queries_for_box(...)
    matches[0].sentence    # "query 41 found this box (IoU 0.82) but gave 'dog' 0.31 and 'cat' 0.52"

Pure numpy on the analysis' arrays; boxes are (x0, y0, x1, y1) in original-photo pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detr_viz.coco import COCO_CLASSES
from detr_viz.errors import ArgumentError
from detr_viz.spec import class_name

TOP = 5  # class probabilities kept per match
IOU_TIE = 0.01  # IoUs this close rank by the expected class's probability instead


@dataclass(frozen=True)
class BoxMatch:
    """One object query whose predicted box overlaps the asked one.

    ``box``: the query's prediction, (x0, y0, x1, y1) original-photo pixels; ``iou`` with the
    asked box; ``top``: its five most probable classes as (label, name, probability), best
    first; ``expected``: (label, name, probability) of the class asked about, or None;
    ``no_object``: the probability left to "no object" (1 - the sum over the classes), or None
    for a family with independent (sigmoid) class scores and no such class.
    """

    query: int
    box: tuple[float, float, float, float]
    iou: float
    top: tuple[tuple[int, str, float], ...]
    expected: tuple[int, str, float] | None
    no_object: float | None

    @property
    def sentence(self) -> str:
        """E.g. "query 41 found this box (IoU 0.82) but gave 'dog' 0.31 and 'cat' 0.52"."""
        head = f"query {self.query} found this box (IoU {self.iou:.2f})"
        _, best, p = self.top[0]
        if self.expected is None or self.expected[1] == best:
            rest = "" if self.no_object is None else f" (no object {self.no_object:.2f})"
            return f"{head} and gave '{best}' {p:.2f}{rest}"
        _, name, q = self.expected
        return f"{head} but gave '{name}' {q:.2f} and '{best}' {p:.2f}"


def iou(boxes: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """(n,) intersection over union of each of ``boxes`` (n, 4) xyxy with one xyxy ``box``;
    0 where the union is empty."""
    boxes = np.asarray(boxes, dtype=np.float64)
    x0, y0 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    x1, y1 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0,
                                                                  None)
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def class_label(label: int | str, labels: tuple[str, ...] = COCO_CLASSES) -> int:
    """A class id from an id or a class name of ``labels`` (default :data:`COCO_CLASSES`)."""
    if isinstance(label, str):
        if label == "N/A" or label not in labels:
            known = "detr_viz.COCO_CLASSES (e.g. 'dog')" if labels == COCO_CLASSES else \
                "the model's labels (" + ", ".join(labels[:5]) + (", ..." if len(labels) > 5
                                                                   else "") + ")"
            raise ArgumentError(f"'{label}' is not a class of this model; use one of the names "
                                f"in {known} or a label id.")
        return labels.index(label)
    if not 0 <= int(label) < len(labels):
        raise ArgumentError(f"class {label} is out of range (0..{len(labels) - 1}).")
    return int(label)


def checked_box(box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` (x0, y0, x1, y1) in any corner order, clipped to the photo ``size`` (w, h)."""
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ArgumentError(f"a box is four finite numbers (x0, y0, x1, y1), not {box!r}.")
    xa, ya, xb, yb = values
    x0, x1 = sorted((min(max(xa, 0.0), size[0]), min(max(xb, 0.0), size[0])))
    y0, y1 = sorted((min(max(ya, 0.0), size[1]), min(max(yb, 0.0), size[1])))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        raise ArgumentError(f"the box {tuple(values)} has no area inside the {size[0]}x"
                            f"{size[1]} photo; draw it over the object (two opposite corners).")
    return x0, y0, x1, y1


def match_box(boxes: np.ndarray, probabilities: np.ndarray, box, size: tuple[int, int],
              label: int | str | None = None, k: int = 3,
              labels: tuple[str, ...] = COCO_CLASSES, no_object: bool = True
              ) -> list[BoxMatch]:
    """The ``k`` queries whose boxes best match ``box`` (xyxy photo pixels, photo ``size``).

    ``boxes``: (Q, 4) xyxy photo pixels; ``probabilities``: (Q, C) without "no object";
    ``labels``: the C class names; ``no_object``: whether the scores are a softmax with a "no
    object" class (DETR), rather than independent sigmoids.
    Ranked by IoU; IoUs within :data:`IOU_TIE` of each other (rounded) rank by the probability
    of ``label`` (default: the query's best class). Queries with IoU 0 are never returned.
    """
    if int(k) < 1:
        raise ArgumentError(f"k must be at least 1, not {k}.")
    box = checked_box(box, size)
    expected = None if label is None else class_label(label, labels)
    overlap = iou(boxes, box)
    p = probabilities.max(axis=1) if expected is None else probabilities[:, expected]
    order = np.lexsort((-p, -np.round(overlap / IOU_TIE)))
    return [_match(q, boxes, probabilities, overlap, expected, labels, no_object)
            for q in order[:int(k)] if overlap[q] > 0]


def _match(q: int, boxes, probabilities, overlap, expected: int | None,
           labels: tuple[str, ...], no_object: bool) -> BoxMatch:
    row = probabilities[q].astype(np.float64)
    top = tuple((int(c), class_name(labels, int(c)), float(row[c]))
                for c in np.argsort(-row, kind="stable")[:TOP])
    wanted = None if expected is None else (expected, class_name(labels, expected),
                                            float(row[expected]))
    return BoxMatch(int(q), tuple(float(v) for v in boxes[q]), float(overlap[q]), top, wanted,
                    float(max(0.0, 1.0 - row.sum())) if no_object else None)
