"""Debugging a detection (a fragment of the page): every object at once, "why not this one?"
for a box the user draws, what placed each box edge, and the randomisation sanity check.

Each view is behind a toggle (a collapsed expander would still compute); the expensive ones
(relevance for another class, edge relevance, the sanity check) are cached per photo and
model, the sanity check runs only on a button press, with a progress bar.
"""

from __future__ import annotations

import streamlit as st
from PIL import Image, ImageDraw
from streamlit_image_coordinates import streamlit_image_coordinates

from detr_viz import DetrVizError, explain, figures, sanity
from detr_viz.analysis import Detection
from detr_viz.debug_figures import composite_figure, edge_figure, sanity_figure
from detr_viz.display import display_to_original
from detr_viz.edges import EDGES, edge_relevance
from detr_viz.explain import METHODS, RAW, RELEVANCE
from detr_viz.matching import BoxMatch
from detr_viz.methods import redraw_unavailable
from detr_viz.spec import class_name
from detr_viz.ui import charts, layers, resources
from detr_viz.ui.maps import decoder_maps, unavailable
from detr_viz.ui.memo import memo
from detr_viz.ui.resources import Photo, Run, fragment
from detr_viz.ui.scores import describe

PREDICTED = "(the predicted class)"
MATCHES = 3


def classes(labels: tuple[str, ...]) -> list[str]:
    """The model's class names for a picker: sorted, each once, without unused ids ("N/A")."""
    return sorted({c for c in labels if c != "N/A"})


@fragment
def debugging_section(run: Run, photo: Photo, threshold: float, method: str,
                      style: dict) -> None:
    kept = run.analysis.detections(threshold)
    if st.toggle("Every object at once (the DETR paper's Figure 6)", key="dbg-composite-on"):
        _composite(run, photo, kept, method)
    if st.toggle("Why not this one? Find the queries that predicted a box you draw",
                 key="dbg-box-on"):
        _why_not(run, photo, method, style)
    if st.toggle("What placed each box edge (relevance of the box coordinates)",
                 key="dbg-edges-on"):
        _edges(run, photo, kept, style)
    if st.toggle("Is the map about the model? (randomisation sanity check)",
                 key="dbg-sanity-on"):
        _sanity(run, photo, kept, method)


def _composite(run: Run, photo: Photo, kept: list[Detection], method: str) -> None:
    if (why := unavailable(run, method)) is not None:
        st.info(why)
        return
    layer, head = layers.current("dec", run.analysis)
    queries = [d.query for d in kept]
    maps = decoder_maps(photo, run, method, queries, layer, head)
    key = ("composite", photo.digest, *run.key, method, layer, head, tuple(queries))
    spec = memo(key, lambda: composite_figure.spec(photo.display, run.analysis.grid, kept, maps,
                                                   method=method))
    st.caption("Each detection's map in its box's colour, scaled to its own peak; a cell shows "
               "the detection whose map is strongest there. Hover a cell to see which query.")
    charts.show(spec, key="composite")


# --- why not this one? ----------------------------------------------------------------------

def _corners(photo: Photo, run: Run) -> list[tuple[float, float]]:
    """The box's corners clicked so far (original pixels); a third click starts a new box."""
    corners = st.session_state.setdefault(f"dbg-corners-{photo.digest}", [])
    click = st.session_state.get(f"dbg-click-{photo.digest}")
    seen = f"dbg-seen-{photo.digest}"
    if click and click.get("unix_time") != st.session_state.get(seen):
        st.session_state[seen] = click.get("unix_time")
        point = display_to_original(click["x"], click["y"], (click["width"], click["height"]),
                                    run.analysis.original_size)
        corners[:] = [point] if len(corners) >= 2 else corners + [point]
    return corners


def _drawn(photo: Photo, corners: list[tuple[float, float]]) -> Image.Image:
    image = photo.click.copy()
    sx, sy = image.width / photo.image.width, image.height / photo.image.height
    draw = ImageDraw.Draw(image)
    for x, y in corners:
        draw.ellipse([x * sx - 4, y * sy - 4, x * sx + 4, y * sy + 4], fill="red")
    if len(corners) == 2:
        (xa, ya), (xb, yb) = corners
        draw.rectangle([min(xa, xb) * sx, min(ya, yb) * sy, max(xa, xb) * sx,
                        max(ya, yb) * sy], outline="red", width=3)
    return image


def _why_not(run: Run, photo: Photo, method: str, style: dict) -> None:
    corners = _corners(photo, run)
    left, right = st.columns([1, 1])
    with left:
        st.caption("Click two opposite corners of the object the model missed (a third click "
                   "starts a new box).")
        streamlit_image_coordinates(
            memo(("dbg-drawn", photo.digest, tuple(corners)), lambda: _drawn(photo, corners)),
            key=f"dbg-click-{photo.digest}", use_column_width="always", image_format="JPEG",
            jpeg_quality=85, cursor="crosshair")
    with right:
        expected = st.selectbox("The class you expected",
                                [PREDICTED, *classes(run.analysis.labels)], key="dbg-label")
        if len(corners) < 2:
            st.info("Click two corners of a box on the photo.")
            return
        label = None if expected == PREDICTED else expected
        (xa, ya), (xb, yb) = corners
        try:
            matches = run.analysis.queries_for_box((xa, ya, xb, yb), label, MATCHES)
        except DetrVizError as error:
            st.error(str(error))
            return
        if not matches:
            st.warning("No query predicted a box overlapping this one.")
            return
        for match in matches:
            st.markdown(f"**{match.sentence}**  \n" + _top(match))
    _match_maps(run, photo, matches, method, style)


def _top(match: BoxMatch) -> str:
    """The top-5 classes, the expected one in bold (added after them if it is not among them)."""
    wanted = None if match.expected is None else match.expected[0]
    text = "top 5: " + ", ".join(f"**{name} {p:.2f}**" if c == wanted else f"{name} {p:.2f}"
                                 for c, name, p in match.top)
    if wanted is not None and wanted not in [c for c, _, _ in match.top]:
        text += f" ... **{match.expected[1]} {match.expected[2]:.2g}**"
    return text


def _match_maps(run: Run, photo: Photo, matches: list[BoxMatch], method: str,
                style: dict) -> None:
    """Each matched query's map; relevance for the expected class (else its prediction)."""
    if (why := unavailable(run, method)) is not None:
        st.info(why)
        return
    queries = [m.query for m in matches]
    labels = [m.top[0][0] if m.expected is None else m.expected[0] for m in matches]
    layer, head = layers.current("dec", run.analysis)
    if method == RELEVANCE:
        maps = class_relevance(photo, run, queries, labels)
    else:
        maps = decoder_maps(photo, run, method, queries, layer, head)
    shown = [Detection(m.query, c, class_name(run.analysis.labels, c),
                       (m.expected or m.top[0])[2], m.box)
             for m, c in zip(matches, labels, strict=True)]
    titles = [f"query {m.query}: IoU {m.iou:.2f}" + (f" ({method} for {d.name})"
                                                    if method == RELEVANCE else "")
              for m, d in zip(matches, shown, strict=True)]
    key = ("dbg-matches", photo.digest, *run.key, method, layer, head, tuple(queries),
           tuple(labels), tuple(style.items()))
    charts.show(memo(key, lambda: figures.decoder_grid.spec(
        photo.panel, run.analysis.grid, shown, maps, titles=titles, **style)), key="why-not")


def class_relevance(photo: Photo, run: Run, queries: list[int], labels: list[int]):
    """(n, h, w) relevance of each query for the given class (cached per pair)."""
    pairs = list(zip(queries, labels, strict=True))
    with resources.editing(photo, run, "class-relevance") as store:
        todo = store.missing(pairs)
        if todo:
            with st.spinner(f"Computing relevance for {len(todo)} query/class pair(s)..."):
                maps = explain.relevance(run.model, run.analysis, [q for q, _ in todo],
                                         [c for _, c in todo])
                store.items.update(zip(todo, maps, strict=True))
        return [store.items[p] for p in pairs]


# --- box edges and the sanity check -----------------------------------------------------------

def _detection(run: Run, kept: list[Detection], key: str) -> Detection:
    choices = kept or run.analysis.detections(0.0)[:1]
    by_query = {d.query: d for d in choices}
    return by_query[st.selectbox("Detection", list(by_query), key=key,
                                 format_func=lambda q: describe(by_query[q]))]


def _edges(run: Run, photo: Photo, kept: list[Detection], style: dict) -> None:
    if (why := unavailable(run, RELEVANCE)) is not None:  # edges are relevance maps
        st.info("Box edges are explained by relevance. " + why)
        return
    det = _detection(run, kept, "dbg-edges-query")
    with resources.editing(photo, run, "edges") as store:
        if det.query not in store.items:
            with st.spinner(f"Computing the relevance of query {det.query}'s four box edges..."):
                store.items[det.query] = edge_relevance(run.model, run.analysis, det.query)
        maps = store.items[det.query]
    st.caption("Each map shows what pushed that edge outward (away from the box's centre).")
    width, height = run.analysis.original_size  # as tall as a quarter-width photo + title
    tall = int(min(300, 1100 / len(EDGES) * height / width) + 40)
    key = ("dbg-edges", photo.digest, *run.key, det.query, tuple(style.items()))
    charts.show(memo(key, lambda: edge_figure.spec(photo.panel, run.analysis.grid, det.box,
                                                   maps, EDGES, height=tall, **style)),
                key="edges")


def _sanity(run: Run, photo: Photo, kept: list[Detection], method: str) -> None:
    why = redraw_unavailable(run.analysis, "The sanity check re-draws the transformer's "
                             "weights and re-runs it")
    if why is not None:
        st.info(why)
        return
    det = _detection(run, kept, "dbg-sanity-query")
    chosen = st.multiselect("Methods", METHODS, default=[method], key="dbg-sanity-methods")
    layer, head = layers.current("dec", run.analysis)

    def key(m: str):
        return (det.query, m, layer, head) if m == RAW else (det.query, m)

    st.caption("Re-draws the transformer's weights from the top (heads, decoder layers 6 to 1, "
               "encoder layers 6 to 1) on a copy, and compares each step's map with the "
               "original. A map that stays the same is not explaining this model.")
    with resources.editing(photo, run, "sanity") as store:
        if st.button("Run the sanity check", key="dbg-sanity-run"):
            for m in [m for m in chosen if key(m) not in store.items]:
                update, done = resources.with_progress(f"Sanity check of {m}, query {det.query}")
                store.items[key(m)] = sanity.sanity_check(run.model, run.analysis, det.query, m,
                                                          layer=layer, head=head,
                                                          progress=update)
                done()
        checks = [store.items[key(m)] for m in chosen if key(m) in store.items]
    if not checks:
        return
    charts.show(sanity_figure.spec(checks), key="sanity")
    for check in checks:
        if check.insensitive:
            st.warning(f"**{check.method}** of query {check.query} hardly changes when every "
                       "transformer weight is re-drawn (rank correlation "
                       f"{check.spearman[-1]:.2f}): it is not explaining this model.")
