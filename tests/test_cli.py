"""``detr-viz analyze`` / ``evaluate`` with planted stand-in weights ($DETR_VIZ_WEIGHTS, as the
page's tests), checked against the library run on the same photos as the oracle."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr_viz import analyze, batch, load_model
from detr_viz.batch import FILE_NAMES
from detr_viz.cli import CANNOT_START, main
from detr_viz.explain import RAW, RELEVANCE, ROLLOUT, relevance, rollout
from detr_viz.results import ResultStore, photo_id

from conftest import photo

SIZE = ["--short-side", "96", "--max-size", "128"]  # a 3 x 4 feature grid: fast
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch, weights_dir, tmp_path):
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return weights_dir


@pytest.fixture(scope="module")
def library(weights_dir):
    return library_runner(weights_dir)


def library_runner(weights_dir: Path):
    """The library's analysis at the tests' size (the oracle); ``.model`` is its model."""
    model = load_model("detr_resnet50", weights_dir / "detr-r50-e632da11.pth", download=False)

    def run(path: Path):
        return analyze(model, path, short_side=96, max_size=128)

    run.model = model
    return run


def photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(start, start + count):
        path = folder / f"photo{seed}.jpg"
        photo(160, 128, seed).save(path, quality=95)
        out.append(path)
    return out


def threshold_for(library, paths, per_photo: int = 2) -> float:
    """A threshold that keeps at least ``per_photo`` detections of every photo, halfway
    between two scores (so float32 rounding on other threads keeps the same detections)."""
    lowest = min((np.sort(library(p).scores)[::-1] for p in paths), key=lambda s: s[per_photo - 1])
    return float(lowest[per_photo - 1] + lowest[per_photo]) / 2


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_analyze_writes_the_librarys_maps_and_skips_a_corrupt_photo(env, library, tmp_path,
                                                                    capsys):
    good = photos(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    threshold = threshold_for(library, good)
    out = tmp_path / "out"
    status = main(["analyze", str(tmp_path / "in"), "--methods", "raw,rollout,relevance",
                   "--threshold", str(threshold), "--out", str(out), *SIZE])
    assert status == 1  # one photo failed
    err = capsys.readouterr().err
    assert "3/3 photos" in err and "1 failed" in err
    # stand-ins under the official name: said, as the page says it, and recorded in each export
    assert ("detr-r50-e632da11.pth) are not the official detr_resnet50 release (their SHA-256 "
            "differs), so these results show what these weights do") in err
    failures = read_csv(out / "failures.csv")
    assert [Path(f["source"]).name for f in failures] == ["broken.jpg"]
    assert failures[0]["reason"] and "broken.jpg" in err
    summary = read_csv(out / "summary.csv")
    store = ResultStore(out)
    total = 0
    for path in good:
        analysis = library(path)
        expected = analysis.detections(threshold)
        queries = [d.query for d in expected]
        record = store.record(path.resolve())
        assert [d["query"] for d in record["detections"]] == queries
        np.testing.assert_allclose([d["box"] for d in record["detections"]],
                                   [d.box for d in expected], rtol=1e-6)
        oracle = {RAW: analysis.decoder_attentions(queries),
                  ROLLOUT: rollout(analysis).decoder_maps(queries),
                  RELEVANCE: relevance(library.model, analysis, queries)}
        folder = store.folder(path.resolve())
        for method, maps in oracle.items():
            with np.load(folder / f"{FILE_NAMES[method]}.npz") as npz:
                np.testing.assert_allclose(npz["decoder_maps"], maps, rtol=1e-5,
                                           atol=1e-6 * np.abs(maps).max())
                settings = json.loads(str(npz["settings"]))
                assert settings["method"] == method
                assert settings["checkpoint"] == "detr-r50-e632da11.pth"
                assert settings["official_release"] is False
            exported = json.loads((folder / f"{FILE_NAMES[method]}.json").read_text())
            assert exported["queries"] == queries
            for q in queries:
                with Image.open(folder / f"{FILE_NAMES[method]}-q{q:03d}.png") as png:
                    assert png.size == (160, 128)
        rows = [r for r in summary if r["photo"] == photo_id(path.resolve())]
        assert [int(r["query"]) for r in rows] == queries
        total += len(queries)
    assert len(summary) == total >= 4


def test_exit_status_counts_failures_and_start_errors(env, tmp_path, capsys):
    good = photos(tmp_path / "in", 1)
    missing = tmp_path / "in" / "gone.jpg"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = str(tmp_path / "out")
    assert main(["analyze", str(good[0]), str(missing), str(text), "--threshold", "0.999",
                 "--out", out, *SIZE]) == 2
    assert {Path(r["source"]).name for r in read_csv(Path(out) / "failures.csv")} == {
        "gone.jpg", "notes.txt"}
    assert main(["analyze", str(good[0]), "--methods", "gradcam", "--out", out]) == CANNOT_START
    assert "unknown method 'gradcam'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--out", out]) == CANNOT_START
    assert "no photos found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["analyze", "--out", out])
    assert usage.value.code == CANNOT_START


def _outputs(out: Path) -> dict[str, bytes]:
    """Every result file by relative path (the failure table aside)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "failures.csv"}


def _close(x, y, rtol: float) -> bool:
    """Equal, with floats (also inside lists, dicts and CSV cells) within ``rtol``."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k], rtol) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b, rtol) for a, b in zip(x, y, strict=True))
    printed = 0.0  # a CSV cell's last printed digit: two values a hair apart can round apart
    if isinstance(x, str) and isinstance(y, str) and x != y:
        try:
            if "." in x and "." in y:  # integers (query ids, labels) must be equal
                printed = max(10.0 ** -len(v.partition(".")[2]) for v in (x, y))
            x, y = float(x), float(y)
        except ValueError:
            return False
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= rtol * max(abs(x), abs(y), 1.0) + printed
    return x == y


def _same_results(a: Path, b: Path, rtol: float = 0.0) -> None:
    """The same result files in ``a`` and ``b``: equal, or floats within ``rtol`` (a run with
    other thread counts, as Ray workers have, rounds float32 sums differently)."""
    left, right = _outputs(a), _outputs(b)
    assert sorted(left) == sorted(right)
    for name in left:
        if name.endswith(".npz"):
            with np.load(a / name) as x, np.load(b / name) as y:
                assert sorted(x.files) == sorted(y.files)
                for key in x.files:
                    scale = np.abs(x[key]).max() if x[key].dtype.kind == "f" and x[key].size else 0
                    if rtol and x[key].dtype.kind == "f":
                        np.testing.assert_allclose(x[key], y[key], rtol=rtol, atol=rtol * scale)
                    else:
                        np.testing.assert_array_equal(x[key], y[key])
        elif name.endswith(".png"):
            continue  # same maps (the NPZ) and photo; PNG encoder bytes are not the point
        elif rtol and name.endswith(".json"):
            assert _close(json.loads(left[name]), json.loads(right[name]), rtol), name
        elif rtol and name.endswith(".csv"):
            rows = [[line.split(",") for line in d.decode().splitlines()]
                    for d in (left[name], right[name])]
            assert _close(*rows, rtol), name
        else:
            assert left[name] == right[name], name


def test_an_interrupted_run_resumes_without_loss_or_repeats(env, library, tmp_path,
                                                            monkeypatch, forwards):
    paths = photos(tmp_path / "in", 3)
    args = ["--methods", "raw,rollout", "--threshold", str(threshold_for(library, paths, 1)),
            *SIZE]
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "clean"), *args]) == 0
    original, calls = batch.analyse_photo, []

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the batch
        return original(*a, **k)

    monkeypatch.setattr(batch, "analyse_photo", crash_on_second)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "in"), "--out", str(out), *args]) == 130
    store = ResultStore(out)
    assert [store.record(p.resolve()) is not None for p in paths] == [True, False, False]
    monkeypatch.setattr(batch, "analyse_photo", original)
    before = len(forwards)
    assert main(["analyze", str(tmp_path / "in"), "--out", str(out), *args]) == 0
    assert len(forwards) - before == 2  # the done photo was not analysed again
    _same_results(tmp_path / "clean", out)


def test_a_killed_process_loses_nothing_after_a_rerun(env, library, tmp_path):
    paths = photos(tmp_path / "in", 8)  # 7 photos cannot finish between two looks (20 ms)
    args = ["--methods", "raw,rollout", "--threshold", str(threshold_for(library, paths, 1)),
            *SIZE]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "detr_viz", "analyze", str(tmp_path / "in"), "--out",
               str(out), *args]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(out.glob("photos/*/done.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done = len(list(out.glob("photos/*/done.json")))
    assert 1 <= done < 8, done  # killed mid-batch
    assert main(["analyze", str(tmp_path / "in"), "--out", str(out), *args]) == 0
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "clean"), *args]) == 0
    _same_results(tmp_path / "clean", out)
    assert not list(out.rglob("*.tmp"))  # temporary files of the killed write were replaced


def test_a_finetuned_checkpoint_with_its_labels(env, tmp_path, capsys):
    """--checkpoint alone loads whatever DETR it holds; --labels names its classes; evaluate
    reloads the same model from the settings the analysis recorded."""
    import argparse as ap

    import torch

    from detr_viz.model import build_model
    from detr_viz.spec import ModelSpec
    from detr_viz.testing import planted_state_dict

    spec = ModelSpec(num_classes=2, labels=("class 0", "class 1"), num_queries=9,
                     encoder_layers=2, decoder_layers=3, heads=2, d_model=32, ffn_dim=16,
                     official=False)
    checkpoint = tmp_path / "mine.pth"
    torch.save({"model": planted_state_dict(build_model(spec)),
                "args": ap.Namespace(nheads=2, dilation=False)}, checkpoint)
    (tmp_path / "names.txt").write_text("helmet\nvest\n")
    [path] = photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    status = main(["analyze", str(path), "--out", str(out), "--checkpoint", str(checkpoint),
                   "--labels", str(tmp_path / "names.txt"), "--threshold", "0", *SIZE])
    assert status == 0, capsys.readouterr().err
    assert "mine (DETR R50, 2 classes, 9 queries, 2+3 layers x 2 heads)" in capsys.readouterr().err
    model = load_model(checkpoint=checkpoint, labels=["helmet", "vest"])
    want = analyze(model, path, short_side=96, max_size=128).detections(0.0)
    summary = read_csv(out / "summary.csv")
    assert [(int(r["query"]), r["name"]) for r in summary] == [(d.query, d.name) for d in want]
    assert {r["name"] for r in summary} <= {"helmet", "vest"} and len(summary) == 9
    assert main(["evaluate", str(out), "--steps", "2", "--bootstrap", "10"]) == 0
    assert "mine (DETR R50" in capsys.readouterr().err
    assert main(["analyze", str(path), "--out", str(out), "--checkpoint", str(checkpoint),
                 "--labels", str(tmp_path / "in" / "photo0.jpg"), *SIZE]) == CANNOT_START
    assert "Cannot read the labels file" in capsys.readouterr().err


def test_finishing_a_photo_clears_what_a_killed_run_left_half_written(tmp_path):
    store = ResultStore(tmp_path / "out")
    source = tmp_path / "photo.jpg"
    folder = store.folder(source)
    folder.mkdir(parents=True)
    stale = folder / ".done.json.pbhk_1ru.tmp"  # a worker killed inside atomic_write
    stale.write_text("{")
    store.write(source, "raw.npz", b"maps")
    store.finish(source, {"settings": {}})
    assert sorted(p.name for p in folder.iterdir()) == ["done.json", "raw.npz"]
