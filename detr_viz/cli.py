"""The command line: ``detr-viz analyze`` a folder of photos, ``detr-viz evaluate`` the result.

    detr-viz analyze photos/ --methods raw,rollout,relevance --threshold 0.9 --out results/
    detr-viz evaluate results/ --methods raw,relevance --annotations instances_val2017.json

Exit status: 0 when every photo was analysed; 1-100 the number of photos that failed (capped
at 100; each is logged with its reason and listed in ``failures.csv``); 125 when the run could
not start (bad options, no weights, a missing device). Also ``python -m detr_viz ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detr_viz.errors import DetrVizError
from detr_viz.model import DEFAULT_VARIANT, VARIANTS

MAX_STATUS = 100  # exit statuses 1..100 count failed photos
CANNOT_START = 125


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(CANNOT_START, f"{self.prog}: error: {message}\n")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, choices=list(VARIANTS),
                        help=f"a released DETR (default {DEFAULT_VARIANT}, or with --checkpoint "
                             "whatever DETR the checkpoint holds)")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint: your fine-tuned DETR (a training .pth with args, a "
                             "state dict, or a Hugging Face folder), or a released model's file "
                             "(default: detr-viz's usual search, $DETR_VIZ_WEIGHTS first, then "
                             "a download)")
    parser.add_argument("--labels", default=None,
                        help="class names of the checkpoint: one per line, a JSON list or "
                             "id -> name object, or a COCO annotation file")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads, if the checkpoint does not record them "
                             "(default 8)")
    parser.add_argument("--dc5", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the backbone is dilated (DC5), if the checkpoint does not "
                             "record it (default: no)")
    parser.add_argument("--device", default=None,
                        help="auto (CUDA, else Apple MPS, else CPU; the default, or "
                             "$DETR_VIZ_DEVICE), cpu, cuda, cuda:N or mps")
    parser.add_argument("--methods", default="raw",
                        help="comma-separated: raw, rollout, relevance (default raw)")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="detr-viz", description="What a DETR detector looks at, for many photos.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    analyze = commands.add_parser("analyze", help="analyse photos and folders of photos")
    analyze.add_argument("photos", nargs="+", help="photos and folders (searched recursively)")
    analyze.add_argument("--out", required=True, help="output folder (created; reruns resume)")
    analyze.add_argument("--threshold", type=float, default=0.9,
                         help="keep detections scoring above this (default 0.9)")
    analyze.add_argument("--short-side", type=int, default=800,
                         help="resize so the shorter side is this (default 800, as DETR)")
    analyze.add_argument("--max-size", type=int, default=1333,
                         help="longer side at most this (default 1333, as DETR)")
    analyze.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="run on Ray: a cluster's address (auto: the one running here, "
                              "ray://host:10001, ...), or none to start Ray on this machine "
                              "(or join $RAY_ADDRESS); needs pip install -r requirements-ray.txt")
    analyze.add_argument("--workers", type=int, default=None,
                         help="with --ray: how many model workers (default: one per CPU, "
                              "or per GPU with --device cuda)")
    _model_options(analyze)
    evaluate = commands.add_parser("evaluate", help="faithfulness of an analyze output folder")
    evaluate.add_argument("folder", help="the --out folder of detr-viz analyze")
    evaluate.add_argument("--annotations", default=None,
                          help="COCO instances JSON: also the map energy inside the matched "
                               "ground-truth box")
    evaluate.add_argument("--steps", type=int, default=8,
                          help="deletion/insertion steps per curve (default 8)")
    evaluate.add_argument("--bootstrap", type=int, default=1000,
                          help="bootstrap resamples for the 95%% intervals (default 1000)")
    _model_options(evaluate)
    evaluate.set_defaults(methods=None)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "analyze":
            from detr_viz.cli_analyze import run_analyze

            failed = run_analyze(args)
        else:
            from detr_viz.cli_evaluate import run_evaluate

            failed = run_evaluate(args)
    except DetrVizError as exc:
        print(f"detr-viz: {exc}", file=sys.stderr)
        return CANNOT_START
    except KeyboardInterrupt:
        print("\ndetr-viz: interrupted; rerun the same command to finish (done photos are kept)",
              file=sys.stderr)
        return 130
    return min(failed, MAX_STATUS)


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
