"""Tests of the caption checker on hand-written captions, and of the caption generators against it."""

from __future__ import annotations

import random

import pytest

from capfilt.world import (
    Obj,
    Scene,
    check_caption,
    explain_caption,
    near_miss,
    sample_scene,
    true_captions,
    weak_or_spam,
)

# A small red circle up and to the left of a large blue square.
TWO = Scene(
    "two",
    (
        Obj("circle", "red", "small", 0.2, 0.3),
        Obj("square", "blue", "large", 0.7, 0.6),
    ),
)

# A large green triangle bottom left; a small yellow circle top middle; a large yellow circle
# right, between them in height.
THREE = Scene(
    "three",
    (
        Obj("triangle", "green", "large", 0.25, 0.75),
        Obj("circle", "yellow", "small", 0.5, 0.25),
        Obj("circle", "yellow", "large", 0.8, 0.5),
    ),
)

ONE = Scene("one", (Obj("triangle", "purple", "small", 0.5, 0.5),))


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",
        "a small red circle",
        "red circle",
        "A Red Circle.",
        "a picture of a red circle",
        "there is a large blue square",
        "a red disc",
        "a red circle on a white background",
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "left of the blue square is a red circle",
        "to the right of a red circle there is a blue square",
        "a red circle is left of a large blue square",
        "a red circle above a large blue square",
        "a red circle above that blue square",
        "a blue square below a red circle",
        "there is a blue square under a small red circle",
        "a large blue square beneath a red circle",
        "a red circle, to the left of a blue square",
        "a blue square with a red circle to its left",
        "a blue square with a red circle above it",
        "a red circle next to a blue square",
        "a red circle and a square",
        "a red circle and a blue square",
        "a picture of two shapes: a red circle and a blue square",
        "two shapes: a small red circle and a large blue square",
        "one red circle",
        "a single small red circle",
        "the circle is red",
        "a circle that is small and a red circle",
        "a red coloured circle",
    ],
)
def test_true_captions_of_two_objects(text: str) -> None:
    result = explain_caption(TWO, text)
    assert result.ok, result.reasons


@pytest.mark.parametrize(
    "text",
    [
        # wrong relation
        "a red circle to the right of a blue square",
        "a blue square to the left of a red circle",
        "a red circle below a blue square",
        "a blue square above a red circle",
        "right of the blue square is a red circle",
        "a blue square with a red circle to its right",
        "a blue square with a red circle under it",
        # wrong colour, size or shape
        "a green circle",
        "a red circle to the left of a green square",
        "a large red circle",
        "a small blue square",
        "a red triangle",
        "a blue circle",
        # an object that is not there, or the same object twice
        "a red circle and a green triangle",
        "a red circle to the left of a red circle",
        "a red circle next to a red circle",
        # counts
        "two red circles",
        "red circles",
        "three shapes: a red circle and a blue square",
        "a picture of one shape: a red circle",
        # nothing named by colour and shape
        "",
        "   ",
        "a circle",
        "a circle and a square",
        "a red shape",
        "red",
        "red and blue",
        # unverifiable, contradictory or garbled
        "a red circle on the left",
        "a red circle above",
        "a red circle above it",
        "a red circle above that",
        "a red circle with no blue square",
        "not a green circle but a red circle",
        "a pink circle",
        "a red blue circle",
        "a small large red circle",
        "a red circle and a red",
        "the circle is blue",
        "a red circle is large",
        # spam
        "best price free shipping",
        "IMG_2041.jpg",
        "DSC_0042",
        "click here",
        "my holiday",
        "untitled",
    ],
)
def test_false_captions_of_two_objects(text: str) -> None:
    result = explain_caption(TWO, text)
    assert not result.ok, f"{text!r} was judged true"
    assert result.reasons


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("two yellow circles", True),
        ("there are two yellow circles and a green triangle", True),
        ("three shapes: a green triangle, a small yellow circle and a large yellow circle", True),
        ("a green triangle left of a yellow circle", True),
        ("a green triangle below a small yellow circle", True),
        ("a green triangle below a large yellow circle", True),
        ("a small yellow circle above a large yellow circle", True),
        ("a small yellow circle left of a large yellow circle", True),
        ("a yellow circle above a yellow circle", True),
        ("a yellow circle left of a green triangle", False),
        ("a green triangle above a yellow circle", False),
        ("a large yellow circle left of a small yellow circle", False),
        ("a single yellow circle", False),
        ("three yellow circles", False),
        ("two shapes: a green triangle and a yellow circle", False),
        ("a green triangle and a small green circle", False),
    ],
)
def test_counts_and_relations_with_three_objects(text: str, expected: bool) -> None:
    assert check_caption(THREE, text) is expected, explain_caption(THREE, text).reasons


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a small purple triangle", True),
        ("a picture of one shape: a purple triangle", True),
        ("a violet triangle", True),
        ("a purple triangle left of a purple triangle", False),
        ("a purple triangle next to a shape", False),
        ("a purple square", False),
    ],
)
def test_one_object(text: str, expected: bool) -> None:
    assert check_caption(ONE, text) is expected, explain_caption(ONE, text).reasons


def test_explain_reports_parse() -> None:
    result = explain_caption(TWO, "a red circle to the right of a blue square")
    assert not result.ok
    assert [(m.colour, m.shape) for m in result.mentions] == [("red", "circle"), ("blue", "square")]
    assert [(r.subject, r.relation, r.object) for r in result.relations] == [(0, "right", 1)]
    assert any("right of" in reason for reason in result.reasons)


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, f"s{i}") for i in range(n)]


def test_every_generated_true_caption_passes() -> None:
    rng = random.Random(1)
    for scene in _scenes(400, seed=1):
        captions = true_captions(scene, rng, 5)
        assert len(set(captions)) == 5
        for text in captions:
            result = explain_caption(scene, text)
            assert result.ok, (scene, text, result.reasons)


def test_every_near_miss_fails() -> None:
    rng = random.Random(2)
    for scene in _scenes(400, seed=2):
        for _ in range(3):
            text = near_miss(scene, rng)
            assert not check_caption(scene, text), (scene, text)


def test_every_weak_or_spam_fails() -> None:
    rng = random.Random(3)
    scenes = _scenes(50, seed=3)
    for i in range(1000):
        text = weak_or_spam(rng)
        assert not check_caption(scenes[i % len(scenes)], text), text
