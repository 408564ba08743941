"""Decoder cross-attention: what each detected object looks at (a fragment of the page)."""

from __future__ import annotations

import streamlit as st

from detr_viz import figures, overview
from detr_viz.analysis import Detection
from detr_viz.explain import RAW, RELEVANCE
from detr_viz.ui import charts, layers, scores
from detr_viz.ui.maps import decoder_maps, decoder_tokens, tag, unavailable
from detr_viz.ui.memo import memo
from detr_viz.ui.resources import Photo, Run, fragment

PER_PAGE = 4


def _title(det: Detection, method: str) -> str:
    title = scores.describe(det)
    return title + f" (relevance for {det.name})" if method == RELEVANCE else title


def shown_detections(run: Run, photo: Photo, threshold: float) -> list[Detection]:
    """The page of detections the grid shows (a page control appears past ``PER_PAGE``)."""
    detections = run.analysis.detections(threshold)
    pages = max(1, -(-len(detections) // PER_PAGE))
    page = 1
    if pages > 1:
        st.caption(f"{len(detections)} detections, {PER_PAGE} per page")
        page = st.pagination(pages, key=f"page-{photo.digest}")
    return detections[(page - 1) * PER_PAGE: page * PER_PAGE]


@fragment
def decoder_section(run: Run, photo: Photo, threshold: float, method: str, style: dict) -> None:
    layers.apply_pick("dec", run.analysis)
    cols = st.columns([1, 1, 2])
    layer, head = layers.layer_and_head("dec", cols, run.analysis)
    level = layers.level("dec", cols[2], run.analysis) if run.analysis.sparse else None
    if method != RAW:
        cols[2].caption(f"**{method}** combines every layer and head; layer and head apply "
                        "to raw attention and to the overview below.")
    elif run.analysis.sparse:
        how = ("bilinear" if run.analysis.capture.decoder.sampler == "bilinear"
               else "discrete: the one cell each point reads")
        cols[2].caption("Each query's sampling points, their weights spread over the cells "
                        f"the sampler read them from ({how}), on the finest level's grid.")
    shown = shown_detections(run, photo, threshold)
    queries = [d.query for d in shown]
    why = unavailable(run, method)
    if why is not None:  # never another method's maps under this one's name
        st.info(why)
        if shown:
            _overview(run, photo, shown, (layer, head), style)
        return

    what = (photo.digest, *run.key, method, layer, head, level, tuple(queries))
    # the maps kept apart from the figure: a style change (opacity, colours) only redraws
    maps = memo(("decoder-maps", *what),
                lambda: decoder_maps(photo, run, method, queries, layer, head, level))

    def build():
        width, height = run.analysis.original_size  # rows as tall as a column's photo + title
        row = int(min(360, 1100 / max(len(shown), 2) * height / width) + 40)
        return figures.decoder_grid.spec(photo.panel, run.analysis.grid, shown, maps,
                                         height_per_row=row,
                                         titles=[_title(d, method) for d in shown], **style)

    spec = memo(("decoder", *what, tuple(style.items())), build)
    charts.show(spec, key="decoder-grid")
    if shown:
        def scored():  # what the maps are drawn from: a deformable model's token values
            values = maps if not run.analysis.sparse else decoder_tokens(
                photo, run, method, queries, layer, head, level)
            return dict(zip(queries, values, strict=True))

        scores.score_row(run, photo, shown, scored, tag(method, layer, head, level))
        _overview(run, photo, shown, (layer, head), style)


def _overview(run: Run, photo: Photo, shown: list[Detection], current, style) -> None:
    # a toggle, not an expander: a collapsed expander's content is still computed every run
    if st.toggle("Every layer and head (raw attention), for one detection", key="dec-overview-on"):
        by_query = {d.query: d for d in shown}
        det = by_query[st.selectbox("Detection", list(by_query), key="dec-overview-query",
                                    format_func=lambda q: scores.describe(by_query[q]))]
        maps = overview.decoder_overview(run.analysis, det.query)
        layers.overview("dec", maps, current, photo.display, run.analysis.grid,
                        style["colorscale"], box=det.box)
