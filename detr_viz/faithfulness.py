"""How far to trust a map: deletion and insertion curves in token space, and energy pointing.

    base = random_baseline(model, analysis)                   # once per analysis
    scores = score_maps(model, analysis, 17, {"raw": raw, "relevance": rel}, baseline=base)
    scores["relevance"].summary(base.curves(17, label))      # "deletion AUC 0.21 vs random 0.48"

**Deletion / insertion** (after Petsiuk et al., RISE, 2018, in the transformer's token space):
the encoder tokens (feature cells after ``input_proj``) are ranked by the map; deletion replaces
the top fraction of them with the baseline token (the mean token of the image, i.e. "no content
here"), insertion starts from all-baseline tokens and puts the top fraction back. After each step
the transformer runs again (the backbone never does: :mod:`detr_viz.replay`) and the detection's
class probability is read. A faithful map makes the probability fall fast on deletion (low area
under the curve) and rise fast on insertion (high area), compared with a random order of the
tokens: the random baseline, one seeded order shared by every query of the image, so that its
runs serve all detections at once. Curves have ``steps + 1`` points (fractions 0, 1/steps,
..., 1); ``steps - 1`` deletion and ``steps - 1`` insertion runs per map, batched.

**Energy pointing game** (Wang et al., Score-CAM, 2020): the share of the map's mass that lies
inside the detection's box, each cell counted by the fraction of its area (within the image)
that the box covers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from detr_viz.analysis import Analysis
from detr_viz.deformable_replay import deformable_replay
from detr_viz.errors import ArgumentError
from detr_viz.geometry import FeatureGrid
from detr_viz.hf_replay import hf_replay
from detr_viz.methods import replay_unavailable
from detr_viz.replay import replay

STEPS = 8
BATCH = 4  # transformer runs at once: DC5 at batch 4 peaks ~0.5 GB above a single run
Progress = Callable[[int, int], None]  # (runs done, runs in all)


@dataclass(frozen=True)
class Curve:
    """Class probability (steps + 1,) at each fraction of tokens deleted or inserted."""

    fractions: np.ndarray
    probability: np.ndarray

    @property
    def auc(self) -> float:
        """Area under the curve over fractions 0..1 (trapezoid rule)."""
        p, f = self.probability, self.fractions
        return float(np.sum((p[1:] + p[:-1]) / 2 * np.diff(f)))


@dataclass(frozen=True)
class Score:
    """Faithfulness of one map of one detection (query, label)."""

    query: int
    label: int
    deletion: Curve
    insertion: Curve
    pointing: float  # share of the map's mass inside the detection's box, 0..1

    def summary(self, random: tuple[Curve, Curve] | None = None) -> str:
        """E.g. "deletion AUC 0.21 vs random 0.48 · insertion AUC 0.63 vs 0.40 · 72 % in box"."""
        d, i = f"deletion AUC {self.deletion.auc:.2f}", f"insertion AUC {self.insertion.auc:.2f}"
        if random is not None:
            d += f" vs random {random[0].auc:.2f}"
            i += f" vs {random[1].auc:.2f}"
        return f"{d} · {i} · {self.pointing:.0%} in box"


@dataclass(frozen=True)
class RandomBaseline:
    """Deletion and insertion with one random token order: probabilities (steps + 1, Q, C)
    of every query and class, so that any detection's random curves are a lookup."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    seed: int

    def curves(self, query: int, label: int) -> tuple[Curve, Curve]:
        """(deletion, insertion) of the random order for ``query``'s class ``label``."""
        return (Curve(self.fractions, self.deletion[:, query, label]),
                Curve(self.fractions, self.insertion[:, query, label]))


def pointing_energy(attention: np.ndarray, grid: FeatureGrid,
                    box: tuple[float, float, float, float]) -> float:
    """Share of the (h, w) map's mass inside ``box`` (x0, y0, x1, y1, original pixels).

    A cell counts with the fraction of its area inside the image that the box covers. Negative
    values count as 0. A map with no mass gives NaN.
    """
    z = np.clip(np.asarray(attention, dtype=np.float64), 0, None)
    if z.shape != grid.shape:
        raise ArgumentError(f"map of shape {z.shape} for a {grid.shape} feature grid.")
    total = z.sum()
    return float((z * _box_share(grid, box)).sum() / total) if total > 0 else float("nan")


def token_pointing(analysis: Analysis, values: np.ndarray,
                   box: tuple[float, float, float, float]) -> float:
    """:func:`pointing_energy` of a deformable model's token values (S,): each level's tokens
    counted on that level's cells (:meth:`~detr_viz.deformable.DeformableAnalysis.level_grid`);
    tokens on padding or past a level's edge count in the total, never in the box."""
    z = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    total, inside = z.sum(), 0.0
    for level, m in enumerate(analysis.token_levels(z)):
        grid = analysis.level_grid(level)
        h, w = min(m.shape[0], grid.shape[0]), min(m.shape[1], grid.shape[1])
        inside += float((m.numpy()[:h, :w] * _box_share(grid, box)[:h, :w]).sum())
    return inside / total if total > 0 else float("nan")


def uniform_pointing(analysis: Analysis, box: tuple[float, float, float, float]) -> float:
    """The energy pointing of a map with equal weight on every cell (a deformable model: every
    token), the share a map of random weights puts in ``box`` on average: chance level, the
    random order's "in the box"."""
    if analysis.sparse:
        return token_pointing(analysis, np.ones(analysis.num_tokens), box)
    return pointing_energy(np.ones(analysis.grid.shape), analysis.grid, box)


def _box_share(grid: FeatureGrid, box: tuple[float, float, float, float]) -> np.ndarray:
    """(h, w): the share of each cell's area within the model input that ``box`` (x0, y0, x1,
    y1, original pixels) covers."""
    (w, h), s, (sx, sy) = grid.input_size, grid.stride, grid.scale
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy  # model-input pixels

    def cover(n: int, lo: float, hi: float, size: int) -> np.ndarray:
        start = np.arange(n) * s
        end = np.minimum(start + s, size)
        inside = np.clip(np.minimum(end, hi) - np.maximum(start, lo), 0, None)
        return inside / (end - start)

    return np.outer(cover(grid.shape[0], y0, y1, h), cover(grid.shape[1], x0, x1, w))


def _fractions(steps: int) -> np.ndarray:
    if not isinstance(steps, int) or steps < 2:
        raise ArgumentError(f"steps must be an integer of at least 2, not {steps!r}.")
    return np.linspace(0.0, 1.0, steps + 1)


def _probabilities(model, analysis: Analysis, sources: list, progress: Progress | None
                   ) -> np.ndarray:
    """Class probabilities (len(sources), Q, C) of the transformer on each source (a (d, h, w)
    src, or a deformable model's levels), in the model's dtype, ``BATCH`` runs at a time (one
    at a time for the dense families in transformers' code)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(sources), BATCH):
            if analysis.spec.family == "detr":
                logits = replay(model, analysis.inputs, torch.stack(sources[i:i + BATCH]))
                out.append(logits.softmax(-1)[..., :-1].cpu().numpy())
            elif analysis.sparse:  # transformers' code, sigmoid scores
                logits = deformable_replay(model.hf, analysis.inputs, sources[i:i + BATCH])
                out.append(logits.sigmoid().numpy())
            else:  # transformers' code, sigmoid scores (detr_viz.hf_replay)
                logits, _ = hf_replay(model.hf, analysis.pixels, analysis.inputs,
                                      sources[i:i + BATCH])
                out.append(logits.sigmoid().numpy())
            if progress is not None:
                progress(min(i + BATCH, len(sources)), len(sources))
    return np.concatenate(out)


class _Tokens:
    """The image's encoder tokens (d, N), the baseline tokens, and the order a map puts them
    in. A deformable model's are every level's, in token order (level by level, row-major);
    its maps are token values (S,), and the baseline token is each level's mean."""

    def __init__(self, analysis: Analysis, steps: int, seed: int = 0):
        self.analysis = analysis
        if (why := replay_unavailable(analysis, "Faithfulness scores re-run the transformer "
                                      "on deleted tokens")) is not None:
            raise ArgumentError(why)
        if analysis.sparse:
            levels = analysis.inputs.tokens  # (1, d, h_l, w_l) each
            self.flat = torch.cat([t[0].flatten(1) for t in levels], 1)  # (d, S)
            self.valid = torch.from_numpy(analysis.photo_tokens())
            self.empty = torch.empty_like(self.flat)
            ends = np.cumsum([0] + [h * w for h, w in analysis.inputs.shapes])
            self.spans = list(zip(ends[:-1], ends[1:], analysis.inputs.shapes, strict=True))
            for a, b, _ in self.spans:  # each level's mean token
                inside = self.valid[(self.valid >= a) & (self.valid < b)]
                self.empty[:, a:b] = self.flat[:, inside].mean(1, keepdim=True)
            self.map_shape = (int(ends[-1]),)
        else:
            src = analysis.inputs.src[0]  # (d, h, w)
            self.flat = src.flatten(1)  # (d, N)
            self.valid = (~analysis.inputs.mask[0].flatten()).nonzero()[:, 0]  # image cells
            self.empty = self.flat[:, self.valid].mean(1, keepdim=True).expand_as(self.flat)
            self.map_shape = analysis.feature_hw
        self.random = torch.randperm(len(self.valid), generator=torch.Generator().manual_seed(
            seed))  # positions in valid: the random baseline's order
        self.counts = np.round(_fractions(steps) * len(self.valid)).astype(int)

    def source(self, flat: Tensor):
        """(d, N) tokens as the transformer's input: (d, h, w), or a deformable model's
        levels."""
        if not self.analysis.sparse:
            return flat.reshape(self.analysis.inputs.src.shape[1:])
        return tuple(flat[:, a:b].reshape(-1, h, w) for a, b, (h, w) in self.spans)

    def ends(self) -> list:
        """The unchanged tokens and the all-baseline tokens: every curve's two ends."""
        return [self.source(self.flat), self.source(self.empty)]

    def order(self, attention: np.ndarray) -> Tensor:
        """The image cells from the map's highest value down. Ties: in row-major order on one
        grid; in the random baseline's order on a deformable model's tokens (most of a
        sparse map's tokens carry no weight; they go as the random order takes them, not
        from the top-left)."""
        if np.shape(attention) != self.map_shape:
            if not self.analysis.sparse:
                raise ArgumentError(f"map of shape {np.shape(attention)} for a "
                                    f"{self.map_shape} feature grid.")
            raise ArgumentError(
                f"map of shape {np.shape(attention)} for {self.map_shape[0]} tokens: a "
                "deformable model's maps are scored as token values, every level's "
                "(DeformableAnalysis.decoder_tokens, methods.decoder_tokens).")
        values = np.asarray(attention, dtype=np.float64).ravel()[self.valid.numpy()]
        if not self.analysis.sparse:
            return self.valid[torch.from_numpy(np.argsort(-values, kind="stable"))]
        rank = np.empty(len(values), dtype=np.int64)
        rank[self.random.numpy()] = np.arange(len(values))
        return self.valid[torch.from_numpy(np.lexsort((rank, -values)))]

    def variants(self, order: Tensor) -> list:
        """Deletion then insertion sources for the inner steps (the ends are shared)."""
        out = []
        for base, fill in ((self.flat, self.empty), (self.empty, self.flat)):
            for count in self.counts[1:-1]:
                src = base.clone()
                src[:, order[:count]] = fill[:, order[:count]]
                out.append(self.source(src))
        return out

    def pointing(self, attention: np.ndarray, box: tuple[float, float, float, float]) -> float:
        if self.analysis.sparse:
            return token_pointing(self.analysis, attention, box)
        return pointing_energy(attention, self.analysis.grid, box)


def _curves(fractions: np.ndarray, inner: np.ndarray, original, empty):
    """Stack (deletion, insertion) from the inner runs (2 (steps - 1), ...) and both ends."""
    half = len(fractions) - 2
    deletion = np.concatenate([original[None], inner[:half], empty[None]])
    insertion = np.concatenate([empty[None], inner[half:], original[None]])
    return deletion, insertion


def random_baseline(model, analysis: Analysis, *, steps: int = STEPS, seed: int = 0,
                    progress: Progress | None = None) -> RandomBaseline:
    """The random-order curves of every query and class: ``2 * steps`` transformer runs (the
    two ends, the unchanged and the all-baseline tokens, are shared by every map's curves)."""
    fractions, tokens = _fractions(steps), _Tokens(analysis, steps, seed)
    order = tokens.valid[tokens.random]
    probs = _probabilities(model, analysis, [*tokens.ends(), *tokens.variants(order)], progress)
    deletion, insertion = _curves(fractions, probs[2:], probs[0], probs[1])
    return RandomBaseline(fractions, deletion, insertion, seed)


def score_maps(model, analysis: Analysis, query: int, maps: Mapping[str, np.ndarray], *,
               label: int | None = None, steps: int = STEPS,
               baseline: RandomBaseline | None = None,
               progress: Progress | None = None) -> dict[str, Score]:
    """:class:`Score` of each map of detection ``query`` (class ``label``, default its
    prediction): ``2 * (steps - 1)`` transformer runs per map, plus the two ends if no
    ``baseline`` (whose ends are the same runs). A map is (h, w) on the feature grid, or for
    a deformable model its token values (S,), every level's (``decoder_tokens``)."""
    (query,) = analysis.checked_queries([query])
    label = int(analysis.probabilities[query].argmax()) if label is None else int(label)
    seed = 0 if baseline is None else baseline.seed
    fractions, tokens = _fractions(steps), _Tokens(analysis, steps, seed)
    if baseline is not None and len(baseline.fractions) != len(fractions):
        raise ArgumentError(f"the baseline has {len(baseline.fractions) - 1} steps, not {steps}.")
    sources = [] if baseline is not None else tokens.ends()
    for attention in maps.values():
        sources += tokens.variants(tokens.order(attention))
    probs = _probabilities(model, analysis, sources, progress)[:, query, label]
    if baseline is None:
        (original, empty), probs = probs[:2], probs[2:]
    else:
        original, empty = baseline.deletion[[0, -1], query, label]
    box = tuple(analysis.boxes_xyxy()[query])
    out, per_map = {}, 2 * (steps - 1)
    for i, (name, attention) in enumerate(maps.items()):
        deletion, insertion = _curves(fractions, probs[i * per_map:(i + 1) * per_map],
                                      np.asarray(original), np.asarray(empty))
        out[name] = Score(query, label, Curve(fractions, deletion), Curve(fractions, insertion),
                          tokens.pointing(attention, box))
    return out


def ranking(scores: Mapping[str, Score]) -> list[str]:
    """Method names, most faithful first: by insertion AUC minus deletion AUC (higher is better)."""
    return sorted(scores, key=lambda n: scores[n].deletion.auc - scores[n].insertion.auc)
