"""The accelerator, if any: analyze() and relevance on it against the CPU, and float32 agreement.

    python -m benchmarks.device [--quick] [--repeats N] [--variant detr_resnet50]

On a machine with CUDA or Apple MPS (``detr_viz.device.accelerator``), times ``analyze`` (one
forward with every attention captured; results copied back to the CPU) and ``relevance`` of the
top 5 queries on the accelerator and on the CPU, interleaved, on the official input size
(a 1066 x 800 photo, planted stand-in weights). Agreement: the accelerator's float32 logits,
decoder maps and relevance maps against a float64 CPU run of the same model (the oracle), next
to the CPU's own float32 error against that oracle: the accelerator is as exact as the CPU when
the two errors are of the same size. Without an accelerator it says so and stops (exit 0).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from benchmarks.common import (
    common_arguments,
    interleaved,
    official_size_photo,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz import analyze
from detr_viz.device import accelerator, describe_device
from detr_viz.explain import relevance


def _error(a: np.ndarray, oracle: np.ndarray) -> float:
    """Largest absolute difference, relative to the oracle's largest magnitude."""
    return float(np.abs(a - oracle).max() / max(np.abs(oracle).max(), 1e-30))


def main() -> None:
    parser = common_arguments(__doc__.split("\n")[0], repeats=5, quick_repeats=2)
    parser.add_argument("--variant", default="detr_resnet50")
    args = resolve(parser.parse_args())
    print_header("The accelerator against the CPU", args)
    kind = accelerator()
    if kind is None:
        print(f"No accelerator here (torch {torch.__version__}: CUDA available "
              f"{torch.cuda.is_available()}, MPS available "
              f"{torch.backends.mps.is_available()}); nothing to measure. Run this on a CUDA "
              "or Apple silicon machine.")
        return
    device = torch.device(kind)
    print(f"Accelerator: {describe_device(device)}\n")
    cpu = stand_in_model(args.variant, planted=True)
    gpu = copy.deepcopy(cpu).to(device)
    f64 = copy.deepcopy(cpu).double()
    photo = official_size_photo()
    oracle = analyze(f64, photo)
    queries = [d.query for d in oracle.detections(0.0)[:5]]

    def run(model):
        analysis = analyze(model, photo)
        return analysis, relevance(model, analysis, queries)

    def sync(fn):
        def timed():
            out = fn()
            if kind == "cuda":
                torch.cuda.synchronize()
            return out
        return timed

    def outputs(model) -> list[np.ndarray]:
        analysis, maps = run(model)
        return [analysis.probabilities, analysis.decoder_attentions(queries), maps]

    truth = outputs(f64)
    rows = [[name, *(f"{_error(a, t):.2e}" for a, t in zip(outputs(model), truth, strict=True))]
            for name, model in (("CPU float32", cpu), (f"{kind} float32", gpu))]
    print("Error against the CPU float64 run (max |difference| / max |oracle|):\n")
    print(table(["run", "probabilities", "decoder maps", "relevance maps"], rows))
    times = interleaved({
        "analyze CPU": sync(lambda: analyze(cpu, photo)),
        f"analyze {kind}": sync(lambda: analyze(gpu, photo)),
        "analyze + relevance CPU": sync(lambda: run(cpu)),
        f"analyze + relevance {kind}": sync(lambda: run(gpu)),
    }, args.repeats)
    print("\nTime (median, IQR):\n")
    print(table(["case", "time"], [[k, v.seconds()] for k, v in times.items()]))


if __name__ == "__main__":
    main()
