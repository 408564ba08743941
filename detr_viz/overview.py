"""Every layer and every head at once: the maps behind a bertviz-style overview.

    maps = decoder_overview(analysis, query=17)              # (6, 9, h, w)
    maps = encoder_overview(analysis, (640, 480), "outgoing")
    peaks = peak_cells(maps)                                 # (6, 9, 2): (row, col) of each max
    top = head_top_cells(maps[-1, :MEAN], k=5)               # (8, 5, 2): each head's 5 best cells

An overview is (layers, heads + 1, h, w) float32 on the feature grid (row 0 at the top):
``maps[l, i]`` is layer l, head i for i < heads, and the mean of the heads at ``i = heads``
(the last column, index :data:`MEAN`, whatever the number of heads: ``maps[l, :MEAN]`` are the
heads themselves). Each layer costs one product for
all its heads (:meth:`AttentionFactors.head_rows` / ``head_columns``), not one per head.
"""

from __future__ import annotations

import numpy as np

from detr_viz.analysis import INCOMING, OUTGOING, Analysis, Direction
from detr_viz.capture import AttentionFactors
from detr_viz.errors import ArgumentError

MEAN = -1  # column of the mean of the heads (the last); maps[:, :MEAN] are the heads


def decoder_overview(analysis: Analysis, query: int) -> np.ndarray:
    """Cross-attention of object query ``query``, every decoder layer and head.

    Returns (layers, heads + 1, h, w) float32; every map sums to 1 (it is a row). Deformable
    models: each head's splatted sampling weights, all levels on the finest grid (summing to 1
    up to the weight that fell outside the maps).
    """
    if not 0 <= query < analysis.num_queries:
        raise ArgumentError(f"query {query} is out of range (0..{analysis.num_queries - 1}).")
    if analysis.sparse:  # deformable: each head's splatted sampling weights (all levels)
        layers = [np.stack([analysis.decoder_attention(query, layer, head).ravel()
                            for head in range(analysis.num_heads)])
                  for layer in range(analysis.num_decoder_layers)]
    else:
        layers = [factors.head_rows([query])[:, 0] for factors in analysis.decoder]
    return _with_mean(layers, analysis.feature_hw)


def encoder_overview(
    analysis: Analysis, point: tuple[float, float], direction: Direction = INCOMING
) -> np.ndarray:
    """Encoder self-attention at the cell under ``point``, every layer and head.

    ``point`` is (x, y) in original-image pixels; ``direction`` reads as in
    :meth:`Analysis.encoder_attention`: "incoming" the column (what looks at the cell),
    "outgoing" the row (where the cell looks; each map sums to 1).
    Returns (layers, heads + 1, h, w) float32. Deformable models: their encoder's maps
    (:meth:`detr_viz.deformable.DeformableAnalysis.encoder_attention`, on the finest level).
    """
    cell = analysis.grid.cell_index(*analysis.grid.cell_at(*point))
    if direction == INCOMING:
        read = AttentionFactors.head_columns
    elif direction == OUTGOING:
        read = AttentionFactors.head_rows
    else:
        raise ArgumentError(f"direction must be {INCOMING!r} or {OUTGOING!r}, not {direction!r}.")
    if analysis.sparse:  # deformable or AIFI encoder (detr_viz.deformable), if any
        layers = [np.stack([analysis.encoder_attention(point, layer, head, direction).ravel()
                            for head in range(analysis.num_encoder_heads)])
                  for layer in range(analysis.num_layers)]
    else:
        layers = [read(factors, [cell])[:, 0] for factors in analysis.encoder]
    if not layers:
        raise ArgumentError(f"{analysis.spec.architecture} has no encoder attention.")
    return _with_mean(layers, analysis.feature_hw)


def peak_cells(maps: np.ndarray) -> np.ndarray:
    """(row, col) of each map's maximum: (..., h, w) -> (..., 2) int64 (first one on ties)."""
    maps = _maps(maps, 2)
    h, w = maps.shape[-2:]
    flat = maps.reshape(*maps.shape[:-2], h * w).argmax(-1)
    return np.stack(np.divmod(flat, w), axis=-1)


def head_top_cells(layer_maps: np.ndarray, k: int) -> np.ndarray:
    """Each map's ``k`` highest cells, highest first: (heads, h, w) -> (heads, k, 2) int64.

    Entries are (row, col) on the feature grid; ties keep row-major order.
    """
    layer_maps = _maps(layer_maps, 3)
    heads, h, w = layer_maps.shape
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= h * w:
        raise ArgumentError(f"k must be a whole number from 1 to {h * w} (the cells), not {k!r}.")
    order = np.argsort(-layer_maps.reshape(heads, h * w), axis=1, kind="stable")[:, :k]
    return np.stack(np.divmod(order, w), axis=-1)


def _with_mean(layers: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """Per layer (heads, h * w) -> (layers, heads + 1, h, w), the mean of the heads last."""
    heads = np.stack(layers)  # (L, H, h * w)
    maps = np.concatenate([heads, heads.mean(axis=1, keepdims=True)], axis=1)
    return np.ascontiguousarray(maps.reshape(*maps.shape[:2], *hw), dtype=np.float32)


def _maps(maps: np.ndarray, ndim: int) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim < ndim or (ndim == 3 and maps.ndim != 3) or 0 in maps.shape:
        raise ArgumentError(f"expected {'(heads, h, w)' if ndim == 3 else '(..., h, w)'} maps, "
                            f"not shape {maps.shape}.")
    return maps
