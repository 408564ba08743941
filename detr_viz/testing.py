"""Deterministic stand-in weights and inputs for tests and benchmarks. Not a detector.

The recipe is the one in ``shared/reference/README.md``: the official DETR implementation was
run on exactly these weights and inputs, so a model filled with them can be compared with the
official outputs without downloading the real checkpoints. Predictions made with these weights
are meaningless; never present them as detections.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor


def recipe_tensor(name: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The recipe value of the state-dict entry ``name`` (float32, seeded by crc32(name))."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = tuple(shape)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) * 0.5 + 0.75
    if name.endswith("running_mean"):
        return torch.randn(shape, generator=g) * 0.1
    if len(shape) == 1:
        base = 1.0 if name.endswith("weight") else 0.0
        return base + torch.randn(shape, generator=g) * 0.1
    gain = 4.0 if name.endswith("in_proj_weight") else 1.0
    return torch.randn(shape, generator=g) * gain / math.sqrt(math.prod(shape[1:]))


def recipe_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """A state dict for ``model`` with every entry filled by :func:`recipe_tensor`."""
    return {name: recipe_tensor(name, t.shape) for name, t in model.state_dict().items()}


def recipe_input(height: int, width: int) -> Tensor:
    """The recipe's already-normalised input: (1, 3, height, width) float32."""
    g = torch.Generator().manual_seed(height * 10007 + width)
    return torch.randn(1, 3, height, width, generator=g)
