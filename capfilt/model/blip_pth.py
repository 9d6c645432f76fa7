"""MED from BLIP's original .pth checkpoints (model_base.pth, the CapFilt-L captioner and filter, ...)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from capfilt.model.blip_keys import (
    blip_name,
    config_from_shapes,
    drop_reason,
    heads_from_keys,
    log_dropped,
    med_name,
)
from capfilt.model.config import MedConfig
from capfilt.model.med import Med
from capfilt.model.weights import CheckpointError, assign, key_list, read_state_dict, required_keys

if TYPE_CHECKING:
    from capfilt.model.tokenizer import TokenIds

__all__ = ["load_blip_pth"]

logger = logging.getLogger(__name__)

# The Med parts each head needs, so a checkpoint missing one of them is reported, not half-loaded.
_HEAD_PREFIXES = {
    "lm": ("text_decoder.",),
    "itc": ("text_encoder.", "vision_proj.", "text_proj."),
    "itm": ("text_encoder.", "itm_head."),
}


def load_blip_pth(
    path: str | Path,
    arch: MedConfig | str | None = None,
    *,
    token_ids: TokenIds | None = None,
    enc_token_id: int | None = None,
    image_size: int | None = None,
    strict: bool = True,
) -> Med:
    """A Med from one of BLIP's original checkpoints (model_base.pth, model_base_capfilt_large.pth,
    model_base_caption_capfilt_large.pth, model_base_retrieval_coco.pth, ...).

    The state dict fixes image size, patch size, widths, depths and vocabulary; ``arch`` names the
    family (head counts, eps: a registry name or MedConfig, found by widths when None);
    ``token_ids`` are the tokenizer's special ids (a .pth holds no tokenizer). The momentum copies,
    queues and position-id buffers BLIP saves are dropped by name (``blip_keys``); any other key
    the model lacks is an error unless ``strict=False``. The parts present decide the heads:
    text_decoder -> 'lm', text_encoder + projections -> 'itc', text_encoder + itm_head -> 'itm'.
    ``image_size`` asks for another resolution: the position table is resized (a WARNING).
    """
    path = Path(path)
    raw = read_state_dict(path)
    dropped = [k for k in raw if drop_reason(k) is not None]
    kept = {k: v for k, v in raw.items() if drop_reason(k) is None}
    what = f"BLIP checkpoint {path}"
    log_dropped(dropped, what)
    cfg = config_from_shapes(
        {k: tuple(v.shape) for k, v in kept.items()}, arch, path, token_ids, enc_token_id
    )
    heads = heads_from_keys(kept)
    if not heads:
        raise CheckpointError(
            f"{path} has no text_decoder, projections or itm_head: nothing MED can use "
            f"(top-level keys: {key_list({k.split('.', 1)[0] for k in raw})})"
        )
    source = {med_name(k): v for k, v in kept.items()}
    names = {med_name(k): k for k in kept}
    med = Med(cfg)
    prefixes = ("vision_model.",) + tuple(p for h in sorted(heads) for p in _HEAD_PREFIXES[h])
    required = required_keys(med, prefixes)  # temp loads when present; a captioner has none
    assign(med, source, required, what, names, strict=strict, missing_name=blip_name)
    med.heads = heads
    med.eval()
    logger.info(
        "%s: %d px, patch %d, heads %s (read from the state dict)",
        what,
        cfg.vision.image_size,
        cfg.vision.patch_size,
        sorted(heads),
    )
    if image_size is not None and image_size != cfg.vision.image_size:
        med.set_image_size(image_size)  # asked for: logs both sizes at WARNING
    return med
