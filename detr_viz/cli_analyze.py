"""``detr-viz analyze``: options -> :func:`detr_viz.batch.run_batch` (or its Ray twin)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from detr_viz.batch import BatchReport, BatchSettings, loaded, parse_methods, run_batch
from detr_viz.device import resolve_device
from detr_viz.errors import ArgumentError
from detr_viz.model import DEFAULT_VARIANT, DETR
from detr_viz.results import ResultStore, find_photos
from detr_viz.weights import DEVICE_ENV


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def settings_of(args: argparse.Namespace) -> BatchSettings:
    variant = args.model or (None if args.checkpoint else DEFAULT_VARIANT)
    return BatchSettings(variant, parse_methods(args.methods), args.threshold,
                         args.short_side, args.max_size, _absolute(args.checkpoint),
                         _absolute(args.labels), args.heads, args.dc5)


def device_of(args: argparse.Namespace) -> str:
    """The device option as given, else ``$DETR_VIZ_DEVICE``, else auto (checked here, so a
    missing GPU stops the run before any photo)."""
    chosen = args.device or os.environ.get(DEVICE_ENV) or "auto"
    resolve_device(chosen)
    return chosen


def say_model(model: DETR) -> None:
    """The model and its device on stderr, and a warning when weights loaded for a released
    model are not that release (:func:`detr_viz.batch.loaded`; the page shows the same)."""
    for line in loaded(model):
        print(f"detr-viz: {line}", file=sys.stderr)


def model_loader(settings: BatchSettings, device: str):
    def load() -> DETR:
        model = settings.load(device)
        say_model(model)
        return model

    return load


def run_analyze(args: argparse.Namespace) -> int:
    settings, device = settings_of(args), device_of(args)
    sources = find_photos(args.photos)
    if not sources:
        raise ArgumentError(f"no photos found in {', '.join(args.photos)} (looked for "
                            ".jpg, .png, .heic, ... files, recursively in folders).")
    store = ResultStore(args.out)
    log = lambda message: print(f"detr-viz: {message}", file=sys.stderr)  # noqa: E731
    if args.ray is not None:
        from detr_viz.ray_batch import run_batch_on_ray

        report = run_batch_on_ray(sources, settings, store, device, address=args.ray,
                                  workers=args.workers, log=log)
    else:
        report = run_batch(sources, settings, store, model_loader(settings, device), log=log)
    _print_report(report, store)
    return len(report.failed)


def _print_report(report: BatchReport, store: ResultStore) -> None:
    print(f"detr-viz: {len(report.done)} photos analysed, {len(report.skipped)} already done, "
          f"{len(report.failed)} failed; {report.detections} detections in "
          f"{store.root / 'summary.csv'}", file=sys.stderr)
    if report.failed:
        print(f"detr-viz: the failed photos and why: {store.root / 'failures.csv'}",
              file=sys.stderr)
