"""Experiment: the page's Plotly figures built as detr_viz.figures does vs built in one batch.

    python -m benchmarks.figure_build [--quick]

Evidence for a suggested change to ``detr_viz/figures.py`` (which this script does not touch):
adding traces and annotations one at a time (``fig.add_trace``, ``fig.add_annotation``) and
updating each subplot's axes separately (``update_xaxes(row=, col=)``) re-validates every
earlier item, so the cost grows with the square of the number of boxes / panels. The
"batched" builders below make the SAME figure (checked: ``to_dict()`` equal) by passing all
traces to one ``add_traces`` call, all annotations to one ``update_layout`` and all axes to
one ``update_layout``. They reuse the library's private trace helpers, so only the assembly
differs.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from benchmarks.common import (
    CpuShare,
    common_arguments,
    interleaved,
    official_size_photo,
    paired_ratio,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz import analyze, figures
from detr_viz.display import display_image
from detr_viz.figures import (
    NO_DETECTIONS,
    PALETTE,
    _box,
    _cell_heatmap,
    _describe,
    _overlay,
    _photo,
    _style,
)

TITLE = "point ({x:.0f}, {y:.0f}) -> cell ({row}, {col})"


def _axes(fig: go.Figure, row: int | None, col: int | None, photo: tuple[int, int] | None,
          cells: tuple[int, int] | None) -> dict:
    """The layout entries figures._photo_axes / _cell_axes set, for one subplot."""
    sub = fig.get_subplot(row, col) if row else None
    x_name = sub.xaxis.plotly_name if sub else "xaxis"
    y_name = sub.yaxis.plotly_name if sub else "yaxis"
    anchor = sub.yaxis.anchor if sub else "x"
    if photo is not None:
        width, height = photo
        x_range, y_range = [0, width], [height, 0]
    else:
        h, w = cells
        x_range, y_range = [-0.5, w - 0.5], [h - 0.5, -0.5]
    return {
        x_name: {"range": x_range, "constrain": "domain", "visible": False},
        y_name: {"range": y_range, "scaleanchor": anchor, "scaleratio": 1, "constrain": "domain",
                 "constraintoward": "top", "visible": False},
    }


def batched_detections_figure(display, detections, height: int = 500) -> go.Figure:
    traces = [_photo(display)]
    notes = []
    for i, det in enumerate(detections):
        color = PALETTE[i % len(PALETTE)]
        traces.append(_box(det.box, color, _describe(det)))
        notes.append({"x": det.box[0], "y": det.box[1], "text": f"{det.name} {det.score:.2f}",
                      "showarrow": False, "xanchor": "left", "yanchor": "top", "bgcolor": color,
                      "font": {"color": "white", "size": 12}})
    fig = go.Figure(traces)
    fig.update_layout(annotations=notes, **_axes(fig, None, None, display.original_size, None))
    n = len(detections)
    title = f"{n} detection{'s' if n != 1 else ''}" if n else NO_DETECTIONS
    return _style(fig, height, title)


def batched_decoder_grid(display, grid, detections, maps, *, opacity=0.6, colorscale="Viridis",
                         smooth=False, height_per_row=260) -> go.Figure:
    n = len(detections)
    if n == 0:
        return figures.decoder_grid(display, grid, detections, maps)
    titles = [f"query {d.query}: {d.name} {d.score:.2f}" for d in detections]
    fig = make_subplots(rows=2, cols=n, subplot_titles=titles + [""] * n,
                        horizontal_spacing=min(0.02, 1 / max(n - 1, 1)), vertical_spacing=0.06)
    traces, rows, cols, layout = [], [], [], {}
    for i, (det, attention) in enumerate(zip(detections, maps, strict=True)):
        traces += [_cell_heatmap(attention, colorscale, False), _photo(display),
                   _overlay(attention, grid, opacity, colorscale, smooth),
                   _box(det.box, PALETTE[i % len(PALETTE)], _describe(det))]
        rows += [1, 2, 2, 2]
        cols += [i + 1] * 4
        layout |= _axes(fig, 1, i + 1, None, grid.shape)
        layout |= _axes(fig, 2, i + 1, display.original_size, None)
    fig.add_traces(traces, rows=rows, cols=cols)
    fig.update_layout(layout)
    return _style(fig, 2 * height_per_row, None)


def batched_encoder_panels(display, grid, points, maps, *, opacity=0.6, colorscale="Viridis",
                           smooth=False, title_fmt=TITLE, height=400) -> go.Figure:
    if not points:
        return figures.encoder_panels(display, grid, points, maps)
    cells = [grid.cell_at(x, y) for x, y in points]
    titles = [title_fmt.format(x=x, y=y, row=r, col=c)
              for (x, y), (r, c) in zip(points, cells, strict=True)]
    n = len(points)
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles, horizontal_spacing=0.02)
    traces, cols, shapes, layout = [], [], [], {}
    for i, (attention, cell) in enumerate(zip(maps, cells, strict=True)):
        traces += [_photo(display), _overlay(attention, grid, opacity, colorscale, smooth)]
        cols += [i + 1, i + 1]
        sub = fig.get_subplot(1, i + 1)
        (x, y), (rx, ry) = grid.cell_center(*cell), grid.cell_radius()
        shapes.append({"type": "circle", "x0": x - rx, "x1": x + rx, "y0": y - ry, "y1": y + ry,
                       "line": {"color": "red", "width": 2},
                       "xref": sub.yaxis.anchor, "yref": sub.xaxis.anchor})
        layout |= _axes(fig, 1, i + 1, display.original_size, None)
    fig.add_traces(traces, rows=[1] * len(traces), cols=cols)
    fig.update_layout(shapes=shapes, **layout)
    return _style(fig, height, None)


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=15, quick_repeats=5)
    args = resolve(parser.parse_args(argv))
    print_header("Figure building: detr_viz.figures vs the same figures built in one batch", args)
    share = CpuShare()
    photo = official_size_photo()
    analysis = analyze(stand_in_model("detr_resnet50", planted=True), photo)
    display = display_image(photo)
    grid = analysis.grid
    rows = []
    for n in (5, 20, 50, 100):
        dets = analysis.detections(0.0)[:n]
        ours = figures.detections_figure(display, dets)
        same = ours.to_dict() == batched_detections_figure(display, dets).to_dict()
        times = interleaved({
            "library": lambda dets=dets: figures.detections_figure(display, dets),
            "batched": lambda dets=dets: batched_detections_figure(display, dets),
        }, repeats=args.repeats, warmup=1)
        rows.append([f"detections_figure, {n} boxes", times["library"].seconds(),
                     times["batched"].seconds(),
                     paired_ratio(times["library"], times["batched"]).ratio(), same])
    for n in (1, 4):
        dets = analysis.detections(0.0)[:n]
        maps = analysis.decoder_attentions([d.query for d in dets])
        same = (figures.decoder_grid(display, grid, dets, maps).to_dict()
                == batched_decoder_grid(display, grid, dets, maps).to_dict())
        times = interleaved({
            "library": lambda d=dets, m=maps: figures.decoder_grid(display, grid, d, m),
            "batched": lambda d=dets, m=maps: batched_decoder_grid(display, grid, d, m),
        }, repeats=args.repeats, warmup=1)
        rows.append([f"decoder_grid, page of {n}", times["library"].seconds(),
                     times["batched"].seconds(),
                     paired_ratio(times["library"], times["batched"]).ratio(), same])
    w, h = analysis.original_size
    points = [(w * (i + 1) / 5, h * (i + 1) / 5) for i in range(4)]
    maps = [analysis.encoder_attention(p) for p in points]
    same = (figures.encoder_panels(display, grid, points, maps).to_dict()
            == batched_encoder_panels(display, grid, points, maps).to_dict())
    times = interleaved({
        "library": lambda: figures.encoder_panels(display, grid, points, maps),
        "batched": lambda: batched_encoder_panels(display, grid, points, maps),
    }, repeats=args.repeats, warmup=1)
    rows.append(["encoder_panels, 4 points", times["library"].seconds(),
                 times["batched"].seconds(),
                 paired_ratio(times["library"], times["batched"]).ratio(), same])
    print(table(["figure", "detr_viz.figures", "batched", "library / batched",
                 "same figure (to_dict equal)"], rows))
    print("\n" + share.report())


if __name__ == "__main__":
    main()
