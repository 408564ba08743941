"""Shared AppTest fixtures and helpers: the page with planted stand-in weights, the library's
own analysis of the same photo as the oracle, and readers of the page's figures."""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from detr_viz import analyze, load_model
from detr_viz.model import DETR, VARIANTS
from detr_viz.testing import write_weights_folder

APP = str(Path(__file__).resolve().parents[1] / "app.py")
SAMPLE = Path(__file__).resolve().parents[1] / "detr_viz" / "assets" / "coffee.jpg"
R50, DC5 = "detr_resnet50", "detr_resnet50_dc5"
STRIDE = "stride"


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    write_weights_folder(str(folder), (R50, DC5))
    return folder


@pytest.fixture(scope="session")
def oracle(weights_dir):
    """The library's own analysis of a photo with the same weights (cached per variant);
    ``oracle.model(variant)`` is the model it used."""

    @functools.cache
    def model(variant: str = R50) -> DETR:
        return load_model(variant, weights_dir / _name(variant), download=False)

    @functools.cache
    def run(photo: bytes, variant: str = R50):
        return analyze(model(variant), photo)

    run.model = model
    return run


def _name(variant: str) -> str:
    return VARIANTS[variant].checkpoint


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Counts model runs: every DETR.forward call appends to the list."""
    calls: list[int] = []
    original = DETR.forward

    def counted(self, samples):
        calls.append(1)
        return original(self, samples)

    monkeypatch.setattr(DETR, "forward", counted)
    return calls


@pytest.fixture
def app(monkeypatch, weights_dir, tmp_path) -> AppTest:
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=180)
    yield at
    st.cache_resource.clear()


MAIN_CHARTS = {"detections", "decoder-grid", "encoder-map", "encoder-panels"}
KEYS = (*MAIN_CHARTS, "dec-overview", "dec-heads", "enc-overview", "enc-heads",
        "compare-decoder", "compare-encoder", "rank-curves")


def charts(at: AppTest) -> dict[str, dict]:
    """The page's Plotly figures by element key."""
    out = {}
    for element in at.get("plotly_chart"):
        key = next((k for k in KEYS if element.proto.id.endswith(k)), element.proto.id)
        out[key] = json.loads(element.proto.spec)
    return out


def array(value) -> np.ndarray:
    """A figure's array field, plain JSON list or plotly's typed-array encoding."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in value.get("shape", str(flat.size)).split(",")])
    return np.asarray(value)


def query_titles(figure: dict) -> list[str]:
    return [a["text"] for a in figure["layout"].get("annotations", [])
            if a.get("text", "").startswith("query ")]


def sidebar_count(at: AppTest) -> int:
    text = next(c.value for c in at.sidebar.caption if "queries above" in c.value)
    return int(text.split("**")[1])


def assert_clean(at: AppTest) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def photo_bytes(size=(640, 480), fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()




def click(app: AppTest, x: int, y: int, width: int, height: int, t: int) -> None:
    key = app.get("component_instance")[0].key
    app.session_state[key] = {"x": x, "y": y, "width": width, "height": height, "unix_time": t}
    app.run()
