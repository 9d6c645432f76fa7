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
    BAD_KINDS,
    FAIL_KINDS,
    MARGIN,
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
