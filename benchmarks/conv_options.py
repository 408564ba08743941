"""Experiment: two ways to a faster CPU backbone that were measured and not kept (issue 17).

    python -m benchmarks.conv_options [--quick] [--repeats N] [--threads N]

1. **Winograd 3x3 convolutions** (NNPACK, ``torch._nnpack_spatial_convolution``, in PyTorch's
   CPU builds): each 3x3 convolution shape of the R50 body at the official input size, with
   random weights scaled as trained ones are (output variance ~ input variance), against
   oneDNN's direct convolution on channels-last activations (what the body runs). Time, and
   mean |float32 - float64| of each, the float64 run being the direct convolution in float64.
   Issue 17 allows a fast path a few times the plain path's float32 error.
2. **Fewer fresh pages** (glibc only): the body as it runs (fused epilogues) with glibc's
   default allocation, where every buffer above 32 MB is mapped fresh and zeroed by the kernel,
   against a process-wide ``mallopt`` that keeps such buffers in the heap for reuse. Rounds
   alternate the two settings; each round reports its time and minor page faults.
"""

from __future__ import annotations

import ctypes
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    CpuShare,
    common_arguments,
    interleaved,
    official_size_photo,
    paired_ratio,
    print_header,
    resolve,
    stand_in_model,
    table,
)
from detr_viz import preprocess

CL = torch.channels_last
# (channels, output h, w) of the R50 body's stride-1 3x3 convolutions at input 800x1066
SHAPES = {"stage 1": (64, 200, 267), "stage 2": (128, 100, 134), "stage 3": (256, 50, 67),
          "stage 4": (512, 25, 34)}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def winograd_rows(repeats: int) -> list[list[str]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for stage, (c, h, w) in SHAPES.items():
        x = torch.randn(1, c, h, w, generator=generator)
        weight = torch.randn(c, c, 3, 3, generator=generator) / (3 * c**0.5)
        bias = torch.randn(c, generator=generator)
        x_cl, weight_cl = x.contiguous(memory_format=CL), weight.contiguous(memory_format=CL)
        with torch.inference_mode():
            truth = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
            direct = F.conv2d(x_cl, weight_cl, bias, padding=1)
            winograd = torch._nnpack_spatial_convolution(x, weight, bias, [1, 1])
            times = interleaved({
                "direct": lambda x=x_cl, w=weight_cl, b=bias: F.conv2d(x, w, b, padding=1),
                "winograd": lambda x=x, w=weight, b=bias: torch._nnpack_spatial_convolution(
                    x, w, b, [1, 1]),
            }, repeats=repeats, warmup=1)
        error_direct = (direct.double() - truth).abs().mean().item()
        error_winograd = (winograd.double() - truth).abs().mean().item()
        rows.append([f"{stage}: {c} channels, {h}x{w}", times["direct"].seconds(),
                     times["winograd"].seconds(),
                     paired_ratio(times["winograd"], times["direct"]).ratio(),
                     f"{error_direct:.1e}", f"{error_winograd:.1e}",
                     f"{error_winograd / error_direct:.1f}x"])
    return rows


def fresh_pages_rows(repeats: int) -> tuple[list[list[str]], str]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return [], "not glibc: skipped"
    body = stand_in_model("detr_resnet50").backbone[-2].body
    x = preprocess(official_size_photo()).tensor
    settings = {"glibc's default": (32 << 20, 64 << 20), "mallopt: heap up to 1 GiB": (1 << 30,
                                                                                       1 << 30)}
    times = {name: [] for name in settings}
    faults = {name: [] for name in settings}
    with torch.inference_mode():
        body(x)
        for _ in range(repeats):
            for name, (mmap, trim) in settings.items():
                mallopt(M_MMAP_THRESHOLD, mmap)  # a fixed threshold in both settings
                mallopt(M_TRIM_THRESHOLD, trim)
                malloc_trim(0)
                body(x)  # the allocator settles on the setting
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                body(x)
                times[name].append(time.perf_counter() - start)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    base = times["glibc's default"]
    rows = []
    for name in settings:
        ratios = [a / b for a, b in zip(times[name], base, strict=True)]
        rows.append([name, f"{statistics.median(times[name]) * 1e3:.1f} ms",
                     f"{statistics.median(ratios):.3f}x",
                     f"{statistics.median(faults[name]):,.0f}"])
    return rows, ""


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=9, quick_repeats=3)
    args = resolve(parser.parse_args(argv))
    print_header("Convolution options not kept (R50 body, input 800x1066)", args)
    share = CpuShare()
    print("### 1. Winograd (NNPACK) against direct (oneDNN, channels-last) 3x3 convolutions\n")
    print(table(["3x3 convolution", "direct", "Winograd", "Winograd / direct",
                 "direct: mean |f32 - f64|", "Winograd: mean |f32 - f64|", "error ratio"],
                winograd_rows(args.repeats)) + "\n")
    print("### 2. The fused body with fresh pages and with a heap that keeps them\n")
    rows, note = fresh_pages_rows(args.repeats)
    print(note or table(["allocation", "body (median)", "/ default (median per round)",
                         "page faults per run"], rows))
    print("\n" + share.report())


if __name__ == "__main__":
    main()
