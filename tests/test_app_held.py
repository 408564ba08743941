"""What a session keeps between script runs (AppTest): references to the page's cached photo and
analysis, never the values, so the byte cache can drop them (Streamlit keeps a fragment's
arguments and a download's callable for the session's life, and a closed session's two minutes
more); and a download, built off the script's thread, exports what the session chose."""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import pytest
from streamlit.runtime import caching
from streamlit.runtime.media_file_manager import MediaFileManager

from detr_viz import memory
from detr_viz.ui import resources

from apptest import SAMPLE, array, assert_clean, charts

SESSION = "test session id"  # AppTest's (streamlit.testing.v1.local_script_runner)


@pytest.fixture
def deferred(monkeypatch) -> dict:
    """The download callables the page registers, by file name (the last run's)."""
    found: dict = {}
    original = MediaFileManager.add_deferred

    def recording(self, data, mimetype, coordinates, file_name=None, **kwargs):
        found[file_name] = data
        return original(self, data, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", recording)
    return found


def off_the_script_thread(build):
    """Call ``build`` as Streamlit's server does when a download is clicked: on another thread,
    with no script context."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=build()))
    thread.start()
    thread.join(timeout=300)
    return out["value"]


def cached(kinds=("photo", "analysis")) -> list:
    cache = resources.cache()
    return [cache._items[key][0] for key, _ in cache.sizes() if key[0] in kinds]


def test_a_closed_session_keeps_nothing_of_its_photo_or_analysis_and_a_resumed_one_recomputes(
        app, forwards, oracle, deferred, monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "release_soon", lambda: trims.append(1))
    app.run()
    app.selectbox(key="dec-layer").set_value("layer 5").run()  # a fragment's own run
    assert_clean(app)
    assert deferred  # the downloads were registered, holding what they hold
    values = cached()
    assert {type(v).__name__ for v in values} == {"Photo", "Analysis"}
    refs = [weakref.ref(v) for v in values]
    del values
    resources.cache().clear()
    assert all(r() is not None for r in refs)  # shown: held while the session is connected
    trims.clear()
    caching.clear_session_resource_cache(SESSION)  # what Streamlit does when it disconnects
    assert [r() for r in refs] == [None, None]  # freed at once: no fragment, no download held it
    assert trims  # and what its work freed goes back to the system

    runs = len(forwards)
    app.selectbox(key="dec-head").set_value("head 3").run()  # the fragment alone, again
    assert_clean(app)
    assert len(forwards) == runs + 1  # a session resuming: its fragment computes the analysis again
    expected = oracle(SAMPLE.read_bytes())
    queries = [d.query for d in expected.detections(0.9)][:4]
    grid = charts(app)["decoder-grid"]
    shown = [array(t["z"]) for t in grid["data"] if t.get("type") == "heatmap" and t.get("dx") == 1]
    np.testing.assert_allclose(np.stack(shown), expected.decoder_attentions(queries, 4, 2),
                               rtol=1e-5, atol=1e-7)


def test_a_download_built_off_the_script_thread_exports_what_the_session_chose(
        app, oracle, deferred):
    app.run()
    # chosen in fragments: the export section (outside them) does not run again
    app.selectbox(key="dec-layer").set_value("layer 2").run()
    app.selectbox(key="dec-head").set_value("head 4").run()
    app.radio(key="enc-direction").set_value("where the point looks").run()
    assert_clean(app)
    exported = json.loads(off_the_script_thread(deferred["detr-viz-analysis.json"]))
    settings = exported["settings"]
    assert (settings["decoder_layer"], settings["decoder_head"]) == (1, 3)
    assert settings["direction"] == "outgoing"
    expected = oracle(SAMPLE.read_bytes())
    queries = [d.query for d in expected.detections(0.9)]
    assert exported["queries"] == queries
    np.testing.assert_allclose(np.asarray(exported["decoder_maps"]),
                               expected.decoder_attentions(queries, 1, 3), rtol=1e-5, atol=1e-7)

    resources.cache().clear()  # dropped meanwhile: built again from the photo's bytes
    again = json.loads(off_the_script_thread(deferred["detr-viz-analysis.json"]))
    assert again["settings"] == settings
    np.testing.assert_allclose(np.asarray(again["decoder_maps"]),
                               np.asarray(exported["decoder_maps"]), rtol=1e-6)
