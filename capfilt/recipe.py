"""Recipes: typed YAML files that name the stages of a run and their options, validated up front."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capfilt.download import DownloadConfig
from capfilt.errors import ConfigError
from capfilt.world import WorldConfig

log = logging.getLogger(__name__)

STAGES = ("world", "download")


class UrlListInput(BaseModel):
    """A URL list the user brings instead of the shapes world."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    url_col: str = "url"
    caption_col: str | None = "caption"
    input_format: str | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    out: Path  # the run folder; each stage writes its own sub-folder
    stages: list[str] = Field(default_factory=lambda: list(STAGES))
    ray_address: str | None = None
    world: WorldConfig | None = None
    urls: UrlListInput | None = None
    download: DownloadConfig = Field(default_factory=DownloadConfig)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known stages are {list(STAGES)}")
        if "world" in self.stages and self.world is None:
            raise ValueError("world: the stage 'world' is listed but the recipe has no 'world:' section")
        if "download" in self.stages and "world" not in self.stages and self.urls is None:
            raise ValueError(
                "urls: a download without the 'world' stage needs a 'urls:' section (a URL list)"
            )
        if self.urls is not None and not self.urls.path.exists():
            raise ValueError(f"urls.path: {self.urls.path} does not exist")
        return self


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse and validate a recipe; errors name the field to change. YAML is read with safe_load."""
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
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(recipe)"
            lines.append(f"  {loc}: {e['msg']}")
        raise ConfigError(f"recipe {path} is invalid:\n" + "\n".join(lines)) from err
