"""Which detection of one model is which of another's: one-to-one matching of two lists.

    matching = match_detections(r50.detections(0.9), dc5.detections(0.9))
    for pair in matching.pairs:                    # same class, IoU >= 0.5, one-to-one
        pair.a.query, pair.b.query, pair.iou
    matching.only_a, matching.only_b               # found by one model only

Both lists must come from analyses of the same photo, so that their boxes share one frame:
(x0, y0, x1, y1) in original-photo pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from detr_viz.analysis import Detection
from detr_viz.errors import ArgumentError


@dataclass(frozen=True)
class Match:
    """A detection of model A and the detection of model B it was paired with."""

    a: Detection
    b: Detection
    iou: float


@dataclass(frozen=True)
class Matching:
    """``pairs`` in A's order (best first for ``Analysis.detections``); the unmatched of each
    side in their own order."""

    pairs: tuple[Match, ...]
    only_a: tuple[Detection, ...]
    only_b: tuple[Detection, ...]


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair: (n, 4), (m, 4) -> (n, m) float64.

    Boxes are (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, in one frame. Two boxes without
    area have IoU 0 (torchvision's ``box_iou`` gives NaN there); otherwise the same values.
    """
    a, b = _boxes(boxes_a), _boxes(boxes_b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])  # (n, m, 2)
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(-1)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_detections(
    a: Sequence[Detection], b: Sequence[Detection], min_iou: float = 0.5
) -> Matching:
    """Pair detections of the same class one-to-one, maximising the total IoU.

    Only pairs of the same label with IoU >= ``min_iou`` (in (0, 1]) can be paired; among those
    the Hungarian algorithm picks the assignment with the largest sum of IoUs (a greedy
    best-first pairing can strand a detection that had a good partner). Swapping ``a`` and ``b``
    swaps the result (for distinct IoUs; ties go to scipy's order).
    """
    if not 0 < min_iou <= 1:
        raise ArgumentError(f"min_iou must be in (0, 1], not {min_iou!r}.")
    weights = _eligible_iou(a, b, min_iou)  # (n, m), 0 where a pair may not match
    rows, cols = linear_sum_assignment(weights, maximize=True)
    kept = [(i, j) for i, j in zip(rows, cols, strict=True) if weights[i, j] > 0]
    pairs = tuple(Match(a[i], b[j], float(weights[i, j])) for i, j in sorted(kept))
    used_a, used_b = {i for i, _ in kept}, {j for _, j in kept}
    return Matching(
        pairs=pairs,
        only_a=tuple(d for i, d in enumerate(a) if i not in used_a),
        only_b=tuple(d for j, d in enumerate(b) if j not in used_b),
    )


def _eligible_iou(a: Sequence[Detection], b: Sequence[Detection], min_iou: float) -> np.ndarray:
    iou = box_iou([d.box for d in a], [d.box for d in b])
    same = np.array([[da.label == db.label for db in b] for da in a], bool).reshape(iou.shape)
    return np.where(same & (iou >= min_iou), iou, 0.0)


def _boxes(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ArgumentError(f"boxes must be (n, 4) arrays of (x0, y0, x1, y1), not {boxes.shape}.")
    if (boxes[:, 2:] < boxes[:, :2]).any():
        raise ArgumentError("boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1.")
    return boxes


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
