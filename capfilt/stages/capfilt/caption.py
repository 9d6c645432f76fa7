"""Synthetic captions: ``caption_batch`` and the seeded sampler that makes caption k of an image
independent of its batch, actor and run.

Caption k of an image is sampled with uniforms drawn from a generator seeded by
``blake2b(seed, uid, k)``, one per decoding step (``SeededSampler``), so its draws do not depend
on which batch, block, actor or run the image lands in. With another ``batch_size`` a caption
changes only where a draw lands within rounding of a token's CDF boundary (the draw walks the CDF
in token-id order, so near-ties in rank cannot swap tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from capfilt.core.errors import ConfigError
from capfilt.model.generation import Decoding
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.pixels import device_dtype, error_column, pixel_column, pixel_values

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med


def caption_seed(seed: int, uid: str, k: int) -> int:
    """The generator seed of caption ``k`` of image ``uid``: independent of batches and runs."""
    digest = hashlib.blake2b(f"{seed}\x1f{uid}\x1f{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def caption_uniforms(uids: Sequence[str], k: int, seed: int, steps: int) -> torch.Tensor:
    """One uniform per decoding step for each (image, caption): [len(uids) * k, steps], float64,
    rows of one image adjacent (the order generate returns them in)."""
    import torch

    rows = []
    for uid in uids:
        for j in range(k):
            gen = torch.Generator().manual_seed(caption_seed(seed, uid, j))
            rows.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(rows)


def _seeded_sampler_class() -> type:
    """SeededSampler, built on first use so that importing this module does not import transformers."""
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        """Top-k then nucleus (top-p) sampling, as transformers' warpers do, where row r's token at
        step t is picked by the inverse CDF at ``uniforms[r, t]``. It returns scores that are 0 at the picked token and
        -inf elsewhere, so generate's greedy argmax takes it; it must run last, after
        transformers' repetition-penalty and min-length processors."""

        def __init__(self, uniforms: torch.Tensor, start_len: int, top_p: float, top_k: int) -> None:
            self.uniforms = uniforms
            self.start_len = start_len
            self.top_p = top_p
            self.top_k = top_k

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            step = input_ids.shape[1] - self.start_len
            u = self.uniforms[:, step].to(scores.device).unsqueeze(-1)  # [R, 1]
            logits = scores.float()  # [R, V]
            # Candidates best first: the top k (topk sorts them), or the whole vocabulary.
            if 0 < self.top_k < logits.shape[-1]:
                cand_logits, cand_ids = torch.topk(logits, self.top_k, dim=-1)  # [R, C]
            else:
                cand_logits, cand_ids = torch.sort(logits, dim=-1, descending=True, stable=True)
            probs = cand_logits.softmax(dim=-1)  # [R, C]
            better = probs.cumsum(dim=-1) - probs  # mass ranked above each candidate
            probs = probs.masked_fill(better >= self.top_p, 0.0)  # nucleus: smallest prefix >= top_p
            # The draw walks the CDF in token-id order, not rank order: tiny float differences
            # (another batch size) can swap two ranks, but they cannot move a token's id.
            by_id = torch.argsort(cand_ids, dim=-1)  # [R, C]
            cdf = probs.gather(-1, by_id).double().cumsum(dim=-1)  # [R, C]
            # right=True: the first candidate whose CDF exceeds the draw, never a zero-mass one
            pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(
                max=cdf.shape[-1] - 1
            )  # [R, 1]
            token = cand_ids.gather(-1, by_id.gather(-1, pick))  # [R, 1]
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, token, 0.0)

    return SeededSampler


def decoding(cfg: CapFiltConfig) -> Decoding:
    """The captioner's decoding settings of a CapFilt config, one sequence per caption."""
    return Decoding(
        sample=cfg.sample,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        num_beams=cfg.num_beams,
        max_length=cfg.max_length,
        min_length=cfg.min_length,
        repetition_penalty=cfg.repetition_penalty,
        num_return_sequences=cfg.k,
    )


def _generate(
    captioner: Med, image_embeds: torch.Tensor, uids: Sequence[str], prompt: list[int], cfg: CapFiltConfig
) -> torch.Tensor:
    """Token ids [B * k, <= max_length], each row [DEC] + prompt + caption, rows of one image adjacent."""
    import torch
    from transformers import LogitsProcessorList

    device = image_embeds.device
    prompt_ids = torch.tensor(prompt, dtype=torch.long, device=device)
    dec = decoding(cfg)
    if not cfg.sample:
        return captioner.generate_from_embeds(image_embeds, prompt_ids if prompt else None, dec)
    t = captioner.config.text
    rows = image_embeds.shape[0] * cfg.k
    start = torch.full((rows, 1 + len(prompt)), t.dec_token_id, dtype=torch.long, device=device)
    start[:, 1:] = prompt_ids  # [B*k, 1+Lp]: [DEC] + prompt
    if start.shape[1] >= cfg.max_length:
        raise ConfigError(
            f"max_length {cfg.max_length} leaves no room after [DEC] + a {len(prompt)}-token prompt"
        )
    sampler = _seeded_sampler_class()(
        caption_uniforms(uids, cfg.k, cfg.seed, cfg.max_length), start.shape[1], cfg.top_p, cfg.top_k
    )
    return captioner.text_decoder.generate(
        input_ids=start,
        attention_mask=torch.ones_like(start),
        # [B, 1+P, Dv], not repeated k times: the k rows of an image share its cross-attention
        # keys/values (capfilt.model.attention), computed at the first step and cached for the rest
        encoder_hidden_states=image_embeds,
        generation_config=dec.generation_config(t, own_sampler=True),  # greedy takes the sampler's pick
        logits_processor=LogitsProcessorList([sampler]),
    )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


def caption_batch(
    captioner: Med, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Any], cfg: CapFiltConfig
) -> dict[str, Any]:
    """Add ``captions``: for each row a list of ``cfg.k`` synthetic captions (prompt stripped), or
    an empty list when its image did not decode. One generate call for the whole batch."""
    import torch

    uids = [str(u) for u in batch["uid"]]
    n = len(uids)
    ok = [i for i, err in enumerate(error_column(batch, n)) if err is None]
    captions = np.empty(n, dtype=object)
    for i in range(n):
        captions[i] = []
    if ok:
        captioner.eval()
        device, dtype = device_dtype(captioner)
        size = captioner.config.vision.image_size
        prompt = prompt_ids(tokenizer, cfg.prompt)
        with torch.inference_mode():
            pixels = pixel_values(np.asarray(batch[pixel_column(size)])[ok], device, dtype)  # [B, 3, S, S]
            embeds = captioner.encode_image(pixels)  # [B, 1+P, Dv]
            ids = _generate(captioner, embeds, [uids[i] for i in ok], prompt, cfg)  # [B*k, L]
        texts = tokenizer.batch_decode(ids[:, 1 + len(prompt) :].cpu(), skip_special_tokens=True)
        for j, i in enumerate(ok):
            captions[i] = [t.strip() for t in texts[j * cfg.k : (j + 1) * cfg.k]]
    return {**batch, "captions": captions}
