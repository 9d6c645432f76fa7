"""Tests of the shapes world: scenes, rendering, and make_world's files, labels and splits."""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from capfilt.world import (
    ALL_COLOURS,
    ALL_SHAPES,
    BACKGROUNDS,
    BAD_KINDS,
    FAIL_KINDS,
    MARGIN,
    SHAPES,
    Obj,
    Scene,
    WorldConfig,
    check_caption,
    load_world,
    make_world,
    render,
    sample_scene,
)

SMALL = WorldConfig(seed=3, n_web=300, n_human=20, captions_per_human=4, n_test=30, image_size=48)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Scenes and rendering.
# ---------------------------------------------------------------------------------------------


def test_sampled_scenes_are_unambiguous() -> None:
    rng = random.Random(0)
    sizes = Counter()
    for i in range(500):
        scene = sample_scene(rng, f"s{i}")
        sizes[len(scene.objects)] += 1
        assert len({o.kind for o in scene.objects}) == len(scene.objects), "a kind repeats"
        for o in scene.objects:
            assert 0 < o.x < 1 and 0 < o.y < 1
        for a, b in combinations(scene.objects, 2):
            assert abs(a.x - b.x) >= MARGIN and abs(a.y - b.y) >= MARGIN
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert set(sizes) == {1, 2, 3}


def test_obj_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError, match="unknown colour"):
        Obj("circle", "pink", "small", 0.5, 0.5)


def _object_pixels(img: Image.Image) -> int:
    """Pixels far from the background colour (the corner pixel)."""
    a = np.asarray(img).astype(int)
    return int((np.abs(a - a[0, 0]).sum(axis=2) > 60).sum())


@pytest.mark.parametrize("size", [32, 64, 100, 384])
def test_render_size_determinism_and_object_sizes(size: int) -> None:
    small = Scene("x", (Obj("square", "blue", "small", 0.5, 0.5),))
    large = Scene("x", (Obj("square", "blue", "large", 0.5, 0.5),))
    img = render(small, size)
    assert img.mode == "RGB" and img.size == (size, size)
    assert np.array_equal(np.asarray(img), np.asarray(render(small, size)))
    assert _object_pixels(render(large, size)) > 2.5 * _object_pixels(img)


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow", "purple", "orange"])
def test_render_colours_are_what_they_say(colour: str) -> None:
    from capfilt.world.render import PALETTE

    img = render(Scene("c", (Obj("circle", colour, "large", 0.5, 0.5),)), 64)
    centre = np.asarray(img)[32, 32].astype(int)
    nearest = min(PALETTE, key=lambda c: int(np.abs(np.array(PALETTE[c]) - centre).sum()))
    assert nearest == colour


# ---------------------------------------------------------------------------------------------
# make_world.
# ---------------------------------------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="sum to 1"):
        WorldConfig(noise={"correct": 0.5, "weak": 0.2})
    with pytest.raises(ValidationError, match="unknown noise label"):
        WorldConfig(noise={"correct": 0.9, "typo": 0.1})
    with pytest.raises(ValidationError):
        WorldConfig(n_webs=10)  # type: ignore[call-arg]
    assert WorldConfig(noise={"correct": 1.0}).noise == {
        "correct": 1.0,
        "mismatched": 0.0,
        "near_miss": 0.0,
        "weak": 0.0,
    }


def test_same_seed_same_files_other_seed_other_files(world_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_world(again, SMALL)
    assert _files(again) == _files(world_dir)
    other = tmp_path / "other"
    make_world(other, SMALL.model_copy(update={"seed": 4}))
    assert (other / "web.parquet").read_bytes() != (world_dir / "web.parquet").read_bytes()
    # Regenerating in place gives the same world again.
    make_world(again, SMALL)
    assert _files(again) == _files(world_dir)


def test_refuses_a_non_world_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make_world(tmp_path, SMALL)


def test_labels_align_with_web_rows(world_dir: Path) -> None:
    web = pq.read_table(world_dir / "web.parquet")
    labels = pq.read_table(world_dir / "web_labels.parquet")
    assert web.column_names == ["path", "caption"]
    assert labels.column("row").to_pylist() == list(range(web.num_rows))
    assert labels.column("path").to_pylist() == web.column("path").to_pylist()
    assert labels.column("caption").to_pylist() == web.column("caption").to_pylist()
    for row in labels.to_pylist():
        assert row["is_correct"] == (row["label"] == "correct")
        assert (row["bad_kind"] is None) == (row["label"] != "bad")


def test_noise_mix_and_truth_of_labels(world_dir: Path) -> None:
    world = load_world(world_dir)
    rows = [r for r in world.labels.to_pylist() if r["label"] != "bad"]
    assert len(rows) == SMALL.n_web
    counts = Counter(r["label"] for r in rows)
    for label, share in SMALL.noise.items():
        assert abs(counts[label] / len(rows) - share) < 0.01, (label, counts)
    for r in rows:
        scene = world.scene_for_path(r["path"])
        assert scene is not None and scene.image_id == r["image_id"]
        assert check_caption(scene, r["caption"]) is r["is_correct"], r


def test_bad_inputs(world_dir: Path) -> None:
    world = load_world(world_dir)
    rows = world.labels.to_pylist()
    bad = [r for r in rows if r["label"] == "bad"]
    assert abs(len(bad) / len(rows) - SMALL.bad_rate) < 0.01
    kinds = Counter(r["bad_kind"] for r in bad)
    assert set(kinds) == set(BAD_KINDS)
    assert max(kinds.values()) - min(kinds.values()) <= 1
    by_path = {}
    for i, r in enumerate(rows):
        kind = r["bad_kind"]
        expect = {"duplicate_row": "duplicate"}.get(kind, "fail" if kind in FAIL_KINDS else "success")
        assert r["expect"] == expect, r
        path = world_dir / r["path"]
        if kind in FAIL_KINDS:
            assert r["image_id"] is None
            assert path.exists() == (kind not in ("http_404", "http_500")), r
        else:
            assert world.scene_for_path(r["path"]) is not None and path.exists()
        if kind == "duplicate_row":
            assert (r["path"], r["caption"]) in by_path.items()
        if kind == "duplicate_url":
            assert r["path"] in by_path and by_path[r["path"]] != r["caption"]
        if kind == "empty_caption":
            assert r["caption"] == ""
        if kind == "long_caption":
            assert 4000 <= len(r["caption"]) <= 5000
        if kind == "tiny_1x1":
            assert Image.open(path).size == (1, 1)
        if kind == "huge_image":
            assert Image.open(path).size == (8000, 8000) and path.stat().st_size < 100_000
        if kind in ("truncated_jpeg", "corrupt_jpeg", "html_body"):
            with pytest.raises(OSError):
                Image.open(path).load()
        by_path.setdefault(r["path"], r["caption"])
        assert i == r["row"]


def test_images_decode_at_configured_size(world_dir: Path) -> None:
    lines = (world_dir / "scenes.jsonl").read_text().splitlines()
    splits = Counter(json.loads(line)["split"] for line in lines)
    info = json.loads((world_dir / "world.json").read_text())
    assert splits == info["counts"]["images"]
    assert splits["human"] == SMALL.n_human and splits["test"] == SMALL.n_test
    paths = sorted((world_dir / "images").rglob("*.jpg"))
    assert len(paths) == len(lines)
    for p in paths[::7]:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 48)


def test_karpathy_json_and_distinct_test_scenes(world_dir: Path) -> None:
    world = load_world(world_dir)
    train = json.loads((world_dir / "human" / "karpathy_train.json").read_text())
    assert len(train) == SMALL.n_human * SMALL.captions_per_human
    for entry in train:
        assert set(entry) == {"image", "caption", "image_id"}
        assert entry["image"] == f"images/human/{entry['image_id']}.jpg"
        assert check_caption(world.scenes[entry["image_id"]], entry["caption"])
    per_image = Counter(e["image_id"] for e in train)
    assert set(per_image.values()) == {SMALL.captions_per_human}

    test = json.loads((world_dir / "human" / "karpathy_test.json").read_text())
    assert len(test) == SMALL.n_test
    signatures = set()
    for entry in test:
        assert set(entry) == {"image", "caption"}
        scene = world.scene_for_path(entry["image"])
        assert scene is not None and world.splits[scene.image_id] == "test"
        assert len(set(entry["caption"])) == 5
        assert all(check_caption(scene, c) for c in entry["caption"])
        signatures.add(scene.signature())
    assert len(signatures) == SMALL.n_test


def test_world_json_and_loading(world_dir: Path) -> None:
    info = json.loads((world_dir / "world.json").read_text())
    assert info["format_version"] == 1
    assert WorldConfig.model_validate(info["config"]) == SMALL
    world = load_world(world_dir)
    assert world.config == SMALL
    assert sum(info["counts"]["labels"].values()) == world.labels.num_rows == info["counts"]["web_rows"]
    scene = world.scene_for_url("http://127.0.0.1:8000/images/test/t000003.jpg")
    assert scene is not None and scene.image_id == "t000003"
    assert world.scene_for_url("http://127.0.0.1:8000/bad/missing.jpg") is None
    with pytest.raises(FileNotFoundError, match="world make"):
        load_world(world_dir / "nowhere")


@pytest.mark.slow
def test_default_world_is_fast(tmp_path: Path) -> None:
    import time

    t = time.perf_counter()
    info = make_world(tmp_path, WorldConfig())
    assert info.counts["images"]["web"] >= 2000
    assert time.perf_counter() - t < 10


# ---------------------------------------------------------------------------------------------
# The world family.
# ---------------------------------------------------------------------------------------------

# Digests of make_world(MAIN_CONFIG)'s files as main wrote them before the family existed
# (commit d1b8435, the project's Pillow and pyarrow): the default world must stay that world.
# Tables are compared by content (a pyarrow upgrade may change Parquet bytes, not rows); the
# labels by the columns main had (the family adds duplicate_of and duplicate_transform).
MAIN_CONFIG = WorldConfig(seed=0, n_web=300, n_human=20, captions_per_human=4, n_test=30, image_size=48)
MAIN_DIGESTS = {
    "images": "44d5b0b7547c1cefc87074ab801e82d2faa647b80522effd97c35d2b2769796e",
    "web": "3e8af2ff2a20d996b3b07c84d5f92d61f407fc5af84cf19e57e4f4fd78bffd56",
    "labels": "2c7987fd21b0c4d8e12bfaca97e06f806a6517d1e66e98dd59123933d19e0bb2",
    "scenes.jsonl": "d8c917ceadfd97d6771b75a67994e71fc3b56f0b171e371a40c89a1c6c434e7f",
    "human/karpathy_train.json": "7f8d7fab0ddac97860a2f642f9c2f1dbbd27aeb36bec9a48505a2154ac254d7e",
    "human/karpathy_test.json": "9d97e6a4f2cdd5593207e4b61d4e0abaf52917004c6d67e693949db75b6241c7",
}
MAIN_LABEL_COLUMNS = ["row", "path", "caption", "image_id", "label", "is_correct", "bad_kind", "expect"]


def _digests(root: Path) -> dict[str, str]:
    import hashlib

    images = hashlib.sha256()
    for p in sorted((root / "images").rglob("*.jpg")) + sorted((root / "bad").iterdir()):
        images.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    out = {"images": images.hexdigest()}
    web = pq.read_table(root / "web.parquet").to_pylist()
    out["web"] = hashlib.sha256(json.dumps(web).encode()).hexdigest()
    labels = pq.read_table(root / "web_labels.parquet", columns=MAIN_LABEL_COLUMNS).to_pylist()
    out["labels"] = hashlib.sha256(json.dumps(labels).encode()).hexdigest()
    for name in ("scenes.jsonl", "human/karpathy_train.json", "human/karpathy_test.json"):
        out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    return out


def test_default_world_is_the_world_main_made(tmp_path: Path) -> None:
    info = make_world(tmp_path, MAIN_CONFIG)
    assert _digests(tmp_path) == MAIN_DIGESTS
    assert "near_duplicates" not in info.counts
    labels = pq.read_table(tmp_path / "web_labels.parquet")
    assert labels.column("duplicate_of").null_count == labels.num_rows
    assert WorldConfig.preset("default", **MAIN_CONFIG.model_dump()) == MAIN_CONFIG


HARD_SMALL = WorldConfig.preset("hard", seed=5, n_web=400, n_human=15, captions_per_human=3, n_test=25)
FAMILY = WorldConfig(
    seed=6,
    n_web=400,
    n_human=10,
    n_test=20,
    image_size=40,
    shapes=ALL_SHAPES,
    colours=ALL_COLOURS,
    backgrounds=BACKGROUNDS,
    phrasing="varied",
    noise="near_miss_heavy",
)


@pytest.fixture(scope="module", params=["hard", "family"])
def family_world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"world-{request.param}")
    make_world(out, HARD_SMALL if request.param == "hard" else FAMILY)
    return out


def test_family_config_validation() -> None:
    with pytest.raises(ValidationError, match="unknown shapes"):
        WorldConfig(shapes=("circle", "blob"))
    with pytest.raises(ValidationError, match="at least 2"):
        WorldConfig(colours=("red",))
    with pytest.raises(ValidationError, match="twice"):
        WorldConfig(backgrounds=("flat", "flat"))
    with pytest.raises(ValidationError, match="unknown noise preset"):
        WorldConfig(noise="mostly_fine")
    with pytest.raises(ValidationError):
        WorldConfig(phrasing="poetic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown world preset"):
        WorldConfig.preset("easy")
    assert len(ALL_SHAPES) >= 6 and len(ALL_COLOURS) >= 8 and len(BACKGROUNDS) >= 3
    hard = WorldConfig.preset("hard", n_web=10)
    assert hard.n_web == 10 and len(hard.shapes) >= 5 and len(hard.colours) == 8
    assert "flat" not in hard.backgrounds and hard.phrasing == "varied" and hard.image_size == 96
    assert hard.noise["correct"] == pytest.approx(0.3)
    assert hard.noise["near_miss"] == max(v for k, v in hard.noise.items() if k != "correct")


def test_hard_recipe_is_the_hard_preset_at_the_demo_sizes() -> None:
    from capfilt.pipeline.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "pipelines"
    hard, demo = load_recipe(root / "hard.yaml"), load_recipe(root / "demo.yaml")
    world, demo_world = hard.section("world"), demo.section("world")
    sizes = {k: getattr(demo_world, k) for k in ("seed", "n_web", "n_human", "n_test")}
    assert world == WorldConfig.preset("hard", **sizes)
    # Everything else is the demo's.
    others = {"name", "out", "world"}
    assert hard.model_dump(exclude=others) == demo.model_dump(exclude=others)


def test_family_world_draws_only_its_vocabulary_and_its_labels_are_true(family_world: Path) -> None:
    world = load_world(family_world)
    cfg = world.config
    seen: dict[str, set[str]] = {"shape": set(), "colour": set(), "background": set()}
    for scene in world.scenes.values():
        seen["background"].add(scene.background)
        for o in scene.objects:
            seen["shape"].add(o.shape)
            seen["colour"].add(o.colour)
    # Every value the world lists is drawn, and nothing else.
    assert seen == {"shape": set(cfg.shapes), "colour": set(cfg.colours), "background": set(cfg.backgrounds)}
    rows = [r for r in world.labels.to_pylist() if r["label"] != "bad"]
    counts = Counter(r["label"] for r in rows)
    for label, share in cfg.noise.items():
        assert abs(counts[label] / len(rows) - share) < 0.01, (label, counts)
    for r in rows:
        scene = world.scene_for_path(r["path"])
        assert scene is not None
        assert check_caption(scene, r["caption"]) is r["is_correct"], r
    train = json.loads((family_world / "human" / "karpathy_train.json").read_text())
    assert all(check_caption(world.scenes[e["image_id"]], e["caption"]) for e in train)
    # Textured images decode at the configured size and are not flat.
    for r in rows[:20]:
        with Image.open(family_world / r["path"]) as img:
            assert img.size == (cfg.image_size, cfg.image_size)


def test_varied_phrasing_writes_more_kinds_of_text_than_plain(family_world: Path, world_dir: Path) -> None:
    def first_words(root: Path, label: str) -> set[str]:
        rows = load_world(root).labels.to_pylist()
        return {" ".join(r["caption"].lower().split()[:2]) for r in rows if r["label"] == label}

    # Per text, not per row: the family world has fewer correct rows than the default one.
    assert len(first_words(family_world, "correct")) > len(first_words(world_dir, "correct"))
    assert len(first_words(family_world, "weak")) > len(first_words(world_dir, "weak"))
    captions = [r["caption"] for r in load_world(family_world).labels.to_pylist()]
    assert any(c[:1].isupper() and not c.startswith(("IMG", "DSC", "Fig")) for c in captions)
    assert any(w in c.split() for c in captions for w in ("rhombus", "disc", "disk", "violet", "tiny", "big"))


def test_near_misses_use_the_new_attributes(family_world: Path) -> None:
    from capfilt.world.checker import explain_caption

    world = load_world(family_world)
    reasons: list[str] = []
    wrong_shapes: set[str] = set()
    for r in world.labels.to_pylist():
        if r["label"] != "near_miss":
            continue
        result = explain_caption(world.scenes[r["image_id"]], r["caption"])
        reasons += result.reasons
        wrong_shapes |= {m.shape for m in result.mentions if m.shape} - {
            o.shape for o in world.scenes[r["image_id"]].objects
        }
    assert any("background is" in reason for reason in reasons)
    new = set(world.config.shapes) - set(SHAPES)
    assert wrong_shapes & new, "no near miss names a shape the default world lacks"


@pytest.mark.parametrize("colour", ALL_COLOURS)
@pytest.mark.parametrize("background", ["flat", "stripes", "checks"])
def test_render_every_colour_on_every_background(colour: str, background: str) -> None:
    from capfilt.world.render import PALETTE

    img = render(Scene(f"c-{background}", (Obj("square", colour, "large", 0.5, 0.5),), background), 64)
    centre = np.asarray(img)[28:36, 28:36].reshape(-1, 3).mean(0)
    nearest = min(PALETTE, key=lambda c: float(np.abs(np.array(PALETTE[c]) - centre).sum()))
    assert nearest == colour


def test_render_new_shapes_are_distinct_and_textures_are_textured() -> None:
    masks = {}
    for shape in ALL_SHAPES:
        a = np.asarray(render(Scene("s", (Obj(shape, "black", "large", 0.5, 0.5),)), 64)).astype(int)
        masks[shape] = a.sum(axis=2) < 200  # the black object's pixels
        assert masks[shape].sum() > 60, shape
    for s, t in combinations(ALL_SHAPES, 2):
        # Same place, same size: the silhouettes still differ in at least 40 pixels.
        assert (masks[s] ^ masks[t]).sum() >= 40, (s, t)
    for background in BACKGROUNDS:
        pixels = np.asarray(render(Scene("t", (), background), 64)).astype(int)
        assert pixels.min() >= 150  # light: no palette colour is lost in it
        # Flat is one tint; a texture varies by at least 30 levels of brightness across the image.
        brightness = pixels.sum(axis=2)
        spread = int(brightness.max() - brightness.min())
        assert (spread == 0) if background == "flat" else (spread >= 90), (background, spread)


# ---------------------------------------------------------------------------------------------
# Near-duplicates.
# ---------------------------------------------------------------------------------------------

DUPS = WorldConfig(seed=8, n_web=400, n_human=5, n_test=10, near_duplicate_rate=0.2, bad_rate=0.05)


@pytest.fixture(scope="module")
def dup_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dups")
    make_world(out, DUPS)
    return out


def _thumb(path: Path, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A 16 x 16 thumbnail, of the `box` of the image if given."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        return np.asarray(img.crop(box or (0, 0, *img.size)).resize((16, 16), Image.Resampling.BOX)).astype(
            float
        )


def test_near_duplicates_at_the_rate_with_their_truth(dup_world: Path) -> None:
    from capfilt.world import NEAR_DUPLICATE_TRANSFORMS

    world = load_world(dup_world)
    rows = world.labels.to_pylist()
    dups = [r for r in rows if r["duplicate_of"] is not None]
    assert len(dups) == round(DUPS.near_duplicate_rate * DUPS.n_web)
    kinds = Counter(r["duplicate_transform"].split(":")[0] for r in dups)
    assert set(kinds) == set(NEAR_DUPLICATE_TRANSFORMS) and max(kinds.values()) - min(kinds.values()) <= 1
    assert world.counts["near_duplicates"] == dict(kinds)
    for r in rows:
        assert (r["duplicate_of"] is None) == (r["duplicate_transform"] is None)
    for r in dups:
        original = rows[r["duplicate_of"]]
        assert r["label"] != "bad" and original["label"] != "bad" and original["duplicate_of"] is None
        assert original["row"] < r["row"]
        # Another URL and another alt-text, the same objects (a crop moves them, not their order).
        assert r["path"] != original["path"] and r["caption"] != original["caption"]
        a, b = world.scenes[r["image_id"]], world.scenes[original["image_id"]]
        assert [o.kind for o in a.objects] == [o.kind for o in b.objects] and a.background == b.background
        # Each row's label is true of what its image shows.
        assert check_caption(a, r["caption"]) is r["is_correct"]


def test_near_duplicate_images_differ_in_bytes_but_not_in_pixels(dup_world: Path) -> None:
    world = load_world(dup_world)
    rows = world.labels.to_pylist()
    originals = [r for r in rows if r["label"] != "bad" and r["duplicate_of"] is None]
    rng = random.Random(0)
    for r in (r for r in rows if r["duplicate_of"] is not None):
        kind, _, param = r["duplicate_transform"].partition(":")
        original = rows[r["duplicate_of"]]
        data, source = (dup_world / r["path"]).read_bytes(), (dup_world / original["path"]).read_bytes()
        assert (data == source) == (kind == "exact"), r
        with Image.open(dup_world / r["path"]) as img:
            side = int(param) if kind == "resize" else DUPS.image_size
            assert img.format == "JPEG" and img.size == (side, side)
        box = None
        if kind == "crop":
            left, top, right, bottom = (int(v) for v in param.split(","))
            box = (left, top, right, bottom)
            cut = (DUPS.image_size - (right - left)) + (DUPS.image_size - (bottom - top))
            assert 0 < cut <= 0.12 * 2 * DUPS.image_size  # slightly: at most 6% off each side
        mine = _thumb(dup_world / r["path"])
        # The same picture, seen through its transform: mean |difference| under 4 levels of 255
        # on a thumbnail (two different web images differ by 5 at the least, 27 typically),
        # and closer to its original than to any of 20 other web images, by a factor of 2.
        near = np.abs(mine - _thumb(dup_world / original["path"], box)).mean()
        strangers = [o for o in originals if o["row"] != original["row"]]
        others = [np.abs(mine - _thumb(dup_world / o["path"])).mean() for o in rng.sample(strangers, 20)]
        assert near < 4 and near < 0.5 * min(others), (r, near, min(others))


def test_near_duplicates_leave_the_other_rows_alone(dup_world: Path, tmp_path: Path) -> None:
    """With or without near-duplicates, the same rows are drawn and the mix is the configured one."""
    make_world(tmp_path, DUPS.model_copy(update={"near_duplicate_rate": 0.0}))
    plain = load_world(tmp_path).labels.to_pylist()
    dups = load_world(dup_world).labels.to_pylist()
    assert len(plain) == len(dups)
    assert [r["label"] for r in plain] == [r["label"] for r in dups]
    assert Counter(r["label"] for r in dups if r["label"] != "bad")["correct"] == round(0.55 * DUPS.n_web)
