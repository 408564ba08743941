"""The batch command line: model load, per-photo cost, batch vs back-to-back, Ray overhead.

    python -m benchmarks.batch [--quick] [--photos N] [--rounds R] [--ray] [--threads N]

Stand-in (planted) R50 weights, photo-like JPEGs. Measures, in one process:
- ``load``: :func:`detr_viz.load_model` of a checkpoint on disk (what each Ray worker pays once);
- ``back-to-back``: N times ``analyze`` + the raw maps' export as separate calls (load, decode,
  analyse, write), the model loaded once: the baseline of the issue;
- ``batch``: :func:`detr_viz.batch.run_batch` on the same N photos (decoding overlapped);
- with ``--ray`` (Ray installed): Ray on this machine (``ray.init(num_cpus=2)``) and one worker:
  startup (init + worker with its model), then the same batch; the per-task overhead is
  (Ray time - local batch time) / N, on tiny photos (96 px) where compute is small, so the
  overhead is not lost in the noise, and on the official size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    CpuShare,
    common_arguments,
    photo_like,
    print_header,
    resolve,
    stand_in_weights,
    table,
)
from detr_viz import analyze, load_image, load_model
from detr_viz.batch import BatchSettings, ProgressBar, analyse_photo, run_batch
from detr_viz.results import ResultStore, find_photos


class _Quiet(ProgressBar):
    def step(self, failed: bool = False) -> None:
        pass


def _photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo_like(*size, seed=i).save(folder / f"p{i}.jpg", quality=90)
    return find_photos([folder])


def main() -> None:
    parser = common_arguments(__doc__.split("\n")[0], repeats=1, quick_repeats=1)
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="back-to-back and batch alternated this many times (medians)")
    args = resolve(parser.parse_args())
    count = 3 if args.quick else args.photos
    print_header("Batches: load, per photo, Ray overhead", args)
    share = CpuShare()
    checkpoint = stand_in_weights() / "detr-r50-e632da11.pth"
    start = time.perf_counter()
    model = load_model("detr_resnet50", checkpoint, download=False, device="cpu")
    load_s = time.perf_counter() - start
    rows = [["load_model (R50, from disk)", f"{load_s:.2f} s", ""]]
    tmp = Path(tempfile.mkdtemp(prefix="detr-viz-batch-"))
    print(table(["what", "time", "note"], rows), flush=True)  # rows as they come: a slow
    rows = []                                                   # machine still gets some
    for label, size, short, longest in (("tiny (128x96)", (128, 96), 96, 128),
                                        ("official size (1066x800)", (1066, 800), 800, 1333)):
        photos = _photos(tmp / label[:4], count, size)
        settings = BatchSettings("detr_resnet50", threshold=0.9, short_side=short,
                                 max_size=longest, checkpoint=str(checkpoint))
        analyze(model, photos[0], short_side=short, max_size=longest)  # warm-up
        b2bs, batches = [], []
        for round_ in range(args.rounds):  # interleaved: each round's ratio is side by side
            store = ResultStore(tmp / f"{label[:4]}-b2b-{round_}")
            start = time.perf_counter()
            for path in photos:
                analyse_photo(model, load_image(path), path, settings, store)
            b2bs.append((time.perf_counter() - start) / count)
            start = time.perf_counter()
            run_batch(photos, settings, ResultStore(tmp / f"{label[:4]}-batch-{round_}"),
                      lambda: model, log=lambda m: None, progress=_Quiet(count))
            batches.append((time.perf_counter() - start) / count)
        b2b, batch = statistics.median(b2bs), statistics.median(batches)
        ratios = sorted(b / r for b, r in zip(b2bs, batches, strict=True))
        rows += [[f"back-to-back, {label}", f"{b2b:.3f} s/photo", ""],
                 [f"run_batch, {label}", f"{batch:.3f} s/photo",
                  f"throughput {statistics.median(ratios):.2f}x back-to-back "
                  f"({ratios[0]:.2f}-{ratios[-1]:.2f} over {args.rounds} rounds)"]]
        if args.ray:
            rows += _ray_rows(photos, settings, tmp / f"{label[:4]}-ray", count, batch, label)
        print("\n".join(table(["", "", ""], rows).splitlines()[2:]), flush=True)
        rows = []
    print(f"\n{count} photos per case, raw maps, threshold 0.9 (planted stand-ins keep a few "
          f"detections per photo). {share.report()}")


def _ray_rows(photos, settings, out, count, local, label):
    import ray

    from detr_viz.ray_batch import _dispatch, start_workers

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    init_s = time.perf_counter() - start
    actors = start_workers(settings, "cpu", out, workers=1)
    startup = time.perf_counter() - start
    from detr_viz.batch import BatchReport

    report = BatchReport()
    start = time.perf_counter()
    _dispatch(ray, actors, photos, report, lambda m: None, _Quiet(count))
    per = (time.perf_counter() - start) / count
    ray.shutdown()
    return [[f"Ray startup (init {init_s:.1f} s + 1 worker with its model), {label}",
             f"{startup:.2f} s", ""],
            [f"Ray, 1 worker, {label}", f"{per:.3f} s/photo",
             f"overhead {1e3 * (per - local):+.0f} ms/photo vs run_batch"]]


if __name__ == "__main__":
    main()
