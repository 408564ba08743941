"""Every checkpoint detr-viz can find, described, for a model picker.

    for found in find_checkpoints():
        found.path, found.spec.title if found.spec else found.problem

Looked at: ``$DETR_VIZ_WEIGHTS`` (its checkpoint files ``*.pth``, ``*.pt``, ``*.bin``,
``*.safetensors``, its Hugging Face folders, and the folder itself when it is one) and the
Hugging Face hub cache (each repository's chosen snapshot). The released DETR files (official
names) and the transformers ports of them are left out: a page offers those as variants. A file
that cannot be used is listed with the reason, never hidden, so a user sees why their
checkpoint is not offered.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from detr_viz.errors import DetrVizError
from detr_viz.hf_checkpoint import WEIGHT_FILES, hub_cache_dir, is_complete
from detr_viz.lookup import weights_folder
from detr_viz.model import VARIANTS
from detr_viz.spec import ModelSpec

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
OFFICIAL_FILES = {v.checkpoint for v in VARIANTS.values()}


@dataclass(frozen=True)
class Found:
    """A checkpoint on disk: its description, or why it cannot be loaded."""

    path: Path
    spec: ModelSpec | None
    problem: str | None = None

    @property
    def title(self) -> str:
        """One line for a picker: the spec's title, or the name and the problem."""
        if self.spec is not None:
            return self.spec.title
        return f"{self.path.name} (cannot be loaded: {self.problem})"


def candidates() -> list[Path]:
    """Checkpoint files and folders to describe, in a stable order (see the module docstring)."""
    out: list[Path] = []
    folder = weights_folder()
    if folder is not None and folder.is_dir():
        if is_complete(folder):
            out.append(folder)
        for entry in sorted(folder.iterdir()):
            if _offered(entry):
                out.append(entry)
    cache = hub_cache_dir()
    if cache.is_dir():
        from detr_viz.hf_checkpoint import cached_repo_snapshot

        for repo in sorted(cache.glob("models--*")):
            snapshot = cached_repo_snapshot(repo)
            if snapshot is not None:
                out.append(snapshot)
    return out


def _offered(entry: Path) -> bool:
    """A Hugging Face folder, or a checkpoint file that is not a released one."""
    if entry.is_dir():
        return is_complete(entry)
    return entry.suffix in SUFFIXES and entry.name not in OFFICIAL_FILES | set(WEIGHT_FILES)


def find_checkpoints() -> list[Found]:
    """Each candidate described (a broken one with its problem); released models left out."""
    found = []
    for path in candidates():
        item = describe(path)
        if item.spec is None or not item.spec.official:
            found.append(item)
    return found


def describe(path: Path) -> Found:
    """``path`` described as :func:`detr_viz.weights.describe_checkpoint` does, or its problem.

    Remembered per file state (a file's, or each file's in a folder: inode, size, modification
    time), so a picker that looks again every few seconds reads only what is new or changed: a
    training checkpoint is opened and its shapes vetted once, not on every look."""
    try:
        state = _state(path)
    except OSError:
        return _describe(path)  # gone or unreadable: say why, remember nothing
    return _remembered(path, state)


def _state(path: Path) -> tuple:
    def one(p: Path) -> tuple:
        st = p.stat()
        return p.name, st.st_ino, st.st_size, st.st_mtime_ns

    return tuple(sorted(one(p) for p in path.iterdir())) if path.is_dir() else one(path)


@functools.lru_cache(maxsize=256)
def _remembered(path: Path, state: tuple) -> Found:
    return _describe(path)


def _describe(path: Path) -> Found:
    from detr_viz.weights import describe_checkpoint  # weights imports lookup, as we do

    try:
        return Found(path, describe_checkpoint(path, peek=True))
    except DetrVizError as error:
        return Found(path, None, _short(str(error), path))
    except OSError as error:
        return Found(path, None, os.strerror(error.errno or 0) or str(error))


def _short(message: str, path: Path) -> str:
    """The error's message without the path it starts with (the picker shows the name)."""
    for prefix in (str(path), str(path.parent)):
        message = message.removeprefix(prefix).lstrip()
    return message[:200]
