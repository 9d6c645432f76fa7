"""Caption text cleaning: BLIP's ``pre_caption`` behaviour, made safe for arbitrary web text."""

from __future__ import annotations

import sys

__all__ = ["BLIP_PUNCTUATION", "pre_caption"]

# The characters BLIP's pre_caption turns into spaces. Others (",", "'", "-", "?", "/") are kept,
# as in BLIP, so the tokenizer still sees them.
BLIP_PUNCTUATION = '.!"()*#:;~'


def _build_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {ord(c): " " for c in BLIP_PUNCTUATION}
    # C0/C1 control characters: those Python counts as whitespace (tab, newline, NEL, ...) become
    # spaces so words on either side stay apart; the rest are dropped. Format characters (category
    # Cf: zero-width joiners inside emoji, right-to-left marks) are kept on purpose.
    for cp in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        table[cp] = " " if chr(cp).isspace() else None
    # Lone surrogates cannot be encoded as UTF-8, so Arrow and the tokenizer would fail on them later.
    for cp in range(0xD800, 0xE000):
        table[cp] = None
    return table


_TABLE = _build_table()


def pre_caption(text: str | None, max_words: int | None = 30) -> str:
    """Clean one caption the way BLIP does before tokenizing.

    Lowercases, turns ``.!"()*#:;~`` into spaces, drops control characters, collapses every run
    of whitespace (any Unicode whitespace, newlines included) to one space, strips, and keeps the
    first ``max_words`` words (``None`` keeps all). ``None`` gives ``""``. Emoji and right-to-left
    scripts pass through unchanged apart from lowercasing.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise TypeError(f"pre_caption expects str or None, got {type(text).__name__}; decode bytes first")
    if max_words is not None and max_words < 1:
        raise ValueError(f"max_words must be >= 1 or None, got {max_words}")
    cleaned = text.lower().translate(_TABLE)
    # str.split with no separator splits on runs of any whitespace and drops empty ends; maxsplit
    # stops the scan once we have enough words, so long inputs cost little past the kept prefix.
    limit = sys.maxsize if max_words is None else max_words
    words = cleaned.split(maxsplit=limit)[:limit]
    return " ".join(words)
