"""Initialising MED from pretrained backbones: the ViT from timm (DeiT, ViT in21k), the text side from BERT."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from capfilt.model.blip_keys import vit_key
from capfilt.model.med import Med
from capfilt.model.weights import (
    StateDict,
    assign,
    drop_keys,
    fit_pos_embed,
    is_position_ids,
    read_state_dict,
    required_keys,
)

__all__ = ["init_text_from_bert", "init_vision_from_timm", "vit_key"]

logger = logging.getLogger(__name__)


def init_vision_from_timm(med: Med, timm_state: Mapping[str, torch.Tensor] | nn.Module | str | Path) -> None:
    """Initialise the ViT from a timm VisionTransformer (e.g. DeiT-base, ViT-L/16 in21k): its state
    dict, the model itself, or a checkpoint file. The classifier head is dropped; the position
    table is resized to the model's image size; anything else that does not fit is an error."""
    if isinstance(timm_state, nn.Module):
        timm_state = timm_state.state_dict()
    elif isinstance(timm_state, (str, Path)):
        from capfilt.core.fs import local_copy

        timm_state = read_state_dict(local_copy(timm_state))  # a URI: copied to this node's cache
    state = drop_keys(timm_state, lambda k: k.startswith(("head.", "fc_norm.")), "timm classifier tensors")
    source = {f"vision_model.{vit_key(k)}": v for k, v in state.items()}
    names = {f"vision_model.{vit_key(k)}": k for k in state}
    fit_pos_embed(source, "vision_model.embeddings.position_embedding", med, "pos_embed")
    assign(med, source, required_keys(med, ("vision_model.",)), "timm ViT state dict", names)


# ----------------------------------------------------------------------------------------- BERT


def init_text_from_bert(med: Med, bert_state: Mapping[str, torch.Tensor] | nn.Module | str | Path) -> None:
    """Initialise the text side from a BERT checkpoint (transformers BertModel / BertForMaskedLM keys).

    Both the encoder's and the decoder's self-attention start from BERT's, as in BLIP; the
    cross-attention has no BERT counterpart and keeps its init. Token-type embeddings and the
    pooler are skipped. BERT's vocabulary fills the first rows of the larger MED vocabulary
    ([DEC] and [ENC] keep their init). An MLM head, when present, initialises the LM head.
    """
    if isinstance(bert_state, nn.Module):
        bert_state = bert_state.state_dict()
    elif isinstance(bert_state, (str, Path)):
        bert_state = read_state_dict(bert_state)
    state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    state = drop_keys(
        state,
        lambda k: (
            k.startswith(("pooler.", "cls.seq_relationship.", "cls.predictions.decoder."))
            or "token_type_embeddings" in k
            or is_position_ids(k)
        ),
        "BERT tensors MED does not use (token types, pooler, NSP head, tied decoder, position_ids)",
    )
    target = med.state_dict()
    source: StateDict = {}
    names: dict[str, str] = {}
    for key, value in state.items():
        if key.startswith("cls.predictions."):
            dests = [f"text_decoder.{key}"]
        elif ".attention." in key:
            dests = [f"text_encoder.{key}", f"text_decoder.bert.{key}"]
        else:
            dests = [f"text_encoder.{key}"]
        for dest in dests:
            source[dest] = _fit_rows(value, target.get(dest), key)
            names[dest] = key
    has_head = any(k.startswith("cls.") for k in state)
    required = required_keys(med, ("text_encoder.",), exclude=lambda k: ".crossattention." in k)
    required += [
        k for k in required_keys(med, ("text_decoder.",)) if ".attention." in k or (has_head and ".cls." in k)
    ]
    assign(med, source, required, "BERT state dict", names)
    if not has_head:
        logger.info("BERT checkpoint has no MLM head: the LM head keeps its init")


def _fit_rows(value: torch.Tensor, target: torch.Tensor | None, key: str) -> torch.Tensor:
    """BERT's vocabulary / position tables are copied into the first rows of MED's larger ones."""
    if target is None or value.shape == target.shape or value.dim() != target.dim():
        return value
    if value.shape[1:] != target.shape[1:]:
        return value  # a real mismatch: assign reports it
    if key.endswith(("word_embeddings.weight", "predictions.bias")) and value.shape[0] < target.shape[0]:
        logger.info(
            "%s: copying %d of %d rows (new tokens keep their init)", key, value.shape[0], target.shape[0]
        )
        return torch.cat([value, target[value.shape[0] :].to(value.dtype)], dim=0)
    if key.endswith("position_embeddings.weight") and value.shape[0] > target.shape[0]:
        logger.info("%s: keeping the first %d of %d positions", key, target.shape[0], value.shape[0])
        return value[: target.shape[0]]
    return value
