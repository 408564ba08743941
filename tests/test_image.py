"""load_image gives upright 8-bit RGB or an ImageError; preprocess is DETR's exact transform.

Every fixture is generated here, in memory or under tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from detr_viz.errors import ArgumentError, DetrVizError, ImageError
from detr_viz.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    ModelInput,
    load_image,
    preprocess,
    resized_hw,
)

from conftest import encode, exif

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255,) * 3
SIZE = (64, 48)  # (width, height) of the upright pattern
CENTRES = {(16, 12): RED, (48, 12): GREEN, (16, 36): BLUE, (48, 36): YELLOW}


def pattern() -> Image.Image:
    """64 x 48 RGB, four coloured quadrants: asymmetric under all eight EXIF transforms."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:24, :32], pixels[:24, 32:] = RED, GREEN
    pixels[24:, :32], pixels[24:, 32:] = BLUE, YELLOW
    return Image.fromarray(pixels)


def stored_for(orientation: int) -> Image.Image:
    """The pixels a camera stores so that EXIF ``orientation`` displays ``pattern()`` upright.

    Written with numpy from the EXIF definitions, independently of Pillow's transpose table.
    """
    up = np.asarray(pattern())
    stored = {
        1: up,
        2: up[:, ::-1],
        3: up[::-1, ::-1],
        4: up[::-1],
        5: up.transpose(1, 0, 2),
        6: np.rot90(up, 1),  # display turns it 90 degrees clockwise
        7: np.rot90(up, 2).transpose(1, 0, 2),
        8: np.rot90(up, -1),
    }[orientation]
    return Image.fromarray(np.ascontiguousarray(stored))


def assert_pattern(image: Image.Image, tolerance: int = 0) -> None:
    assert image.mode == "RGB" and image.size == SIZE
    for (x, y), colour in CENTRES.items():
        got = np.array(image.getpixel((x, y)), dtype=int)
        assert np.abs(got - colour).max() <= tolerance, ((x, y), tuple(got), colour)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR (with a correct CRC) claims width x height."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def png_rgb48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = rgb16.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "tolerance"),
    [
        ("JPEG", {"quality": 95}, 16),
        ("PNG", {}, 0),
        ("WEBP", {"quality": 90}, 16),
        ("WEBP", {"lossless": True}, 0),
        ("HEIF", {"quality": 90}, 16),
        ("AVIF", {"quality": 90}, 16),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("GIF", {}, 0),
    ],
)
def test_each_format_decodes_to_the_right_pixels(fmt, options, tolerance):
    assert_pattern(load_image(encode(pattern(), fmt, **options)), tolerance)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_of_a_jpeg_comes_out_upright(orientation):
    data = encode(stored_for(orientation), "JPEG", quality=95, exif=exif(orientation))
    assert_pattern(load_image(data), tolerance=16)


@pytest.mark.parametrize(
    ("fmt", "tolerance"), [("PNG", 0), ("WEBP", 16), ("TIFF", 0), ("HEIF", 16), ("AVIF", 16)]
)
def test_orientation_is_applied_exactly_once_in_other_formats(fmt, tolerance):
    # HEIF and TIFF decoders already turn the pixels (and reset the tag): no second turn.
    options = {"quality": 90} if fmt in {"WEBP", "HEIF", "AVIF"} else {}
    assert_pattern(load_image(encode(stored_for(6), fmt, exif=exif(6), **options)), tolerance)


def test_heic_registration_is_lazy_and_works_without_the_caller(tmp_path):
    path = tmp_path / "photo.heic"
    path.write_bytes(encode(stored_for(8), "HEIF", quality=90, exif=exif(8)))
    script = (
        "import sys; from PIL import Image; import detr_viz.image as m\n"
        "assert 'HEIF' not in Image.OPEN, 'registered at import'\n"
        "im = m.load_image(sys.argv[1]); print(*im.size, *im.getpixel((16, 12)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=root
    )
    assert done.returncode == 0, done.stderr
    width, height, *colour = map(int, done.stdout.split())
    assert (width, height) == SIZE and np.abs(np.array(colour) - RED).max() <= 16


def test_heic_loads_from_many_threads_at_once():
    data = encode(pattern(), "HEIF", quality=90)
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(load_image, [data] * 16))
    for image in images:
        assert_pattern(image, tolerance=16)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(fmt):
    frames = [Image.new("RGB", SIZE, colour) for colour in (RED, BLUE, GREEN)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert np.abs(pixels(load_image(data)).astype(int) - RED).max() <= 16


def test_cmyk_jpeg_is_converted_with_adobe_inversion():
    data = encode(pattern().convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None
    assert_pattern(load_image(data), tolerance=16)


def test_cielab_tiff_is_converted_to_rgb():
    data = encode(pattern().convert("LAB"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    assert_pattern(load_image(data), tolerance=24)


@pytest.mark.parametrize(
    ("mode", "tolerance"),
    # 8-bit CIELAB itself loses up to ~22 levels on pure blue, so LAB gets a wide tolerance.
    [("P", 0), ("YCbCr", 3), ("LAB", 24), ("HSV", 3), ("RGBX", 0), ("CMYK", 0)],
)
def test_colour_modes_are_converted_to_rgb(mode, tolerance):
    assert_pattern(load_image(pattern().convert(mode)), tolerance)


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("L", "JPEG"), ("1", "BMP"), ("1", "PNG")])
def test_grey_and_bilevel_images_become_grey_rgb(mode, fmt):
    source = Image.fromarray(np.array([[0, 255] * 8] * 8, np.uint8)).convert(mode)
    out = pixels(load_image(encode(source, fmt)))
    assert out.shape == (8, 16, 3) and (out[..., 0] == out[..., 1]).all()
    assert (out[:, 0::2] <= 8).all() and (out[:, 1::2] >= 247).all()


# --- transparency ----------------------------------------------------------------------------


def half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent (red or grey underneath), right half opaque blue or black."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)
    rgba[:, 4:] = (0, 0, 255, 255)
    image = Image.fromarray(rgba)
    return image.convert("LA") if mode == "LA" else image


@pytest.mark.parametrize(("mode", "fmt"), [("RGBA", "PNG"), ("RGBA", "WEBP"), ("LA", "PNG")])
def test_transparent_pixels_become_white(mode, fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    out = pixels(load_image(encode(half_transparent(mode), fmt, **options)))
    assert (out[:, :4] == WHITE).all()
    assert (out[:, 4:] == ((0, 0, 255) if mode == "RGBA" else (29, 29, 29))).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))
    out = pixels(load_image(encode(palette, fmt, transparency=0)))
    assert (out[:, :4] == WHITE).all() and (out[:, 4:] == BLUE).all()


@pytest.mark.parametrize("mode", ["PA", "RGBa", "La"])
def test_other_alpha_modes_become_white_where_transparent(mode):
    image = half_transparent("RGBA").convert("LA" if mode == "La" else "RGBA").convert(mode)
    out = pixels(load_image(image))
    assert (out[:, :4] == WHITE).all() and (out[:, 4:, 2] >= 29).all()


def test_fully_transparent_png_is_all_white_and_half_alpha_blends():
    clear = Image.new("RGBA", (5, 3), (0, 0, 0, 0))
    assert (pixels(load_image(encode(clear, "PNG"))) == 255).all()
    half = Image.new("RGBA", (5, 3), (0, 0, 0, 128))
    assert np.abs(pixels(load_image(encode(half, "PNG"))).astype(int) - 127).max() <= 1


# --- bit depth ---------------------------------------------------------------------------------

SIXTEEN = np.array([[65535, 32768, 0, 257, 32896, 128]], np.uint16)
EIGHT = [255, 128, 0, 1, 128, 0]  # round(v / 257)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_files_are_divided_by_257(fmt):
    data = encode(Image.fromarray(SIXTEEN), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert pixels(load_image(data))[0, :, 0].tolist() == EIGHT


@pytest.mark.parametrize(
    "image",
    [
        Image.frombytes("I;16B", (6, 1), SIXTEEN.astype(">u2").tobytes()),
        Image.frombytes("I;16L", (6, 1), SIXTEEN.astype("<u2").tobytes()),
        Image.fromarray(SIXTEEN.astype(np.int32)),  # mode "I" holding 16-bit values
    ],
    ids=["I;16B", "I;16L", "I"],
)
def test_16_bit_modes_are_divided_by_257(image):
    assert pixels(load_image(image))[0, :, 0].tolist() == EIGHT


@pytest.mark.parametrize("source", ["PNG", "I"])
def test_16_bit_grey_transparent_value_becomes_white(source):
    # tRNS names one exact 16-bit sample (1000, dark grey); its neighbour 1001 rounds to the
    # same 8-bit value (4) but is opaque, so the mask must come from the 16-bit samples
    grey = np.array([[1000, 1001, 65535, 1000, 0]], np.uint16)
    if source == "PNG":
        data = encode(Image.fromarray(grey), "PNG", transparency=1000)
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
        image = load_image(data)
    else:
        wide = Image.fromarray(grey.astype(np.int32))
        wide.info["transparency"] = 1000
        image = load_image(wide)
    assert pixels(image)[0, :, 0].tolist() == [255, 4, 255, 255, 0]


def test_mode_i_holding_8_bit_values_is_kept_as_is():
    image = Image.fromarray(np.array([[0, 7, 200, 255]], np.int32))
    assert image.mode == "I"
    assert pixels(load_image(image))[0, :, 1].tolist() == [0, 7, 200, 255]


def test_16_bit_rgb_png_keeps_its_colour():
    rgb16 = np.array([[[65535, 32896, 257], [0, 65535, 0]]], np.uint16)
    assert pixels(load_image(png_rgb48(rgb16))).tolist() == [[[255, 128, 1], [0, 255, 0]]]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # all in [0, 1]: scaled by 255
        ([-5.0, 100.4, 254.6, 300.0], [0, 100, 255, 255]),  # otherwise clipped to [0, 255]
    ],
)
def test_float_tiff_rule(values, expected):
    data = encode(Image.fromarray(np.array([values], np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert pixels(load_image(data))[0, :, 0].tolist() == expected


def test_a_48_megapixel_photo_is_accepted_and_preprocessed():
    data = encode(Image.new("RGB", (8000, 6000), (10, 200, 30)), "JPEG", quality=80)
    image = load_image(data)
    assert image.size == (8000, 6000) and image.getpixel((4000, 3000)) == pytest.approx(
        (10, 200, 30), abs=4
    )
    model_input = preprocess(image)
    assert model_input.input_size == (1066, 800)
    assert model_input.tensor.shape == (1, 3, 800, 1066)


# --- inputs -----------------------------------------------------------------------------------


class Upload:
    """Like Streamlit's UploadedFile: the whole file from getvalue(), whatever was read."""

    def __init__(self, data: bytes):
        self._data = data

    def getvalue(self) -> bytes:
        return self._data


class ReadOnly:
    def __init__(self, data: bytes):
        self.read = io.BytesIO(data).read


def test_every_kind_of_source_gives_the_same_image(tmp_path):
    data = encode(stored_for(6), "JPEG", quality=90, exif=exif(6))
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    consumed = io.BytesIO(data)
    consumed.read()  # getvalue() still sees everything
    with open(path, "rb") as handle:
        from_handle = load_image(handle)
    with Image.open(path) as opened:
        from_pil = load_image(opened)
        assert opened.size == (48, 64)  # the caller's image is not modified
    sources = [
        data,
        bytearray(data),
        memoryview(data),
        str(path),
        path,
        consumed,
        Upload(data),
        ReadOnly(data),
    ]
    expected = pixels(load_image(data))
    for result in [*map(load_image, sources), from_handle, from_pil]:
        assert np.array_equal(pixels(result), expected)
    assert expected.shape == (48, 64, 3)


def test_result_is_fully_loaded_and_independent_of_the_source(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", SIZE, colour) for colour in (RED, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = load_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == RED and image.resize((4, 4)).mode == "RGB"


# --- errors -----------------------------------------------------------------------------------


def assert_refused(source, *words, **options) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(source, **options)
    message = str(caught.value)
    assert isinstance(caught.value, DetrVizError) and isinstance(caught.value, ValueError)
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def test_empty_input_is_refused_with_advice(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for source in (b"", empty, io.BytesIO()):
        message = assert_refused(source, "empty (0 bytes)", "JPEG, PNG, HEIC or WebP")
    assert message.startswith("The file is empty")


def test_non_images_are_refused(tmp_path):
    assert_refused(np.random.default_rng(0).bytes(2000), "not an image", "JPEG")
    text = tmp_path / "notes.txt"
    text.write_text("Shopping list:\n- eggs\n- milk\n")
    assert_refused(text, "text, not an image")
    assert_refused(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not an image")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF"])
def test_truncated_files_are_refused(fmt, fraction):
    options = {"quality": 90} if fmt != "PNG" else {}
    data = encode(noise(96, 64), fmt, **options)
    assert_refused(data[: int(len(data) * fraction)], "damaged")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("fmt", "name"),
    [("TIFF", "TIFF"), ("PNG", "PNG"), ("WEBP", "WebP"), ("HEIF", "HEIC"), ("AVIF", "AVIF")],
)
def test_a_cut_off_header_names_the_format(fmt, name):
    data = encode(noise(96, 64), fmt, **({"compression": "tiff_lzw"} if fmt == "TIFF" else {}))
    assert_refused(data[:40], f"starts like a {name} image", "damaged or incomplete")


def test_paths_that_are_not_files_are_refused(tmp_path):
    assert_refused(tmp_path / "missing.jpg", "no file at", "missing.jpg")
    assert_refused(str(tmp_path), "is a folder")


@pytest.mark.parametrize(
    ("source", "words"),
    [
        (42, ["of type int"]),
        (None, ["of type NoneType"]),
        (io.StringIO("hello"), ["text mode", "'rb'"]),
        (Image.new("RGB", (0, 7)), ["no pixels", "0 × 7"]),
        (png_claiming(0, 10), []),
    ],
    ids=["int", "None", "text-mode", "zero-width-pil", "zero-width-png"],
)
def test_unusable_sources_are_refused(source, words):
    assert_refused(source, *words)


def test_a_decompression_bomb_is_refused_from_the_header(monkeypatch):
    """Refused before any pixel is decoded (asserted, not timed: timing depends on the host)."""
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: decoded.append(1))
    assert_refused(png_claiming(100_000, 100_000), "10,000,000,000 pixels", "decompression bomb")
    assert not decoded


def test_images_over_max_pixels_are_refused_before_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert_refused(png_claiming(12_000, 11_000), "12000 × 11000", "132,000,000", "max_pixels")
    assert_refused(encode(pattern(), "PNG"), "64 × 48", "limit of 3,000", max_pixels=3000)
    assert_pattern(load_image(encode(pattern(), "PNG"), max_pixels=64 * 48))
    assert MAX_PIXELS == 120_000_000


def test_pillow_bomb_warning_raised_as_error_becomes_an_image_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert_refused(png_claiming(12_000, 11_000), "132,000,000 pixels")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1000"])
def test_bad_max_pixels_is_an_argument_error(bad):
    with pytest.raises(ArgumentError, match="max_pixels"):
        load_image(encode(pattern(), "PNG"), max_pixels=bad)


def test_heic_without_pillow_heif_says_how_to_install(monkeypatch):
    import detr_viz.image as module

    monkeypatch.setattr(module, "_ensure_heif_opener", lambda: False)
    data = encode(pattern(), "HEIF", quality=50)
    broken = data[:40] + bytes(len(data) - 40)
    assert_refused(broken, "pip install pillow-heif")


SEEDS = {
    fmt: encode(noise(12, 10), fmt, **options)
    for fmt, options in [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {}),
        ("HEIF", {}),
        ("AVIF", {}),
    ]
}


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
    keep=st.floats(0.0, 1.0),
)
def test_damaged_files_give_an_image_or_an_image_error_never_anything_else(fmt, edits, keep):
    data = bytearray(SEEDS[fmt])
    for offset, value in edits:
        data[offset % len(data)] = value
    try:
        image = load_image(bytes(data[: max(1, int(len(data) * keep))]), max_pixels=100_000)
    except ImageError:
        return
    assert image.mode == "RGB" and min(image.size) > 0


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_image_error(data):
    with contextlib.suppress(ImageError):
        load_image(data, max_pixels=100_000)


# --- DETR resize rule --------------------------------------------------------------------------


def official_size(w, h, size, max_size):
    """facebookresearch/detr datasets/transforms.py get_size_with_aspect_ratio, verbatim."""
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (640, 480, (800, 1066)),
        (4032, 3024, (800, 1066)),
        (3024, 4032, (1066, 800)),
        (1066, 800, (800, 1066)),
        (1, 1, (800, 800)),
        (800, 800, (800, 800)),
        (2000, 1000, (666, 1332)),  # round(666.5) == 666 in Python
        (20000, 20, (1, 1000)),
        (2000, 1, (1, 2000)),  # the official rounding lets the long side pass max_size
        (200_000, 1, (1, 1)),  # the official rule gives (0, 0); clamped
        (1, 200_000, (1, 1)),
    ],
)
def test_resized_hw_known_cases(width, height, expected):
    assert resized_hw(width, height) == expected


def test_resized_hw_without_a_cap_and_with_other_sizes():
    assert resized_hw(20000, 20, max_size=None) == (800, 800_000)
    assert resized_hw(640, 480, short_side=480, max_size=None) == (480, 640)
    assert resized_hw(640, 480, short_side=600, max_size=700) == (525, 700)


@settings(max_examples=500, deadline=None)
@given(
    width=st.integers(1, 300_000),
    height=st.integers(1, 300_000),
    short_side=st.integers(1, 2000),
    max_size=st.none() | st.integers(1, 5000),
)
def test_resized_hw_is_the_official_rule_clamped_to_one(width, height, short_side, max_size):
    expected = tuple(max(1, side) for side in official_size(width, height, short_side, max_size))
    assert resized_hw(width, height, short_side, max_size) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 0},
        {"height": -3},
        {"width": 2.0},
        {"short_side": 0},
        {"short_side": True},
        {"max_size": 0},
        {"max_size": "1333"},
    ],
)
def test_resized_hw_rejects_bad_arguments(kwargs):
    arguments = {"width": 640, "height": 480, **kwargs}
    with pytest.raises(ArgumentError, match="positive integer"):
        resized_hw(**arguments)


def test_resized_hw_accepts_numpy_integers():
    assert resized_hw(np.int64(640), np.int32(480)) == (800, 1066)


# --- ModelInput and preprocess ---------------------------------------------------------------


def reference_transform(image: Image.Image, short_side=800, max_size=1333) -> torch.Tensor:
    """DETR's eval transform via torchvision: RandomResize([800], 1333), ToTensor, Normalize."""
    size = official_size(image.width, image.height, short_side, max_size)
    tensor = TF.to_tensor(TF.resize(image, list(size)))
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)


@pytest.mark.parametrize(
    ("size", "short_side", "max_size"),
    [
        ((97, 61), 800, 1333),
        ((1500, 1000), 800, 1333),
        ((1066, 800), 800, 1333),
        ((333, 500), 480, 640),
    ],
)
def test_preprocess_matches_torchvision(size, short_side, max_size):
    image = noise(*size, seed=size[0])
    model_input = preprocess(image, short_side, max_size)
    expected = reference_transform(image, short_side, max_size)
    assert model_input.tensor.dtype == torch.float32
    torch.testing.assert_close(model_input.tensor, expected, atol=1e-6, rtol=0)
    assert model_input.input_size == (expected.shape[3], expected.shape[2])
    assert model_input.original_size == size


def test_preprocess_refuses_what_load_image_should_have_fixed():
    for image in (Image.new("RGBA", (4, 4)), Image.new("L", (4, 4)), np.zeros((4, 4, 3))):
        with pytest.raises(ImageError, match="load_image"):
            preprocess(image)
    with pytest.raises(ArgumentError):
        preprocess(Image.new("RGB", (4, 4)), short_side=0)


def test_model_input_scale_and_corners():
    model_input = preprocess(Image.new("RGB", (640, 480)))
    assert model_input.original_size == (640, 480) and model_input.input_size == (1066, 800)
    assert model_input.scale == (1066 / 640, 800 / 480)
    assert model_input.to_input(0, 0) == (0, 0)
    assert model_input.to_input(640, 480) == (1066, 800)
    assert model_input.to_original(1066, 800) == (640, 480)
    xs, ys = model_input.to_input(np.array([0.0, 320.0]), np.array([0.0, 240.0]))
    assert np.allclose(xs, [0, 533]) and np.allclose(ys, [0, 400])


@given(
    width=st.integers(1, 5000),
    height=st.integers(1, 5000),
    x=st.floats(0, 1, allow_nan=False),
    y=st.floats(0, 1, allow_nan=False),
)
def test_model_input_round_trip(width, height, x, y):
    new_h, new_w = resized_hw(width, height)
    record = ModelInput(torch.zeros(1, 3, new_h, new_w), (width, height), (new_w, new_h))
    point = (x * width, y * height)
    assert record.to_original(*record.to_input(*point)) == pytest.approx(point, abs=1e-9)
    mapped = record.to_input(*point)
    assert 0 <= mapped[0] <= new_w * (1 + 1e-12) and 0 <= mapped[1] <= new_h * (1 + 1e-12)


def test_model_input_checks_its_shapes():
    with pytest.raises(ArgumentError, match="tensor shape"):
        ModelInput(torch.zeros(1, 3, 10, 20), (40, 20), (10, 20))
    with pytest.raises(ArgumentError, match="original_size"):
        ModelInput(torch.zeros(1, 3, 10, 20), (0, 20), (20, 10))


def test_postscript_and_other_non_photo_formats_are_refused(tmp_path):
    """EPS would be handed to Ghostscript; detr-viz only opens raster photo formats."""
    path = tmp_path / "drawing.eps"
    Image.new("RGB", (8, 8), "red").save(path, format="EPS")
    with pytest.raises(ImageError):
        load_image(path)
