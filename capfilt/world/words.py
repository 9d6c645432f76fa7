"""The shapes family's words: the synonyms and plurals that captions write and the checker reads."""

from __future__ import annotations

# Other words for a shape, colour or size. Varied phrasing writes them; the checker reads them
# whatever the phrasing, as a person reading alt-text would.
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {"circle": ("disc", "disk"), "diamond": ("rhombus",)}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {"purple": ("violet",), "grey": ("gray",)}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("little", "tiny"), "large": ("big", "huge")}


def plural(noun: str) -> str:
    """ "circle" -> "circles", "cross" -> "crosses", "rhombus" -> "rhombuses"."""
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


# Words for a background, by kind (capfilt/world/scene.py: BACKGROUNDS); the first is the one
# plain phrasing writes. "textured" and "patterned" say any kind but flat. The checker holds a
# caption to what it says of the background: "on a plain background" is false of stripes.
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "flat": ("plain", "flat", "blank"),
    "noise": ("noisy", "grainy", "speckled"),
    "stripes": ("striped", "stripy"),
    "gradient": ("gradient", "shaded"),
    "checks": ("checked", "checkered", "chequered"),
}
TEXTURED_WORDS: tuple[str, ...] = ("textured", "patterned")
