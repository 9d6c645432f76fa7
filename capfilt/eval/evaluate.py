"""One model on one test split (retrieval and captioning together) and the results' strict JSON.

Rates and shares (precision, recall, ROC-AUC, noise ratio, checker correctness) are fractions in
[0, 1]; recalls, BLEU and CIDEr are percentages. Every result is a JSON-ready dict.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capfilt.eval.captioning import evaluate_captioning
from capfilt.eval.config import EvalConfig
from capfilt.eval.encode import encode_images, encode_texts, torch_device
from capfilt.eval.retrieval import evaluate_retrieval
from capfilt.eval.split import EvalSplit

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med
    from capfilt.world import World

__all__ = ["evaluate_model", "write_results"]

log = logging.getLogger(__name__)


def evaluate_model(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    split: EvalSplit,
    config: EvalConfig | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Retrieval and captioning of one model on one test split: ``{"retrieval": {...},
    "captioning": {...}, "wall_s": ...}``. Pass the shapes world to get the checker's rate."""
    cfg = config or EvalConfig()
    heads = (["itc", "itm"] if cfg.retrieval else []) + (["lm"] if cfg.captioning else [])
    med.require(*heads)  # before any work
    dev = torch_device(cfg.device)
    med.eval().to(dev)
    t0 = time.perf_counter()
    images = split.images()
    result: dict[str, Any] = {"n_images": len(split)}
    if cfg.retrieval:
        t = time.perf_counter()
        image_embeds, image_feats = encode_images(med, images, cfg.batch_size, str(dev))
        ids, mask, text_feats = encode_texts(
            med, tokenizer, split.texts(cfg.max_words), cfg.max_text_length, cfg.batch_size, str(dev)
        )
        result["retrieval"] = evaluate_retrieval(
            med, image_embeds, image_feats, ids, mask, text_feats, split.txt2img(), cfg.k, cfg.itm_batch_size
        )
        result["retrieval"]["wall_s"] = time.perf_counter() - t
        del image_embeds
        log.info(
            "retrieval: R@1 t2i %.1f, i2t %.1f (%d images, %d texts, k=%d)",
            result["retrieval"]["r1_t2i"],
            result["retrieval"]["r1_i2t"],
            len(image_feats),
            len(text_feats),
            result["retrieval"]["k"],
        )
    if cfg.captioning:
        t = time.perf_counter()
        result["captioning"] = evaluate_captioning(med, tokenizer, split, images, cfg, world)
        result["captioning"]["wall_s"] = time.perf_counter() - t
        log.info(
            "captioning: BLEU-4 %.1f, CIDEr %.1f, checker %s",
            result["captioning"]["bleu4"],
            result["captioning"]["cider"],
            result["captioning"].get("checker_correct", "n/a"),
        )
    result["wall_s"] = time.perf_counter() - t0
    return result


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, paths as strings, NaN/inf as None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(path: Any, results: Mapping[str, Any]) -> Any:
    """Write results as strict JSON (no NaN), atomically, to a local path or a URI; returns its
    Location (``capfilt.core.fs``)."""
    from capfilt.core.fs import location
    from capfilt.core.shards import write_json_atomic

    out = location(path)
    clean = _jsonable(results)
    json.dumps(clean, allow_nan=False)  # fail here, naming nothing half-written, if anything slipped through
    write_json_atomic(out, clean)
    return out
