"""The layer and head controls of a section, and the overview grid that can set them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import streamlit as st

from detr_viz import overview_figures
from detr_viz.analysis import Analysis
from detr_viz.display import DisplayImage
from detr_viz.geometry import FeatureGrid
from detr_viz.overview import MEAN

MEAN_LABEL = "mean of heads"


def layer_labels(count: int) -> list[str]:
    """``["layer 1", ..., "layer 6 (last)"]`` for ``count`` layers."""
    return [f"layer {i}" + (" (last)" if i == count else "") for i in range(1, count + 1)]


def head_labels(count: int) -> list[str]:
    """``["mean of heads", "head 1", ..., "head 8"]`` for ``count`` heads."""
    return [MEAN_LABEL] + [f"head {i + 1}" for i in range(count)]


def depth(analysis: Analysis, prefix: str) -> int:
    """Layers of the section ``prefix`` (``dec``: decoder, ``enc``: encoder) of ``analysis``."""
    return analysis.num_decoder_layers if prefix == "dec" else analysis.num_layers


def heads(analysis: Analysis, prefix: str) -> int:
    """Heads of the section ``prefix`` (a deformable encoder may have other heads than its
    decoder)."""
    return analysis.num_heads if prefix == "dec" else analysis.num_encoder_heads


ALL_LEVELS = "all levels"


def level_labels(analysis: Analysis) -> list[str]:
    """``["all levels", "level 0: 100x134, stride 8", ...]`` of a deformable model."""
    return [ALL_LEVELS] + [f"level {i}: {h}x{w}, stride {s}" for i, ((h, w), s) in
                           enumerate(zip(analysis.level_shapes, analysis.strides, strict=True))]


def level(prefix: str, column, analysis: Analysis) -> int | None:
    """A deformable model's level control in ``column``: the level index, or None for all
    levels (a choice another model lacks becomes all levels)."""
    labels = level_labels(analysis)
    if st.session_state.get(f"{prefix}-level", ALL_LEVELS) not in labels:
        st.session_state[f"{prefix}-level"] = ALL_LEVELS
    chosen = column.selectbox(
        "Level", labels, key=f"{prefix}-level",
        help="The feature level the sampling points read (finest first); all levels: their "
             "weights summed, each level's cells spread over the finest grid.")
    return _level_index(labels, chosen)


def _level_index(labels: list[str], chosen: str) -> int | None:
    index = labels.index(chosen) - 1
    return None if index < 0 else index


def current_level(prefix: str, analysis: Analysis, state: Mapping[str, Any] | None = None
                  ) -> int | None:
    """The level chosen in a section so far (None: all levels, or none chosen); ``state``: the
    session's (default ``st.session_state``)."""
    labels = level_labels(analysis)
    chosen = (st.session_state if state is None else state).get(f"{prefix}-level", ALL_LEVELS)
    return _level_index(labels, chosen) if chosen in labels else None


def apply_pick(prefix: str, analysis: Analysis) -> None:
    """Make the thumbnail clicked in this section's overview the shown layer and head.

    Runs before the section's selectboxes are drawn (Streamlit lets a widget's value be set
    only before the widget exists in a run); a pick is applied once.
    """
    pick = overview_figures.overview_pick(st.session_state.get(f"{prefix}-overview"))
    if pick is None or pick == st.session_state.get(f"{prefix}-picked"):
        return
    st.session_state[f"{prefix}-picked"] = pick
    layer, head = pick
    st.session_state[f"{prefix}-layer"] = layer_labels(depth(analysis, prefix))[layer]
    st.session_state[f"{prefix}-head"] = head_labels(heads(analysis, prefix))[
        0 if head is None else head + 1]


def current(prefix: str, analysis: Analysis | None = None, state: Mapping[str, Any] | None = None
            ) -> tuple[int, int | None]:
    """The layer and head chosen in a section (``dec`` or ``enc``) so far: (layer index, head
    index or None for the mean). With ``analysis`` (a model with fewer layers or heads, as in
    the comparison): a layer it lacks means its last, a head it lacks the mean. ``state``: the
    session's (default ``st.session_state``)."""
    state = st.session_state if state is None else state
    layer_text = state.get(f"{prefix}-layer")
    head_text = state.get(f"{prefix}-head", MEAN_LABEL)
    layer = int(layer_text.split()[1]) - 1 if layer_text else -1
    head = None if head_text == MEAN_LABEL else int(head_text.split()[1]) - 1
    if analysis is not None:
        layers = depth(analysis, prefix)
        layer = layers - 1 if layer < 0 or layer >= layers else layer
        head = None if head is not None and head >= heads(analysis, prefix) else head
    return layer, head


def layer_and_head(prefix: str, columns, analysis: Analysis) -> tuple[int, int | None]:
    """Two selectboxes in ``columns`` for ``analysis``'s layers and heads: (layer index,
    head index or None for the mean). A choice the model lacks (another model was picked)
    becomes its last layer, the mean of its heads."""
    layers, names = layer_labels(depth(analysis, prefix)), head_labels(heads(analysis, prefix))
    for key, options, default in ((f"{prefix}-layer", layers, layers[-1]),
                                  (f"{prefix}-head", names, names[0])):
        if st.session_state.get(key, default) not in options:  # set, not deleted: the browser
            st.session_state[key] = default  # shows a value set in session state, not its own
    layer = layers.index(columns[0].selectbox("Layer", layers, index=len(layers) - 1,
                                              key=f"{prefix}-layer"))
    head = names.index(columns[1].selectbox("Head", names, key=f"{prefix}-head")) - 1
    return layer, None if head < 0 else head


def overview(prefix: str, maps: np.ndarray, shown: tuple[int, int | None], display: DisplayImage,
             grid: FeatureGrid, colorscale: str, *, point=None, box=None) -> None:
    """The 6 x 9 grid of ``maps`` (layers, heads + mean, h, w), clickable, and the head view of
    the shown layer: each head's top cells on the photo in its own colour."""
    st.plotly_chart(overview_figures.overview_figure(maps, shown=shown, colorscale=colorscale),
                    key=f"{prefix}-overview", on_select="rerun", selection_mode="points")
    st.caption("Hover a thumbnail for its layer, head and peak cell; click it to show that "
               "layer and head above.")
    layer = shown[0]
    st.plotly_chart(overview_figures.head_overlay_figure(
        display, grid, maps[layer, :MEAN], k=5, point=point, box=box,
        title=f"layer {layer + 1}: the 5 strongest cells of each head"), key=f"{prefix}-heads")
