"""Interaction latency once the analysis is cached: the code the page runs per slider move or click.

    python -m benchmarks.interaction              # R50 and DC5, library + figures (~1 min)
    python -m benchmarks.interaction --apptest    # also the whole page through AppTest (~2 min)
    python -m benchmarks.interaction --quick

Each interaction replays, through the real library functions, what app.py calls (photo 1066x800
-> model input 800x1066; display JPEG 1024x768; 4 reference points; a page of 4 detections):

- threshold move: ``detections`` + ``detections_figure`` + ``decoder_attentions`` of the page
  + ``decoder_grid``;
- layer / head switch: ``decoder_attentions`` + ``decoder_grid`` + the 4 points'
  ``encoder_attention`` + ``attention_heatmap`` + ``encoder_panels``;
- click: ``display_to_original`` + the click marker drawn on the 720-px click image and encoded
  as the click component does (JPEG q85, base64) + 4 ``encoder_attention`` +
  ``attention_heatmap`` + ``encoder_panels``;
- whole page rerun: what app.main() runs when any SIDEBAR widget changes (threshold, layer,
  head, opacity: they are outside the fragments): all of the above once;
- threshold 0: a threshold move that keeps all 100 queries (the slider dragged to 0).

Each is timed twice: the figures built ("build"), and built then serialised as
``st.plotly_chart`` does (``fig.to_dict()`` + ``plotly.io.to_json``; "+ serialise"). Every
``DETR.forward`` call during the loops is counted: it must stay 0.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import time
from pathlib import Path

import plotly.io
from PIL import Image, ImageDraw

from benchmarks.common import (
    LABEL,
    VARIANTS,
    CpuShare,
    common_arguments,
    count_forward_calls,
    fmt_time,
    interleaved,
    official_size_photo,
    print_header,
    resolve,
    stand_in_model,
    stand_in_weights,
    table,
)
from detr_viz import INCOMING, analyze, figures
from detr_viz.display import display_image, display_to_original

CLICK_SIDE, MAX_POINTS, PER_PAGE = 720, 4, 4  # as in app.py
STYLE = {"opacity": 0.6, "colorscale": "Viridis"}
GOAL_S = 0.100
KEPT = (5, 9, 13, 20)  # detections kept by the thresholds cycled through: a full page of 4


def serialise(fig) -> str:
    """What st.plotly_chart sends: the figure's dict as JSON (validation skipped)."""
    return plotly.io.to_json(fig.to_dict(), validate=False)


def marked(click: Image.Image, original_size, grid, point) -> Image.Image:
    """app.marked(): the click image with the chosen cell outlined and the point dotted."""
    image = click.copy()
    sx, sy = image.width / original_size[0], image.height / original_size[1]
    x0, y0, x1, y1 = grid.cell_bounds(*grid.cell_at(*point))
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline="red", width=2)
    draw.ellipse([point[0] * sx - 3, point[1] * sy - 3, point[0] * sx + 3, point[1] * sy + 3],
                 fill="red")
    return image


def component_payload(image: Image.Image) -> str:
    """What streamlit_image_coordinates does with a PIL image (JPEG, quality 85, base64)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class Page:
    """The cached state of the page for one photo and one variant, and its interactions."""

    def __init__(self, variant: str):
        photo = official_size_photo()
        self.analysis = analyze(stand_in_model(variant, planted=True), photo)
        self.display = display_image(photo)
        self.click = photo.copy()
        self.click.thumbnail((CLICK_SIDE, CLICK_SIDE), Image.Resampling.LANCZOS)
        w, h = self.analysis.original_size
        self.points = [(w * (i + 1) / 5, h * (i + 1) / 5) for i in range(MAX_POINTS)]
        self.thresholds = itertools.cycle(keeping(self.analysis, KEPT))
        views = itertools.product(range(6), [None, *range(8)])  # layer, head (None: mean)
        self.views = itertools.cycle(list(views))
        display_w, display_h = self.click.size
        self.clicks = itertools.cycle([(x, y) for x in range(10, display_w, 97)
                                       for y in range(10, display_h, 89)])
        self.kept = [len(self.analysis.detections(t)) for t in keeping(self.analysis, KEPT)]

    def threshold_move(self, ser: bool, threshold: float | None = None) -> list:
        a = self.analysis
        detections = a.detections(next(self.thresholds) if threshold is None else threshold)
        shown = detections[:PER_PAGE]
        maps = a.decoder_attentions([d.query for d in shown], -1, None)
        figs = [figures.detections_figure(self.display, detections),
                figures.decoder_grid(self.display, a.grid, shown, maps, **STYLE)]
        return [serialise(f) for f in figs] if ser else figs

    def layer_head_switch(self, ser: bool) -> list:
        a = self.analysis
        layer, head = next(self.views)
        shown = a.detections(0.0)[:PER_PAGE]
        maps = a.decoder_attentions([d.query for d in shown], layer, head)
        figs = [figures.decoder_grid(self.display, a.grid, shown, maps, **STYLE)]
        figs += self._encoder_figures(layer, head)
        return [serialise(f) for f in figs] if ser else figs

    def click_point(self, ser: bool) -> list:
        a = self.analysis
        x, y = next(self.clicks)
        point = display_to_original(x, y, self.click.size, a.original_size)
        self.points = (self.points + [point])[-MAX_POINTS:]
        payload = component_payload(marked(self.click, a.original_size, a.grid, point))
        figs = self._encoder_figures(-1, None)
        return [payload] + ([serialise(f) for f in figs] if ser else figs)

    def threshold_zero(self, ser: bool) -> list:
        """The slider dragged to 0: every one of the 100 queries is a detection."""
        return self.threshold_move(ser, 0.0)

    def page_rerun(self, ser: bool) -> list:
        """Everything app.main() computes on a rerun caused by a sidebar widget (threshold,
        layer, head, opacity...): those widgets are outside the fragments, so the whole page
        reruns: summary, detections figure, decoder section, click image, encoder section."""
        a = self.analysis
        threshold = next(self.thresholds)
        kept = len(a.detections(threshold))  # summary()
        out = self.threshold_move(ser, threshold) + [kept]
        out.append(component_payload(marked(self.click, a.original_size, a.grid,
                                            self.points[-1])))
        figs = self._encoder_figures(-1, None)
        return out + ([serialise(f) for f in figs] if ser else figs)

    def _encoder_figures(self, layer: int, head: int | None) -> list:
        a = self.analysis
        maps = [a.encoder_attention(p, layer, head, INCOMING) for p in self.points]
        cell = a.grid.cell_at(*self.points[-1])
        title = f"cell {cell} of {a.feature_hw[0]}x{a.feature_hw[1]}"
        return [figures.attention_heatmap(maps[-1], title, STYLE["colorscale"], marker_cell=cell),
                figures.encoder_panels(self.display, a.grid, self.points, maps, **STYLE)]

    def payload_sizes(self) -> dict[str, int]:
        """Bytes sent to the browser per interaction (JSON of every figure, click image)."""
        return {name: sum(len(s) for s in fn(True) if isinstance(s, str))
                for name, fn in self.interactions().items()}

    def interactions(self):
        return {"threshold move": self.threshold_move, "layer/head switch": self.layer_head_switch,
                "click": self.click_point, "whole page rerun (sidebar change)": self.page_rerun,
                "threshold 0 (100 detections)": self.threshold_zero}


def keeping(analysis, counts) -> list[float]:
    """Thresholds that keep exactly ``counts`` detections (scores are distinct)."""
    scores = sorted(analysis.scores, reverse=True)
    return [float(scores[n - 1] + scores[n]) / 2 for n in counts]


def breakdown_table(page: Page, repeats: int) -> str:
    """The pieces of the interactions, one by one (13 detections, a page of 4, 4 points)."""
    a, display = page.analysis, page.display
    detections = a.detections(keeping(a, (13,))[0])
    shown = detections[:PER_PAGE]
    queries = [d.query for d in shown]
    maps = a.decoder_attentions(queries)
    encoder = [a.encoder_attention(p) for p in page.points]
    cell = a.grid.cell_at(*page.points[-1])
    grid_fig = figures.decoder_grid(display, a.grid, shown, maps, **STYLE)
    cases = {
        "detections(threshold)": lambda: a.detections(0.5),
        "decoder_attentions (4 queries)": lambda: a.decoder_attentions(queries),
        "encoder_attention x 4 points": lambda: [a.encoder_attention(p) for p in page.points],
        "detections_figure (13 boxes)": lambda: figures.detections_figure(display, detections),
        "decoder_grid (page of 4)": lambda: figures.decoder_grid(display, a.grid, shown, maps,
                                                                 **STYLE),
        "attention_heatmap": lambda: figures.attention_heatmap(encoder[-1], "t",
                                                               marker_cell=cell),
        "encoder_panels (4 points)": lambda: figures.encoder_panels(display, a.grid,
                                                                    page.points, encoder,
                                                                    **STYLE),
        "click marker + component JPEG": lambda: component_payload(
            marked(page.click, a.original_size, a.grid, page.points[-1])),
        "serialise decoder_grid": lambda: serialise(grid_fig),
    }
    times = interleaved(cases, repeats=repeats, warmup=2)
    return table(["piece", "median (IQR)"], [[k, t.seconds()] for k, t in times.items()])


def library_table(variants, repeats: int) -> tuple[str, str]:
    rows, parts = [], []
    for variant in variants:
        start = time.perf_counter()
        page = Page(variant)
        setup = time.perf_counter() - start
        name = LABEL[variant]
        cases = {}
        for label, fn in page.interactions().items():
            cases[(label, "build")] = lambda fn=fn: fn(False)
            cases[(label, "+ serialise")] = lambda fn=fn: fn(True)
        with count_forward_calls() as counter:
            times = interleaved(cases, repeats=repeats, warmup=3)
            sizes = page.payload_sizes()
        assert counter["calls"] == 0, f"the model ran {counter['calls']} times while interacting"
        if variant == variants[0]:
            parts.append(f"Pieces, {name}:\n\n{breakdown_table(page, repeats)}\n")
        grid = "x".join(map(str, page.analysis.feature_hw))
        for label in page.interactions():
            build, full = times[(label, "build")], times[(label, "+ serialise")]
            verdict = "yes" if full.median < GOAL_S else "NO"
            rows.append([name, grid, label, build.seconds(), full.seconds(),
                         f"{sizes[label] / 2**10:.0f} KiB", verdict if name == "R50" else
                         f"({verdict})"])
        parts.append(f"- {name}: analysis + page set-up {fmt_time(setup)} (once, not timed "
                     f"above); feature grid {grid}; the thresholds used keep "
                     f"{page.kept} detections; DETR.forward calls during "
                     f"all {len(cases) * (repeats + 3)} timed and warm-up interactions: "
                     f"{counter['calls']}")
    headers = ["variant", "grid", "interaction", "build", "build + serialise", "JSON/payload",
               "< 100 ms (R50 goal)"]
    return table(headers, rows), "\n".join(parts)


def apptest_table(repeats: int) -> str:
    """The whole page through streamlit.testing AppTest (server side only, no browser)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["DETR_VIZ_WEIGHTS"] = str(stand_in_weights())
    buffer = io.BytesIO()
    official_size_photo().save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    rows, stamps = [], itertools.count(1)
    st.cache_resource.clear()
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"),
                           default_timeout=600)
    at.run()
    at.radio[0].set_value("Upload a photo").run()
    start = time.perf_counter()
    at.file_uploader[0].upload("photo.jpg", data, "image/jpeg").run()  # R50 (the default)
    first = time.perf_counter() - start
    for variant in VARIANTS:
        if variant.endswith("_dc5"):
            start = time.perf_counter()
            at.sidebar.radio[1].set_value("DC5 (stride 16)").run()  # first view: analysis
            first = time.perf_counter() - start
        errors = [e.value for e in at.error] + [str(e) for e in at.exception]
        if errors:
            raise RuntimeError(f"the page failed: {errors}")
        oracle = analyze(stand_in_model(variant, planted=True), data)  # same weights as the page
        with count_forward_calls() as counter:
            times = _apptest_interactions(at, repeats, stamps, keeping(oracle, KEPT))
        for label, t in times.items():
            rows.append([LABEL[variant], label, t.seconds(), fmt_time(first),
                         str(counter["calls"])])
    return table(["variant", "interaction (whole page rerun)", "AppTest run()",
                  "first view (analysis)", "DETR.forward calls"], rows)


def _apptest_interactions(at, repeats: int, stamps, thresholds: list[float]) -> dict:
    thresholds = itertools.cycle(thresholds)
    heads = itertools.cycle(["head 1", "head 2", "mean of heads"])
    clicks = itertools.cycle([(100, 100), (600, 400), (300, 200), (50, 500)])

    def threshold():
        at.sidebar.slider(key="threshold").set_value(next(thresholds)).run()

    def head():
        at.sidebar.selectbox[2].set_value(next(heads)).run()

    def zero():
        at.sidebar.slider(key="threshold").set_value(0.0).run()

    def click():
        x, y = next(clicks)
        key = at.get("component_instance")[0].key
        at.session_state[key] = {"x": x, "y": y, "width": 720, "height": 540,
                                 "unix_time": next(stamps)}
        at.run()

    times = interleaved({"threshold move": threshold, "head switch": head, "click": click},
                        repeats=repeats, warmup=1)
    times["threshold 0 (100 detections)"] = interleaved({"zero": zero}, repeats=1)["zero"]
    at.sidebar.slider(key="threshold").set_value(next(thresholds)).run()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=30, quick_repeats=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--apptest", action="store_true",
                        help="also time whole-page reruns through streamlit's AppTest")
    args = resolve(parser.parse_args(argv))
    print_header("Interaction latency (cached analysis, planted stand-in weights)", args)
    share = CpuShare()
    rows, notes = library_table(args.variants, args.repeats)
    print("### Library + figures (what the page calls), median (IQR)\n")
    print(rows + "\n\n" + notes + "\n")
    if args.apptest:
        print("\n### Whole page through streamlit.testing AppTest (server side)\n")
        print(apptest_table(max(3, args.repeats // 5)) + "\n")
    print("\n" + share.report())


if __name__ == "__main__":
    main()
