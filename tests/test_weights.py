"""Checkpoint lookup, download, vetting and loading, all offline with recipe-weight files."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from detr_viz import download
from detr_viz.download import WEIGHTS_ENV, download_checkpoint, hash_prefix
from detr_viz.errors import (
    CorruptCheckpointError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.model import CHECKPOINT_URL, VARIANTS
from detr_viz.weights import (
    check_state_dict,
    checkpoint_candidates,
    checkpoint_provenance,
    find_checkpoint,
    is_official_release,
    load_model,
    provenance_note,
    read_checkpoint,
    weights_provenance,
)

from conftest import RunsShell, raises, recipe_model

R50, R101 = "detr_resnet50", "detr_resnet101"
PAYLOAD = bytes(range(256)) * 1000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



class FakeResponse:
    """What an opener returns: serves ``data`` at most ``step`` bytes per read; raises ``error``
    once ``fail_at`` bytes are out. ``headers``/``length`` exist only when given."""

    def __init__(self, data, step=10_000, fail_at=None, error=None, headers=None, length=None):
        self.data, self.step, self.fail_at, self.error = data, step, fail_at, error
        self.pos, self.closed = 0, False
        if headers is not None:
            self.headers = headers
        if length is not None:
            self.length = length

    def read(self, n: int) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise self.error
        chunk = self.data[self.pos : self.pos + min(n, self.step)]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


def place(src: Path, folder: Path, name: str) -> Path:
    """``src`` under ``folder/name`` (a hard link where possible: the files are 160 MB)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / name
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    return dest


def assert_recipe_weights(model: torch.nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not model.training


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def hub(tmp_path) -> Path:
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def r50_state() -> dict:
    return recipe_model(R50).state_dict()


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory, r50_state) -> Path:
    path = tmp_path_factory.mktemp("r50") / "recipe-r50.pth"
    torch.save({"model": r50_state}, path)
    return path


@pytest.fixture(scope="module")
def r50_bytes(r50_file) -> bytes:
    return r50_file.read_bytes()


@pytest.fixture
def official_r50(monkeypatch, r50_bytes) -> str:
    """Make detr_resnet50's official file name one whose hash prefix the recipe file passes."""
    name = f"detr-r50-{sha256(r50_bytes)[:8]}.pth"
    monkeypatch.setitem(VARIANTS, R50, dataclasses.replace(VARIANTS[R50], checkpoint=name))
    return name


# Lookup order: explicit file, $DETR_VIZ_WEIGHTS, hub cache.


def test_explicit_file_loads_the_recipe_weights(r50_file, r50_state):
    assert_recipe_weights(load_model(R50, r50_file, download=False), r50_state)


def test_bare_state_dict_reads_like_one_under_model(tmp_path, r50_file, r50_state):
    torch.save(r50_state, tmp_path / "bare.pth")
    bare, wrapped = read_checkpoint(tmp_path / "bare.pth"), read_checkpoint(r50_file)
    assert bare.keys() == wrapped.keys() == r50_state.keys()
    assert all(torch.equal(bare[k], wrapped[k]) for k in bare)


def test_missing_explicit_file_names_the_path(tmp_path):
    with raises(WeightsUnavailableError, tmp_path / "nope.pth"):
        load_model(R50, tmp_path / "nope.pth")


def test_candidates_are_weights_folder_then_hub_cache(monkeypatch, tmp_path, hub):
    name = VARIANTS[R50].checkpoint
    assert checkpoint_candidates(R50) == [hub / name]
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    assert checkpoint_candidates(R50) == [tmp_path / "weights" / name, hub / name]


def test_weights_folder_wins_over_hub_cache(monkeypatch, tmp_path, hub, r50_file):
    name = VARIANTS[R50].checkpoint
    assert find_checkpoint(R50) is None
    in_hub = place(r50_file, hub, name)
    assert find_checkpoint(R50) == in_hub
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    assert find_checkpoint(R50) == in_hub
    in_folder = place(r50_file, tmp_path / "weights", name)
    assert find_checkpoint(R50) == in_folder


def test_loads_from_weights_folder(monkeypatch, tmp_path, r50_file, r50_state, official_r50):
    place(r50_file, tmp_path / "weights", official_r50)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    assert_recipe_weights(load_model(R50, download=False), r50_state)


def test_loads_from_hub_cache(hub, r50_file, r50_state, official_r50):
    place(r50_file, hub, official_r50)
    assert_recipe_weights(load_model(R50, download=False), r50_state)


def test_nothing_found_with_downloads_off_says_where_it_looked(hub):
    name = VARIANTS[R50].checkpoint
    with raises(WeightsUnavailableError, hub / name, WEIGHTS_ENV, "facebook/detr-resnet-50"):
        load_model(R50, download=False)


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    """The files SHA-256-hashed from now on (every path file_sha256 reads)."""
    calls, real = [], download.file_sha256
    monkeypatch.setattr(download, "file_sha256", lambda path: calls.append(path) or real(path))
    return calls


def test_hub_file_is_hashed_once_for_loading_and_the_release_check(
    hub, r50_file, official_r50, hashes
):
    path = place(r50_file, hub, official_r50)
    load_model(R50, download=False)  # checks the hash prefix of files in the hub cache
    assert is_official_release(path, R50) and checkpoint_provenance(path, R50) == "official"
    assert hashes == [path]
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    path.unlink()  # another file under the same name and size: hashed anew, and not the release
    path.write_bytes(b"\0" * size)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert not is_official_release(path, R50)
    assert hashes == [path, path]


def test_results_say_whether_a_released_models_file_is_that_release(
    tmp_path, r50_file, r50_state, official_r50, monkeypatch
):
    """Byte for byte the release: nothing to warn about and ``official_release`` true. Another
    file under the official name (a stand-in, a re-save, a fine-tuned file renamed): the
    warning the page and the command line show, and ``official_release`` false in exports."""
    from detr_viz.export import _weights

    folder = tmp_path / "weights"
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    place(r50_file, folder, official_r50)
    spec = load_model(R50, download=False).spec
    assert weights_provenance(spec) == "official" and provenance_note(spec) is None
    assert _weights(spec) == {"checkpoint": official_r50, "official_release": True}

    other = tmp_path / "other"
    monkeypatch.setenv(WEIGHTS_ENV, str(other))
    other.mkdir()
    torch.save({"model": r50_state, "epoch": 1}, other / official_r50)  # the same, re-saved
    spec = load_model(R50, download=False).spec
    assert weights_provenance(spec) == "other"
    assert provenance_note(spec, "these results show") == (
        f"These weights ({other / official_r50}) are not the official detr_resnet50 release "
        "(their SHA-256 differs), so these results show what these weights do, not what the "
        "published DETR detects.")
    assert _weights(spec) == {"checkpoint": official_r50, "official_release": False}


def test_checkpoints_of_no_released_model_are_not_asked_about_the_release(r50_file):
    finetuned = dataclasses.replace(load_model(R50, r50_file, download=False).spec,
                                    official=False, name="mine")
    built = recipe_model(R50).spec  # no file
    for spec in (finetuned, built):
        assert weights_provenance(spec) is None and provenance_note(spec) is None


def test_downloaded_file_is_not_hashed_again(hub, r50_bytes, official_r50, hashes):
    def opener(url):
        return FakeResponse(r50_bytes, step=1 << 20)

    load_model(R50, download=functools.partial(download_checkpoint, opener=opener))
    assert is_official_release(hub / official_r50, R50)
    assert hashes == []  # the digest computed while streaming serves both checks


# Download


@pytest.mark.parametrize(
    "size_info, total",
    [
        ({"headers": {"Content-Length": str(len(PAYLOAD))}}, len(PAYLOAD)),
        ({"length": len(PAYLOAD)}, len(PAYLOAD)),
        ({}, None),
    ],
    ids=["content-length", "length", "unknown"],
)
def test_download_verifies_renames_and_reports_progress(tmp_path, size_info, total):
    dest = tmp_path / f"whatever-{sha256(PAYLOAD)[:8]}.pth"
    response = FakeResponse(PAYLOAD, step=30_000, **size_info)
    calls = []
    got = download_checkpoint(
        "https://x/y", dest, lambda *c: calls.append(c), opener=lambda u: response
    )
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert list(tmp_path.iterdir()) == [dest]
    done = [d for d, _ in calls]
    assert done == sorted(set(done)) and done[0] == 0 and done[-1] == len(PAYLOAD)
    assert {t for _, t in calls} == {total} and response.closed


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=3000), step=st.integers(1, 700))
def test_download_copies_any_bytes_in_any_chunks(data, step):
    with tempfile.TemporaryDirectory() as folder:
        dest = Path(folder) / f"f-{sha256(data)[:8]}.bin"
        seen = []
        download_checkpoint(
            "u", dest, lambda d, t: seen.append(d), opener=lambda u: FakeResponse(data, step)
        )
        assert dest.read_bytes() == data and seen[-1] == len(data)


def test_hash_mismatch_leaves_no_file(tmp_path):
    dest = tmp_path / "whatever-00000000.pth"
    with raises(CorruptCheckpointError, "https://x/y", "SHA-256"):
        download_checkpoint("https://x/y", dest, opener=lambda u: FakeResponse(PAYLOAD))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("connection reset by peer"),
        http.client.IncompleteRead(b"", 100),
        TimeoutError("timed out"),
        urllib.error.URLError("name resolution failed"),
    ],
)
def test_interrupted_download_leaves_no_file(tmp_path, error):
    dest = tmp_path / f"whatever-{sha256(PAYLOAD)[:8]}.pth"
    response = FakeResponse(PAYLOAD, fail_at=100_000, error=error)
    with raises(WeightsUnavailableError, "https://x/y", dest.name):
        download_checkpoint("https://x/y", dest, opener=lambda u: response)
    assert list(tmp_path.iterdir()) == [] and response.closed


def test_ctrl_c_during_download_leaves_no_file(tmp_path):
    dest = tmp_path / f"whatever-{sha256(PAYLOAD)[:8]}.pth"
    response = FakeResponse(PAYLOAD, fail_at=100_000, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        download_checkpoint("https://x/y", dest, opener=lambda u: response)
    assert list(tmp_path.iterdir()) == []


def test_short_read_against_content_length_leaves_no_file(tmp_path):
    dest = tmp_path / "whatever.pth"  # no hash in the name: only the length can catch it
    response = FakeResponse(PAYLOAD, headers={"Content-Length": str(len(PAYLOAD) + 5)})
    with raises(WeightsUnavailableError, f"{len(PAYLOAD)} of {len(PAYLOAD) + 5} bytes"):
        download_checkpoint("https://x/y", dest, opener=lambda u: response)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error, reason",
    [
        (urllib.error.URLError("[Errno -3] Temporary failure in name resolution"), "Errno -3"),
        (urllib.error.HTTPError("u", 404, "Not Found", None, None), "HTTP Error 404: Not Found"),
        (TimeoutError("timed out"), "timed out"),
    ],
)
@pytest.mark.parametrize("env_folder", [True, False])
def test_offline_message_says_what_to_download_and_where(
    monkeypatch, tmp_path, error, reason, env_folder
):
    dest = tmp_path / "cache" / "detr-r50-e632da11.pth"
    if env_folder:
        monkeypatch.setenv(WEIGHTS_ENV, "/data/detr-weights")

    def opener(url):
        raise error

    where = ["/data/detr-weights"] if env_folder else [dest.parent, f"{WEIGHTS_ENV}="]
    url = "https://x/detr-r50-e632da11.pth"
    with raises(WeightsUnavailableError, url, reason, dest.name, *where):
        download_checkpoint(url, dest, opener=opener)
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_model_downloads_into_hub_cache(hub, r50_bytes, r50_state, official_r50):
    urls, calls = [], []

    def opener(url):
        urls.append(url)
        return FakeResponse(
            r50_bytes, step=1 << 20, headers={"Content-Length": str(len(r50_bytes))}
        )

    download = functools.partial(download_checkpoint, opener=opener)
    model = load_model(R50, progress=lambda *c: calls.append(c), download=download)
    assert urls == [CHECKPOINT_URL + official_r50]
    assert list(hub.iterdir()) == [hub / official_r50]
    assert calls[-1] == (len(r50_bytes), len(r50_bytes)) and len(calls) > 100
    assert_recipe_weights(model, r50_state)
    assert find_checkpoint(R50) == hub / official_r50


def test_load_model_offline_uses_urllib_and_explains(monkeypatch, hub):
    def urlopen(url, timeout=None):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    name = VARIANTS[R50].checkpoint
    with raises(WeightsUnavailableError, CHECKPOINT_URL + name, "unreachable", hub, WEIGHTS_ENV):
        load_model(R50)
    assert not hub.exists() or list(hub.iterdir()) == []


def test_hash_prefix_is_read_from_the_file_name():
    assert hash_prefix("detr-r50-dc5-f0fb7ef5.pth") == "f0fb7ef5"
    assert hash_prefix("detr-r50-e632da11.pth") == "e632da11"
    assert hash_prefix("my-model.pth") is None and hash_prefix("model.pth") is None


# Reading and vetting


@pytest.mark.parametrize("cut", ["half", "head", "empty", "text", "garbled pickle"])
def test_truncated_or_garbage_file_is_corrupt(tmp_path, r50_bytes, cut):
    path = tmp_path / "broken.pth"
    data = {
        "half": r50_bytes[: len(r50_bytes) // 2],
        "head": r50_bytes[:20],
        "empty": b"",
        "text": b"this is not a checkpoint\n" * 40,
        "garbled pickle": b"\x80\x02\xec\x00\x00.",  # 0xec is no pickle opcode
    }
    path.write_bytes(data[cut])
    with raises(CorruptCheckpointError, path, "delete it", f"({path.stat().st_size} bytes)"):
        load_model(R50, path, download=False)


def test_official_file_failing_its_hash_says_delete_it(hub, r50_file):
    path = place(r50_file, hub, VARIANTS[R50].checkpoint)  # recipe bytes, official name
    with raises(CorruptCheckpointError, f"Delete {path}"):
        load_model(R50, download=False)


def test_user_weights_folder_is_vetted_by_content_not_hash(monkeypatch, tmp_path, r50_file,
                                                          r50_state):
    """A file the user placed is theirs (re-saved, converted): its keys and shapes decide."""
    place(r50_file, tmp_path / "weights", VARIANTS[R50].checkpoint)  # recipe bytes, official name
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    model = load_model(R50, download=False)
    assert torch.equal(model.state_dict()["class_embed.bias"], r50_state["class_embed.bias"])


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_file_with_code_is_refused_without_running_it(tmp_path, how):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"model": RunsShell(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(RunsShell(marker), protocol=2))
    with raises(UnsafeCheckpointError, path, "never runs code"):
        load_model(R50, path, download=False)
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsShell(tmp_path / "control")))  # the payload is live
    assert (tmp_path / "control").exists()


@pytest.fixture(scope="module")
def r101_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("r101") / "recipe-r101.pth"
    torch.save({"model": recipe_model(R101).state_dict()}, path)
    return path


def test_resnet101_weights_for_resnet50_name_the_right_variant(r101_file):
    with raises(WrongVariantError, "detr_resnet101 / detr_resnet101_dc5", "ResNet-50"):
        load_model(R50, r101_file, download=False)


def test_resnet101_weights_load_into_resnet101(r101_file):
    assert_recipe_weights(load_model(R101, r101_file), recipe_model(R101).state_dict())


def test_dc5_official_name_for_non_dc5_is_refused(tmp_path, r50_file):
    path = place(r50_file, tmp_path, VARIANTS["detr_resnet50_dc5"].checkpoint)
    with raises(WrongVariantError, "detr_resnet50_dc5", R50):
        load_model(R50, path, download=False)


def test_resnet18_state_dict_is_not_detr(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with raises(NotADetrCheckpointError, path, "conv1.weight"):
        load_model(R50, path, download=False)


@pytest.mark.parametrize(
    "obj", [[1, 2, 3], {}, {"epoch": 3, "args": "lr=1e-4"}, {"model": {"a": 1}}, torch.ones(3)]
)
def test_things_that_are_not_state_dicts(tmp_path, obj):
    torch.save(obj, tmp_path / "x.pth")
    with raises(NotADetrCheckpointError, tmp_path / "x.pth"):
        read_checkpoint(tmp_path / "x.pth")


def test_fine_tuned_detr_lists_its_differences(r50_state):
    state = dict(r50_state, **{"class_embed.weight": torch.zeros(3, 256)})
    del state["query_embed.weight"]
    with raises(
        WrongVariantError,
        "class_embed.weight is 3x256 in the file, 92x256",
        "query_embed.weight is missing",
    ):
        check_state_dict(state, R50)


def test_num_batches_tracked_entries_are_ignored(r50_state):
    state = dict(r50_state, **{"backbone.0.body.bn1.num_batches_tracked": torch.tensor(7)})
    assert check_state_dict(state, R50).keys() == r50_state.keys()
