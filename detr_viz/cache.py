"""A cache bounded by bytes: least recently used entries out when the measured total exceeds a
budget.

The sizes are measured, not guessed: :func:`nbytes` walks a value (records, containers, arrays,
tensors, images) and adds up the memory it holds, each buffer once. A page's analyses differ by
100x in size (an R50 analysis of a small photo against a DC5 one of a 12 MP photo), so a bound
on the number of entries bounds nothing. Thread-safe: Streamlit serves each session on its own
thread, and the page shares one cache between them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from detr_viz import memory
from detr_viz.errors import ArgumentError

T = TypeVar("T")
BUDGET_ENV = "DETR_VIZ_CACHE_BYTES"
DEFAULT_BUDGET = 2 * 2**30  # a laptop's share for photos, analyses and maps, beyond the models
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
HISTORY = 8  # pieces of work of a kind whose peak memory sets what the next one is given
_ONE_BYTE_MODES = {"1", "L", "P"}  # Pillow stores every other mode in 2 (I;16) or 4 bytes a pixel


def budget_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """The cache budget in bytes: ``$DETR_VIZ_CACHE_BYTES`` ("2G", "1500M", "800000000", binary
    units), else :data:`DEFAULT_BUDGET`. Raises ``ArgumentError`` for anything else."""
    text = environ.get(BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", text.upper())
    if not found or float(found.group(1)) <= 0:
        raise ArgumentError(f"{BUDGET_ENV}={text!r} is not a size; use bytes or a size such as "
                            "'2G' or '1500M', or unset it for the default of 2G.")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def nbytes(value: object) -> int:
    """Bytes of memory ``value`` holds: array, tensor and image buffers (each buffer once, a
    view counted as its whole buffer) plus ``sys.getsizeof`` of every Python object reached
    through dataclass fields, containers and instance attributes. Models (``torch.nn.Module``)
    are not counted: they are shared, and loaded outside any budget."""
    buffers: dict[int, int] = {}
    seen: set[int] = set()
    stack = [value]
    total = 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, torch.nn.Module):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, np.ndarray):
            total -= item.nbytes if item.flags.owndata else 0  # getsizeof counted the buffer
            _add_array(item, buffers)
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            _add(buffers, storage.data_ptr(), storage.nbytes())
        elif isinstance(item, Image.Image):
            pixel = 1 if item.mode in _ONE_BYTE_MODES else 2 if item.mode.startswith("I;16") else 4
            _add(buffers, id(item), item.width * item.height * pixel)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total + sum(buffers.values())


def _add_array(array: np.ndarray, buffers: dict[int, int]) -> None:
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    _add(buffers, root.__array_interface__["data"][0], root.nbytes)


def _add(buffers: dict[int, int], start: int, size: int) -> None:
    buffers[start] = max(buffers.get(start, 0), size)


class ByteCache:
    """Values by key, least recently used out once the measured total passes ``budget`` bytes.

    ``get(key, build)`` returns the cached value or builds it (once: concurrent callers of one
    key wait for the first build; different keys build in parallel). The newest entry is kept
    even when it alone exceeds the budget, so the view that asked for it still works. A value
    changed in place after it was cached (a store that gained entries) is measured again with
    ``remeasure(key)``. Values are shared between callers: treat them as read-only.

    The budget covers the memory work needs while it runs, not only what it leaves: a build
    (and any block in ``working(kind)``) first evicts down to the budget less the most memory
    a recent piece of work of its kind needed (its peak resident growth, measured by
    ``watch``, :func:`detr_viz.memory.watch`; the last :data:`HISTORY` that took at least
    ``work_seconds`` and ran alone; until one has, the least a reading shared with other work
    showed), less what other work running now reserved. A DETR analysis of a 12 MP photo needs
    ~300 MB while it runs and keeps ~45 MB, so a cache full to its budget would otherwise
    overshoot it by that much at every new photo. Kinds: a tuple key's first item
    (``("analysis", digest, ...)`` -> ``"analysis"``), or the key itself.

    ``after_work()`` (optional) is called, outside the cache's locks, after a build or a
    remeasured change that took at least ``work_seconds`` (work that allocated and freed
    memory) and after entries were evicted: the page gives freed memory back to the system
    there (:mod:`detr_viz.memory`).
    """

    def __init__(self, budget: int, measure: Callable[[object], int] = nbytes, *,
                 after_work: Callable[[], None] | None = None,
                 work_seconds: float = 0.1,
                 watch: Callable[[], AbstractContextManager[memory.Watch]] = memory.watch,
                 ) -> None:
        if not isinstance(budget, int) or budget <= 0:
            raise ArgumentError(f"budget must be a positive number of bytes, not {budget!r}.")
        self.budget = budget
        self._measure = measure
        self._after_work, self._work_seconds = after_work, work_seconds
        self._watch = watch
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._gates: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()
        self._needed: dict[Hashable, deque[int]] = {}  # per kind, the last works' peak growth
        self._running: dict[object, dict] = {}  # work under way (to tell whether it ran alone)
        self._shared: dict[Hashable, int] = {}  # per kind, the least a shared reading showed
        self.total = 0  # bytes of the entries held now
        self.reserved = 0  # bytes set aside for work running now
        self.evictions = 0

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        found, value = self._lookup(key)
        if found:
            return value
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            found, value = self._lookup(key)  # built while this caller waited
            if found:
                return value
            evictions = self.evictions
            try:
                with self.working(key[0] if isinstance(key, tuple) and key else key) as work:
                    value = build()
                self._store(key, value, self._measure(value))
            finally:
                with self._lock:
                    self._gates.pop(key, None)
            self._worked(work.seconds, evictions)
        return value

    def needed(self, kind: Hashable) -> int:
        """Bytes set aside before work of ``kind``: the most that one of its recent pieces of
        work measured alone; until one has, the least that one measured beside other work (an
        over-estimate, better than none); 0 before the first."""
        with self._lock:
            return self._need(kind)

    def _need(self, kind: Hashable) -> int:
        alone = self._needed.get(kind)
        return max(alone) if alone else self._shared.get(kind, 0)

    @contextmanager
    def working(self, kind: Hashable) -> Iterator[memory.Watch]:
        """Room for work of ``kind`` (see the class): evict down to the budget less what it
        will need, hold that back while the block runs, and measure what it needed."""
        token = object()
        with self._lock:
            need = self._need(kind)
            self.reserved += need
            self._make_room()
            for other in self._running.values():  # they see this one's memory too
                other["alone"] = False
            self._running[token] = state = {"alone": not self._running}
        try:
            with self._watch() as work:
                yield work
        finally:
            with self._lock:
                self.reserved -= need
                del self._running[token]
                # a lookup is not work; nor is a reading that other work shared (the resident
                # size is the process's: it would charge this kind with their memory too)
                if work.seconds >= self._work_seconds and state["alone"]:
                    self._needed.setdefault(kind, deque(maxlen=HISTORY)).append(work.growth)
                elif work.seconds >= self._work_seconds:
                    self._shared[kind] = min(self._shared.get(kind, work.growth), work.growth)

    def remeasure(self, key: Hashable, worked: float = 0.0) -> None:
        """Measure ``key``'s value again (nothing if it is gone), then evict down to budget.
        ``worked``: seconds spent changing it (see ``after_work``)."""
        evictions = self.evictions
        with self._lock:
            if key not in self._items:
                return
            value = self._items[key][0]
        size = self._measure(value)
        with self._lock:
            if key in self._items and self._items[key][0] is value:
                self.total += size - self._items[key][1]
                self._items[key] = (value, size)
                self._items.move_to_end(key)
                self._evict(keep=key)
        self._worked(worked, evictions)

    def _worked(self, seconds: float, evictions: int) -> None:
        if self._after_work is not None and (seconds >= self._work_seconds
                                             or self.evictions != evictions):
            self._after_work()

    def sizes(self) -> list[tuple[Hashable, int]]:
        """(key, bytes) of every entry, least recently used first."""
        with self._lock:
            return [(k, size) for k, (_, size) in self._items.items()]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.total = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _lookup(self, key: Hashable) -> tuple[bool, object]:
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key][0]

    def _store(self, key: Hashable, value: object, size: int) -> None:
        with self._lock:
            if key in self._items:
                self.total -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self.total += size
            self._evict(keep=key)

    def _make_room(self, keep: Hashable = None) -> None:
        """Before work, and after a store: least recently used out until the entries and the
        reserved work fit the budget, skipping ``keep`` and entries still used elsewhere (a
        running script's photo and analysis, what a connected session shows): dropping those
        frees nothing now and costs their recomputation later."""
        evicted = True
        while evicted and self.total + self.reserved > self.budget:
            evicted = False  # another pass after any eviction: a value another entry
            for key in list(self._items):  # referred to may be free to go now
                if self.total + self.reserved <= self.budget:
                    return
                if key == keep or sys.getrefcount(self._items[key][0]) > 2:  # more than the
                    continue  # cache's tuple and this call's argument
                self.total -= self._items.pop(key)[1]
                self.evictions += 1
                evicted = True

    def _evict(self, keep: Hashable) -> None:
        """Room for the work reserved (:meth:`_make_room`), then least recently used out, in use
        or not, until the entries alone fit the budget; the newest entry (``keep``) always
        stays. Work under way is not made room for by dropping what is in use: that frees
        nothing, and the value would be computed again while the old one still lives."""
        self._make_room(keep)
        while self.total > self.budget and len(self._items) > 1:
            oldest = next(iter(self._items))
            if oldest == keep:
                self._items.move_to_end(keep)
                continue
            self.total -= self._items.pop(oldest)[1]
            self.evictions += 1
