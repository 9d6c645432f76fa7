"""Making a shapes world on disk (images, noisy labelled web rows, bad inputs, splits) and loading it."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import shutil
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from capfilt.world.captions import Language, near_miss, true_captions, weak_or_spam
from capfilt.world.checker import check_caption
from capfilt.world.render import render
from capfilt.world.scene import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUNDS,
    COLOURS,
    RADIUS,
    SHAPES,
    Obj,
    Scene,
    sample_scene,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

NOISE_LABELS: tuple[str, ...] = ("correct", "mismatched", "near_miss", "weak")
LABELS: tuple[str, ...] = (*NOISE_LABELS, "bad")

# Bad inputs whose download must fail, and bad inputs with a valid image whose caption (or
# repetition) is the problem.
FAIL_KINDS: tuple[str, ...] = (
    "http_404",
    "http_500",
    "html_body",
    "truncated_jpeg",
    "corrupt_jpeg",
    "tiny_1x1",
    "huge_image",
)
CAPTION_KINDS: tuple[str, ...] = ("empty_caption", "long_caption", "duplicate_url", "duplicate_row")
BAD_KINDS: tuple[str, ...] = FAIL_KINDS + CAPTION_KINDS

# What the download stage should make of a row: fetched and decoded, failed, or recognised as
# an exact repeat of an earlier row.
EXPECT: tuple[str, ...] = ("success", "fail", "duplicate")

# How a near-duplicate's image is made from its original's: re-encoded at a lower JPEG quality,
# resized, slightly cropped (never into an object) and resized back, or the very same bytes.
# Each is served under its own URL with its own alt-text.
NEAR_DUPLICATE_TRANSFORMS: tuple[str, ...] = ("jpeg_quality", "resize", "crop", "exact")

# Named noise mixes: `noise: near_miss_heavy` in a recipe. The default world's is "default";
# "near_miss_heavy" is 70% noise, most of it near misses (a text that is wrong in one attribute).
NOISE_PRESETS: dict[str, dict[str, float]] = {
    "default": {"correct": 0.55, "mismatched": 0.15, "near_miss": 0.15, "weak": 0.15},
    "near_miss_heavy": {"correct": 0.30, "mismatched": 0.15, "near_miss": 0.40, "weak": 0.15},
}

HUGE_SIDE = 8000
LONG_CAPTION_CHARS = 5000
TEST_CAPTIONS = 5
SPLITS: tuple[str, ...] = ("web", "human", "test")

LABELS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),  # null when the row has no valid image
        pa.field("label", pa.string(), nullable=False),  # one of LABELS
        pa.field("is_correct", pa.bool_(), nullable=False),
        pa.field("bad_kind", pa.string()),  # one of BAD_KINDS, null for good rows
        pa.field("expect", pa.string(), nullable=False),  # one of EXPECT
        # Near-duplicates: the row whose image this row's image was made from (itself never a
        # near-duplicate), and how (one of NEAR_DUPLICATE_TRANSFORMS, with its parameter after a
        # colon: "jpeg_quality:55", "resize:48", "crop:2,1,63,62"); both null for other rows.
        pa.field("duplicate_of", pa.int64()),
        pa.field("duplicate_transform", pa.string()),
    ]
)
WEB_SCHEMA = pa.schema(
    [pa.field("path", pa.string(), nullable=False), pa.field("caption", pa.string(), nullable=False)]
)

# Everything make_world writes; only these are removed when a world is regenerated in place.
_OUTPUTS = ("images", "bad", "human", "scenes.jsonl", "web.parquet", "web_labels.parquet", "world.json")


class WorldConfig(BaseModel):
    """Which world of the family to make, how big, and how noisy its web split is.

    The defaults are the default world (3 shapes, 6 colours, flat backgrounds, plain phrasing,
    no near-duplicates), the same files for the same seed as before the family existed.
    ``WorldConfig.preset("hard")`` is a world the project was not tuned on.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    n_web: int = Field(2000, ge=1)
    n_human: int = Field(500, ge=0)
    captions_per_human: int = Field(5, ge=1, le=10)
    n_test: int = Field(200, ge=0)
    image_size: int = Field(64, ge=16, le=1024)
    # The world's subset of the family (capfilt/world/scene.py: ALL_SHAPES, ALL_COLOURS, BACKGROUNDS).
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    backgrounds: tuple[str, ...] = ("flat",)
    phrasing: Literal["plain", "varied"] = "plain"  # capfilt/world/captions.py
    # A mapping of NOISE_LABELS to shares, or the name of one of NOISE_PRESETS.
    noise: dict[str, float] = Field(default_factory=lambda: dict(NOISE_PRESETS["default"]))
    bad_rate: float = Field(0.05, ge=0.0, lt=1.0)  # share of all web rows that are bad inputs
    # Share of the n_web good rows whose image is a near-duplicate of another web row's.
    near_duplicate_rate: float = Field(0.0, ge=0.0, le=0.5)
    near_duplicate_transforms: tuple[str, ...] = NEAR_DUPLICATE_TRANSFORMS
    source: str = "shapes"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> WorldConfig:
        """A named world of the family (WORLD_PRESETS), with `overrides` on top: sizes, seed."""
        if name not in WORLD_PRESETS:
            raise ValueError(f"unknown world preset {name!r}; use one of {sorted(WORLD_PRESETS)}")
        return cls.model_validate({**WORLD_PRESETS[name], **overrides})

    def language(self) -> Language:
        """What the world's texts may name and how they say it."""
        return Language(self.shapes, self.colours, self.phrasing, self.backgrounds)

    @field_validator("shapes", "colours", "backgrounds", "near_duplicate_transforms")
    @classmethod
    def _check_subset(cls, v: tuple[str, ...], info: Any) -> tuple[str, ...]:
        family = {
            "shapes": ALL_SHAPES,
            "colours": ALL_COLOURS,
            "backgrounds": BACKGROUNDS,
            "near_duplicate_transforms": NEAR_DUPLICATE_TRANSFORMS,
        }[info.field_name]
        unknown = [x for x in v if x not in family]
        if unknown:
            raise ValueError(f"unknown {info.field_name} {unknown}; the family has {list(family)}")
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} lists a value twice: {list(v)}")
        # Near misses need another shape or colour to swap in; a world needs something to draw.
        least = {"shapes": 2, "colours": 2}.get(info.field_name, 1)
        if len(v) < least:
            raise ValueError(f"{info.field_name} needs at least {least} value(s), got {list(v)}")
        return v

    @field_validator("noise", mode="before")
    @classmethod
    def _noise_preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in NOISE_PRESETS:
                raise ValueError(
                    f"unknown noise preset {v!r}; use one of {sorted(NOISE_PRESETS)} or a mapping"
                )
            return dict(NOISE_PRESETS[v])
        return v

    @field_validator("noise")
    @classmethod
    def _check_noise(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(NOISE_LABELS))
        if unknown:
            raise ValueError(f"unknown noise label(s) {unknown}; use {list(NOISE_LABELS)}")
        if any(p < 0 for p in v.values()):
            raise ValueError(f"noise shares must be >= 0, got {v}")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"noise shares must sum to 1, they sum to {total:.6g}: {v}")
        # Canonical order and every label present, so world.json reads the same however given.
        return {k: float(v.get(k, 0.0)) for k in NOISE_LABELS}


# Worlds of the family by name. "hard" is like the world of issue 17 that CapFilt was not tuned
# on: more shapes and colours, textured backgrounds at 96 px, 70% noisy web text dominated by
# near misses, and varied phrasing. pipelines/hard.yaml is this world at the demo's sizes.
WORLD_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "hard": {
        "shapes": ("circle", "square", "triangle", "diamond", "star", "hexagon"),
        "colours": ("red", "green", "blue", "yellow", "purple", "orange", "brown", "cyan"),
        "backgrounds": ("noise", "stripes", "gradient", "checks"),
        "image_size": 96,
        "phrasing": "varied",
        "noise": "near_miss_heavy",
    },
}


@dataclass
class WorldInfo:
    """What make_world wrote: where, with which config, and how many of everything."""

    root: Path
    config: WorldConfig
    counts: dict[str, Any]


@dataclass
class _Row:
    path: str
    caption: str
    image_id: str | None
    label: str
    bad_kind: str | None = None
    expect: str = "success"
    duplicate_of: _Row | None = None  # near-duplicates: the row whose image this one's was made from
    duplicate_transform: str | None = None


@dataclass
class _Builder:
    """Accumulates a world in memory, then writes it; one per make_world call."""

    root: Path
    config: WorldConfig
    scenes: list[tuple[str, Scene]] = field(default_factory=list)  # (split, scene) in id order

    def __post_init__(self) -> None:
        self.lang = self.config.language()

    def sample(self, rng: random.Random, image_id: str) -> Scene:
        """A scene of this world's shapes, colours and backgrounds."""
        cfg = self.config
        return sample_scene(
            rng, image_id, shapes=cfg.shapes, colours=cfg.colours, backgrounds=cfg.backgrounds
        )

    def image(self, split: str, scene: Scene) -> str:
        """Render and save one image; returns its path relative to the world root."""
        return self.save(split, scene, render(scene, self.config.image_size))

    def save(self, split: str, scene: Scene, img: Image.Image, quality: int = 90) -> str:
        """Save `img` as the image of `scene`; returns its path relative to the world root."""
        rel = f"images/{split}/{scene.image_id}.jpg"
        img.save(self.root / rel, "JPEG", quality=quality)
        self.scenes.append((split, scene))
        return rel


def _rng(seed: int, stream: str) -> random.Random:
    # One independent stream per purpose: growing n_web leaves the human and test splits alone.
    return random.Random(f"capfilt-world/{seed}/{stream}")


def _label_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Exact counts summing to n, by largest remainder, so the mix is as close as n allows."""
    raw = {k: shares[k] * n for k in NOISE_LABELS}
    counts = {k: int(raw[k]) for k in NOISE_LABELS}
    by_remainder = sorted(NOISE_LABELS, key=lambda k: (-(raw[k] - counts[k]), NOISE_LABELS.index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _mismatched(b: _Builder, scene: Scene, others: list[Scene], rng: random.Random) -> str:
    """Another image's true caption that happens to be false of this one."""
    for _ in range(50):
        donor = rng.choice(others)
        if donor.image_id == scene.image_id:
            continue
        text = true_captions(donor, rng, 1, b.lang)[0]
        if not check_caption(scene, text):
            return text
    # Tiny worlds may have no suitable donor; an unseen scene always yields one quickly.
    while True:
        text = true_captions(b.sample(rng, "donor"), rng, 1, b.lang)[0]
        if not check_caption(scene, text):
            return text


def _caption(b: _Builder, label: str, scene: Scene, scenes: list[Scene], rng: random.Random) -> str:
    """A web text of `label` for `scene`."""
    if label == "correct":
        return true_captions(scene, rng, 1, b.lang)[0]
    if label == "mismatched":
        return _mismatched(b, scene, scenes, rng)
    if label == "near_miss":
        return near_miss(scene, rng, b.lang)
    return weak_or_spam(rng, b.lang)


def _web_rows(b: _Builder) -> list[_Row]:
    cfg = b.config
    rng = _rng(cfg.seed, "web")
    scenes = [b.sample(rng, f"w{i:06d}") for i in range(cfg.n_web)]
    counts = _label_counts(cfg.n_web, cfg.noise)
    labels = [k for k in NOISE_LABELS for _ in range(counts[k])]
    rng.shuffle(labels)
    # Near-duplicates come from a stream of their own: the default world (rate 0) draws nothing.
    dup_rng = _rng(cfg.seed, "near-duplicates")
    plan = _near_duplicate_plan(cfg, dup_rng) if cfg.near_duplicate_rate else {}
    originals: dict[int, Scene] = {}  # the original's scene, for the near-duplicate's pixels
    transforms: dict[int, str] = {}
    for i, (j, transform) in plan.items():
        originals[i] = scenes[j]
        scenes[i], transforms[i] = _near_duplicate(
            scenes[j], scenes[i].image_id, transform, cfg.image_size, dup_rng
        )
    rows: list[_Row] = []
    for i, (scene, label) in enumerate(zip(scenes, labels, strict=True)):
        if i not in plan:
            rows.append(
                _Row(b.image("web", scene), _caption(b, label, scene, scenes, rng), scene.image_id, label)
            )
            continue
        original = rows[plan[i][0]]
        transform = transforms[i]
        if transform == "exact":
            path = f"images/web/{scene.image_id}.jpg"
            (b.root / path).write_bytes((b.root / original.path).read_bytes())
            b.scenes.append(("web", scene))
        else:
            img, quality = _near_duplicate_image(originals[i], transform, cfg.image_size)
            path = b.save("web", scene, img, quality)
        for _ in range(100):  # another alt-text than the original's, as on another page
            caption = _caption(b, label, scene, scenes, rng)
            if caption != original.caption:
                break
        else:
            raise RuntimeError(
                f"no alt-text for {scene.image_id} other than its original's {original.caption!r}"
            )
        rows.append(_Row(path, caption, scene.image_id, label, None, "success", original, transform))
    return rows


def _near_duplicate_plan(cfg: WorldConfig, rng: random.Random) -> dict[int, tuple[int, str]]:
    """Which good web rows are near-duplicates, of which earlier row, made how. An original is
    never itself a near-duplicate, so the truth is pairs and stars, never chains."""
    plan: dict[int, tuple[int, str]] = {}  # near-duplicate index -> (its original's index, transform)
    n_dup = min(round(cfg.near_duplicate_rate * cfg.n_web), cfg.n_web - 1)
    dups = set(rng.sample(range(1, cfg.n_web), n_dup)) if n_dup > 0 else set()
    originals = [i for i in range(cfg.n_web) if i not in dups]
    # Each transform as evenly as n_dup allows, in random order.
    transforms = [cfg.near_duplicate_transforms[k % len(cfg.near_duplicate_transforms)] for k in range(n_dup)]
    rng.shuffle(transforms)
    for i, transform in zip(sorted(dups), transforms, strict=True):
        plan[i] = (originals[rng.randrange(bisect_left(originals, i))], transform)
    return plan


def _near_duplicate(
    original: Scene, image_id: str, transform: str, size: int, rng: random.Random
) -> tuple[Scene, str]:
    """What a near-duplicate of `original` shows (a crop moves the objects), and its transform
    with the parameter drawn for it ("jpeg_quality:55", "resize:48", "crop:2,1,63,62", "exact")."""
    scene = Scene(image_id, original.objects, original.background)
    if transform == "exact":
        return scene, "exact"
    if transform == "jpeg_quality":
        return scene, f"jpeg_quality:{rng.randint(40, 75)}"  # the originals are saved at 90
    if transform == "resize":
        factors = [f for f in (0.5, 0.75, 1.25, 1.5, 2.0) if size * f >= 16]
        return scene, f"resize:{round(size * rng.choice(factors))}"
    if transform == "crop":
        return _crop(original, image_id, size, rng)
    raise ValueError(f"unknown near-duplicate transform {transform!r}")


def _near_duplicate_image(original: Scene, transform: str, size: int) -> tuple[Image.Image, int]:
    """A near-duplicate's image, made from the original's pixels, and its JPEG quality."""
    img = render(original, size)
    kind, _, param = transform.partition(":")
    if kind == "jpeg_quality":
        return img, int(param)
    if kind == "resize":
        return img.resize((int(param), int(param)), Image.Resampling.BICUBIC), 90
    if kind == "crop":
        left, top, right, bottom = (int(v) for v in param.split(","))
        return img.crop((left, top, right, bottom)).resize((size, size), Image.Resampling.BICUBIC), 90
    return img, 90


def _crop(original: Scene, image_id: str, size: int, rng: random.Random) -> tuple[Scene, str]:
    """Cut up to 6% off each side, never into an object (it is resized back to the full size);
    the objects' positions move with the crop (relations only get clearer: distances grow)."""
    objs = original.objects
    free = {  # room between the objects and each edge, as a fraction of the side
        "left": min(o.x - RADIUS[o.size] for o in objs),
        "top": min(o.y - RADIUS[o.size] for o in objs),
        "right": min(1 - o.x - RADIUS[o.size] for o in objs),
        "bottom": min(1 - o.y - RADIUS[o.size] for o in objs),
    }
    cut = {k: rng.randint(0, max(0, min(int(0.06 * size), int((v - 0.01) * size)))) for k, v in free.items()}
    if not any(cut.values()):  # objects close to every edge (or a tiny image): one pixel off the roomiest
        cut[max(free, key=lambda k: free[k])] = 1
    left, top = cut["left"], cut["top"]
    right, bottom = size - cut["right"], size - cut["bottom"]
    w, h = right - left, bottom - top
    moved = tuple(
        Obj(o.shape, o.colour, o.size, round((o.x * size - left) / w, 3), round((o.y * size - top) / h, 3))
        for o in objs
    )
    return Scene(image_id, moved, original.background), f"crop:{left},{top},{right},{bottom}"


def _n_bad(cfg: WorldConfig) -> int:
    # Bad rows are added to the n_web good ones and make up bad_rate of all web rows.
    return round(cfg.bad_rate * cfg.n_web / (1.0 - cfg.bad_rate))


def _with_bad_rows(b: _Builder, good: list[_Row]) -> list[_Row]:
    """Mix bad inputs into the good rows at random places; each kind as evenly as n_bad allows."""
    cfg = b.config
    rng = _rng(cfg.seed, "bad")
    n_bad = _n_bad(cfg)
    if 0 < n_bad < len(BAD_KINDS):
        log.warning("only %d bad rows: not every one of the %d bad kinds is present", n_bad, len(BAD_KINDS))
    kinds = [BAD_KINDS[k % len(BAD_KINDS)] for k in range(n_bad)]
    rng.shuffle(kinds)
    # A bad row goes after `slot` good rows (slot >= 1, so a duplicate always has a source).
    slots = sorted(rng.randint(1, len(good)) for _ in range(n_bad))
    (b.root / "bad").mkdir()
    huge: bytes | None = None
    next_web = cfg.n_web  # extra web images for the caption-level kinds
    out: list[_Row] = []
    g = 0
    for k, (slot, kind) in enumerate(zip(slots, kinds, strict=True)):
        out.extend(good[g:slot])
        g = slot
        if kind == "huge_image" and huge is None:
            huge = _huge_png()
        if kind in ("empty_caption", "long_caption"):
            scene = b.sample(rng, f"w{next_web:06d}")
            next_web += 1
            path = b.image("web", scene)
            text = "" if kind == "empty_caption" else _long_caption(b, scene, rng)
            out.append(_Row(path, text, scene.image_id, "bad", kind, "success"))
        elif kind in ("duplicate_url", "duplicate_row"):
            src = good[rng.randrange(slot)]
            if kind == "duplicate_row":
                out.append(_Row(src.path, src.caption, src.image_id, "bad", kind, "duplicate"))
            else:
                out.append(_Row(src.path, _other_caption(b, src, rng), src.image_id, "bad", kind, "success"))
        else:
            out.append(_fail_row(b, k, kind, rng, huge))
    out.extend(good[g:])
    return out


def _other_caption(b: _Builder, src: _Row, rng: random.Random) -> str:
    """A caption for the same URL that differs from the source row's."""
    while True:
        text = weak_or_spam(rng, b.lang)
        if text != src.caption:
            return text


def _long_caption(b: _Builder, scene: Scene, rng: random.Random) -> str:
    """A true caption buried in keyword-stuffed alt-text, about LONG_CAPTION_CHARS long."""
    parts = [true_captions(scene, rng, 1, b.lang)[0]]
    while sum(len(p) + 1 for p in parts) < LONG_CAPTION_CHARS:
        parts.append(weak_or_spam(rng, b.lang))
    return " ".join(parts)[:LONG_CAPTION_CHARS]


def _huge_png() -> bytes:
    # Bilevel and uniform: 64 Mpx that compress to ~25 kB and encode in a fraction of a second.
    buf = io.BytesIO()
    Image.new("1", (HUGE_SIDE, HUGE_SIDE), 1).save(buf, "PNG")
    return buf.getvalue()


def _fail_row(b: _Builder, k: int, kind: str, rng: random.Random, huge: bytes | None) -> _Row:
    """A row whose download must fail, with the file (if any) that makes it fail."""
    # The caption is a normal-looking one: the failure must come from the image alone.
    caption = true_captions(b.sample(rng, "bad"), rng, 1, b.lang)[0]
    ext = "png" if kind in ("tiny_1x1", "huge_image") else "jpg"
    name = f"{kind}_{k:05d}.{ext}"
    if kind == "http_404":
        return _Row(f"bad/{name}", caption, None, "bad", kind, "fail")  # never written
    if kind == "http_500":
        return _Row(f"status/500/{name}", caption, None, "bad", kind, "fail")
    path = f"bad/{name}"
    if kind == "html_body":
        data = b"<!DOCTYPE html>\n<html><head><title>Not here</title></head><body>moved</body></html>\n"
    elif kind == "truncated_jpeg":
        buf = io.BytesIO()
        render(b.sample(rng, name), b.config.image_size).save(buf, "JPEG", quality=90)
        full = buf.getvalue()
        # Cut inside the headers (before the start-of-scan marker): decoders that patch a short
        # scan with grey pixels still cannot make an image of this.
        data = full[: full.index(b"\xff\xda") // 2]
    elif kind == "corrupt_jpeg":
        data = b"\x00" + rng.randbytes(2047)  # never starts with a JPEG/PNG magic number
    elif kind == "tiny_1x1":
        buf = io.BytesIO()
        Image.new("RGB", (1, 1), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            buf, "PNG"
        )
        data = buf.getvalue()
    elif kind == "huge_image":
        assert huge is not None, "huge PNG must be made before its first row"
        data = huge
    else:
        raise ValueError(f"unknown failing kind {kind!r}")
    (b.root / path).write_bytes(data)
    return _Row(path, caption, None, "bad", kind, "fail")


def _clean_split(
    b: _Builder, split: str, n: int, captions_per_image: int, distinct: bool
) -> list[tuple[str, list[str]]]:
    """Images with several true captions each: (path, captions) per image."""
    rng = _rng(b.config.seed, split)
    seen: set[tuple[tuple[str, str, str], ...]] = set()
    out = []
    for i in range(n):
        for _ in range(10_000):
            scene = b.sample(rng, f"{split[0]}{i:06d}")
            if not distinct or scene.signature() not in seen:
                break
        else:
            raise ValueError(f"cannot find {n} distinct {split} scenes; lower n_{split}")
        seen.add(scene.signature())
        out.append((b.image(split, scene), true_captions(scene, rng, captions_per_image, b.lang)))
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / "world.json").exists() and not (out / "web.parquet").exists():
            raise FileExistsError(f"{out} is not empty and holds no world; choose an empty or new directory")
        # Regenerating in place: drop what an earlier make_world wrote, and only that.
        for name in _OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "human").mkdir(exist_ok=True)


def make_world(out_dir: str | Path, config: WorldConfig | None = None) -> WorldInfo:
    """Write a shapes world to `out_dir`; the same config always gives the same files."""
    cfg = config or WorldConfig()
    out = Path(out_dir)
    _prepare(out)
    b = _Builder(out, cfg)

    rows = _with_bad_rows(b, _web_rows(b))
    human = _clean_split(b, "human", cfg.n_human, cfg.captions_per_human, distinct=False)
    test = _clean_split(b, "test", cfg.n_test, TEST_CAPTIONS, distinct=True)

    web = pa.table({"path": [r.path for r in rows], "caption": [r.caption for r in rows]}, schema=WEB_SCHEMA)
    pq.write_table(web, out / "web.parquet")
    index = {id(r): k for k, r in enumerate(rows)}  # a near-duplicate's original, by its final row
    labels = pa.table(
        {
            "row": list(range(len(rows))),
            "path": [r.path for r in rows],
            "caption": [r.caption for r in rows],
            "image_id": [r.image_id for r in rows],
            "label": [r.label for r in rows],
            "is_correct": [r.label == "correct" for r in rows],
            "bad_kind": [r.bad_kind for r in rows],
            "expect": [r.expect for r in rows],
            "duplicate_of": [None if r.duplicate_of is None else index[id(r.duplicate_of)] for r in rows],
            "duplicate_transform": [r.duplicate_transform for r in rows],
        },
        schema=LABELS_SCHEMA,
    )
    pq.write_table(labels, out / "web_labels.parquet")

    with (out / "scenes.jsonl").open("w", encoding="utf-8") as f:
        for split, scene in b.scenes:
            d = scene.to_dict()  # {"image_id", "objects"[, "background" unless flat]}
            f.write(json.dumps({"image_id": d.pop("image_id"), "split": split, **d}) + "\n")

    # The formats of BLIP's coco_karpathy_train.json and coco_karpathy_test.json.
    _write_json(
        out / "human" / "karpathy_train.json",
        [{"image": p, "caption": c, "image_id": Path(p).stem} for p, caps in human for c in caps],
    )
    _write_json(out / "human" / "karpathy_test.json", [{"image": p, "caption": caps} for p, caps in test])

    counts = _counts(b, rows)
    # Written last: a world.json marks a complete world.
    _write_json(
        out / "world.json", {"format_version": FORMAT_VERSION, "config": cfg.model_dump(), "counts": counts}
    )
    log.info("wrote a shapes world to %s: %s", out, counts)
    return WorldInfo(out, cfg, counts)


def _counts(b: _Builder, rows: list[_Row]) -> dict[str, Any]:
    def tally(values: list[str | None], keys: tuple[str, ...]) -> dict[str, int]:
        return {k: sum(v == k for v in values) for k in keys}

    counts: dict[str, Any] = {
        "images": tally([s for s, _ in b.scenes], SPLITS),
        "web_rows": len(rows),
        "labels": tally([r.label for r in rows], LABELS),
        "bad_kinds": tally([r.bad_kind for r in rows], BAD_KINDS),
        "expect": tally([r.expect for r in rows], EXPECT),
    }
    if b.config.near_duplicate_rate:  # absent from the default world, whose counts stay as they were
        kinds = [r.duplicate_transform.split(":")[0] if r.duplicate_transform else None for r in rows]
        counts["near_duplicates"] = tally(kinds, b.config.near_duplicate_transforms)
    return counts


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------

_IMAGE_PATH = re.compile(r"^images/(web|human|test)/([^/]+)\.jpg$")


@dataclass
class World:
    """A world read back from disk: its scenes, the web rows' ground truth and its config."""

    root: Path
    config: WorldConfig
    counts: dict[str, Any]
    scenes: dict[str, Scene]  # by image_id
    splits: dict[str, str]  # image_id -> "web" | "human" | "test"
    labels: pa.Table  # web_labels.parquet, one row per web.parquet row

    def scene_for_path(self, path: str) -> Scene | None:
        """The scene behind a path relative to the world root (as in web.parquet), or None for
        paths that are not images of the world (bad inputs)."""
        m = _IMAGE_PATH.match(unquote(urlsplit(path).path).lstrip("/"))
        return self.scenes.get(m.group(2)) if m else None

    def scene_for_url(self, url: str) -> Scene | None:
        """The scene behind an absolute URL served by WorldServer, or None."""
        return self.scene_for_path(urlsplit(url).path)


def load_world(world_dir: str | Path) -> World:
    root = Path(world_dir)
    info_path = root / "world.json"
    if not info_path.exists():
        raise FileNotFoundError(
            f"{root} holds no world.json; make one with `capfilt world make --out {root}`"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{info_path} has format_version {info.get('format_version')}, this capfilt reads "
            f"{FORMAT_VERSION}; regenerate the world"
        )
    scenes: dict[str, Scene] = {}
    splits: dict[str, str] = {}
    with (root / "scenes.jsonl").open(encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            scenes[d["image_id"]] = Scene.from_dict(d)
            splits[d["image_id"]] = d["split"]
    return World(
        root=root,
        config=WorldConfig.model_validate(info["config"]),
        counts=info["counts"],
        scenes=scenes,
        splits=splits,
        labels=pq.read_table(root / "web_labels.parquet"),
    )
