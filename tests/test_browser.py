"""The real thing: `streamlit run app.py` on loopback, driven in Debian's chromium by Playwright.

Drops a photo into the drop zone, waits for the heatmaps, clicks inside the image component and
checks that the encoder map of the clicked cell appears; switches the method to relevance and
reads the maps plotly drew back from the page (the library's maps); clicks a thumbnail of the
every-layer-and-head grid and sees that layer and head shown; compares with DC5 once.
Screenshots land in $DETR_VIZ_SCREENSHOTS (default:
artifacts/ in the repository, which git ignores).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_viz import analyze, explain, load_model
from detr_viz.display import display_to_original
from detr_viz.model import VARIANTS
from detr_viz.testing import write_weights_folder

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(os.environ.get("DETR_VIZ_SCREENSHOTS", ROOT / "artifacts"))
R50, DC5 = "detr_resnet50", "detr_resnet50_dc5"

if CHROMIUM is None and os.environ.get("CI"):
    pytest.fail("CI must run the browser test: install Debian's chromium (.ci/run does)")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None,
                       reason="needs Debian's chromium: apt-get install -y chromium"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """The released stand-ins, a fine-tuned DETR training checkpoint (3 classes, 50 queries,
    4 + 3 layers of 4 heads), a small Conditional DETR folder and a tiny RT-DETR."""
    import argparse

    import torch

    from detr_viz.model import build_model
    from detr_viz.spec import ModelSpec
    from detr_viz.testing import planted_state_dict

    folder = tmp_path_factory.mktemp("weights")
    write_weights_folder(str(folder), (R50, DC5))
    spec = ModelSpec(num_classes=3, labels=("a", "b", "c"), num_queries=50, encoder_layers=4,
                     decoder_layers=3, heads=4, d_model=128, ffn_dim=256, official=False)
    torch.manual_seed(0)
    torch.save({"model": planted_state_dict(build_model(spec), sharpness=3.0),
                "args": argparse.Namespace(nheads=4, dilation=False)}, folder / "helmets.pth")
    from test_families import CLASSES
    from test_hf_families import tiny_config

    torch.manual_seed(5)
    conditional = CLASSES["conditional_detr"](tiny_config("conditional_detr"))
    with torch.no_grad():
        for p in conditional.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    conditional.save_pretrained(folder / "conditional-detr")
    from deformable_models import tiny_model

    tiny_model("rt_detr", dtype=torch.float32).save_pretrained(folder / "rt-detr")
    return folder


@pytest.fixture(scope="module")
def server(weights_dir, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "DETR_VIZ_WEIGHTS": str(weights_dir),
           "TORCH_HOME": str(tmp_path_factory.mktemp("torch"))}
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        log.seek(0)
        pytest.fail(f"streamlit did not start:\n{log.read()}")
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 3000})
        page.goto(server)
        yield page
        browser.close()


def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 255, (61, 81, 3), dtype=np.uint8)
    path = tmp_path / "PHONE_PHOTO.JPG"
    Image.fromarray(base).resize((800, 600), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def analysis(weights_dir, tmp_path_factory):
    image = photo(tmp_path_factory.mktemp("photo"))
    model = load_model(R50, weights_dir / VARIANTS[R50].checkpoint, download=False)
    return image, model, analyze(model, io.BytesIO(image.read_bytes()))


DECODER_MAPS = """() => {
  const grid = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
      (p.layout.annotations || []).some(a => (a.text || '').startsWith('query ')));
  // plotly keeps a typed array's decoded values in _inputArray, rows of Float32Arrays
  return grid.data.filter(t => t.type === 'heatmap' && t.dx === 1)
      .map(t => Array.from(t.z._inputArray || t.z, row => Array.from(row)));
}"""


def settled(page) -> None:
    """Wait until Streamlit's rerun is over: no element of the previous run is left stale."""
    time.sleep(0.5)
    page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]') && "
                           "!document.querySelector('[data-testid=\"stStatusWidget\"]')",
                           timeout=300_000)


def decoder_maps(page) -> list[np.ndarray]:
    return [np.asarray(z, dtype=np.float64) for z in page.evaluate(DECODER_MAPS)]


def test_upload_wait_for_heatmaps_click_and_see_the_encoder_map(page, analysis):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_selector(".js-plotly-plot", timeout=180_000)
    page.get_by_text("Showing the sample photo").wait_for(timeout=60_000)  # drop zone ready
    image, _, analysis = analysis
    page.locator("input[type=file]").set_input_files(str(image))
    page.get_by_text("PHONE_PHOTO.JPG: 800x600 px").wait_for(timeout=180_000)
    page.locator(".js-plotly-plot").nth(3).wait_for(timeout=60_000)  # all four figures drawn
    settled(page)
    kept = len(analysis.detections(0.9))
    titles = page.locator(".js-plotly-plot .gtitle, .js-plotly-plot .annotation-text")
    assert titles.filter(has_text="query ").count() == min(kept, 4)

    page.evaluate("""() => {
      const grid = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
          (p.layout.annotations || []).some(a => (a.text || '').startsWith('query ')));
      const overlay = grid.data.findIndex(t => t.type === 'heatmap' && t.dx !== 1);
      const t = grid.data[overlay];
      const boxes = grid.data.map((d, i) => d.name === 'box' ? i : -1).filter(i => i >= 0);
      Plotly.restyle(grid, {hoverinfo: 'skip', hoveron: 'points'}, boxes);  // boxes on top
      Plotly.Fx.hover(grid, {xval: t.x0 + 3 * t.dx, yval: t.y0 + 2 * t.dy}, t.xaxis + t.yaxis);
    }""")
    time.sleep(0.5)
    hover = page.evaluate("() => [...document.querySelectorAll('.hovertext')]"
                          ".map(e => e.textContent)")
    assert any(text.startswith("row 2, col 3: ") for text in hover), hover  # the overlay's cell

    frame = page.frame_locator("iframe[title*='streamlit_image_coordinates']")
    img = frame.locator("#image")
    img.wait_for(timeout=60_000)
    box = img.bounding_box()
    x, y = int(box["width"] * 0.8), int(box["height"] * 0.25)
    img.click(position={"x": x, "y": y})
    point = display_to_original(x, y, (box["width"], box["height"]), (800, 600))
    row, col = analysis.grid.cell_at(*point)
    expected = f"cell ({row}, {col}) of 25x34"
    page.get_by_text(expected).wait_for(timeout=60_000)
    page.get_by_text(f"-> cell ({row}, {col})").first.wait_for(timeout=60_000)
    time.sleep(1)  # let plotly finish drawing before the picture
    page.screenshot(path=str(SHOTS / "browser-after-click.png"), full_page=True)
    assert not page.get_by_text("Traceback").count()


def test_switching_method_changes_the_maps_to_the_librarys(page, analysis):
    _, model, analysis = analysis
    raw = decoder_maps(page)
    queries = [d.query for d in analysis.detections(0.9)][:4]
    np.testing.assert_allclose(raw, analysis.decoder_attentions(queries), rtol=1e-4, atol=1e-6)
    page.get_by_text("relevance", exact=True).first.click()
    page.get_by_text("(relevance for").first.wait_for(timeout=300_000)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(decoder_maps(page)) != len(queries):
        time.sleep(0.5)
    expected = explain.relevance(model, analysis, queries)
    got = decoder_maps(page)
    assert not np.allclose(got, raw)
    for got_map, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(got_map, want, rtol=1e-3, atol=1e-5 * want.max())
    time.sleep(1)
    page.screenshot(path=str(SHOTS / "browser-relevance.png"), full_page=True)
    page.get_by_text("raw attention", exact=True).first.click()
    page.get_by_text("(relevance for").first.wait_for(state="detached", timeout=60_000)


THUMBNAIL = """([layer, head]) => {
  const plot = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
      p.data.some(t => t.name === 'thumbnails'));
  const trace = plot.data.find(t => t.name === 'thumbnails');
  const i = trace.customdata.findIndex(c => c[0] === layer && c[1] === head);
  const xa = plot._fullLayout.xaxis, ya = plot._fullLayout.yaxis;
  const box = plot.querySelector('.nsewdrag').getBoundingClientRect();
  return [box.left + xa.l2p(trace.x[i]) + 5, box.top + ya.l2p(trace.y[i]) + 5];
}"""


def test_a_click_on_the_overview_makes_that_layer_and_head_the_shown_one(page, analysis):
    page.get_by_text("Every layer and head (raw attention), for one detection").click()
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].some("
                           "p => p.data.some(t => t.name === 'thumbnails'))", timeout=60_000)
    time.sleep(1)
    x, y = page.evaluate(THUMBNAIL, [2, 3])  # layer 3, head 4 (0-based in the figure)
    page.mouse.click(x, y)
    page.get_by_text("layer 3: the 5 strongest cells of each head").wait_for(timeout=60_000)
    _, _, analysis = analysis
    queries = [d.query for d in analysis.detections(0.9)][:4]
    deadline = time.monotonic() + 30
    want = analysis.decoder_attentions(queries, 2, 3)
    while time.monotonic() < deadline:
        got = decoder_maps(page)
        if len(got) == len(want) and np.allclose(got, want, rtol=1e-4, atol=1e-6):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the decoder maps did not switch to layer 3, head 4")
    page.screenshot(path=str(SHOTS / "browser-overview.png"), full_page=True)


def test_the_downloaded_analysis_has_the_layer_and_head_chosen_in_the_section(page, analysis):
    """After the overview click above (a fragment's run: the export section did not run
    again), the JSON download, built on a server thread, has layer 3, head 4 and its maps."""
    with page.expect_download(timeout=120_000) as download:
        page.get_by_role("button", name="Analysis (JSON)").click()
    exported = json.loads(Path(download.value.path()).read_text())
    assert (exported["settings"]["decoder_layer"], exported["settings"]["decoder_head"]) == (2, 3)
    _, _, analysis = analysis
    queries = [d.query for d in analysis.detections(0.9)]
    assert exported["queries"] == queries
    np.testing.assert_allclose(np.asarray(exported["decoder_maps"]),
                               analysis.decoder_attentions(queries, 2, 3), rtol=1e-4, atol=1e-6)


def test_side_by_side_with_dc5_once(page, analysis):
    page.get_by_role("combobox", name="Compare side by side with").click()
    page.get_by_role("option", name="R50-DC5").click()
    page.get_by_text("objects found by both").wait_for(timeout=300_000)
    page.get_by_text("feature grid 25x34 (stride 32)").wait_for(timeout=60_000)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not page.evaluate(
            "() => [...document.querySelectorAll('.js-plotly-plot')].some(p => p.data.some("
            "t => (t.name || '').endsWith(' 16 px')))"):
        time.sleep(0.5)
    frame = page.frame_locator("iframe[title*='streamlit_image_coordinates']")
    img = frame.locator("#image")
    box = img.bounding_box()
    x, y = int(box["width"] * 0.3), int(box["height"] * 0.7)
    img.click(position={"x": x, "y": y})  # the comparison follows the click
    point = display_to_original(x, y, (box["width"], box["height"]), (800, 600))
    _, _, analysis = analysis
    row, col = analysis.grid.cell_at(*point)
    page.wait_for_function(f"() => [...document.querySelectorAll('.js-plotly-plot')].some(p => "
                           f"p.data.some(t => (t.name || '') === 'R50 cell ({row}, {col}), "
                           f"32 px'))", timeout=120_000)
    settled(page)
    time.sleep(1)
    page.screenshot(path=str(SHOTS / "browser-compare.png"), full_page=True)
    assert page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].some(p => "
                         "p.data.some(t => (t.name || '').endsWith(' 16 px')))")
    assert not page.get_by_text("Traceback").count()


def pick_checkpoint(page, prefix: str) -> None:
    page.get_by_role("combobox", name="Checkpoint").click()
    page.get_by_role("option", name=prefix).first.click()
    page.get_by_text(f"Checkpoint: {prefix}").wait_for(timeout=300_000)
    settled(page)


def wait_for_maps(page, want: np.ndarray) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = decoder_maps(page)
        if len(got) == len(want) and np.allclose(got, want, rtol=1e-4, atol=1e-6):
            return
        time.sleep(0.5)
    pytest.fail(f"the page's decoder maps are not the library's ({len(decoder_maps(page))} "
                f"maps for {len(want)})")


def test_a_finetuned_detr_and_a_conditional_detr_picked_and_read_back(page, analysis,
                                                                      weights_dir):
    image, _, _ = analysis
    page.get_by_role("slider").first.focus()
    page.keyboard.press("Home")  # threshold 0: random weights, every query is a detection
    settled(page)
    for prefix, path in (("helmets (DETR R50", "helmets.pth"),
                         ("conditional-detr (Conditional DETR", "conditional-detr")):
        pick_checkpoint(page, prefix)
        head = page.get_by_role("combobox", name="Head", exact=True).first
        head.scroll_into_view_if_needed()
        head.click()  # the overview test chose head 4: back to the mean
        page.keyboard.type("mean of")
        page.keyboard.press("Enter")
        settled(page)
        model = load_model(checkpoint=weights_dir / path)
        mine = analyze(model, io.BytesIO(image.read_bytes()))
        queries = [d.query for d in mine.detections(0.0)][:4]
        wait_for_maps(page, mine.decoder_attentions(queries))
        time.sleep(1)
        page.screenshot(path=str(SHOTS / f"browser-{path.split('.')[0]}.png"), full_page=True)
    assert page.get_by_text("content and spatial attention").count()
    assert not page.get_by_text("Traceback").count()


SAMPLING_DOTS = """() => {
  const fig = [...document.querySelectorAll('.js-plotly-plot')].find(p =>
      (p.layout.annotations || []).some(a => / layer \\d+$/.test(a.text || '')));
  const first = fig.data.filter(t => t.legendgroup && (t.xaxis || 'x') === 'x');
  const values = v => Array.from(v._inputArray || v);
  return first.map(t => [t.name, values(t.x), values(t.y)]);
}"""


def test_rt_detr_sampling_points_are_drawn_where_the_library_puts_them(page, analysis,
                                                                       weights_dir):
    image, _, _ = analysis
    pick_checkpoint(page, "rt-detr (RT-DETR")
    mine = analyze(load_model(checkpoint=weights_dir / "rt-detr"), io.BytesIO(image.read_bytes()))
    queries = [d.query for d in mine.detections(0.0)][:4]
    wait_for_maps(page, mine.decoder_attentions(queries))
    section = page.get_by_text("sampling points, reference boxes through the layers")
    section.scroll_into_view_if_needed()
    settled(page)
    dots = page.evaluate(SAMPLING_DOTS)
    points = mine.sampling_points(queries[0]).locations.numpy()  # (heads, levels, points, 2)
    assert [name for name, _, _ in dots] == [f"head {h + 1}" for h in range(points.shape[0])]
    for head, (_, xs, ys) in enumerate(dots):
        want = points[head].reshape(-1, 2)
        np.testing.assert_allclose(np.c_[xs, ys], want, rtol=1e-5)
    time.sleep(1)
    page.screenshot(path=str(SHOTS / "browser-rt-detr.png"), full_page=True)
    assert page.get_by_text("Reference boxes through the decoder layers").count()
    assert not page.get_by_text("Traceback").count()
