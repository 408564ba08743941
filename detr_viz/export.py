"""Downloads: the shown figures as one HTML page, and the shown analysis as NPZ or JSON.

What is exported is what the page shows: the kept detections at the chosen threshold and the
attention maps of the chosen layer and head, at feature resolution, with everything needed to
put them back on the photo (sizes, stride, feature grid).
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from detr_viz.analysis import INCOMING, Analysis, Direction


@dataclass(frozen=True)
class View:
    """The choices that select what the page shows (and what gets exported)."""

    threshold: float = 0.9
    encoder_layer: int = -1
    decoder_layer: int = -1
    head: int | None = None  # None: mean over heads
    direction: Direction = INCOMING
    points: tuple[tuple[float, float], ...] = ()  # encoder reference points, original pixels


def view_arrays(analysis: Analysis, view: View) -> dict[str, np.ndarray]:
    """Named arrays of the shown analysis.

    ``boxes_xyxy`` (n, 4) original pixels; ``scores`` (n,); ``labels`` (n,); ``queries`` (n,);
    ``decoder_maps`` (n, h, w); ``points_xy`` (p, 2) original pixels; ``encoder_maps``
    (p, h, w); plus the frames: ``original_size`` and ``input_size`` (width, height),
    ``feature_hw``, ``stride``.
    """
    detections = analysis.detections(view.threshold)
    queries = [d.query for d in detections]
    h, w = analysis.feature_hw
    decoder = (
        analysis.decoder_attentions(queries, view.decoder_layer, view.head)
        if queries else np.zeros((0, h, w), np.float32)
    )
    encoder = [
        analysis.encoder_attention(p, view.encoder_layer, view.head, view.direction)
        for p in view.points
    ]
    return {
        "queries": np.array(queries, dtype=np.int64),
        "labels": np.array([d.label for d in detections], dtype=np.int64),
        "names": np.array([d.name for d in detections], dtype=str),
        "scores": np.array([d.score for d in detections], dtype=np.float32),
        "boxes_xyxy": np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4),
        "decoder_maps": decoder,
        "points_xy": np.array(view.points, dtype=np.float32).reshape(-1, 2),
        "encoder_maps": np.stack(encoder) if encoder else np.zeros((0, h, w), np.float32),
        "original_size": np.array(analysis.original_size, dtype=np.int64),
        "input_size": np.array(analysis.input_size, dtype=np.int64),
        "feature_hw": np.array(analysis.feature_hw, dtype=np.int64),
        "stride": np.array(analysis.stride, dtype=np.int64),
    }


def _settings(analysis: Analysis, view: View) -> dict:
    layers = analysis.num_layers
    return {
        "variant": analysis.variant,
        "threshold": view.threshold,
        "encoder_layer": view.encoder_layer % layers,
        "decoder_layer": view.decoder_layer % layers,
        "head": "mean" if view.head is None else view.head,
        "direction": view.direction,
    }


def to_npz(analysis: Analysis, view: View) -> bytes:
    """A compressed NumPy archive of :func:`view_arrays` plus ``settings`` (a JSON string)."""
    buffer = io.BytesIO()
    settings = json.dumps(_settings(analysis, view))
    np.savez_compressed(buffer, settings=np.array(settings), **view_arrays(analysis, view))
    return buffer.getvalue()


def to_json(analysis: Analysis, view: View) -> str:
    """The same content as :func:`to_npz`, as JSON (maps as nested lists, row 0 at the top)."""
    arrays = {k: v.tolist() for k, v in view_arrays(analysis, view).items()}
    return json.dumps({"settings": _settings(analysis, view), **arrays})


def figures_html(figures: list[tuple[str, go.Figure]], title: str = "detr-viz") -> str:
    """One self-contained HTML page with a heading per figure; plotly.js is embedded once."""
    title = html.escape(title)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
             "</head><body style='font-family:sans-serif'>", f"<h1>{title}</h1>"]
    for i, (heading, figure) in enumerate(figures):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(pio.to_html(figure, full_html=False, include_plotlyjs=i == 0))
    parts.append("</body></html>")
    return "\n".join(parts)
