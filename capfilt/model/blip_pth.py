"""MED from BLIP's original .pth checkpoints (model_base.pth, the CapFilt-L captioner and filter, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

from capfilt.model.backbones import vit_key
from capfilt.model.config import MedConfig, get_config
from capfilt.model.med import Med
from capfilt.model.weights import (
    CheckpointError,
    assign,
    drop_keys,
    fit_pos_embed,
    is_position_ids,
    key_list,
    read_state_dict,
    required_keys,
)

__all__ = ["load_blip_pth"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- BLIP's original .pth


def _blip_key(key: str) -> str:
    if key.startswith("visual_encoder."):
        return "vision_model." + vit_key(key.removeprefix("visual_encoder."))
    return key  # text_encoder.*, text_decoder.*, vision_proj.*, text_proj.*, itm_head.*, temp


def _is_training_state(key: str) -> bool:
    """Momentum copies (visual_encoder_m, text_encoder_m, ...) and feature queues (image_queue, ...)."""
    top = key.split(".", 1)[0]
    return top.endswith("_m") or "queue" in top


def load_blip_pth(path: str | Path, config: MedConfig | str) -> Med:
    """A Med from one of BLIP's original checkpoints (model_base.pth, model_base_capfilt_large.pth,
    model_base_caption_capfilt_large.pth, model_base_retrieval_coco.pth, ...).

    ``config`` names the architecture (e.g. "med-base"), since a .pth carries none. Momentum
    copies and queues are dropped; ``temp`` is loaded when present. The parts present decide the
    heads: text_decoder.* -> 'lm', text_encoder.* + itm_head -> 'itm', projections -> 'itc'.
    A 224 px position table is resized to the config's image size.
    """
    path = Path(path)
    cfg = get_config(config) if isinstance(config, str) else config
    raw = read_state_dict(path)
    raw = drop_keys(raw, _is_training_state, "momentum-encoder and queue tensors")
    raw = drop_keys(raw, is_position_ids, "position_ids buffers")
    source = {_blip_key(k): v for k, v in raw.items()}
    names = {_blip_key(k): k for k in raw}
    med = Med(cfg)
    fit_pos_embed(source, "vision_model.embeddings.position_embedding", med, "visual_encoder.pos_embed")

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in source)

    prefixes = ["vision_model."]
    heads = set()
    if has("text_decoder."):
        prefixes.append("text_decoder.")
        heads.add("lm")
    if has("text_encoder."):
        prefixes.append("text_encoder.")
    if has("vision_proj.") or has("text_proj."):
        prefixes += ["vision_proj.", "text_proj."]
        heads.add("itc")
    if has("itm_head."):
        prefixes.append("itm_head.")
        heads.add("itm")
    if heads & {"itc", "itm"} and not has("text_encoder."):
        prefixes.append("text_encoder.")  # reported as missing: the heads need the encoder
    if not heads:
        raise CheckpointError(
            f"{path} has no text_decoder, projections or itm_head: nothing MED can use "
            f"(top-level keys: {key_list({k.split('.', 1)[0] for k in raw})})"
        )
    assign(med, source, required_keys(med, tuple(prefixes)), f"BLIP checkpoint {path}", names)
    med.heads = frozenset(heads)
    med.eval()
    return med
