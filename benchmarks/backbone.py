"""Experiment: the CNN backbone on the CPU: norms folded into the convolutions, channels_last.

    python -m benchmarks.backbone [--quick] [--repeats N] [--threads N] [--no-float64]

Times ``model.backbone[-2]`` alone (the ResNet body and the padding mask: what the classic
notebook hooks) on the official input size, one 3x800x1066 image (stand-in recipe weights,
batch 1), in four variants, interleaved:
- ``(a) modules``: ``fold_norms(False)``: every convolution, then its FrozenBatchNorm2d as a
  module (torchvision's order of operations; what detr-viz ran before);
- ``(b) channels_last``: (a) with the weights and the input in channels_last memory format;
- ``(c) norms folded``: each norm folded into its convolution on the fly (detr-viz's default
  until 2026-12-07);
- ``(d) folded + channels_last``: (c) with the weights and the input in channels_last
  (detr-viz's default from then until 2026-12-08);
- ``(e) (d) + fused epilogues``: (d) with each ReLU and residual sum fused into the
  convolution before it, the sum written into the residual's buffer (``fold_norms()``'s
  default since; only where no gradient is recorded, as here).

Besides the time, one more run of each variant counts its minor page faults (fresh pages the
kernel hands the process: large activations allocated anew).

Agreement, on the same input: the float64 run of (c) against the float64 run of (a) (relative
to the largest feature), and every variant's float32 output against the float64 run of (a):
a variant that is exact must stay as close to float64 as (a) itself is.
"""

from __future__ import annotations

import copy
import resource

import torch

from benchmarks.common import (
    LABEL,
    VARIANTS,
    CpuShare,
    common_arguments,
    interleaved,
    paired_ratio,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz.model import NestedTensor

HW = (800, 1066)  # DETR's input for a 4:3 photo: shorter side 800
CL = torch.channels_last
NAMES = {
    "a": "(a) modules",
    "b": "(b) channels_last",
    "c": "(c) norms folded",
    "d": "(d) folded + channels_last",
    "e": "(e) (d) + fused epilogues",
}


def backbones(variant: str) -> dict[str, tuple[torch.nn.Module, bool]]:
    """Variant key -> (backbone, channels_last input), each its own copy of the stand-in."""
    backbone = stand_in_model(variant).backbone[-2]
    out = {}
    for key, fold, channels_last, fuse in (
            ("a", False, False, False), ("b", False, True, False), ("c", True, False, False),
            ("d", True, True, False), ("e", True, True, True)):
        module = copy.deepcopy(backbone)
        module.body.fold_norms(fold, channels_last, fuse)
        out[key] = (module.to(memory_format=CL) if channels_last else module, channels_last)
    return out


def inputs(dtype: torch.dtype = torch.float32) -> tuple[NestedTensor, NestedTensor]:
    """The same (1, 3, 800, 1066) image, contiguous and channels_last, with an empty mask."""
    x = torch.randn(1, 3, *HW, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = torch.zeros(1, *HW, dtype=torch.bool)
    return NestedTensor(x, mask), NestedTensor(x.contiguous(memory_format=CL), mask)


def features(backbone: torch.nn.Module, x: NestedTensor) -> torch.Tensor:
    return backbone(x)["0"].tensors


def page_faults(run) -> int:
    """Minor page faults of one call of ``run``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def agreement(models: dict[str, tuple[torch.nn.Module, bool]], float64: bool) -> dict[str, str]:
    """Per variant: its float32 distance to float64 (a); for (c) also float64 (c) vs (a)."""
    if not float64:
        return {key: "" for key in models}
    plain64, _ = inputs(torch.float64)
    ref = features(copy.deepcopy(models["a"][0]).double(), plain64)
    folded64 = features(copy.deepcopy(models["c"][0]).double(), plain64)
    scale = ref.abs().max()
    plain, channels_last = inputs()
    out = {}
    for key, (module, cl) in models.items():
        got = features(module, channels_last if cl else plain).double()
        out[key] = f"{((got - ref).abs().max() / scale).item():.1e}"
    out["c"] += f"; float64: {((folded64 - ref).abs().max() / scale).item():.1e}"
    return out


def bench(variant: str, repeats: int, float64: bool):
    models = backbones(variant)
    plain, channels_last = inputs()
    cases = {
        NAMES[key]: (lambda m=module, x=(channels_last if cl else plain): features(m, x))
        for key, (module, cl) in models.items()
    }
    with torch.inference_mode():
        share = CpuShare()
        times = interleaved(cases, repeats=repeats, warmup=1)
        contention = share.report()
        faults = {name: page_faults(run) for name, run in cases.items()}
        checks = agreement(models, float64)
    return times, faults, checks, contention


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=7, quick_repeats=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-float64", dest="float64", action="store_false",
                        help="skip the agreement columns (two float64 forward passes each)")
    args = resolve(parser.parse_args(argv))
    print_header("CNN backbone (model.backbone[-2]), 3x800x1066, batch 1", args)
    for variant in args.variants:
        times, faults, checks, contention = bench(variant, args.repeats, args.float64)
        base, before = times[NAMES["a"]], times[NAMES["d"]]
        rows = [[name, t.seconds(), paired_ratio(t, base).ratio(), paired_ratio(t, before).ratio(),
                 f"{faults[name]:,}", check]
                for (name, t), check in zip(times.items(), checks.values(), strict=True)]
        print(f"### {LABEL[variant]}\n")
        print(table(["variant", "time", "/ (a)", "/ (d)", "page faults per run",
                     "float32 vs float64 (a): max abs diff / max |feature|"], rows))
        print(f"\nTiming: {contention}\n")


if __name__ == "__main__":
    main()
