"""Plotly figures to the browser without Plotly's object model.

``st.plotly_chart`` turns any figure into a dict (``figure.to_dict()``) and that dict into JSON.
Building a ``go.Figure`` from a spec and turning it back costs ~40 ms for a page of decoder maps,
more than everything else in a rerun, so the page hands over the builders' plain specs
(``detr_viz.figures.<builder>.spec``) in :class:`PlainFigure`, whose ``to_dict`` is the spec.
Arrays go as plotly.js typed arrays (base64), as ``to_dict`` would make them.

This leans on two details that are not public API: Streamlit reads a figure only through
``plotly.tools.return_figure_from_figure_or_data`` (which calls ``to_dict`` on a ``BaseFigure``),
and Plotly 6+ encodes arrays as ``bdata``. ``tests/test_ui_charts.py`` pins both against the
public path (``st.plotly_chart(go.Figure(spec))``) on every release; should a release break the
shortcut with an error, :func:`show` takes the public path instead.
"""

from __future__ import annotations

import base64
import functools
import logging

import numpy as np
import plotly.io as pio
import streamlit as st
from plotly.basedatatypes import BaseFigure

from detr_viz import figures

_LOG = logging.getLogger(__name__)
_DTYPES = {np.dtype(np.float32): "f4", np.dtype(np.float64): "f8"}


class PlainFigure(BaseFigure):
    """A figure that is only its spec: all ``st.plotly_chart`` reads of a figure is its dict."""

    def __new__(cls, spec: dict):
        figure = object.__new__(cls)
        figure._spec = spec
        return figure

    def __init__(self, spec: dict):  # noqa: D107 - nothing of BaseFigure is built
        pass

    def to_dict(self) -> dict:
        layout = {k: v for k, v in self._spec["layout"].items() if v is not None}
        return {"data": [_typed(trace) for trace in self._spec["data"]],
                "layout": {"template": _template(), **layout}}


@functools.cache
def _template() -> dict:
    """The default template that ``go.Figure`` puts into every layout."""
    return pio.templates[pio.templates.default].to_plotly_json()


def _typed(trace: dict) -> dict:
    """The trace as ``to_dict`` gives it: unset (None) properties dropped, arrays encoded."""
    out = {k: v for k, v in trace.items() if v is not None}
    for key, value in out.items():
        if isinstance(value, np.ndarray) and value.dtype in _DTYPES:
            data = np.ascontiguousarray(value)
            out[key] = {"dtype": _DTYPES[value.dtype], "shape": ", ".join(map(str, value.shape)),
                        "bdata": base64.b64encode(data.tobytes()).decode("ascii")}
        elif isinstance(value, np.ndarray):
            out[key] = value.tolist()
    return out


def show(spec: dict, key: str, **kwargs):
    """``st.plotly_chart`` of a builder's spec (``kwargs``: on_select, selection_mode, ...)."""
    try:
        return st.plotly_chart(PlainFigure(spec), key=key, **kwargs)
    except (AttributeError, TypeError) as error:
        # A release that reads more of a figure than ``to_dict`` fails here, before the chart
        # is registered; the public path is slower but always right.
        _LOG.warning("PlainFigure shortcut failed (%s); using go.Figure", error)
        return st.plotly_chart(figures.figure(spec), key=key, **kwargs)
