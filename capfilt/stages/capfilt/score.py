"""Scoring and deciding: one candidate row per (image, text), scored with the filter's ITM head
(``[ENC]`` first, as BLIP's filter was trained) and ITC cosine, kept at p(match) >= threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from capfilt.core import schema as S
from capfilt.core.text import pre_caption
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.decisions import DROP, KEEP, REASON_EMPTY, REASON_NO_FILTER, decide
from capfilt.stages.capfilt.embed import with_embeddings
from capfilt.stages.capfilt.pixels import device_dtype, error_column, pixel_column, pixel_values, str_or_none
from capfilt.stages.capfilt.select import select_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med

__all__ = ["CANDIDATE_FIELDS", "decide", "score_and_embed_batch", "score_batch", "unscored_batch"]


_CANDIDATE_COLUMNS = (
    "uid",
    "text_uid",
    "text",
    "text_source",
    "text_index",
    "itm_score",
    "itc_score",
    "rank",
    "decision",
    "reason",
)
# What score_batch returns: the CANDIDATE columns a batch decides, plus where each row came from.
CANDIDATE_FIELDS = [S.CANDIDATE.field(c) for c in _CANDIDATE_COLUMNS] + [
    pa.field("row", pa.int64()),
    pa.field("input_shard", pa.string()),
]


def _assemble(
    batch: dict[str, Any], cfg: CapFiltConfig
) -> tuple[dict[str, list[Any]], list[tuple[int, str, int]]]:
    """The candidate rows of a batch (web text, then each synthetic caption, per image) with their
    decision when no score is needed, and the (image, cleaned text, candidate) triples to score."""
    n = len(batch["uid"])
    errors = error_column(batch, n)
    captions = batch["captions"] if "captions" in batch else [[]] * n
    cols: dict[str, list[Any]] = {c: [] for c in _CANDIDATE_COLUMNS}
    carry = [c for c in ("row", "input_shard") if c in batch]
    for c in carry:
        cols[c] = []
    to_score: list[tuple[int, str, int]] = []
    for i in range(n):
        uid = str(batch["uid"][i])
        web = str_or_none(batch["text"][i])
        texts = [(web, "web", 0)] + [(c, "synthetic", j) for j, c in enumerate(captions[i])]
        for text, source, index in texts:
            r = len(cols["uid"])
            cleaned = pre_caption(text, cfg.max_words)
            cols["uid"].append(uid)
            cols["text_uid"].append(S.make_text_uid(uid, source, index, text or ""))
            cols["text"].append(text)
            cols["text_source"].append(source)
            cols["text_index"].append(index)
            cols["itm_score"].append(None)
            cols["itc_score"].append(None)
            cols["rank"].append(None)
            for c in carry:
                cols[c].append(batch[c][i])
            if errors[i] is not None:
                decision, reason = DROP, str(errors[i])
            elif not cleaned:
                decision, reason = DROP, REASON_EMPTY
            else:
                decision, reason = KEEP, REASON_NO_FILTER
                to_score.append((i, cleaned, r))
            cols["decision"].append(decision)
            cols["reason"].append(reason)
    return cols, to_score


def _as_table(cols: dict[str, list[Any]]) -> pa.Table:
    """Candidate rows as Arrow with exact types (nulls stay nulls, which numpy object columns
    do not guarantee through Ray's conversions)."""
    fields = [f for f in CANDIDATE_FIELDS if f.name in cols]
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def unscored_batch(batch: dict[str, Any], cfg: CapFiltConfig) -> pa.Table:
    """Candidate rows without a filter (caption-only): every non-empty text of a decodable image is
    kept, unscored."""
    cols, _ = _assemble(batch, cfg)
    return _as_table(cols)


def _layout(to_score: list[tuple[int, str, int]]) -> tuple[list[int], list[int], list[int]]:
    """Pairs laid out R per image for the shared image keys: (the images, in order; the pair in
    each of the B*R slots; the slot of each pair). R is the most pairs any image has; an image
    with fewer repeats its first pair in its spare slots."""
    images = sorted({i for i, _, _ in to_score})
    pairs_of: dict[int, list[int]] = {i: [] for i in images}
    for p, (i, _, _) in enumerate(to_score):
        pairs_of[i].append(p)
    r = max(len(ps) for ps in pairs_of.values())
    slots: list[int] = []
    slot_of = [0] * len(to_score)
    for b, i in enumerate(images):
        ps = pairs_of[i]
        for j in range(r):
            if j < len(ps):
                slot_of[ps[j]] = b * r + j
            slots.append(ps[j] if j < len(ps) else ps[0])
    return images, slots, slot_of


def score_batch(
    filter: Med, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Any], cfg: CapFiltConfig
) -> pa.Table:
    """One row per (image, text): the web text, then each synthetic caption in ``captions`` if the
    batch has them. ``itm_score`` is the ITM p(match) with ``[ENC]`` first, ``itc_score`` the ITC
    cosine; null where a text was not scored (empty text, undecodable image). Returns an Arrow
    table: the CANDIDATE columns a batch decides, plus ``row`` when given.

    Each image is encoded once for all of its texts: one ViT pass, and one set of cross-attention
    keys/values in the image-grounded encoder for all its texts (``_layout``); all pairs of the
    batch go through that encoder in one call."""
    return _as_table(_score(filter, tokenizer, batch, cfg)[0])


def score_and_embed_batch(
    filter: Med, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Any], cfg: CapFiltConfig
) -> pa.Table:
    """``score_batch``'s rows, each web row carrying its image's L2-normalised ITC feature
    (``embed.EMBEDDING_COLUMN``, float16): the filter actor's output. The feature is the one
    the ITC scores were computed with, so it costs no model work."""
    cols, feats = _score(filter, tokenizer, batch, cfg)
    return with_embeddings(_as_table(cols), feats)


def _score(
    filter: Med, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Any], cfg: CapFiltConfig
) -> tuple[dict[str, list[Any]], dict[str, np.ndarray]]:
    """The candidate columns of a batch, scored and decided, and the ITC image feature of each
    scored image by uid."""
    import torch

    from capfilt.model.tokenizer import tokenize

    cols, to_score = _assemble(batch, cfg)
    feats: dict[str, np.ndarray] = {}
    if to_score:
        filter.eval()
        device, dtype = device_dtype(filter)
        size = filter.config.vision.image_size
        images, slots, slot_of = _layout(to_score)
        image_of = {i: b for b, i in enumerate(images)}
        max_len = min(cfg.max_text_tokens, filter.config.text.max_position_embeddings)
        tokens = tokenize(tokenizer, [text for _, text, _ in to_score], max_len)
        with torch.inference_mode():
            pixels = pixel_values(
                np.asarray(batch[pixel_column(size)])[images], device, dtype
            )  # [B, 3, S, S]
            embeds = filter.encode_image(pixels)  # [B, 1+P, Dv], once per image
            ids = tokens["input_ids"].to(device)  # [N, L], one row per pair
            mask = tokens["attention_mask"].to(device)  # [N, L]
            at = torch.tensor(slots, device=device)  # [B*R] the pair in each slot
            itm_slots = filter.itm_prob(embeds, ids.index_select(0, at), mask.index_select(0, at))  # [B*R]
            itm = itm_slots.index_select(0, torch.tensor(slot_of, device=device))  # [N]
            which = torch.tensor(
                [image_of[i] for i, _, _ in to_score], device=device
            )  # [N] image of each pair
            per_image = filter.image_feat(embeds).float()  # [B, E], L2-normalised
            image_feat = per_image.index_select(0, which)  # [N, E]
            itc = (image_feat * filter.text_feat(ids, mask).float()).sum(dim=-1)  # [N], summed in float32
        for (_, _, r), p, c in zip(
            to_score, itm.float().cpu().tolist(), itc.float().cpu().tolist(), strict=True
        ):
            cols["itm_score"][r], cols["itc_score"][r] = p, c
        feats = {str(batch["uid"][i]): v for i, v in zip(images, per_image.cpu().numpy(), strict=True)}
        # Every text of an image is in this batch: the selection policy sees them all.
        cols["decision"], cols["reason"], cols["rank"] = select_rows(
            cols["uid"],
            cols["text_source"],
            cols["text_index"],
            cols["itm_score"],
            cols["decision"],
            cols["reason"],
            policy=cfg.select,
            n=cfg.top_n,
            threshold=cfg.threshold,
            thresholds=cfg.thresholds,
        )
    return cols, feats
