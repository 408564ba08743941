"""Downloads of what the page shows, built only when clicked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import streamlit as st

from detr_viz import debug_figures, export, figures
from detr_viz.family_figures import sampling_figure
from detr_viz.ui import resources
from detr_viz.ui.maps import decoder_maps, encoder_maps, tag, unavailable
from detr_viz.ui.resources import Photo, Run


def export_section(run: Run, photo: Photo,
                   view: Callable[[Run, Mapping[str, Any]], export.View], style: dict) -> None:
    """``view(run, state)`` returns the choices of the moment (points and layers chosen in
    fragments) from the session's state.

    A download is built when clicked, on a thread of Streamlit's server, not the script's:
    there ``st.session_state`` is not this session's, so the state is read from the session
    captured here; and the photo and run are held as references (``resources.held``), looked
    up again when the file is built.
    """
    if (why := unavailable(run, view(run, st.session_state).method)) is not None:
        st.caption(f"Nothing to export for this method: {why}")
        return
    refs = resources.held(run), resources.held(photo)
    session = session_state()

    def content():
        run, photo = (resources.looked_up(r, quiet=True) for r in refs)
        analysis = run.analysis
        v = view(run, session())
        kept = analysis.detections(v.threshold)
        queries = [d.query for d in kept]
        dec = decoder_maps(photo, run, v.method, queries, v.decoder_layer, v.decoder_head,
                           v.decoder_level)
        enc = [] if analysis.num_layers == 0 else encoder_maps(
            photo, run, v.method, v.points, v.encoder_layer, v.encoder_head, v.direction,
            v.target, v.encoder_level)
        method_tag = tag(v.method, v.decoder_layer, v.decoder_head, v.decoder_level)
        found = {q: {v.method: s} for q in queries
                 if (s := resources.known_scores(photo, run, q, method_tag, "map")) is not None}
        return run, photo, v, kept, dec, enc, found

    def html() -> str:
        run, photo, v, kept, dec, enc, _ = content()
        analysis = run.analysis
        shown = [
            ("Detections", figures.detections_figure(photo.display, kept)),
            (f"Decoder: {v.method}", figures.decoder_grid(photo.display, analysis.grid, kept, dec,
                                                          **style)),
            ("Every object at once", debug_figures.composite_figure(
                photo.display, analysis.grid, kept, dec, method=v.method))]
        if analysis.sparse:
            points = [analysis.sampling_points(d.query, v.decoder_layer) for d in kept]
            shown.append(("Sampling points", sampling_figure(
                photo.image, kept, points, head=v.decoder_head, level=v.decoder_level)))
        if analysis.num_layers:
            shown.append((f"Encoder: {v.method}", figures.encoder_panels(
                photo.display, analysis.grid, v.points, enc, **style)))
        return export.figures_html(shown, title=f"detr-viz: {analysis.variant}, {v.method}")

    def npz() -> bytes:
        run, _, v, _, dec, enc, found = content()
        return export.to_npz(run.analysis, v, dec, enc, found)

    def as_json() -> str:
        run, _, v, _, dec, enc, found = content()
        return export.to_json(run.analysis, v, dec, enc, found)

    cols = st.columns(3)
    cols[0].download_button("Figures (HTML)", html, "detr-viz-figures.html", "text/html")
    cols[1].download_button("Analysis (NPZ)", npz, "detr-viz-analysis.npz",
                            "application/octet-stream")
    cols[2].download_button("Analysis (JSON)", as_json, "detr-viz-analysis.json",
                            "application/json")


def session_state() -> Callable[[], Mapping[str, Any]]:
    """This session's state as it will be when called, from any thread: the script's context
    captured now (``st.session_state`` off the script's thread is a stand-in shared by all)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is None:  # bare mode: no sessions, the stand-in is the state
        return lambda: st.session_state
    state = ctx.session_state
    return lambda: state.filtered_state  # a copy, read under the state's lock
