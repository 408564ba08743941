"""Faithfulness of a batch's maps: per detection and method, against the random baseline.

    rows = evaluate_photo(model, record, store, methods)   # one done photo of detr-viz analyze
    rows += gt_energy(rows, store, annotations)            # with COCO annotations

For each kept detection of a photo (its ``done.json``) and each method, the maps stored by
``analyze`` are scored with :func:`detr_viz.faithfulness.score_maps`: deletion and insertion
AUC next to the random order's (one seeded random order per photo, shared by its detections),
and the energy pointing game in the predicted box. A deformable model's maps are scored as the
token values they are drawn from, every level's (:func:`detr_viz.methods.decoder_tokens`,
checked to draw the stored maps); the ground-truth energy reads the stored map itself. The
photo is analysed again (one forward; it must give the same detections, or the weights
changed). Rows are cached per photo and method
(``eval-<method>-s<steps>.json``, written atomically), so an interrupted evaluation resumes.
With COCO annotations, each detection is matched to the ground-truth box of its class with the
highest IoU (at least 0.5; greedily, best score first, one box per detection) and the map's
energy inside that box is added (``gt_energy``; NaN when unmatched).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from detr_viz.analysis import analyze
from detr_viz.batch import FILE_NAMES
from detr_viz.errors import ArgumentError, DetrVizError
from detr_viz.faithfulness import pointing_energy, random_baseline, score_maps
from detr_viz.geometry import FeatureGrid
from detr_viz.methods import Explainer, decoder_tokens
from detr_viz.model import DETR
from detr_viz.results import ResultStore

Box = tuple[float, float, float, float]


def stored_maps(store: ResultStore, source: Path, method: str) -> tuple[np.ndarray, np.ndarray,
                                                                         FeatureGrid]:
    """(queries (n,), decoder maps (n, h, w), grid) of ``method`` as ``analyze`` stored them."""
    path = store.folder(source) / f"{FILE_NAMES[method]}.npz"
    if not path.is_file():
        raise ArgumentError(f"{path} is missing: analyse with --methods including "
                            f"{FILE_NAMES[method]} first.")
    with np.load(path) as npz:
        grid = FeatureGrid(tuple(int(v) for v in npz["original_size"]),
                           tuple(int(v) for v in npz["input_size"]),
                           tuple(int(v) for v in npz["feature_hw"]), int(npz["stride"]))
        return npz["queries"], npz["decoder_maps"], grid


def _cache_name(method: str, steps: int) -> str:
    return f"eval-{FILE_NAMES[method]}-s{steps}.json"


def evaluate_photo(model: DETR, record: Mapping, store: ResultStore, methods: Sequence[str], *,
                   steps: int = 8, seed: int = 0) -> list[dict]:
    """One row per (detection, method): ``photo, query, label, method, deletion_auc,
    insertion_auc, random_deletion_auc, random_insertion_auc, pointing`` and the curves."""
    source = Path(record["source"])
    cached = {m: _read_rows(store.folder(source) / _cache_name(m, steps)) for m in methods}
    missing = [m for m in methods if cached[m] is None]
    if missing:
        for method, rows in _score(model, record, store, missing, steps, seed).items():
            store.write(source, _cache_name(method, steps), json.dumps(rows))
            cached[method] = rows
    return [row for m in methods for row in cached[m]]


def _read_rows(path: Path) -> list[dict] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _score(model: DETR, record: Mapping, store: ResultStore, methods: Sequence[str],
           steps: int, seed: int) -> dict[str, list[dict]]:
    source, settings = Path(record["source"]), record["settings"]
    analysis = analyze(model, source, short_side=settings["short_side"],
                       max_size=settings["max_size"])
    kept = [d.query for d in analysis.detections(settings["threshold"])]
    if kept != [d["query"] for d in record["detections"]]:
        raise DetrVizError(f"{source} now gives other detections than when it was analysed: "
                           "evaluate with the same model and checkpoint as analyze used.")
    baseline = random_baseline(model, analysis, steps=steps, seed=seed)
    maps = {m: stored_maps(store, source, m)[1] for m in methods}
    if analysis.sparse:
        maps = {m: _tokens_of(model, analysis, m, kept, maps[m], source) for m in methods}
    out: dict[str, list[dict]] = {m: [] for m in methods}
    for i, det in enumerate(record["detections"]):
        query, label = det["query"], det["label"]
        scores = score_maps(model, analysis, query, {m: maps[m][i] for m in methods},
                            label=label, steps=steps, baseline=baseline)
        random_deletion, random_insertion = baseline.curves(query, label)
        for method, s in scores.items():
            out[method].append({
                "photo": record["id"], "source": str(source), "query": query, "label": label,
                "score": det["score"], "method": method, "deletion_auc": s.deletion.auc,
                "insertion_auc": s.insertion.auc, "random_deletion_auc": random_deletion.auc,
                "random_insertion_auc": random_insertion.auc, "pointing": s.pointing,
                "deletion": s.deletion.probability.tolist(),
                "insertion": s.insertion.probability.tolist(),
                "random_deletion": random_deletion.probability.tolist(),
                "random_insertion": random_insertion.probability.tolist()})
    return out


def _tokens_of(model, analysis, method: str, queries: list[int], stored: np.ndarray,
               source: Path) -> np.ndarray:
    """A deformable model's token values (n, S) behind the maps ``analyze`` stored (last
    layer, mean of heads, every level: what it draws), checked to draw those maps."""
    values = decoder_tokens(Explainer(model, analysis), method, queries)
    drawn = analysis.drawn(values)
    if drawn.shape != stored.shape or not np.allclose(drawn, stored, rtol=1e-4,
                                                      atol=1e-6 * max(np.abs(stored).max(), 1)):
        raise DetrVizError(f"{source}'s stored {method} maps are not the model's now: evaluate "
                           "with the same model and checkpoint as analyze used.")
    return values


# --- ground truth --------------------------------------------------------------------------

def read_annotations(path: str | Path) -> dict[str, list[tuple[int, Box]]]:
    """COCO instances JSON -> file name -> [(category id, (x0, y0, x1, y1) pixels)], crowd
    regions left out."""
    try:
        data = json.loads(Path(path).read_text())
        names = {image["id"]: image["file_name"] for image in data["images"]}
        out: dict[str, list[tuple[int, Box]]] = {}
        for a in data["annotations"]:
            if a.get("iscrowd"):
                continue
            x, y, w, h = a["bbox"]
            out.setdefault(Path(names[a["image_id"]]).name, []).append(
                (int(a["category_id"]), (x, y, x + w, y + h)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArgumentError(f"{path} is not a readable COCO instances file (images, "
                            f"annotations with image_id, category_id, bbox): {exc}") from exc
    return out


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def match_boxes(detections: Sequence[Mapping], truth: Sequence[tuple[int, Box]],
                min_iou: float = 0.5) -> dict[int, Box]:
    """query -> its ground-truth box: same class, best IoU >= ``min_iou``, detections taken
    best score first, each box matched once."""
    free, out = list(truth), {}
    for det in sorted(detections, key=lambda d: -d["score"]):
        best = max(((iou(tuple(det["box"]), box), k) for k, (label, box) in enumerate(free)
                    if label == det["label"]), default=(0.0, -1))
        if best[0] >= min_iou:
            out[det["query"]] = free.pop(best[1])[1]
    return out


def gt_energy(record: Mapping, store: ResultStore, methods: Sequence[str],
              truth: Sequence[tuple[int, Box]]) -> dict[tuple[int, str], float]:
    """(query, method) -> share of the stored map's energy inside the matched ground-truth box
    (original pixels); NaN for an unmatched detection."""
    matched = match_boxes(record["detections"], truth)
    source, out = Path(record["source"]), {}
    for method in methods:
        queries, maps, grid = stored_maps(store, source, method)
        for query, attention in zip(queries.tolist(), maps, strict=True):
            box = matched.get(query)
            out[query, method] = (pointing_energy(attention, grid, box) if box is not None
                                  else float("nan"))
    return out
