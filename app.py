"""detr-viz: the page. `streamlit run app.py`

The table of contents of the page; each part is drawn by a module of `detr_viz.ui` from the
library's records. The model runs once per (photo, variant); every slider, page, click and
method switch afterwards is a cheap function of the cached analysis (the decoder, encoder and
comparison sections are fragments: their own controls rerun only them).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import streamlit as st

from detr_viz import DetrVizError, export, figures
from detr_viz.device import describe_device, model_device
from detr_viz.ui import charts, layers, resources
from detr_viz.ui.compare import compare_section
from detr_viz.ui.debugging import debugging_section
from detr_viz.ui.decoder import decoder_section
from detr_viz.ui.downloads import export_section
from detr_viz.ui.encoder import DIRECTIONS, encoder_section, points_of
from detr_viz.ui.family import family_section, family_title, has_family_views
from detr_viz.ui.memo import memo
from detr_viz.ui.photo import choose_photo
from detr_viz.ui.resources import Run
from detr_viz.ui.sidebar import Controls, sidebar
from detr_viz.weights import describe_provenance

log = logging.getLogger("detr_viz.app")


def provenance_note(run: Run) -> None:
    spec = run.spec
    if not spec.official:
        st.caption(f"Checkpoint: {spec.title}, from {spec.source}.")
        if spec.assumed:
            st.warning("The checkpoint does not record everything; assumed: "
                       + "; ".join(spec.assumed) + ". If that is wrong, set it in the sidebar "
                       "(What the checkpoint may not record, Class names).")
        return
    kind = resources.get_provenance(run.variant, run.checkpoint)
    note = describe_provenance(kind, run.checkpoint, run.variant, "the page shows")
    if note is None:
        return
    if kind == "other":
        st.warning(note)
    else:
        st.caption("Weights: " + note)


def summary(run: Run, name: str, threshold: float, count_slot) -> None:
    a = run.analysis
    (w, h), (wi, hi), (fh, fw) = a.original_size, a.input_size, a.feature_hw
    count_slot.caption(f"**{len(a.detections(threshold))}** of {a.num_queries} queries above "
                       f"{threshold:.2f}")
    device = describe_device(model_device(run.model))
    st.caption(f"{name}: {w}x{h} px -> model input {wi}x{hi} -> feature grid {fh}x{fw} "
               f"(stride {a.stride}) - {a.spec.title} - on {device}")


def view_now(controls: Controls, points: list[tuple[float, float]], run: Run,
             state: Mapping[str, Any]) -> export.View:
    """What the page shows at this moment, read from the session's ``state`` (the fragments'
    controls live there)."""
    (dl, dh), (el, eh) = layers.current("dec", state=state), layers.current("enc", state=state)
    a = run.analysis
    level = layers.current_level("dec", a, state) if a.sparse else None
    token = layers.current_level("enc", a, state) if a.sparse and \
        a.encoder_kind == "deformable" else None  # a level control for deformable encoders
    return export.View(controls.threshold, controls.method, dl, dh, el, eh,
                       DIRECTIONS[state.get("enc-direction", next(iter(DIRECTIONS)))],
                       tuple(points), state.get("enc-target"), level, token)


def main() -> None:
    st.set_page_config(page_title="detr-viz", page_icon=":mag:", layout="wide")
    st.title("detr-viz")
    st.caption("What does DETR look at? Each detected object's attention, rollout or relevance, "
               "and the encoder around any point you click.")
    controls, count_slot = sidebar()
    data, name = choose_photo()
    if controls.model is None:
        st.info("Type the path of a checkpoint in the sidebar (a DETR training .pth, a state "
                "dict, or a Hugging Face folder), or pick one from the list.")
        return
    resources.on_screen()  # what the last run showed may make room for what this one computes
    try:
        photo = resources.get_photo(hashlib.sha256(data).hexdigest(), data)
        run = resources.get_run(photo, controls.model)
        other = resources.get_run(photo, controls.other) if controls.other else None
    except DetrVizError as error:
        st.error(str(error))
        return
    resources.on_screen(photo, run, other)
    provenance_note(run)
    summary(run, name, controls.threshold, count_slot)
    points = points_of(photo, run.analysis)
    threshold, method, style = controls.threshold, controls.method, controls.style
    st.subheader("Detections")
    kept = run.analysis.detections(threshold)
    charts.show(memo(("detections", photo.digest, *run.key, tuple(d.query for d in kept)),
                     lambda: figures.detections_figure.spec(photo.display, kept)),
                key="detections")
    st.subheader("Decoder: what each detected object looks at")
    decoder_section(run, photo, threshold, method, style)
    if has_family_views(run):
        st.subheader(family_title(run))
        family_section(run, photo, threshold, style)
    st.subheader("Encoder: attention around a point")
    encoder_section(run, photo, threshold, method, style, points, linked=other is not None)
    if other is not None:
        st.subheader(f"Side by side: {run.spec.short} and {other.spec.short}")
        compare_section(run, other, photo, threshold, method, style, points)
    st.subheader("Debugging: every object, a missed object, box edges, sanity")
    debugging_section(run, photo, threshold, method, style)
    st.subheader("Export")
    export_section(run, photo, lambda run, state: view_now(controls, points, run, state), style)


try:
    main()
except Exception:  # the last line of defence: never a traceback on the page
    log.exception("detr-viz failed")
    st.error("Something went wrong while drawing the page; the details are in the server log. "
             "Try another photo or reload the page.")
