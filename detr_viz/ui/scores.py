"""Faithfulness on demand: a score under each decoder map, and the three methods ranked."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from detr_viz.analysis import Detection
from detr_viz.explain import METHODS, RAW
from detr_viz.faithfulness import ranking, uniform_pointing
from detr_viz.methods import METHOD, replay_unavailable
from detr_viz.ui import layers, resources
from detr_viz.ui.maps import decoder_maps, decoder_tokens, tag
from detr_viz.ui.resources import Photo, Run

_WORDS = {1: "one", 2: "two", 3: "three"}


def score_row(run: Run, photo: Photo, shown: list[Detection],
              maps: Callable[[], dict[int, np.ndarray]], method_tag: str) -> None:
    """The buttons that compute, then a caption per shown map with its score once computed.
    ``maps()``: query -> what to score (asked for only when the button is pressed)."""
    why = replay_unavailable(run.analysis, "Faithfulness scores delete and insert encoder "
                             "tokens and re-run the transformer")
    if why is not None:
        st.caption(why)
        return
    left, right = st.columns([1, 2])
    clicked = left.button(
        "Score these maps", key="score-page",
        help="Deletion and insertion of encoder tokens in the map's order, against a random "
             "order, and the share of the map inside the box. Runs the transformer again (not "
             "the backbone), 14 times per map and 16 times once per photo for the random "
             "order: seconds per map for DETR, minutes for a deformable encoder at 800 px on a "
             "laptop's CPU (BENCHMARKS.md)." + (
                 " Every feature level's tokens go in one order, ties (tokens no point reads) "
                 "in the random order." if run.analysis.sparse else ""))
    count = sum(METHOD[m].unavailable(run.analysis) is None for m in METHODS)
    with right.popover(f"Rank the {_WORDS.get(count, count)} methods for one detection",
                       width="stretch"):  # the table as wide as the column, not the label
        _ranking(run, photo, shown)
    if clicked:
        scored = maps()
        for det in shown:
            resources.scores(photo, run, det.query, {"map": scored[det.query]}, method_tag)
    base = resources.get_store(photo, run, "baseline").items.get("random")
    for col, det in zip(st.columns(len(shown)), shown, strict=True):
        found = resources.known_scores(photo, run, det.query, method_tag, "map")
        if found is not None and base is not None:
            col.caption(f"query {det.query}: "
                        + found.summary(base.curves(det.query, found.label)))


def _ranking(run: Run, photo: Photo, shown: list[Detection]) -> None:
    by_query = {d.query: d for d in shown}
    det = by_query[st.selectbox("Detection", list(by_query), key="rank-query",
                                format_func=lambda q: describe(by_query[q]))]
    if not st.button("Compute the table", key="rank-go"):
        return
    analysis = run.analysis
    layer, head = layers.current("dec", analysis)  # the decoder section's choices
    level = layers.current_level("dec", analysis) if analysis.sparse else None
    chosen = [m for m in METHODS if METHOD[m].unavailable(analysis) is None]
    maps = {m: (decoder_tokens if analysis.sparse else decoder_maps)(
        photo, run, m, [det.query], layer, head, level)[0] for m in chosen}
    found = {m: resources.scores(photo, run, det.query, {"map": maps[m]},
                                 tag(m, layer, head, level))["map"] for m in chosen}
    random = resources.baseline(photo, run).curves(det.query, found[RAW].label)
    rows = [{"rank": str(i + 1), "method": m,  # text: the random row says "baseline"
             "deletion AUC": found[m].deletion.auc, "insertion AUC": found[m].insertion.auc,
             "in the box": found[m].pointing} for i, m in enumerate(ranking(found))]
    rows.append({"rank": "baseline", "method": "random order", "deletion AUC": random[0].auc,
                 "insertion AUC": random[1].auc,  # a random map's share on average: chance
                 "in the box": uniform_pointing(analysis, tuple(analysis.boxes_xyxy()[det.query]))})
    # short headers, so the table fits the popover; what each means is in its tooltip
    st.dataframe(rows, hide_index=True, column_config=RANKING_COLUMNS)
    st.plotly_chart(curves_figure(found, random), key="rank-curves")


RANKING_COLUMNS = {
    "deletion AUC": st.column_config.NumberColumn(
        "deletion AUC ↓", format="%.3f",
        help="Lower is better: the class probability falls soon as the map's most important "
             "tokens are deleted first."),
    "insertion AUC": st.column_config.NumberColumn(
        "insertion AUC ↑", format="%.3f",
        help="Higher is better: the class probability comes back soon as the map's most "
             "important tokens are inserted first."),
    "in the box": st.column_config.NumberColumn(
        "in the box", format="percent",
        help="Share of the map's mass inside the detection's box (energy pointing game); for "
             "the random order, what a map of equal weight everywhere puts there (chance)."),
}


def describe(det: Detection) -> str:
    return f"query {det.query}: {det.name} {det.score:.2f}"


def curves_figure(found: dict, random) -> go.Figure:
    """Deletion (solid) and insertion (dotted) curves of each method and of the random order."""
    fig = go.Figure()
    for name, (deletion, insertion) in {**{m: (s.deletion, s.insertion) for m, s in
                                           found.items()}, "random": random}.items():
        for curve, dash in ((deletion, "solid"), (insertion, "dot")):
            kind = "deletion" if dash == "solid" else "insertion"
            fig.add_trace(go.Scatter(x=curve.fractions, y=curve.probability, name=f"{name}, "
                                     f"{kind}", line={"dash": dash}, mode="lines+markers"))
    fig.update_layout(height=360, margin={"l": 40, "r": 10, "t": 30, "b": 40},
                      xaxis_title="fraction of tokens deleted / inserted",
                      yaxis_title="class probability", yaxis_range=[0, 1])
    return fig
