"""Give freed memory back to the system after heavy work (glibc's ``malloc_trim``).

    release_soon()      # after an analysis, a rollout, an eviction: trims on a helper thread

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
