"""The shapes world's scene model: objects, their attributes and positions, relations, sampling.

The world is a family: every world draws its objects from a subset of the family's shapes and
colours (``ALL_SHAPES``, ``ALL_COLOURS``) on one of its backgrounds (``BACKGROUNDS``). ``SHAPES``
and ``COLOURS`` are the default world's subsets, the world every recipe made before the family.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")

# Everything the family can draw. The defaults come first and in their order, so that a world
# given the defaults samples exactly what it sampled before the family existed.
ALL_SHAPES: tuple[str, ...] = (*SHAPES, "diamond", "star", "cross", "hexagon", "ring")
ALL_COLOURS: tuple[str, ...] = (*COLOURS, "brown", "cyan", "black", "grey")
# "flat" is the default world's light tint; the others are textures (capfilt/world/render.py).
BACKGROUNDS: tuple[str, ...] = ("flat", "noise", "stripes", "gradient", "checks")

# Radius of an object's bounding circle as a fraction of the image side. Small is about half of
# large so the two are never confused, even at 32 px.
RADIUS: dict[str, float] = {"small": 0.09, "large": 0.17}

# Two objects are in a relation on an axis iff their centres differ by at least MARGIN on it.
# Sampling keeps every pair of objects at least MARGIN apart on BOTH axes, so for any pair
# exactly one of left/right and exactly one of above/below holds, and never narrowly.
MARGIN = 0.15

# Space kept between objects' bounding circles and between an object and the image edge.
_GAP = 0.03

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; (x, y) is its centre in [0, 1], y growing downwards as in images."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {ALL_SHAPES}")
        if self.colour not in ALL_COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; use one of {ALL_COLOURS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; use one of {SIZES}")

    @property
    def kind(self) -> tuple[str, str, str]:
        """What a caption can say about the object apart from where it is."""
        return (self.shape, self.colour, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        return cls(d["shape"], d["colour"], d["size"], float(d["x"]), float(d["y"]))


@dataclass(frozen=True)
class Scene:
    image_id: str
    objects: tuple[Obj, ...]
    # The texture (or flat tint) behind the objects; its random details come from image_id.
    background: str = "flat"

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; use one of {BACKGROUNDS}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image_id": self.image_id, "objects": [o.to_dict() for o in self.objects]}
        if self.background != "flat":  # flat scenes read as they did before backgrounds existed
            d["background"] = self.background
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objects = tuple(Obj.from_dict(o) for o in d["objects"])
        return cls(str(d["image_id"]), objects, str(d.get("background", "flat")))

    def signature(self) -> tuple[tuple[str, str, str], ...]:
        """The multiset of object kinds, positions ignored: two scenes with the same signature
        cannot be told apart by a caption that does not use relations."""
        return tuple(sorted(o.kind for o in self.objects))


def holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether `a` is `relation` ("left", "right", "above", "below") of `b`."""
    if relation == "left":
        return a.x < b.x - MARGIN
    if relation == "right":
        return a.x > b.x + MARGIN
    if relation == "above":
        return a.y < b.y - MARGIN
    if relation == "below":
        return a.y > b.y + MARGIN
    raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")


def relations_between(a: Obj, b: Obj) -> list[str]:
    """Every relation that holds of `a` with respect to `b`, in RELATIONS order."""
    return [r for r in RELATIONS if holds(r, a, b)]


def _well_placed(new: Obj, placed: list[Obj]) -> bool:
    for o in placed:
        if abs(new.x - o.x) < MARGIN or abs(new.y - o.y) < MARGIN:
            return False
        min_dist = RADIUS[new.size] + RADIUS[o.size] + _GAP
        if (new.x - o.x) ** 2 + (new.y - o.y) ** 2 < min_dist**2:
            return False
    return True


def sample_scene(
    rng: random.Random,
    image_id: str,
    n_objects: int | None = None,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOURS,
    backgrounds: tuple[str, ...] = ("flat",),
) -> Scene:
    """A random scene of 1-3 objects (or `n_objects`) of the given shapes and colours, pairwise
    distinct in kind, non-overlapping and with every pairwise relation unambiguous (see MARGIN),
    on one of `backgrounds` (no random draw for a single one, so the default world's streams
    are what they were before backgrounds existed)."""
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, got n_objects={n}")
    if len(shapes) * len(colours) * len(SIZES) < n:
        raise ValueError(
            f"{len(shapes)} shape(s) x {len(colours)} colour(s) cannot make {n} distinct objects"
        )
    # Rejection sampling restarts the whole scene on a dead end; a 3-object scene is found in a
    # handful of tries, and the bound only guards against a future change of the constants.
    for _ in range(1000):
        placed: list[Obj] = []
        kinds: set[tuple[str, str, str]] = set()
        while len(placed) < n:
            shape, colour, size = rng.choice(shapes), rng.choice(colours), rng.choice(SIZES)
            # Identical objects would make "the red circle" ambiguous and near-misses unprovable.
            if (shape, colour, size) in kinds:
                continue
            lo = RADIUS[size] + _GAP
            for _ in range(30):
                # Positions on a 1/1000 grid round-trip through JSON exactly.
                x = round(rng.uniform(lo, 1 - lo), 3)
                y = round(rng.uniform(lo, 1 - lo), 3)
                obj = Obj(shape, colour, size, x, y)
                if _well_placed(obj, placed):
                    placed.append(obj)
                    kinds.add(obj.kind)
                    break
            else:
                break
        if len(placed) == n:
            background = backgrounds[0] if len(backgrounds) == 1 else rng.choice(backgrounds)
            return Scene(image_id, tuple(placed), background)
    raise RuntimeError(f"could not place {n} objects; MARGIN={MARGIN} or RADIUS={RADIUS} too large")
