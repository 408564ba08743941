"""Read a checkpoint file safely: ``torch.load(weights_only=True)``, never code.

A file is a bare state dict, or a dict holding it under ``"model"`` (the DETR repository's
training checkpoints, which also hold ``args``, ``optimizer``, ``epoch``...). A file that would
run code is refused with :class:`~detr_viz.errors.UnsafeCheckpointError`; a damaged one raises
:class:`~detr_viz.errors.CorruptCheckpointError`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detr_viz.errors import (
    CorruptCheckpointError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict (name -> CPU tensor) in ``path``, bare or under the key ``"model"``.

    Always ``torch.load(weights_only=True)``: a file holding code is refused, never run.
    """
    return read_training_checkpoint(path)[0]


def read_training_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False
                             ) -> tuple[dict[str, Tensor], dict]:
    """(state dict, record) of ``path``: the record is the DETR repository's ``args`` saved
    beside ``model`` in a training checkpoint, as a dict (empty when there is none).

    ``torch.load(weights_only=True)``, with ``argparse.Namespace`` (built from plain values
    only) the one class allowed beyond plain containers and tensors: code is refused, never run.
    ``mmap``: map the tensors instead of reading them (for looking at shapes; files in the
    pre-1.6 format, which cannot be mapped, are read).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path} is not a checkpoint file (missing or a folder).")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            mapped = mmap and zipfile.is_zipfile(path)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc):  # garbled, or pickle protocol 4/5 opcodes
            raise CorruptCheckpointError(
                f"{path} cannot be read safely ({path.stat().st_size} bytes): it is damaged (then"
                " delete it and download again), or it was saved with a pickle protocol the safe"
                " loader does not read (then re-save it with torch.save's default protocol)."
            ) from exc
        raise UnsafeCheckpointError(
            f"Refused to load {path}: it contains code, not just weights; detr-viz never runs "
            "code from checkpoint files. Use a checkpoint that holds only a state dict."
        ) from exc
    except OSError as exc:
        raise WeightsUnavailableError(f"Cannot read {path}: {exc}") from exc
    except Exception as exc:  # torch.load reports damage as RuntimeError, EOFError, KeyError...
        raise _corrupt(path) from exc
    args = obj.get("args") if isinstance(obj, Mapping) else None
    record = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool)} \
        if isinstance(args, argparse.Namespace) else {}
    return _state_dict_of(obj, path), record


def _corrupt(path: Path) -> CorruptCheckpointError:
    size = path.stat().st_size
    return CorruptCheckpointError(
        f"{path} is damaged or incomplete ({size} bytes); delete it and download again."
    )


def _state_dict_of(obj: Any, path: Path) -> dict[str, Tensor]:
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if (
        isinstance(state, Mapping)
        and state
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        return dict(state)
    keys = f" with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, Mapping) else ""
    raise NotADetrCheckpointError(
        f"{path} holds a {type(obj).__name__}{keys}, not a DETR state dict (a dict of tensors, "
        'bare or under the key "model").'
    )
