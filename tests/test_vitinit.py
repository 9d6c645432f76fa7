"""The 'vit' stage: a timm ViT classifier of the shapes world's objects, loaded into MED by vision_init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from capfilt.core.errors import ConfigError
from capfilt.model.config import get_config
from capfilt.pipeline.recipe import load_recipe
from capfilt.stages.vit import VIT_FILE, VitInitConfig, train_vit_classifier
from capfilt.train.config import TrainConfig
from capfilt.train.loop import build_med


def test_classifier_trains_and_starts_the_pretraining_vit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = VitInitConfig(steps=3, batch_size=4, held_out=6, log_every=1)
    summary = train_vit_classifier(cfg, get_config("med-tiny"), "vit")
    # Absolute, as the stage hands it to training workers that run in another folder.
    assert summary["file"] == str(tmp_path.resolve() / "vit" / VIT_FILE)
    assert summary["steps"] == 3 and summary["classes"] == ["circle", "square", "triangle"]
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0
    timm_state = load_file(summary["file"])
    assert "head.weight" in timm_state and timm_state["head.weight"].shape[0] == 3

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
