"""The page's memory budget (AppTest): photos, analyses and views share one byte-bounded cache;
the total stays under $DETR_VIZ_CACHE_BYTES, the photo on screen stays cached, and two sessions
share the analysis of one photo but never each other's views."""

from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st
from streamlit.testing.v1 import AppTest

from detr_viz.cache import BUDGET_ENV, nbytes
from detr_viz.ui import resources

from apptest import APP, array, assert_clean, charts, click, photo_bytes


def entries(kind: str) -> list[tuple]:
    return [k for k, _ in resources.cache().sizes() if k[0] == kind]


def test_a_small_budget_holds_over_many_photos_and_the_page_keeps_working(app, monkeypatch,
                                                                          forwards):
    monkeypatch.setenv(BUDGET_ENV, "48M")  # room for about two 640x480 photos and their views
    app.run()
    photos = [photo_bytes((640, 480), seed=seed) for seed in range(4)]
    for i, data in enumerate(photos):
        app.file_uploader(key="upload").upload(f"p{i}.png", data, "image/png").run()
        assert_clean(app)
        cache = resources.cache()
        assert cache.budget == 48 * 2**20
        assert cache.total == sum(size for _, size in cache.sizes()) <= cache.budget
        digest = hashlib.sha256(data).hexdigest()
        assert [k[1] for k in entries("analysis")][-1] == digest  # the one on screen
    held = {k[1] for k in entries("analysis")}
    assert hashlib.sha256(photos[0]).hexdigest() not in held and cache.evictions > 0
    before = len(forwards)
    app.sidebar.slider(key="threshold").set_value(0.5).run()  # the analysis is still there
    assert_clean(app)
    assert len(forwards) == before
    for key, size in cache.sizes():  # the recorded sizes are what the entries measure now
        if key[0] in ("photo", "analysis"):
            value = cache.get(key, lambda: None)
            assert size == nbytes(value)


def test_a_budget_that_is_not_a_size_is_a_clear_message(app, monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "lots")
    app.run()
    assert not app.exception
    assert app.error and f"{BUDGET_ENV}='lots' is not a size" in app.error[0].value


def test_two_sessions_share_the_analysis_but_not_their_points(app, forwards):
    other = AppTest.from_file(APP, default_timeout=180)
    app.run()
    other.run()
    assert_clean(app)
    assert_clean(other)
    assert len(forwards) == 1  # one photo, one model run for both sessions
    before = array(charts(other)["encoder-map"]["data"][0]["z"])
    click(app, 10, 10, 720, 480, t=1)
    assert_clean(app)
    mine = array(charts(app)["encoder-map"]["data"][0]["z"])
    other.run()
    theirs = array(charts(other)["encoder-map"]["data"][0]["z"])
    np.testing.assert_array_equal(theirs, before)  # the other session's point did not move
    assert not np.array_equal(mine, theirs)
    sessions = {k[1] for k in entries("memo")}
    assert len(sessions) == 2
    st.cache_resource.clear()
