"""Per-method aggregates of ``detr-viz evaluate`` with 95 % bootstrap intervals: table + HTML.

Every mean comes with a percentile bootstrap interval that resamples photos, not detections
(detections of one photo share its content and its random baseline, so they are not
independent): ``resamples`` draws of the photos with replacement, the statistic recomputed
over all detections of the drawn photos, the 2.5th and 97.5th percentiles reported. Seeded,
so a rerun prints the same table.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

COLUMNS = {  # statistic -> how a row gives its value (higher is more faithful, except deletion)
    "deletion_auc": lambda r: r["deletion_auc"],
    "random_deletion_auc": lambda r: r["random_deletion_auc"],
    "insertion_auc": lambda r: r["insertion_auc"],
    "random_insertion_auc": lambda r: r["random_insertion_auc"],
    "insertion_minus_deletion": lambda r: r["insertion_auc"] - r["deletion_auc"],
    "pointing": lambda r: r["pointing"],
    "gt_energy": lambda r: r.get("gt_energy", math.nan),
}


@dataclass(frozen=True)
class Estimate:
    """A mean over detections, its 95 % bootstrap interval, and how many values it used."""

    mean: float
    low: float
    high: float
    count: int

    def text(self) -> str:
        if self.count == 0:
            return "n/a"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_mean(values: Sequence[float], groups: Sequence[object], *, resamples: int = 1000,
                   seed: int = 0) -> Estimate:
    """Mean of the finite ``values`` and its 95 % percentile interval, resampling the
    ``groups`` (one label per value, e.g. the photo) with replacement."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    keep = np.isfinite(values)
    values, groups = values[keep], groups[keep]
    if len(values) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    labels, index = np.unique(groups, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(labels), (resamples, len(labels)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(values.mean()), float(low), float(high), len(values))


def aggregate(rows: Sequence[dict], methods: Sequence[str], resamples: int = 1000
              ) -> dict[str, dict[str, Estimate]]:
    """method -> statistic (see :data:`COLUMNS`) -> :class:`Estimate`."""
    out = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        photos = [r["photo"] for r in mine]
        out[method] = {name: bootstrap_mean([get(r) for r in mine], photos, resamples=resamples)
                       for name, get in COLUMNS.items()}
    return out


def markdown(table: dict[str, dict[str, Estimate]]) -> str:
    """The aggregates as a GitHub Markdown table, one row per method."""
    header = ["method", "detections", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, stats in table.items():
        count = stats["deletion_auc"].count
        lines.append("| " + " | ".join([method, str(count), *(s.text() for s in stats.values())])
                     + " |")
    return "\n".join(lines) + "\n"


def _mean_curves(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.mean([r[key] for r in rows], axis=0)


def curves_figure(rows: Sequence[dict], methods: Sequence[str], kind: str) -> go.Figure:
    """Mean ``kind`` ("deletion" or "insertion") curve of each method and of the random order."""
    figure = go.Figure()
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        curve = _mean_curves(mine, kind)
        figure.add_scatter(x=np.linspace(0, 1, len(curve)), y=curve, name=method)
    if rows:
        curve = _mean_curves([r for r in rows if r["method"] == methods[0]], f"random_{kind}")
        figure.add_scatter(x=np.linspace(0, 1, len(curve)), y=curve, name="random order",
                           line={"dash": "dash", "color": "grey"})
    figure.update_layout(title=f"Mean {kind} curve", xaxis_title=f"fraction of tokens {kind[:-3]}"
                         "ed", yaxis_title="class probability", height=380)
    return figure


def bars_figure(table: dict[str, dict[str, Estimate]], stat: str, title: str) -> go.Figure:
    """One bar per method with its 95 % interval."""
    stats = [table[m][stat] for m in table]
    figure = go.Figure(go.Bar(
        x=list(table), y=[s.mean for s in stats],
        error_y={"type": "data", "symmetric": False, "array": [s.high - s.mean for s in stats],
                 "arrayminus": [s.mean - s.low for s in stats]}))
    figure.update_layout(title=title, height=340)
    return figure


def report_html(table: dict[str, dict[str, Estimate]], rows: Sequence[dict],
                methods: Sequence[str], title: str = "detr-viz evaluation",
                about: Sequence[str] = ()) -> str:
    """A self-contained HTML page: ``about`` (lines saying what was scored: model, weights,
    photos), the table and the plots (plotly.js embedded once)."""
    figures: list[tuple[str, Callable[[], go.Figure]]] = [
        ("deletion", lambda: curves_figure(rows, methods, "deletion")),
        ("insertion", lambda: curves_figure(rows, methods, "insertion")),
        ("gap", lambda: bars_figure(table, "insertion_minus_deletion",
                                     "Insertion AUC minus deletion AUC (higher: more faithful)")),
        ("pointing", lambda: bars_figure(table, "pointing", "Share of the map in the box")),
    ]
    head = ["method", "detections", *COLUMNS]
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in [
        m, s["deletion_auc"].count, *(e.text() for e in s.values())]) + "</tr>"
        for m, s in table.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title></head><body style='font-family:sans-serif'>",
             f"<h1>{html.escape(title)}</h1>",
             *(f"<p>{html.escape(line)}</p>" for line in about),
             "<p>Means over detections, 95 % bootstrap intervals "
             "(photos resampled) in brackets.</p><table border='1' cellpadding='4'><tr>"
             + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>"]
    for i, (_, build) in enumerate(figures):
        parts.append(pio.to_html(build(), full_html=False, include_plotlyjs=i == 0))
    return "\n".join(parts + ["</body></html>"])
