"""The maps a section shows, for the chosen explanation method (see :mod:`detr_viz.methods`).

The page's :class:`~detr_viz.methods.Source`: the same results as the library's
:class:`~detr_viz.methods.Explainer`, cached across reruns and sessions with spinners
(:mod:`detr_viz.ui.resources`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detr_viz import methods
from detr_viz.analysis import Direction
from detr_viz.methods import METHOD
from detr_viz.ui import resources
from detr_viz.ui.resources import Photo, Run

HELP = {name: m.help for name, m in METHOD.items()}


class PageSource:
    """Rollout and relevance of one run, from the page's caches."""

    def __init__(self, photo: Photo, run: Run):
        self.photo, self.run, self.analysis = photo, run, run.analysis

    def rollout(self):
        return resources.rollout(self.photo, self.run)

    def relevance(self, queries: Sequence[int]) -> np.ndarray:
        return resources.relevance(self.photo, self.run, list(queries))

    def encoder_relevance(self, query: int):
        return resources.encoder_relevance(self.photo, self.run, query)


def tag(method: str, layer: int, head: int | None, level: int | None = None) -> str:
    """What identifies a decoder map of ``method`` (raw attention depends on layer and head;
    a deformable model's map on its level)."""
    return methods.get_method(method).tag(layer, head, level)


def decoder_maps(photo: Photo, run: Run, method: str, queries: Sequence[int], layer: int,
                 head: int | None, level: int | None = None) -> np.ndarray:
    """(n, h, w) maps of the object queries ``queries`` (ArgumentError if ``method`` does not
    apply to the model: never another method's maps under its name). ``level``: a deformable
    model's one feature level."""
    maps = methods.decoder_maps(PageSource(photo, run), method, queries, layer, head, level)
    resources.count_growth(photo, run)
    return maps


def decoder_tokens(photo: Photo, run: Run, method: str, queries: Sequence[int], layer: int,
                   head: int | None, level: int | None = None) -> np.ndarray:
    """(n, S) token values of a deformable model's decoder maps (what they draw; what
    faithfulness scores rank)."""
    tokens = methods.decoder_tokens(PageSource(photo, run), method, queries, layer, head,
                                    level)
    resources.count_growth(photo, run)
    return tokens


def encoder_maps(photo: Photo, run: Run, method: str, points: Sequence[tuple[float, float]],
                 layer: int, head: int | None, direction: Direction,
                 target: int | None, level: int | None = None) -> list[np.ndarray]:
    """(h, w) maps around each point; relevance needs the explained detection ``target`` (an
    ArgumentError without one). ``level``: the level of a deformable encoder's clicked token."""
    maps = methods.encoder_maps(PageSource(photo, run), method, points, layer, head, direction,
                                target, level)
    resources.count_growth(photo, run)
    return maps


def unavailable(run: Run, method: str) -> str | None:
    """Why ``method`` cannot explain this run's model, or None."""
    return METHOD[method].unavailable(run.analysis)
