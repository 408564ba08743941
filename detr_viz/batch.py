"""Analyse many photos: each one's export (NPZ + JSON per method), PNGs, and one summary.

    settings = BatchSettings("detr_resnet50", methods=("raw attention", "relevance"))
    report = run_batch(find_photos(["photos/"]), settings, ResultStore("out"), load)

One model, loaded once (``load()``, only if some photo is not done yet); the next photo is
decoded on a second thread while the current one is analysed; at most one decoded photo waits,
so memory does not grow with the folder. Each photo's files are written atomically and marked
done last (:mod:`detr_viz.results`): a rerun skips what is done and redoes what was in flight.
A photo that cannot be read or analysed is recorded with the reason and the batch goes on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from detr_viz.analysis import Analysis, analyze
from detr_viz.errors import ArgumentError, DetrVizError
from detr_viz.explain import METHODS, RAW, RELEVANCE, ROLLOUT
from detr_viz.export import View, to_json, to_npz
from detr_viz.image import load_image
from detr_viz.methods import Explainer, decoder_maps
from detr_viz.model import DETR
from detr_viz.overlay_png import overlay_png
from detr_viz.results import ResultStore

FILE_NAMES = {RAW: "raw", ROLLOUT: "rollout", RELEVANCE: "relevance"}  # method -> file stem
ALIASES = {**{v: k for k, v in FILE_NAMES.items()}, **{m: m for m in METHODS}}


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"raw,rollout,relevance"`` -> the method names of :data:`detr_viz.explain.METHODS`."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    unknown = [n for n in names if n not in ALIASES]
    if unknown or not names:
        raise ArgumentError(f"unknown method {unknown[0] if unknown else '(none)'!r}: use a comma-"
                            f"separated list of {', '.join(FILE_NAMES.values())}.")
    return tuple(dict.fromkeys(ALIASES[n] for n in names))


@dataclass(frozen=True)
class BatchSettings:
    """What a batch computes; a photo done with other settings is done again."""

    variant: str | None  # a released model; None: the checkpoint's own (see load_model)
    methods: tuple[str, ...] = (RAW,)
    threshold: float = 0.9
    short_side: int = 800  # DETR's evaluation resize
    max_size: int = 1333
    checkpoint: str | None = None  # as given; None: detr-viz's usual search (load_model)
    labels: str | None = None  # a labels file (see detr_viz.labels)
    heads: int | None = None  # what a checkpoint may not record (see load_model)
    dilation: bool | None = None

    def __post_init__(self):
        parse_methods(self.methods)
        if not 0 <= self.threshold <= 1:
            raise ArgumentError(f"threshold {self.threshold} must be between 0 and 1.")

    def key(self) -> dict:
        """The settings as stored in each photo's ``done.json``."""
        return {**asdict(self), "methods": list(self.methods)}

    def load(self, device: str | None = None) -> DETR:
        """The model these settings name, on ``device`` (see :func:`detr_viz.load_model`)."""
        from detr_viz.weights import load_model  # the batch code never needs it otherwise

        return load_model(self.variant, self.checkpoint, labels=self.labels, heads=self.heads,
                          dilation=self.dilation, device=device)


def loaded(model: DETR) -> list[str]:
    """What a run says of the model it loaded: its title and device, then the warning for a
    released model's file that is not that release (as the page shows it)."""
    from detr_viz.device import describe_device, model_device
    from detr_viz.weights import provenance_note  # the batch code never needs it otherwise

    note = provenance_note(model.spec, what="these results show")
    return [f"{model.spec.title} on {describe_device(model_device(model))}"] + (
        [note] if note else [])


def method_maps(model: DETR, analysis: Analysis, method: str, queries: list[int]) -> np.ndarray:
    """(n, h, w) maps of ``queries`` by ``method`` (raw: last layer, mean of heads)."""
    return decoder_maps(Explainer(model, analysis), method, queries)


def analyse_photo(model: DETR, image: Image.Image, source: Path, settings: BatchSettings,
                  store: ResultStore) -> dict:
    """Analyse one decoded photo and write all its files, ``done.json`` last; returns that
    record (id, source, settings, detections with boxes in original pixels, files)."""
    analysis = analyze(model, image, short_side=settings.short_side, max_size=settings.max_size)
    detections = analysis.detections(settings.threshold)
    queries = [d.query for d in detections]
    files = []
    for method in settings.methods:
        maps, view, stem = method_maps(model, analysis, method, queries), View(
            settings.threshold, method), FILE_NAMES[method]
        files.append(store.write(source, f"{stem}.npz", to_npz(analysis, view, maps)).name)
        files.append(store.write(source, f"{stem}.json", to_json(analysis, view, maps)).name)
        for det, attention in zip(detections, maps, strict=True):
            png = overlay_png(image, attention, analysis.grid, det.box)
            files.append(store.write(source, f"{stem}-q{det.query:03d}.png", png).name)
    record = {"id": store.folder(source).name, "source": str(source), "settings": settings.key(),
              "original_size": list(analysis.original_size), "files": files,
              "detections": [asdict(d) for d in detections]}
    store.finish(source, record)
    return record


@dataclass
class BatchReport:
    """What a run did: photos analysed now, skipped as already done, and failed (with why)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    detections: int = 0

    def record(self, source: Path, reason: str | None, log: Callable[[str], None],
               progress: ProgressBar) -> None:
        """One photo's outcome (``reason`` None: done), logged if it failed, and a progress step."""
        if reason is None:
            self.done.append(source)
        else:
            self.failed.append((source, reason))
            log(f"skipped {source}: {reason}")
        progress.step(failed=reason is not None)


class ProgressBar:
    """``12/50 photos [#####-----] 0.83 photo/s, ETA 0:00:45, 1 failed`` on stderr."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.stream, self.width = total, stream or sys.stderr, width
        self.start, self.count, self.failed = time.monotonic(), 0, 0

    def step(self, failed: bool = False) -> None:
        self.count += 1
        self.failed += failed
        rate = self.count / max(time.monotonic() - self.start, 1e-9)
        eta = int((self.total - self.count) / rate)
        filled = round(self.width * self.count / max(self.total, 1))
        line = (f"{self.count}/{self.total} photos [{'#' * filled}{'-' * (self.width - filled)}]"
                f" {rate:.2f} photo/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
                + (f", {self.failed} failed" if self.failed else ""))
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(("\r" + line) if tty else line + "\n")
        if tty and self.count == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _decode(source: Path) -> Image.Image | Exception:
    try:
        return load_image(source)
    except (DetrVizError, OSError) as exc:
        return exc


def pending(sources: Sequence[Path], settings: BatchSettings, store: ResultStore,
            report: BatchReport) -> list[Path]:
    """The photos not yet done with ``settings``; the others go to ``report.skipped``."""
    todo = []
    for source in sources:
        (report.skipped if store.is_done(source, settings.key()) else todo).append(source)
    return todo


def run_batch(sources: Sequence[Path], settings: BatchSettings, store: ResultStore,
              load: Callable[[], DETR], log: Callable[[str], None] = print,
              progress: ProgressBar | None = None) -> BatchReport:
    """Analyse every photo in ``sources`` not done yet (see the module docstring), then write
    the summary and failure tables. ``load()`` gives the model (called once, if needed)."""
    report = BatchReport()
    todo = pending(sources, settings, store, report)
    if todo:
        model = load()
        progress = progress or ProgressBar(len(todo))
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
            upcoming = pool.submit(_decode, todo[0])
            for i, source in enumerate(todo):
                image = upcoming.result()
                if i + 1 < len(todo):
                    upcoming = pool.submit(_decode, todo[i + 1])
                report.record(source, _analyse(model, image, source, settings, store), log,
                              progress)
                del image
    report.detections = store.write_summary(sources)
    store.write_failures(report.failed)
    return report


def _analyse(model, image, source, settings, store) -> str | None:
    """None when the photo is done; else the reason it failed."""
    if isinstance(image, Exception):
        return str(image)
    try:
        analyse_photo(model, image, source, settings, store)
    except (DetrVizError, OSError, RuntimeError, MemoryError) as exc:  # torch: out of memory
        return f"{type(exc).__name__}: {exc}"
    return None
