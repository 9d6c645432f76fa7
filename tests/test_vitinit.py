"""The 'vit' stage: a timm ViT classifier of the shapes world's objects, loaded into MED by vision_init."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from capfilt.core.errors import ConfigError
from capfilt.model.config import get_config
from capfilt.pipeline.recipe import load_recipe
from capfilt.stages.vit import (
    LEGACY,
    VIT_FILE,
    VitInitConfig,
    _lr_at,
    head_logits,
    labelled_scenes,
    scene_labels,
    timm_vit,
    train_vit_classifier,
)
from capfilt.testing import one_torch_thread
from capfilt.train.config import TrainConfig
from capfilt.train.loop import build_med
from capfilt.world.scene import Scene


def test_classifier_trains_and_starts_the_pretraining_vit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capfilt.world.scene import ALL_COLOURS, ALL_SHAPES, BACKGROUNDS

    monkeypatch.chdir(tmp_path)
    cfg = VitInitConfig(steps=3, batch_size=4, held_out=30, log_every=1, vocabulary="family")
    summary = train_vit_classifier(cfg, get_config("med-tiny"), "vit")
    # Absolute, as the stage hands it to training workers that run in another folder.
    assert summary["file"] == str(tmp_path.resolve() / "vit" / VIT_FILE)
    # The family's vocabulary is every shape, colour and background, with a head per attribute.
    assert summary["steps"] == 3 and summary["classes"] == list(ALL_SHAPES)
    heads = {"shape": len(ALL_SHAPES), "colour": len(ALL_COLOURS), "size": 2, "background": len(BACKGROUNDS)}
    assert summary["heads"] == heads
    timm_state = load_file(summary["file"])
    assert "head.weight" in timm_state and timm_state["head.weight"].shape[0] == sum(heads.values())
    # The reported accuracies are the saved classifier's on the held-out scenes (drawn after the
    # training batches from the seeded stream), by their true attributes, head by head.
    assert summary["held_out_accuracy_by_head"] == _held_out_accuracy(cfg, timm_state)
    assert summary["held_out_accuracy"] == summary["held_out_accuracy_by_head"]["shape"]
    assert 0 <= summary["default_world_shape_accuracy"] <= 1

    train = {"data": ["unused"], "out_dir": str(tmp_path / "train"), "steps": 2, "warmup_steps": 1}
    torch.manual_seed(0)
    fresh = build_med(TrainConfig(**train), get_config("med-tiny"))
    torch.manual_seed(0)
    started = build_med(TrainConfig(**train, vision_init=summary["file"]), get_config("med-tiny"))
    patch = started.vision_model.embeddings.patch_embedding.weight
    torch.testing.assert_close(patch, timm_state["patch_embed.proj.weight"])
    assert not torch.equal(patch, fresh.vision_model.embeddings.patch_embedding.weight)
    # Only the ViT comes from the classifier; the text side is the fresh model's.
    torch.testing.assert_close(
        started.text_encoder.embeddings.word_embeddings.weight,
        fresh.text_encoder.embeddings.word_embeddings.weight,
    )


def test_vision_init_with_init_is_an_error() -> None:
    with pytest.raises(ValidationError, match="vision_init: init already sets every weight"):
        TrainConfig(data=["x"], out_dir="o", steps=2, warmup_steps=1, init="some/dir", vision_init="vit.pt")


def test_recipe_with_vit_stage_and_its_own_vision_init_names_the_field(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nout: runs/r\nstages: [world, vit, pretrain]\nworld: {n_web: 10}\n"
        "pretrain: {steps: 2, warmup_steps: 1, vision_init: deit.pth}\n"
    )
    with pytest.raises(ConfigError, match="pretrain.vision_init: the 'vit' stage gives"):
        load_recipe(recipe)
    recipe.write_text("name: r\nout: runs/r\nstages: [world, vit]\nworld: {n_web: 10}\nvit: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"vit.stepz"):
        load_recipe(recipe)


@pytest.mark.slow
def test_the_stages_default_training_learns_the_shapes(tmp_path: Path) -> None:
    """The demo's settings (900 steps of 32): well above chance (1/3) on fresh scenes. Measured on
    one thread: accuracy 0.88, loss 1.13 -> 0.35, in 200 s (450 steps: 0.47)."""
    with one_torch_thread():
        summary = train_vit_classifier(VitInitConfig(), get_config("med-tiny"), tmp_path / "vit")
    assert summary["held_out"] == 300 and summary["held_out_accuracy"] > 0.7
    assert summary["final_loss"] < 0.7 < summary["first_loss"]


def _held_out_accuracy(cfg: VitInitConfig, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The saved classifier's accuracy per head on the stage's held-out scenes, recomputed here."""
    from capfilt.model.transforms import test_transform
    from capfilt.world.render import render

    med = get_config("med-tiny")
    vocab, classes = cfg.vocabulary_of(), cfg.classes()
    rng = random.Random(cfg.seed)

    def draw(n: int, prefix: str) -> list[Scene]:
        return labelled_scenes(n, rng, prefix, vocab["shape"], vocab["colour"], vocab["background"])

    for step in range(1, cfg.steps + 1):
        draw(cfg.batch_size, f"vit-{step}")
    scenes = draw(cfg.held_out, "vit-held-out")
    model = timm_vit(med, sum(len(c) for c in classes.values()))
    model.load_state_dict(state)
    model.eval()
    size = med.vision.image_size
    pixels = torch.stack([test_transform(size)(render(s, size)) for s in scenes])
    with torch.no_grad():
        logits = head_logits(model(pixels), classes)
    out = {}
    for head, names in classes.items():
        truth = torch.tensor([names.index(scene_labels(s)[head]) for s in scenes])
        out[head] = round(float((logits[head].argmax(1) == truth).float().mean()), 4)
    return out


def test_legacy_vocabulary_is_the_stage_before_the_family(tmp_path: Path) -> None:
    """The default (LEGACY) trains what the stage trained before the family: the default world's
    scenes, from the same stream, and one 3-way shape head."""
    from capfilt.world.scene import COLOURS, SHAPES, SIZES, Obj

    cfg = VitInitConfig(steps=2, batch_size=4, held_out=20)
    assert cfg.classes() == VitInitConfig(**LEGACY).classes() == {"shape": SHAPES}
    summary = train_vit_classifier(cfg, get_config("med-tiny"), tmp_path / "vit")
    assert summary["classes"] == list(SHAPES) and summary["heads"] == {"shape": 3}
    assert load_file(summary["file"])["head.weight"].shape[0] == 3
    # The scenes are those the stage drew before: shape, colour, size, x, y from one stream.
    rng, old = random.Random(4), random.Random(4)
    vocab = cfg.vocabulary_of()
    for scene in labelled_scenes(50, rng, "p", vocab["shape"], vocab["colour"], vocab["background"]):
        obj = Obj(
            old.choice(SHAPES),
            old.choice(COLOURS),
            old.choice(SIZES),
            old.uniform(0.25, 0.75),
            old.uniform(0.25, 0.75),
        )
        assert scene.objects == (obj,) and scene.background == "flat"


def test_vocabulary_validation() -> None:
    from capfilt.world.scene import ALL_COLOURS, ALL_SHAPES, BACKGROUNDS

    with pytest.raises(ValidationError, match="'shape' included"):
        VitInitConfig(heads=("colour",))
    with pytest.raises(ValidationError, match="distinct values of the family"):
        VitInitConfig(shapes=("circle", "blob"))
    cfg = VitInitConfig(vocabulary="family", shapes=("star", "ring"), heads=("size", "shape"))
    assert list(cfg.classes()) == ["shape", "size"] and cfg.classes()["shape"] == ("star", "ring")
    assert cfg.vocabulary_of()["background"] == BACKGROUNDS
    flat = VitInitConfig(vocabulary="family_flat").classes()
    assert flat["shape"] == ALL_SHAPES and flat["colour"] == ALL_COLOURS and "background" not in flat


def test_the_lr_warms_up_then_decays_to_its_floor() -> None:
    cfg = VitInitConfig(steps=900, lr=5e-4, warmup_steps=100, min_lr=1e-5)
    lrs = [_lr_at(cfg, s) for s in range(1, cfg.steps + 1)]
    assert lrs[0] == pytest.approx(5e-6) and lrs[99] == pytest.approx(5e-4)  # linear warmup
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100], strict=True))
    assert all(a >= b for a, b in zip(lrs[99:-1], lrs[100:], strict=True))  # then never up again
    assert lrs[-1] == pytest.approx(1e-5)
    assert _lr_at(VitInitConfig(warmup_steps=0, min_lr=5e-4, lr=5e-4), 1) == pytest.approx(5e-4)  # constant
