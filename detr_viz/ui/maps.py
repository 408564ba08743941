"""The maps a section shows, for the chosen explanation method."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detr_viz.analysis import Direction
from detr_viz.errors import ArgumentError
from detr_viz.explain import RAW, RELEVANCE, ROLLOUT
from detr_viz.ui import resources
from detr_viz.ui.resources import Photo, Run

HELP = {
    RAW: "The attention weights of one layer and head (or the mean of the heads).",
    ROLLOUT: "Attention rollout (Abnar & Zuidema 2020): every layer's head-averaged attention, "
             "residual added, multiplied through the layers.",
    RELEVANCE: "Relevance (Chefer et al. 2021): attention weighted by the gradient of the "
               "detection's class score, propagated through encoder and decoder.",
}


def tag(method: str, layer: int, head: int | None) -> str:
    """What identifies a decoder map of ``method`` (raw attention depends on layer and head)."""
    return f"{method} L{layer} H{head}" if method == RAW else method


def decoder_maps(photo: Photo, run: Run, method: str, queries: Sequence[int], layer: int,
                 head: int | None) -> np.ndarray:
    """(n, h, w) maps of the object queries ``queries``."""
    queries = list(queries)
    if method == ROLLOUT:
        return resources.rollout(photo, run).decoder_maps(queries)
    if method == RELEVANCE:
        return resources.relevance(photo, run, queries)
    if method != RAW:
        raise ArgumentError(f"Unknown method {method!r}.")
    return run.analysis.decoder_attentions(queries, layer, head)


def encoder_maps(photo: Photo, run: Run, method: str, points: Sequence[tuple[float, float]],
                 layer: int, head: int | None, direction: Direction,
                 target: int | None) -> list[np.ndarray]:
    """(h, w) maps around each point; relevance needs the explained detection ``target`` (an
    ArgumentError without one: never another method's map under relevance's name)."""
    if not points:
        return []
    if method == ROLLOUT:
        roll = resources.rollout(photo, run)
        return [roll.encoder_map(p, direction) for p in points]
    if method == RELEVANCE:
        if target is None:
            raise ArgumentError("The encoder's relevance explains one detection; there is none "
                                "to explain here.")
        rel = resources.encoder_relevance(photo, run, target)
        return [rel.encoder_map(p, direction) for p in points]
    if method != RAW:
        raise ArgumentError(f"Unknown method {method!r}.")
    return [run.analysis.encoder_attention(p, layer, head, direction) for p in points]
