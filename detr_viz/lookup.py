"""Where detr-viz looks for a variant's checkpoint, in :func:`find_checkpoint`'s order.

1. ``$DETR_VIZ_WEIGHTS/<official name>`` (``detr-r50-e632da11.pth``, ...);
2. a Hugging Face checkpoint in ``$DETR_VIZ_WEIGHTS``: the folder named after its repository
   (``detr-resnet-50/``, ``detr-resnet-50-dc5/``, ...), else the folder itself when its
   config.json is for the variant (so one HF checkpoint can be pointed at directly);
3. ``<torch.hub.get_dir()>/checkpoints/<official name>``;
4. the Hugging Face hub cache: ``<hub cache>/models--facebook--detr-resnet-50/snapshots/*/``
   (the revision ``refs/main`` names first).
Nothing found: :func:`~detr_viz.weights.load_model` downloads the official file into 3.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from detr_viz.download import WEIGHTS_ENV
from detr_viz.hf_checkpoint import (
    HF_REPOS,
    WEIGHT_FILES,
    cached_snapshot,
    checkpoint_variant,
    hub_cache_dir,
    is_complete,
    weights_file,
)
from detr_viz.model import CHECKPOINT_URL, DEFAULT_VARIANT, get_variant


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder, read now (honours TORCH_HOME and torch.hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_url(variant: str) -> str:
    """Where the official checkpoint of ``variant`` is downloaded from."""
    return CHECKPOINT_URL + get_variant(variant).checkpoint


def checkpoint_candidates(variant: str) -> list[Path]:
    """Where :func:`find_checkpoint` looks for the official file, in order ($DETR_VIZ_WEIGHTS
    first)."""
    name = get_variant(variant).checkpoint
    folder = weights_folder()
    return [f / name for f in [*([folder] if folder else []), hub_checkpoint_dir()]]


def hf_checkpoint_candidates(variant: str) -> list[Path]:
    """Hugging Face checkpoint folders :func:`find_checkpoint` looks in, in order:
    ``$DETR_VIZ_WEIGHTS/<repo name>`` (``detr-resnet-50``, ``detr-resnet-50-dc5``, ...),
    ``$DETR_VIZ_WEIGHTS`` itself (used only if its config.json is for ``variant``), and the
    hub cache's snapshots folder of ``facebook/<repo name>``."""
    repo = HF_REPOS[get_variant(variant).name]
    folder = weights_folder()
    mine = [folder / repo.split("/")[1], folder] if folder else []
    return [*mine, hub_cache_dir() / ("models--" + repo.replace("/", "--")) / "snapshots"]


def weights_folder() -> Path | None:
    """``$DETR_VIZ_WEIGHTS`` (user expanded), or None when it is not set."""
    folder = os.environ.get(WEIGHTS_ENV)
    return Path(folder).expanduser() if folder else None


def find_checkpoint(variant: str) -> Path | None:
    """The first checkpoint that exists, in the order above, or None (then
    :func:`~detr_viz.weights.load_model` downloads): an official file or a Hugging Face folder.

    Raises a :class:`~detr_viz.errors.WeightsError` only for a broken config.json in
    ``$DETR_VIZ_WEIGHTS`` itself (one the user placed there)."""
    name, folder = get_variant(variant).checkpoint, weights_folder()
    steps: list[Callable[[], Path | None]] = [
        lambda: _file(folder / name) if folder else None,
        lambda: _weights_folder_hf(folder, variant) if folder else None,
        lambda: _file(hub_checkpoint_dir() / name),
        lambda: cached_snapshot(variant),
    ]
    return next((path for step in steps if (path := step()) is not None), None)


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _weights_folder_hf(folder: Path, variant: str) -> Path | None:
    """A Hugging Face checkpoint of ``variant`` in ``folder``: its repo-named subfolder if that
    holds a weights file (config.json is then required), else ``folder`` itself if it is a
    complete checkpoint whose config.json is for ``variant``."""
    named = folder / HF_REPOS[get_variant(variant).name].split("/")[1]
    if weights_file(named) is not None:
        return named
    return folder if is_complete(folder) and checkpoint_variant(folder) == variant else None


def describe_sources(variant: str = DEFAULT_VARIANT) -> str:
    """The checkpoint sources :func:`~detr_viz.weights.load_model` accepts for ``variant``, in
    its order, with today's paths: numbered lines, for a page or an error message to show."""
    spec = get_variant(variant)
    repo = HF_REPOS[spec.name]
    folder = weights_folder()
    env = f"{WEIGHTS_ENV}={folder}" if folder else f"{WEIGHTS_ENV} is not set"
    files = f"config.json and {' or '.join(WEIGHT_FILES)}"
    lines = [
        "the checkpoint you name: an official .pth file, or a Hugging Face checkpoint folder "
        f"({files}) or its weights file",
        f"the official file {WEIGHTS_ENV}/{spec.checkpoint} ({env})",
        f"the Hugging Face checkpoint {repo} in {WEIGHTS_ENV}/{repo.split('/')[1]}/ ({files}), "
        f"or in {WEIGHTS_ENV} itself",
        f"the torch hub cache: {hub_checkpoint_dir() / spec.checkpoint}",
        f"the Hugging Face hub cache: {hf_checkpoint_candidates(variant)[-1]}/<revision>/",
        f"a download of {checkpoint_url(variant)} into the torch hub cache",
    ]
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def hf_advice(variant: str) -> str:
    """How to use the Hugging Face checkpoint of ``variant`` instead of the official file."""
    repo = HF_REPOS[get_variant(variant).name]
    return (
        f"Or use the Hugging Face checkpoint {repo}: put its config.json and model.safetensors "
        f"in {WEIGHTS_ENV}/{repo.split('/')[1]}/, or download it into the Hugging Face hub "
        f"cache ({hub_cache_dir()})."
    )
