"""Shared helpers for the benchmark scripts: timing, statistics, Markdown, machine, test photos.

Timing: every script compares its variants inside ONE process and interleaves them (round r
runs every variant once, in an order rotated by r), so slow phases of a shared machine hit all
variants alike; ratios are computed per round (a_r / b_r) and then summarised. Statistics are
the median and the inter-quartile range (IQR = q3 - q1) of the timed repeats, after warm-up.

Photos: deterministic, photo-like JPEGs (a smooth random colour field, shapes with edges and
mild pixel noise, so that they compress and decode like real photos rather than like flat
synthetic images), written once into a temporary folder and reused; nothing is committed.

Weights: the deterministic stand-ins of :mod:`detr_viz.testing` (the official checkpoints cannot
be downloaded here, and nothing here loads weights from a hub). Timing does not depend on the
weight values; only the number of detections above a threshold does, which is why the page
and explanation benchmarks use the "planted" stand-ins that spread the scores out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTO_DIR_ENV = "DETR_VIZ_BENCH_DIR"  # where test photos and stand-in checkpoints are cached
SIZES = {"12MP": (4032, 3024), "48MP": (8000, 6000)}  # 4:3 phone photos, landscape


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Timing:
    """Timed repeats of one variant, in seconds (or a dimensionless ratio)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        q1, q3 = self.quartiles
        return q3 - q1

    def seconds(self) -> str:
        """``"1.234 s ± 0.012"``: median and IQR, in s or ms."""
        return f"{fmt_time(self.median)} (IQR {fmt_time(self.iqr)})"

    def ratio(self) -> str:
        """``"1.03x (1.01-1.05)"``: median ratio and its quartiles."""
        q1, q3 = self.quartiles
        return f"{self.median:.3f}x ({q1:.3f}-{q3:.3f})"


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def paired_ratio(a: Timing, b: Timing) -> Timing:
    """Per-round ratios a_r / b_r (both timed in the same round, close together)."""
    return Timing(tuple(x / y for x, y in zip(a.samples, b.samples, strict=True)))


def interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time every case ``repeats`` times, one of each per round, rotating the order per round.

    Each call's result is dropped after the clock stops; garbage is collected before each call
    so that one variant's leftovers are not paid for by the next.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            start = time.perf_counter()
            result = cases[name]()
            samples[name].append(time.perf_counter() - start)
            del result
    return {name: Timing(tuple(s)) for name, s in samples.items()}


# ----------------------------------------------------------------------------- contention


def _cpu_ticks() -> tuple[int, int, int]:
    """(busy ticks of the whole machine, all ticks, ticks of this process and its waited-for
    children), from /proc (USER_HZ units)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user..steal (guest time is already in user)
    with open("/proc/self/stat") as own:
        parts = own.read().rsplit(")", 1)[1].split()
    mine = sum(int(v) for v in parts[11:15])  # utime stime cutime cstime
    return total - idle, total, mine


class CpuShare:
    """How much of the machine's CPU other processes used between start() and report().

    On a shared 2-core machine this is the honest caveat for every number printed: PyTorch's
    OpenMP threads spin-wait, so a busy neighbour can slow a 2-thread forward pass several-fold.
    """

    def __init__(self) -> None:
        self.start = _cpu_ticks() if Path("/proc/stat").exists() else None

    def report(self) -> str:
        if self.start is None:
            return "CPU share of other processes: n/a (no /proc)"
        busy, total, mine = (b - a for a, b in zip(self.start, _cpu_ticks(), strict=True))
        cpus = os.cpu_count() or 1
        others = max(busy - mine, 0) / max(total, 1)
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        return (f"During this run other processes used {others * 100:.0f} % of the machine's "
                f"{cpus} CPUs (this run: {mine / max(total, 1) * 100:.0f} %); load average at "
                f"the end {load}.")


# ----------------------------------------------------------------------------- Markdown


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's name, with its family and model numbers where Linux gives them: machines of one
    name differ in generation (the machines called "AMD EPYC" here have been more than one), and
    ratios of convolution-bound to memory-bound work move with the generation."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_info() -> dict[str, str]:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": datetime.date.today().isoformat(),
        "cpus (nproc)": str(usable),
        "cpu model": cpu_model(),
        # e.g. AVX512, AVX2; ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower them (what a
        # laptop without AVX-512 runs, on this machine)
        "torch's CPU kernels / ONEDNN_MAX_CPU_ISA": (
            f"{torch.backends.cpu.get_cpu_capability()} / "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}"
        ),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads (intra / inter-op)": (
            f"{torch.get_num_threads()} / {torch.get_num_interop_threads()}"
        ),
        "OMP_WAIT_POLICY / OMP_NUM_THREADS": (
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} / "
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
        ),
        "load average (1/5/15 min) at start": load,
    }


def print_header(title: str, args: argparse.Namespace | None = None) -> None:
    """Title, the exact command, and the machine, as Markdown."""
    print(f"## {title}\n")
    command = "python -m " + __name__.rsplit(".", 1)[0] + "." + Path(sys.argv[0]).stem
    print(f"Command: `{command} {shlex.join(sys.argv[1:])}`".rstrip() + "\n")
    print(table(["machine", ""], list(machine_info().items())))
    if args is not None:
        print("\nOptions: " + ", ".join(f"{k}={v}" for k, v in vars(args).items()))
    print()


def common_arguments(description: str, repeats: int, quick_repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer repeats ({quick_repeats} instead of {repeats}): a smoke run")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats per variant (default {repeats})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before anything runs (default: torch's)")
    parser.set_defaults(default_repeats=repeats, quick_repeats=quick_repeats)
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``args.repeats`` from --quick and apply --threads."""
    import torch

    if args.repeats is None:
        args.repeats = args.quick_repeats if args.quick else args.default_repeats
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    del args.default_repeats, args.quick_repeats
    return args


# ----------------------------------------------------------------------------- models


def stand_in_model(variant: str, planted: bool = False):
    """``variant`` filled with deterministic stand-in weights (recipe, or planted), eval mode."""
    from detr_viz import build_model
    from detr_viz.testing import planted_state_dict, recipe_state_dict

    model = build_model(variant)
    state = planted_state_dict(model) if planted else recipe_state_dict(model)
    model.load_state_dict(state, strict=True)
    return model.eval()


@contextmanager
def count_forward_calls() -> Iterator[dict[str, int]]:
    """Count every ``DETR.forward`` call (any instance, any thread) inside the block."""
    from detr_viz.model import DETR

    counter = {"calls": 0}
    original = DETR.forward

    def counted(self, *args, **kwargs):
        counter["calls"] += 1
        return original(self, *args, **kwargs)

    DETR.forward = counted
    try:
        yield counter
    finally:
        DETR.forward = original


def bench_dir() -> Path:
    folder = Path(os.environ.get(PHOTO_DIR_ENV) or Path(tempfile.gettempdir()) / "detr-viz-bench")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stand_in_weights() -> Path:
    """A folder holding planted stand-in checkpoints under the official names (for
    ``DETR_VIZ_WEIGHTS``), as ``python -m detr_viz.testing FOLDER`` writes them."""
    from detr_viz.testing import write_weights_folder

    folder = bench_dir() / "weights"
    write_weights_folder(str(folder))
    return folder


# ----------------------------------------------------------------------------- photos


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic photo-like RGB image: smooth colour field + shapes + mild noise."""
    rng = np.random.default_rng(seed * 1_000_003 + width * 7919 + height)
    cells = rng.integers(0, 256, (height // 320 + 2, width // 320 + 2, 3)).astype(np.float32)
    cells = 0.5 * cells + 0.5 * cells.mean(axis=2, keepdims=True)  # muted colours
    image = Image.fromarray(cells.astype(np.uint8))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    unit = min(width, height)
    for _ in range(60):  # objects with hard edges: boxes, discs, thick lines
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(unit // 30, unit // 4, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        else:
            draw.line([x, y, x + w, y + h], fill=colour, width=int(unit // 80))
    pixels = np.array(image)  # (H, W, 3) uint8, writeable
    for top in range(0, height, 512):  # sensor-like noise, strip by strip to bound memory
        strip = pixels[top : top + 512].astype(np.int16)
        strip += rng.normal(0, 6, strip.shape).astype(np.int16)
        pixels[top : top + 512] = np.clip(strip, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def photo_jpeg(size: str | tuple[int, int], quality: int = 90) -> Path:
    """Path of a cached photo-like JPEG of ``size`` ("12MP", "48MP" or (width, height))."""
    width, height = SIZES[size] if isinstance(size, str) else size
    path = bench_dir() / f"photo_{width}x{height}_q{quality}.jpg"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.part")
        photo_like(width, height).save(partial, format="JPEG", quality=quality)
        os.replace(partial, path)  # atomic: concurrent runs never see half a file
    return path


def official_size_photo() -> Image.Image:
    """The 12 MP photo resized to 1066 x 800: a 4:3 photo already at DETR's input size."""
    from detr_viz import load_image

    return load_image(photo_jpeg("12MP")).resize((1066, 800), Image.Resampling.BILINEAR)


def file_mb(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MB"

# The variants the scripts compare and their table labels.
VARIANTS = ("detr_resnet50", "detr_resnet50_dc5")
LABEL = {"detr_resnet50": "R50", "detr_resnet50_dc5": "R50-DC5"}
