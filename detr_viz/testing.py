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


def planted_state_dict(model: torch.nn.Module, sharpness: float = 7.0) -> dict[str, Tensor]:
    """Recipe weights changed so that scores spread out: for exercising the app, not detecting.

    Under the plain recipe every object query gives nearly the same output (scores all about
    0.13): six peaky encoder layers blur every feature cell into the same vector. Three planted
    changes make queries differ: the attention projections of encoder layers 0-4 are zeroed
    (cells keep their own content; the last layer keeps the recipe's uneven attention, so its
    maps are worth looking at), the object-query embeddings are scaled up 30x (each query
    attends to its own cells) and the class head is scaled by ``sharpness``. With the default,
    a photo gets a few queries above 0.9 and most above 0.7. The class names mean nothing.
    """
    state = recipe_state_dict(model)
    last = len(model.transformer.encoder.layers) - 1
    for name in state:
        if (name.startswith("transformer.encoder.layers.") and name.endswith("in_proj_weight")
                and int(name.split(".")[3]) != last):
            state[name] = torch.zeros_like(state[name])
    state["query_embed.weight"] = state["query_embed.weight"] * 30
    state["class_embed.weight"] = state["class_embed.weight"] * sharpness
    return state


def write_weights_folder(folder: str, variants: tuple[str, ...] = ("detr_resnet50",
                                                                 "detr_resnet50_dc5")) -> None:
    """Save planted stand-in checkpoints under the official file names in ``folder``.

    Point ``DETR_VIZ_WEIGHTS`` at it to run the app (or its tests) without the real weights.
    """
    from pathlib import Path

    from detr_viz.model import build_model, get_variant

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        path = out / get_variant(variant).checkpoint
        if not path.exists():
            model = build_model(variant)
            torch.save({"model": planted_state_dict(model)}, path)


if __name__ == "__main__":  # python -m detr_viz.testing FOLDER [VARIANT ...]
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m detr_viz.testing FOLDER [VARIANT ...]")
    write_weights_folder(sys.argv[1], tuple(sys.argv[2:]) or ("detr_resnet50", "detr_resnet50_dc5"))
