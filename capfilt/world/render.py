"""Rendering a shapes-world scene to an RGB image."""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

from capfilt.world.scene import RADIUS, Obj, Scene

# Saturated and far apart in hue or lightness, so that JPEG and resizing never move one into
# another; every one stays far from the light backgrounds (all their channels are >= 150).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 180),
    "orange": (250, 135, 15),
    "brown": (125, 70, 25),
    "cyan": (0, 190, 205),
    "black": (20, 20, 20),
    "grey": (105, 105, 105),
}

# Drawing at a multiple of the output size and downsampling antialiases the edges; beyond
# ~256 px of drawing the gain is invisible and only costs time.
_DRAW_PX = 256

# Texture tints stay in [_TEXTURE_MIN, 250] on every channel: light, so no palette colour is
# lost in them, but with edges and gradients a model must learn to look past.
_TEXTURE_MIN = 150


def _background(image_id: str) -> tuple[int, int, int]:
    """A light, nearly neutral tint that varies by image, so the background alone carries no
    signal and no two images look pasted onto the same canvas."""
    h = hashlib.blake2b(image_id.encode(), digest_size=4).digest()
    base = 200 + h[0] % 36
    return (base + h[1] % 9 - 4, base + h[2] % 9 - 4, base + h[3] % 9 - 4)


def _texture(kind: str, image_id: str, size: int) -> np.ndarray:
    """A `size` x `size` x 3 uint8 texture of `kind`, its details drawn from the image's id."""
    seed = int.from_bytes(hashlib.blake2b(f"texture/{image_id}".encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    light = np.array(_background(image_id), dtype=np.float32)
    # A second tint, darker by 30-60 and shifted a little in hue, for the texture's other phase.
    dark = light - np.float32(rng.uniform(30, 60)) + rng.uniform(-8, 8, size=3).astype(np.float32)
    coords = np.arange(size, dtype=np.float32) / size
    xx, yy = coords[None, :], coords[:, None]  # broadcast to size x size
    if kind == "noise":
        block = int(rng.integers(1, 3))  # 1 or 2 px grains
        grains = rng.random((-(-size // block),) * 2, dtype=np.float32)
        mix = grains.repeat(block, 0).repeat(block, 1)[:size, :size]
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 12) / size  # 4-12 px a stripe pair
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 1)
        mix = (phase % 1.0 < 0.5).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        mix = (t - t.min()) / max(float(t.max() - t.min()), 1e-9)
    elif kind == "checks":
        cell = rng.uniform(4, 10) / size
        mix = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    else:
        raise ValueError(f"cannot draw background {kind!r}")
    pixels = light + (dark - light) * mix[..., None]
    return np.clip(np.rint(pixels), _TEXTURE_MIN, 250).astype(np.uint8)


def _polygon(cx: float, cy: float, radii: list[float], start: float) -> list[tuple[float, float]]:
    """Vertices at `radii` from the centre, evenly spaced in angle from `start` (y grows down)."""
    n = len(radii)
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / n), cy - r * math.sin(start + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


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
    elif obj.shape == "diamond":
        # A square on its corner, a little narrower than tall so it never reads as a tilted square.
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    elif obj.shape == "star":
        # Five points; the inner radius is fatter than a textbook star's so small stars keep points.
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, math.pi / 2), fill=fill)
    elif obj.shape == "cross":
        w, h = 0.33 * r, 0.9 * r  # arm half-width, arm reach
        draw.rectangle((cx - h, cy - w, cx + h, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=fill)
    elif obj.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, 0.0), fill=fill)
    elif obj.shape == "ring":
        # The hole shows the background, textured or not.
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.42 * r)))
    else:
        raise ValueError(f"cannot draw shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size` x `size` RGB image; the same scene always gives the same pixels."""
    if size < 16:
        raise ValueError(f"image size {size} px is too small to tell shapes apart; use >= 16 (32+ advised)")
    scale = max(1, -(-_DRAW_PX // size))  # ceil: draw at >= _DRAW_PX, then downsample
    side = size * scale
    if scene.background == "flat":
        img = Image.new("RGB", (side, side), _background(scene.image_id))
    else:
        # Made at the output size and blown up by whole pixels: the downsampling gives the
        # texture back exactly, crisp, and only the objects' edges are antialiased.
        texture = Image.fromarray(_texture(scene.background, scene.image_id, size), "RGB")
        img = texture.resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, side)
    if scale > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img
