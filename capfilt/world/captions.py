"""Caption generators of the shapes world: true captions, near misses and weak or spam alt-text."""

from __future__ import annotations

import random
from collections.abc import Callable

from capfilt.world.scene import COLOURS, SHAPES, SIZES, Obj, Scene, relations_between

# Surface forms of each relation, as the checker accepts them.
REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath", "underneath"),
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_NUMBER = {1: "one", 2: "two", 3: "three"}

_ONE_OBJECT_FRAMES = (
    "{}",
    "a picture of {}",
    "a photo of {}",
    "an image of {}",
    "there is {}",
    "{} on a plain background",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: Obj, with_size: bool, with_colour: bool = True) -> str:
    """The bare noun phrase: "small red circle", "red circle", "circle"."""
    words = []
    if with_size:
        words.append(obj.size)
    if with_colour:
        words.append(obj.colour)
    words.append(obj.shape)
    return " ".join(words)


def _np(obj: Obj, rng: random.Random, with_colour: bool = True) -> str:
    """ "a red circle" or "a small red circle", chosen at random."""
    return _article(_describe(obj, rng.random() < 0.5, with_colour))


def _count(scene: Scene, shape: str, colour: str | None = None, size: str | None = None) -> int:
    return sum(
        o.shape == shape and colour in (None, o.colour) and size in (None, o.size) for o in scene.objects
    )


def _rel_phrase(rng: random.Random, a: Obj, b: Obj) -> str:
    """A phrase for one relation that holds of `a` with respect to `b`."""
    return rng.choice(REL_PHRASES[rng.choice(relations_between(a, b))])


def _pronoun_rel(rng: random.Random, a: Obj, b: Obj) -> str:
    """A relation of `a` with respect to `b` where `b` is named by a pronoun: "above it", "to its left"."""
    rel = rng.choice(relations_between(a, b))
    if rel in ("left", "right") and rng.random() < 0.5:
        return f"to its {rel}"
    return f"{rng.choice(REL_PHRASES[rel])} it"


def _listing(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _one_object_caption(scene: Scene, rng: random.Random) -> str:
    obj = rng.choice(scene.objects)
    if rng.random() < 0.2:
        # "one"/"a single" state an exact count, so they are used only where it is right.
        with_size = rng.random() < 0.5
        n = _count(scene, obj.shape, obj.colour, obj.size if with_size else None)
        if n == 1:
            return f"{rng.choice(('one', 'a single'))} {_describe(obj, with_size)}"
    return rng.choice(_ONE_OBJECT_FRAMES).format(_np(obj, rng))


def _pair_caption(scene: Scene, rng: random.Random) -> str:
    a, b = rng.sample(scene.objects, 2)
    # The second object is sometimes named by its shape alone: still checkable, and the first
    # one carries the colour-and-shape name every true caption needs.
    na, nb = _np(a, rng), _np(b, rng, with_colour=rng.random() < 0.85)
    frame = rng.randrange(7)
    if frame == 0:
        return f"{na} and {nb}"
    if frame == 1:
        return f"{na} {_rel_phrase(rng, a, b)} {nb}"
    if frame == 2:
        return f"{rng.choice(('there is', 'a picture of', 'a photo of'))} {na} {_rel_phrase(rng, a, b)} {nb}"
    if frame == 3:
        return f"{na} is {_rel_phrase(rng, a, b)} {nb}"
    if frame == 4:
        return f"{nb} with {na} {_pronoun_rel(rng, a, b)}"
    if frame == 5:
        # Inverted order: "to the left of a blue square is a red circle".
        verb = rng.choice(("is", "there is", "sits"))
        return f"{_rel_phrase(rng, a, b)} {nb} {verb} {na}"
    n = len(scene.objects)
    head = rng.choice((f"{_NUMBER[n]} shapes:", f"a picture of {_NUMBER[n]} shapes:"))
    if n == 2:
        return f"{head} {na} and {nb}"
    return f"{head} {na} {_rel_phrase(rng, a, b)} {nb}, and more"


def _all_objects_caption(scene: Scene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    listing = _listing([_np(o, rng) for o in objs])
    n = len(objs)
    return rng.choice(
        (listing, f"{_NUMBER[n]} shapes: {listing}", f"a picture of {_NUMBER[n]} shapes: {listing}")
    )


def _two_relations_caption(scene: Scene, rng: random.Random) -> str:
    a, b, c = rng.sample(scene.objects, 3)
    first = f"{_np(a, rng)} {_rel_phrase(rng, a, b)} {_np(b, rng)}"
    return f"{first}, and {_np(c, rng)} {_rel_phrase(rng, c, b)} the {_describe(b, True)}"


def _group_caption(scene: Scene, rng: random.Random) -> str | None:
    """ "two red circles": only for scenes that hold two objects of one colour and shape."""
    for shape in SHAPES:
        for colour in COLOURS:
            if _count(scene, shape, colour) == 2:
                return f"{rng.choice(('two', 'there are two'))} {colour} {shape}s"
    return None


def true_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """`n` distinct captions that are true of `scene`, in several phrasings; relations are used
    whenever the scene has two or more objects."""
    makers: list[Callable[[Scene, random.Random], str | None]] = [_one_object_caption]
    if len(scene.objects) >= 2:
        makers += [_pair_caption, _pair_caption, _pair_caption, _all_objects_caption, _group_caption]
    if len(scene.objects) == 3:
        makers += [_two_relations_caption]
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        text = rng.choice(makers)(scene, rng)
        if text is not None and text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                return out
    raise ValueError(f"scene {scene.image_id} yields fewer than {n} distinct true captions; ask for fewer")


def near_miss(scene: Scene, rng: random.Random) -> str:
    """A caption that is false of `scene` because exactly one thing is wrong: one object's colour,
    shape or size, a relation flipped, or a count."""
    options: list[Callable[[], str | None]] = [
        lambda: _wrong_colour(scene, rng),
        lambda: _wrong_shape(scene, rng),
        lambda: _wrong_size(scene, rng),
        lambda: _wrong_count(scene, rng),
    ]
    if len(scene.objects) >= 2:
        options += [lambda: _flipped_relation(scene, rng)] * 2
    rng.shuffle(options)
    for make in options:
        text = make()
        if text is not None:
            return text
    # Unreachable with the current vocabulary: a new colour is always free.
    raise RuntimeError(f"no near miss for scene {scene.image_id}")


def _embed_wrong(scene: Scene, rng: random.Random, obj: Obj, wrong: str) -> str:
    """Put a wrong noun phrase for `obj` where a true one would go, next to the true rest."""
    others = [o for o in scene.objects if o is not obj]
    if not others or rng.random() < 0.4:
        return rng.choice(_ONE_OBJECT_FRAMES).format(wrong)
    other = rng.choice(others)
    if rng.random() < 0.5:
        return f"{wrong} {_rel_phrase(rng, obj, other)} {_np(other, rng)}"
    return f"{_np(other, rng)} and {wrong}"


def _wrong_colour(scene: Scene, rng: random.Random) -> str | None:
    obj = rng.choice(scene.objects)
    # No object of the new colour and this shape exists at all, so the phrase matches nothing.
    free = [c for c in COLOURS if _count(scene, obj.shape, c) == 0]
    if not free:
        return None
    colour = rng.choice(free)
    size = f"{obj.size} " if rng.random() < 0.5 else ""
    return _embed_wrong(scene, rng, obj, _article(f"{size}{colour} {obj.shape}"))


def _wrong_shape(scene: Scene, rng: random.Random) -> str | None:
    obj = rng.choice(scene.objects)
    free = [s for s in SHAPES if _count(scene, s, obj.colour) == 0]
    if not free:
        return None
    size = f"{obj.size} " if rng.random() < 0.5 else ""
    return _embed_wrong(scene, rng, obj, _article(f"{size}{obj.colour} {rng.choice(free)}"))


def _wrong_size(scene: Scene, rng: random.Random) -> str | None:
    obj = rng.choice(scene.objects)
    size = next(s for s in SIZES if s != obj.size)
    if _count(scene, obj.shape, obj.colour, size) > 0:
        return None
    return _embed_wrong(scene, rng, obj, _article(f"{size} {obj.colour} {obj.shape}"))


def _wrong_count(scene: Scene, rng: random.Random) -> str | None:
    obj = rng.choice(scene.objects)
    if _count(scene, obj.shape, obj.colour) != 1:
        return None
    return f"{rng.choice(('two', 'three', 'there are two'))} {obj.colour} {obj.shape}s"


def _flipped_relation(scene: Scene, rng: random.Random) -> str:
    a, b = rng.sample(scene.objects, 2)
    # Full names (size included) identify each object uniquely (scenes never repeat a kind), so
    # the flipped relation cannot hold for some other pair of matching objects.
    na, nb = _article(_describe(a, True)), _article(_describe(b, True))
    wrong = rng.choice(REL_PHRASES[_OPPOSITE[rng.choice(relations_between(a, b))]])
    frame = rng.randrange(3)
    if frame == 0:
        return f"{na} {wrong} {nb}"
    if frame == 1:
        return f"there is {na} {wrong} {nb}"
    return f"{wrong} {nb} is {na}"


# Alt-text that says nothing about the picture. No word here may be a colour, shape, size,
# relation or position word of the checker's vocabulary.
_SPAM: tuple[str, ...] = (
    "IMG_{n4}.jpg",
    "IMG_{n4}",
    "DSC_{n4}",
    "DSC{n4}.JPG",
    "image{n2}.png",
    "photo {n3}",
    "untitled",
    "untitled-{n1}",
    "my holiday",
    "my holiday {year}",
    "summer vacation {year}",
    "best price free shipping",
    "click here",
    "click here for more",
    "buy now",
    "limited offer {n2}% off",
    "stock photo",
    "wallpaper hd",
    "thumbnail",
    "default image",
    "screenshot {year}-{n2}-{n2}",
    "copyright {year} all rights reserved",
    "follow us on instagram",
    "new post",
    "see more",
    "download free",
    "logo",
    "banner",
    "cheap deals online",
    "file_{n4}.png",
)


def weak_or_spam(rng: random.Random) -> str:
    """Alt-text that is never a true caption: file names, shop spam, vague words."""
    template = rng.choice(_SPAM)
    return template.format(
        n1=rng.randint(1, 9),
        n2=rng.randint(10, 99),
        n3=rng.randint(100, 999),
        n4=rng.randint(1000, 9999),
        year=rng.randint(2005, 2023),
    )
