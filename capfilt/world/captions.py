"""Caption generators of the shapes world: true captions, near misses and weak or spam alt-text.

Every generator takes a ``Language``: the world's shapes and colours (near misses and groups
choose among them) and its phrasing. ``PLAIN``, the default, is the default world's: the same
random draws and the same texts as before the family existed. ``"varied"`` phrasing adds frames,
relation phrases, synonyms, capitals and full stops, and more kinds of spam, all of them read by
the checker.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from capfilt.world.scene import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    relations_between,
)
from capfilt.world.words import (
    BACKGROUND_WORDS,
    COLOUR_SYNONYMS,
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
    TEXTURED_WORDS,
    plural,
)

PHRASINGS: tuple[str, ...] = ("plain", "varied")

# Surface forms of each relation, as the checker accepts them.
REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath", "underneath"),
}
_VARIED_REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left": (*REL_PHRASES["left"], "at the left of", "to left of"),
    "right": (*REL_PHRASES["right"], "at the right of", "to right of"),
    "above": (*REL_PHRASES["above"], "higher than", "on top of"),
    "below": (*REL_PHRASES["below"], "lower than"),
}
_NEAR_PHRASES = ("next to", "beside", "near", "alongside")
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_NUMBER = {1: "one", 2: "two", 3: "three"}

_ONE_OBJECT_FRAMES = (
    "{}",
    "a picture of {}",
    "a photo of {}",
    "an image of {}",
    "there is {}",
    "{} on a {bg} background",  # "plain" on the default world's flat backgrounds
)
_VARIED_ONE_OBJECT_FRAMES = (
    *_ONE_OBJECT_FRAMES,
    "a drawing of {}",
    "a rendering of {}",
    "a simple drawing of {}",
    "here is {}",
    "you can see {}",
    "{} in the picture",
    "{} drawn on a {bg} background",
    "a close up of {}",
    "this image shows {}",
    "clipart of {}",
)
# Verbs between a subject and its relation: "a red circle sits above a blue square".
_VARIED_VERBS = ("sits", "is placed", "can be seen", "is drawn", "appears")
_VARIED_SHAPE_NOUNS = ("shapes", "objects", "figures", "items")


@dataclass(frozen=True)
class Language:
    """What a world's texts may name, and how they say it."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    phrasing: str = "plain"
    # With more than flat backgrounds, a near miss may also get the background wrong.
    backgrounds: tuple[str, ...] = ("flat",)

    def __post_init__(self) -> None:
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing {self.phrasing!r}; use one of {PHRASINGS}")
        for what, values, family in (
            ("shape", self.shapes, ALL_SHAPES),
            ("colour", self.colours, ALL_COLOURS),
            ("background", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [v for v in values if v not in family]
            if unknown:
                raise ValueError(f"unknown {what}(s) {unknown}; the family has {list(family)}")

    @property
    def varied(self) -> bool:
        return self.phrasing == "varied"

    def frames(self) -> tuple[str, ...]:
        return _VARIED_ONE_OBJECT_FRAMES if self.varied else _ONE_OBJECT_FRAMES

    def rel_phrases(self, relation: str) -> tuple[str, ...]:
        return (_VARIED_REL_PHRASES if self.varied else REL_PHRASES)[relation]

    def word(self, rng: random.Random, value: str) -> str:
        """The word for a shape, colour or size; varied phrasing uses a synonym now and then."""
        if not self.varied:
            return value
        synonyms = SHAPE_SYNONYMS.get(value) or COLOUR_SYNONYMS.get(value) or SIZE_SYNONYMS.get(value)
        if synonyms and rng.random() < 0.3:
            return rng.choice(synonyms)
        return value

    def background_word(self, rng: random.Random, background: str) -> str:
        """A word for a kind of background: the first of BACKGROUND_WORDS in plain phrasing."""
        if not self.varied:
            return BACKGROUND_WORDS[background][0]
        return rng.choice(BACKGROUND_WORDS[background] + (TEXTURED_WORDS if background != "flat" else ()))

    def frame(self, rng: random.Random, scene: Scene) -> str:
        """A one-object frame for `scene`, "{}" where the noun phrase goes: "a picture of {}",
        "{} on a plain background". Drawn before the phrase, as the default world always did."""
        frame = rng.choice(self.frames())
        if "{bg}" in frame:
            return frame.format("{}", bg=self.background_word(rng, scene.background))
        return frame

    def finish(self, rng: random.Random, text: str) -> str:
        """Varied phrasing capitalises some texts and ends some with a full stop."""
        if not self.varied or not text:
            return text
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.3:
            text += "."
        return text


PLAIN = Language()


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(
    obj: Obj,
    with_size: bool,
    with_colour: bool = True,
    rng: random.Random | None = None,
    lang: Language = PLAIN,
) -> str:
    """The bare noun phrase: "small red circle", "red circle", "circle"."""
    words = []
    if with_size:
        words.append(obj.size)
    if with_colour:
        words.append(obj.colour)
    words.append(obj.shape)
    if rng is not None and lang.varied:
        words = [lang.word(rng, w) for w in words]
    return " ".join(words)


def _np(obj: Obj, rng: random.Random, with_colour: bool = True, lang: Language = PLAIN) -> str:
    """ "a red circle" or "a small red circle", chosen at random."""
    return _article(_describe(obj, rng.random() < 0.5, with_colour, rng, lang))


def _phrase(rng: random.Random, lang: Language, *words: str) -> str:
    """Attribute words (possibly empty) joined, each maybe replaced by a synonym."""
    return " ".join(lang.word(rng, w) for w in words if w)


def _count(scene: Scene, shape: str, colour: str | None = None, size: str | None = None) -> int:
    return sum(
        o.shape == shape and colour in (None, o.colour) and size in (None, o.size) for o in scene.objects
    )


def _rel_phrase(rng: random.Random, a: Obj, b: Obj, lang: Language = PLAIN) -> str:
    """A phrase for one relation that holds of `a` with respect to `b`."""
    return rng.choice(lang.rel_phrases(rng.choice(relations_between(a, b))))


def _pronoun_rel(rng: random.Random, a: Obj, b: Obj, lang: Language = PLAIN) -> str:
    """A relation of `a` with respect to `b` where `b` is named by a pronoun: "above it", "to its left"."""
    rel = rng.choice(relations_between(a, b))
    if rel in ("left", "right") and rng.random() < 0.5:
        return f"to its {rel}"
    return f"{rng.choice(lang.rel_phrases(rel))} it"


def _listing(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _shapes_noun(rng: random.Random, lang: Language) -> str:
    return rng.choice(_VARIED_SHAPE_NOUNS) if lang.varied else "shapes"


def _one_object_caption(scene: Scene, rng: random.Random, lang: Language) -> str:
    obj = rng.choice(scene.objects)
    if rng.random() < 0.2:
        # "one"/"a single" state an exact count, so they are used only where it is right.
        with_size = rng.random() < 0.5
        n = _count(scene, obj.shape, obj.colour, obj.size if with_size else None)
        if n == 1:
            return f"{rng.choice(('one', 'a single'))} {_describe(obj, with_size, True, rng, lang)}"
    return lang.frame(rng, scene).format(_np(obj, rng, lang=lang))


def _pair_caption(scene: Scene, rng: random.Random, lang: Language) -> str:
    a, b = rng.sample(scene.objects, 2)
    # The second object is sometimes named by its shape alone: still checkable, and the first
    # one carries the colour-and-shape name every true caption needs.
    na, nb = _np(a, rng, lang=lang), _np(b, rng, with_colour=rng.random() < 0.85, lang=lang)
    frame = rng.randrange(9 if lang.varied else 7)
    if frame == 0:
        return f"{na} and {nb}"
    if frame == 1:
        return f"{na} {_rel_phrase(rng, a, b, lang)} {nb}"
    if frame == 2:
        return f"{rng.choice(('there is', 'a picture of', 'a photo of'))} {na} {_rel_phrase(rng, a, b, lang)} {nb}"
    if frame == 3:
        return f"{na} is {_rel_phrase(rng, a, b, lang)} {nb}"
    if frame == 4:
        return f"{nb} with {na} {_pronoun_rel(rng, a, b, lang)}"
    if frame == 5:
        # Inverted order: "to the left of a blue square is a red circle".
        verb = rng.choice(("is", "there is", "sits"))
        return f"{_rel_phrase(rng, a, b, lang)} {nb} {verb} {na}"
    if frame == 7:
        return f"{na} {rng.choice(_VARIED_VERBS)} {_rel_phrase(rng, a, b, lang)} {nb}"
    if frame == 8:
        return f"{na} {rng.choice(_NEAR_PHRASES)} {nb}"
    n = len(scene.objects)
    noun = _shapes_noun(rng, lang)
    head = rng.choice((f"{_NUMBER[n]} {noun}:", f"a picture of {_NUMBER[n]} {noun}:"))
    if n == 2:
        return f"{head} {na} and {nb}"
    return f"{head} {na} {_rel_phrase(rng, a, b, lang)} {nb}, and more"


def _all_objects_caption(scene: Scene, rng: random.Random, lang: Language) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    listing = _listing([_np(o, rng, lang=lang) for o in objs])
    n = len(objs)
    noun = _shapes_noun(rng, lang)
    return rng.choice(
        (listing, f"{_NUMBER[n]} {noun}: {listing}", f"a picture of {_NUMBER[n]} {noun}: {listing}")
    )


def _two_relations_caption(scene: Scene, rng: random.Random, lang: Language) -> str:
    a, b, c = rng.sample(scene.objects, 3)
    first = f"{_np(a, rng, lang=lang)} {_rel_phrase(rng, a, b, lang)} {_np(b, rng, lang=lang)}"
    last = (
        f"{_np(c, rng, lang=lang)} {_rel_phrase(rng, c, b, lang)} the {_describe(b, True, True, rng, lang)}"
    )
    return f"{first}, and {last}"


def _group_caption(scene: Scene, rng: random.Random, lang: Language) -> str | None:
    """ "two red circles": only for scenes that hold two objects of one colour and shape."""
    heads = ("two", "there are two", "a pair of") if lang.varied else ("two", "there are two")
    for shape in lang.shapes:
        for colour in lang.colours:
            if _count(scene, shape, colour) == 2:
                return f"{rng.choice(heads)} {_phrase(rng, lang, colour)} {plural(_phrase(rng, lang, shape))}"
    return None


def true_captions(scene: Scene, rng: random.Random, n: int, lang: Language = PLAIN) -> list[str]:
    """`n` distinct captions that are true of `scene`, in several phrasings; relations are used
    whenever the scene has two or more objects."""
    makers: list[Callable[[Scene, random.Random, Language], str | None]] = [_one_object_caption]
    if len(scene.objects) >= 2:
        makers += [_pair_caption, _pair_caption, _pair_caption, _all_objects_caption, _group_caption]
    if len(scene.objects) == 3:
        makers += [_two_relations_caption]
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        text = rng.choice(makers)(scene, rng, lang)
        if text is not None:
            text = lang.finish(rng, text)
        if text is not None and text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                return out
    raise ValueError(f"scene {scene.image_id} yields fewer than {n} distinct true captions; ask for fewer")


def near_miss(scene: Scene, rng: random.Random, lang: Language = PLAIN) -> str:
    """A caption that is false of `scene` because exactly one thing is wrong: one object's colour,
    shape or size (among the world's colours and shapes), a relation flipped, or a count."""
    options: list[Callable[[], str | None]] = [
        lambda: _wrong_colour(scene, rng, lang),
        lambda: _wrong_shape(scene, rng, lang),
        lambda: _wrong_size(scene, rng, lang),
        lambda: _wrong_count(scene, rng, lang),
    ]
    if len(scene.objects) >= 2:
        options += [lambda: _flipped_relation(scene, rng, lang)] * 2
    if lang.backgrounds != ("flat",):  # never in the default world, whose draws stay as they were
        options += [lambda: _wrong_background(scene, rng, lang)]
    rng.shuffle(options)
    for make in options:
        text = make()
        if text is not None:
            return lang.finish(rng, text)
    # Unreachable with two or more colours: some colour is always free for one object.
    raise RuntimeError(f"no near miss for scene {scene.image_id}")


def _embed_wrong(scene: Scene, rng: random.Random, obj: Obj, wrong: str, lang: Language) -> str:
    """Put a wrong noun phrase for `obj` where a true one would go, next to the true rest."""
    others = [o for o in scene.objects if o is not obj]
    if not others or rng.random() < 0.4:
        return lang.frame(rng, scene).format(wrong)
    other = rng.choice(others)
    if rng.random() < 0.5:
        return f"{wrong} {_rel_phrase(rng, obj, other, lang)} {_np(other, rng, lang=lang)}"
    return f"{_np(other, rng, lang=lang)} and {wrong}"


def _wrong_colour(scene: Scene, rng: random.Random, lang: Language) -> str | None:
    obj = rng.choice(scene.objects)
    # No object of the new colour and this shape exists at all, so the phrase matches nothing.
    free = [c for c in lang.colours if _count(scene, obj.shape, c) == 0]
    if not free:
        return None
    colour = rng.choice(free)
    size = obj.size if rng.random() < 0.5 else ""
    return _embed_wrong(scene, rng, obj, _article(_phrase(rng, lang, size, colour, obj.shape)), lang)


def _wrong_shape(scene: Scene, rng: random.Random, lang: Language) -> str | None:
    obj = rng.choice(scene.objects)
    free = [s for s in lang.shapes if _count(scene, s, obj.colour) == 0]
    if not free:
        return None
    size = obj.size if rng.random() < 0.5 else ""
    shape = rng.choice(free)
    return _embed_wrong(scene, rng, obj, _article(_phrase(rng, lang, size, obj.colour, shape)), lang)


def _wrong_size(scene: Scene, rng: random.Random, lang: Language) -> str | None:
    obj = rng.choice(scene.objects)
    size = next(s for s in SIZES if s != obj.size)
    if _count(scene, obj.shape, obj.colour, size) > 0:
        return None
    return _embed_wrong(scene, rng, obj, _article(_phrase(rng, lang, size, obj.colour, obj.shape)), lang)


def _wrong_count(scene: Scene, rng: random.Random, lang: Language) -> str | None:
    obj = rng.choice(scene.objects)
    if _count(scene, obj.shape, obj.colour) != 1:
        return None
    head = rng.choice(("two", "three", "there are two"))
    return f"{head} {_phrase(rng, lang, obj.colour)} {plural(_phrase(rng, lang, obj.shape))}"


def _wrong_background(scene: Scene, rng: random.Random, lang: Language) -> str:
    """True objects on the wrong kind of background: "a red circle on a striped background"."""
    obj = rng.choice(scene.objects)
    wrong = rng.choice([b for b in BACKGROUNDS if b != scene.background])
    words = BACKGROUND_WORDS[wrong]
    word = rng.choice(words) if lang.varied else words[0]
    return f"{rng.choice(('', 'a picture of ', 'a drawing of '))}{_np(obj, rng, lang=lang)} on a {word} background"


def _flipped_relation(scene: Scene, rng: random.Random, lang: Language) -> str:
    a, b = rng.sample(scene.objects, 2)
    # Full names (size included) identify each object uniquely (scenes never repeat a kind), so
    # the flipped relation cannot hold for some other pair of matching objects.
    na, nb = _article(_describe(a, True, True, rng, lang)), _article(_describe(b, True, True, rng, lang))
    wrong = rng.choice(lang.rel_phrases(_OPPOSITE[rng.choice(relations_between(a, b))]))
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
# More of the same for varied phrasing, some of it about shapes in general: weak alt-text that
# names no object by colour and shape.
_VARIED_SPAM: tuple[str, ...] = (
    *_SPAM,
    "geometric shapes",
    "abstract shapes wallpaper",
    "colorful shapes {n2}",
    "some shapes on a background",
    "learning shapes for kids",
    "shapes clipart pack {n2}",
    "vector illustration {n3}",
    "abstract art print",
    "modern minimalist design",
    "product photo {n4}",
    "pattern background {n2}",
    "texture {n3} seamless",
    "an image",
    "a picture",
    "picture of objects",
    "figure {n1}",
    "item #{n4}",
    "poster for sale",
    "sticker sheet {year}",
    "Fig. {n1}",
)


def weak_or_spam(rng: random.Random, lang: Language = PLAIN) -> str:
    """Alt-text that is never a true caption: file names, shop spam, vague words."""
    template = rng.choice(_VARIED_SPAM if lang.varied else _SPAM)
    return template.format(
        n1=rng.randint(1, 9),
        n2=rng.randint(10, 99),
        n3=rng.randint(100, 999),
        n4=rng.randint(1000, 9999),
        year=rng.randint(2005, 2023),
    )
