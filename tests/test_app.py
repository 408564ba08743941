"""The page, driven with Streamlit's AppTest, checked against the library as the oracle.

Weights: planted stand-ins (detr_viz.testing.planted_state_dict) under the official file names,
served through $DETR_VIZ_WEIGHTS, so that a photo gets a spread of scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import urllib.error
import urllib.request

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from detr_viz import weights
from detr_viz.display import display_to_original
from detr_viz.model import VARIANTS

from apptest import (
    APP,
    MAIN_CHARTS,
    R50,
    SAMPLE,
    STRIDE,
    _name,
    array,
    assert_clean,
    charts,
    click,
    photo_bytes,
    query_titles,
    sidebar_count,
)


def test_sample_renders_everything_the_library_computes(app, oracle):
    app.run()
    assert_clean(app)
    figures = charts(app)
    assert set(figures) == MAIN_CHARTS
    expected = oracle(SAMPLE.read_bytes()).detections(0.9)
    assert sidebar_count(app) == len(expected) >= 1
    shown = [int(t.split(":")[0].removeprefix("query ")) for t in query_titles(
        figures["decoder-grid"])]
    assert shown == [d.query for d in expected][:4]
    assert any("600x400 px -> model input 1200x800 -> feature grid 25x38 (stride 32)" in c.value
               for c in app.caption)
    assert any("not the official detr_resnet50 release" in w.value for w in app.warning)


def test_threshold_changes_heatmaps_without_rerunning_the_model(app, oracle, forwards):
    analysis = oracle(SAMPLE.read_bytes())
    before = len(forwards)
    app.run()
    assert len(forwards) == before + 1
    counts = {}
    for threshold in (0.95, 0.9, 0.86, 0.3):
        app.slider(key="threshold").set_value(threshold).run()
        assert_clean(app)
        n = len(analysis.detections(threshold))
        counts[threshold] = n
        assert sidebar_count(app) == n
        figure = charts(app)["decoder-grid"]
        assert len(query_titles(figure)) == min(n, 4)
        heatmaps = [d for d in figure["data"] if d["type"] == "heatmap"]
        assert len(heatmaps) == 2 * min(n, 4)  # feature-resolution map + overlay per query
    assert len(set(counts.values())) >= 3, counts  # the planted weights spread the scores
    assert len(forwards) == before + 1  # no model run since the first


def test_many_detections_are_paged(app, oracle):
    app.session_state["threshold"] = 0.3
    app.run()
    n = len(oracle(SAMPLE.read_bytes()).detections(0.3))
    assert n > 30
    assert app.get("pagination"), "30+ detections need a page control"
    last = -(-n // 4)
    app.get("pagination")[0].set_value(last).run()
    assert_clean(app)
    assert len(query_titles(charts(app)["decoder-grid"])) == n - 4 * (last - 1)


def test_no_detections_is_a_readable_note(app):
    app.session_state["threshold"] = 1.0
    app.run()
    assert_clean(app)
    figure = charts(app)["decoder-grid"]
    assert any("No detections above the threshold" in a["text"]
               for a in figure["layout"]["annotations"])


def test_dc5_switch_halves_the_cells(app, forwards):
    app.run()
    app.sidebar.radio(key=STRIDE).set_value("DC5 (stride 16)").run()
    assert_clean(app)
    assert any("feature grid 50x75 (stride 16)" in c.value for c in app.caption)
    encoder_map = charts(app)["encoder-map"]
    z = array(encoder_map["data"][0]["z"])
    assert z.shape == (50, 75)
    assert len(forwards) == 2
    app.sidebar.radio(key=STRIDE).set_value("standard (stride 32)").run()
    assert array(charts(app)["encoder-map"]["data"][0]["z"]).shape == (25, 38)
    assert len(forwards) == 2  # both analyses are cached


def test_click_updates_encoder_map_and_marked_cell(app, oracle, forwards):
    analysis = oracle(SAMPLE.read_bytes())
    before = len(forwards)
    app.run()
    for i, (x, y, w, h) in enumerate([(10, 10, 720, 480), (700, 470, 720, 480),
                                      (333, 222, 360, 240)]):
        click(app, x, y, w, h, t=i + 1)
        assert_clean(app)
        point = display_to_original(x, y, (w, h), (600, 400))
        cell = analysis.grid.cell_at(*point)
        figures = charts(app)
        assert figures["encoder-map"]["layout"]["title"]["text"].startswith(f"cell {cell} ")
        np.testing.assert_allclose(array(figures["encoder-map"]["data"][0]["z"]),
                                   analysis.encoder_attention(point), rtol=1e-5, atol=1e-7)
        marker = figures["encoder-map"]["layout"]["shapes"][0]
        assert (marker["x0"] + 0.5, marker["y0"] + 0.5) == (cell[1], cell[0])
    panels = charts(app)["encoder-panels"]
    assert len([a for a in panels["layout"]["annotations"]
                if a["text"].startswith("point (")]) == 4  # seeded point + 3 clicks
    assert len(forwards) == before + 1
    app.button(key="clear-points").click().run()
    assert_clean(app)
    assert any("No points chosen" in a["text"]
               for a in charts(app)["encoder-panels"]["layout"]["annotations"])


@pytest.mark.parametrize("name,fmt", [("PHONE.PNG", "PNG"), ("shot.jpeg", "JPEG"),
                                      ("img.WEBP", "WEBP")])
def test_upload_of_a_generated_photo(app, oracle, name, fmt):
    data = photo_bytes(fmt=fmt)
    app.run()
    app.file_uploader(key="upload").upload(name, data, f"image/{fmt.lower()}").run()
    assert_clean(app)
    assert any(c.value.startswith(f"{name}: 640x480 px -> model input 1066x800")
               for c in app.caption)
    assert sidebar_count(app) == len(oracle(data).detections(0.9))


def test_a_removed_photo_brings_the_sample_back(app, oracle):
    """The run without the file it had (a removal, or the first half of a file dropped over
    another) waits for a following rerun, then shows the sample."""
    app.run()
    data = photo_bytes(seed=4)
    app.file_uploader(key="upload").upload("mine.png", data, "image/png").run()
    assert any(c.value.startswith("mine.png: ") for c in app.caption)
    app.file_uploader(key="upload").clear().run()
    assert_clean(app)
    assert any(c.value == "Showing the sample photo until you drop one." for c in app.caption)
    assert any(c.value.startswith("sample (coffee.jpg, CC0): ") for c in app.caption)
    assert sidebar_count(app) == len(oracle(SAMPLE.read_bytes()).detections(0.9))


def test_bad_upload_shows_error_and_page_keeps_working(app):
    app.run()
    app.file_uploader(key="upload").upload("holiday.jpg", b"this is not a photo",
                                           "image/jpeg").run()
    assert not app.exception
    assert app.error and "not" in app.error[0].value.lower()
    assert "Traceback" not in app.error[0].value
    app.file_uploader[0].clear().upload("ok.png", photo_bytes(seed=3), "image/png").run()
    assert_clean(app)
    assert "decoder-grid" in charts(app)


def test_missing_weights_offline_names_file_and_folder(monkeypatch, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    message = at.error[0].value
    assert "detr-r50-e632da11.pth" in message and str(empty) in message
    assert "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth" in message
    assert not at.get("plotly_chart")


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving ``data`` with a Content-Length header."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_first_run_downloads_with_progress(monkeypatch, weights_dir, tmp_path):
    """No local weights: the page downloads the checkpoint, reporting progress, then works."""
    data = (weights_dir / _name(R50)).read_bytes()
    name = f"detr-r50-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # a name the bytes satisfy
    monkeypatch.setitem(VARIANTS, R50, dataclasses.replace(VARIANTS[R50], checkpoint=name))
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: urls.append(url) or FakeResponse(data))
    reports: list[tuple[int, int | None]] = []
    real = weights.download_checkpoint

    def recording(url, dest, progress=None, **kwargs):
        def report(done, total):
            reports.append((done, total))
            progress(done, total)  # the page's progress bar
        return real(url, dest, report, **kwargs)

    monkeypatch.setattr(weights, "download_checkpoint", recording)
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert_clean(at)
    assert urls == [f"https://dl.fbaipublicfiles.com/detr/{name}"]
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).read_bytes() == data
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[-1] == len(data) and len(reports) > 10
    assert all(total == len(data) for _, total in reports)
    assert not at.warning  # the file is the (patched) official release: no warning
    assert "decoder-grid" in charts(at)
    st.cache_resource.clear()


def test_a_failed_download_leaves_the_error_alone(monkeypatch, weights_dir, tmp_path):
    """The connection drops half way: the page says so, and the progress bar is gone."""
    data = (weights_dir / _name(R50)).read_bytes()
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def half(url, timeout=None):
        response = FakeResponse(data[: len(data) // 2])
        response.headers = {"Content-Length": str(len(data))}
        return response

    monkeypatch.setattr(urllib.request, "urlopen", half)
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception
    assert [e.value for e in at.error if "the download stopped after" in e.value]
    assert not at.get("progress")
    st.cache_resource.clear()


def test_camera_photo(app, oracle):
    data = photo_bytes(size=(640, 480), fmt="JPEG", seed=5)
    app.run()
    assert not app.camera_input  # one click away, not open
    app.toggle(key="use-camera").set_value(True).run()
    app.camera_input(key="camera").upload("camera.jpg", data).run()
    assert_clean(app)
    assert any(c.value.startswith("camera.jpg: 640x480 px") for c in app.caption)
    assert sidebar_count(app) == len(oracle(data).detections(0.9))
