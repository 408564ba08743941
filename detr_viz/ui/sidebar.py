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
from detr_viz.labels import LabelsFile
from detr_viz.lookup import describe_sources
from detr_viz.model import VARIANTS
from detr_viz.spec import OFFICIAL_SHORT
from detr_viz.ui import resources
from detr_viz.ui.maps import HELP
from detr_viz.ui.resources import ModelChoice

LABELS = OFFICIAL_SHORT
NO_COMPARISON = "nothing (one model)"
OFFICIAL = "Official DETR (COCO): choose the backbone below"
A_PATH = "A checkpoint path..."
RECORDED = "as the checkpoint records (default 8)"
HEADS = [RECORDED, 1, 2, 4, 8, 16, 32]
DC5 = {"as the checkpoint records (default no)": None, "no (stride 32)": False,
       "yes (stride 16)": True}


@dataclass(frozen=True)
class Controls:
    model: ModelChoice | None  # None: a path is still to be typed
    other: ModelChoice | None  # the model to compare with, if any
    threshold: float
    method: str
    style: dict  # opacity and colorscale, as the figure builders take them

    @property
    def variant(self) -> str | None:
        """The released variant chosen, if the model is one."""
        return self.model.variant if self.model else None


def variant_of(backbone: str, stride: str) -> str:
    variant = "detr_resnet" + ("50" if backbone == "ResNet-50" else "101")
    return variant + ("_dc5" if stride.startswith("DC5") else "")


def model_picker() -> tuple[ModelChoice | None, dict[str, ModelChoice]]:
    """The model control, and every model one click away (for the comparison), by label."""
    found = resources.found_checkpoints()
    by_title = {f.title: f for f in found}
    source = st.selectbox(
        "Checkpoint", [OFFICIAL, *by_title, A_PATH], key="checkpoint",
        help="The released COCO models, every checkpoint found in $DETR_VIZ_WEIGHTS and the "
             "Hugging Face cache (your fine-tuned DETR: a training .pth or a Hugging Face "
             "folder), or any path.")
    reachable = {LABELS[v]: ModelChoice(variant=v) for v in VARIANTS}
    reachable |= {f.spec.short: ModelChoice(checkpoint=str(f.path)) for f in found if f.spec}
    if source == OFFICIAL:
        backbone = st.radio("Backbone", ["ResNet-50", "ResNet-101"], horizontal=True,
                            key="backbone")
        stride = st.radio("Feature stride", ["standard (stride 32)", "DC5 (stride 16)"],
                          key="stride",
                          help="DC5 dilates the last ResNet stage: a 4x finer feature grid.")
        return ModelChoice(variant=variant_of(backbone, stride)), reachable
    if source == A_PATH:
        path = st.text_input("Checkpoint path", key="checkpoint-path",
                             placeholder="/path/to/checkpoint.pth or a Hugging Face folder")
        path = path.strip().strip('"').strip("'")
        if not path:
            return None, reachable
    else:
        item = by_title[source]
        if item.spec is None:
            st.error(item.title)
            return None, reachable
        path = str(item.path)
    return _own_checkpoint(path), reachable


def _own_checkpoint(path: str) -> ModelChoice:
    """A checkpoint's choice, with what the user adds: class names, heads, DC5."""
    upload = st.file_uploader(
        "Class names (optional)", type=["txt", "json"], key="labels-file",
        help="One name per line, a JSON list, a JSON id -> name object, or a COCO annotation "
             "file (its categories). Without one: the checkpoint's own names, COCO's for 91 "
             "classes, else 'class 7'.")
    labels = None
    if upload is not None:
        try:
            labels = LabelsFile(upload.name, upload.getvalue().decode("utf-8-sig"))
        except UnicodeDecodeError:
            st.error(f"{upload.name} is not a text file; give names as text or JSON.")
    with st.expander("What the checkpoint may not record"):
        heads = st.selectbox("Attention heads", HEADS, key="heads",
                             help="Shapes cannot tell the number of heads; a DETR training "
                                  "checkpoint's args and a Hugging Face config.json do.")
        dc5 = st.selectbox("DC5 (dilated last stage)", list(DC5), key="dc5")
    return ModelChoice(checkpoint=path, labels=labels,
                       heads=None if heads == RECORDED else int(heads), dilation=DC5[dc5])


def sidebar():
    """The controls and a slot for the count of kept queries."""
    with st.sidebar:
        st.header("Model")
        model, reachable = model_picker()
        current = next((label for label, c in reachable.items() if model and c.key == model.key),
                       None)
        others = [NO_COMPARISON] + [label for label in reachable if label != current]
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
        if model is not None and model.variant is not None:
            with st.expander("Where the weights come from"):
                st.markdown("The first of these that exists is used: official `.pth` files or "
                            "Hugging Face checkpoints (`facebook/detr-resnet-50`, ...).\n\n"
                            + describe_sources(model.variant))
    controls = Controls(model, reachable.get(other), threshold, method,
                        {"opacity": opacity, "colorscale": colorscale})
    return controls, count_slot
