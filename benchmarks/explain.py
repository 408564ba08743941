"""Explanations on the CPU: relevance, rollout and faithfulness against the plain forward pass.

    python -m benchmarks.explain              # R50 and DC5, 3 interleaved repeats (~6 min)
    python -m benchmarks.explain --quick      # 1 repeat
    python -m benchmarks.explain --memory     # also DC5 peak memory on a 12 MP photo

Weights: the planted stand-ins (detr_viz.testing.planted_state_dict), so that the 4:3 photo at
the official size (1066x800 -> input 800x1066) has queries above 0.9 to explain (21 for R50,
11 for DC5; real checkpoints keep a handful on a typical photo, which is why the tables also
give the cost of 1 and of 4 queries, a page). Timing does not depend on weight values.

- relevance: ``explain.relevance(model, analysis, queries)`` for 1, 4 and all kept queries,
  each against the plain forward pass ``model(x)`` timed in the same round (the goal: all kept
  queries at most 1.5x a forward for R50, 3x for DC5);
- the backward passes alone as a loop (what relevance does) and as one
  ``autograd.grad(..., is_grads_batched=True)`` (vmap), the alternative the code rejects;
- rollout: the first computation (the six dense encoder layers), then one click's map in each
  direction (goal: under 20 ms for DC5);
- faithfulness: the random baseline (once per photo) and the score of one and of three maps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    LABEL,
    VARIANTS,
    CpuShare,
    Timing,
    common_arguments,
    fmt_time,
    interleaved,
    official_size_photo,
    paired_ratio,
    photo_jpeg,
    print_header,
    resolve,
    stand_in_model,
    stand_in_weights,
    table,
)
from detr_viz import analyze, capture, explain, faithfulness, preprocess
from detr_viz.analysis import INCOMING, OUTGOING
from detr_viz.model import VARIANTS as VARIANTS_SPEC
from detr_viz.replay import replay, trainable_copy

GOAL = {"detr_resnet50": 1.5, "detr_resnet50_dc5": 3.0}
ROOT = Path(__file__).resolve().parents[1]


def setup(variant: str):
    """The planted model, its analysis of the 4:3 photo and the photo's model input."""
    model = stand_in_model(variant, planted=True)
    photo = official_size_photo()
    return model, analyze(model, photo), preprocess(photo).tensor


def relevance_table(variant: str, repeats: int) -> tuple[list[list[str]], dict]:
    model, analysis, x = setup(variant)
    kept = [d.query for d in analysis.detections(0.9)]

    def plain():
        with torch.inference_mode():
            return model(x)

    counts = sorted({1, min(4, len(kept)), len(kept)})  # one query, a page, all kept
    cases = {"plain forward": plain}
    for n in counts:
        cases[f"relevance, {n} queries"] = lambda n=n: explain.relevance(model, analysis,
                                                                         kept[:n])
    times = interleaved(cases, repeats=repeats, warmup=1)
    base = times["plain forward"]
    rows = []
    for name, t in times.items():
        ratio = "1" if t is base else paired_ratio(t, base).ratio()
        rows.append([LABEL[variant], name, t.seconds(), ratio])
    per_query = ((times[f"relevance, {counts[-1]} queries"].median
                  - times["relevance, 1 queries"].median) / max(counts[-1] - 1, 1))
    first = times["relevance, 1 queries"].median
    budget = GOAL[variant] * base.median
    fits = 1 + max(0, int((budget - first) // per_query)) if first <= budget else 0
    total = paired_ratio(times[f"relevance, {counts[-1]} queries"], base).median
    verdict = {"kept": len(kept), "ratio_all": total, "goal": GOAL[variant],
               "per_query": per_query, "first": first, "fits": fits, "plain": base.median}
    return rows, verdict


def backward_table(variant: str, repeats: int) -> list[str]:
    """The per-target backward passes: a loop against one vmapped call (4 targets)."""
    model, analysis, _ = setup(variant)
    queries = [d.query for d in analysis.detections(0.9)][:4]
    labels = [int(analysis.probabilities[q].argmax()) for q in queries]

    def graph():
        inputs = trainable_copy(analysis.inputs)
        embed = model.query_embed.weight.detach().clone().requires_grad_()
        with capture(model, features=False, live=True) as cap:
            logits = replay(model, inputs, inputs.src, embed)
        heads = [cap.live[k].heads for k in sorted(cap.live)]
        return logits[0, queries, labels], heads

    def loop():
        targets, heads = graph()
        return [torch.autograd.grad(t, heads, retain_graph=True) for t in targets]

    def batched():
        targets, heads = graph()
        return torch.autograd.grad(targets, heads, grad_outputs=torch.eye(len(queries)),
                                   is_grads_batched=True)

    with torch.inference_mode(False), torch.enable_grad():
        times = interleaved({"loop": loop, "vmap": batched}, repeats=repeats, warmup=1)
    return [LABEL[variant], str(len(queries)), times["loop"].seconds(), times["vmap"].seconds(),
            paired_ratio(times["vmap"], times["loop"]).ratio()]


def rollout_rows(variant: str, repeats: int) -> list[list[str]]:
    _, analysis, _ = setup(variant)
    first = interleaved({"rollout": lambda: explain.rollout(analysis)}, repeats=repeats,
                        warmup=0)["rollout"]
    roll = explain.rollout(analysis)
    rng = np.random.default_rng(0)
    width, height = analysis.original_size
    points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(30)]
    rows = [[LABEL[variant], "first computation (6 dense encoder layers)", first.seconds(), ""]]
    for direction in (INCOMING, OUTGOING):
        samples = []
        for point in points:
            start = time.perf_counter()
            roll.encoder_map(point, direction)
            samples.append(time.perf_counter() - start)
        t = Timing(tuple(samples[5:]))
        rows.append([LABEL[variant], f"click, {direction}", t.seconds(),
                     "yes" if t.median < 0.020 else "NO"])
    return rows


def faithfulness_rows(variant: str, repeats: int) -> list[list[str]]:
    model, analysis, _ = setup(variant)
    query = analysis.detections(0.9)[0].query
    raw = analysis.decoder_attention(query)
    roll = explain.rollout(analysis).decoder_maps([query])[0]
    rel = explain.relevance(model, analysis, [query])[0]
    base = faithfulness.random_baseline(model, analysis)
    maps = {"raw attention": raw, "rollout": roll, "relevance": rel}
    times = interleaved({
        "random baseline (once per photo)": lambda: faithfulness.random_baseline(model,
                                                                                 analysis),
        "score one map": lambda: faithfulness.score_maps(model, analysis, query, {"raw": raw},
                                                         baseline=base),
        "score three maps (the ranking table)": lambda: faithfulness.score_maps(
            model, analysis, query, maps, baseline=base),
    }, repeats=repeats, warmup=0)
    runs = {"random baseline (once per photo)": 2 * faithfulness.STEPS,
            "score one map": 2 * (faithfulness.STEPS - 1),
            "score three maps (the ranking table)": 6 * (faithfulness.STEPS - 1)}
    return [[LABEL[variant], name, str(runs[name]), t.seconds(),
             fmt_time(t.median / runs[name])] for name, t in times.items()]


MEMORY_CHILD = r"""
import json, sys
from detr_viz import analyze, explain, load_image, load_model
def peak():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over fork)
    with open("/proc/self/status") as status:
        line = next(l for l in status if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
out = {}
model = load_model(sys.argv[1], checkpoint=sys.argv[3], download=False)
out["model"] = peak()
analysis = analyze(model, load_image(sys.argv[2]))
out["analyze"] = peak()
kept = [d.query for d in analysis.detections(0.9)]
explain.relevance(model, analysis, kept)
out["relevance"] = peak()
out["kept"] = len(kept)
explain.rollout(analysis)
out["rollout"] = peak()
print(json.dumps(out))
"""


def memory_table(variants: list[str]) -> str:
    rows, weights = [], stand_in_weights()
    for variant in variants:
        jpeg = photo_jpeg("12MP")
        checkpoint = weights / VARIANTS_SPEC[variant].checkpoint
        done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, variant, str(jpeg),
                               str(checkpoint)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        goal = "under 3 GB: " + ("yes" if out["relevance"] < 3072 else "NO") \
            if variant.endswith("dc5") else ""
        rows.append([LABEL[variant], f"{out['model']:.0f}", f"{out['analyze']:.0f}",
                     f"{out['relevance']:.0f} ({out['kept']} queries)", f"{out['rollout']:.0f}",
                     goal])
    return table(["variant", "peak after load_model", "after analyze (12 MP JPEG)",
                  "after relevance of all kept", "after rollout", "goal"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=3, quick_repeats=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--memory", action="store_true",
                        help="also peak RSS in fresh processes on a 12 MP photo")
    args = resolve(parser.parse_args(argv))
    print_header("Explanations: relevance, rollout, faithfulness (stand-in weights)", args)
    share = CpuShare()
    rows, verdicts, backward, roll, faith = [], {}, [], [], []
    for variant in args.variants:
        r, verdicts[variant] = relevance_table(variant, args.repeats)
        rows += r
        backward.append(backward_table(variant, args.repeats))
        roll += rollout_rows(variant, args.repeats)
        faith += faithfulness_rows(variant, args.repeats)
    print("### Relevance against the plain forward pass (per-round ratios)\n")
    print(table(["variant", "what", "time", "/ plain forward"], rows) + "\n")
    goal_rows = [[LABEL[v], str(d["kept"]), f"{d['ratio_all']:.2f}x", f"{d['goal']:.1f}x",
                  "yes" if d["ratio_all"] <= d["goal"] else "NO", fmt_time(d["first"]),
                  fmt_time(d["per_query"]), str(d["fits"])] for v, d in verdicts.items()]
    print(table(["variant", "queries above 0.9", "relevance of all / forward", "goal", "met?",
                 "first query (forward with graph + 1 backward)", "each further query",
                 "queries that fit the goal"], goal_rows) + "\n")
    print("### The backward passes: loop (used) against vmap (is_grads_batched)\n")
    print(table(["variant", "targets", "loop", "vmap", "vmap / loop"], backward) + "\n")
    print("### Rollout\n")
    print(table(["variant", "what", "time", "under 20 ms?"], roll) + "\n")
    print(f"### Faithfulness (steps = {faithfulness.STEPS})\n")
    print(table(["variant", "what", "transformer runs", "time", "per run"], faith) + "\n")
    if args.memory:
        print("### Peak memory (MiB, peak RSS = VmHWM, fresh process each)\n")
        print(memory_table(args.variants) + "\n")
    print(share.report())


if __name__ == "__main__":
    main()
