"""Shared fixtures: recipe-weight models (deterministic stand-ins, see detr_viz.testing)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from detr_viz.model import DETR, build_model
from detr_viz.testing import recipe_state_dict

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@functools.cache
def recipe_model(variant: str) -> DETR:
    """A model of ``variant`` filled with the reference recipe weights (built once per run)."""
    model = build_model(variant)
    model.load_state_dict(recipe_state_dict(model))
    return model


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
