"""Download a checkpoint safely: stream to a temporary file, check its SHA-256, then rename.

The SHA-256 prefix is the one torch hub puts in released file names
(``detr-r50-e632da11.pth`` -> ``e632da11``). On any failure, Ctrl-C included, the temporary
file is deleted, so a half file never sits at the final path and never looks valid later.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detr_viz.errors import CorruptCheckpointError, WeightsUnavailableError

WEIGHTS_ENV = "DETR_VIZ_WEIGHTS"  # a folder holding official checkpoint files
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60  # per socket operation, not for the whole download

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)
Opener = Callable[[str], Any]  # url -> file-like with .read(n); optional .headers, .length


def download_checkpoint(
    url: str,
    dest: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    opener: Opener | None = None,
) -> Path:
    """Stream ``url`` to ``dest`` via a temporary file, verify the SHA-256 prefix in ``dest``'s
    name (``name-<hex>.ext``; no prefix, no check), then rename. On any failure, Ctrl-C
    included, the temporary file is deleted and ``dest`` is untouched. Returns ``dest``."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".partial-")
    except OSError as exc:
        raise _unavailable(url, dest, f"cannot write to {dest.parent} ({exc})") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, dest, out, progress, opener or _open_url)
        expected = hash_prefix(dest.name)
        if expected is not None and not digest.startswith(expected):
            raise CorruptCheckpointError(
                f"The download of {url} is damaged: its SHA-256 starts with "
                f"{digest[: len(expected)]}, not {expected}. Nothing was saved; try again."
            )
        os.replace(tmp, dest)
        remember_sha256(dest, digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _open_url(url: str) -> Any:
    return urllib.request.urlopen(url, timeout=TIMEOUT_S)


def _stream(url: str, dest: Path, out: Any, progress: Progress | None, opener: Opener) -> str:
    """Copy what ``opener(url)`` serves into ``out``, reporting progress; the SHA-256 hex."""
    sha, done = hashlib.sha256(), 0
    try:
        response = opener(url)
        try:
            total = _content_length(response)
            if progress is not None:
                progress(0, total)
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        finally:
            getattr(response, "close", lambda: None)()
    except (OSError, http.client.HTTPException) as exc:
        raise _unavailable(url, dest, _reason(exc)) from exc
    if total is not None and done != total:
        raise _unavailable(url, dest, f"the download stopped after {done} of {total} bytes")
    return sha.hexdigest()


def _content_length(response: Any) -> int | None:
    """Content-Length from ``response.headers``, else ``response.length``, else None."""
    value = (getattr(response, "headers", None) or {}).get("Content-Length")
    value = getattr(response, "length", None) if value is None else value
    return int(value) if str(value).strip().isdigit() else None


def _reason(exc: BaseException) -> str:
    """What went wrong, in words: "HTTP Error 404: Not Found", "timed out", ..."""
    if isinstance(exc, urllib.error.HTTPError):
        return str(exc)
    return str(getattr(exc, "reason", None) or exc) or type(exc).__name__


def manual_advice(name: str, fallback: Path) -> str:
    folder = os.environ.get(WEIGHTS_ENV)
    if folder:
        return f"Download it on a machine with internet and put {name} in {folder}."
    return (
        f"Download it on a machine with internet and put {name} in a folder, then set "
        f"{WEIGHTS_ENV}=/that/folder (or put it in {fallback})."
    )


def _unavailable(url: str, dest: Path, reason: str) -> WeightsUnavailableError:
    advice = manual_advice(dest.name, dest.parent)
    return WeightsUnavailableError(f"Could not download {url}: {reason}. {advice}")


def hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix in a torch hub file name (``detr-r50-e632da11.pth`` -> ``e632da11``)."""
    if "-" not in name:
        return None
    prefix = name.rsplit("-", 1)[1].split(".")[0]
    return prefix if re.fullmatch(r"[0-9a-f]{6,64}", prefix) else None


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path`` as hex, read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> SHA-256
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 16


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def remember_sha256(path: Path, digest: str) -> None:
    """Record that the file now at ``path`` has SHA-256 ``digest`` (hex), for
    :func:`cached_file_sha256`; the record lapses when the file's size or mtime changes."""
    _remember(_file_key(path), digest)


def _remember(key: tuple[str, int, int], digest: str) -> None:
    with _DIGESTS_LOCK:
        if key not in _DIGESTS and len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.pop(next(iter(_DIGESTS)))  # the oldest record
        _DIGESTS[key] = digest


def cached_file_sha256(path: Path) -> str:
    """:func:`file_sha256`, computed at most once per process for one file version, keyed by
    resolved path, size and mtime (ns): loading a checkpoint and asking whether it is the
    official release hash it once. A file rewritten in place with the same size within the
    file system's mtime resolution would be missed; checkpoints are replaced, not edited."""
    key = _file_key(path)  # taken before reading: a change while hashing gives a new key
    with _DIGESTS_LOCK:
        digest = _DIGESTS.get(key)
    if digest is None:
        digest = file_sha256(path)
        _remember(key, digest)
    return digest


def verify_hash(path: Path) -> None:
    """Raise :class:`CorruptCheckpointError` if ``path`` fails the hash prefix in its name."""
    expected = hash_prefix(path.name)
    if expected is None:
        return
    if not cached_file_sha256(path).startswith(expected):
        raise CorruptCheckpointError(
            f"{path} fails its SHA-256 check (its name says {expected}): it is damaged or "
            f"incomplete. Delete {path} and download it again."
        )
