"""Recipes: typed YAML files that name the stages of a run and their options, validated up front."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from capfilt.core.errors import ConfigError
from capfilt.eval.metrics import EvalConfig
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.download import DownloadConfig
from capfilt.stages.vit import VitInitConfig
from capfilt.world import WorldConfig

log = logging.getLogger(__name__)

#: Every stage a recipe may name, in the order they run.
STAGES = ("world", "download", "vit", "pretrain", "finetune", "capfilt", "pretrain2", "evaluate")

#: What BLIP fine-tunes with, before a recipe's own settings: the captioner learns LM only with a
#: masked prompt; the filter learns ITC + ITM with positives by image id (several captions each).
CAPTIONER_DEFAULTS: dict[str, Any] = {
    "objectives": {"itc": 0.0, "itm": 0.0, "lm": 1.0},
    "prompt": "a picture of ",
    "schedule": "cosine",
    "min_scale": 0.5,
}
FILTER_DEFAULTS: dict[str, Any] = {
    "objectives": {"itc": 1.0, "itm": 1.0, "lm": 0.0, "positives": "image_id"},
    "schedule": "cosine",
    "min_scale": 0.5,
}
# Filled in by the pipeline, never by the recipe.
_PIPELINE_TRAIN_FIELDS = ("data", "out_dir", "init", "run_name")


class UrlListInput(BaseModel):
    """A URL list the user brings instead of the shapes world."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    url_col: str = "url"
    caption_col: str | None = "caption"
    input_format: str | None = None
    source: str = "web"


class HumanInput(BaseModel):
    """Human-annotated pairs as users have them: a COCO-Karpathy-style JSON and its image folder."""

    model_config = ConfigDict(extra="forbid")

    karpathy_train: Path
    karpathy_test: Path | None = None
    image_root: Path | None = None  # default: the JSON's folder


class ModelInit(BaseModel):
    """Published checkpoints to start from instead of pretraining round 1 here."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = None  # capfilt dir, transformers dir or BLIP .pth for round 1
    captioner: str | None = None  # skip the captioner fine-tune and use this one
    filter: str | None = None  # skip the filter fine-tune and use this one
    tokenizer: str | None = None
    arch: str | None = None  # architecture of the BLIP .pth files above (e.g. med-base); dirs carry theirs


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_config(section: dict[str, Any], *, data: list[Any], out_dir: str, **fixed: Any) -> Any:
    from capfilt.train.loop import TrainConfig

    return TrainConfig.model_validate({**section, "data": data, "out_dir": out_dir, **fixed})


def _paths_must_exist(info: ValidationInfo) -> bool:
    """Whether input paths must exist: yes, unless validated with context {"check_paths": False}
    (a cluster recipe checked on a machine without its data)."""
    return not (isinstance(info.context, dict) and info.context.get("check_paths") is False)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    out: Path  # the run folder; each stage writes its own sub-folder
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    ray_address: str | None = None
    world: WorldConfig | None = None
    urls: UrlListInput | None = None
    human: HumanInput | None = None
    init: ModelInit = Field(default_factory=ModelInit)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    vit: VitInitConfig = Field(default_factory=VitInitConfig)  # the stand-in ImageNet ViT (shapes world)
    pretrain: dict[str, Any] = Field(default_factory=dict)  # TrainConfig fields; round 2 uses the same
    finetune_captioner: dict[str, Any] = Field(default_factory=dict)
    finetune_filter: dict[str, Any] = Field(default_factory=dict)
    capfilt: CapFiltConfig = Field(default_factory=CapFiltConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Recipe:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known stages are {list(STAGES)}")
        if "world" in self.stages and self.world is None:
            raise ValueError("world: the stage 'world' is listed but the recipe has no 'world:' section")
        if "download" in self.stages and "world" not in self.stages and self.urls is None:
            raise ValueError(
                "urls: a download without the 'world' stage needs a 'urls:' section (a URL list)"
            )
        if "download" in self.stages and "world" in self.stages:
            # With the 'world' stage the download's only source is the world's own server on
            # 127.0.0.1 (pipeline._served_world), which the default policy refuses: allow loopback
            # there, and only there. A recipe that says url_policy: public cannot work; say so.
            if "url_policy" not in self.download.model_fields_set:
                self.download = self.download.model_copy(update={"url_policy": "allow_loopback"})
            elif self.download.url_policy == "public":
                raise ValueError(
                    "download.url_policy: the 'world' stage serves its images on 127.0.0.1, which "
                    "'public' refuses; use allow_loopback"
                )
        if "vit" in self.stages and self.pretrain.get("vision_init"):
            raise ValueError(
                "pretrain.vision_init: the 'vit' stage gives the pretraining its ViT; drop one of the two"
            )
        if "vit" in self.stages and self.init.pretrained:
            raise ValueError(
                "stages: 'vit' initialises a ViT to pretrain, but init.pretrained skips pretraining"
            )
        if "world" not in self.stages and self.world is None:
            needs_human = {"pretrain", "finetune", "capfilt", "evaluate"} & set(self.stages)
            if needs_human and self.human is None:
                raise ValueError(
                    f"human: stages {sorted(needs_human)} without the shapes world need a 'human:' section"
                )
        for label, path in (
            ("urls.path", self.urls.path if self.urls else None),
            ("human.karpathy_train", self.human.karpathy_train if self.human else None),
            ("human.karpathy_test", self.human.karpathy_test if self.human else None),
            ("human.image_root", self.human.image_root if self.human else None),
        ):
            if path is not None and not Path(path).exists() and _paths_must_exist(info):
                raise ValueError(f"{label}: {path} does not exist")
        pth = [
            f"init.{k}"
            for k in ("pretrained", "captioner", "filter")
            if str(getattr(self.init, k) or "").endswith((".pth", ".pt"))
        ]
        if pth and self.init.arch is None:
            raise ValueError(
                f"init.arch: {', '.join(pth)} is a BLIP .pth; name its architecture (e.g. med-base)"
            )
        if pth and self.init.tokenizer is None:
            raise ValueError(
                f"init.tokenizer: {', '.join(pth)} is a BLIP .pth, which holds no tokenizer; name a "
                "tokenizer folder (a saved bert-base-uncased)"
            )
        # Training sections are checked as the TrainConfig each stage will build.
        for name, section, defaults, used in (
            ("pretrain", self.pretrain, {}, {"pretrain", "pretrain2"} & set(self.stages)),
            # A fine-tune given a published model (init.captioner / init.filter) trains nothing.
            (
                "finetune_captioner",
                self.finetune_captioner,
                CAPTIONER_DEFAULTS,
                "finetune" in self.stages and not self.init.captioner,
            ),
            (
                "finetune_filter",
                self.finetune_filter,
                FILTER_DEFAULTS,
                "finetune" in self.stages and not self.init.filter,
            ),
        ):
            if not used:
                continue
            banned = [k for k in _PIPELINE_TRAIN_FIELDS if k in section]
            if banned:
                raise ValueError(f"{name}.{banned[0]}: set by the pipeline, not the recipe")
            try:
                train_config(merge(defaults, section), data=["recipe-check"], out_dir="recipe-check")
            except ValidationError as err:
                first = err.errors()[0]
                loc = ".".join([name, *(str(p) for p in first["loc"])])
                raise ValueError(f"{loc}: {first['msg'].removeprefix('Value error, ')}") from None
        return self


def load_recipe(
    path: str | Path, overrides: dict[str, Any] | None = None, *, check_paths: bool = True
) -> Recipe:
    """Parse and validate a recipe; errors name the field to change. YAML is read with safe_load,
    so a recipe can never run code. ``check_paths=False`` checks everything but that the input
    files exist (a cluster recipe, checked where its data is not)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of fields, got {type(data).__name__}")
    data.update(overrides or {})
    try:
        return Recipe.model_validate(data, context={"check_paths": check_paths})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise ConfigError(f"recipe {path} is invalid:\n" + "\n".join(lines)) from err
