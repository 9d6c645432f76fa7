"""MED to and from transformers BLIP folders: BlipForConditionalGeneration (captioner) and
BlipForImageTextRetrieval (filter), every key and shape checked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.model.config import MedConfig, TextConfig, VisionConfig
from capfilt.model.med import Med, blip_config
from capfilt.model.weights import (
    CheckpointError,
    assign,
    drop_keys,
    is_position_ids,
    read_state_dict,
    required_keys,
)

__all__ = [
    "CAPTIONER_ARCH",
    "FILTER_ARCH",
    "PART_HEADS",
    "arch_part",
    "export_captioner",
    "export_filter",
    "load_hf",
    "med_config_from_blip",
]

logger = logging.getLogger(__name__)

CAPTIONER_ARCH = "BlipForConditionalGeneration"
FILTER_ARCH = "BlipForImageTextRetrieval"

# Med key prefixes that make up each exported / imported part.
_PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "captioner": ("vision_model.", "text_decoder."),
    "filter": ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
}
PART_HEADS = {"captioner": frozenset({"lm"}), "filter": frozenset({"itc", "itm"})}


def arch_part(architectures: Sequence[str]) -> Literal["captioner", "filter"] | None:
    """Which MED part a transformers folder holds, from its ``architectures``; None: neither."""
    if CAPTIONER_ARCH in architectures:
        return "captioner"
    return "filter" if FILTER_ARCH in architectures else None


# ------------------------------------------------------------------------------- transformers BLIP


def med_config_from_blip(
    hf: BlipConfig, *, enc_token_id: int | None = None, name: str = "from-transformers"
) -> MedConfig:
    """The MedConfig of a transformers BLIP config. [ENC] is not a transformers field: it comes from
    ``enc_token_id``, else from capfilt's exports, else BLIP's layout ([ENC] right after [DEC])."""
    v: Any = hf.vision_config
    t: Any = hf.text_config
    for part, act in (("vision", v.hidden_act), ("text", t.hidden_act)):
        if act != "gelu":
            raise CheckpointError(f"{part} hidden_act is {act!r}; MED uses exact 'gelu'")
    if enc_token_id is None:
        enc_token_id = getattr(t, "capfilt_enc_token_id", None)
    if enc_token_id is None:
        enc_token_id = t.bos_token_id + 1
        logger.info("no [ENC] id in the config: using bos+1 = %d (BLIP's tokenizer layout)", enc_token_id)
    try:
        return MedConfig(
            name=name,
            vision=VisionConfig(
                image_size=v.image_size,
                patch_size=v.patch_size,
                hidden_size=v.hidden_size,
                num_layers=v.num_hidden_layers,
                num_heads=v.num_attention_heads,
                mlp_size=v.intermediate_size,
                layer_norm_eps=v.layer_norm_eps,
                attention_dropout=v.attention_dropout,
            ),
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                intermediate_size=t.intermediate_size,
                max_position_embeddings=t.max_position_embeddings,
                dropout=t.hidden_dropout_prob,
                attention_dropout=t.attention_probs_dropout_prob,
                layer_norm_eps=t.layer_norm_eps,
                pad_token_id=t.pad_token_id,
                sep_token_id=t.sep_token_id,
                dec_token_id=t.bos_token_id,
                enc_token_id=enc_token_id,
            ),
            embed_dim=hf.image_text_hidden_size,
            label_smoothing=t.label_smoothing,
        )
    except ValueError as e:
        raise CheckpointError(f"the transformers config does not describe a valid MED: {e}") from e


def load_hf(path: str | Path, *, enc_token_id: int | None = None) -> Med:
    """A Med from a transformers directory saved by ``save_pretrained``:
    BlipForConditionalGeneration (captioner: heads {'lm'}) or BlipForImageTextRetrieval
    (filter: heads {'itc', 'itm'}). Weights the directory does not hold keep their init and
    their functions raise (see ``Med.heads``)."""
    path = Path(path)
    hf = BlipConfig.from_pretrained(path)
    archs = hf.architectures or []
    part = arch_part(archs)
    if part is None:
        raise CheckpointError(
            f"{path} holds {archs or 'an unnamed architecture'}; capfilt loads {CAPTIONER_ARCH} (captioner) "
            f"or {FILTER_ARCH} (filter)"
        )
    med = Med(med_config_from_blip(hf, enc_token_id=enc_token_id, name=path.name))
    state = drop_keys(read_state_dict(path), is_position_ids, "position_ids buffers")
    state = drop_keys(
        state, lambda k: k.startswith("text_encoder.pooler."), "text pooler tensors (unused by MED)"
    )
    assign(med, state, required_keys(med, _PART_PREFIXES[part]), f"{archs[0]} at {path}")
    med.heads = PART_HEADS[part]
    med.eval()
    return med


def _export(med: Med, out_dir: str | Path, part: Literal["captioner", "filter"], tokenizer: Any) -> Path:
    med.require(*PART_HEADS[part])
    out = Path(out_dir)
    cls = BlipForConditionalGeneration if part == "captioner" else BlipForImageTextRetrieval
    hf_model = cls(blip_config(med.config))
    src = {k: v for k, v in med.state_dict().items() if k.startswith(_PART_PREFIXES[part])}
    assign(hf_model, src, list(hf_model.state_dict()), f"export of {med.config.name} as {cls.__name__}")
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("exported %s to %s", cls.__name__, out)
    return out


def export_captioner(med: Med, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a BlipForConditionalGeneration directory (safetensors) that plain transformers loads.
    transformers' ``generate`` sets [DEC] itself; pass ``tokenizer`` to save it alongside."""
    return _export(med, out_dir, "captioner", tokenizer)


def export_filter(med: Med, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a BlipForImageTextRetrieval directory (safetensors) that plain transformers loads.

    transformers' ITM forward does not put [ENC] first (transformers issues 22732, 25629): callers
    of the exported model must set ``input_ids[:, 0]`` to ``config.text_config.capfilt_enc_token_id``
    to get the probabilities capfilt computes."""
    return _export(med, out_dir, "filter", tokenizer)
