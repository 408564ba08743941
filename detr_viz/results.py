"""Where a batch's results live on disk, written so that a crash never leaves a half result.

Layout of an output folder (``detr-viz analyze ... --out DIR``)::

    DIR/photos/<id>/<method>.npz, <method>.json   the page's export of each method
    DIR/photos/<id>/<method>-q<query>.png          each kept detection's map over the photo
    DIR/photos/<id>/done.json                      written last: the photo is complete
    DIR/summary.csv                                every detection of the batch, one row each
    DIR/failures.csv                               photos that could not be analysed, and why

Every file is written to a temporary name in its folder and renamed (atomic on POSIX and
Windows), and ``done.json`` goes last, so a photo counts as done only when all its files are
whole; a killed run leaves at most files of unfinished photos, which a rerun overwrites. The
photo's ``<id>`` is its file stem and a hash of its absolute path (two ``a.jpg`` in different
folders do not collide); ``done.json`` records the settings, and a photo is skipped only when
they match.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

DONE = "done.json"
SUMMARY_COLUMNS = ("photo", "source", "query", "label", "name", "score", "x0", "y0", "x1", "y1")
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".bmp", ".tif",
                  ".tiff", ".gif"}


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader (or a rerun after a crash) sees the old file or the whole new one, never a part;
    the temporary file is removed on any failure, Ctrl-C included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def photo_id(source: Path) -> str:
    """``<stem>-<8 hex>``: the file stem (safe characters only) and a hash of its absolute path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem)[:60] or "photo"
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def find_photos(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The photos to analyse: files as given (whatever their suffix, so that a bad one is
    reported), and inside folders, recursively, files with a photo suffix, sorted; no repeats."""
    found: dict[Path, None] = {}
    for entry in map(Path, paths):
        if entry.is_dir():
            for path in sorted(entry.rglob("*")):
                if path.is_file() and path.suffix.lower() in PHOTO_SUFFIXES:
                    found.setdefault(path.resolve())
        else:
            found.setdefault(entry.resolve())
    return list(found)


class ResultStore:
    """An output folder: per-photo folders, the done marker, the summary and failure tables."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def folder(self, source: Path) -> Path:
        return self.root / "photos" / photo_id(source)

    def record(self, source: Path) -> dict | None:
        """The ``done.json`` of ``source``, or None if it is not done (or unreadable)."""
        try:
            return json.loads((self.folder(source) / DONE).read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, source: Path, settings: Mapping) -> bool:
        """Whether ``source`` is complete with exactly these settings."""
        record = self.record(source)
        return record is not None and record.get("settings") == dict(settings)

    def write(self, source: Path, name: str, data: bytes | str) -> Path:
        return atomic_write(self.folder(source) / name, data)

    def finish(self, source: Path, record: Mapping) -> None:
        """Mark ``source`` done: its ``done.json`` (write it after every other file), and
        clear the temporary files a killed earlier run left half written in its folder."""
        self.write(source, DONE, json.dumps(record, indent=1))
        for stale in self.folder(source).glob(".*.tmp"):  # atomic_write's names
            stale.unlink(missing_ok=True)

    def records(self) -> list[dict]:
        """Every complete photo's ``done.json`` in the folder, by id."""
        out = []
        for marker in sorted((self.root / "photos").glob(f"*/{DONE}")):
            try:
                out.append(json.loads(marker.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def write_summary(self, sources: Iterable[Path]) -> int:
        """``summary.csv``: one row per kept detection of each done photo in ``sources``, in
        their order. Rebuilt from the ``done.json`` files, so reruns never duplicate a row.
        Returns the number of rows."""
        rows = []
        for source in sources:
            record = self.record(source)
            for det in (record or {}).get("detections", []):
                rows.append([record["id"], record["source"], det["query"], det["label"],
                             det["name"], f"{det['score']:.6f}",
                             *(f"{v:.2f}" for v in det["box"])])
        self._csv("summary.csv", SUMMARY_COLUMNS, rows)
        return len(rows)

    def write_failures(self, failures: Iterable[tuple[Path, str]]) -> None:
        """``failures.csv``: each photo that failed in this run and the reason."""
        self._csv("failures.csv", ("source", "reason"), [[str(s), r] for s, r in failures])

    def _csv(self, name: str, header: Iterable[str], rows: list[list]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        atomic_write(self.root / name, buffer.getvalue())
