"""Peak memory and time to first result, each case in a FRESH Python process.

    python -m benchmarks.memory            # R50 and DC5 x 12 MP and 48 MP JPEG, 3 runs each
    python -m benchmarks.memory --quick    # 1 run each

A child process does what a first visit does, from a cold interpreter with a warm weights file
(the stand-in checkpoints written by ``python -m detr_viz.testing FOLDER``, found through
``$DETR_VIZ_WEIGHTS``, read once before timing so the OS file cache holds them):
``import detr_viz`` -> ``load_model(variant)`` -> ``load_image(jpeg)`` -> ``analyze(model, image)``
-> first figures' data (``detections`` + ``decoder_attentions``), then, separately, what the
app's ``get_photo`` adds (a 720-px click copy and the 1024-px display JPEG).

After each step it records its own resident memory: VmRSS (now) and
``getrusage(RUSAGE_SELF).ru_maxrss`` (the peak so far). The parent times the whole process
(interpreter start to exit) and prints the medians over the runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    LABEL,
    VARIANTS,
    CpuShare,
    bench_dir,
    common_arguments,
    file_mb,
    fmt_time,
    photo_jpeg,
    print_header,
    resolve,
    table,
)

GOAL_MB = {"detr_resnet50": 1.5 * 1024, "detr_resnet50_dc5": 2.5 * 1024}  # at 12 MP
ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import time
T0 = time.perf_counter()
import json, resource, sys

marks = []

def mark(step, start):
    now = time.perf_counter()
    rss = 0
    with open("/proc/self/status") as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    marks.append({"step": step, "s": now - start, "rss_mb": rss, "peak_mb": peak})
    return now

variant, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = T0
import torch
if threads:
    torch.set_num_threads(threads)
import detr_viz
t = mark("import torch + detr_viz", t)
model = detr_viz.load_model(variant, download=False)
t = mark("load_model (stand-in checkpoint)", t)
image = detr_viz.load_image(path)
t = mark("load_image", t)
analysis = detr_viz.analyze(model, image)
t = mark("analyze", t)
detections = analysis.detections(0.9) or analysis.detections(0.0)[:4]
maps = analysis.decoder_attentions([d.query for d in detections[:4]])
t = mark("first figures' data", t)
from PIL import Image
from detr_viz.display import display_image
click = image.copy()
click.thumbnail((720, 720), Image.Resampling.LANCZOS)
shown = display_image(image)
t = mark("app photo prep (click copy + display JPEG)", t)
print(json.dumps({"marks": marks, "threads": torch.get_num_threads(),
                  "input": list(analysis.input_size), "grid": list(analysis.feature_hw)}))
'''


def run_child(variant: str, path: Path, weights: Path, threads: int) -> dict:
    env = {**os.environ, "DETR_VIZ_WEIGHTS": str(weights), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, variant, str(path), str(threads)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({variant}, {path.name}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def stand_in_folder() -> Path:
    folder = bench_dir() / "weights"
    subprocess.run([sys.executable, "-m", "detr_viz.testing", str(folder)], cwd=ROOT, check=True)
    for checkpoint in folder.iterdir():  # warm the OS file cache: "warm weights cache"
        checkpoint.read_bytes()
    return folder


def median(runs: list[dict], step: str, key: str) -> float:
    return statistics.median(next(m[key] for m in r["marks"] if m["step"] == step) for r in runs)


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=3, quick_repeats=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--sizes", nargs="+", default=["12MP", "48MP"], choices=["12MP", "48MP"])
    args = resolve(parser.parse_args(argv))
    print_header("Peak memory and time to first result (fresh process per run)", args)
    share = CpuShare()
    weights = stand_in_folder()
    photos = {size: photo_jpeg(size) for size in args.sizes}
    threads = args.threads or 0
    results: dict[tuple[str, str], list[dict]] = {}
    for variant in args.variants:  # one untimed run per variant: file cache, .pyc files
        run_child(variant, photos[args.sizes[0]], weights, threads)
    for _ in range(args.repeats):  # interleave the cases run by run
        for variant in args.variants:
            for size in args.sizes:
                runs = results.setdefault((variant, size), [])
                runs.append(run_child(variant, photos[size], weights, threads))

    steps = [m["step"] for m in next(iter(results.values()))[0]["marks"]]
    library_steps = steps[:steps.index("first figures' data") + 1]
    mem_rows, time_rows = [], []
    for (variant, size), runs in results.items():
        baseline = median(runs, "load_model (stand-in checkpoint)", "rss_mb")
        peak = median(runs, "first figures' data", "peak_mb")
        app_peak = median(runs, steps[-1], "peak_mb")
        goal = GOAL_MB[variant]
        verdict = ("yes" if peak < goal else "NO") if size == "12MP" else "(no goal)"
        mem_rows.append([
            LABEL[variant], f"{size} ({file_mb(photos[size])})",
            f"{median(runs, 'import torch + detr_viz', 'rss_mb'):.0f}",
            f"{baseline:.0f}", f"{median(runs, 'load_image', 'peak_mb'):.0f}",
            f"**{peak:.0f}**", f"{median(runs, 'analyze', 'rss_mb'):.0f}", f"{app_peak:.0f}",
            f"{goal:.0f}: {verdict}",
        ])
        wall = statistics.median(r["wall_s"] for r in runs)
        inside = sum(median(runs, s, "s") for s in library_steps)
        fastest = min(sum(m["s"] for m in r["marks"] if m["step"] in library_steps) for r in runs)
        rest = statistics.median(r["wall_s"] - sum(m["s"] for m in r["marks"]) for r in runs)
        time_rows.append([LABEL[variant], size] + [fmt_time(median(runs, s, "s"))
                                                   for s in library_steps]
                         + [f"**{fmt_time(inside)}** (min {fmt_time(fastest)})", fmt_time(rest),
                            fmt_time(wall),
                            fmt_time(median(runs, steps[-1], "s"))])
    first = next(iter(results.values()))[0]
    print(f"Model input {first['input'][0]}x{first['input'][1]} (W x H), torch threads "
          f"{first['threads']}, {args.repeats} fresh process(es) per case, medians.\n")
    print("### Resident memory (MiB)\n")
    print(table(["variant", "photo", "RSS after imports", "RSS after load_model (baseline)",
                 "peak after load_image", "peak after analyze (library)",
                 "RSS holding the analysis", "peak incl. app photo prep",
                 "goal (12 MP peak)"], mem_rows) + "\n")
    print("### Time to first result (warm weights file, cold interpreter)\n")
    print(table(["variant", "photo", *library_steps, "sum = first result (fastest run)",
                 "python start + exit", "process wall", "+ app photo prep"], time_rows) + "\n")
    print("\n" + share.report())


if __name__ == "__main__":
    main()
