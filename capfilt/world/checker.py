"""The caption checker: parses free text and decides whether it is true of a shapes-world scene."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from capfilt.world.scene import ALL_COLOURS, ALL_SHAPES, BACKGROUNDS, SIZES, Obj, Scene, holds
from capfilt.world.words import (
    BACKGROUND_WORDS,
    COLOUR_SYNONYMS,
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
    TEXTURED_WORDS,
    plural,
)

# ---------------------------------------------------------------------------------------------
# Vocabulary: the whole family's, whichever world a scene comes from, so that "a red star" is a
# claim about a star (false of a world without stars), not an unknown word to skip. Words outside
# it are ignored, except where the rules below say otherwise.
# ---------------------------------------------------------------------------------------------

_SHAPE_WORDS: dict[str, str] = {}
_PLURALS: set[str] = set()
for _s in ALL_SHAPES:
    for _w in (_s, *SHAPE_SYNONYMS.get(_s, ())):
        _SHAPE_WORDS[_w] = _SHAPE_WORDS[plural(_w)] = _s
        _PLURALS.add(plural(_w))  # by construction: "cross" and "rhombus" end in s and are singular

# Nouns that name an object without saying which shape it is: "two shapes", "a red object".
_GENERIC_SINGULAR = ("shape", "object", "thing", "figure", "item")
_GENERIC_NOUNS = {*_GENERIC_SINGULAR, *(plural(w) for w in _GENERIC_SINGULAR)}
_PLURALS |= {plural(w) for w in _GENERIC_SINGULAR}

# Colours outside the family's palette are kept as colours: "a pink circle" is a claim that is
# false of every scene, not an unknown word to skip.
_OTHER_COLOURS = {"pink", "white", "magenta", "teal", "navy", "gold", "golden", "silver", "beige"}
_OTHER_COLOURS |= {"turquoise", "maroon", "lime", "indigo"}
_COLOUR_WORDS: dict[str, str] = {c: c for c in (*ALL_COLOURS, *sorted(_OTHER_COLOURS))}
for _c, _ws in COLOUR_SYNONYMS.items():
    _COLOUR_WORDS.update(dict.fromkeys(_ws, _c))

_SIZE_WORDS = {s: s for s in SIZES}
for _z, _ws in SIZE_SYNONYMS.items():
    _SIZE_WORDS.update(dict.fromkeys(_ws, _z))

# (count, exact). Articles and demonstratives claim at least one; numerals claim exactly that many.
_DETERMINERS: dict[str, tuple[int, bool]] = {w: (1, False) for w in ("a", "an", "the", "this", "that")}
_NUMERALS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
for _i, _w in enumerate(_NUMERALS, start=1):
    _DETERMINERS[_w] = (_i, True)
_DETERMINERS["single"] = (1, True)

# Words allowed inside a noun phrase without ending it: "a red coloured circle".
_NP_FILLER = {"coloured", "colored", "shaped"}

# A noun whose adjectives describe the picture, not an object: "on a white background".
_IGNORED_NOUNS = {"background", "backdrop", "canvas"}
# ...except for what it says of the kind of background: "a plain background", "a striped one".
_BACKGROUND_KINDS: dict[str, frozenset[str]] = {
    w: frozenset({kind}) for kind, words in BACKGROUND_WORDS.items() for w in words
}
_BACKGROUND_KINDS |= {w: frozenset(BACKGROUNDS) - {"flat"} for w in TEXTURED_WORDS}

_NEGATIONS = {"no", "not", "without", "never", "none", "nothing", "neither", "nor", "isn't", "aren't"}
_NEGATIONS |= {"doesn't", "don't", "cannot", "can't", "absent", "missing"}

# Positions that are not relative to another object cannot be checked without a convention
# for "the left" of a one-object picture; rather than guess, such captions are rejected.
_POSITION_WORDS = {"left", "right", "top", "bottom", "middle", "centre", "center", "corner"}

_PRONOUNS = {"it", "them"}
_COPULAS = {"is", "are", "looks", "seems"}

# Relation phrases -> (relation, object is a pronoun already in the phrase). "near" holds of
# any two distinct objects.
_REL_PHRASES: dict[tuple[str, ...], tuple[str, bool]] = {}
for _rel in ("left", "right"):
    for _pre in ("to the", "on the", "at the", "to", ""):
        _REL_PHRASES[(*_pre.split(), _rel, "of")] = (_rel, False)
    _REL_PHRASES[("to", "its", _rel)] = (_rel, True)
    _REL_PHRASES[("on", "its", _rel)] = (_rel, True)
for _words, _rel in (
    ("above", "above"),
    ("over", "above"),
    ("higher than", "above"),
    ("on top of", "above"),
    ("below", "below"),
    ("under", "below"),
    ("beneath", "below"),
    ("underneath", "below"),
    ("lower than", "below"),
    ("next to", "near"),
    ("beside", "near"),
    ("near", "near"),
    ("alongside", "near"),
):
    _REL_PHRASES[tuple(_words.split())] = (_rel, False)
_MAX_REL_LEN = max(len(k) for k in _REL_PHRASES)

_SENTENCE_BREAKS = {".", ";", "!", "?"}
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+|[.,;:!?]")


# ---------------------------------------------------------------------------------------------
# Parse results.
# ---------------------------------------------------------------------------------------------


@dataclass
class Mention:
    """One noun phrase that names objects: "two small red circles", "a shape"."""

    text: str
    start: int  # token index, for ordering and for reading reasons
    sentence: int
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    count: int = 1
    exact: bool = False  # True: exactly `count` objects match; False: at least `count`

    def matches(self, obj: Obj) -> bool:
        return (
            self.shape in (None, obj.shape)
            and self.colour in (None, obj.colour)
            and self.size in (None, obj.size)
        )

    @property
    def named(self) -> bool:
        """Named by colour AND shape, as every true caption must name at least one object."""
        return self.shape is not None and self.colour in ALL_COLOURS


@dataclass
class StatedRelation:
    """A stated relation; subject and object are indices into CheckResult.mentions."""

    subject: int
    relation: str  # "left" | "right" | "above" | "below" | "near"
    object: int
    text: str


@dataclass
class CheckResult:
    ok: bool
    reasons: list[str] = field(default_factory=list)  # why not ok; empty when ok
    mentions: list[Mention] = field(default_factory=list)
    relations: list[StatedRelation] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Parsing.
# ---------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("\u2019", "'"))


@dataclass
class _Parse:
    tokens: list[str]
    mentions: list[Mention] = field(default_factory=list)
    # (relation, phrase text, token index, sentence, object mention index or -1 for a pronoun)
    pending: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # (phrase, the background kinds it allows): "plain background" -> {"flat"}
    backgrounds: list[tuple[str, frozenset[str]]] = field(default_factory=list)


def _parse_np(p: _Parse, i: int, sentence: int) -> tuple[int, Mention | None]:
    """Read a noun phrase starting at token `i`: determiners, adjectives, then a noun.

    Returns the index after what was consumed and the mention (None when no noun ended it; a
    colour left without a noun is recorded as a problem, or attached to the previous mention
    when it follows "is": "the circle is red").
    """
    toks = p.tokens
    start = i
    count, exact = 1, False
    while i < len(toks) and (toks[i] in _DETERMINERS or toks[i].isdigit()):
        c, e = (int(toks[i]), True) if toks[i].isdigit() else _DETERMINERS[toks[i]]
        # A numeral wins over an article around it: "a single", "the two".
        if e or not exact:
            count, exact = c, e
        i += 1
    colours: list[str] = []
    sizes: list[str] = []
    adj_start = i
    while i < len(toks) and (toks[i] in _COLOUR_WORDS or toks[i] in _SIZE_WORDS or toks[i] in _NP_FILLER):
        if toks[i] in _COLOUR_WORDS:
            colours.append(_COLOUR_WORDS[toks[i]])
        elif toks[i] in _SIZE_WORDS:
            sizes.append(_SIZE_WORDS[toks[i]])
        i += 1
    noun = toks[i] if i < len(toks) else ""
    if noun in _IGNORED_NOUNS:
        return i + 1, None
    if noun not in _SHAPE_WORDS and noun not in _GENERIC_NOUNS:
        if colours or sizes:
            _dangling(p, start, adj_start, i, colours, sizes)
        return max(i, start + 1), None
    is_plural = noun in _PLURALS
    if is_plural and not exact and count == 1:
        count = 2  # "red circles": at least two
    m = Mention(
        text=" ".join(toks[start : i + 1]),
        start=start,
        sentence=sentence,
        shape=_SHAPE_WORDS.get(noun),
        count=count,
        exact=exact,
    )
    if len(set(colours)) > 1:
        p.problems.append(f"'{m.text}' gives more than one colour")
    elif colours:
        m.colour = colours[0]
    if len(set(sizes)) > 1:
        p.problems.append(f"'{m.text}' gives more than one size")
    elif sizes:
        m.size = sizes[0]
    return i + 1, m


def _dangling(p: _Parse, start: int, adj_start: int, end: int, colours: list[str], sizes: list[str]) -> None:
    """Adjectives with no noun after them: a predicate of the last mention, or a problem."""
    toks = p.tokens
    words = " ".join(toks[adj_start:end])
    last = p.mentions[-1] if p.mentions else None
    # "the circle is red": the copula directly follows the mention's noun.
    if last is not None and start == adj_start and start >= 1 and toks[start - 1] in _COPULAS:
        noun_end = last.start + len(last.text.split())
        if noun_end == start - 1:
            for attr, values in (("colour", colours), ("size", sizes)):
                if not values:
                    continue
                current = getattr(last, attr)
                if len(set(values)) > 1 or (current is not None and current != values[0]):
                    p.problems.append(f"'{last.text}' is said to be '{words}'")
                else:
                    setattr(last, attr, values[0])
            return
    if colours:
        p.problems.append(f"colour word(s) '{words}' name no shape")


def _background_claims(p: _Parse) -> None:
    """What the text says of the background: the kind words just before a background noun,
    colour words between them skipped ("a plain white background")."""
    toks = p.tokens
    for k, tok in enumerate(toks):
        if tok not in _IGNORED_NOUNS:
            continue
        j = k - 1
        while j >= 0 and toks[j] in _COLOUR_WORDS:
            j -= 1
        allowed: frozenset[str] | None = None
        while j >= 0 and toks[j] in _BACKGROUND_KINDS:
            kinds = _BACKGROUND_KINDS[toks[j]]
            allowed = kinds if allowed is None else allowed & kinds
            j -= 1
        if allowed is not None:
            p.backgrounds.append((" ".join(toks[j + 1 : k + 1]), allowed))


def _parse(text: str) -> _Parse:
    p = _Parse(tokenize(text))
    _background_claims(p)
    toks = p.tokens
    sentence = 0
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok in _SENTENCE_BREAKS:
            sentence += 1
            i += 1
            continue
        if tok in _NEGATIONS:
            p.problems.append(f"negation '{tok}' is not supported")
            i += 1
            continue
        rel = _match_relation(toks, i)
        if rel is not None:
            relation, length, pronoun = rel
            phrase = " ".join(toks[i : i + length])
            j = i + length
            if pronoun:
                p.pending.append((relation, phrase, i, sentence, -1))
                i = j
                continue
            if j < len(toks) and toks[j] in _PRONOUNS:
                p.pending.append((relation, phrase + " " + toks[j], i, sentence, -1))
                i = j + 1
                continue
            end, obj = _parse_np(p, j, sentence)
            if obj is None:
                p.problems.append(f"relation '{phrase}' has no object after it")
                i = j
                continue
            p.mentions.append(obj)
            p.pending.append((relation, f"{phrase} {obj.text}", i, sentence, len(p.mentions) - 1))
            i = end
            continue
        if tok in _POSITION_WORDS:
            p.problems.append(f"position word '{tok}' is not relative to a named object")
            i += 1
            continue
        end, m = _parse_np(p, i, sentence)
        if m is not None:
            p.mentions.append(m)
        i = end
    return p


def _match_relation(toks: list[str], i: int) -> tuple[str, int, bool] | None:
    for length in range(min(_MAX_REL_LEN, len(toks) - i), 0, -1):
        hit = _REL_PHRASES.get(tuple(toks[i : i + length]))
        if hit is not None:
            return hit[0], length, hit[1]
    return None


def _resolve(p: _Parse) -> list[StatedRelation]:
    """Find each relation's subject (and a pronoun object's referent).

    Subject: the nearest mention before the phrase in the same sentence ("a red circle left of
    a blue square"); with none, the first mention after the object ("left of a blue square is
    a red circle"). A pronoun ("above it", "to its left") refers to the mention just before the
    subject ("a blue square with a red circle above it").
    """
    out: list[StatedRelation] = []
    ms = p.mentions
    for relation, phrase, at, sentence, obj in p.pending:
        before = [k for k, m in enumerate(ms) if m.sentence == sentence and m.start < at]
        if before:
            subj = before[-1]
        else:
            after_obj = ms[obj].start if obj >= 0 else at
            later = [k for k, m in enumerate(ms) if m.sentence == sentence and m.start > after_obj]
            if not later:
                p.problems.append(f"relation '{phrase}' has no subject")
                continue
            subj = later[0]
        if obj < 0:
            earlier = [k for k, m in enumerate(ms) if m.sentence == sentence and m.start < ms[subj].start]
            if not earlier:
                p.problems.append(f"'{phrase}' refers to nothing named before it")
                continue
            obj = earlier[-1]
        out.append(StatedRelation(subj, relation, obj, phrase))
    return out


# ---------------------------------------------------------------------------------------------
# Checking.
# ---------------------------------------------------------------------------------------------


def explain_caption(scene: Scene, text: str) -> CheckResult:
    """Parse `text` and check every claim in it against `scene`; `reasons` says what failed."""
    p = _parse(text or "")
    relations = _resolve(p)
    reasons = list(p.problems)
    for m in p.mentions:
        n = sum(m.matches(o) for o in scene.objects)
        if m.exact and n != m.count:
            reasons.append(f"'{m.text}': the scene has {n}, not {m.count}")
        elif not m.exact and n < m.count:
            reasons.append(f"'{m.text}': the scene has {n}" + (f", fewer than {m.count}" if n else ""))
    for r in relations:
        s, o = p.mentions[r.subject], p.mentions[r.object]
        if not _relation_holds(scene, s, r.relation, o):
            reasons.append(f"'{s.text}' is not {r.text}")
    for phrase, allowed in p.backgrounds:
        if scene.background not in allowed:
            reasons.append(f"'{phrase}': the background is {scene.background}")
    if not any(m.named for m in p.mentions):
        reasons.append("no object is named by both colour and shape")
    reasons = list(dict.fromkeys(reasons))  # a phrase re-read after a relation reports once
    return CheckResult(ok=not reasons, reasons=reasons, mentions=p.mentions, relations=relations)


def _relation_holds(scene: Scene, subject: Mention, relation: str, obj: Mention) -> bool:
    for a in scene.objects:
        if not subject.matches(a):
            continue
        for b in scene.objects:
            if b is not a and obj.matches(b) and (relation == "near" or holds(relation, a, b)):
                return True
    return False


def check_caption(scene: Scene, text: str) -> bool:
    """Whether `text` is a true caption of `scene` (see explain_caption for why not)."""
    return explain_caption(scene, text).ok
