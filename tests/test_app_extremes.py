"""Photos of extreme sizes and shapes through the page, clicked on every edge and corner; and a
photo too large to decode refused with a message while the page keeps working (AppTest)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from detr_viz.display import display_to_original

from apptest import array, assert_clean, charts, click, photo_bytes
from test_robustness import real_png_bomb


def png(width: int, height: int) -> bytes:
    if min(width, height) < 8:  # photo_bytes' random base needs a few pixels; a plain colour
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (180, 60, 40)).save(buffer, format="PNG")
        return buffer.getvalue()
    return photo_bytes((width, height), seed=width + height)


def edges_and_corners(w: int, h: int) -> list[tuple[int, int]]:
    """Displayed-pixel clicks on the four corners, the middle of each edge, and one pixel past
    the far corner (a rounding overshoot of the component)."""
    xs, ys = (0, w // 2, w - 1), (0, h // 2, h - 1)
    return [(x, y) for x in xs for y in ys if (x, y) != (w // 2, h // 2)] + [(w, h)]


@pytest.mark.parametrize("size", [(1, 1), (2, 5000), (20000, 100)], ids=str)
def test_extreme_photo_shows_every_view_and_takes_clicks_on_every_edge(app, oracle, size):
    data = png(*size)
    analysis = oracle(data)
    app.run()
    app.file_uploader(key="upload").upload("extreme.png", data, "image/png").run()
    assert_clean(app)
    width, height = size
    assert any(c.value.startswith(f"extreme.png: {width}x{height} px") for c in app.caption)
    # the click image as the component reports it: its displayed size, any aspect
    clicks = [(x, y, shown) for shown in [(720, max(1, round(720 * height / width))), (300, 300)]
              for x, y in edges_and_corners(*shown)]
    for t, (x, y, shown) in enumerate(clicks, start=1):
        click(app, x, y, *shown, t=t)
        assert_clean(app)
        point = display_to_original(x, y, shown, size)
        cell = analysis.grid.cell_at(*point)
        heatmap = charts(app)["encoder-map"]
        assert heatmap["layout"]["title"]["text"].startswith(f"cell {cell} ")
        np.testing.assert_allclose(array(heatmap["data"][0]["z"]),
                                   analysis.encoder_attention(point), rtol=1e-5, atol=1e-7)
    assert {"detections", "decoder-grid", "encoder-panels"} <= set(charts(app))


def test_photo_too_large_to_decode_is_refused_with_a_message_and_the_page_recovers(app):
    app.run()
    app.file_uploader(key="upload").upload("huge.png", real_png_bomb(11000, 11000),
                                           "image/png").run()
    assert not app.exception
    assert app.error and f"{11000 * 11000:,} pixels" in app.error[0].value
    assert "Something went wrong" not in app.error[0].value
    app.file_uploader[0].clear().upload("ok.png", png(2, 5000), "image/png").run()
    assert_clean(app)
    assert "encoder-map" in charts(app)
