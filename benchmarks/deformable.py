"""What capturing every sampling point costs on the deformable DETR families.

Per family and size, interleaved: the plain forward (``output_attentions`` False), the forward
with ``output_attentions=True`` (transformers' own weights, without locations: the issue's
baseline), :func:`detr_viz.sampling_capture.capture_sampling` of the decoder, and the same
with ``encoder=True`` (a deformable encoder's points per token, or a dense AIFI softmax). Goal
(issue 14): capture <= 1.1 x the plain forward. With ``--analyze``, the whole of detr-viz's
``analyze`` on a photo (image processor, capture with the encoder, the record) against the
same image processor followed by transformers' forward with ``output_attentions=True``
(issue 14's goal: at most 1.1x). With ``--faithfulness``, what a faithfulness score costs
there (:mod:`detr_viz.faithfulness`, each run a replay of encoder and decoder on changed
tokens, :mod:`detr_viz.deformable_replay`) against the plain forward, and the tokens an
analysis keeps for it.

Sizes: ``tiny``, the tests' models (``tests/deformable_models.py``) on their small images, and
``real``, each family's released configuration size with random weights (timing does not
depend on them; nothing is downloaded: transformers' own ResNet / HGNetV2 / ViT configs,
never a timm or hub backbone) at its usual input: Deformable DETR R50 at 800 x 1066, RT-DETR
and RT-DETRv2 R18 at 640 x 640, D-FINE and DEIMv2 (transformers' default configs, HGNetV2) at
640 x 640,
LW-DETR (transformers' default ViT) at 640 x 640, RF-DETR (transformers' default DINOv2) at
560 x 560. Real sizes take minutes on 2 CPU cores; ``--sizes tiny`` is a smoke run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from benchmarks.common import (  # noqa: E402
    CpuShare,
    common_arguments,
    fmt_time,
    interleaved,
    official_size_photo,
    paired_ratio,
    print_header,
    resolve,
    table,
)
from detr_viz.sampling_capture import capture_sampling  # noqa: E402

FAMILIES = ("deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr",
            "rf_detr")
REAL_INPUT = {"deformable_detr": (800, 1066), "rt_detr": (640, 640), "rt_detr_v2": (640, 640),
              "d_fine": (640, 640), "deimv2": (640, 640), "lw_detr": (640, 640),
              "rf_detr": (560, 560)}


def real_model(family: str) -> torch.nn.Module:
    """The family's released size, random weights, eager attention, eval, float32."""
    r18 = dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
               layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    r18_detr = dict(encoder_in_channels=[128, 256, 512], hidden_expansion=0.5,
                    decoder_layers=3, num_labels=80)
    if family == "deformable_detr":
        resnet50 = tf.ResNetConfig(out_features=["stage2", "stage3", "stage4"])
        config = tf.DeformableDetrConfig(backbone_config=resnet50, num_labels=91)
    elif family == "rt_detr":
        config = tf.RTDetrConfig(backbone_config=tf.RTDetrResNetConfig(**r18), **r18_detr)
    elif family == "rt_detr_v2":
        config = tf.RTDetrV2Config(backbone_config=tf.RTDetrResNetConfig(**r18), **r18_detr)
    elif family == "d_fine":
        config = tf.DFineConfig(num_labels=80)
    elif family == "deimv2":
        config = tf.Deimv2Config(num_labels=80)
    elif family == "lw_detr":
        config = tf.LwDetrConfig(projector_scale_factors=[1.0], num_labels=80)
    else:
        config = tf.RfDetrConfig(num_labels=80)
    model = getattr(tf, _CLASSES[family])(config)
    model.set_attn_implementation("eager")
    return model.eval().requires_grad_(False)


_CLASSES = {"deformable_detr": "DeformableDetrForObjectDetection",
            "rt_detr": "RTDetrForObjectDetection", "rt_detr_v2": "RTDetrV2ForObjectDetection",
            "d_fine": "DFineForObjectDetection", "deimv2": "Deimv2ForObjectDetection",
            "lw_detr": "LwDetrForObjectDetection",
            "rf_detr": "RfDetrForObjectDetection"}


def tiny_model(family: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    from tests.deformable_models import SIZES
    from tests.deformable_models import tiny_model as build

    return build(family, dtype=torch.float32), SIZES[family]


def analyze_rows(family: str, model, repeats: int, work: Path) -> list[str]:
    """detr-viz's ``analyze`` of a 1066 x 800 photo (the family's image processor, the capture
    with the encoder, the record) against what a transformers user runs for the attention
    weights: the same processor, then the forward with ``output_attentions=True``."""
    from detr_viz import analyze, load_model

    folder = work / family
    model.save_pretrained(folder)
    detector = load_model(checkpoint=folder)
    photo = official_size_photo()

    def transformers_way():
        inputs = detector.processor(images=photo, return_tensors="pt")
        with torch.inference_mode():
            return detector.hf(**inputs, output_attentions=True)

    cases = {"processor + output_attentions": transformers_way,
             "analyze": lambda: analyze(detector, photo)}
    times = interleaved(cases, repeats)
    size = detector.processor(images=photo, return_tensors="pt")["pixel_values"].shape
    return [family, f"{size[3]} x {size[2]}", *(fmt_time(times[n].median) for n in cases),
            f"{paired_ratio(times['analyze'], times['processor + output_attentions']).median:.3f}x",
            *rollout_times(analyze(detector, photo))]


def faithfulness_rows(family: str, model, work: Path) -> list[list[str]]:
    """Wall time (once each) of a photo's random baseline (16 runs), one map's score (14
    runs), one replay run of a batch of 4 against the plain forward, and the tokens kept."""
    from detr_viz import analyze, faithfulness, load_model
    from detr_viz.deformable_replay import deformable_replay

    folder = work / family
    if not folder.exists():
        model.save_pretrained(folder)
    detector = load_model(checkpoint=folder)
    photo = official_size_photo()
    a = analyze(detector, photo)
    pixels = detector.processor(images=photo, return_tensors="pt")
    levels = [t[0] for t in a.inputs.tokens]
    base = faithfulness.random_baseline(detector, a)
    cases = {"plain forward (backbone included), 1 image":
             lambda: detector.hf(**pixels),
             "replay, 4 token sets (one batch)":
             lambda: deformable_replay(detector.hf, a.inputs, [levels] * 4),
             "random baseline (16 runs)": lambda: faithfulness.random_baseline(detector, a),
             "score one map (14 runs)": lambda: faithfulness.score_maps(
                 detector, a, 0, {"raw": a.decoder_tokens([0])[0]}, baseline=base)}
    rows = []
    kept = sum(t.numel() * t.element_size() for t in a.inputs.tokens) / 1e6
    for name, case in cases.items():
        with torch.inference_mode():
            case()  # warm-up
            start = time.perf_counter()
            case()
        rows.append([family, name, fmt_time(time.perf_counter() - start), f"{kept:.1f} MB"])
    return rows


def rollout_times(analysis) -> list[str]:
    """Rollout through the deformable layers: building it (the sparse matrices, R_qq^T C),
    then four queries' maps, then a click's encoder map (each once, wall time)."""
    from detr_viz import explain

    start = time.perf_counter()
    roll = explain.rollout(analysis)
    built = time.perf_counter() - start
    queries = [d.query for d in analysis.detections(0.0)[:4]]
    start = time.perf_counter()
    roll.decoder_maps(queries)
    maps = time.perf_counter() - start
    if roll.layers:
        start = time.perf_counter()
        roll.encoder_map((500.0, 400.0))
        click = fmt_time(time.perf_counter() - start)
    else:
        click = "(no encoder)"
    return [fmt_time(built), fmt_time(maps), click]


def measure(family: str, model, size: tuple[int, int], repeats: int) -> list[str]:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))

    def forward(**extra):
        with torch.inference_mode():
            return model(pixel_values=x, **extra)

    cases = {"forward": forward,
             "output_attentions": lambda: forward(output_attentions=True),
             "capture": lambda: capture_sampling(model, x),
             "capture+encoder": lambda: capture_sampling(model, x, encoder=True)}
    times = interleaved(cases, repeats)
    cap = capture_sampling(model, x, encoder=True)
    kept = [cap.decoder.locations, cap.decoder.weights]
    kept += [cap.encoder.locations, cap.encoder.weights] if cap.encoder else []
    kept += list(cap.dense_encoder or ())
    megabytes = sum(t.numel() * t.element_size() for t in kept) / 1e6
    return [family, f"{size[1]} x {size[0]}", *(fmt_time(times[n].median) for n in cases),
            *(f"{paired_ratio(times[n], times['forward']).median:.3f}x"
              for n in ("output_attentions", "capture", "capture+encoder")),
            f"{megabytes:.1f} MB"]


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=5, quick_repeats=2)
    parser.add_argument("--sizes", nargs="+", choices=("tiny", "real"), default=["tiny", "real"])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--faithfulness", action="store_true",
                        help="also what a faithfulness score costs (real sizes)")
    parser.add_argument("--analyze", action="store_true",
                        help="also detr-viz's analyze() of a photo against the family's image "
                             "processor + forward with output_attentions=True (real sizes)")
    args = resolve(parser.parse_args())
    print_header("Sampling-point capture on the deformable DETR families", args)
    share = CpuShare()
    rows, whole, scores = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for family in args.families:
                torch.manual_seed(0)
                model, shape = (tiny_model(family) if size == "tiny"
                                else (real_model(family), REAL_INPUT[family]))
                rows.append([size, *measure(family, model, shape, args.repeats)])
                if args.analyze and size == "real":
                    whole.append(analyze_rows(family, model, args.repeats, Path(tmp)))
                if args.faithfulness and size == "real":
                    scores += faithfulness_rows(family, model, Path(tmp))
                del model
    print(table(["size", "family", "input (W x H)", "forward", "output_attentions=True",
                 "capture", "capture+encoder", "output_attentions / forward",
                 "capture / forward", "capture+encoder / forward", "record (all)"], rows))
    if whole:
        print("\nA photo end to end (1066 x 800 JPEG-sized image, the family's image processor "
              "with its default sizes):\n")
        print(table(["family", "model input (W x H)", "processor + output_attentions=True",
                     "analyze (capture with encoder)", "analyze / transformers",
                     "rollout: build", "rollout: 4 queries", "rollout: a click"], whole))
    if scores:
        print("\nFaithfulness (steps = 8) on the same photo, each once after a warm-up:\n")
        print(table(["family", "what", "time", "tokens kept per analysis"], scores))
    print(f"\nMedians of {args.repeats} interleaved rounds after 1 warm-up; ratios per round. "
          + share.report())


if __name__ == "__main__":
    main()
