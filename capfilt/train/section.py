"""A recipe's training section: a TrainConfig without the fields the pipeline fills in."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from capfilt.pipeline.recipe import merge
from capfilt.train.config import DataSource, TrainConfig

#: Filled in by the pipeline (data from upstream stages, the stage's folder), never by a recipe.
PIPELINE_FIELDS = ("data", "out_dir", "init", "run_name")


class TrainSection(TrainConfig):
    """``pretrain:`` (round 1 and round 2 alike) and the base of the fine-tune sections."""

    #: What the stage trains with before the recipe's own settings (BLIP's fine-tune choices).
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    # Set by the pipeline for each run (`for_run`); never dumped, so a dumped recipe validates again.
    data: list[DataSource] = Field(default_factory=list, exclude=True)
    out_dir: str = Field("", exclude=True)
    init: str | None = Field(None, exclude=True)
    run_name: str = Field("train", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_banned(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        banned = [k for k in PIPELINE_FIELDS if k in value]
        if banned:
            raise ValueError(f"{banned[0]}: set by the pipeline, not the recipe")
        return merge(cls.DEFAULTS, value)

    def for_run(self, data: list[Any], out_dir: str, **fixed: Any) -> TrainConfig:
        """The TrainConfig a stage runs: what the recipe set, plus what the pipeline fills in."""
        given = self.model_dump(exclude_unset=True)
        return TrainConfig.model_validate({**given, "data": data, "out_dir": out_dir, **fixed})

    def key(self) -> dict[str, Any]:
        """What the recipe set (defaults included), for the stage key."""
        return self.model_dump(mode="json", exclude_unset=True)


class CaptionerSection(TrainSection):
    """``finetune_captioner:``. BLIP's captioner learns LM only, with a masked prompt."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "objectives": {"itc": 0.0, "itm": 0.0, "lm": 1.0},
        "prompt": "a picture of ",
        "schedule": "cosine",
        "min_scale": 0.5,
    }


class FilterSection(TrainSection):
    """``finetune_filter:``. BLIP's filter learns ITC + ITM, positives by image id (several captions each)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "objectives": {"itc": 1.0, "itm": 1.0, "lm": 0.0, "positives": "image_id"},
        "schedule": "cosine",
        "min_scale": 0.5,
    }
