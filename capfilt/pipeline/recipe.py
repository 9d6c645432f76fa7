"""Recipes: typed YAML files that name the stages of a run and their options, validated up front.

The recipe model is derived from the stage registry: `Recipe` holds the inputs every stage shares
(`urls`, `human`, `init`), and `recipe_model()` adds one field per section each registered stage
declares (`download:`, `capfilt:`, `pretrain:`, ...), typed by that stage's config model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    create_model,
    model_validator,
)

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location, PathOrURI
from capfilt.stages import registry

log = logging.getLogger(__name__)


def _url_paths(value: Any) -> Any:
    """A URL input as locations: one (a file, folder or glob) or a list of them."""
    from capfilt.core import fs

    if isinstance(value, (list, tuple)):
        return [fs.location(str(v)) if isinstance(v, (str, Path)) else v for v in value]
    return fs.location(str(value)) if isinstance(value, (str, Path)) else value


def _url_paths_json(value: Any) -> Any:
    return [str(v) for v in value] if isinstance(value, list) else str(value)


class UrlListInput(BaseModel):
    """A URL list the user brings instead of the shapes world: a file, a folder of list files, a
    glob, or a list of those; local or object storage (``s3://...``); Parquet, CSV, TSV or JSON
    lines, optionally .gz/.zst/.bz2 (capfilt.io.urllist)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    path: Annotated[Any, BeforeValidator(_url_paths), PlainSerializer(_url_paths_json)]
    url_col: str = "url"
    caption_col: str | None = "caption"
    input_format: str | None = None
    source: str = "web"


class HumanInput(BaseModel):
    """Human-annotated pairs as users have them: COCO-Karpathy-style JSONs and their image folders.
    Each JSON's image paths are relative to its own root, by default the JSON's folder;
    ``image_root`` sets both roots at once (COCO keeps train2014/ and val2014/ in one folder).
    Each is a local path or a URI (``s3://bucket/coco/...``)."""

    model_config = ConfigDict(extra="forbid")

    karpathy_train: PathOrURI
    karpathy_test: PathOrURI | None = None
    image_root: PathOrURI | None = None  # both JSONs' root
    train_image_root: PathOrURI | None = None  # karpathy_train's root (default: image_root, else its folder)
    test_image_root: PathOrURI | None = None  # karpathy_test's root (default: image_root, else its folder)

    @model_validator(mode="after")
    def _one_way(self) -> HumanInput:
        if self.image_root is not None and (self.train_image_root or self.test_image_root):
            raise ValueError(
                "human.image_root sets both roots; give it, or train_image_root / test_image_root, not both"
            )
        return self

    def train_root(self) -> Location:
        return self.train_image_root or self.image_root or self.karpathy_train.parent

    def test_root(self) -> Location | None:
        if self.karpathy_test is None:
            return None
        return self.test_image_root or self.image_root or self.karpathy_test.parent


class ModelInit(BaseModel):
    """Published checkpoints to start from instead of pretraining round 1 here."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = None  # capfilt dir, transformers dir or BLIP .pth for round 1
    captioner: str | None = None  # skip the captioner fine-tune and use this one
    filter: str | None = None  # skip the filter fine-tune and use this one
    tokenizer: str | None = None
    # Family of the BLIP .pth files above (e.g. med-base): head counts and eps. Their image size,
    # widths and depths come from the weights; None finds the family by widths. Dirs carry theirs.
    arch: str | None = None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _paths_must_exist(info: ValidationInfo) -> bool:
    """Whether input paths must exist: yes, unless validated with context {"check_paths": False}
    (a cluster recipe checked on a machine without its data)."""
    return not (isinstance(info.context, dict) and info.context.get("check_paths") is False)


def _check_images(label: str, root_label: str, json_path: Location, root: Location) -> None:
    """Every image the Karpathy JSON at `json_path` names exists under `root`, else a ValueError
    that names the fields, a missing path and how many are missing."""
    from capfilt.io.karpathy import missing_images

    if not root.is_dir():
        raise ValueError(f"{root_label}: {root} (the image folder of {label}) is not a folder")
    try:
        total, missing, examples = missing_images(json_path, root)
    except ConfigError as err:
        raise ValueError(f"{label}: {err}") from None
    if missing:
        raise ValueError(
            f"{label}: {missing} of {total} images it names are not under {root_label} ({root}), "
            f"e.g. {examples[0]}; set {root_label} to the folder its image paths are relative to"
        )


class Recipe(BaseModel):
    """The inputs every stage shares. `recipe_model()` adds each registered stage's sections."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # The run folder, a local path or a URI (s3://bucket/runs/x); each stage writes a sub-folder.
    out: PathOrURI
    stages: list[str] = Field(default_factory=lambda: list(registry.default_names()))
    ray_address: str | None = None
    urls: UrlListInput | None = None
    human: HumanInput | None = None
    init: ModelInit = Field(default_factory=ModelInit)

    def section(self, name: str) -> Any:
        """A stage's section of the recipe by its field name (``"capfilt"``, ``"pretrain"``)."""
        return getattr(self, name)

    def has_world(self) -> bool:
        return "world" in self.stages

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Recipe:
        known = registry.names()
        unknown = [s for s in self.stages if s not in known]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known stages are {list(known)}")
        check_paths = _paths_must_exist(info)
        needs_human = [s for s in self.stages if "human" in registry.get(s).reads]
        if needs_human and not self.has_world() and self.section("world") is None and self.human is None:
            raise ValueError(
                f"human: stages {sorted(needs_human)} without the shapes world need a 'human:' section"
            )
        if self.urls is not None and check_paths:
            from capfilt.io.urllist import expand_sources

            try:
                expand_sources(self.urls.path, self.urls.input_format)
            except ConfigError as err:
                raise ValueError(f"urls.path: {err}") from err
        for label, path in (
            ("human.karpathy_train", self.human.karpathy_train if self.human else None),
            ("human.karpathy_test", self.human.karpathy_test if self.human else None),
        ):
            if path is not None and check_paths and not fs.location(path).exists():
                raise ValueError(f"{label}: {path} does not exist")
        if self.human is not None and check_paths and needs_human:
            h = self.human
            root = "human.train_image_root" if h.train_image_root else "human.image_root"
            _check_images("human.karpathy_train", root, h.karpathy_train, h.train_root())
            test_root = h.test_root()
            if h.karpathy_test is not None and test_root is not None:
                root = "human.test_image_root" if h.test_image_root else "human.image_root"
                _check_images("human.karpathy_test", root, h.karpathy_test, test_root)
        pth = [
            f"init.{k}"
            for k in ("pretrained", "captioner", "filter")
            if str(getattr(self.init, k) or "").endswith((".pth", ".pt"))
        ]
        if pth and self.init.tokenizer is None:
            raise ValueError(
                f"init.tokenizer: {', '.join(pth)} is a BLIP .pth, which holds no tokenizer; name a "
                "tokenizer folder (a saved bert-base-uncased)"
            )
        for name in self.stages:
            registry.get(name).check(self, check_paths)
        return self


_models: dict[int, type[Recipe]] = {}


def recipe_model() -> type[Recipe]:
    """The Recipe model of the stages registered now: one field per stage section."""
    version = registry.version()
    if version not in _models:
        fields: dict[str, Any] = {}
        for stage in registry.stages():
            for name, sec in stage.sections.items():
                default = (
                    Field(default_factory=sec.default_factory, description=sec.help)
                    if sec.default_factory is not None
                    else Field(sec.default, description=sec.help)
                )
                fields[name] = (sec.type, default)
        _models.clear()
        _models[version] = create_model("Recipe", __base__=Recipe, **fields)
    return _models[version]


def parse_assignments(pairs: list[str] | None) -> dict[str, Any]:
    """``["capfilt.k=3", "download.image_size=64"]`` as nested overrides; values are YAML
    (``3`` an int, ``true`` a bool, ``[a, b]`` a list, ``null`` None)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: write FIELD=VALUE, e.g. --set capfilt.k=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML: {err}") from err
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {p} is set to a value and to fields")
        node[parts[-1]] = value
    return out


def validation_lines(err: ValidationError) -> list[str]:
    """One line per error, ``  field.path: message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return lines


def load_recipe(
    path: str | Path, overrides: dict[str, Any] | None = None, *, check_paths: bool = True
) -> Recipe:
    """Parse and validate a recipe; errors name the field to change. YAML is read with safe_load,
    so a recipe can never run code. ``overrides`` (nested, e.g. from ``--set``) are merged on top.
    ``check_paths=False`` checks everything but that the input files exist (a cluster recipe,
    checked where its data is not)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of fields, got {type(data).__name__}")
    data = merge(data, overrides or {})
    try:
        return recipe_model().model_validate(data, context={"check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(f"recipe {path} is invalid:\n" + "\n".join(validation_lines(err))) from err
