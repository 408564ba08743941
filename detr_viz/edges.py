"""What placed each edge of a predicted box: Chefer relevance of ``pred_boxes`` coordinates.

    maps = edge_relevance(model, analysis, query)   # (4, h, w): left, top, right, bottom

The class relevance of :func:`detr_viz.explain.relevance` explains one logit; here the
explained scalars are the query's four box edges in original-photo pixels, each signed
outward (``-x0, -y0, x1, y1``): a map shows the cells whose attention pushed that edge away
from the box's centre (the positive part, as Chefer's rule keeps for a class). Where a box is
too wide on the right, the "right" map shows what widened it. All four come from one forward
with a graph, then one backward per edge (a single vmapped backward, ``batched=True``, gives
the same maps but was measured 10 % slower: ``python -m benchmarks.debugging``), then the same
propagation rules as class relevance (:func:`detr_viz.explain.target_relevance`).

Cost: about 2x class relevance of one detection (R50, 1 thread: 6.1 s against 3.1 s), since
each edge needs its own backward through the transformer (0.85 s each); the four edges'
gradients are four independent vector-Jacobian products, which no batching makes cheaper.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from detr_viz.analysis import Analysis
from detr_viz.explain import Target, target_relevance
from detr_viz.model import DETR

EDGES = ("left", "top", "right", "bottom")
OUTWARD = (-1.0, -1.0, 1.0, 1.0)  # the sign that makes each edge's scalar grow outward


def edge_target(query: int, size: tuple[int, int]) -> Target:
    """The four outward-signed edges of ``query``'s box in photo pixels (``size`` (w, h)):
    ``(-x0, -y0, x1, y1)`` from ``pred_boxes`` (100, 4) normalised cxcywh."""
    width, height = size

    def edges(logits: Tensor, boxes: Tensor) -> Tensor:
        cx, cy, w, h = boxes[query]
        xyxy = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                            (cx + w / 2) * width, (cy + h / 2) * height])
        return xyxy * xyxy.new_tensor(OUTWARD)

    return edges


def edge_relevance(model: DETR, analysis: Analysis, query: int,
                   batched: bool = False) -> np.ndarray:
    """(4, h, w) relevance maps of ``query``'s left, top, right and bottom edges (see the
    module docstring); ``model`` must be the analysed one. ``batched=True`` runs one vmapped
    backward for the four instead of one each (same maps; kept for the benchmark)."""
    (query,) = analysis.checked_queries([query])
    target = edge_target(query, analysis.original_size)
    return target_relevance(model, analysis, [query] * len(EDGES), target, batched)
