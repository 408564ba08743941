"""Downloads: the shown figures as one HTML page, and the shown analysis as NPZ or JSON.

What is exported is what the page shows: the kept detections at the chosen threshold and the
maps of the chosen explanation method (raw attention of the chosen layer and head, rollout or
relevance), at feature resolution, with everything needed to put them back on the photo (sizes,
stride, feature grid), and the faithfulness scores computed so far. The settings name the
weights file and say whether a released variant's file is that release byte for byte.
Deformable models add the kept detections' sampling points in the chosen decoder layer (photo
pixels, with their weights) and the reference boxes of every layer.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from detr_viz.analysis import INCOMING, Analysis, Direction
from detr_viz.errors import ArgumentError
from detr_viz.explain import METHODS, RAW
from detr_viz.faithfulness import Score
from detr_viz.methods import level_argument


@dataclass(frozen=True)
class View:
    """The choices that select what the page shows (and what gets exported)."""

    threshold: float = 0.9
    method: str = RAW  # one of detr_viz.explain.METHODS
    decoder_layer: int = -1  # raw attention only, as the heads
    decoder_head: int | None = None  # None: mean over heads
    encoder_layer: int = -1
    encoder_head: int | None = None
    direction: Direction = INCOMING
    points: tuple[tuple[float, float], ...] = ()  # encoder reference points, original pixels
    target: int | None = None  # the detection whose relevance the encoder maps show
    decoder_level: int | None = None  # deformable models: one feature level (None: all)
    encoder_level: int | None = None  # a deformable encoder: the clicked token's level

    def __post_init__(self):
        if self.method not in METHODS:
            raise ArgumentError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}.")


Scores = Mapping[int, Mapping[str, Score]]  # query -> method -> score


def view_arrays(analysis: Analysis, view: View, decoder_maps: np.ndarray | None = None,
                encoder_maps: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Named arrays of the shown analysis.

    ``boxes_xyxy`` (n, 4) original pixels; ``scores`` (n,); ``labels`` (n,); ``queries`` (n,);
    ``decoder_maps`` (n, h, w); ``points_xy`` (p, 2) original pixels; ``encoder_maps``
    (p, h, w); plus the frames: ``original_size`` and ``input_size`` (width, height),
    ``feature_hw``, ``stride``. Raw attention is read off ``analysis``; for rollout and
    relevance the caller passes the maps it shows (``decoder_maps`` of the kept queries in
    order, ``encoder_maps`` of ``view.points``).

    Deformable models (:mod:`detr_viz.deformable`; maps on the finest level's grid, whose
    stride ``stride`` is) add ``sampling_xy`` (n, heads, levels, points, 2) photo pixels, NaN
    on padding slots, and ``sampling_weights`` (n, heads, levels, points) of the kept queries
    in the chosen decoder layer; ``references_xyxy`` (n, decoder layers + 1, 4): the reference
    each layer started from, then the final box; ``level_shapes`` (levels, 2) and
    ``level_strides`` (levels,). A model without an encoder exports no encoder maps.
    """
    detections = analysis.detections(view.threshold)
    queries = [d.query for d in detections]
    h, w = analysis.feature_hw
    if decoder_maps is None:
        if view.method != RAW and queries:
            raise ArgumentError(f"pass the {view.method} maps of the kept detections.")
        level = level_argument(analysis, view.decoder_level)
        decoder_maps = (analysis.decoder_attentions(queries, view.decoder_layer,
                                                    view.decoder_head, **level)
                        if queries else np.zeros((0, h, w), np.float32))
    if analysis.num_layers == 0:  # no encoder (LW-DETR, RF-DETR): nothing around the points
        encoder_maps = []
    elif encoder_maps is None:
        if view.method != RAW and view.points:
            raise ArgumentError(f"pass the {view.method} maps of the chosen points.")
        level = level_argument(analysis, view.encoder_level)
        encoder_maps = [analysis.encoder_attention(p, view.encoder_layer, view.encoder_head,
                                                   view.direction, **level)
                        for p in view.points]
    decoder_maps = np.asarray(decoder_maps, dtype=np.float32).reshape(-1, h, w)
    if len(decoder_maps) != len(queries) or (
            len(encoder_maps) != len(view.points) and analysis.num_layers):
        raise ArgumentError(f"{len(decoder_maps)} decoder maps for {len(queries)} detections, "
                            f"{len(encoder_maps)} encoder maps for {len(view.points)} points.")
    return {
        **(_sampling_arrays(analysis, queries, view.decoder_layer) if analysis.sparse else {}),
        "queries": np.array(queries, dtype=np.int64),
        "labels": np.array([d.label for d in detections], dtype=np.int64),
        "names": np.array([d.name for d in detections], dtype=str),
        "scores": np.array([d.score for d in detections], dtype=np.float32),
        "boxes_xyxy": np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4),
        "decoder_maps": decoder_maps,
        "points_xy": np.array(view.points, dtype=np.float32).reshape(-1, 2),
        "encoder_maps": (np.stack(encoder_maps).astype(np.float32) if len(encoder_maps)
                         else np.zeros((0, h, w), np.float32)),
        "original_size": np.array(analysis.original_size, dtype=np.int64),
        "input_size": np.array(analysis.input_size, dtype=np.int64),
        "feature_hw": np.array(analysis.feature_hw, dtype=np.int64),
        "stride": np.array(analysis.stride, dtype=np.int64),
    }


def _sampling_arrays(analysis: Analysis, queries: list[int], layer: int) -> dict:
    heads, levels, count = analysis.capture.decoder.weights.shape[2:]
    points = [analysis.sampling_points(q, layer) for q in queries]
    return {
        "sampling_xy": (np.stack([p.locations.numpy() for p in points]) if points else
                        np.zeros((0, heads, levels, count, 2))).astype(np.float32),
        "sampling_weights": (np.stack([p.weights.numpy() for p in points]) if points else
                             np.zeros((0, heads, levels, count))).astype(np.float32),
        "references_xyxy": np.array([analysis.anchor_boxes(q) for q in queries],
                                    dtype=np.float32).reshape(
                                        len(queries), analysis.num_decoder_layers + 1, 4),
        "level_shapes": np.array(analysis.level_shapes, dtype=np.int64),
        "level_strides": np.array(analysis.strides, dtype=np.int64),
    }


def _settings(analysis: Analysis, view: View) -> dict:
    def head(h):
        return "mean" if h is None else h

    encoder = analysis.num_layers
    return {
        "variant": analysis.variant,
        "model": analysis.spec.title,
        **_weights(analysis.spec),
        "threshold": view.threshold,
        "method": view.method,
        "encoder_layer": view.encoder_layer % encoder if encoder else None,
        "encoder_head": head(view.encoder_head) if encoder else None,
        "decoder_layer": view.decoder_layer % analysis.num_decoder_layers,
        "decoder_head": head(view.decoder_head),
        "direction": view.direction,
        "relevance_target": view.target,
        **({"decoder_level": view.decoder_level, "encoder_level": view.encoder_level}
           if analysis.sparse else {}),
    }


def _weights(spec) -> dict:
    """The weights file's name (not its folder: an export is shared) and whether it is the
    official release byte for byte: True or False for a released variant's checkpoint (a
    file under the official name can be anything), None where that cannot be asked (a
    fine-tuned or other family's checkpoint, a Hugging Face port, a model without a file)."""
    from detr_viz.weights import weights_provenance  # SHA-256 once per file and process

    kind = weights_provenance(spec)
    return {"checkpoint": Path(spec.source).name if spec.source else None,
            "official_release": None if kind in (None, "huggingface") else kind == "official"}


def scores_record(scores: Scores) -> list[dict]:
    """Faithfulness scores as plain JSON: one entry per (query, method), curves included."""
    out = []
    for query, by_method in sorted(scores.items()):
        for method, s in by_method.items():
            out.append({
                "query": int(query), "label": s.label, "method": method,
                "deletion_auc": s.deletion.auc, "insertion_auc": s.insertion.auc,
                "pointing": s.pointing, "fractions": s.deletion.fractions.tolist(),
                "deletion": s.deletion.probability.tolist(),
                "insertion": s.insertion.probability.tolist(),
            })
    return out


def to_npz(analysis: Analysis, view: View, decoder_maps=None, encoder_maps=None,
           scores: Scores | None = None) -> bytes:
    """A compressed NumPy archive of :func:`view_arrays` plus ``settings`` and
    ``faithfulness`` (JSON strings)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, settings=np.array(json.dumps(_settings(analysis, view))),
        faithfulness=np.array(json.dumps(scores_record(scores or {}))),
        **view_arrays(analysis, view, decoder_maps, encoder_maps))
    return buffer.getvalue()


def to_json(analysis: Analysis, view: View, decoder_maps=None, encoder_maps=None,
            scores: Scores | None = None) -> str:
    """The same content as :func:`to_npz`, as JSON (maps as nested lists, row 0 at the top)."""
    arrays = {k: v.tolist() for k, v in view_arrays(analysis, view, decoder_maps,
                                                    encoder_maps).items()}
    return json.dumps({"settings": _settings(analysis, view),
                       "faithfulness": scores_record(scores or {}), **arrays})


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
