"""The explanation methods, each one record: what it is, what it needs, how it makes maps.

    method = METHOD[ROLLOUT]
    method.unavailable(analysis)                     # None, or why it cannot explain this model
    method.decoder(Explainer(model, analysis), [17, 42], layer=-1, head=None)   # (2, h, w)
    method.encoder(explainer, [(640, 480)], -1, None, "incoming", target=17)    # [(h, w)]

A page, the command line and the sanity check ask the registry, never ``method == ...``: a new
method is a new entry here (and, if it needs a new expensive result, a new :class:`Source`
accessor), not an edit of every view. A :class:`Source` provides the expensive results a method
builds on, each computed once: :class:`Explainer` for notebooks and batches; the page has its
own with spinners and a byte-bounded cache (:mod:`detr_viz.ui.maps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from detr_viz import explain
from detr_viz.analysis import Analysis, Direction
from detr_viz.errors import ArgumentError
from detr_viz.explain import RAW, RELEVANCE, ROLLOUT

Point = tuple[float, float]


class Source(Protocol):
    """The analysis and the expensive results methods build on (computed once each)."""

    analysis: Analysis

    def rollout(self) -> explain.Rollout: ...

    def relevance(self, queries: Sequence[int]) -> np.ndarray: ...

    def encoder_relevance(self, query: int) -> explain.EncoderRelevance: ...


class Explainer:
    """The plain :class:`Source`: ``model`` (the analysed one) and its ``analysis``; rollout
    once, relevance once per query, the encoder's relevance for the last query asked."""

    def __init__(self, model, analysis: Analysis):
        self.model, self.analysis = model, analysis
        self._rollout: explain.Rollout | None = None
        self._relevance: dict[int, np.ndarray] = {}
        self._encoder: explain.EncoderRelevance | None = None

    def rollout(self) -> explain.Rollout:
        if self._rollout is None:
            self._rollout = explain.rollout(self.analysis)
        return self._rollout

    def relevance(self, queries: Sequence[int]) -> np.ndarray:
        todo = [q for q in dict.fromkeys(queries) if q not in self._relevance]
        if todo:
            self._relevance.update(zip(todo, explain.relevance(self.model, self.analysis, todo),
                                       strict=True))
        return _stack([self._relevance[q] for q in queries], self.analysis)

    def encoder_relevance(self, query: int) -> explain.EncoderRelevance:
        if self._encoder is None or self._encoder.query != query:
            self._encoder = explain.encoder_relevance(self.model, self.analysis, query)
        return self._encoder


def _stack(maps: list[np.ndarray], analysis: Analysis) -> np.ndarray:
    return np.stack(maps) if maps else np.zeros((0, *analysis.feature_hw), np.float32)


Decoder = Callable[[Source, list[int], int, "int | None"], np.ndarray]
Encoder = Callable[[Source, list[Point], int, "int | None", Direction, "int | None"],
                   list[np.ndarray]]
Tokens = Callable[[Source, list[int], int, "int | None", "int | None"], np.ndarray]


@dataclass(frozen=True)
class Method:
    """One explanation method.

    ``per_layer``: its maps are of one layer and head (the controls apply); otherwise it
    combines them all. ``explains_class``: it explains one detection's class score (the encoder
    map needs a ``target`` detection). ``replays``: it runs the model again (gradients: from
    the captured transformer inputs for DETR, from the analysed input for families run in
    transformers' code, :mod:`detr_viz.explain_hf`). ``decoder(source, queries, layer,
    head)`` gives (n, h, w) maps; ``encoder(source, points, layer, head, direction, target)``
    one (h, w) map per point (photo pixels). ``sparse``: it explains deformable models (their
    sampling weights, :mod:`detr_viz.deformable`), not only dense attention matrices; its
    ``decoder`` and ``encoder`` then also take ``level=`` (one feature level of those models),
    and ``tokens(source, queries, layer, head, level)`` gives the (n, S) token values a decoder
    map is drawn from (what faithfulness scores rank, every level's tokens in one order).
    """

    name: str
    help: str
    per_layer: bool
    explains_class: bool
    replays: bool
    decoder: Decoder
    encoder: Encoder
    sparse: bool = False
    tokens: Tokens | None = None

    def unavailable(self, analysis: Analysis) -> str | None:
        """Why this method cannot explain ``analysis``'s model, or None."""
        if analysis.sparse and not self.sparse:
            return (f"{self.name.capitalize()} is not defined for {analysis.spec.architecture}'s "
                    "deformable attention in detr-viz yet: it is built on dense attention "
                    "matrices, and each query here samples a few points. Raw attention shows "
                    "those points' weights.")
        kept = analysis.inputs if analysis.spec.family == "detr" else analysis.pixels
        if self.replays and kept is None:
            return (f"{self.name.capitalize()} re-runs the model with gradients, and this "
                    "analysis kept no input to run it on; analyse the photo again.")
        return None

    def tag(self, layer: int, head: int | None, level: int | None = None) -> str:
        """What identifies a decoder map of this method (layer and head only if per layer; a
        deformable model's one level)."""
        name = f"{self.name} L{layer} H{head}" if self.per_layer else self.name
        return name if level is None else f"{name} level {level}"

    def check(self, analysis: Analysis) -> None:
        """Raise ArgumentError saying why, if :meth:`unavailable`."""
        if (why := self.unavailable(analysis)) is not None:
            raise ArgumentError(why)


def replay_unavailable(analysis: Analysis, what: str) -> str | None:
    """Why ``what`` (a computation that re-runs the transformer from the captured tokens:
    deleted tokens) cannot run on ``analysis``, or None when it can."""
    if analysis.inputs is None:
        return f"{what}, and this analysis kept no tokens to run it on; analyse the photo again."
    if analysis.sparse and analysis.inputs.shapes != analysis.level_shapes:
        return (f"{what}, and {analysis.spec.architecture}'s decoder reads feature levels "
                f"{_sizes(analysis.level_shapes)} where its transformer was given tokens on "
                f"{_sizes(analysis.inputs.shapes)}: the levels its encoder adds have no tokens "
                "to delete, so detr-viz does not score its maps.")
    return None


def _sizes(shapes) -> str:
    return ", ".join(f"{h}x{w}" for h, w in shapes)


def redraw_unavailable(analysis: Analysis, what: str) -> str | None:
    """Why ``what`` (re-drawing the transformer's weights layer by layer, as the sanity check
    does) cannot run on ``analysis``'s model, or None: detr-viz does it for its own DETR."""
    if analysis.spec.family == "detr" and analysis.inputs is not None:
        return None
    if analysis.sparse:
        return (f"{what}, which detr-viz does for its own DETR's layers only; "
                f"{analysis.spec.architecture} runs in transformers' code.")
    return (f"{what}, which detr-viz does for its own DETR's layers only; "
            f"{analysis.spec.architecture} runs in transformers' code. Raw attention, rollout "
            "and relevance explain it; faithfulness scores test them.")


def _needs_target(target: int | None) -> int:
    if target is None:
        raise ArgumentError("The encoder's relevance explains one detection; there is none to "
                            "explain here.")
    return target


METHOD: dict[str, Method] = {m.name: m for m in (
    Method(
        RAW, "The attention weights of one layer and head (or the mean of the heads).",
        per_layer=True, explains_class=False, replays=False,
        decoder=lambda s, q, layer, head, **at: s.analysis.decoder_attentions(q, layer, head,
                                                                              **at),
        encoder=lambda s, points, layer, head, d, target, **at: [
            s.analysis.encoder_attention(p, layer, head, d, **at) for p in points], sparse=True,
        tokens=lambda s, q, layer, head, level: s.analysis.decoder_tokens(q, layer, head, level)),
    Method(
        ROLLOUT, "Attention rollout (Abnar & Zuidema 2020): every layer's head-averaged "
                 "attention, residual added, multiplied through the layers (deformable "
                 "models: their sampling matrices, the weights their points put on each "
                 "token).",
        per_layer=False, explains_class=False, replays=False,
        decoder=lambda s, q, layer, head, **at: s.rollout().decoder_maps(q, **at),
        encoder=lambda s, points, layer, head, d, target, **at: [
            s.rollout().encoder_map(p, d, **at) for p in points], sparse=True,
        tokens=lambda s, q, layer, head, level: s.rollout().decoder_tokens(q, level)),
    Method(
        RELEVANCE, "Relevance (Chefer et al. 2021): attention weighted by the gradient of the "
                   "detection's class score, propagated through encoder and decoder.",
        per_layer=False, explains_class=True, replays=True,
        decoder=lambda s, q, layer, head: s.relevance(q),
        encoder=lambda s, points, layer, head, d, target: [
            s.encoder_relevance(_needs_target(target)).encoder_map(p, d) for p in points]),
)}
METHODS = tuple(METHOD)


def get_method(name: str) -> Method:
    """The method called ``name``; ArgumentError naming the known ones otherwise."""
    try:
        return METHOD[name]
    except KeyError:
        raise ArgumentError(f"Unknown method {name!r}; use one of {', '.join(METHOD)}.") from None


def decoder_maps(source: Source, method: str, queries: Sequence[int], layer: int = -1,
                 head: int | None = None, level: int | None = None) -> np.ndarray:
    """(n, h, w) maps of ``queries`` by ``method``; ArgumentError if it does not apply.
    ``level``: a deformable model's one feature level (None: all)."""
    chosen = get_method(method)
    chosen.check(source.analysis)
    at = level_argument(source.analysis, level)
    queries = source.analysis.checked_queries(queries)
    if not queries:
        return np.zeros((0, *source.analysis.feature_hw), np.float32)
    return chosen.decoder(source, queries, layer, head, **at)


def decoder_tokens(source: Source, method: str, queries: Sequence[int], layer: int = -1,
                   head: int | None = None, level: int | None = None) -> np.ndarray:
    """(n, S) token values of a deformable model's decoder maps by ``method`` (see
    :attr:`Method.tokens`): what :func:`decoder_maps` draws for the same arguments."""
    chosen = get_method(method)
    chosen.check(source.analysis)
    if not source.analysis.sparse or chosen.tokens is None:
        raise ArgumentError(f"{source.analysis.spec.architecture}'s maps are on one feature "
                            "grid; token values by level are a deformable model's.")
    return chosen.tokens(source, source.analysis.checked_queries(queries), layer, head, level)


def encoder_maps(source: Source, method: str, points: Sequence[Point], layer: int = -1,
                 head: int | None = None, direction: Direction = "incoming",
                 target: int | None = None, level: int | None = None) -> list[np.ndarray]:
    """One (h, w) map per point by ``method`` (relevance: of detection ``target``);
    ``level``: the feature level of a deformable encoder's token under each point."""
    chosen = get_method(method)
    chosen.check(source.analysis)
    at = level_argument(source.analysis, level)
    return chosen.encoder(source, list(points), layer, head, direction, target, **at) \
        if points else []


def level_argument(analysis: Analysis, level: int | None) -> dict:
    """``level=`` for a map of ``analysis`` (``{}`` for None): only deformable models have
    feature levels (and only methods that explain them, :attr:`Method.sparse`, take it); an
    ArgumentError for any other model, never a level silently ignored."""
    if level is None:
        return {}
    if not analysis.sparse:
        raise ArgumentError(f"{analysis.spec.architecture} has one feature grid; feature "
                            f"levels (level {level}) are a deformable model's.")
    return {"level": level}
