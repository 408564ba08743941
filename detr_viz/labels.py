"""Class names for a checkpoint's outputs, from whatever the user has at hand.

    read_labels("classes.txt", 3)            # one name per line
    read_labels("instances_val.json", 4)     # a COCO annotation file's "categories"
    read_labels(["cat", "dog", "fox"], 3)    # names in the API

Accepted: a list of names (a text file with one per line, or a JSON list), one per classifier
output; a map from output id to name (a JSON object ``{"1": "cat", ...}``, or the ``categories``
of a COCO annotation file, whose ids are the classifier's outputs as DETR trains them). Ids a map
leaves out are named ``"N/A"``, as in DETR's COCO list. A file whose count or ids do not fit the
checkpoint raises :class:`~detr_viz.errors.ArgumentError` saying how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detr_viz.errors import ArgumentError

MISSING = "N/A"


@dataclass(frozen=True)
class LabelsFile:
    """A labels file's name and contents, as an upload gives them (no path on disk)."""

    name: str
    text: str


Labels = str | os.PathLike[str] | LabelsFile | Sequence[str] | Mapping[int, str]


def default_labels(num_classes: int) -> tuple[str, ...]:
    """``("class 0", "class 1", ...)``: names for a checkpoint that came without any."""
    return tuple(f"class {i}" for i in range(num_classes))


def config_names(recorded: tuple[str, ...], given: Labels | None) -> tuple[str, ...]:
    """The names of a Hugging Face checkpoint's classes: ``given`` (read for as many classes),
    else config.json's ``recorded`` id2label, unless those are transformers' placeholders
    (``LABEL_0``, ...): then ``"class 0"``, ..."""
    if given is not None:
        return read_labels(given, len(recorded))
    if recorded == tuple(f"LABEL_{i}" for i in range(len(recorded))):
        return default_labels(len(recorded))
    return recorded


def read_labels(labels: Labels, num_classes: int, source: str | None = None) -> tuple[str, ...]:
    """One name per classifier output (``num_classes`` of them) from ``labels``: a path to a
    labels file (or its :class:`LabelsFile`), a list of names, or an id -> name map (see the
    module docstring)."""
    if isinstance(labels, LabelsFile):
        return parse_labels(labels.text, labels.name, num_classes)
    if isinstance(labels, str | os.PathLike):
        path = Path(labels).expanduser()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ArgumentError(f"Cannot read the labels file {path}: {exc}") from exc
        return parse_labels(text, path.name, num_classes)
    return _fit(labels, num_classes, source or "The labels")


def parse_labels(text: str, name: str, num_classes: int) -> tuple[str, ...]:
    """Names from the contents ``text`` of the labels file called ``name`` (JSON when it parses
    as a JSON list or object, else one name per line)."""
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ArgumentError(f"{name} looks like JSON but does not parse ({exc}).") from exc
        return _fit(_from_json(data, name), num_classes, name)
    lines = [line.strip() for line in stripped.splitlines()]
    return _fit(lines, num_classes, name)


def _from_json(data: Any, name: str) -> Sequence[str] | Mapping[int, str]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("categories"), list):  # COCO annotations
        try:
            return {int(c["id"]): str(c["name"]) for c in data["categories"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise ArgumentError(f"{name}: every COCO category needs an integer 'id' and a "
                                "'name'.") from exc
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):  # a config.json
        data = data["id2label"]
    if isinstance(data, dict):
        try:
            return {int(k): str(v) for k, v in data.items()}
        except ValueError as exc:
            raise ArgumentError(f"{name}: a JSON object of labels must map integer ids to names "
                                '(e.g. {"0": "cat", "1": "dog"}).') from exc
    raise ArgumentError(f"{name} holds a JSON {type(data).__name__}; give a list of names, an "
                        "id -> name object, or a COCO annotation file.")


def _fit(labels: Sequence[str] | Mapping[int, str], n: int, source: str) -> tuple[str, ...]:
    if isinstance(labels, Mapping):
        bad = sorted(i for i in labels if not 0 <= int(i) < n)
        if bad:
            raise ArgumentError(
                f"{source} names class id {bad[0]}, but the checkpoint has {n} classes (ids "
                f"0..{n - 1}). Is it the labels file of another model?")
        return tuple(str(labels.get(i, MISSING)) for i in range(n))
    if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        raise ArgumentError(f"{source}: labels must be names (strings), one per class.")
    names = list(labels)
    if len(names) == n:
        return tuple(x or MISSING for x in names)
    hint = (" DETR counts ids from 0, so a dataset whose ids start at 1 has an unused class 0: "
            "add a first line for it (e.g. N/A), or give a COCO annotation file or an id -> "
            "name JSON object." if len(names) == n - 1 else " Is it the labels file of another "
            "model?")
    raise ArgumentError(f"{source} lists {len(names)} names, but the checkpoint has {n} "
                        f"classes.{hint}")
