"""``detr-viz evaluate``: score an ``analyze`` folder, aggregate per method, write the report.

Writes into the folder: ``evaluation.csv`` (one row per detection and method), ``evaluation.md``
(the per-method table with 95 % bootstrap intervals) and ``evaluation.html`` (table and plots).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from detr_viz.batch import ProgressBar, parse_methods
from detr_viz.cli_analyze import device_of, say_model
from detr_viz.errors import ArgumentError, DetrVizError
from detr_viz.eval_report import aggregate, markdown, report_html
from detr_viz.evaluation import evaluate_photo, gt_energy, read_annotations
from detr_viz.results import ResultStore, atomic_write
from detr_viz.weights import load_model, provenance_note

CSV_COLUMNS = ("photo", "source", "query", "label", "score", "method", "deletion_auc",
               "random_deletion_auc", "insertion_auc", "random_insertion_auc", "pointing",
               "gt_energy")


def run_evaluate(args: argparse.Namespace) -> int:
    store = ResultStore(args.folder)
    records = store.records()
    if not records:
        raise ArgumentError(f"{args.folder} holds no analysed photo: run detr-viz analyze "
                            f"... --out {args.folder} first.")
    settings = records[0]["settings"]
    methods = parse_methods(args.methods or [m for m in settings["methods"]])
    truth = read_annotations(args.annotations) if args.annotations else None
    device = device_of(args)
    same = {k: settings.get(k) for k in ("labels", "heads", "dilation")}
    given = {"labels": args.labels, "heads": args.heads, "dilation": args.dc5}
    model = load_model(args.model or settings["variant"], args.checkpoint or
                       settings["checkpoint"], device=device,
                       **{k: same[k] if given[k] is None else given[k] for k in same})
    say_model(model)
    rows, failed, bar = [], 0, ProgressBar(len(records))
    for record in records:
        try:
            mine = evaluate_photo(model, record, store, methods, steps=args.steps)
            if truth is not None:
                energy = gt_energy(record, store, methods, truth.get(Path(record["source"]).name,
                                                                      []))
                for row in mine:
                    row["gt_energy"] = energy[row["query"], row["method"]]
        except (DetrVizError, OSError) as exc:
            print(f"detr-viz: skipped {record['source']}: {exc}", file=sys.stderr)
            failed += 1
            mine = []
        rows += mine
        bar.step(failed=not mine and bool(record["detections"]))
    table = aggregate(rows, methods, resamples=args.bootstrap)
    about = scored(model, len(records) - failed, failed)
    _write_csv(store.root / "evaluation.csv", rows)
    atomic_write(store.root / "evaluation.md", "".join(f"{line}\n\n" for line in about)
                 + markdown(table))
    atomic_write(store.root / "evaluation.html",
                 report_html(table, rows, methods, about=about))
    print(markdown(table))
    print(f"detr-viz: {len(rows)} scores of {len(records) - failed} photos; "
          f"{store.root / 'evaluation.html'}", file=sys.stderr)
    return failed


def scored(model, photos: int, failed: int) -> list[str]:
    """What the report scored: the model, its weights file and whether a released model's
    file is that release, and the photos."""
    spec = model.spec
    weights = Path(spec.source).name if spec.source else "built without a file"
    lines = [f"Model: {spec.title}; weights: {weights}.",
             f"Photos: {photos} scored" + (f", {failed} failed." if failed else ".")]
    note = provenance_note(spec, what="these scores describe")
    return lines + ([note] if note else [])


def _write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())
