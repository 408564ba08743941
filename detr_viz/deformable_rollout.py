"""Attention rollout through deformable attention: sparse sampling matrices, vector products.

    roll = deformable_rollout(analysis)          # a DeformableAnalysis
    roll.decoder_maps([17, 42])                  # (2, h, w) on the finest level's grid
    roll.encoder_map((640, 480), "outgoing")     # (h, w)

The rule is DETR's (:func:`detr_viz.explain.rollout`): each layer's head-averaged attention A
with the residual added and rows renormalised, M = (A + I) / rowsum(A + I); the decoder's
self-attention rolled out, R_qq = M_last ... M_first; a query's map is row q of
R_qq^T C M_L ... M_1, where C is the last decoder layer's cross-attention and M_l the encoder's
layers. What differs is A. A deformable layer's attention is its sampling matrix: row t (a query
or token) holds, at column s (a token of any level, in sequence order), the weight t's points put
on s with the sampler's own coefficients (bilinear corners inside the map, or the one cell of a
discrete sampler), averaged over heads; that matrix times the values is the layer's attention
output, so it is the attention the layer applied. It is sparse (a row has at most heads x levels
x points x 4 entries), and rollout only ever needs rows or columns times it: nothing S x S is
formed. Rows may sum to less than 1 (weight on corners outside the map reads zeros); M
renormalises as DETR's does. RT-DETR's, D-FINE's and DEIMv2's AIFI layers are dense blocks on
their level and the identity elsewhere (rollout follows attention, as DETR's does not follow the
feed-forward layers; the convolutional fusion across levels is not attention and is not
followed). LW-DETR and RF-DETR have no encoder: a map is then R_qq^T C.

Costs: the encoder's matrices are built once per analysis (Deformable DETR at 800 x 1066: six
sparse matrices of ~2.3 M points x 4 corners, float32; ``benchmarks/deformable.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from detr_viz.analysis import INCOMING, OUTGOING, Direction, check_direction
from detr_viz.errors import ArgumentError
from detr_viz.explain import query_rollout


def sampling_matrix(stack, shapes: tuple[tuple[int, int], ...], layer: int) -> sp.csr_array:
    """(N, S) float64: row n is what query (or token) n's points of ``layer`` read from each
    token, head-averaged, with the sampler's coefficients (module docstring)."""
    xy = stack.locations[layer].double().numpy()  # (N, heads, levels, points, 2)
    weights = stack.weights[layer].double().numpy()  # (N, heads, levels, points)
    count, heads = weights.shape[:2]
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    rows, cols, vals = [], [], []
    index = np.broadcast_to(np.arange(count)[:, None, None], weights.shape[:2] + (
        weights.shape[3],))  # (N, heads, points)
    for level, (h, w) in enumerate(shapes):
        u = xy[:, :, level, :, 0] * w - 0.5  # cell coordinates, centres at integers
        v = xy[:, :, level, :, 1] * h - 0.5
        share = weights[:, :, level] / heads
        real = ~np.isnan(u)
        if stack.sampler == "bilinear":
            u0, v0 = np.floor(np.where(real, u, 0)), np.floor(np.where(real, v, 0))
            fu, fv = u - u0, v - v0
            corners = ((0, 0, (1 - fv) * (1 - fu)), (0, 1, (1 - fv) * fu),
                       (1, 0, fv * (1 - fu)), (1, 1, fv * fu))
        else:  # the one cell a discrete sampler reads: clamp(floor(x w + 0.5))
            u0 = np.clip(np.floor(np.where(real, u, 0) + 1), 0, w - 1)
            v0 = np.clip(np.floor(np.where(real, v, 0) + 1), 0, h - 1)
            corners = ((0, 0, np.ones_like(u)),)
        for dy, dx, coefficient in corners:
            x, y = u0 + dx, v0 + dy
            inside = real & (x >= 0) & (x < w) & (y >= 0) & (y < h)
            rows.append(index[inside])
            cols.append(starts[level] + (y[inside] * w + x[inside]).astype(np.int64))
            vals.append((share * coefficient)[inside])
    return sp.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(count, int(starts[-1])))


def _residual(attention) -> sp.csr_array:
    """M = (A + I) / rowsum(A + I), sparse."""
    m = sp.csr_array(attention + sp.eye_array(attention.shape[0], format="csr"))
    return sp.csr_array(sp.diags_array(1.0 / m.sum(axis=1)) @ m)


def _dense_block(attention: np.ndarray, start: int, total: int) -> sp.csr_array:
    """A dense (S_l, S_l) attention as a (total, total) matrix on its level's block, 0 off it."""
    block = sp.coo_array(attention)
    return sp.csr_array((block.data, (block.row + start, block.col + start)),
                        shape=(total, total))


@dataclass(frozen=True, eq=False)
class DeformableRollout:
    """Rollout of one :class:`~detr_viz.deformable.DeformableAnalysis`: the encoder's M_l
    (sparse, (S, S)) and R_qq^T C (sparse times dense, (Q, S)); maps are computed per request
    and kept."""

    analysis: object
    layers: tuple[sp.csr_array, ...]
    start: np.ndarray  # (Q, S): rows of R_qq^T C
    _maps: dict = field(default_factory=dict, repr=False)

    def token_maps(self, queries) -> np.ndarray:
        """(n, S) float64: each query's rollout over the encoder tokens (sequence order)."""
        queries = self.analysis.checked_queries(queries)
        todo = [q for q in queries if q not in self._maps]
        if todo:
            v = self.start[todo]  # (n, S)
            for layer in reversed(self.layers):  # v M_L ... M_1
                v = np.asarray((layer.T @ v.T).T)
            self._maps.update(zip(todo, v, strict=True))
        return np.stack([self._maps[q] for q in queries]) if queries else np.zeros(
            (0, self.start.shape[1]))

    def decoder_tokens(self, queries, level: int | None = None) -> np.ndarray:
        """(n, S) float64: :meth:`token_maps` of one ``level`` (the others 0), or all."""
        return self.analysis.only_level(self.token_maps(queries), level)

    def decoder_maps(self, queries, level: int | None = None) -> np.ndarray:
        """(n, h, w) float32 on the analysis' grid: each query's tokens, level by level, spread
        over the finest grid as the raw maps are (one ``level``, or all summed)."""
        return self.analysis.drawn(self.decoder_tokens(queries, level), level)

    def encoder_map(self, point: tuple[float, float], direction: Direction = INCOMING,
                    level: int = 0) -> np.ndarray:
        """(h, w) float32: the rollout at the token under ``point`` on ``level``: its column
        (incoming, what draws on it) or its row (outgoing, what it draws on)."""
        check_direction(direction)
        a = self.analysis
        if not self.layers:
            raise ArgumentError(a.no_deformable_encoder())
        token = a.token_at(point, level if a.encoder_kind == "deformable" else
                           a.capture.dense_level)
        e = np.zeros(self.start.shape[1])
        e[token] = 1.0
        if direction == OUTGOING:  # e^T M_L ... M_1
            for layer in reversed(self.layers):
                e = layer.T @ e
        else:  # M_L ... M_1 e
            for layer in self.layers:
                e = layer @ e
        return a.on_grid(a.token_levels(np.asarray(e)), None).astype(np.float32)


def deformable_rollout(analysis) -> DeformableRollout:
    """Rollout of ``analysis`` (module docstring). ArgumentError without the decoder's
    self-attention (a capture made without it)."""
    cap = analysis.capture
    if cap.decoder_self is None:
        raise ArgumentError("This analysis kept no decoder self-attention; analyse the photo "
                            "again with detr_viz.analyze.")
    shapes, total = cap.spatial_shapes, sum(h * w for h, w in cap.spatial_shapes)
    if cap.encoder is not None:
        layers = tuple(_residual(sampling_matrix(cap.encoder, shapes, i))
                       for i in range(cap.encoder.weights.shape[0]))
    elif cap.dense_encoder is not None:
        start = cap.level_start_index[cap.dense_level]
        layers = tuple(_residual(_dense_block(a.double().mean(0).numpy(), start, total))
                       for a in cap.dense_encoder)
    else:
        layers = ()
    r_qq = query_rollout([a.double().mean(0) for a in cap.decoder_self]).numpy()
    cross = sampling_matrix(cap.decoder, shapes, cap.decoder.weights.shape[0] - 1)  # (Q, S)
    start = np.asarray((cross.T @ r_qq).T)  # R_qq^T C, (Q, S)
    return DeformableRollout(analysis, layers, start)
