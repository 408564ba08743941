"""Give freed memory back to the system after heavy work (glibc's ``malloc_trim``), and
measure how much memory a piece of work needs while it runs.

    release_soon()      # after an analysis, a rollout, an eviction: trims on a helper thread
    with watch() as w:  # the process's resident memory sampled while the block runs
        analyze(model, photo)
    w.growth            # its peak above the start, bytes (0 where /proc is missing)

A forward pass of DETR-DC5 on a 12 MP photo allocates several hundred MB of blocks that are
freed when it ends; glibc keeps such blocks in its arenas for reuse (and raises its mmap
threshold after each large free, so more of the next ones land there too), so the page's
resident memory stays that much above what it holds (BENCHMARKS.md, sections 4 and 6).
``malloc_trim(0)`` returns every whole free page of every arena to the system (measured: 340 MB
after a DC5 analysis of a 12 MP photo was freed, in ~55 ms). It does not change how memory is
allocated, so forwards are not slowed; the page calls it on a helper thread after work that
took long enough to have allocated much (:class:`~detr_viz.cache.ByteCache`'s ``after_work``),
never on the script's thread. Elsewhere than glibc (macOS, Windows, musl) it does nothing.
``DETR_VIZ_MALLOC_TRIM=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_ENV = "DETR_VIZ_MALLOC_TRIM"


def _load_trim():
    if os.environ.get(_ENV, "1").strip() in ("0", "false", "no", "off"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _load_trim()
_lock = threading.Lock()
_wanted = False
_worker: threading.Thread | None = None


def available() -> bool:
    """Whether this process can trim (glibc, and not turned off)."""
    return _TRIM is not None


def release() -> bool:
    """Trim now, on this thread: True if memory was given back."""
    return bool(_TRIM(0)) if _TRIM is not None else False


def release_soon() -> None:
    """Trim on a helper thread: one trim after the last of any calls that arrive while one
    runs."""
    global _wanted, _worker
    if _TRIM is None:
        return
    with _lock:
        _wanted = True
        if _worker is None:
            _worker = threading.Thread(target=_work, name="detr-viz-trim", daemon=True)
            _worker.start()


def _work() -> None:
    global _wanted, _worker
    while True:
        with _lock:
            if not _wanted:
                _worker = None  # under the lock: a later call starts a new worker
                return
            _wanted = False
        release()


def module_bytes(modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (``torch.nn.Module``), each storage
    once (a weight two modules share, or a view, counts once)."""
    sizes: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


# --- working memory ------------------------------------------------------------------------

INTERVAL = 0.005  # seconds between two readings of the resident size while a watch is open
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_watches: set[Watch] = set()
_sampler: threading.Thread | None = None
_watch_lock = threading.Lock()


def resident() -> int | None:
    """This process's resident memory in bytes (``/proc/self/statm``), None where there is no
    /proc (macOS, Windows)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


class Watch:
    """The resident memory seen while a :func:`watch` block ran: ``growth`` is its peak above
    the start (bytes), ``seconds`` how long the block took."""

    def __init__(self) -> None:
        self.start = resident()
        self.peak = self.start or 0
        self.began, self.seconds = time.perf_counter(), 0.0

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start) if self.start is not None else 0

    def _see(self, now: int | None) -> None:
        if now is not None:
            self.peak = max(self.peak, now)


@contextmanager
def watch() -> Iterator[Watch]:
    """Sample the process's resident memory every :data:`INTERVAL` s while the block runs.

    The reading is process-wide: work that other threads do at the same time counts too (too
    much), while memory the allocator already holds and hands out again does not show as growth
    and a peak shorter than the interval may be missed (too little). One sampling thread serves
    every open watch and ends with the last. Where :func:`resident` has no answer the growth
    is 0.
    """
    global _sampler
    w = Watch()
    if w.start is not None:
        with _watch_lock:
            _watches.add(w)
            if _sampler is None:
                _sampler = threading.Thread(target=_sample, name="detr-viz-watch", daemon=True)
                _sampler.start()
    try:
        yield w
    finally:
        with _watch_lock:
            _watches.discard(w)
        w._see(resident())
        w.seconds = time.perf_counter() - w.began


def _sample() -> None:
    global _sampler
    while True:
        with _watch_lock:
            if not _watches:
                _sampler = None  # under the lock: a later watch starts a new sampler
                return
            open_now = list(_watches)
        now = resident()
        for w in open_now:
            w._see(now)
        time.sleep(INTERVAL)
