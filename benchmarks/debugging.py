"""The debugging views on the CPU: composite figure, box matching, box-edge relevance, sanity.

    python -m benchmarks.debugging --threads 1   # R50, 5 interleaved repeats (~3 min)
    python -m benchmarks.debugging --quick    # 2 repeats
    python -m benchmarks.debugging --variant detr_resnet50_dc5

Weights: the planted stand-ins on the 4:3 photo at the official size (as benchmarks.explain).

- composite: ``debug_figures.composite_figure.spec`` of every kept detection's map plus the
  page's encoding of it (``charts.PlainFigure(spec).to_dict()``), maps already computed (the
  page caches them); box matching: ``analysis.queries_for_box`` for a box and a class
  (goal for both: under 50 ms);
- edge relevance (4 edges, one forward, a backward each; and one vmapped backward) against
  class relevance of the same detection, per-round ratios (goal: edge / class <= 1.3);
- the sanity check of one map per method, once (13 transformer re-runs each; reported).
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import (
    CpuShare,
    common_arguments,
    fmt_time,
    interleaved,
    official_size_photo,
    paired_ratio,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz import analyze, debug_figures, explain, sanity
from detr_viz.display import display_image
from detr_viz.edges import edge_relevance


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=5, quick_repeats=2)
    parser.add_argument("--variant", default="detr_resnet50")
    parser.add_argument("--no-sanity", action="store_true", help="skip the sanity check")
    parser.add_argument("--sanity-only", action="store_true", help="only the sanity check")
    args = resolve(parser.parse_args())
    print_header("Debugging views", args)
    share = CpuShare()
    model = stand_in_model(args.variant, planted=True)
    photo = official_size_photo()
    analysis = analyze(model, photo)
    kept = analysis.detections(0.9)
    queries = [d.query for d in kept]
    query = queries[0]
    display = display_image(photo)
    raw = analysis.decoder_attentions(queries)
    if not args.sanity_only:
        timed(args, model, analysis, display, kept, raw, query)
    if not args.no_sanity:
        sanity_rows(model, analysis, query)
    print(share.report())
    print(f"(kept detections: {len(kept)}; maps finite: {bool(np.isfinite(raw).all())})")


def timed(args, model, analysis, display, kept, raw, query) -> None:
    """The composite and box matching (goal < 50 ms), then edge against class relevance."""
    from detr_viz.ui.charts import PlainFigure  # the page's encoding (imports streamlit)

    def composite():
        spec = debug_figures.composite_figure.spec(display, analysis.grid, kept, raw)
        return PlainFigure(spec).to_dict()

    x0, y0, x1, y1 = kept[0].box
    box = (x0 + 10, y0 + 5, x1 - 10, y1 + 5)
    fast = interleaved({"composite": composite,
                        "match": lambda: analysis.queries_for_box(box, "dog")},
                       repeats=max(args.repeats, 20), warmup=2)
    rows = [[f"composite figure, {len(kept)} detections (spec + page encoding)",
             fast["composite"].seconds(), "< 50 ms"],
            ["queries_for_box (IoU, class, top-5, sentences)", fast["match"].seconds(),
             "< 50 ms"]]
    print(table(["what", "time (median, IQR)", "goal"], rows) + "\n")

    label = int(analysis.probabilities[query].argmax())
    times = interleaved({
        "class": lambda: explain.relevance(model, analysis, [query], [label]),
        "edges (loop)": lambda: edge_relevance(model, analysis, query),
        "edges (vmap)": lambda: edge_relevance(model, analysis, query, batched=True),
    }, repeats=args.repeats, warmup=1)
    base = times["class"]
    rows = [[name, t.seconds(), "1" if t is base else paired_ratio(t, base).ratio()]
            for name, t in times.items()]
    print(f"Relevance of query {query} ({args.variant}, grid {analysis.feature_hw}):\n")
    print(table(["relevance", "time", "/ class relevance"], rows) + "\n")



def sanity_rows(model, analysis, query) -> None:
    rows = []
    for method in explain.METHODS:
        start = time.perf_counter()
        check = sanity.sanity_check(model, analysis, query, method)
        rows.append([method, fmt_time(time.perf_counter() - start),
                     f"{check.spearman[0]:.2f} / {check.spearman[-1]:.2f}",
                     "yes" if check.insensitive else "no"])
    print("Sanity check of one map (13 steps, once each):\n")
    print(table(["method", "time", "Spearman after heads / after all", "insensitive?"],
                rows) + "\n")


if __name__ == "__main__":
    main()
