"""Robustness: one shared model under many threads, no leaks, hostile files refused cheaply.

Builds on test_capture.py (concurrent raw forward passes) and test_weights.py (a pickle that
would run code is refused by ``load_model(variant, path)``): here the whole ``analyze`` path
runs concurrently on different photos in different formats, memory is watched over many
analyses, malicious checkpoints are tried at every place ``load_model`` looks, decompression
bombs of every format are timed and weighed, and degenerate photos go through ``analyze``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import math
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_viz.analysis import INCOMING, OUTGOING, Analysis, analyze
from detr_viz.download import WEIGHTS_ENV
from detr_viz.errors import ImageError, UnsafeCheckpointError, WeightsError
from detr_viz.image import load_image
from detr_viz.model import VARIANTS
from detr_viz.weights import load_model, read_checkpoint

from conftest import RunsShell, encode, hooked_modules, recipe_model

R50 = "detr_resnet50"
SMALL = {"short_side": 128, "max_size": 213}
MB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def photo(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random 'photo': low-frequency colour blobs plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.integers(-12, 13, smooth.shape)
    return Image.fromarray(np.clip(smooth.astype(int) + grain, 0, 255).astype(np.uint8))


def global_hooks() -> list:
    module = torch.nn.modules.module
    return [t for t in ("_global_forward_hooks", "_global_forward_pre_hooks") if getattr(module, t)]


def weights_fingerprint(model: torch.nn.Module) -> dict[str, float]:
    return {k: float(v.double().abs().sum()) for k, v in model.state_dict().items()}


def rss() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_rss() -> int:
    """RSS after a garbage collection and after glibc returns its free pages to the system, so
    that memory freed earlier and reused later cannot hide a leak (nor pad the baseline)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: plain RSS
        ctypes.CDLL(None).malloc_trim(0)
    return rss()


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def analysis_bytes(analysis: Analysis) -> int:
    """Bytes held by one analysis' arrays and tensors."""
    tensors = [
        t for f in analysis.encoder + analysis.decoder for t in (f.q, f.k, f.lse, f.key_padding)
    ]
    arrays = analysis.probabilities.nbytes + analysis.boxes.nbytes
    return arrays + sum(t.numel() * t.element_size() for t in tensors)


# --- one model, many threads ------------------------------------------------------------------

FORMATS = [
    ("JPEG", {"quality": 90}),
    ("PNG", {}),
    ("WEBP", {"quality": 90}),
    ("HEIF", {"quality": 80}),
    ("BMP", {}),
    ("TIFF", {}),
    ("AVIF", {"quality": 80}),
    ("GIF", {}),
]


def summary(analysis: Analysis) -> dict[str, object]:
    """What a user reads off an analysis: predictions, and maps at every layer end and corner."""
    width, height = analysis.original_size
    points = [(0, 0), (width, 0), (0, height), (width, height), (width / 3, height / 2)]
    out: dict[str, object] = {
        "grid": (analysis.input_size, analysis.feature_hw),
        "scores": analysis.scores,
        "probabilities": analysis.probabilities,
        "boxes": analysis.boxes_xyxy(),
    }
    for layer in (0, -1):
        out[f"decoder{layer}"] = analysis.decoder_attentions([0, 41, 99], layer)
        out[f"decoder{layer}-head3"] = analysis.decoder_attention(7, layer, head=3)
        for direction in (INCOMING, OUTGOING):
            out[f"encoder{layer}-{direction}"] = np.stack(
                [analysis.encoder_attention(p, layer, direction=direction) for p in points]
            )
    return out


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert got["grid"] == expected["grid"]
    for key in expected.keys() - {"grid"}:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_threads_analysing_different_photos_on_one_model_get_their_sequential_results():
    model = recipe_model(R50)
    fingerprint = weights_fingerprint(model)
    threads, per_thread = 8, 3
    jobs = []
    for i in range(threads * per_thread):
        width, height = 48 + 17 * (i % 7), 40 + 23 * (i % 5)  # 24 photos, 24 shapes
        fmt, options = FORMATS[i % len(FORMATS)]
        jobs.append(encode(photo(i, width, height), fmt, **options))
    expected = [summary(analyze(model, data, **SMALL)) for data in jobs]
    # the comparison is not vacuous: the photos give different grids and predictions
    assert len({e["grid"] for e in expected}) >= 10
    assert np.abs(expected[0]["probabilities"] - expected[1]["probabilities"]).max() > 1e-4

    start = threading.Barrier(threads)

    def run(index: int) -> dict:
        if index < threads:  # each worker's first job waits for all: maximal overlap
            start.wait(timeout=60)
        return summary(analyze(model, jobs[index], **SMALL))

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(run, range(len(jobs))))
    for got, want in zip(results, expected, strict=True):
        assert_same(got, want)
    assert hooked_modules(model) == [] and global_hooks() == []
    assert not model.training and weights_fingerprint(model) == fingerprint


def test_a_failing_photo_in_one_thread_does_not_disturb_the_others():
    model = recipe_model(R50)
    good = [encode(photo(100 + i, 64 + 8 * i, 48), "PNG") for i in range(4)]
    expected = [summary(analyze(model, data, **SMALL)) for data in good]
    bad = [b"", good[0][:60], b"not an image at all", encode(photo(0, 8, 8), "PNG")[:-30]]

    def run(data: bytes):
        try:
            return summary(analyze(model, data, **SMALL))
        except ImageError as error:
            return error

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, [d for pair in zip(good, bad, strict=True) for d in pair]))
    for got, want in zip(results[0::2], expected, strict=True):
        assert_same(got, want)
    assert all(isinstance(r, ImageError) for r in results[1::2])
    assert hooked_modules(model) == []


# --- memory ---------------------------------------------------------------------------------------


def test_memory_does_not_grow_over_50_analyses():
    """RSS after 50 analyses (results dropped) stays within a bound that a leak of the results
    would exceed, and nothing the library holds keeps a finished analysis alive."""
    model = recipe_model(R50)
    settings = {"short_side": 256, "max_size": 427}  # 341 x 256 input, 8 x 11 grid
    photos = [encode(photo(1000 + i, 96 + i % 5, 72), "JPEG", quality=90) for i in range(50)]
    warm_up, bound = 5, 40 * MB  # measured: ~0 MB; keeping the results: ~105 MB
    alive: list[weakref.ref] = []
    sizes = []
    for i, data in enumerate(photos):
        analysis = analyze(model, data, **settings)
        sizes.append(analysis_bytes(analysis))
        alive.append(weakref.ref(analysis.encoder[-1].q))
        del analysis
        if i + 1 == warm_up:
            before = live_rss()
    growth = live_rss() - before
    # keeping the 45 measured results alive would exceed the bound by far
    assert (len(photos) - warm_up) * min(sizes) > 2 * bound, min(sizes)
    assert growth < bound, f"RSS grew by {growth / MB:.0f} MB over {len(photos)} analyses"
    assert not any(ref() is not None for ref in alive)  # each result freed once dropped
    assert hooked_modules(model) == []


# --- hostile checkpoints ------------------------------------------------------------------------


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """Part of a real state dict, one entry replaced by an object whose unpickling runs a
    command."""
    state = {k: v for k, v in list(recipe_model(R50).state_dict().items())[:3]}
    state["class_embed.weight"] = RunsShell(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("where", ["weights folder", "hub cache, hash prefix matching"])
def test_checkpoint_with_code_is_refused_wherever_load_model_finds_it(
    monkeypatch, tmp_path, offline, where
):
    """test_weights covers checkpoint=path; here the files load_model finds by itself."""
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pth", marker)
    if where == "weights folder":  # vetted by content only, no hash: weights_only must hold
        name = VARIANTS[R50].checkpoint
        (tmp_path / "weights").mkdir()
        evil.rename(tmp_path / "weights" / name)
        monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    else:  # an official-looking name whose SHA-256 prefix the file passes
        name = f"detr-r50-{hashlib.sha256(evil.read_bytes()).hexdigest()[:8]}.pth"
        spec = dataclasses.replace(VARIANTS[R50], checkpoint=name)
        monkeypatch.setitem(VARIANTS, R50, spec)
        offline.mkdir(parents=True)
        evil.rename(offline / name)
    with pytest.raises(UnsafeCheckpointError, match="never runs code"):
        load_model(R50, download=False)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_read_checkpoint_refuses_code_in_any_pickle_protocol_without_running_it(tmp_path, protocol):
    """Plain pickles and torch.save zips, any protocol: refused, through read_checkpoint and
    load_model(checkpoint=...). (Protocols 4 and 5 use opcodes the weights-only unpickler does
    not know, so those are refused before any global is even looked up.)"""
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"model": {"x": RunsShell(marker)}}, protocol=protocol))
    zipped = tmp_path / "zipped.pth"
    torch.save({"model": {"x": RunsShell(marker)}}, zipped, pickle_protocol=protocol)
    for path in (plain, zipped):
        with pytest.raises(UnsafeCheckpointError if protocol == 2 else WeightsError):
            read_checkpoint(path)
        with pytest.raises(WeightsError):
            load_model(R50, checkpoint=str(path), download=False)
    assert not marker.exists()


# --- decompression bombs --------------------------------------------------------------------------

BASE = Image.new("RGB", (8, 8), (9, 99, 199))


def gif_descriptor(data: bytes | bytearray) -> int:
    """Offset of the first image descriptor (0x2C) of a GIF, found by walking its blocks."""
    i = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[i] == 0x21:  # extension: introducer, label, sub-blocks up to a zero length
        i += 2
        while data[i]:
            i += data[i] + 1
        i += 1
    assert data[i] == 0x2C
    return i


def claiming(fmt: str, width: int, height: int) -> bytes:
    """A valid 8 x 8 file of ``fmt`` whose header is edited to claim width x height."""
    if fmt == "HEIF":
        data = bytearray(encode(BASE, "HEIF", quality=50))
    elif fmt == "WEBP":
        data = bytearray(encode(BASE, "WEBP", lossless=True))
    else:
        data = bytearray(encode(BASE, fmt))
    if fmt == "PNG":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "JPEG":
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    elif fmt == "GIF":
        data[6:10] = struct.pack("<HH", width, height)  # logical screen
        frame = gif_descriptor(data)
        data[frame + 5 : frame + 9] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "TIFF":
        ifd = struct.unpack("<I", data[4:8])[0]
        for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
            pos = ifd + 2 + 12 * entry
            tag, kind = struct.unpack("<HH", data[pos : pos + 4])
            if tag in (256, 257):  # ImageWidth, ImageLength
                value = width if tag == 256 else height
                packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
                data[pos + 8 : pos + 12] = packed
    elif fmt == "WEBP":  # VP8L: 14-bit width - 1 and height - 1
        bits = data.index(b"VP8L") + 9
        old = struct.unpack("<I", data[bits : bits + 4])[0]
        new = (old & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
        data[bits : bits + 4] = struct.pack("<I", new)
    elif fmt == "HEIF":  # the image spatial extent property
        ispe = data.index(b"ispe")
        data[ispe + 8 : ispe + 16] = struct.pack(">II", width, height)
    return bytes(data)


def real_png_bomb(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of width x height zeros: ~15 KB that decode to 121 MB (and
    363 MB as RGB) for 11000 x 11000, so only a refusal from the header keeps memory low."""
    row = b"\0" + bytes((width + 7) // 8)  # filter byte, then the packed 1-bit samples
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    idat = zlib.compress(row * height, 9)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


BOMBS = [
    ("PNG", 60000, 60000),
    ("GIF", 60000, 60000),
    ("BMP", 60000, 60000),
    ("TIFF", 60000, 60000),
    ("JPEG", 65000, 65000),
    ("WEBP", 16384, 16384),
    ("HEIF", 40000, 40000),
    # over MAX_PIXELS (120 M) but under Pillow's own refusal (179 M): ours must catch it
    ("PNG", 11000, 11000),
    ("BMP", 11000, 11000),
    ("JPEG", 11000, 11000),
    ("TIFF", 11000, 11000),
    ("WEBP", 11000, 11000),
    ("real PNG", 11000, 11000),
]


@pytest.mark.parametrize(("fmt", "width", "height"), BOMBS, ids=lambda v: str(v))
def test_decompression_bomb_is_refused_before_decoding(fmt, width, height):
    """Decoding would take width * height * 3 bytes (363 MB to 12 GB): refused, with the peak
    RSS of the refusal under 100 MB (no decode happened; not timed: time depends on the host)."""
    if fmt == "real PNG":
        data = real_png_bomb(width, height)
        assert load_image(real_png_bomb(64, 48)).getpixel((63, 47)) == (0, 0, 0)
    else:
        control = encode(BASE, fmt, quality=50) if fmt == "HEIF" else claiming(fmt, 8, 8)
        assert load_image(control).size == (8, 8)  # the size edit alone makes the bomb
        data = claiming(fmt, width, height)
    grown, kind, message = refusal_in_a_fresh_process(data)
    assert grown < 100 * MB, f"RSS rose by {grown / MB:.0f} MB"
    assert kind == "ImageError", (kind, message)
    if fmt != "HEIF":  # libheif checks its own limit; the others are refused from the header
        assert f"{width * height:,}" in message


_REFUSAL = """
import sys, warnings
from PIL import Image
from detr_viz.errors import ImageError
from detr_viz.image import load_image
sys.path.insert(0, "tests")
from test_robustness import peak_rss, reset_peak_rss, rss
data = sys.stdin.buffer.read()
load_image(Image.new("RGB", (8, 8)))  # plugins and decoders loaded before the baseline
measure_peak = reset_peak_rss()
before = rss()
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        outcome = load_image(data)
except ImageError as error:
    outcome = error
grown = (peak_rss() if measure_peak else rss()) - before
print(grown, type(outcome).__name__, str(outcome).replace(chr(10), " "), sep="\\t")
"""


def refusal_in_a_fresh_process(data: bytes) -> tuple[int, str, str]:
    """``load_image(data)`` in a child process: (peak RSS growth in bytes, outcome's type name,
    its message). The peak RSS is per process, so threads that earlier tests left running in
    this one (and their allocations) cannot count against the load."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _REFUSAL], input=data, capture_output=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True,
                          timeout=120)
    grown, kind, message = done.stdout.decode().strip().split("\t", 2)
    return int(grown), kind, message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_raising_max_pixels_does_not_lift_pillows_own_bomb_limit(fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(claiming(fmt, 60000, 60000), max_pixels=10**10)


# --- degenerate photos through analyze --------------------------------------------------------


def assert_sane(analysis: Analysis, input_size: tuple[int, int], grid: tuple[int, int]) -> None:
    """Grid = ceil(input / stride); finite predictions; maps at the four corners are the
    right rows and columns of the dense encoder attention; decoder maps are distributions."""
    (w_in, h_in), stride = analysis.input_size, analysis.stride
    assert analysis.input_size == input_size and analysis.feature_hw == grid
    assert grid == (math.ceil(h_in / stride), math.ceil(w_in / stride))
    assert np.isfinite(analysis.probabilities).all() and np.isfinite(analysis.boxes).all()
    assert (analysis.probabilities.sum(axis=1) <= 1 + 1e-5).all()
    boxes = [d.box for d in analysis.detections(0.0)]
    assert len(boxes) == 100 and np.isfinite(boxes).all()
    decoder = analysis.decoder_attentions(list(range(100)))
    assert decoder.shape == (100, *grid)
    np.testing.assert_allclose(decoder.sum(axis=(1, 2)), 1, atol=1e-4)

    rows, cols = grid
    width, height = analysis.original_size
    dense = analysis.encoder[-1].dense()  # (cells, cells): row i = where cell i looks
    corners = {
        (0, 0): 0,
        (width, 0): cols - 1,
        (0, height): (rows - 1) * cols,
        (width, height): rows * cols - 1,
    }
    for point, cell in corners.items():
        outgoing = analysis.encoder_attention(point, direction=OUTGOING)
        incoming = analysis.encoder_attention(point, direction=INCOMING)
        assert outgoing.shape == incoming.shape == grid
        np.testing.assert_allclose(outgoing.ravel(), dense[cell], atol=1e-6)
        np.testing.assert_allclose(incoming.ravel(), dense[:, cell], atol=1e-6)
        assert np.isfinite(incoming).all() and abs(outgoing.sum() - 1) < 1e-4


@pytest.mark.parametrize(
    ("size", "input_size", "grid"),
    [
        ((1, 1), (800, 800), (25, 25)),  # the short side becomes 800
        ((20000, 20), (1000, 1), (1, 32)),  # capped by 1333: round(1333 * 20 / 20000) = 1 row
        ((20, 20000), (1, 1000), (32, 1)),
    ],
    ids=["1x1", "20000x20", "20x20000"],
)
def test_tiny_and_strip_photos_give_a_sane_analysis_at_the_default_size(size, input_size, grid):
    data = encode(
        photo(7, *size) if min(size) > 1 else Image.new("RGB", size, (200, 30, 30)), "PNG"
    )
    model = recipe_model(R50)
    analysis = analyze(model, data)  # the real transform: 800 / 1333
    assert analysis.original_size == size
    assert_sane(analysis, input_size, grid)
    assert hooked_modules(model) == []


def test_fully_transparent_png_analyses_as_a_white_photo():
    model = recipe_model(R50)
    clear = analyze(model, encode(Image.new("RGBA", (64, 48), (200, 10, 10, 0)), "PNG"), **SMALL)
    white = analyze(model, Image.new("RGB", (64, 48), (255, 255, 255)), **SMALL)
    assert_sane(clear, white.input_size, white.feature_hw)
    np.testing.assert_array_equal(clear.probabilities, white.probabilities)
    np.testing.assert_array_equal(clear.boxes, white.boxes)
