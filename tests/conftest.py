"""Shared fixtures: recipe-weight models (deterministic stand-ins, see detr_viz.testing)."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import urllib.request
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
import torch
from PIL import Image

from detr_viz.analysis import Analysis, analyze
from detr_viz.download import WEIGHTS_ENV
from detr_viz.errors import DetrVizError
from detr_viz.model import DETR, build_model
from detr_viz.testing import recipe_state_dict

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
# Tests run on the CPU (load_model's default is "auto"); DETR_VIZ_DEVICE=cuda runs them on a GPU.
os.environ.setdefault("DETR_VIZ_DEVICE", "cpu")


def files_read(monkeypatch, module) -> list[str]:
    """Names of the JSON files ``module`` reads through its ``read_json`` from now on."""
    read, original = [], module.read_json
    monkeypatch.setattr(module, "read_json", lambda path: read.append(path.name) or original(path))
    return read


@contextlib.contextmanager
def raises(cls: type[DetrVizError], *fragments: object):
    """pytest.raises(cls), plus: it is a DetrVizError and its message names every fragment."""
    with pytest.raises(cls) as info:
        yield info
    assert isinstance(info.value, DetrVizError)
    for fragment in fragments:
        assert str(fragment) in str(info.value), str(info.value)


@functools.cache
def recipe_model(variant: str) -> DETR:
    """A model of ``variant`` filled with the reference recipe weights (built once per run)."""
    model = build_model(variant)
    model.load_state_dict(recipe_state_dict(model))
    return model


def photo(width=128, height=96, seed=0) -> Image.Image:
    """A smooth random photo (an upscaled grid of random colours)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@functools.cache
def double_model(variant: str) -> DETR:
    """A float64 copy of :func:`recipe_model` (for oracle comparisons at ~1e-10)."""
    return copy.deepcopy(recipe_model(variant)).double()


@functools.cache
def small_analysis(variant: str = "detr_resnet50", width: int = 160, height: int = 96
                   ) -> Analysis:
    """A float64 analysis on a tiny grid (R50: 3 x 5 = 15 cells; DC5: 6 x 10 = 60)."""
    return analyze(double_model(variant), photo(width, height), short_side=height,
                   max_size=width)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference vectors not found at {REFERENCE}; clone the project beside shared/")
    return REFERENCE


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for many small forward passes: on a 2-core machine, OpenMP
    threads spinning against any other busy process made them 10-20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No $DETR_VIZ_WEIGHTS, private torch hub and Hugging Face hub caches (so a real cache
    on the machine is never found), and any network access fails the test.

    Returns the private torch hub cache's checkpoint folder (not created); the Hugging Face
    hub cache is ``tmp_path / "hf-hub"`` (not created).
    """
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """``image`` saved in ``fmt``; HEIF is written with pillow-heif directly, so that
    load_image must register its opener itself."""
    buffer = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif.from_pillow(image).save(buffer, **options)
    else:
        image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif(orientation: int) -> bytes:
    """An EXIF block holding only the orientation tag (0x0112)."""
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """Names of modules holding any forward (pre-)hook, plain, with kwargs or always-called."""
    tables = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return [name for name, m in model.named_modules() if any(getattr(m, t, None) for t in tables)]


class RunsShell:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


# The page's fixtures (AppTest with planted stand-in weights), for every test file that drives it.
from apptest import app, forwards, oracle, weights_dir  # noqa: E402, F401, I001
