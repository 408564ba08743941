"""From what a user hands over to DETR's input: an upright 8-bit RGB image, then a tensor.

``load_image`` decodes anything image-like or raises an ``ImageError`` saying what to do;
``preprocess`` is facebookresearch/detr's evaluation transform, exactly, plus the pixel map.
"""

from __future__ import annotations

import functools
import io
import numbers
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detr_viz.errors import ArgumentError, ImageError

MAX_PIXELS = 120_000_000  # default limit on width * height, checked before decoding
# Raster formats a photo can come in. Others Pillow knows (EPS runs Ghostscript, WMF, FITS,
# GRIB, ...) are refused as "not an image" rather than handed to their decoders.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "GIF", "BMP", "DIB", "TIFF", "ICO",
                 "TGA", "PPM", "QOI", "JPEG2000")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO | Image.Image

_CHOOSE = "Choose a photo file such as JPEG, PNG, HEIC or WebP."
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_BRANDS = {b"WEBP": "WebP", b"avif": "AVIF", b"avis": "AVIF"} | dict.fromkeys(_HEIF_BRANDS, "HEIC")
_MAGIC = [(b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP")]
_MAGIC += [(b"II*\0", "TIFF"), (b"MM\0*", "TIFF")]
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_STRIP_ROWS = 256
_HEIF_LOCK = threading.Lock()


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``source`` into an upright, fully loaded 8-bit ``RGB`` PIL image.

    ``source``: image bytes (``bytes``/``bytearray``/``memoryview``), a path (``str`` or
    ``os.PathLike``), a binary file object (``getvalue()`` is preferred, else ``read()`` from
    the current position; a Streamlit upload works) or a PIL image (left unmodified).
    Formats: JPEG, PNG, WebP, HEIC/HEIF, AVIF, BMP, TIFF, GIF; animations give their first frame.
    Returns mode ``RGB``, size (width, height) in upright pixels: the EXIF orientation is applied
    once, transparency is composited on white, 16-bit samples are divided by 257 and rounded,
    mode ``I`` is read as 16-bit when any value exceeds 255 (else as 8-bit), mode ``F`` is
    scaled by 255 when all values lie in [0, 1] and otherwise clipped to [0, 255] (NaN -> 0).
    Colour profiles are ignored (pixels are taken as sRGB). Sources are read into memory first;
    the result holds no file and no encoded bytes.
    Raises ``ImageError`` for every unusable input, including more than ``max_pixels`` pixels
    (refused from the header, before decoding; Pillow's own limit, 2 * Image.MAX_IMAGE_PIXELS,
    still applies), and ``ArgumentError`` for a bad ``max_pixels``.
    """
    _positive_int("max_pixels", max_pixels)
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels)
        return _upright_rgb(source, "image", in_place=False)
    return _decode(_read_source(source), max_pixels)


def _read_source(source: object) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(os.fsdecode(source)))
    reader = getattr(source, "getvalue", None) or getattr(source, "read", None)
    if not callable(reader):
        raise ImageError(
            f"Cannot read an image from an object of type {type(source).__name__}. Pass image "
            "bytes, a file path, a file opened in binary mode ('rb'), an upload or a PIL image."
        )
    try:
        data = reader()
    except (OSError, ValueError) as exc:
        raise ImageError(f"Could not read the file ({exc}). Upload or open it again.") from exc
    if isinstance(data, str):
        raise ImageError("The file was opened in text mode; open it in binary mode ('rb').")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"Reading the file gave a {type(data).__name__}, not bytes. {_CHOOSE}")
    return bytes(data)


def _read_path(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"There is no file at '{path}'. Check the path and try again.") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"'{path}' is a folder, not an image file. {_CHOOSE}") from exc
    except PermissionError as exc:
        raise ImageError(f"No permission to read '{path}'. Check its permissions.") from exc
    except (OSError, ValueError) as exc:
        raise ImageError(f"Could not read '{path}' ({exc}). Check the path.") from exc


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(f"The file is empty (0 bytes). {_CHOOSE}")
    heif = _ensure_heif_opener()
    with io.BytesIO(data) as buffer:  # closed on return: the result keeps no encoded bytes
        try:
            image = Image.open(buffer, formats=PHOTO_FORMATS)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(_too_large(str(exc), max_pixels)) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(_not_an_image(data, heif)) from exc
        except Exception as exc:  # plugins raise anything on a malformed header
            raise ImageError(_not_an_image(data, heif, exc)) from exc
        _check_size(image.size, max_pixels)
        return _upright_rgb(image, f"{image.format or 'image'} file", in_place=True)


def _ensure_heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow once (thread-safe); True if present."""
    with _HEIF_LOCK:
        return _register_heif_opener()


@functools.cache
def _register_heif_opener() -> bool:
    try:
        from pillow_heif import register_heif_opener
    except (ImportError, OSError):
        return False
    register_heif_opener()  # decodes upright and resets EXIF orientation to 1: no double turn
    return True


def _check_size(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"The image has no pixels ({width} × {height}). {_CHOOSE}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"The image is {width} × {height} = {width * height:,} pixels, more than the limit "
            f"of {max_pixels:,}; it is refused before decoding to protect memory. Downscale it "
            "(a 48-megapixel phone photo is fine); in the library, load_image(..., max_pixels=) "
            "takes a larger limit for a file you trust."
        )


def _too_large(pil_message: str, max_pixels: int) -> str:
    found = re.search(r"\((\d+) pixels\)", pil_message)
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (
        f"The image claims {size}, more than can be decoded safely (it may be a decompression "
        f"bomb). Use an image of at most {max_pixels:,} pixels."
    )


def _not_an_image(data: bytes, heif_available: bool, error: Exception | None = None) -> str:
    brand = data[8:12] if data[:4] == b"RIFF" or data[4:8] == b"ftyp" else b""
    if brand in _HEIF_BRANDS and not heif_available:
        return (
            "This is a HEIC/HEIF photo, but HEIC support is not installed: run "
            "'pip install pillow-heif', or export the photo as JPEG."
        )
    text = data[:1024].decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return f"The file contains text, not an image. {_CHOOSE}"
    known = _BRANDS.get(brand) or next((n for m, n in _MAGIC if data.startswith(m)), None)
    if known:
        return (
            f"The file starts like a {known} image but is damaged or incomplete. Re-save or "
            "re-download it and try again."
        )
    if error is not None:
        return f"The image header is damaged ({error}). {_CHOOSE}"
    return f"The file is not an image in a format we can read. {_CHOOSE}"


def _upright_rgb(image: Image.Image, kind: str, *, in_place: bool) -> Image.Image:
    try:
        image.load()
    except MemoryError as exc:
        raise ImageError(f"Not enough memory to decode this {kind}. Use a smaller image.") from exc
    except Exception as exc:
        raise ImageError(
            f"The {kind} is damaged or incomplete ({exc}). It may have been cut short while "
            "downloading or copying; re-save or re-download it and try again."
        ) from exc
    try:
        if in_place:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: keep the pixels as stored rather than refuse the photo
        image = image if in_place else image.copy()
    try:
        return _to_rgb(image)
    except MemoryError as exc:
        raise ImageError(f"Not enough memory to decode this {kind}. Use a smaller image.") from exc
    except Exception as exc:  # inconsistent colour data: a palette image without PLTE, say
        raise ImageError(
            f"The {kind} is damaged: its colours cannot be read "
            f"({str(exc) or type(exc).__name__}). Re-save or re-download it and try again."
        ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_gray8(image)
    if image.has_transparency_data:
        rgba = image.convert("LA") if image.mode == "La" else image
        rgba = rgba if rgba.mode == "RGBA" else rgba.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)  # "over" with straight alpha: a=0 -> white
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_gray8(image: Image.Image) -> Image.Image:
    """Map 16-bit ('I;16*', 'I') or float ('F') samples to 8-bit 'L', strip by strip.

    A transparent grey value (a PNG tRNS chunk: ``info["transparency"]``, an int) gives 'LA'
    with alpha 0 exactly where the stored sample equals it, so it goes on white like 8-bit grey.
    """
    factor = 1 / 257  # modes 'I;16*'
    if image.mode in ("F", "I"):
        low, high = image.getextrema()
        if image.mode == "F":
            factor = 255.0 if low >= 0.0 and high <= 1.0 else 1.0
        elif high <= 255:
            factor = 1.0
    key = image.info.get("transparency") if image.mode != "F" else None
    key = key if isinstance(key, int) and not isinstance(key, bool) else None
    width, height = image.size
    out = np.empty((height, width, 1 if key is None else 2), dtype=np.uint8)
    for top in range(0, height, _STRIP_ROWS):
        box = (0, top, width, min(top + _STRIP_ROWS, height))
        raw = np.asarray(image.crop(box), dtype=np.float64)
        rows = slice(top, top + raw.shape[0])
        out[rows, :, 0] = np.clip(np.nan_to_num(np.rint(raw * factor)), 0, 255)
        if key is not None:
            out[rows, :, 1] = np.where(raw == key, 0, 255)
    return Image.fromarray(out[..., 0], mode="L") if key is None else Image.fromarray(out)  # LA


def resized_hw(
    width: int, height: int, short_side: int = 800, max_size: int | None = 1333
) -> tuple[int, int]:
    """Return (new_height, new_width) in pixels of DETR's resize of a width × height image.

    Reproduces ``get_size_with_aspect_ratio`` in facebookresearch/detr ``datasets/transforms.py``
    exactly (the shorter side becomes ``short_side`` unless the longer side would exceed
    ``max_size``; ``max_size=None`` disables that cap), except that a side the original would
    round to 0 (strips thinner than about 1 : 2 * max_size) is clamped to 1.
    Raises ``ArgumentError`` unless every argument is a positive integer (``max_size`` may be None).
    """
    w, h = _positive_int("width", width), _positive_int("height", height)
    size = _positive_int("short_side", short_side)
    if max_size is not None:
        max_size = _positive_int("max_size", max_size)
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
    return (max(oh, 1), max(ow, 1))


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ArgumentError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


@dataclass(frozen=True, eq=False)
class ModelInput:
    """One image ready for DETR, with the map between its two pixel frames.

    ``tensor``: (1, 3, H, W) float32, ImageNet-normalised, in model-input pixels.
    ``original_size``: (width, height) of the upright original image, in pixels.
    ``input_size``: (width, height) = (W, H) of the resized image fed to the model, in pixels.
    Both frames use continuous coordinates, x right and y down, with pixel edges on integers,
    so the original spans 0..width by 0..height and a box maps by mapping its corners.
    """

    tensor: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    def __post_init__(self) -> None:
        (width, height), shape = self.input_size, tuple(self.tensor.shape)
        if min(*self.original_size, width, height) <= 0 or shape != (1, 3, height, width):
            raise ArgumentError(
                f"Inconsistent ModelInput: tensor shape {shape} must be (1, 3, H, W) with "
                f"input_size {self.input_size} = (W, H); original_size {self.original_size} > 0."
            )

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy) = (input width / original width, input height / original height)."""
        (w_in, h_in), (w, h) = self.input_size, self.original_size
        return (w_in / w, h_in / h)

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in original pixels to model-input pixels (numpy arrays work too)."""
        sx, sy = self.scale
        return (x * sx, y * sy)

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in model-input pixels to original pixels; inverse of ``to_input``."""
        sx, sy = self.scale
        return (x / sx, y / sy)


def preprocess(
    image: Image.Image, short_side: int = 800, max_size: int | None = 1333
) -> ModelInput:
    """DETR's evaluation transform of an upright ``RGB`` image (from ``load_image``).

    Equals torchvision ``resize`` to ``resized_hw(...)`` (Pillow BILINEAR, antialiased; skipped
    when the size already matches), ``to_tensor`` and ``normalize`` with ImageNet statistics.
    Resizes 8-bit pixels before any float copy. Returns a ``ModelInput``: (1, 3, H, W) float32.
    Raises ``ImageError`` unless ``image`` is a non-empty RGB PIL image; ``ArgumentError``.
    """
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ImageError("preprocess() needs an RGB PIL image; pass it through load_image().")
    _check_size(image.size, None)
    original_size = image.size
    new_h, new_w = resized_hw(image.width, image.height, short_side, max_size)
    if image.size != (new_w, new_h):  # as torchvision: PIL BILINEAR on 8-bit pixels
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3) uint8
    tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    tensor = tensor.sub_(mean).div_(std)
    return ModelInput(tensor.unsqueeze(0), original_size, (new_w, new_h))
