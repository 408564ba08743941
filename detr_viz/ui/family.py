"""What only some families have: Conditional DETR's and DAB-DETR's content and spatial terms of
the cross-attention, DAB-DETR's anchor boxes through the decoder layers, a deformable model's
sampling points and reference boxes (a fragment)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from detr_viz.display import display_image
from detr_viz.family_figures import COLOR_BY, anchors_figure, sampling_figure, terms_grid
from detr_viz.ui import charts, layers
from detr_viz.ui.memo import memo
from detr_viz.ui.resources import Photo, Run, fragment

MAX = 4  # detections shown: the best ones above the threshold
TERMS_SIDE, TERMS_QUALITY = 240, 75  # the photo under 3 x MAX small panels (BENCHMARKS §9)

TERMS_NOTE = ("The cross-attention logits are a content term (what the query looks for) plus "
              "a spatial term (where its reference point or anchor is); the full map is their "
              "product, renormalised. Spatial maps tend to light up an object's extremities "
              "(Conditional DETR, Figure 1). Layer and head: the decoder section's.")


SAMPLING_NOTE = ("Each detection's sampling points in the chosen decoder layer: where its "
                 "deformable attention reads the feature levels, a dot per head, level and "
                 "point, its area the point's weight; the dashed white box (or cross) is the "
                 "reference that layer started from. Layer, head and level: the decoder "
                 "section's.")


def has_family_views(run: Run) -> bool:
    return bool(run.analysis.terms) or run.analysis.anchors is not None


def family_title(run: Run) -> str:
    """The section's subheader: what this family adds."""
    a = run.analysis
    if a.sparse:
        return f"{run.spec.architecture}: sampling points, reference boxes through the layers"
    return (f"{run.spec.architecture}: content and spatial attention"
            + (", anchors through the layers" if a.anchors is not None else ""))


@fragment
def family_section(run: Run, photo: Photo, threshold: float, style: dict) -> None:
    analysis = run.analysis
    kept = analysis.detections(threshold)[:MAX]
    queries = tuple(d.query for d in kept)
    if analysis.sparse:
        sampling_points(run, photo, kept)
    if analysis.terms:
        st.caption(TERMS_NOTE + f" The {len(kept)} best detections above the threshold.")
        layer, head = layers.current("dec", analysis)

        what = (photo.digest, *run.key, layer, head, queries)
        # the maps kept apart from the figure: a style change (opacity, colours) only redraws
        maps = memo(("terms-maps", *what), lambda: {
            "full": analysis.decoder_attentions(list(queries), layer, head),
            **{t: analysis.decoder_attentions(list(queries), layer, head, t)
               for t in analysis.terms}})

        def terms():
            small = memo(("terms-photo", photo.digest),
                         lambda: display_image(photo.image, TERMS_SIDE, TERMS_QUALITY))
            return terms_grid.spec(small, analysis.grid, kept, maps, **style)

        charts.show(memo(("terms", *what, tuple(style.items())), terms), key="terms")
    if analysis.anchors is not None:
        boxes = [analysis.anchor_boxes(q) for q in queries]
        kind = "reference" if analysis.sparse else "anchor"
        key = ("anchors", photo.digest, *run.key, queries)
        charts.show(memo(key, lambda: anchors_figure.spec(photo.display, kept, boxes,
                                                          kind=kind)), key="anchors")


def sampling_points(run: Run, photo: Photo, kept) -> None:
    """The best detections' sampling points in the decoder section's layer, head and level."""
    analysis = run.analysis
    layer, head = layers.current("dec", analysis)
    level = layers.current_level("dec", analysis)
    cols = st.columns([1, 3])
    color_by = cols[0].radio("Colour the points by", COLOR_BY, key="smp-color",
                             horizontal=True)
    cols[1].caption(SAMPLING_NOTE + f" The {len(kept)} best detections above the threshold.")

    def build():
        points = [analysis.sampling_points(d.query, layer) for d in kept]
        spec = sampling_figure.spec(photo.image, kept, points, color_by=color_by, head=head,
                                    level=level)
        return spec, _outside(points, head, level, analysis.original_size)

    queries = tuple(d.query for d in kept)
    key = ("sampling", photo.digest, *run.key, layer, head, level, color_by, queries)
    spec, (outside, total) = memo(key, build)
    charts.show(spec, key="decoder-sampling")
    if outside:
        reads = ("zeros past the feature map's edge" if analysis.capture.decoder.sampler ==
                 "bilinear" else "the nearest edge cell")
        st.caption(f"{outside} of the {total} points fall outside the photo (not drawn): "
                   f"deformable offsets are not clamped, and the sampler reads {reads}.")


def _outside(points, head: int | None, level: int | None, size) -> tuple[int, int]:
    """(points outside the photo, points) of one head and level (None: all)."""
    width, height = size
    total = outside = 0
    for p in points:
        xy = p.locations.numpy()
        if head is not None:
            xy = xy[head:head + 1]
        if level is not None:
            xy = xy[:, level:level + 1]
        real = xy[~np.isnan(xy[..., 0])]  # NaN marks padding slots
        total += len(real)
        outside += int(((real[:, 0] < 0) | (real[:, 0] > width) | (real[:, 1] < 0)
                        | (real[:, 1] > height)).sum())
    return outside, total
