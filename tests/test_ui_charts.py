"""The page's figures skip Plotly's object model: what reaches the browser must not change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from streamlit.testing.v1 import AppTest

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


def _both_paths():
    """A page with one chart sent through PlainFigure and the same spec as a go.Figure."""
    import numpy as np
    import streamlit as st

    from detr_viz import figures
    from detr_viz.ui.charts import show

    z = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    spec = figures.attention_heatmap.spec(z, "a map", height=321, marker_cell=(1, 2))
    show(spec, key="plain", on_select="rerun", selection_mode="points")
    public = figures.figure(figures.attention_heatmap.spec(z, "a map", height=321,
                                                           marker_cell=(1, 2)))
    st.plotly_chart(public, key="public", on_select="rerun", selection_mode="points")


def _sent(at) -> dict:
    out = {}
    for element in at.get("plotly_chart"):
        proto = type(element.proto)()
        proto.CopyFrom(element.proto)
        key = "plain" if proto.id.endswith("plain") else "public"
        spec = json.loads(proto.spec)
        proto.ClearField("id")
        proto.ClearField("spec")
        out[key] = (spec, proto)
    return out


def test_streamlit_sends_a_plain_figure_exactly_as_it_sends_go_figure(caplog):
    """Pins the private detail PlainFigure relies on: Streamlit reads a figure only through
    ``to_dict``. A release that reads more fails this test (and the page falls back)."""
    at = AppTest.from_function(_both_paths, default_timeout=60).run()
    assert not at.exception, at.exception
    assert "shortcut failed" not in caplog.text  # the shortcut itself, not the fallback
    sent = _sent(at)
    assert set(sent) == {"plain", "public"}
    (plain, plain_proto), (public, public_proto) = sent["plain"], sent["public"]
    assert plain == public
    assert plain_proto == public_proto  # selection mode, theme, config: all the same
    assert plain["layout"]["height"] == 321
    assert "bdata" in plain["data"][0]["z"]  # the typed-array encoding of Plotly 6+


def test_show_takes_the_public_path_when_the_shortcut_breaks(monkeypatch, caplog):
    def broken(self):
        raise AttributeError("a release that wants figure.layout")

    monkeypatch.setattr(PlainFigure, "to_dict", broken)
    at = AppTest.from_function(_both_paths, default_timeout=60).run()
    assert not at.exception, at.exception
    sent = _sent(at)
    assert sent["plain"][0] == sent["public"][0]
    assert "PlainFigure shortcut failed (a release that wants figure.layout)" in caplog.text


def test_go_figure_still_takes_the_private_validate_keyword():
    """``figures.figure`` passes ``_validate=False`` to skip Plotly's per-property checks; pin
    that the keyword exists and skips them (an invalid property passes), and that the
    fallback without it builds the same figure."""
    spec = figures.attention_heatmap.spec(np.eye(3), "t")
    fast, checked = go.Figure(spec, _validate=False), go.Figure(spec)
    assert fast.to_dict()["data"][0]["colorscale"] == "Viridis"  # as given: not validated
    assert isinstance(checked.to_dict()["data"][0]["colorscale"], tuple | list)  # expanded
    np.testing.assert_array_equal(fast.data[0].z, checked.data[0].z)
    out_of_range = {"data": [{"type": "heatmap", "opacity": 5}]}
    assert go.Figure(out_of_range, _validate=False).data[0].opacity == 5
    with pytest.raises(ValueError):
        go.Figure(out_of_range)


def test_figure_falls_back_to_the_validating_constructor(monkeypatch):
    real = go.Figure

    def without_keyword(data=None, **kwargs):
        if "_validate" in kwargs:
            raise TypeError("unexpected keyword argument '_validate'")
        return real(data, **kwargs)

    monkeypatch.setattr(figures.go, "Figure", without_keyword)
    spec = figures.attention_heatmap.spec(np.eye(3), "t")
    assert figures.figure(spec).to_dict() == real(spec).to_dict()


def test_every_option_in_the_streamlit_config_is_one_streamlit_knows():
    """``.streamlit/config.toml`` sets options such as ``runner.postScriptGC``; Streamlit only
    warns about an option it no longer has, so a rename would silently undo the setting."""
    import tomllib

    from streamlit import config

    settings = tomllib.loads((Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml")
                             .read_text())
    keys = [f"{section}.{name}" for section, options in settings.items() for name in options]
    assert "runner.postScriptGC" in keys
    for key in keys:
        config.get_option(key)  # raises RuntimeError for an unknown option
