"""The page's figures skip Plotly's object model: what reaches the browser must not change."""

from __future__ import annotations

import json

import plotly.io as pio

from detr_viz import figures
from detr_viz.display import display_image
from detr_viz.ui.charts import PlainFigure

from test_figures import GRID16, GRID32, Detection, one_hot, photo


def test_plain_specs_send_exactly_what_the_figures_would():
    display = display_image(photo(), max_side=400)
    dets = [Detection(i, 1, "person", 0.9, (10.0 * i, 20.0, 300.0, 400.0)) for i in range(3)]
    m32, m16 = one_hot(GRID32, 3, 4), one_hot(GRID16, 7, 9)
    cases = [
        (figures.detections_figure, (display, dets), {}),
        (figures.attention_heatmap, (m32, "t"), {"marker_cell": (3, 4)}),
        (figures.decoder_grid, (display, GRID32, dets, [m32] * 3), {"titles": ["a", "b", "c"]}),
        (figures.decoder_grid, (display, GRID32, [], m32[None][:0]), {}),
        (figures.encoder_panels, (display, GRID16, [(10, 10), (900, 700)], [m16, m16]), {}),
        (figures.attention_overlay, (display, m16, GRID16), {"box": (1, 2, 3, 4)}),
    ]
    for builder, args, kwargs in cases:
        sent = pio.to_json(PlainFigure(builder.spec(*args, **kwargs)).to_dict(), validate=False)
        expected = pio.to_json(builder(*args, **kwargs).to_dict(), validate=False)
        assert json.loads(sent) == json.loads(expected), builder.__name__
