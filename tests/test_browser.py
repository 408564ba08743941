"""The real thing: `streamlit run app.py` on loopback, driven in Debian's chromium by Playwright.

Uploads a photo, waits for the heatmaps, clicks inside the image component and checks that the
encoder map of the clicked cell appears. Screenshots land in $DETR_VIZ_SCREENSHOTS (default:
artifacts/ in the repository, which git ignores).
"""

from __future__ import annotations

import io
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

from detr_viz import analyze, load_model
from detr_viz.display import display_to_original
from detr_viz.model import VARIANTS
from detr_viz.testing import write_weights_folder

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(os.environ.get("DETR_VIZ_SCREENSHOTS", ROOT / "artifacts"))
R50 = "detr_resnet50"

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
    folder = tmp_path_factory.mktemp("weights")
    write_weights_folder(str(folder), (R50,))
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


def test_upload_wait_for_heatmaps_click_and_see_the_encoder_map(page, tmp_path, weights_dir):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_selector(".js-plotly-plot", timeout=180_000)
    page.get_by_text("Upload a photo").click()
    image = photo(tmp_path)
    page.locator("input[type=file]").set_input_files(str(image))
    page.get_by_text("PHONE_PHOTO.JPG: 800x600 px").wait_for(timeout=180_000)
    page.locator(".js-plotly-plot").nth(3).wait_for(timeout=60_000)  # all four figures drawn

    analysis = analyze(
        load_model(R50, weights_dir / VARIANTS[R50].checkpoint, download=False),
        io.BytesIO(image.read_bytes()),
    )
    kept = len(analysis.detections(0.9))
    titles = page.locator(".js-plotly-plot .gtitle, .js-plotly-plot .annotation-text")
    assert titles.filter(has_text="query ").count() == min(kept, 4)

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
