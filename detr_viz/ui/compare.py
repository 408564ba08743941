"""Two backbones side by side on the same photo (a fragment of the page)."""

from __future__ import annotations

import streamlit as st

from detr_viz import compare, compare_figures
from detr_viz.explain import RELEVANCE
from detr_viz.ui import layers
from detr_viz.ui.encoder import DIRECTIONS
from detr_viz.ui.maps import decoder_maps, encoder_maps, unavailable
from detr_viz.ui.resources import Photo, Run, fragment

MAX_PAIRS = 4


@fragment
def compare_section(a: Run, b: Run, photo: Photo, threshold: float, method: str, style: dict,
                    points: list[tuple[float, float]]) -> None:
    labels = (a.spec.short, b.spec.short)
    why = unavailable(a, method) or unavailable(b, method)
    if why is not None:
        st.info(why)
        return
    matching = compare.match_detections(a.analysis.detections(threshold),
                                        b.analysis.detections(threshold))
    st.caption(f"{len(matching.pairs)} objects found by both ({labels[0]} and {labels[1]}: same "
               f"class, box IoU >= 0.5, matched one to one); only {labels[0]}: "
               f"{len(matching.only_a)}, only {labels[1]}: {len(matching.only_b)}. Maps: "
               f"{method}, each on its own feature grid.")
    pairs = matching.pairs[:MAX_PAIRS]
    if len(matching.pairs) > MAX_PAIRS:
        st.caption(f"Showing the {MAX_PAIRS} best-scoring pairs.")
    maps_a = decoder_maps(photo, a, method, [p.a.query for p in pairs],
                          *layers.current("dec", a.analysis))
    maps_b = decoder_maps(photo, b, method, [p.b.query for p in pairs],
                          *layers.current("dec", b.analysis))
    st.plotly_chart(compare_figures.comparison_figure(
        photo.panel, a.analysis.grid, b.analysis.grid, pairs, maps_a, maps_b, labels=labels,
        **style), key="compare-decoder")
    if points and method == RELEVANCE and not pairs:
        st.info("Encoder relevance explains a detection found by both models; no pair matched, "
                "so there is nothing to explain here. Lower the threshold, or choose raw "
                "attention or rollout.")
    elif points and (lacking := [r for r in (a, b) if r.analysis.num_layers == 0]):
        st.info(f"No encoder comparison: {lacking[0].spec.architecture} has no transformer "
                "encoder (its decoder reads the backbone's features).")
    elif points:
        direction = DIRECTIONS[st.session_state.get("enc-direction", next(iter(DIRECTIONS)))]
        target = pairs[0] if pairs else None
        pair_maps = [encoder_maps(photo, run, method, points[-1:],
                                  *layers.current("enc", run.analysis), direction,
                                  None if target is None else getattr(target, side).query)[0]
                     for run, side in ((a, "a"), (b, "b"))]
        st.plotly_chart(compare_figures.encoder_comparison_figure(
            photo.panel, a.analysis.grid, b.analysis.grid, points[-1], *pair_maps,
            labels=labels, **style), key="compare-encoder")
