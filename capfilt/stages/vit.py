"""The ``vit`` stage: the image encoder's starting point, the shapes world's stand-in for ImageNet.

BLIP never pretrains its ViT from scratch: ViT-B starts from DeiT-base's ImageNet weights and ViT-L
from ViT-L/16 in21k (``../shared/docs/REFERENCE.md``). A recipe on real data points
``pretrain.vision_init`` at such a timm checkpoint. The shapes world has no ImageNet, so this
stage makes its miniature: a timm VisionTransformer with the recipe's ViT architecture, trained to
classify the shape of rendered one-object scenes, saved as a timm state dict that
``capfilt.model.backbones.init_vision_from_timm`` loads into both pretraining rounds.

- The labelled images are the stage's own: scenes drawn from ``seed`` (IDs ``vit-...``), none of
  them a web, human or test image. Augmentation is the pretraining's (``train_transform``).
- The vocabulary is a choice (``vocabulary``), as ImageNet's is wider than any one downstream
  task's: ``family`` is every shape, colour and background the world family can draw
  (``capfilt.world.scene``), with a head per attribute (shape, colour, size, background) from one
  linear layer split into heads, so a world with other shapes starts from features that tell
  shapes apart; ``family_flat`` is every shape and colour on flat backgrounds (shape, colour and
  size heads); ``default_world``, the default, is the stage before the family: the default
  world's 3 shapes, 6 colours and flat backgrounds, the shape head only, the same draws and
  weights as before. ``shapes``, ``colours``, ``backgrounds`` and ``heads`` override a
  vocabulary's. Counts and relations are left to image-text pretraining.
- Why the default stays narrow, measured in ``experiments/vit_transfer.py`` (900 steps, one seed):
  the ``family`` classifier learns colour (0.99) but not yet shape (0.20 of 8; 0.49 on the default
  world's 3 against the narrow one's 0.92; ``family_flat`` 0.59), so it would start the demo from
  worse shape features. On shapes held out of training, a broad classifier's features probe a
  little better than a narrow one's (0.66 against 0.63, random 0.43): within one seed's noise.
- Why it is needed, measured: trained from scratch for the demo's 900 steps, ITC and LM do not
  teach med-tiny's ViT shape, while a 3-way classifier on the same ViT learns it in about 500 steps
  (``experiments/shape_learning.py``). What the broad vocabulary buys on shapes it never saw:
  ``experiments/vit_transfer.py``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from capfilt.core import fs
from capfilt.core.stage import Section, Stage, StageContext, StageDir, StageStatus, readable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from capfilt.model.config import MedConfig

log = logging.getLogger(__name__)

VIT_FILE = "vit.safetensors"


HEADS: tuple[str, ...] = ("shape", "colour", "size", "background")


class VitInitConfig(BaseModel):
    """How long and on what the stand-in ImageNet classifier trains."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(900, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    # Linear warmup, then cosine decay to min_lr. A ViT trained from scratch at a constant 5e-4
    # with no warmup sat at chance (loss 1.01, held-out 0.42) in one fresh `make demo` and learnt
    # (0.89-0.93) in others: whether it left the plateau was left to the last float bits.
    warmup_steps: int = Field(100, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    min_scale: float = Field(0.6, gt=0, le=1)  # RandomResizedCrop, as the pretraining's
    seed: int = 0
    held_out: int = Field(300, ge=0)  # fresh labelled scenes the final accuracy is measured on
    log_every: int = Field(100, ge=1)
    # What the scenes are drawn from and which heads learn them: one of VOCABULARIES, with any
    # of the four fields below (None: the vocabulary's) on top.
    vocabulary: Literal["default_world", "family", "family_flat"] = "default_world"
    shapes: tuple[str, ...] | None = None
    colours: tuple[str, ...] | None = None
    backgrounds: tuple[str, ...] | None = None
    heads: tuple[str, ...] | None = None

    @field_validator("shapes", "colours", "backgrounds")
    @classmethod
    def _check_vocabulary(cls, v: tuple[str, ...] | None, info: Any) -> tuple[str, ...] | None:
        from capfilt.world.scene import ALL_COLOURS, ALL_SHAPES, BACKGROUNDS

        if v is None:
            return v
        family = {"shapes": ALL_SHAPES, "colours": ALL_COLOURS, "backgrounds": BACKGROUNDS}[info.field_name]
        unknown = [x for x in v if x not in family]
        if unknown or not v or len(set(v)) != len(v):
            raise ValueError(
                f"{info.field_name} {list(v)}: give distinct values of the family's {list(family)}, or omit it for all"
            )
        return v

    @field_validator("heads")
    @classmethod
    def _check_heads(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        if "shape" not in v or len(set(v)) != len(v) or not set(v) <= set(HEADS):
            raise ValueError(f"heads {list(v)}: list each of {list(HEADS)} at most once, 'shape' included")
        return tuple(h for h in HEADS if h in v)  # canonical order: the logits' layout

    def vocabulary_of(self) -> dict[str, tuple[str, ...]]:
        """The classes of every attribute the scenes are drawn from."""
        from capfilt.world.scene import SIZES

        base = VOCABULARIES[self.vocabulary]
        return {
            "shape": self.shapes or base["shapes"],
            "colour": self.colours or base["colours"],
            "size": SIZES,
            "background": self.backgrounds or base["backgrounds"],
        }

    def classes(self) -> dict[str, tuple[str, ...]]:
        """The classes of each head, in the order of the classifier's logits."""
        vocab = self.vocabulary_of()
        heads = self.heads or VOCABULARIES[self.vocabulary]["heads"]
        return {h: vocab[h] for h in HEADS if h in heads}


def _vocabularies() -> dict[str, dict[str, tuple[str, ...]]]:
    from capfilt.world.scene import ALL_COLOURS, ALL_SHAPES, BACKGROUNDS, COLOURS, SHAPES

    return {
        # The stage as it was before the world family.
        "default_world": {
            "shapes": SHAPES,
            "colours": COLOURS,
            "backgrounds": ("flat",),
            "heads": ("shape",),
        },
        "family": {"shapes": ALL_SHAPES, "colours": ALL_COLOURS, "backgrounds": BACKGROUNDS, "heads": HEADS},
        "family_flat": {
            "shapes": ALL_SHAPES,
            "colours": ALL_COLOURS,
            "backgrounds": ("flat",),
            "heads": ("shape", "colour", "size"),
        },
    }


VOCABULARIES = _vocabularies()
LEGACY: dict[str, Any] = {"vocabulary": "default_world"}  # the stage before the family


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


def labelled_scenes(
    n: int,
    rng: random.Random,
    prefix: str,
    shapes: tuple[str, ...] | None = None,
    colours: tuple[str, ...] | None = None,
    backgrounds: tuple[str, ...] = ("flat",),
) -> list[Any]:
    """``n`` one-object scenes, every attribute uniform, the centre kept off the border; the
    default world's shapes, colours and flat backgrounds unless told otherwise."""
    from capfilt.world.scene import COLOURS, SHAPES, SIZES, Obj, Scene

    shapes, colours = shapes or SHAPES, colours or COLOURS
    out = []
    for i in range(n):
        obj = Obj(
            rng.choice(shapes),
            rng.choice(colours),
            rng.choice(SIZES),
            rng.uniform(0.25, 0.75),
            rng.uniform(0.25, 0.75),
        )
        # One background draws nothing, so the default world's stream is what it always was.
        background = backgrounds[0] if len(backgrounds) == 1 else rng.choice(backgrounds)
        out.append(Scene(f"{prefix}-{i}", (obj,), background))
    return out


def scene_labels(scene: Any) -> dict[str, str]:
    """What each head is asked of a one-object scene."""
    o = scene.objects[0]
    return {"shape": o.shape, "colour": o.colour, "size": o.size, "background": scene.background}


def head_logits(logits: torch.Tensor, classes: Mapping[str, Sequence[str]]) -> dict[str, torch.Tensor]:
    """The classifier's logits [B, sum of classes] split into one [B, classes] block per head."""
    out, start = {}, 0
    for head, names in classes.items():
        out[head] = logits[:, start : start + len(names)]
        start += len(names)
    return out


def _lr_at(cfg: VitInitConfig, step: int) -> float:
    """The lr of step ``step`` (1-based): linear warmup over ``warmup_steps``, then cosine to ``min_lr``."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train_vit_classifier(cfg: VitInitConfig, med_config: MedConfig, out_dir: StageDir) -> dict[str, Any]:
    """Train the classifier and write ``out_dir/vit.safetensors`` (timm keys, head included; the
    loader drops the head; a folder on object storage gets it uploaded). Returns the stage's
    summary: steps, losses, held-out accuracies, file."""
    import tempfile

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from capfilt.model.transforms import test_transform, train_transform
    from capfilt.world.render import render
    from capfilt.world.scene import COLOURS, SHAPES

    out = fs.location(out_dir).resolve()  # absolute: training workers do not run in the driver's folder
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    size = med_config.vision.image_size
    vocab, classes = cfg.vocabulary_of(), cfg.classes()
    model = timm_vit(med_config, sum(len(c) for c in classes.values()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = train_transform(size, min_scale=cfg.min_scale)

    def scenes(n: int, prefix: str) -> list[Any]:
        return labelled_scenes(n, rng, prefix, vocab["shape"], vocab["colour"], vocab["background"])

    def batch(scenes: list[Any], transform: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = torch.stack([transform(render(s, size)) for s in scenes])
        truth = [scene_labels(s) for s in scenes]
        return pixels, {h: torch.tensor([names.index(t[h]) for t in truth]) for h, names in classes.items()}

    start, losses = time.time(), []
    for step in range(1, cfg.steps + 1):
        pixels, labels = batch(scenes(cfg.batch_size, f"vit-{step}"), augment)
        logits = head_logits(model(pixels), classes)
        loss = sum(F.cross_entropy(logits[h], labels[h]) for h in classes)
        assert isinstance(loss, torch.Tensor)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            window = losses[-cfg.log_every :]
            log.info("vit: step %d of %d, loss %.3f", step, cfg.steps, sum(window) / len(window))
    by_head: dict[str, float] | None = None
    default_world: float | None = None
    if cfg.held_out:
        model.eval()
        pixels, labels = batch(scenes(cfg.held_out, "vit-held-out"), test_transform(size))
        with torch.no_grad():
            logits = head_logits(model(pixels), classes)
        by_head = {h: round(float((logits[h].argmax(1) == labels[h]).float().mean()), 4) for h in classes}
        log.info("vit: held-out accuracy by head on %d scenes: %s", cfg.held_out, by_head)
        if set(SHAPES) <= set(vocab["shape"]) and set(COLOURS) <= set(vocab["colour"]):
            # Comparable across vocabularies: the default world's scenes, told apart among its shapes.
            default_world = _default_world_accuracy(model, classes["shape"], cfg, size, test_transform(size))
            log.info("vit: shape accuracy on the default world's %d scenes %.3f", cfg.held_out, default_world)
    path = out / VIT_FILE
    with tempfile.TemporaryDirectory(prefix="capfilt-vit-") as tmp:
        local = path if isinstance(path, Path) else Path(tmp) / VIT_FILE
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(local))
        fs.put(local, path)
    window = losses[-min(100, len(losses)) :]
    return {
        "file": str(path),
        "steps": cfg.steps,
        "classes": list(classes["shape"]),
        "heads": {h: len(c) for h, c in classes.items()},
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(window) / len(window), 4),
        "held_out_accuracy": by_head["shape"] if by_head else None,
        "held_out_accuracy_by_head": by_head,
        "default_world_shape_accuracy": default_world,
        "held_out": cfg.held_out,
        "wall_s": round(time.time() - start, 1),
    }


def _default_world_accuracy(
    model: nn.Module, shape_classes: Sequence[str], cfg: VitInitConfig, size: int, transform: Any
) -> float:
    """Shape accuracy on the default world's one-object scenes (its 3 shapes, 6 colours, flat),
    the shape head's argmax taken among the default world's shapes only; scenes of a stream of
    their own, the same whatever the vocabulary."""
    import torch

    from capfilt.world.render import render
    from capfilt.world.scene import SHAPES

    scenes = labelled_scenes(cfg.held_out, random.Random(f"vit-default-world/{cfg.seed}"), "vit-default")
    pixels = torch.stack([transform(render(s, size)) for s in scenes])
    columns = [list(shape_classes).index(s) for s in SHAPES]
    with torch.no_grad():
        logits = model(pixels)[:, columns]  # [N, 3]: the shape head's block starts the logits
    truth = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    return round(float((logits.argmax(1) == truth).float().mean()), 4)


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
        n_shapes = len(result.get("classes") or ()) or 3
        lines = [
            f"steps {result.get('steps')}, loss {readable(result.get('first_loss'))} -> "
            f"{readable(result.get('final_loss'))}, held-out shape accuracy "
            f"{readable(result.get('held_out_accuracy'))} of {n_shapes} shapes (chance {1 / n_shapes:.3f})",
        ]
        by_head = result.get("held_out_accuracy_by_head") or {}
        if len(by_head) > 1 or result.get("default_world_shape_accuracy") is not None:
            others = ", ".join(f"{h} {readable(a)}" for h, a in by_head.items() if h != "shape")
            lines.append(
                f"held-out {others or 'shape only'}; shape on the default world's scenes "
                f"{readable(result.get('default_world_shape_accuracy'))} (chance 0.333)"
            )
        lines.append(f"ViT for both pretraining rounds: {result.get('file')}")
        return lines

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return dict(result)

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        if result:
            st.progress = f"held-out shape accuracy {readable(result.get('held_out_accuracy'))}"
        return st


STAGE = VitStage()
