"""``detr-viz analyze --ray``: the same batch on a Ray cluster, one model per worker.

    report = run_batch_on_ray(sources, settings, ResultStore("out"), "auto", address=None)

Each worker is a Ray actor that loads the model once and then analyses photos it is given by
path, writing with the same atomic writer as a local run (:mod:`detr_viz.results`), so the
output is the same files, a retried or repeated photo overwrites whole files, and a rerun skips
what is done. The driver only lists the photos, skips the done ones, hands one photo at a time
to each idle worker (no queue grows with the folder) and writes the summary at the end.
A worker that dies takes its photo with it: that photo is reported as failed (rerun to finish
it) and the remaining photos go to the other workers.

Requirements: ``pip install -r requirements-ray.txt``; on a multi-machine cluster the photos and
``--out`` on a file system every node sees at the same path. The driver's ``detr_viz`` package
is shipped to the workers (Ray ``py_modules``), so they run the driver's code version; their
own Python needs the runtime requirements (torch, ...). When the caller has started Ray
itself, the workers find ``detr_viz`` through ``PYTHONPATH`` (a file system shared with the
driver, as on one machine), or it must be installed on the nodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from detr_viz.batch import (
    BatchReport,
    BatchSettings,
    ProgressBar,
    _analyse,
    _decode,
    loaded,
    pending,
)
from detr_viz.device import resolve_device
from detr_viz.errors import ArgumentError, DetrVizError
from detr_viz.results import ResultStore

ACTOR_NAME = "detr-viz-worker-{}"
PACKAGE = Path(__file__).resolve().parent
NAMESPACE = "detr-viz"


def _ray():
    try:
        import ray
    except ImportError:
        raise ArgumentError("--ray needs Ray: python -m pip install -r requirements-ray.txt "
                            "(or run without --ray).") from None
    return ray


class Worker:
    """One model on one Ray worker; ``analyse(path)`` -> (path, None) or (path, reason)."""

    def __init__(self, settings: dict, device: str, root: str):

        self.settings = BatchSettings(**{**settings, "methods": tuple(settings["methods"])})
        self.store = ResultStore(root)
        self.model = self.settings.load(device)

    def analyse(self, source: str) -> tuple[str, str | None]:
        path = Path(source)
        return source, _analyse(self.model, _decode(path), path, self.settings, self.store)

    def ready(self) -> list[str]:
        """What this worker loaded, as the local run says it (:func:`detr_viz.batch.loaded`)."""
        return loaded(self.model)


def start_ray(address: str | None):
    """Join the cluster at ``address`` ("auto": the running one), or start Ray on this machine
    when ``address`` is None; reuse Ray if this process already initialised it. Returns
    whether this call started it (then the caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                 runtime_env={"py_modules": [str(PACKAGE)]})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DetrVizError(f"Could not reach a Ray cluster at {address!r}: {exc}. Start one "
                           "(ray start --head) or give its address, e.g. --ray "
                           "ray://host:10001.") from exc
    return True


def start_workers(settings: BatchSettings, device: str, root: Path, workers: int | None,
                  log: Callable[[str], None] = print):
    """``workers`` Ray actors (default: one per CPU, or per GPU for CUDA), each with its model
    loaded (waited for, so that a bad checkpoint stops the run here with its message); what
    the first one loaded is logged."""
    ray = _ray()
    gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU"))
    per = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    capacity = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1))
    count = max(1, workers or capacity)
    # a Ray that the caller started may not ship detr_viz: on a shared file system this finds it
    path = os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH")) if p)
    remote = ray.remote(Worker)
    actors = [remote.options(name=ACTOR_NAME.format(i), namespace=NAMESPACE, **per,
                             runtime_env={"env_vars": {"PYTHONPATH": path}}).remote(
        settings.key(), "cuda" if gpu else device, str(root)) for i in range(count)]
    try:
        loaded = ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayActorError as exc:
        for actor in actors:
            ray.kill(actor)
        raise DetrVizError(f"A Ray worker could not load the model: {exc}") from exc
    first, *notes = loaded[0]
    log(f"{first}, {count} Ray worker{'s' if count > 1 else ''}")
    for note in notes:
        log(note)
    return actors


def run_batch_on_ray(sources: Sequence[Path], settings: BatchSettings, store: ResultStore,
                     device: str, *, address: str | None = None, workers: int | None = None,
                     log: Callable[[str], None] = print,
                     progress: ProgressBar | None = None) -> BatchReport:
    """:func:`detr_viz.batch.run_batch` on Ray (see the module docstring)."""
    ray = _ray()
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        resolve_device(device)  # mps cannot be shared by Ray workers: say why here
    report = BatchReport()
    todo = pending(sources, settings, store, report)
    started = start_ray(None if address in (None, "local") else address) if todo else False
    try:
        if todo:
            actors = start_workers(settings, device, store.root.resolve(), workers, log)
            try:
                _dispatch(ray, actors, todo, report, log, progress or ProgressBar(len(todo)))
            finally:  # Ctrl-C included: no worker outlives the run on a shared cluster
                for actor in actors:
                    ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    report.detections = store.write_summary(sources)
    store.write_failures(report.failed)
    return report


def _dispatch(ray, actors, todo, report, log, progress) -> None:
    """One photo per idle worker until all are handed out; a dead worker's photo fails."""
    queue, idle, running = list(reversed(todo)), list(actors), {}
    while queue or running:
        while queue and idle:
            actor, source = idle.pop(), queue.pop()
            running[actor.analyse.remote(str(source))] = (actor, source)
        if not running:  # every worker died
            for source in reversed(queue):
                report.failed.append((source, "no Ray worker left; rerun to finish"))
            return
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, source = running.pop(ref)
        try:
            _, reason = ray.get(ref)
            idle.append(actor)
        except ray.exceptions.RayActorError as exc:  # the worker is gone
            reason = f"the Ray worker died ({type(exc).__name__}); rerun to finish this photo"
        except ray.exceptions.RayError as exc:  # an error in the task; the worker lives on
            idle.append(actor)
            reason = f"{type(exc).__name__}: {exc}"
        report.record(source, reason, log, progress)
