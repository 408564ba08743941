"""What the page keeps across reruns: models, photos, analyses and explanation maps.

Cached at the boundary (STYLE.md): a model once per choice (variant or checkpoint, with its
labels), an analysis once per (photo, model), rollout and the random baseline once per
analysis, relevance once per (analysis, query) and faithfulness scores once per (map, query).
Every slider move, page, click and method switch afterwards is a cheap function of these.

Models are kept (two at most); everything else shares one :class:`~detr_viz.cache.ByteCache`
across sessions, bounded by ``$DETR_VIZ_CACHE_BYTES`` (default 2 GiB): least recently used out.

What a session keeps between script runs refers to the cache's entries without holding them
(:class:`PhotoRef`, :class:`RunRef`, :func:`fragment`): Streamlit keeps a fragment's arguments
and a download's callable for the session's life, and a closed session's for two minutes more
(``server.disconnectedSessionTTL``, for a reconnect), and what they held could not be dropped.
Only :func:`on_screen` holds a session's photo and analyses, while the session is connected.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
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
    data: bytes = field(default=b"", repr=False)  # the file as dropped: what it is decoded from


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
    photo: Photo  # the photo analysed

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
    return Photo(digest, image, display_image(image), panel, click, data)


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
    return _run(photo, choice, get_model)


def _run(photo: Photo, choice: ModelChoice, model: Callable[[ModelChoice], DETR],
         quiet: bool = False) -> Run:
    """A spinner while the analysis is computed, none when it is cached (a fragment looks its
    run up at each interaction) or ``quiet`` (off the script's thread: no page to show it)."""
    name = choice.variant or Path(choice.checkpoint or "").name
    cached = ("analysis", photo.digest, *choice.key) in cache()
    with nullcontext() if quiet or cached else st.spinner(
            f"Running {name} on the photo (once per photo and model)..."):
        analysis = get_analysis(photo.digest, choice, photo)
    return Run(choice, model(choice), analysis, photo)


def _released(shown: dict) -> None:
    """A session disconnected: its photo and analyses may go, and the memory its work freed
    goes back to the system (its pages stayed with the allocator until the next work)."""
    shown.clear()
    memory.release_soon()


@st.cache_resource(show_spinner=False, scope="session", on_release=_released)
def _shown() -> dict:
    return {}


def on_screen(*shown: Photo | Run | None) -> None:
    """Hold what this session shows (its photo and runs) until its next full run, or until it
    disconnects: Streamlit drops a session's session-scoped resources then, not two minutes
    later. The cache makes room for work without dropping what is held (the session's next
    interaction finds it), and a closed session's may go at once."""
    held = _shown()
    held.clear()
    held["now"] = shown


@dataclass(frozen=True, eq=False)
class PhotoRef:
    """A photo as a session keeps it between script runs: looked up in the page's cache by its
    digest, decoded again from its bytes if the cache dropped it."""

    digest: str
    data: bytes = field(repr=False)

    @classmethod
    def of(cls, photo: Photo) -> PhotoRef:
        return cls(photo.digest, photo.data)

    def get(self, quiet: bool = False) -> Photo:  # noqa: ARG002 - a decode needs no spinner
        return get_photo(self.digest, self.data)


@dataclass(frozen=True, eq=False)
class RunRef:
    """A :class:`Run` as a session keeps it between script runs: its analysis looked up in the
    page's cache (computed again if the cache dropped it), its model held weakly (the model
    cache's own while it keeps it)."""

    photo: PhotoRef
    choice: ModelChoice  # with the checkpoint path resolved
    model: weakref.ref = field(repr=False)

    @classmethod
    def of(cls, run: Run) -> RunRef:
        return cls(PhotoRef.of(run.photo), run.choice, weakref.ref(run.model))

    def get(self, quiet: bool = False) -> Run:
        """``quiet``: no spinner should the analysis be computed again (off the script's
        thread: a download being built)."""
        def model(choice: ModelChoice) -> DETR:
            kept = self.model()
            return kept if kept is not None else get_model(choice)

        return _run(self.photo.get(), self.choice, model, quiet)


def held(value):
    """What a session may keep of ``value`` between script runs: a reference for a Photo or a
    Run, anything else as it is."""
    return PhotoRef.of(value) if isinstance(value, Photo) else \
        RunRef.of(value) if isinstance(value, Run) else value


def looked_up(value, quiet: bool = False):
    """The Photo or Run a :func:`held` reference refers to, anything else as it is."""
    return value.get(quiet) if isinstance(value, PhotoRef | RunRef) else value


def fragment(section: Callable[..., None]) -> Callable[..., None]:
    """``st.fragment`` for a section of the page that takes Photo and Run arguments.

    Streamlit keeps a fragment's arguments to run it again alone, for the session's life and a
    closed session's two minutes more: the photo and analyses there could not leave the page's
    cache. The section gets them as :func:`held` references instead, looked up again at each of
    its runs (a dictionary lookup while cached, recomputed under a spinner if dropped).
    """
    @st.fragment
    @functools.wraps(section)
    def alone(*args, **kwargs):
        return section(*map(looked_up, args), **{k: looked_up(v) for k, v in kwargs.items()})

    @functools.wraps(section)
    def call(*args, **kwargs):
        return alone(*map(held, args), **{k: held(v) for k, v in kwargs.items()})

    return call


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


def count_growth(photo: Photo, run: Run) -> None:
    """Measure again the cached entries that keep work as they are read (a deformable
    analysis's per-click work, a rollout's per-query maps), so that what they gained counts
    against the budget; about a millisecond each."""
    for kind in ("analysis", "rollout"):
        cache().remeasure((kind, photo.digest, *run.key))


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
