"""What the download stage checks in image bytes before img2dataset's resizer decodes them.

img2dataset decodes with OpenCV and checks `max_image_area` only after decoding, so a small file
that declares a huge canvas (a decompression bomb) is decoded into memory first: up to OpenCV's own
limit of 2**30 pixels, gigabytes per image. OpenCV also clips 16-bit images to white when it
encodes them as 8-bit JPEG, and writes grayscale images as grayscale JPEGs.

`GuardedResizer` wraps img2dataset's resizer. It reads the image's header with Pillow (no
decoding), refuses an empty body, a declared area over `max_image_area` and a JPEG cut short, and
converts anything but a plain 8-bit RGB JPEG/PNG/WebP (alpha, 16-bit, palette, grayscale, CMYK,
animated GIF) to 8-bit RGB with `capfilt.io.imagedecode.decode_image` (transparency onto white, the
first frame) before the resizer sees it. Data Pillow cannot identify (HTML, random bytes, a JPEG
cut inside its headers, formats only OpenCV reads) fails as "not a recognised image format".
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from capfilt.io.imagedecode import decode_image

# What the resizer returns: encoded image, width, height, original width, original height, error.
ResizeResult = tuple[bytes | None, int | None, int | None, int | None, int | None, str | None]

_PASS_THROUGH_FORMATS = ("JPEG", "PNG", "WEBP")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Reasons are constant strings, so that the per-shard reason counts add up across images.
NOT_AN_IMAGE = "not a recognised image format"
TOO_LARGE = "image area too large"  # img2dataset's words for the same thing, after decoding
TOO_LARGE_FOR_PILLOW = "image area too large (over Pillow's decompression-bomb limit)"
EMPTY = "empty image body (0 bytes)"
TRUNCATED_JPEG = "truncated JPEG (no end-of-image marker)"


def _failed(reason: str) -> ResizeResult:
    return None, None, None, None, None, reason


def jpeg_is_truncated(data: bytes) -> bool:
    """A JPEG whose end-of-image marker is missing after its last scan: cut short in transit.
    (Entropy-coded data never holds FF D9, so a whole file always has one after its SOS.)"""
    sos = data.rfind(b"\xff\xda")
    return sos < 0 or data.find(b"\xff\xd9", sos) < 0


def _png_bit_depth(data: bytes) -> int | None:
    return data[24] if data.startswith(_PNG_MAGIC) and len(data) > 24 else None


def inspect(data: bytes, max_image_area: float) -> tuple[str | None, bool]:
    """(why the image must fail, or None; whether it needs converting to 8-bit RGB first),
    from the header alone."""
    if not data:
        return EMPTY, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header, decodes nothing
    except Image.DecompressionBombError:
        return TOO_LARGE_FOR_PILLOW, False
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        # Not an image format Pillow knows (every web format is). OpenCV would try a few more,
        # Radiance HDR among them, whose declared size it does not check against ours.
        return NOT_AN_IMAGE, False
    with img:
        width, height = img.size
        if width * height > max_image_area:
            return TOO_LARGE, False
        fmt = img.format or ""
        if fmt == "JPEG" and jpeg_is_truncated(data):
            return TRUNCATED_JPEG, False
        plain = (
            fmt in _PASS_THROUGH_FORMATS
            and img.mode == "RGB"
            and "transparency" not in img.info
            and getattr(img, "n_frames", 1) == 1
            and _png_bit_depth(data) in (None, 8)
        )
    return None, not plain


def to_rgb_png(data: bytes) -> bytes:
    """Decode with Pillow to 8-bit RGB (see decode_image) and re-encode losslessly."""
    buf = io.BytesIO()
    decode_image(data).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class GuardedResizer:
    """img2dataset's resizer behind the checks above; called as img2dataset calls its resizer."""

    def __init__(self, inner: Any, max_image_area: float) -> None:
        self.inner = inner
        self.max_image_area = max_image_area

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> ResizeResult:
        img_stream.seek(0)
        data = img_stream.read()
        problem, convert = inspect(data, self.max_image_area)
        if problem:
            return _failed(problem)
        if convert:
            try:
                data = to_rgb_png(data)
            except ValueError as err:
                return _failed(str(err))
        result: ResizeResult = self.inner(io.BytesIO(data), blurring_bbox_list)
        return result
