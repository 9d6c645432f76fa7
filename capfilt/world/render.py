"""Rendering a shapes-world scene to an RGB image."""

from __future__ import annotations

import hashlib
import math

from PIL import Image, ImageDraw

from capfilt.world.scene import RADIUS, Obj, Scene

# Saturated and far apart in hue, so that JPEG and resizing never move one into another.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 180),
    "orange": (250, 135, 15),
}

# Drawing at a multiple of the output size and downsampling antialiases the edges; beyond
# ~256 px of drawing the gain is invisible and only costs time.
_DRAW_PX = 256


def _background(image_id: str) -> tuple[int, int, int]:
    """A light, nearly neutral tint that varies by image, so the background alone carries no
    signal and no two images look pasted onto the same canvas."""
    h = hashlib.blake2b(image_id.encode(), digest_size=4).digest()
    base = 200 + h[0] % 36
    return (base + h[1] % 9 - 4, base + h[2] % 9 - 4, base + h[3] % 9 - 4)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, RADIUS[obj.size] * side
    fill = PALETTE[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        # A square inscribed in the bounding circle looks too small next to a circle of the same
        # radius; 0.85 r half-side gives both about the same visual weight.
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        # Equilateral, pointing up, inscribed in the bounding circle, lowered a little so its
        # area is centred on (x, y).
        dy = 0.15 * r
        pts = [
            (cx + r * math.cos(a), cy + dy - r * math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
        ]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"cannot draw shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size` x `size` RGB image; the same scene always gives the same pixels."""
    if size < 16:
        raise ValueError(f"image size {size} px is too small to tell shapes apart; use >= 16 (32+ advised)")
    scale = max(1, -(-_DRAW_PX // size))  # ceil: draw at >= _DRAW_PX, then downsample
    side = size * scale
    img = Image.new("RGB", (side, side), _background(scene.image_id))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, side)
    if scale > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img
