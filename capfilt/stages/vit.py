"""The ``vit`` stage: the image encoder's starting point, the shapes world's stand-in for ImageNet.

BLIP never pretrains its ViT from scratch: ViT-B starts from DeiT-base's ImageNet weights and ViT-L
from ViT-L/16 in21k (``../shared/docs/REFERENCE.md``). A recipe on real data points
``pretrain.vision_init`` at such a timm checkpoint. The shapes world has no ImageNet, so this
stage makes its miniature: a timm VisionTransformer with the recipe's ViT architecture, trained to
classify the shape of rendered one-object scenes, saved as a timm state dict that
``capfilt.model.backbones.init_vision_from_timm`` loads into both pretraining rounds.

- The labelled images are the stage's own: scenes drawn from ``seed`` (IDs ``vit-...``), none of
  them a web, human or test image. Augmentation is the pretraining's (``train_transform``).
- The label is the object's category (circle, square, triangle), as ImageNet labels categories.
  Colour, size, counts and relations are left to image-text pretraining.
- Why it is needed, measured: trained from scratch for the demo's 900 steps, ITC and LM do not
  teach med-tiny's ViT shape, while a 3-way classifier on the same ViT learns it in about 500 steps
  (``experiments/shape_learning.py``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from capfilt.core import fs
from capfilt.core.stage import Section, Stage, StageContext, StageDir, StageStatus, readable

if TYPE_CHECKING:
    from torch import nn

    from capfilt.model.config import MedConfig

log = logging.getLogger(__name__)

VIT_FILE = "vit.safetensors"


class VitInitConfig(BaseModel):
    """How long and how the stand-in ImageNet classifier trains."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(900, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    min_scale: float = Field(0.6, gt=0, le=1)  # RandomResizedCrop, as the pretraining's
    seed: int = 0
    held_out: int = Field(300, ge=0)  # fresh labelled scenes the final accuracy is measured on
    log_every: int = Field(100, ge=1)


def timm_vit(med_config: MedConfig, num_classes: int) -> nn.Module:
    """A timm VisionTransformer with ``med_config``'s ViT shape, which ``init_vision_from_timm``
    maps one to one onto MED's image encoder."""
    import timm

    v = med_config.vision
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=v.image_size,
        patch_size=v.patch_size,
        embed_dim=v.hidden_size,
        depth=v.num_layers,
        num_heads=v.num_heads,
        mlp_ratio=v.mlp_size / v.hidden_size,
        num_classes=num_classes,
    )


def labelled_scenes(n: int, rng: random.Random, prefix: str) -> list[Any]:
    """``n`` one-object scenes, every attribute uniform, the centre kept off the border."""
    from capfilt.world.scene import COLOURS, SHAPES, SIZES, Obj, Scene

    return [
        Scene(
            f"{prefix}-{i}",
            (
                Obj(
                    rng.choice(SHAPES),
                    rng.choice(COLOURS),
                    rng.choice(SIZES),
                    rng.uniform(0.25, 0.75),
                    rng.uniform(0.25, 0.75),
                ),
            ),
        )
        for i in range(n)
    ]


def train_vit_classifier(cfg: VitInitConfig, med_config: MedConfig, out_dir: StageDir) -> dict[str, Any]:
    """Train the classifier and write ``out_dir/vit.safetensors`` (timm keys, head included; the
    loader drops the head; a folder on object storage gets it uploaded). Returns the stage's
    summary: steps, losses, held-out accuracy, file."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from capfilt.model.transforms import test_transform, train_transform
    from capfilt.world.render import render
    from capfilt.world.scene import SHAPES

    out = fs.location(out_dir).resolve()  # absolute: training workers do not run in the driver's folder
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    size = med_config.vision.image_size
    model = timm_vit(med_config, len(SHAPES))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = train_transform(size, min_scale=cfg.min_scale)

    def batch(scenes: list[Any], transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([transform(render(s, size)) for s in scenes])
        return pixels, torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])

    start, losses = time.time(), []
    for step in range(1, cfg.steps + 1):
        pixels, labels = batch(labelled_scenes(cfg.batch_size, rng, f"vit-{step}"), augment)
        loss = F.cross_entropy(model(pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            window = losses[-cfg.log_every :]
            log.info("vit: step %d of %d, loss %.3f", step, cfg.steps, sum(window) / len(window))
    accuracy = None
    if cfg.held_out:
        model.eval()
        pixels, labels = batch(labelled_scenes(cfg.held_out, rng, "vit-held-out"), test_transform(size))
        with torch.no_grad():
            accuracy = round(float((model(pixels).argmax(1) == labels).float().mean()), 4)
        log.info(
            "vit: held-out shape accuracy %.3f on %d scenes (chance %.3f)", accuracy, cfg.held_out, 1 / 3
        )
    path = out / VIT_FILE
    with tempfile.TemporaryDirectory(prefix="capfilt-vit-") as tmp:
        local = path if isinstance(path, Path) else Path(tmp) / VIT_FILE
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(local))
        fs.put(local, path)
    window = losses[-min(100, len(losses)) :]
    return {
        "file": str(path),
        "steps": cfg.steps,
        "classes": list(SHAPES),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(window) / len(window), 4),
        "held_out_accuracy": accuracy,
        "held_out": cfg.held_out,
        "wall_s": round(time.time() - start, 1),
    }


def _pretrain_model(recipe: Any) -> str:
    section = recipe.section("pretrain")
    return section.model if section is not None else "med-tiny"


class VitStage(Stage):
    name = "vit"
    help = "train the ViT both pretraining rounds start from (the shapes world's ImageNet)"
    sections: ClassVar[Mapping[str, Section]] = {
        "vit": Section(VitInitConfig, default_factory=VitInitConfig, help="the stand-in ImageNet ViT")
    }

    def check(self, recipe: Any, check_paths: bool) -> None:
        pretrain = recipe.section("pretrain")
        if pretrain is not None and pretrain.vision_init:
            raise ValueError(
                "pretrain.vision_init: the 'vit' stage gives the pretraining its ViT; drop one of the two"
            )
        if recipe.init.pretrained:
            raise ValueError(
                "stages: 'vit' initialises a ViT to pretrain, but init.pretrained skips pretraining"
            )

    def key(self, recipe: Any) -> Any:
        return {"vit": self.config(recipe).model_dump(), "model": _pretrain_model(recipe)}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from capfilt.model.config import get_config

        return train_vit_classifier(self.config(ctx.recipe), get_config(_pretrain_model(ctx.recipe)), ctx.dir)

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        return [
            f"steps {result.get('steps')}, loss {readable(result.get('first_loss'))} -> "
            f"{readable(result.get('final_loss'))}, held-out shape accuracy "
            f"{readable(result.get('held_out_accuracy'))} (chance 0.333)",
            f"ViT for both pretraining rounds: {result.get('file')}",
        ]

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return dict(result)

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        if result:
            st.progress = f"held-out shape accuracy {readable(result.get('held_out_accuracy'))}"
        return st


STAGE = VitStage()
