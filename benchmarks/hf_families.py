"""What exact attention capture costs on transformers' Conditional DETR and DAB-DETR.

Per family, on one input, interleaved: the plain forward (eager attention, output_attentions
False), the forward with ``output_attentions=True`` (transformers' own dense weights: the
baseline capture is compared with), and :func:`detr_viz.hf_capture.capture_hf` (one forward
with pre-hooks that recompute q and k and factor every attention, Conditional DETR's and
DAB-DETR's content / spatial terms included), and :func:`detr_viz.analyze` of a photo of the
input's size through :class:`detr_viz.families.HFDetector` (decode, resize, normalise, capture,
the Analysis record: what the page and the notebook call). Goal (issue 13): analyze <= 1.1 x the
output_attentions run.

Models: the released sizes (d_model 256, 8 heads, 6 + 6 layers, 300 queries, 91 classes) with
transformers' own ResNet-50 backbone, random weights (timing does not depend on them); nothing
is downloaded. Runs in under a minute at the default 480 x 640 input on 2 CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CpuShare,
    common_arguments,
    fmt_time,
    interleaved,
    paired_ratio,
    print_header,
    resolve,
    table,
)
from detr_viz import analyze  # noqa: E402
from detr_viz.families import HFDetector  # noqa: E402
from detr_viz.hf_capture import capture_hf  # noqa: E402
from detr_viz.hf_families import cast_dab_queries  # noqa: E402
from detr_viz.spec import ModelSpec  # noqa: E402


def released_size_model(family: str):
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        DabDetrConfig,
        DabDetrForObjectDetection,
        ResNetConfig,
    )

    common = {"num_queries": 300, "num_labels": 91,
              "backbone_config": ResNetConfig(out_features=["stage4"])}
    if family == "conditional_detr":
        model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(**common))
    else:
        model = DabDetrForObjectDetection(DabDetrConfig(**common))
        cast_dab_queries(model)
    model.set_attn_implementation("eager")
    return model.eval().requires_grad_(False)


def record_mb(cap) -> float:
    factors = cap.encoder + cap.decoder + cap.decoder_self + cap.content + cap.spatial
    tensors = [t for f in factors for t in (f.q, f.k, f.lse)]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=3, quick_repeats=1)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    args = resolve(parser.parse_args())
    print_header("Exact attention capture on Hugging Face Conditional DETR and DAB-DETR", args)
    share = CpuShare()
    x = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    pixels = np.random.default_rng(0).integers(0, 255, (*args.size, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)  # analyze's input: a photo of the same size
    rows = []
    for family in ("conditional_detr", "dab_detr"):
        model = released_size_model(family)

        def plain(model=model):
            with torch.inference_mode():
                return model(pixel_values=x)

        def dense(model=model):
            with torch.inference_mode():
                return model(pixel_values=x, output_attentions=True)

        detector = HFDetector(model, ModelSpec(family=family, num_queries=300, name=family,
                                               official=False))
        cases = {"forward": plain, "output_attentions": dense,
                 "capture_hf": lambda model=model: capture_hf(model, x),
                 "analyze": lambda detector=detector: analyze(
                     detector, photo, short_side=args.size[0], max_size=2 * args.size[1])}
        times = interleaved(cases, args.repeats)
        cap = capture_hf(model, x)
        ratio = paired_ratio(times["capture_hf"], times["output_attentions"])
        whole = paired_ratio(times["analyze"], times["output_attentions"])
        over_plain = paired_ratio(times["capture_hf"], times["forward"])
        rows.append([family, f"{cap.grid[0]} x {cap.grid[1]}",
                     *(fmt_time(times[n].median) for n in cases),
                     f"{ratio.median:.2f}x", f"{whole.median:.2f}x", f"{over_plain.median:.2f}x",
                     f"{record_mb(cap):.1f} MB"])
    print(table(["family", "grid", "forward", "output_attentions=True", "capture_hf", "analyze",
                 "capture / output_attentions", "analyze / output_attentions",
                 "capture / forward", "factors kept"], rows))
    print(f"\nMedians of {args.repeats} interleaved rounds after 1 warm-up; ratios per round. "
          + share.report())


if __name__ == "__main__":
    main()
