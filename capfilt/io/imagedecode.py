"""Decoding image bytes to RGB with Pillow alone (no torch), for the download workers and the
model's transforms (capfilt.model.transforms re-exports `decode_image`)."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["decode_image"]

logger = logging.getLogger(__name__)


_OBJECT_REPR = re.compile(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes (JPEG, PNG, WebP, GIF, ...) to an RGB PIL image, EXIF orientation applied.

    Transparency is composited onto white; 16-bit and 32-bit grayscale are scaled to 8 bits (not
    clipped); palette, CMYK and grayscale are converted to RGB. Raises ``ValueError`` saying why
    for empty, truncated, unrecognised or oversized (decompression bomb) input, so callers can
    record the reason on the row and go on.
    """
    if not data:
        raise ValueError("cannot decode image: no bytes (empty or None)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return _to_rgb(_apply_exif_orientation(opened))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        head = bytes(data[:8]).hex()
        # Pillow names the stream object ("<_io.BytesIO object at 0x7f...>"): an address that
        # differs per run would make the same bad image's reason differ between runs.
        message = _OBJECT_REPR.sub("", str(err)).rstrip()
        raise ValueError(
            f"cannot decode image ({len(data)} bytes, starting {head}): {type(err).__name__}: {message}"
        ) from err


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """A new image turned upright per its EXIF tag; a malformed tag is ignored, not fatal."""
    try:
        upright = ImageOps.exif_transpose(image)  # a copy even when there is nothing to turn
    except Exception as err:  # Pillow raises assorted types on broken EXIF; the pixels are still fine
        logger.debug("ignoring unreadable EXIF orientation: %s", err)
        upright = None
    return upright if upright is not None else image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(image)).convert("RGB")  # uint8 (H, W) -> "L"
    return image.convert("RGB")


def _scale_to_uint8(image: Image.Image) -> np.ndarray:
    """High bit-depth grayscale to uint8: Pillow's own convert clips at 255, turning most pixels white."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif image.mode == "F":
        peak = float(array.max(initial=0.0))
        scaled = array * 255.0 if peak <= 1.0 else array.astype(np.float64)
    else:  # "I": 32-bit ints, in practice 16-bit PNG data or already 8-bit
        peak = float(array.max(initial=0))
        scaled = array / 257.0 if peak > 255 else array.astype(np.float64)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
