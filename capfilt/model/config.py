"""MED architecture configs: the typed config and the name -> config registry over ``models/*.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capfilt.core.errors import ConfigError

if TYPE_CHECKING:
    from capfilt.model.tokenizer import TokenIds

__all__ = [
    "MedConfig",
    "TextConfig",
    "VisionConfig",
    "config_dirs",
    "get_config",
    "list_configs",
]

logger = logging.getLogger(__name__)

# MedConfig fields that were never read: the EMA momentum and the distillation weight are the
# objectives' (their ObjectiveConfig), so one file no longer states them twice.
RETIRED_FIELDS = ("momentum", "alpha")


class VisionConfig(BaseModel):
    """The ViT image encoder. Defaults are BLIP's ViT-B/16 at pretraining resolution."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(224, gt=0)
    patch_size: int = Field(16, gt=0)
    hidden_size: int = Field(768, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    mlp_size: int = Field(3072, gt=0)
    # BLIP's ViT (timm-style) uses 1e-6; transformers' BlipVisionConfig defaults to 1e-5.
    layer_norm_eps: float = Field(1e-6, gt=0)
    attention_dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class TextConfig(BaseModel):
    """The BERT-style text encoder/decoder. Defaults are BLIP's BERT-base with its 30524-token vocab."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(30524, gt=0)
    hidden_size: int = Field(768, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    layer_norm_eps: float = Field(1e-12, gt=0)
    pad_token_id: int = Field(0, ge=0)
    # [SEP] ends a caption: generation stops on it.
    sep_token_id: int = Field(102, ge=0)
    # [DEC] is the decoder's first token (BLIP's bos); [ENC] is the image-grounded encoder's.
    dec_token_id: int = Field(30522, ge=0)
    enc_token_id: int = Field(30523, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        ids = {
            "pad_token_id": self.pad_token_id,
            "sep_token_id": self.sep_token_id,
            "dec_token_id": self.dec_token_id,
            "enc_token_id": self.enc_token_id,
        }
        too_big = {k: v for k, v in ids.items() if v >= self.vocab_size}
        if too_big:
            raise ValueError(f"token ids {too_big} do not fit vocab_size {self.vocab_size}")
        if self.dec_token_id == self.enc_token_id:
            raise ValueError(f"dec_token_id and enc_token_id are both {self.dec_token_id}; they must differ")
        return self


class MedConfig(BaseModel):
    """One MED model: image encoder, text encoder/decoder, heads, and the objectives' BLIP defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    embed_dim: int = Field(256, gt=0)
    # Objective hyperparameters live beside the architecture so one file describes a BLIP run.
    queue_size: int = Field(57600, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    temp: float = Field(0.07, gt=0)
    # Std of the normal init of every Linear/Embedding/position table when training from scratch.
    # BERT's and ViT's 0.02 suits width 768; at width 96 it leaves attention and cross-attention
    # outputs so small next to the residual that ITC and ITM sit at chance for hundreds of steps
    # (med-tiny on the shapes world: ITC ROC-AUC 0.62 after 300 steps at 0.02, 0.90 at 0.05).
    init_std: float = Field(0.02, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data: Any) -> Any:
        # Configs saved before these fields were dropped still load (extra="forbid" would refuse them).
        if isinstance(data, dict) and any(k in data for k in RETIRED_FIELDS):
            logger.debug("ignoring retired MedConfig fields %s", sorted(set(data) & set(RETIRED_FIELDS)))
            return {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
        return data

    def with_tokens(
        self,
        *,
        vocab_size: int,
        pad_token_id: int,
        sep_token_id: int,
        dec_token_id: int,
        enc_token_id: int,
    ) -> MedConfig:
        """A copy whose text vocabulary and special ids match a tokenizer (validated again)."""
        text = self.text.model_dump() | {
            "vocab_size": vocab_size,
            "pad_token_id": pad_token_id,
            "sep_token_id": sep_token_id,
            "dec_token_id": dec_token_id,
            "enc_token_id": enc_token_id,
        }
        return MedConfig.model_validate(self.model_dump() | {"text": text})

    def with_token_ids(self, ids: TokenIds) -> MedConfig:
        """``with_tokens`` from the ids read off a tokenizer: [DEC] is its bos, [ENC] its enc."""
        return self.with_tokens(
            vocab_size=ids.vocab_size,
            pad_token_id=ids.pad,
            sep_token_id=ids.sep,
            dec_token_id=ids.bos,
            enc_token_id=ids.enc,
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


# Canonical architecture files live in the repository's `models/` folder. A wheel cannot reach
# that folder, so the loader also looks inside the package: `capfilt/model/configs` is meant to be
# a symlink to `../../models` listed in package-data, which setuptools copies into the wheel as
# plain files. The first folder holding NAME.json wins.
_PACKAGE_DIR = Path(__file__).parent / "configs"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def config_dirs() -> list[Path]:
    """Folders searched for ``NAME.json``, in order: the package copy, then ``models/`` of a source checkout."""
    dirs = [_PACKAGE_DIR]
    # Only a source checkout (editable install): never a stray `models/` in site-packages.
    if (_REPO_ROOT / "pyproject.toml").is_file():
        dirs.append(_REPO_ROOT / "models")
    return [d for d in dirs if d.is_dir()]


def list_configs() -> list[str]:
    """Names of every architecture the registry knows."""
    return sorted({p.stem for d in config_dirs() for p in d.glob("*.json")})


def _read(path: Path) -> MedConfig:
    try:
        data = json.loads(path.read_text())
        return MedConfig.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as e:
        raise ConfigError(f"model config {path} is invalid: {e}") from e


def get_config(name_or_path: str | Path) -> MedConfig:
    """Turn a registry name (``"med-tiny"``) or a path to a JSON file into a validated ``MedConfig``."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"model config file {path} does not exist")
        return _read(path)
    for d in config_dirs():
        candidate = d / f"{name_or_path}.json"
        if candidate.is_file():
            logger.debug("model config %s from %s", name_or_path, candidate)
            return _read(candidate)
    raise ConfigError(
        f"unknown model {str(name_or_path)!r}; known: {', '.join(list_configs()) or 'none'} "
        f"(searched {', '.join(str(d) for d in config_dirs()) or 'no config folder'}); "
        "or pass a path to a JSON file"
    )
