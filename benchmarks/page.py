"""The page as a user drives it: server time and bytes of every interaction, now and before.

    python -m benchmarks.page                      # this checkout and the baseline, R50 + DC5
    python -m benchmarks.page --baseline c4dde06   # the page as it was at another commit
    python -m benchmarks.page --quick              # 3 repeats instead of 7
    python -m benchmarks.page --families --baseline ''   # also a fine-tuned DETR, Conditional
                                                   # DETR, DAB-DETR, RT-DETR and Deformable
                                                   # DETR, picked on the page
    python -m benchmarks.page --families --baseline '' --variants 'R50,RT-DETR R18'   # some

``streamlit run app.py`` serves on loopback through ``benchmarks/timed_server.py``, which logs
every script run (whole page or fragment): its server time and the bytes of the messages it
sends. Debian's chromium, driven by Playwright (never ``playwright install``), drops a photo
(the 4:3 photo at the official size, 1066x800), waits for the heatmaps, then repeats each
interaction, waiting for the page to settle after each:

- threshold move (sidebar slider, one step down each time: the whole page reruns), layer
  switch and head switch of the decoder maps (cycling through all of them), a click on a new
  point of the photo, a page of detections, a method switch (raw attention <-> rollout, once
  both are computed), and a whole-page rerun (the opacity slider, one step down each time: every
  figure changes); the baseline page has no method control, and its layer and head live in the
  sidebar;
- time to the first heatmaps after the upload: from the drop to a settled page (browser wall
  time), with the server time of the runs in between.

With ``--families``, the same interactions on five checkpoints picked from the page's
Checkpoint list: a fine-tuned DETR (R50, 3 classes, 50 queries, a DETR training checkpoint) and
transformers' Conditional DETR and DAB-DETR at the released sizes (ResNet-50, 6 + 6 layers of 8
heads, 300 queries), RT-DETR at PekingU/rtdetr_r18vd's (ResNet-18, 3 decoder layers, 640x640
input) and Deformable DETR with box refinement at SenseTime's (ResNet-50, 6 + 6 layers, 4
levels, 800 px short side), each deformable page with a level switch too; random weights saved
with ``save_pretrained``. Random weights give every one
of the 300 queries nearly the same score (0.7), a detection each; so, as the planted
stand-ins keep 21 queries above 0.9 on the photo, the four families' class heads are scaled
(the queries' best logits spread over 4 units) and shifted (one constant for all classes) so
that 21 queries score above 0.9 on the photo (the scores mean nothing; timing depends on how
many detections the page draws, not on which), and their pages start from the default
threshold and step down as the released variants' do. The fine-tuned DETR's softmax over 3
classes keeps its random scores (all 50 queries between 0.25 and 0.6): its threshold starts at
0 and steps up.

The baseline is the same app at another commit (default: the last release, c4dde06), exported
with ``git archive`` into a temporary folder and served the same way, in the same run. Weights:
the planted stand-ins (``python -m detr_viz.testing``); timing does not depend on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import (
    CpuShare,
    Timing,
    bench_dir,
    common_arguments,
    official_size_photo,
    print_header,
    resolve,
    stand_in_weights,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update"]
GOAL = {"whole page rerun": 0.080}  # every other interaction: 0.050
SETTLED = ("() => !document.querySelector('[data-stale=\"true\"]') && "
           "!document.querySelector('[data-testid=\"stStatusWidget\"]')")


class Server:
    """One checkout of the app served on a free loopback port, its runs logged."""

    def __init__(self, folder: Path, weights: Path, log: Path, extra: Sequence[str] = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        env = {**os.environ, "DETR_VIZ_WEIGHTS": str(weights), "DETR_VIZ_TIMING": str(log),
               "PYTHONPATH": str(folder), "TORCH_HOME": str(log.parent / "torch")}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "timed_server.py"), "app.py",
             "--server.headless", "true", "--server.address", "127.0.0.1",
             "--server.port", str(self.port), "--browser.gatherUsageStats", "false", *extra],
            cwd=folder, env=env, stdout=self._output(), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("streamlit did not start")

    @staticmethod
    def _output():
        """The server's output: to ``$DETR_VIZ_SERVER_LOG`` when set (a file, appended), else
        discarded."""
        path = os.environ.get("DETR_VIZ_SERVER_LOG")
        return open(path, "ab") if path else subprocess.DEVNULL  # noqa: SIM115 - the child's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Driver:
    """A browser page on a server; ``act`` does one interaction and returns its runs."""

    def __init__(self, browser, server: Server):
        self.server = server
        self.page = browser.new_page(viewport={"width": 1400, "height": 2600})
        self.page.goto(server.url)
        self.page.wait_for_selector(".js-plotly-plot", timeout=300_000)
        self.settle()
        # the page since its drop zone (a baseline may be older: "Upload a photo" to choose)
        self.new = self.page.get_by_text("Upload a photo", exact=True).count() == 0

    def settle(self) -> None:
        time.sleep(0.3)
        self.page.wait_for_function(SETTLED, timeout=600_000)
        time.sleep(0.2)

    def act(self, step) -> list[dict]:
        before = len(self.server.records())
        step()
        self.settle()
        deadline = time.monotonic() + 30
        while len(self.server.records()) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # a run queued behind the first
        return self.server.records()[before:]

    # --- the interactions ---------------------------------------------------------------

    def upload(self, photo: Path) -> None:
        if not self.new:
            self.page.get_by_text("Upload a photo").click()
            self.settle()
        self.page.locator("[data-testid=stMain] input[type=file]").set_input_files(str(photo))
        self.page.get_by_text(f"{photo.name}: ").first.wait_for(timeout=600_000)

    def slider(self, label: str, key: str) -> None:
        thumb = self.page.get_by_role("slider", name=label)
        thumb.focus()
        thumb.press(key)

    def choose(self, label: str, option: str, exact: bool = True) -> None:
        self.page.get_by_role("combobox", name=label, exact=True).first.click()
        self.page.get_by_role("option", name=option, exact=exact).first.click()

    def click_photo(self, fx: float, fy: float) -> None:
        frame = self.page.frame_locator("iframe[title*='streamlit_image_coordinates']")
        image = frame.locator("#image")
        box = image.bounding_box()
        image.click(position={"x": int(box["width"] * fx), "y": int(box["height"] * fy)})

    def radio(self, option: str) -> None:
        self.page.get_by_text(option, exact=True).first.click()

    def page_button(self, number: int) -> None:
        self.page.get_by_role("button", name=f"Page {number}", exact=True).first.click()


def interactions(d: Driver, repeats: int, threshold_key: str = "ArrowLeft", depth: int = 6,
                 levels: int = 0) -> dict[str, list[list[dict]]]:
    """Each interaction ``repeats`` times, each time to a state the page has not shown yet
    where there are enough (thresholds and opacities step one way, layers and heads cycle, the
    clicks land on new points); pages (2 of them) and methods (raw <-> rollout, "once
    computed") can only alternate, so those revisit states the page has seen. ``depth``:
    decoder layers; ``levels``: a deformable model's feature levels (a level switch too)."""
    layer, head = ("Layer", "Head") if d.new else ("Decoder layer", "Head")
    layers = [f"layer {i}" for i in range(depth - 1, 0, -1)] + [f"layer {depth} (last)"]
    heads = [f"head {i}" for i in range(1, 9)] + ["mean of heads"]
    points = [(0.1 + 0.8 * ((i * 0.37) % 1), 0.1 + 0.8 * ((i * 0.61) % 1)) for i in range(64)]
    steps = {
        "threshold move": [lambda: d.slider("Confidence threshold", threshold_key)],
        "layer switch": [lambda o=o: d.choose(layer, o) for o in layers],
        "head switch": [lambda o=o: d.choose(head, o) for o in heads],
        "click on the photo": [lambda f=f: d.click_photo(*f) for f in points],
        "page of detections": [lambda n=n: d.page_button(n) for n in (2, 1)],
        "whole page rerun": [lambda: d.slider("Opacity", "ArrowLeft")],
    }
    if levels:
        steps["level switch"] = [lambda o=o: d.choose("Level", o, exact=False) for o in
                                 [f"level {i}:" for i in range(levels)] + ["all levels"]]
    if d.new:
        d.act(lambda: d.radio("rollout"))  # compute once, then switching is cached
        d.act(lambda: d.radio("raw attention"))
        steps["method switch (computed)"] = [lambda o=o: d.radio(o) for o in
                                             ("rollout", "raw attention")]
    out = {}
    for name, actions in steps.items():
        out[name] = [d.act(actions[i % len(actions)]) for i in range(repeats + 1)][1:]
    return out


# variant -> (the start of its Checkpoint option, whether its threshold starts at 0, decoder
# layers, feature levels of a deformable model)
FAMILIES = {"fine-tuned DETR": ("finetuned (", True, 6, 0),
            "Conditional DETR": ("conditional-detr (", False, 6, 0),
            "DAB-DETR": ("dab-detr (", False, 6, 0),
            "RT-DETR R18": ("rt-detr-r18 (", False, 3, 3),
            "Deformable DETR": ("deformable-detr (", False, 6, 4)}


def family_weights(work: Path, stand_ins: Path, photo: Path, kept: int = 21) -> Path:
    """The stand-ins plus the five checkpoints of ``--families`` (random weights; the four
    transformers families' class heads scaled and shifted so that ``kept`` queries score above
    0.9 on ``photo``: see the module docstring)."""
    import argparse

    import torch
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        DabDetrConfig,
        DabDetrForObjectDetection,
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        ResNetConfig,
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrResNetConfig,
    )

    from detr_viz.model import build_model
    from detr_viz.spec import ModelSpec

    folder = work / "family-weights"
    folder.mkdir()
    for path in stand_ins.iterdir():
        (folder / path.name).symlink_to(path)
    spec = ModelSpec(num_classes=3, labels=("a", "b", "c"), num_queries=50, official=False)
    torch.save({"model": build_model(spec).state_dict(),
                "args": argparse.Namespace(nheads=8, dilation=False)}, folder / "finetuned.pth")
    common = {"num_queries": 300, "num_labels": 91,
              "backbone_config": ResNetConfig(out_features=["stage4"])}
    r18 = RTDetrResNetConfig(depths=[2, 2, 2, 2], layer_type="basic",
                             hidden_sizes=[64, 128, 256, 512],
                             out_features=["stage2", "stage3", "stage4"])
    r50 = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    for name, model, head in (
            ("conditional-detr", ConditionalDetrForObjectDetection(ConditionalDetrConfig(**common)),
             lambda m: m.class_labels_classifier),
            ("dab-detr", DabDetrForObjectDetection(DabDetrConfig(**common)),
             lambda m: m.class_embed),
            # PekingU/rtdetr_r18vd's sizes: ResNet-18, 3 decoder layers, 80 classes, 640x640
            ("rt-detr-r18", RTDetrForObjectDetection(RTDetrConfig(
                backbone_config=r18, encoder_in_channels=[128, 256, 512], decoder_layers=3,
                num_labels=80)), lambda m: m.model.decoder.class_embed[-1]),
            # SenseTime/deformable-detr-with-box-refine's: ResNet-50, 6 + 6 layers, 4 levels
            ("deformable-detr", DeformableDetrForObjectDetection(DeformableDetrConfig(
                backbone_config=r50, with_box_refine=True, num_labels=91)),
             lambda m: m.class_embed[-1])):
        save_calibrated(model, head(model), folder / name, photo, kept)
    return folder


def save_calibrated(model, classifier, folder: Path, photo: Path, kept: int) -> None:
    """``model.save_pretrained(folder)`` with its final ``classifier`` (a Linear giving the
    sigmoid logits) scaled and shifted so that ``kept`` queries score above 0.9 on ``photo``."""
    import numpy as np

    from detr_viz import analyze, load_model

    classifier.bias.data.zero_()  # the best logit of a query is then (W h)'s largest
    model.save_pretrained(folder)
    best = analyze(load_model(checkpoint=folder), photo).probabilities.max(axis=1)
    best = np.sort(best.astype(np.float64))[::-1]  # random weights: 0.3-0.7, never 0 or 1
    logit = np.log(best / (1 - best))
    scale = 4.0 / (logit[0] - logit[-1])  # the queries' best logits spread over 4 units
    classifier.weight.data *= scale
    classifier.bias.data += np.log(0.9 / 0.1) + 0.05 - scale * logit[kept - 1]
    model.save_pretrained(folder)


def measure(browser, folder: Path, weights: Path, photo: Path, repeats: int, new: bool,
            work: Path, families: Path | None = None, only_families: bool = False,
            only: Sequence[str] = ()) -> dict[str, dict]:
    results = {}
    variants = [] if only_families else [("R50", None), ("R50-DC5", "DC5 (stride 16)")]
    variants += [(name, "pick") for name in FAMILIES] if families else []
    variants = [v for v in variants if not only or v[0] in only]
    for variant, stride in variants:
        server = Server(folder, families if stride == "pick" else weights,
                        work / f"{'new' if new else 'old'}-{variant}.jsonl")
        d = None
        try:
            d = Driver(browser, server)
            option, from_zero, depth, levels = FAMILIES.get(variant, (None, False, 6, 0))
            if option:
                d.act(lambda d=d, o=option: d.choose("Checkpoint", o, exact=False))
            if from_zero:
                d.page.get_by_role("slider", name="Confidence threshold").focus()
                d.act(lambda d=d: d.page.keyboard.press("Home"))
            elif stride and not option:
                d.act(lambda d=d, s=stride: d.radio(s))
            start = time.perf_counter()
            runs = d.act(lambda d=d: d.upload(photo))
            first = {"wall": time.perf_counter() - start,
                     "server": sum(r["seconds"] for r in runs)}
            key = "ArrowRight" if from_zero else "ArrowLeft"  # from 0: upwards
            results[variant] = {"first": first,
                                "interactions": interactions(d, repeats, key, depth, levels)}
            d.page.close()
        except Exception as exc:  # one variant's failure must not lose the others' numbers
            shot = bench_dir() / f"page-failed-{variant}.png"
            with contextlib.suppress(Exception):
                d.page.screenshot(path=str(shot), full_page=True)
            seen = f"; the page as it was: {shot}" if shot.exists() else ""
            print(f"{variant}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0]}){seen}",
                  file=sys.stderr)
        finally:
            server.close()
    return results


def summarise(runs: list[list[dict]]) -> tuple[Timing, float, str]:
    """Server time per interaction (all its runs), median bytes, and the run kind."""
    seconds = Timing(tuple(sum(r["seconds"] for r in rs) for rs in runs if rs))
    sizes = [sum(r["bytes"] for r in rs) for rs in runs if rs]
    kinds = {("fragment" if r["fragment"] else "whole page") for rs in runs for r in rs}
    return seconds, statistics.median(sizes) if sizes else 0, " + ".join(sorted(kinds))


def report(results: dict[str, dict], label: str) -> tuple[list[list[str]], list[list[str]]]:
    rows, first = [], []
    for variant, res in results.items():
        for name, runs in res["interactions"].items():
            t, size, kind = summarise(runs)
            goal = GOAL.get(name, 0.050)
            rows.append([label, variant, name, kind, t.seconds(), f"{size / 1024:.0f} KiB",
                         "yes" if t.median <= goal else "NO"])
        f = res["first"]
        first.append([label, variant, f"{f['wall']:.2f} s", f"{f['server']:.2f} s"])
    return rows, first


def baseline_checkout(rev: str, into: Path) -> Path:
    folder = into / f"baseline-{rev}"
    folder.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = common_arguments(__doc__.splitlines()[0], repeats=7, quick_repeats=3)
    parser.add_argument("--baseline", default="c4dde06",
                        help="commit whose page is measured beside this checkout's ('' : none)")
    parser.add_argument("--families", action="store_true",
                        help="also a fine-tuned DETR, Conditional DETR, DAB-DETR, RT-DETR and "
                             "Deformable DETR (this checkout only)")
    parser.add_argument("--only-families", action="store_true",
                        help="with --families: skip the released R50 and R50-DC5")
    parser.add_argument("--variants", default="",
                        help="comma-separated variants to measure (default: all), e.g. "
                             "'R50,RT-DETR R18'")
    args = resolve(parser.parse_args(argv))
    if CHROMIUM is None:
        sys.exit("needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    print_header("The page through a browser: server time and bytes per interaction", args)
    share = CpuShare()
    weights = stand_in_weights()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photo = work / "PHOTO_4x3.jpg"
        official_size_photo().save(photo, quality=90)
        checkouts = [("now", ROOT, True)]
        if args.baseline:
            checkouts.insert(0, (f"before ({args.baseline})",
                                 baseline_checkout(args.baseline, work), False))
        rows, first = [], []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            families = family_weights(work, weights, photo) if args.families else None
            for label, folder, new in checkouts:
                r, f = report(measure(browser, folder, weights, photo, args.repeats, new, work,
                                      families if new else None, args.only_families,
                                      [v for v in args.variants.split(",") if v]), label)
                rows += r
                first += f
            browser.close()
    print("### Server time per interaction (median of repeats, IQR) and bytes sent\n")
    print("Bytes: the protobuf messages the run queued for the browser, before the "
          "websocket's compression. Goal: 50 ms per interaction, 80 ms for a whole page.\n")
    print(table(["page", "variant", "interaction", "runs", "server time", "bytes",
                 "goal met?"], rows) + "\n")
    print("### Time to the first heatmaps after dropping a photo\n")
    print(table(["page", "variant", "drop -> settled page (browser)",
                 "server time of those runs"], first) + "\n")
    print(share.report())


if __name__ == "__main__":
    main()
