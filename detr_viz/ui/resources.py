"""What the page keeps across reruns: models, photos, analyses and explanation maps.

Cached at the boundary (STYLE.md): a model once per choice (variant or checkpoint, with its
labels), an analysis once per (photo, model), rollout and the random baseline once per
analysis, relevance once per (analysis, query) and faithfulness scores once per (map, query).
Every slider move, page, click and method switch afterwards is a cheap function of these.

Models are kept (two at most); everything else shares one :class:`~detr_viz.cache.ByteCache`
across sessions, bounded by ``$DETR_VIZ_CACHE_BYTES`` (default 2 GiB): least recently used out.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from detr_viz import DETR, Analysis, analyze, explain, faithfulness, load_image, memory
from detr_viz.cache import ByteCache, budget_from_env
from detr_viz.catalog import Found, find_checkpoints
from detr_viz.display import DisplayImage, display_image
from detr_viz.labels import LabelsFile
from detr_viz.model import VARIANTS
from detr_viz.spec import ModelSpec
from detr_viz.weights import (
    checkpoint_provenance,
    find_checkpoint,
    load_model,
    resolve_checkpoint,
)

CLICK_SIDE = 720  # longest side of the JPEG sent to the click component, pixels
PANEL_SIDE, PANEL_QUALITY = 400, 80  # the JPEG in small panels (grids, comparisons): ~240-450
# px wide on the page; 352 -> 248 KiB for a page of 4 decoder maps (benchmarks/page.py bytes)


@dataclass(frozen=True)
class Photo:
    """A decoded photo and its browser-sized copies (cached per file content)."""

    digest: str
    image: Image.Image  # oriented RGB, original pixels
    display: DisplayImage  # JPEG for the large Plotly figures
    panel: DisplayImage  # smaller JPEG for figures of many small panels
    click: Image.Image  # small copy for the click component


@dataclass(frozen=True)
class ModelChoice:
    """What the sidebar chose: a released ``variant`` (its checkpoint found or downloaded), or
    a ``checkpoint`` path with what the user added (class names, heads, DC5)."""

    variant: str | None = None
    checkpoint: str | None = None
    labels: LabelsFile | None = None
    heads: int | None = None
    dilation: bool | None = None

    @property
    def key(self) -> tuple:
        return self.variant, self.checkpoint, self.labels, self.heads, self.dilation


@dataclass(frozen=True)
class Run:
    """One model and its analysis of the photo: what every section draws from."""

    choice: ModelChoice  # with the checkpoint path resolved
    model: DETR
    analysis: Analysis

    @property
    def key(self) -> tuple:
        return self.choice.key

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def variant(self) -> str:
        """The released variant's name, or the checkpoint's."""
        return self.spec.name

    @property
    def checkpoint(self) -> str:
        return self.choice.checkpoint or ""


@st.cache_resource(show_spinner=False, max_entries=2)
def get_model(choice: ModelChoice) -> DETR:
    return load_model(choice.variant, checkpoint=choice.checkpoint, labels=choice.labels,
                      heads=choice.heads, dilation=choice.dilation, download=False)


@st.cache_resource(show_spinner=False, ttl=30)
def found_checkpoints() -> list[Found]:
    """Checkpoints on disk for the picker (looked for again after 30 s: new files appear)."""
    return find_checkpoints()


@st.cache_resource(show_spinner=False, max_entries=4)
def get_provenance(variant: str, checkpoint: str) -> str:
    return checkpoint_provenance(checkpoint, variant)


@st.cache_resource(show_spinner=False)
def cache() -> ByteCache:
    """The page's one byte-bounded cache, shared by every session (keys say whose it is)."""
    return ByteCache(budget_from_env(), after_work=memory.release_soon)


def get_photo(digest: str, data: bytes) -> Photo:
    return cache().get(("photo", digest), lambda: _photo(digest, data))


def _photo(digest: str, data: bytes) -> Photo:
    image = load_image(data)
    scale = min(1.0, CLICK_SIDE / max(image.size))  # never enlarged, never a full-size copy
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    click = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    panel = display_image(image, PANEL_SIDE, PANEL_QUALITY)
    return Photo(digest, image, display_image(image), panel, click)


def get_analysis(digest: str, choice: ModelChoice, photo: Photo) -> Analysis:
    return cache().get(("analysis", digest, *choice.key),
                       lambda: analyze(get_model(choice), photo.image))


def ensure_checkpoint(variant: str) -> str:
    """Path of the variant's checkpoint, downloading it (with a progress bar) on first use."""
    path = find_checkpoint(variant)
    if path is None:
        name = VARIANTS[variant].checkpoint
        bar = st.progress(0.0, text=f"Downloading {name} (first run only)...")

        def progress(done: int, total: int | None) -> None:
            text = f"Downloading {name}: {done / 2**20:.0f}"
            text += f" of {total / 2**20:.0f} MB" if total else " MB"
            bar.progress(min(done / total, 1.0) if total else 0.0, text=text)

        try:
            path = resolve_checkpoint(variant, progress=progress)
        finally:  # on a failed download too: the error is shown alone, not under a stale bar
            bar.empty()
    return str(Path(path))


def get_run(photo: Photo, choice: ModelChoice) -> Run:
    if choice.variant is not None:
        choice = dataclasses.replace(choice, checkpoint=ensure_checkpoint(choice.variant))
    name = choice.variant or Path(choice.checkpoint or "").name
    with st.spinner(f"Running {name} on the photo (once per photo and model)..."):
        analysis = get_analysis(photo.digest, choice, photo)
    return Run(choice, get_model(choice), analysis)


class Store:
    """Per-analysis results computed on demand, keyed by whatever identifies them."""

    def __init__(self) -> None:
        self.items: dict = {}
        self.lock = threading.Lock()

    def missing(self, keys: Sequence) -> list:
        return [k for k in keys if k not in self.items]


def _store_key(photo: Photo, run: Run, what: str) -> Hashable:
    return ("store", photo.digest, *run.key, what)


def get_store(photo: Photo, run: Run, what: str) -> Store:
    return cache().get(_store_key(photo, run, what), Store)


@contextmanager
def editing(photo: Photo, run: Run, what: str) -> Iterator[Store]:
    """The store, locked, with room made for the work the block does (the cache's
    ``working``); measured again afterwards (what was added counts against the budget)."""
    key = _store_key(photo, run, what)
    store = cache().get(key, Store)
    with store.lock:
        start = time.perf_counter()
        try:
            with cache().working(("store", what)):  # room for what the block computes
                yield store
        finally:  # a computation that failed half-way may still have added entries
            cache().remeasure(key, worked=time.perf_counter() - start)


def rollout(photo: Photo, run: Run):
    with st.spinner("Computing attention rollout (once per photo and backbone)..."):
        return cache().get(("rollout", photo.digest, *run.key),
                           lambda: explain.rollout(run.analysis))


def relevance(photo: Photo, run: Run, queries: Sequence[int]) -> np.ndarray:
    """(n, h, w) relevance maps, computing only queries never explained before (spinner)."""
    with editing(photo, run, "relevance") as store:
        todo = store.missing(queries)
        if todo:
            with st.spinner(f"Computing relevance for {len(todo)} detection(s) (once each): "
                            "one backward pass per detection..."):
                for query, heat in zip(todo, explain.relevance(run.model, run.analysis, todo),
                                       strict=True):
                    store.items[query] = heat
    h, w = run.analysis.feature_hw
    return np.stack([store.items[q] for q in queries]) if queries else np.zeros((0, h, w))


def encoder_relevance(photo: Photo, run: Run, query: int):
    with editing(photo, run, "encoder-relevance") as store:
        if query not in store.items:
            with st.spinner(f"Computing the encoder's relevance for query {query} (once)..."):
                store.items.clear()  # DC5: 270 MB per query; keep one
                store.items[query] = explain.encoder_relevance(run.model, run.analysis, query)
        return store.items[query]


def with_progress(text: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress bar and its (update, close) functions, for long on-demand computations."""
    bar = st.progress(0.0, text=text)

    def update(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"{text} ({done} of {total} transformer runs)")

    return update, bar.empty


def baseline(photo: Photo, run: Run) -> faithfulness.RandomBaseline:
    with editing(photo, run, "baseline") as store:
        if "random" not in store.items:
            update, done = with_progress("Random-order baseline (once per photo)")
            store.items["random"] = faithfulness.random_baseline(run.model, run.analysis,
                                                                 progress=update)
            done()
        return store.items["random"]


def scores(photo: Photo, run: Run, query: int, maps: dict[str, np.ndarray],
           tag: str) -> dict[str, faithfulness.Score]:
    """Faithfulness of each named map of ``query`` (cached by ``tag`` + name: a method, with
    layer and head for raw attention)."""
    base = baseline(photo, run)
    with editing(photo, run, "scores") as store:
        todo = {name: m for name, m in maps.items() if (query, tag, name) not in store.items}
        if todo:
            update, done = with_progress(f"Scoring query {query}: deleting and inserting tokens")
            found = faithfulness.score_maps(run.model, run.analysis, query, todo, baseline=base,
                                            progress=update)
            done()
            store.items.update({(query, tag, name): s for name, s in found.items()})
        return {name: store.items[(query, tag, name)] for name in maps}


def known_scores(photo: Photo, run: Run, query: int, tag: str, name: str):
    """A score computed before, or None (never computes)."""
    return get_store(photo, run, "scores").items.get((query, tag, name))
