"""Fuzzing: damaged files give a valid image or a DetrVizError, never anything else or a hang.

Builds on test_image.py (plain random bytes; byte overwrites and cuts of plain RGB files):
here the seeds carry EXIF, alpha, palettes, 16-bit and float samples, animation and CMYK; the
edits also insert, delete, splice and write large integers; PNG chunk CRCs are repaired so
that edits reach Pillow's chunk handlers instead of its checksum check; and ``analyze`` itself
is fuzzed. ``tests/corpus/`` holds regression inputs, replayed by ``test_corpus_file``.
"""

from __future__ import annotations

import io
import math
import random
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detr_viz.analysis import Analysis, analyze
from detr_viz.errors import DetrVizError, ImageError
from detr_viz.image import load_image

from conftest import encode, exif, recipe_model

CORPUS = Path(__file__).parent / "corpus"
MAX_PIXELS = 100_000  # small limit: a mutated size field is refused rather than decoded
TIME_LIMIT = 30.0  # seconds per call on <= 64-pixel inputs: a hang guard, not a speed test
TINY = {"short_side": 32, "max_size": 64}  # analyze on inputs of at most 64 pixels a side
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fuzz(examples: int) -> settings:
    """Hypothesis settings: a fixed example budget (CI time) and no per-example deadline."""
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_seeds() -> dict[str, bytes]:
    """Small valid files (16 x 12) in every supported format, with the features decoders parse."""
    im, other = noise(16, 12), noise(16, 12, seed=1)
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (12, 16, 4), np.uint8))
    grey16 = Image.fromarray((np.arange(192, dtype=np.uint16) * 341).reshape(12, 16))
    grey_float = Image.fromarray(np.linspace(0, 1, 192, dtype=np.float32).reshape(12, 16))
    anim = {"save_all": True, "append_images": [other], "duration": 50}
    return {
        "jpeg": encode(im, "JPEG", quality=80),
        "jpeg-exif": encode(im, "JPEG", quality=80, exif=exif(6)),
        "jpeg-progressive": encode(im, "JPEG", quality=80, progressive=True),
        "jpeg-cmyk": encode(im.convert("CMYK"), "JPEG"),
        "png": encode(im, "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-palette-transparency": encode(im.convert("P"), "PNG", transparency=3),
        "png-16bit": encode(grey16, "PNG"),
        "png-exif": encode(im, "PNG", exif=exif(8)),
        "apng": encode(im, "PNG", **anim),
        "gif": encode(im, "GIF", **anim, transparency=0),
        "bmp": encode(im, "BMP"),
        "bmp-palette": encode(im.convert("P"), "BMP"),
        "tiff-lzw": encode(im, "TIFF", compression="tiff_lzw"),
        "tiff-float": encode(grey_float, "TIFF"),
        "tiff-cmyk": encode(im.convert("CMYK"), "TIFF"),
        "tiff-two-pages": encode(im, "TIFF", save_all=True, append_images=[other]),
        "webp": encode(im, "WEBP", quality=80, exif=exif(3)),
        "webp-lossless-alpha": encode(rgba, "WEBP", lossless=True),
        "webp-animated": encode(im, "WEBP", **anim),
        "heic": encode(im, "HEIF", quality=50, exif=exif(6)),
        "avif": encode(im, "AVIF", quality=50),
    }


SEEDS = make_seeds()
MAGICS = [b"\xff\xd8\xff\xe0", PNG_SIGNATURE, b"GIF89a", b"BM", b"II*\0", b"MM\0*", b"RIFF"]
MAGICS += [SEEDS["heic"][:12], SEEDS["avif"][:12], SEEDS["webp"][:16]]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 60000, 0x7FFFFFFF, 0xFFFFFFFF]


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC of a PNG, so that Pillow parses the edited chunks."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    out, pos = bytearray(data), len(PNG_SIGNATURE)
    while pos + 12 <= len(out):
        length = struct.unpack(">I", out[pos : pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(out[pos + 4 : end]))
        pos = end + 4
    return bytes(out)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for op, where, value in edits:
        if not out:
            out = bytearray(value)
            continue
        i = where % len(out)
        if op == "flip":
            out[i] ^= value[0] or 1
        elif op == "set":
            out[i : i + len(value)] = value
        elif op == "insert":
            out[i:i] = value
        elif op == "delete":
            del out[i : i + value[0] + 1]
        elif op == "cut":
            del out[max(i, 1) :]
        elif op == "copy":  # duplicate a stretch elsewhere (repeated chunks, segments, boxes)
            j = value[0] * 257 % len(out)
            out[i:i] = out[j : j + 1 + value[-1] % 64]
        elif op == "int":  # a size, count or offset field set to an extreme value
            number = INTERESTING[value[0] % len(INTERESTING)]
            width = (1, 2, 4)[value[-1] % 3]
            order = "big" if value[-1] & 4 else "little"
            out[i : i + width] = (number % (1 << 8 * width)).to_bytes(width, order)
    return bytes(out)


EDIT = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "cut", "copy", "int"]),
    st.one_of(st.integers(0, 96), st.integers(0, 1 << 16)),  # header-heavy offsets
    st.binary(min_size=1, max_size=8),
)


def timed(call, *args, **kwargs):
    """``call(...)``'s result or DetrVizError; anything else, or a call over TIME_LIMIT, fails."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow and libheif warn on damaged files
            return call(*args, **kwargs)
    except DetrVizError as error:
        return error
    finally:
        elapsed = time.perf_counter() - start
        assert elapsed < TIME_LIMIT, f"{call.__name__} took {elapsed:.1f} s"


def assert_valid_image(image: Image.Image, max_pixels: int = MAX_PIXELS) -> None:
    width, height = image.size
    assert image.mode == "RGB" and width > 0 and height > 0
    assert width * height <= max_pixels  # the limit holds for what is decoded, not just declared
    assert len(image.tobytes()) == width * height * 3  # fully decoded, readable pixels


def assert_valid_analysis(analysis: Analysis) -> None:
    (width, height), stride = analysis.input_size, analysis.stride
    assert analysis.feature_hw == (math.ceil(height / stride), math.ceil(width / stride))
    assert analysis.probabilities.shape == (100, 91) and analysis.boxes.shape == (100, 4)
    assert np.isfinite(analysis.scores).all() and (analysis.scores > 0).all()
    assert np.isfinite(analysis.boxes_xyxy()).all()
    maps = analysis.decoder_attentions([0, 99])
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1, atol=1e-4)


def check_load(data: bytes) -> Image.Image | DetrVizError:
    result = timed(load_image, data, max_pixels=MAX_PIXELS)
    if not isinstance(result, DetrVizError):
        assert_valid_image(result)
    return result


def test_seeds_are_valid_files_of_their_format():
    """The fuzzers start from files that load; otherwise they would only test refusals."""
    for name, data in SEEDS.items():
        image = load_image(data)
        assert image.mode == "RGB" and sorted(image.size) == [12, 16], name
        assert len(data) < 4000, name


@st.composite
def damaged_files(draw, max_edits: int = 6) -> bytes:
    """A seed with 1 to max_edits edits; PNG CRCs repaired half the time (else Pillow stops
    at the first edited chunk)."""
    edits = draw(st.lists(EDIT, min_size=1, max_size=max_edits))
    data = mutate(SEEDS[draw(st.sampled_from(sorted(SEEDS)))], edits)
    return fix_png_crcs(data) if draw(st.booleans()) else data


@st.composite
def damaged_pixels(draw) -> bytes:
    """A seed with 1 to 3 bytes changed past its first third, where the pixel data lies, CRCs
    repaired: most still decode, to garbled or cut-off pixels, and so reach the model."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    rng = random.Random(draw(st.integers(0, 2**32)))  # uniform places: most files still decode
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data) // 3, len(data))] = rng.randrange(256)
    return fix_png_crcs(bytes(data))


@fuzz(2000)
@given(damaged_files())
def test_mutated_files_give_an_image_or_a_detr_viz_error(data):
    check_load(data)


@fuzz(600)
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=2000))
def test_random_bytes_behind_a_real_signature(magic, tail):
    """Past the signature check, straight into each format plugin's header parser."""
    check_load(fix_png_crcs(magic + tail))


# PNG colour types and the bit depths each allows (PNG spec, table 11.1).
PNG_MODES = [
    (0, 1),
    (0, 2),
    (0, 4),
    (0, 8),
    (0, 16),
    (2, 8),
    (2, 16),
    (3, 1),
    (3, 2),
    (3, 4),
    (3, 8),
    (4, 8),
    (4, 16),
    (6, 8),
    (6, 16),
]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@st.composite
def png_files(draw) -> bytes:
    """Well-formed PNG chunks in any combination: colour type, depth, PLTE and tRNS lengths."""
    colour_type, depth = draw(st.sampled_from(PNG_MODES))
    width, height = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = (width * channels * depth + 7) // 8
    pixels = draw(st.binary(min_size=row * height, max_size=row * height))
    rows = b"".join(b"\0" + pixels[r * row : (r + 1) * row] for r in range(height))
    interlace = draw(st.sampled_from([0, 1]))
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)
    chunks = [(b"IHDR", header)]
    if draw(st.booleans()):
        chunks.append((b"PLTE", draw(st.binary(max_size=60)) * draw(st.integers(1, 13))))
    if draw(st.booleans()):
        chunks.append((b"tRNS", draw(st.binary(max_size=300))))
    if draw(st.booleans()):
        chunks.append((b"eXIf", exif(draw(st.sampled_from([0, 1, 6, 9, 65535])))))
    chunks.append((b"IDAT", zlib.compress(rows)))
    order = draw(st.permutations(range(1, len(chunks))))  # IHDR first, the rest in any order
    chunks = [chunks[0]] + [chunks[i] for i in order] + [(b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in chunks)


@fuzz(1000)
@given(png_files())
def test_any_combination_of_png_chunks(data):
    """Found by fuzzing: a palette PNG without PLTE, or with a tRNS longer than its palette,
    escaped as AssertionError / ValueError (see corpus/refuse-png-*)."""
    check_load(data)


@pytest.fixture(scope="module")
def model():
    return recipe_model("detr_resnet50")


@fuzz(100)
@given(damaged_pixels())
def test_analyze_on_files_with_damaged_pixels(model, data):
    """Most of these still decode, to garbled pixels: an Analysis with finite scores, or a
    DetrVizError, nothing else."""
    result = timed(analyze, model, data, **TINY)
    if not isinstance(result, DetrVizError):
        assert_valid_analysis(result)


@fuzz(150)
@given(st.one_of(damaged_files(), st.binary(max_size=500)))
def test_analyze_on_damaged_headers_and_random_bytes(model, data):
    result = timed(analyze, model, data, **TINY)
    if not isinstance(result, DetrVizError):
        assert_valid_analysis(result)


@fuzz(30)
@given(
    width=st.one_of(st.integers(1, 4), st.integers(1, 3000)),
    height=st.one_of(st.integers(1, 4), st.integers(1, 3000)),
    short_side=st.integers(1, 48),
    max_size=st.integers(1, 80),
)
def test_analyze_on_any_shape_and_input_size(model, width, height, short_side, max_size):
    """Extreme aspect ratios and tiny inputs: every grid, even 1 x 1, gives a sane analysis."""
    image = Image.new("RGB", (width, height), (90, 140, 200))
    analysis = timed(analyze, model, image, short_side=short_side, max_size=max_size)
    assert isinstance(analysis, Analysis)
    assert_valid_analysis(analysis)
    for point in [(0, 0), (width, height), (width / 2, height / 2)]:
        outgoing = analysis.encoder_attention(point, direction="outgoing")
        assert outgoing.shape == analysis.feature_hw
        np.testing.assert_allclose(outgoing.sum(), 1, atol=1e-4)


# --- corpus ------------------------------------------------------------------------------------

CORPUS_FILES = sorted(p for p in CORPUS.iterdir() if p.name.startswith(("accept-", "refuse-")))


def test_corpus_is_small_and_every_file_states_its_expectation():
    names = {p.name for p in CORPUS.iterdir()} - {"README.md"}
    assert names == {p.name for p in CORPUS_FILES}  # accept-* or refuse-*, nothing unreplayed
    assert len(CORPUS_FILES) >= 20
    assert all(p.stat().st_size < 100_000 for p in CORPUS_FILES)
    assert sum(p.stat().st_size for p in CORPUS_FILES) < 2_000_000


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_file(path, model):
    """accept-*: loads (with the default limit) and analyses; refuse-*: an ImageError."""
    result = timed(load_image, path.read_bytes())
    if path.name.startswith("refuse-"):
        assert isinstance(result, ImageError), result
        return
    assert not isinstance(result, DetrVizError), result
    assert_valid_image(result, max_pixels=10_000)
    assert_valid_analysis(analyze(model, result, **TINY))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow: "Corrupt EXIF data", as intended
@pytest.mark.parametrize(
    "path", sorted(CORPUS.glob("accept-jpeg-exif-*.jpg")), ids=lambda p: p.name
)
def test_unusable_exif_orientation_keeps_the_pixels_as_stored(path):
    """Orientation 0, 9, 65535, as text, a huge count, a cut IFD: no turn, the same pixels."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as stored:
        assert "exif" in stored.info  # the segment is there; its orientation is unusable
        assert stored.getexif().get(0x0112) not in range(1, 9)
        expected = np.asarray(stored.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(data)), expected)
