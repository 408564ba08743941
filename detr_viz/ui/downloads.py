"""Downloads of what the page shows, built only when clicked."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from detr_viz import debug_figures, export, figures
from detr_viz.family_figures import sampling_figure
from detr_viz.ui import resources
from detr_viz.ui.maps import decoder_maps, encoder_maps, tag, unavailable
from detr_viz.ui.resources import Photo, Run


def export_section(run: Run, photo: Photo, view: Callable[[], export.View], style: dict) -> None:
    """``view`` returns the choices of the moment (points and layers chosen in fragments)."""
    analysis = run.analysis
    if (why := unavailable(run, view().method)) is not None:
        st.caption(f"Nothing to export for this method: {why}")
        return

    def content():
        v = view()
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
        return v, kept, dec, enc, found

    def html() -> str:
        v, kept, dec, enc, _ = content()
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
        v, _, dec, enc, found = content()
        return export.to_npz(analysis, v, dec, enc, found)

    def as_json() -> str:
        v, _, dec, enc, found = content()
        return export.to_json(analysis, v, dec, enc, found)

    cols = st.columns(3)
    cols[0].download_button("Figures (HTML)", html, "detr-viz-figures.html", "text/html")
    cols[1].download_button("Analysis (NPZ)", npz, "detr-viz-analysis.npz",
                            "application/octet-stream")
    cols[2].download_button("Analysis (JSON)", as_json, "detr-viz-analysis.json",
                            "application/json")
