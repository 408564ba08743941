"""detr-viz: the page. `streamlit run app.py`

Thin glue over the `detr_viz` library: widgets return plain values, the model runs once per
(photo, variant), and every slider move, layer or head change and click is a cheap function of
the cached analysis (the decoder and encoder sections are fragments, so they rerun alone).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import streamlit as st
from PIL import Image, ImageDraw
from streamlit_image_coordinates import streamlit_image_coordinates

from detr_viz import DETR, Analysis, DetrVizError, analyze, export, figures, load_image
from detr_viz.analysis import INCOMING, OUTGOING
from detr_viz.display import DisplayImage, display_image, display_to_original
from detr_viz.model import VARIANTS
from detr_viz.weights import (
    find_checkpoint,
    is_official_release,
    load_model,
    resolve_checkpoint,
)

SAMPLE = Path(__file__).parent / "detr_viz" / "assets" / "coffee.jpg"
UPLOAD_TYPES = ["jpg", "jpeg", "jfif", "png", "webp", "heic", "heif", "avif", "bmp", "tif",
                "tiff", "gif"]
CLICK_SIDE = 720  # longest side of the JPEG sent to the click component, pixels
MAX_POINTS = 4  # encoder reference points kept side by side, as in the classic notebook
HEADS = ["mean of heads"] + [f"head {i + 1}" for i in range(8)]
DIRECTIONS = {"what looks at the point": INCOMING, "where the point looks": OUTGOING}
log = logging.getLogger("detr_viz.app")


@dataclass(frozen=True)
class Photo:
    """A decoded photo and its browser-sized copies (cached per file content)."""

    digest: str
    image: Image.Image  # oriented RGB, original pixels
    display: DisplayImage  # JPEG for the Plotly figures
    click: Image.Image  # small copy for the click component


@st.cache_resource(show_spinner=False, max_entries=2)
def get_model(variant: str, checkpoint: str) -> DETR:
    return load_model(variant, checkpoint=checkpoint)


@st.cache_resource(show_spinner=False, max_entries=4)
def is_release(variant: str, checkpoint: str) -> bool:
    return is_official_release(checkpoint, variant)


@st.cache_resource(show_spinner=False, max_entries=4)
def get_photo(digest: str, _data: bytes) -> Photo:
    image = load_image(_data)
    scale = min(1.0, CLICK_SIDE / max(image.size))  # never enlarged, never a full-size copy
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    click = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return Photo(digest, image, display_image(image), click)


@st.cache_resource(show_spinner=False, max_entries=8)
def get_analysis(digest: str, variant: str, checkpoint: str, _photo: Photo) -> Analysis:
    return analyze(get_model(variant, checkpoint), _photo.image)


def sidebar():
    """The controls: the variant, the view, the overlay style and a slot for the count."""
    with st.sidebar:
        st.header("Model")
        backbone = st.radio("Backbone", ["ResNet-50", "ResNet-101"], horizontal=True)
        stride = st.radio("Feature stride", ["standard (stride 32)", "DC5 (stride 16)"],
                          help="DC5 dilates the last ResNet stage: a 4x finer feature grid.")
        variant = "detr_resnet" + ("50" if backbone == "ResNet-50" else "101")
        variant += "_dc5" if stride.startswith("DC5") else ""
        st.header("Detections")
        threshold = st.slider("Confidence threshold", 0.0, 1.0, 0.9, 0.01, key="threshold")
        count_slot = st.empty()
        st.header("Attention")
        layers = [f"layer {i}" + (" (last)" if i == 6 else "") for i in range(1, 7)]
        enc_layer = layers.index(st.selectbox("Encoder layer", layers, index=5))
        dec_layer = layers.index(st.selectbox("Decoder layer", layers, index=5))
        head = HEADS.index(st.selectbox("Head", HEADS)) - 1
        direction = DIRECTIONS[st.radio("Encoder map shows", list(DIRECTIONS),
                                        help="Column (the notebook's reading) or row of the "
                                             "encoder self-attention at the clicked cell.")]
        st.header("Overlay")
        opacity = st.slider("Opacity", 0.0, 1.0, 0.6, 0.05)
        colorscale = st.selectbox("Colour scale", figures.COLORSCALES)
    view = export.View(threshold, enc_layer, dec_layer, None if head < 0 else head, direction)
    return variant, view, {"opacity": opacity, "colorscale": colorscale}, count_slot


def choose_photo() -> tuple[bytes, str]:
    """The photo's bytes and a name: the sample, an upload or a camera shot."""
    source = st.radio("Photo", ["Sample photo", "Upload a photo", "Take a photo"],
                      horizontal=True, label_visibility="collapsed")
    upload = None
    if source == "Upload a photo":
        upload = st.file_uploader("Drop a phone photo (JPEG, PNG, HEIC, WebP, AVIF, ...)",
                                  type=UPLOAD_TYPES)
    elif source == "Take a photo":
        upload = st.camera_input("Take a photo")
    if upload is None:
        if source != "Sample photo":
            st.info("No photo yet: showing the sample.")
        return SAMPLE.read_bytes(), "sample (coffee.jpg, CC0)"
    return upload.getvalue(), upload.name


def ensure_model(variant: str) -> str:
    """Path of the variant's checkpoint, downloading it (with a progress bar) on first use."""
    path = find_checkpoint(variant)
    if path is None:
        name = VARIANTS[variant].checkpoint
        bar = st.progress(0.0, text=f"Downloading {name} (first run only)...")

        def progress(done: int, total: int | None) -> None:
            text = f"Downloading {name}: {done / 2**20:.0f}"
            text += f" of {total / 2**20:.0f} MB" if total else " MB"
            bar.progress(min(done / total, 1.0) if total else 0.0, text=text)

        path = resolve_checkpoint(variant, progress=progress)
        bar.empty()
    return str(path)


def summary(analysis: Analysis, name: str, view: export.View, count_slot) -> None:
    (w, h), (wi, hi), (fh, fw) = analysis.original_size, analysis.input_size, analysis.feature_hw
    kept = len(analysis.detections(view.threshold))
    count_slot.caption(
        f"**{kept}** of {analysis.num_queries} queries above {view.threshold:.2f}")
    st.caption(f"{name}: {w}x{h} px -> model input {wi}x{hi} -> feature grid {fh}x{fw} "
               f"(stride {analysis.stride}) - {analysis.variant}")


@st.fragment
def decoder_section(analysis: Analysis, photo: Photo, view: export.View, style: dict) -> None:
    detections = analysis.detections(view.threshold)
    per_page = 4
    pages = max(1, -(-len(detections) // per_page))
    page = 1
    if pages > 1:
        st.caption(f"{len(detections)} detections, {per_page} per page")
        page = st.pagination(pages, key=f"page-{photo.digest}")
    shown = detections[(page - 1) * per_page: page * per_page]
    maps = analysis.decoder_attentions([d.query for d in shown], view.decoder_layer, view.head)
    width, height = analysis.original_size  # rows as tall as a column's photo, plus a title
    row = int(min(360, 1100 / max(len(shown), 2) * height / width) + 40)
    fig = figures.decoder_grid(photo.display, analysis.grid, shown, maps, height_per_row=row,
                               **style)
    st.plotly_chart(fig, key="decoder-grid")


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
        draw = ImageDraw.Draw(image)
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline="red", width=2)
        draw.ellipse([point[0] * sx - 3, point[1] * sy - 3, point[0] * sx + 3, point[1] * sy + 3],
                     fill="red")
    return image


def take_click(photo: Photo, analysis: Analysis, points: list[tuple[float, float]]) -> None:
    """Add the click component's latest click (read from its state) to ``points``, once."""
    click = st.session_state.get(f"click-{photo.digest}")
    seen = f"seen-{photo.digest}"
    if not click or click.get("unix_time") == st.session_state.get(seen):
        return
    st.session_state[seen] = click.get("unix_time")
    point = display_to_original(click["x"], click["y"], (click["width"], click["height"]),
                                analysis.original_size)
    points[:] = (points + [point])[-MAX_POINTS:]


@st.fragment
def encoder_section(analysis: Analysis, photo: Photo, view: export.View, style: dict,
                    points: list[tuple[float, float]]) -> None:
    take_click(photo, analysis, points)  # before drawing, so the image shows the new point
    left, right = st.columns([1, 1])
    with left:
        st.caption("Click the photo to pick a reference point (the last four are kept).")
        streamlit_image_coordinates(
            marked(photo, analysis, points[-1] if points else None), key=f"click-{photo.digest}",
            use_column_width="always", image_format="JPEG", jpeg_quality=85, cursor="crosshair")
        st.button("Clear points", disabled=not points, on_click=points.clear)
    maps = [analysis.encoder_attention(p, view.encoder_layer, view.head, view.direction)
            for p in points]
    with right:
        if points:
            cell = analysis.grid.cell_at(*points[-1])
            title = f"cell {cell} of {analysis.feature_hw[0]}x{analysis.feature_hw[1]}"
            st.plotly_chart(figures.attention_heatmap(maps[-1], title, style["colorscale"],
                                                      marker_cell=cell), key="encoder-map")
        else:
            st.info("No reference point: click the photo.")
    st.plotly_chart(figures.encoder_panels(photo.display, analysis.grid, points, maps, **style),
                    key="encoder-panels")


def export_section(analysis: Analysis, photo: Photo, view: export.View, style: dict,
                   points: list[tuple[float, float]]) -> None:
    """Downloads, built when clicked, from the points chosen by then (``points`` is live)."""
    detections = analysis.detections(view.threshold)

    def shown() -> export.View:
        return replace(view, points=tuple(points))

    def html() -> str:
        view = shown()
        maps = analysis.decoder_attentions([d.query for d in detections], view.decoder_layer,
                                           view.head)
        enc = [analysis.encoder_attention(p, view.encoder_layer, view.head, view.direction)
               for p in view.points]
        return export.figures_html([
            ("Detections", figures.detections_figure(photo.display, detections)),
            ("Decoder cross-attention", figures.decoder_grid(
                photo.display, analysis.grid, detections, maps, **style)),
            ("Encoder self-attention", figures.encoder_panels(
                photo.display, analysis.grid, view.points, enc, **style)),
        ], title=f"detr-viz: {analysis.variant}")

    cols = st.columns(3)
    cols[0].download_button("Figures (HTML)", html, "detr-viz-figures.html", "text/html")
    cols[1].download_button("Analysis (NPZ)", lambda: export.to_npz(analysis, shown()),
                            "detr-viz-analysis.npz", "application/octet-stream")
    cols[2].download_button("Analysis (JSON)", lambda: export.to_json(analysis, shown()),
                            "detr-viz-analysis.json", "application/json")


def main() -> None:
    st.set_page_config(page_title="detr-viz", page_icon=":mag:", layout="wide")
    st.title("detr-viz")
    st.caption("What does DETR look at? Each detected object's cross-attention, and the "
               "encoder's self-attention around any point you click.")
    variant, view, style, count_slot = sidebar()
    data, name = choose_photo()
    try:
        photo = get_photo(hashlib.sha256(data).hexdigest(), data)
        checkpoint = ensure_model(variant)
        with st.spinner("Running DETR on the photo (once per photo and backbone)..."):
            analysis = get_analysis(photo.digest, variant, checkpoint, photo)
    except DetrVizError as error:
        st.error(str(error))
        return
    if not is_release(variant, checkpoint):
        st.warning(f"These weights ({checkpoint}) are not the official {variant} release (their "
                   "SHA-256 differs), so the page shows what these weights do, not what the "
                   "published DETR detects.")
    summary(analysis, name, view, count_slot)
    points = points_of(photo, analysis)
    st.subheader("Detections")
    st.plotly_chart(figures.detections_figure(photo.display, analysis.detections(view.threshold)),
                    key="detections")
    st.subheader("Decoder cross-attention: what each detected object looks at")
    decoder_section(analysis, photo, view, style)
    st.subheader("Encoder self-attention around a point")
    encoder_section(analysis, photo, view, style, points)
    st.subheader("Export")
    export_section(analysis, photo, view, style, points)


try:
    main()
except Exception:  # the last line of defence: never a traceback on the page
    log.exception("detr-viz failed")
    st.error("Something went wrong while drawing the page; the details are in the server log. "
             "Try another photo or reload the page.")
