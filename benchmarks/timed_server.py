"""``streamlit run`` with every script run timed and its messages counted (for page.py).

    DETR_VIZ_TIMING=runs.jsonl python benchmarks/timed_server.py app.py --server.port 8600

Each script run, whole page or fragment, appends one JSON line: its server time (from the
start of the script to its end, widgets, library calls, figure building and serialisation
included), the bytes of the protobuf messages it queued for the browser (before the
websocket's compression) and whether it was a fragment run, and the bytes the page's cache
holds after it (``cache_bytes``, for load.py; absent for a checkout without the byte cache)
and the bytes of the models loaded then (``model_bytes``: parameters and buffers of every model
``load_model`` returned that is still alive).
Run as a file, not a module, so that it also serves an older checkout of the app (page.py's
baseline).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import weakref

from streamlit.runtime.scriptrunner import script_runner
from streamlit.web import cli

LOG = os.environ["DETR_VIZ_TIMING"]
_lock = threading.Lock()
_Runner = script_runner.ScriptRunner
_run, _enqueue = _Runner._run_script, _Runner._enqueue_forward_msg


PROFILE = os.environ.get("DETR_VIZ_PROFILE")  # a folder: one cProfile dump per run


def _timed_run(self, rerun_data):
    self._detr_viz_bytes = 0
    start, wall = time.perf_counter(), time.time()
    profiler = None
    if PROFILE:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        return _run(self, rerun_data)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(PROFILE, f"run-{wall:.3f}.prof"))
        record = {"wall": wall, "seconds": time.perf_counter() - start,
                  "bytes": self._detr_viz_bytes, "fragment": bool(rerun_data.fragment_id_queue)}
        record.update(_cache_bytes())
        with _lock, open(LOG, "a") as log:
            log.write(json.dumps(record) + "\n")


_models: list[weakref.ref] = []


def _count_models() -> None:
    """Wrap ``detr_viz.weights.load_model`` before the app imports it: every model it returns
    is remembered (weakly: a model the page drops is freed as before)."""
    try:
        from detr_viz import weights
    except ImportError:
        return
    load = weights.load_model

    def counted(*args, **kwargs):
        model = load(*args, **kwargs)
        _models.append(weakref.ref(model))
        return model

    weights.load_model = counted


def _model_bytes() -> int:
    from detr_viz import memory

    return memory.module_bytes(m for m in (ref() for ref in _models) if m is not None)


def _cache_bytes() -> dict:
    try:
        from detr_viz.ui.resources import cache

        held = cache()
    except Exception:  # an older checkout (no byte cache), or a budget that is not a size
        return {}
    return {"cache_bytes": held.total, "cache_budget": held.budget, "evictions": held.evictions,
            "model_bytes": _model_bytes()}


def _counted_enqueue(self, msg):
    self._detr_viz_bytes = getattr(self, "_detr_viz_bytes", 0) + msg.ByteSize()
    return _enqueue(self, msg)


_Runner._run_script = _timed_run
_Runner._enqueue_forward_msg = _counted_enqueue

if __name__ == "__main__":
    _count_models()
    sys.argv = ["streamlit", "run", *sys.argv[1:]]
    sys.exit(cli.main())
