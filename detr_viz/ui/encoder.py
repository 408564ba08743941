"""Encoder self-attention around clicked points (a fragment of the page)."""

from __future__ import annotations

import streamlit as st
from PIL import Image, ImageDraw
from streamlit_image_coordinates import streamlit_image_coordinates

from detr_viz import figures, overview
from detr_viz.analysis import INCOMING, OUTGOING, Analysis, Detection
from detr_viz.display import display_to_original, pixel_box
from detr_viz.explain import RAW, RELEVANCE
from detr_viz.family_figures import sampling_figure
from detr_viz.ui import charts, layers
from detr_viz.ui.maps import encoder_maps, unavailable
from detr_viz.ui.memo import memo
from detr_viz.ui.resources import Photo, Run, fragment
from detr_viz.ui.scores import describe

MAX_POINTS = 4  # encoder reference points kept side by side, as in the classic notebook
DIRECTIONS = {"what looks at the point": INCOMING, "where the point looks": OUTGOING}


def points_of(photo: Photo, analysis: Analysis) -> list[tuple[float, float]]:
    """This photo's encoder reference points (original pixels), seeded with the best box."""
    key = f"points-{photo.digest}"
    if key not in st.session_state:
        best = analysis.detections(0.0)[0].box
        x, y = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
        w, h = analysis.original_size
        st.session_state[key] = [(min(max(x, 0), w), min(max(y, 0), h))]
    return st.session_state[key]


def marked(photo: Photo, analysis: Analysis, point: tuple[float, float] | None) -> Image.Image:
    """The click image with the chosen cell outlined and its centre marked."""
    image = photo.click.copy()
    if point is not None:
        sx, sy = image.width / photo.image.width, image.height / photo.image.height
        x0, y0, x1, y1 = analysis.grid.cell_bounds(*analysis.grid.cell_at(*point))
        px, py = point[0] * sx, point[1] * sy
        draw = ImageDraw.Draw(image)  # boxes clamped: a cell can be thinner than a pixel here
        draw.rectangle(pixel_box((x0 * sx, y0 * sy, x1 * sx, y1 * sy), image.size),
                       outline="red", width=2)
        draw.ellipse(pixel_box((px - 3, py - 3, px + 3, py + 3), image.size), fill="red")
    return image


def take_click(photo: Photo, analysis: Analysis, points: list[tuple[float, float]]) -> bool:
    """Add the click component's latest click (read from its state) to ``points``, once;
    whether there was a new one."""
    click = st.session_state.get(f"click-{photo.digest}")
    seen = f"seen-{photo.digest}"
    if not click or click.get("unix_time") == st.session_state.get(seen):
        return False
    st.session_state[seen] = click.get("unix_time")
    point = display_to_original(click["x"], click["y"], (click["width"], click["height"]),
                                analysis.original_size)
    points[:] = (points + [point])[-MAX_POINTS:]
    return True


def target_of(run: Run, threshold: float) -> int | None:
    """The detection whose relevance the encoder maps show (a selectbox), or None."""
    kept = run.analysis.detections(threshold) or run.analysis.detections(0.0)[:1]
    by_query = {d.query: d for d in kept}
    return st.selectbox("Relevance for detection", list(by_query), key="enc-target",
                        format_func=lambda q: describe(by_query[q]))


@fragment
def encoder_section(run: Run, photo: Photo, threshold: float, method: str, style: dict,
                    points: list[tuple[float, float]], linked: bool = False) -> None:
    """``linked``: another section (the comparison) shows the points too; a new click then
    reruns the page rather than this fragment alone."""
    analysis = run.analysis
    if take_click(photo, analysis, points) and linked:  # before drawing: the image shows it
        st.rerun()
    if analysis.sparse and analysis.num_layers == 0:
        st.info(analysis.no_deformable_encoder())
        return
    deformable = analysis.sparse and analysis.encoder_kind == "deformable"
    layers.apply_pick("enc", analysis)
    cols = st.columns([1, 1, 1, 2] if deformable else [1, 1, 2])
    layer, head = layers.layer_and_head("enc", cols, analysis)
    level = None
    if deformable:
        level = layers.level("enc", cols[2], analysis)
        cols = [*cols[:2], cols[3]]
    direction = DIRECTIONS[cols[2].radio(
        "Encoder map shows", list(DIRECTIONS), key="enc-direction", horizontal=True,
        help="Column (the notebook's reading) or row of the encoder self-attention at the "
             "clicked cell.")]
    why = unavailable(run, method)
    target = target_of(run, threshold) if method == RELEVANCE and why is None else None
    left, right = st.columns([1, 1])
    last = points[-1] if points else None
    with left:
        st.caption("Click the photo to pick a reference point (the last four are kept).")
        streamlit_image_coordinates(
            memo(("click", photo.digest, *run.key, last), lambda: marked(photo, analysis, last)),
            key=f"click-{photo.digest}", use_column_width="always", image_format="JPEG",
            jpeg_quality=85, cursor="crosshair")
        st.button("Clear points", disabled=not points, on_click=points.clear, key="clear-points")
    if why is not None:
        right.info(why)
        return

    def one(point):  # a new click computes only its own map
        key = ("encoder map", photo.digest, *run.key, method, layer, head, direction, target,
               level, point)
        return memo(key, lambda: encoder_maps(photo, run, method, [point], layer, head,
                                              direction, target, level)[0])

    def build():
        maps = [one(p) for p in points]
        heatmap = None
        if points:
            cell = analysis.grid.cell_at(*last)
            title = f"cell {cell} of {analysis.feature_hw[0]}x{analysis.feature_hw[1]}"
            title += "" if method == RAW else f" ({method})"
            heatmap = figures.attention_heatmap.spec(maps[-1], title, style["colorscale"],
                                                     marker_cell=cell)
        panels = figures.encoder_panels.spec(photo.panel, analysis.grid, points, maps, **style)
        return heatmap, panels

    key = ("encoder", photo.digest, *run.key, method, layer, head, direction, target, level,
           tuple(points), tuple(style.items()))
    heatmap, panels = memo(key, build)
    with right:
        if heatmap is not None:
            charts.show(heatmap, key="encoder-map")
        else:
            st.info("No reference point: click the photo.")
    charts.show(panels, key="encoder-panels")
    if points and deformable:
        token_points(run, photo, points[-1], layer, head, level)
    if points and st.toggle("Every layer and head (raw attention), at the last point",
                            key="enc-overview-on"):
        grid = overview.encoder_overview(analysis, points[-1], direction)
        layers.overview("enc", grid, (layer, head), photo.display, analysis.grid,
                        style["colorscale"], point=points[-1])


def token_points(run: Run, photo: Photo, point, layer: int, head: int | None,
                 level: int | None) -> None:
    """Where the encoder token under the last point samples (a deformable encoder)."""
    analysis = run.analysis
    chosen = 0 if level is None else level
    pts = analysis.encoder_points(point, chosen, layer)
    grid = analysis.level_grid(chosen)
    cell = grid.cell_at(*point)
    x0, y0, x1, y1 = grid.cell_bounds(*cell)
    token = Detection(pts.index, -1, "token", 1.0, (x0, y0, x1, y1))
    key = ("token points", photo.digest, *run.key, point, chosen, layer, head)
    st.caption(f"Where the token under the last point (level {chosen}, cell {cell}) samples "
               f"in encoder layer {layer + 1}: a dot per head, level and point, its area the "
               "weight; the blue box is the token's own cell, the white cross its reference point.")
    charts.show(memo(key, lambda: sampling_figure.spec(
        photo.image, [token], [pts], color_by="level", head=head, side=520,
        titles=[f"token {pts.index}: level {chosen}, cell {cell}, layer {layer + 1}"])),
        key="encoder-sampling")
