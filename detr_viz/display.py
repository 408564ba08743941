"""The photo as the browser sees it: a downsized JPEG, and clicks on it mapped back.

Figures draw the photo in ORIGINAL-pixel coordinates (x in [0, W], y in [0, H], y down)
whatever its display size, so a 4032x3024 photo can travel as a 1024x768 JPEG without moving
anything drawn over it. ``display_to_original`` maps a click on a displayed pixel back into
that frame.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

from PIL import Image

from detr_viz.errors import ArgumentError


@dataclass(frozen=True)
class DisplayImage:
    """A photo encoded for the browser.

    ``source``: a ``data:image/jpeg;base64,...`` URI; ``display_size``: (w, h) of that JPEG;
    ``original_size``: (W, H) of the photo it stands for, in original pixels.
    """

    source: str
    display_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def pixel_size(self) -> tuple[float, float]:
        """(dx, dy): original pixels per displayed pixel along x and y."""
        (w, h), (width, height) = self.display_size, self.original_size
        return width / w, height / h


def jpeg_bytes(
    image: Image.Image, max_side: int = 1024, quality: int = 85
) -> tuple[bytes, tuple[int, int]]:
    """``image`` as JPEG bytes, its longer side at most ``max_side`` (never enlarged).

    Returns (jpeg, (w, h)): the encoded bytes and the encoded size in pixels. Each side is
    rounded separately, so the aspect ratio is kept to within a pixel. Non-RGB images are
    converted to RGB first.
    """
    if not isinstance(max_side, int) or max_side < 1:
        raise ArgumentError(f"max_side must be a positive integer, not {max_side!r}.")
    if not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ArgumentError(f"quality must be an integer from 1 to 95, not {quality!r}.")
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), size


def display_image(image: Image.Image, max_side: int = 1024, quality: int = 85) -> DisplayImage:
    """Downsize (never upsize) the RGB photo ``image`` and encode it as a JPEG data URI."""
    data, size = jpeg_bytes(image, max_side, quality)
    source = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    return DisplayImage(source=source, display_size=size, original_size=image.size)


def display_to_original(
    x: float, y: float, display_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[float, float]:
    """Map a click on displayed pixel (x, y) to continuous original-pixel coordinates.

    ``x``, ``y`` are pixel indices on the displayed image of ``display_size`` (w, h), as a
    click component reports them; the pixel's centre is taken: ``(x + 0.5) * W / w``. The
    result is clamped into [0, W] x [0, H] of ``original_size`` (W, H), so a click on the
    border (or a rounding overshoot) still lands on the photo.
    """
    (w, h), (width, height) = display_size, original_size
    if min(w, h, width, height) <= 0:
        raise ArgumentError(f"sizes must be positive: display {display_size}, "
                            f"original {original_size}.")
    ox = min(max((x + 0.5) * width / w, 0.0), float(width))
    oy = min(max((y + 0.5) * height / h, 0.0), float(height))
    return ox, oy


def pixel_box(
    box: tuple[float, float, float, float], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The inclusive pixel rectangle (x0, y0, x1, y1) covering ``box`` on an image of ``size``.

    ``box`` (x0, y0, x1, y1) is continuous, in that image's pixels (pixel i spans [i, i + 1));
    ``size`` is its (w, h). The result is what ``ImageDraw.rectangle`` and ``ellipse`` take, for
    any box: clipped to the image, at least one pixel, x0 <= x1 and y0 <= y1 (a sliver thinner
    than a pixel, a box past the edge or turned inside out becomes the nearest pixel). Raises
    ``ArgumentError`` for an empty image or a box that is not finite.
    """
    (w, h), (x0, y0, x1, y1) = size, box
    if min(w, h) <= 0:
        raise ArgumentError(f"cannot draw on an image of {w}x{h} pixels.")
    if not all(math.isfinite(v) for v in box):
        raise ArgumentError(f"box {box} is not finite.")
    left, right = _pixel_span(x0, x1, w)
    top, bottom = _pixel_span(y0, y1, h)
    return left, top, right, bottom


def _pixel_span(a: float, b: float, n: int) -> tuple[int, int]:
    """First and last pixel of [a, b) on a line of n pixels, clamped, first <= last."""
    first = min(max(math.floor(min(a, b)), 0), n - 1)
    last = min(max(math.ceil(max(a, b)) - 1, 0), n - 1)
    return first, max(first, last)
