"""The sidebar: which model(s), which detections, which explanation, how maps look.

Every control here returns a plain value; changing one reruns the page, whose sections are
cheap functions of the cached analyses. The layer, head and direction controls live in their
sections instead, so that switching them reruns only that section.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from detr_viz import figures
from detr_viz.explain import METHODS
from detr_viz.lookup import describe_sources
from detr_viz.model import VARIANTS
from detr_viz.ui.maps import HELP

LABELS = {"detr_resnet50": "R50", "detr_resnet50_dc5": "R50-DC5", "detr_resnet101": "R101",
          "detr_resnet101_dc5": "R101-DC5"}
NO_COMPARISON = "nothing (one model)"


@dataclass(frozen=True)
class Controls:
    variant: str
    other: str | None  # the variant to compare with, if any
    threshold: float
    method: str
    style: dict  # opacity and colorscale, as the figure builders take them


def variant_of(backbone: str, stride: str) -> str:
    variant = "detr_resnet" + ("50" if backbone == "ResNet-50" else "101")
    return variant + ("_dc5" if stride.startswith("DC5") else "")


def sidebar():
    """The controls and a slot for the count of kept queries."""
    with st.sidebar:
        st.header("Model")
        backbone = st.radio("Backbone", ["ResNet-50", "ResNet-101"], horizontal=True,
                            key="backbone")
        stride = st.radio("Feature stride", ["standard (stride 32)", "DC5 (stride 16)"],
                          key="stride",
                          help="DC5 dilates the last ResNet stage: a 4x finer feature grid.")
        variant = variant_of(backbone, stride)
        others = [NO_COMPARISON] + [LABELS[v] for v in VARIANTS if v != variant]
        other = st.selectbox("Compare side by side with", others, key="compare-with",
                             help="A second model on the same photo: detections matched by "
                                  "class and box overlap, maps side by side.")
        st.header("Detections")
        threshold = st.slider("Confidence threshold", 0.0, 1.0, 0.9, 0.01, key="threshold")
        count_slot = st.empty()
        st.header("Explanation")
        method = st.radio("Method", METHODS, key="method",
                          help=" ".join(f"**{m}**: {HELP[m]}" for m in METHODS))
        st.header("Overlay")
        opacity = st.slider("Opacity", 0.0, 1.0, 0.6, 0.05)
        colorscale = st.selectbox("Colour scale", figures.COLORSCALES)
        with st.expander("Where the weights come from"):
            st.markdown("The first of these that exists is used: official `.pth` files or "
                        "Hugging Face checkpoints (`facebook/detr-resnet-50`, ...).\n\n"
                        + describe_sources(variant))
    by_label = {label: v for v, label in LABELS.items()}
    controls = Controls(variant, by_label.get(other), threshold, method,
                        {"opacity": opacity, "colorscale": colorscale})
    return controls, count_slot
