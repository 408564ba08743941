"""CPU inference: plain forward vs capture vs analyze() vs Hugging Face DETR, same weights.

    python -m benchmarks.inference            # R50 and R50-DC5, 5 interleaved repeats (~5 min)
    python -m benchmarks.inference --quick    # 2 repeats

Every variant of one backbone is timed in the same process, interleaved round by round, and the
ratios are per-round ratios. Weights: detr_viz.testing.recipe_state_dict (deterministic
stand-ins; the official checkpoints cannot be downloaded here). HF's model is built from a
config and loaded with the same state dict renamed (benchmarks/hf_detr.py); the script prints
the max |difference| of its outputs from ours on the recipe input before timing anything.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.common import (
    LABEL,
    VARIANTS,
    CpuShare,
    Timing,
    common_arguments,
    file_mb,
    fmt_time,
    interleaved,
    official_size_photo,
    paired_ratio,
    photo_jpeg,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz import analyze, capture, load_image, preprocess
from detr_viz.testing import recipe_input


def load_preprocess_table(repeats: int) -> str:
    """Decode (load_image) and DETR's transform (preprocess) of 12 MP and 48 MP JPEGs."""
    rows = []
    for size in ("12MP", "48MP"):
        path = photo_jpeg(size)
        image = load_image(path)
        times = interleaved({
            "load": lambda path=path: load_image(path),
            "preprocess": lambda image=image: preprocess(image),
        }, repeats=repeats, warmup=1)
        total = times["load"].median + times["preprocess"].median
        tensor = preprocess(image).tensor
        rows.append([f"{size} JPEG {image.width}x{image.height} ({file_mb(path)})",
                     "x".join(map(str, tensor.shape[-2:])), times["load"].seconds(),
                     times["preprocess"].seconds(), fmt_time(total)])
    return table(["photo", "model input (HxW)", "load_image", "preprocess", "sum of medians"],
                 rows)


def verify(variant: str, model, hf_sdpa, hf_eager) -> str:
    from benchmarks.hf_detr import compare

    diffs = compare(model, hf_sdpa, hf_eager, recipe_input(800, 1066))
    scale = diffs.pop("logits scale (max |ours|)")
    rows = [[k, f"{v:.2e}"] for k, v in diffs.items()]
    worst = max(diffs.values())
    verdict = "SAME WEIGHTS: yes" if worst < 1e-4 else "SAME WEIGHTS: NO (conversion is wrong)"
    return (f"HF vs ours on recipe_input(800, 1066), {LABEL[variant]} (max |ours logits| = "
            f"{scale:.2f}); {verdict} (max diff {worst:.1e}, goal ~1e-4)\n\n"
            + table(["output", "max abs difference"], rows))


def bench_variant(variant: str, repeats: int, with_hf: bool):
    model = stand_in_model(variant)
    photo = official_size_photo()  # 1066x800 PIL image: preprocess only converts, no resize
    jpeg = photo_jpeg("12MP")
    x = preprocess(photo).tensor  # (1, 3, 800, 1066)

    def plain():
        with torch.inference_mode():
            return model(x)

    def captured():
        with torch.inference_mode(), capture(model) as cap:
            model(x)
        return cap

    cases = {
        "plain": plain,
        "capture": captured,
        "analyze(photo 1066x800)": lambda: analyze(model, photo),
        "analyze(12 MP JPEG path)": lambda: analyze(model, jpeg),
    }
    check = None
    if with_hf:
        from benchmarks.hf_detr import hf_model

        state = model.state_dict()
        hf_sdpa = hf_model(variant, state, "sdpa")
        hf_eager = hf_model(variant, state, "eager")
        check = verify(variant, model, hf_sdpa, hf_eager)

        def hf(net, attentions):
            def run():
                with torch.inference_mode():
                    return net(pixel_values=x, output_attentions=attentions)
            return run

        cases["HF sdpa"] = hf(hf_sdpa, False)
        cases["HF eager"] = hf(hf_eager, False)
        cases["HF eager + attn"] = hf(hf_eager, True)
    times = interleaved(cases, repeats=repeats, warmup=1)
    return times, check


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=5, quick_repeats=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    args = resolve(parser.parse_args(argv))
    with_hf = not args.no_hf
    if with_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed (pip install -r requirements-bench.txt); "
                  "skipping the HF columns", file=sys.stderr)
            with_hf = False
    print_header("Inference on CPU (stand-in weights, same weights for HF)", args)
    share = CpuShare()
    if with_hf:
        print(f"transformers {transformers.__version__}; HF sdpa = the default attention "
              "implementation (cannot return attention); HF eager + attn = "
              "`output_attentions=True`, which needs eager.\n")

    print("### Load and preprocess (photo -> model input)\n")
    print(load_preprocess_table(max(3, 2 * args.repeats)) + "\n")

    main_rows, hf_rows, checks, goals = [], [], [], []
    for variant in args.variants:
        times, check = bench_variant(variant, args.repeats, with_hf)
        if check:
            checks.append(check)
        plain, cap = times["plain"], times["capture"]
        overhead = paired_ratio(cap, plain)
        name = LABEL[variant]
        hf_s = times["HF sdpa"].seconds() if with_hf else "n/a"
        hf_attn = times["HF eager + attn"].seconds() if with_hf else "n/a"
        ratio = paired_ratio(cap, times["HF eager + attn"]).ratio() if with_hf else "n/a"
        main_rows.append([
            name, "4:3 photo 1066x800 -> input 800x1066", plain.seconds(),
            f"{cap.seconds()} ({(overhead.median - 1) * 100:+.1f} %)",
            times["analyze(photo 1066x800)"].seconds(), hf_s, hf_attn, ratio,
        ])
        main_rows.append([
            name, "12 MP JPEG 4032x3024 -> input 800x1066", "same tensor as above",
            "same tensor as above", times["analyze(12 MP JPEG path)"].seconds(),
            "same tensor as above", "same tensor as above", "",
        ])
        if with_hf:
            hf_rows.append(hf_breakdown(name, times))
        analyzed = paired_ratio(times["analyze(photo 1066x800)"], plain)
        overhead_rows = [["capture / plain", overhead.ratio()],
                         ["analyze(photo) / plain", analyzed.ratio()],
                         ["analyze(12 MP path) / plain",
                          paired_ratio(times["analyze(12 MP JPEG path)"], plain).ratio()]]
        goals.append([name, "analyze(photo) / plain forward", analyzed.ratio(), "<= 1.05",
                      "yes" if analyzed.median <= 1.05 else "NO"])
        if with_hf:
            vs_hf = paired_ratio(times["analyze(photo 1066x800)"], times["HF eager + attn"])
            overhead_rows.append(["analyze(photo) / HF eager + attn", vs_hf.ratio()])
            goal = 0.5 if variant == "detr_resnet50" else 0.7  # R50: issue 17's goal
            goals.append([name, "analyze(photo) / HF with attentions", vs_hf.ratio(),
                          f"<= {goal}", "yes" if vs_hf.median <= goal else "NO"])
        print(f"### {name}: per-round ratios (median, quartiles)\n")
        print(table(["ratio", name], overhead_rows) + "\n")

    for check in checks:
        print("### Same weights check\n\n" + check + "\n")
    print("### Summary (median of repeats, IQR in brackets)\n")
    print("ours/HF = (forward under capture) / (HF eager forward with output_attentions=True), "
          "per round; both return every layer's attention for the same tensor.\n")
    print(table(["variant", "input", "plain forward", "capture (+x %)", "analyze", "HF (sdpa)",
                 "HF + attn (eager)", "ours/HF"], main_rows) + "\n")
    print("### Goals (per-round ratios, median and quartiles)\n")
    print(table(["variant", "ratio", "measured", "goal", "met?"], goals) + "\n")
    if with_hf:
        print("### Hugging Face: cost of returning attention\n")
        print(table(["variant", "HF sdpa", "HF eager", "HF eager + attn", "eager / sdpa",
                     "eager+attn / sdpa", "ours plain / HF sdpa"], hf_rows) + "\n")
    print("\n" + share.report())


def hf_breakdown(name: str, times: dict[str, Timing]) -> list[str]:
    sdpa = times["HF sdpa"]
    return [name, sdpa.seconds(), times["HF eager"].seconds(),
            times["HF eager + attn"].seconds(),
            paired_ratio(times["HF eager"], sdpa).ratio(),
            paired_ratio(times["HF eager + attn"], sdpa).ratio(),
            paired_ratio(times["plain"], sdpa).ratio()]


if __name__ == "__main__":
    main()
