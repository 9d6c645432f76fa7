"""CapFilt's Ray Data actors: each loads its model from a path once, in ``__init__``, then only
calls the batch functions on the chunks it gets (the filter, given a run folder, also hands its
candidate rows to ``writer.write_parts`` and returns the receipts)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from capfilt.stages.capfilt.caption import caption_batch
from capfilt.stages.capfilt.chunks import candidates_of_chunks, embeddings_of_chunks, map_chunks
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.embed import embed_batch
from capfilt.stages.capfilt.models import ModelRef, load_model
from capfilt.stages.capfilt.score import score_and_embed_batch
from capfilt.stages.capfilt.writer import write_parts

log = logging.getLogger(__name__)


def _set_threads(cfg: CapFiltConfig) -> None:
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)


class CaptionerActor:
    """Loads the captioner from a path (never an object-store reference) and captions chunks."""

    def __init__(self, ref: ModelRef, cfg: CapFiltConfig) -> None:
        from capfilt.model.tokenizer import load_tokenizer

        t0 = time.time()
        _set_threads(cfg)
        self.cfg = cfg
        self.model = load_model(ref, "captioner", cfg)
        self.tokenizer = load_tokenizer(ref.tokenizer)
        log.info("captioner %s ready in %.1f s", ref.model_id, time.time() - t0)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        return map_chunks(batch, lambda images: caption_batch(self.model, self.tokenizer, images, self.cfg))


class FilterActor:
    """Loads the filter from a path and turns chunks of images into scored candidate rows (each
    web row with its image's embedding); with ``out``, writes them to part files there and
    returns their receipts."""

    def __init__(self, ref: ModelRef, cfg: CapFiltConfig, out: str | None = None) -> None:
        from capfilt.model.tokenizer import load_tokenizer

        t0 = time.time()
        _set_threads(cfg)
        self.cfg = cfg
        self.out = out
        self.model = load_model(ref, "filter", cfg)
        self.tokenizer = load_tokenizer(ref.tokenizer)
        log.info("filter %s ready in %.1f s", ref.model_id, time.time() - t0)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        candidates = candidates_of_chunks(
            batch, lambda images: score_and_embed_batch(self.model, self.tokenizer, images, self.cfg)
        )
        return candidates if self.out is None else write_parts(candidates, self.out)


class ImageEmbedActor:
    """Loads the filter from a path and embeds chunks of images with its ViT and ``vision_proj``
    alone (dedup before captioning): uid, input shard, row and embedding of each image."""

    def __init__(self, ref: ModelRef, cfg: CapFiltConfig) -> None:
        t0 = time.time()
        _set_threads(cfg)
        self.model = load_model(ref, "filter", cfg)
        log.info("image embedder %s ready in %.1f s", ref.model_id, time.time() - t0)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return embeddings_of_chunks(batch, lambda images: embed_batch(self.model, images))
