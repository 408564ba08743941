"""Experiment: torch threads and OpenMP spinning, on an idle CPU and next to one busy process.

    python -m benchmarks.threads [--quick]

Why: on this 2-core machine, timings jumped 4-5x whenever another process kept one core busy.
Each configuration runs in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` once, at start)
and times the R50 forward on an 800x1066 input (stand-in weights). "busy neighbour" = one
extra process spinning on one core, started and stopped by this script. Other people's jobs
on a shared machine add to both columns; compare within a row and across rows of ONE run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import CpuShare, common_arguments, fmt_time, print_header, resolve, table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (torch threads, extra environment); libgomp is the OpenMP of PyTorch's wheels
    (2, ()),
    (2, (("OMP_WAIT_POLICY", "PASSIVE"),)),
    (2, (("GOMP_SPINCOUNT", "10000"),)),
    (1, ()),
]
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

CHILD = r'''
import json, sys, time, torch
from detr_viz import build_model
from detr_viz.testing import recipe_state_dict
torch.set_num_threads(int(sys.argv[1]))
model = build_model("detr_resnet50")
model.load_state_dict(recipe_state_dict(model))
x = torch.randn(1, 3, 800, 1066)
times = []
with torch.inference_mode():
    model(x)
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
print(json.dumps(times))
'''

SPIN = "while True: pass"


def forward_times(threads: int, extra: tuple, repeats: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS} | dict(extra)
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(repeats)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=3, quick_repeats=2)
    args = resolve(parser.parse_args(argv))
    print_header("Threads and OpenMP wait policy (R50 forward, 800x1066)", args)
    share = CpuShare()
    results: dict[tuple, dict[str, list[float]]] = {c: {"idle": [], "busy": []} for c in CONFIGS}
    for neighbour in ("idle", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if neighbour == "busy" else None
        try:
            time.sleep(0.5 if spinner else 0)
            for config in CONFIGS:
                results[config][neighbour] = forward_times(*config, args.repeats)
        finally:
            if spinner is not None:
                spinner.terminate()  # the one process this script started, by its handle
                spinner.wait()
    rows = []
    base = statistics.median(results[CONFIGS[0]]["idle"])
    for (threads, extra), res in results.items():
        idle, busy = statistics.median(res["idle"]), statistics.median(res["busy"])
        env = " ".join(f"{k}={v}" for k, v in extra) or "(none: defaults)"
        rows.append([threads, env, fmt_time(idle), fmt_time(busy),
                     f"{busy / idle:.2f}x", f"{idle / base:.2f}x"])
    print(table(["torch threads", "environment", "forward, idle neighbour",
                 "forward, 1 busy neighbour", "busy / idle", "idle vs default"], rows))
    print("\n" + share.report())


if __name__ == "__main__":
    main()
