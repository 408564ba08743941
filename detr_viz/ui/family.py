"""What only some families have: Conditional DETR's and DAB-DETR's content and spatial terms of
the cross-attention, DAB-DETR's anchor boxes through the decoder layers (a fragment)."""

from __future__ import annotations

import streamlit as st

from detr_viz.display import display_image
from detr_viz.family_figures import anchors_figure, terms_grid
from detr_viz.ui import charts, layers
from detr_viz.ui.memo import memo
from detr_viz.ui.resources import Photo, Run

MAX = 4  # detections shown: the best ones above the threshold
TERMS_SIDE, TERMS_QUALITY = 240, 75  # the photo under 3 x MAX small panels (BENCHMARKS §9)

TERMS_NOTE = ("The cross-attention logits are a content term (what the query looks for) plus "
              "a spatial term (where its reference point or anchor is); the full map is their "
              "product, renormalised. Spatial maps tend to light up an object's extremities "
              "(Conditional DETR, Figure 1). Layer and head: the decoder section's.")


def has_family_views(run: Run) -> bool:
    return bool(run.analysis.terms) or run.analysis.anchors is not None


@st.fragment
def family_section(run: Run, photo: Photo, threshold: float, style: dict) -> None:
    analysis = run.analysis
    kept = analysis.detections(threshold)[:MAX]
    queries = tuple(d.query for d in kept)
    if analysis.terms:
        st.caption(TERMS_NOTE + f" The {len(kept)} best detections above the threshold.")
        layer, head = layers.current("dec", analysis)

        def terms():
            maps = {"full": analysis.decoder_attentions(list(queries), layer, head)}
            maps |= {t: analysis.decoder_attentions(list(queries), layer, head, t)
                     for t in analysis.terms}
            small = memo(("terms-photo", photo.digest),
                         lambda: display_image(photo.image, TERMS_SIDE, TERMS_QUALITY))
            return terms_grid.spec(small, analysis.grid, kept, maps, **style)

        key = ("terms", photo.digest, *run.key, layer, head, queries, tuple(style.items()))
        charts.show(memo(key, terms), key="terms")
    if analysis.anchors is not None:
        boxes = [analysis.anchor_boxes(q) for q in queries]
        key = ("anchors", photo.digest, *run.key, queries)
        charts.show(memo(key, lambda: anchors_figure.spec(photo.display, kept, boxes)),
                    key="anchors")
