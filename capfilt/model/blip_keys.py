"""BLIP's .pth key names: which Med parameter each one is, which are dropped and why, and the architecture the shapes give."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from capfilt.core.errors import ConfigError
from capfilt.model.config import MedConfig, get_config, list_configs

if TYPE_CHECKING:
    from capfilt.model.tokenizer import TokenIds

__all__ = [
    "DROPPED_BUFFERS",
    "DROPPED_TOP_LEVEL",
    "ROLE_HEADS",
    "blip_name",
    "config_from_shapes",
    "drop_reason",
    "heads_from_keys",
    "log_dropped",
    "med_name",
    "vit_key",
]

logger = logging.getLogger(__name__)

# Every BLIP key MED does not load, by its first name component. These are what BLIP's classes
# (BLIP_Pretrain, BLIP_Retrieval) keep only for training: nothing at inference reads them.
DROPPED_TOP_LEVEL: dict[str, str] = {
    "visual_encoder_m": "momentum (EMA) copy of the ViT, for ITC distillation",
    "vision_proj_m": "momentum copy of vision_proj",
    "text_encoder_m": "momentum copy of the text encoder",
    "text_proj_m": "momentum copy of text_proj",
    "image_queue": "ITC feature queue (its size is queue_size)",
    "text_queue": "ITC feature queue",
    "idx_queue": "image-id queue of BLIP_Retrieval",
    "ptr_queue": "queue pointer of BLIP_Retrieval",
    "queue_ptr": "queue pointer of BLIP_Pretrain",
}
# Buffers BLIP's BertEmbeddings saves that current transformers recomputes (arange(512)).
DROPPED_BUFFERS: dict[str, str] = {
    "text_encoder.embeddings.position_ids": "position-id buffer (arange), recomputed",
    "text_decoder.bert.embeddings.position_ids": "position-id buffer (arange), recomputed",
}
# Not dropped but worth naming: `temp` loads into Med.temp, and the tied duplicates
# (text_decoder.cls.predictions.decoder.weight = word embeddings, ...decoder.bias = ...predictions.bias,
# and in BLIP_Pretrain text_decoder.bert.* = text_encoder.* outside self-attention) are Med's own
# shared tensors under the same names: they load as aliases, checked to hold equal values.

# The keys a role needs, by their BLIP (= Med text side) prefix.
ROLE_HEADS: dict[str, frozenset[str]] = {"captioner": frozenset({"lm"}), "filter": frozenset({"itm", "itc"})}

# ------------------------------------------------------------------------------------ ViT names

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_MED_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "norm1.": "layer_norm1.",
    "norm2.": "layer_norm2.",
    "attn.qkv.": "self_attn.qkv.",
    "attn.proj.": "self_attn.projection.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}


def vit_key(key: str) -> str:
    """A timm / BLIP ViT key -> its name inside BlipVisionModel; unknown keys come back as given."""
    if key in _TOP:
        return _TOP[key]
    m = _BLOCK.fullmatch(key)
    if m:
        for old, new in _BLOCK_PARTS.items():
            if m.group(2).startswith(old):
                return f"encoder.layers.{m.group(1)}.{new}{m.group(2)[len(old) :]}"
    return key


def _vit_key_back(key: str) -> str:
    if key in _TOP_BACK:
        return _TOP_BACK[key]
    m = _MED_BLOCK.fullmatch(key)
    if m:
        for old, new in _BLOCK_PARTS.items():
            if m.group(2).startswith(new):
                return f"blocks.{m.group(1)}.{old}{m.group(2)[len(new) :]}"
    return key


def med_name(key: str) -> str:
    """A BLIP key -> the Med key it loads into (the text side and heads keep BLIP's names)."""
    if key.startswith("visual_encoder."):
        return "vision_model." + vit_key(key.removeprefix("visual_encoder."))
    return key


def blip_name(key: str) -> str:
    """A Med key -> the BLIP key that holds it, for messages in the checkpoint's own naming."""
    if key.startswith("vision_model."):
        return "visual_encoder." + _vit_key_back(key.removeprefix("vision_model."))
    return key


def drop_reason(key: str) -> str | None:
    """Why MED does not load this BLIP key, or None when it loads (or is unknown)."""
    if key in DROPPED_BUFFERS:
        return DROPPED_BUFFERS[key]
    return DROPPED_TOP_LEVEL.get(key.split(".", 1)[0])


def log_dropped(keys: Iterable[str], what: str) -> None:
    """Dropped keys grouped by first name component with counts (INFO), every key at DEBUG."""
    keys = sorted(keys)
    if not keys:
        return
    groups = Counter(k.split(".", 1)[0] if k not in DROPPED_BUFFERS else k for k in keys)
    logger.info(
        "%s: dropped %d training-only keys: %s",
        what,
        len(keys),
        ", ".join(f"{prefix} ({n})" for prefix, n in sorted(groups.items())),
    )
    logger.debug("%s: dropped keys: %s", what, ", ".join(keys))


def heads_from_keys(keys: Iterable[str]) -> frozenset[str]:
    """The heads a BLIP state dict trained: text_decoder -> lm, projections -> itc, itm_head -> itm."""
    tops = {k.split(".", 1)[0] for k in keys}
    heads = set()
    if "text_decoder" in tops:
        heads.add("lm")
    # The text encoder is not asked for here: a loader requires it and names it when missing.
    if tops & {"vision_proj", "text_proj"}:
        heads.add("itc")
    if "itm_head" in tops:
        heads.add("itm")
    return frozenset(heads)


# ---------------------------------------------------------------------------- shapes -> config


def _count(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _towers(shapes: Mapping[str, Sequence[int]], path: object) -> dict[str, int]:
    """Widths, depths and sizes the state dict itself fixes."""
    try:
        pos = shapes["visual_encoder.pos_embed"]
        patch = shapes["visual_encoder.patch_embed.proj.weight"]
    except KeyError as e:
        raise ConfigError(f"{path} has no {e.args[0]}: not a BLIP checkpoint") from None
    text = (
        "text_encoder."
        if "text_encoder.embeddings.word_embeddings.weight" in shapes
        else "text_decoder.bert."
    )
    words = shapes.get(f"{text}embeddings.word_embeddings.weight")
    if words is None:
        raise ConfigError(f"{path} has neither text_encoder.* nor text_decoder.*: not a BLIP checkpoint")
    n_patches, p = pos[1] - 1, patch[-1]
    grid = round(n_patches**0.5)
    if grid * grid != n_patches:
        raise ConfigError(f"{path}: visual_encoder.pos_embed has {n_patches} patches, not a square grid")
    return {
        "image_size": grid * p,
        "patch_size": p,
        "vision_width": patch[0],
        "vision_depth": _count(shapes, r"visual_encoder\.blocks\.(\d+)\."),
        "mlp_size": shapes["visual_encoder.blocks.0.mlp.fc1.weight"][0],
        "vocab_size": words[0],
        "text_width": words[1],
        "text_depth": _count(shapes, re.escape(text) + r"encoder\.layer\.(\d+)\."),
        "intermediate_size": shapes[f"{text}encoder.layer.0.intermediate.dense.weight"][0],
        "max_positions": shapes[f"{text}embeddings.position_embeddings.weight"][0],
    }


def _fits(cfg: MedConfig, t: Mapping[str, int]) -> bool:
    return (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.text.hidden_size, cfg.text.num_layers) == (
        t["vision_width"],
        t["vision_depth"],
        t["text_width"],
        t["text_depth"],
    )


def _family(t: Mapping[str, int], path: object) -> MedConfig:
    """The registry architecture whose widths and depths are the checkpoint's (its heads, eps)."""
    fits = [name for name in list_configs() if _fits(get_config(name), t)]
    if len(fits) != 1:
        raise ConfigError(
            f"{path}: a ViT {t['vision_width']} wide x {t['vision_depth']} deep and a text side "
            f"{t['text_width']} x {t['text_depth']} match {fits or 'no registry architecture'}; "
            "name its family with arch (a registry name or a MedConfig JSON)"
        )
    return get_config(fits[0])


def config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    family: MedConfig | str | None,
    path: object,
    token_ids: TokenIds | None = None,
    enc_token_id: int | None = None,
) -> MedConfig:
    """The MedConfig of a BLIP state dict: image size, patch size, widths, depths, vocabulary and
    embed_dim from its shapes; head counts and eps from ``family`` (found in the registry by
    widths and depths when None); special token ids from ``token_ids`` (the tokenizer's: a .pth
    holds none), else the family's; ``enc_token_id`` overrides [ENC]."""
    t = _towers(shapes, path)
    fam = _family(t, path) if family is None else get_config(family) if isinstance(family, str) else family
    if not _fits(fam, t):
        raise ConfigError(
            f"{path} has a ViT {t['vision_width']} x {t['vision_depth']} and text {t['text_width']} x "
            f"{t['text_depth']} (width x depth), arch {fam.name} has {fam.vision.hidden_size} x "
            f"{fam.vision.num_layers} and {fam.text.hidden_size} x {fam.text.num_layers}"
        )
    vision = fam.vision.model_dump() | {
        "image_size": t["image_size"],
        "patch_size": t["patch_size"],
        "mlp_size": t["mlp_size"],
    }
    text = fam.text.model_dump() | {
        "vocab_size": t["vocab_size"],
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_positions"],
    }
    if token_ids is not None:
        if token_ids.vocab_size > t["vocab_size"]:
            raise ConfigError(
                f"{path} has {t['vocab_size']} token embeddings, the tokenizer {token_ids.vocab_size} "
                "tokens; pass the tokenizer the checkpoint was trained with"
            )
        text |= {
            "pad_token_id": token_ids.pad,
            "sep_token_id": token_ids.sep,
            "dec_token_id": token_ids.bos,
            "enc_token_id": token_ids.enc,
        }
    if enc_token_id is not None:
        text["enc_token_id"] = enc_token_id
    proj = shapes.get("vision_proj.weight")
    data = fam.model_dump() | {"vision": vision, "text": text}
    if proj is not None:
        data["embed_dim"] = proj[0]
    try:
        return MedConfig.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"{path}: arch {fam.name} does not fit the checkpoint: {e}") from e
