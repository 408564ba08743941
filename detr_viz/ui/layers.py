"""The layer and head controls of a section, and the overview grid that can set them."""

from __future__ import annotations

import numpy as np
import streamlit as st

from detr_viz import overview_figures
from detr_viz.display import DisplayImage
from detr_viz.geometry import FeatureGrid
from detr_viz.overview import MEAN

LAYERS = [f"layer {i}" + (" (last)" if i == 6 else "") for i in range(1, 7)]
HEADS = ["mean of heads"] + [f"head {i + 1}" for i in range(8)]


def apply_pick(prefix: str) -> None:
    """Make the thumbnail clicked in this section's overview the shown layer and head.

    Runs before the section's selectboxes are drawn (Streamlit lets a widget's value be set
    only before the widget exists in a run); a pick is applied once.
    """
    pick = overview_figures.overview_pick(st.session_state.get(f"{prefix}-overview"))
    if pick is None or pick == st.session_state.get(f"{prefix}-picked"):
        return
    st.session_state[f"{prefix}-picked"] = pick
    layer, head = pick
    st.session_state[f"{prefix}-layer"] = LAYERS[layer]
    st.session_state[f"{prefix}-head"] = HEADS[0 if head is None else head + 1]


def current(prefix: str) -> tuple[int, int | None]:
    """The layer and head chosen in a section (``dec`` or ``enc``) so far: (0..5, head or None)."""
    layer = LAYERS.index(st.session_state.get(f"{prefix}-layer", LAYERS[-1]))
    head = HEADS.index(st.session_state.get(f"{prefix}-head", HEADS[0])) - 1
    return layer, None if head < 0 else head


def layer_and_head(prefix: str, columns) -> tuple[int, int | None]:
    """Two selectboxes in ``columns``: (layer index 0..5, head index or None for the mean)."""
    layer = LAYERS.index(columns[0].selectbox("Layer", LAYERS, index=5, key=f"{prefix}-layer"))
    head = HEADS.index(columns[1].selectbox("Head", HEADS, key=f"{prefix}-head")) - 1
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
        title=f"{LAYERS[layer]}: the 5 strongest cells of each head"), key=f"{prefix}-heads")
