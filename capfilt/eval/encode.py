"""Batched ITC features of images and texts for evaluation (torch is imported on first use)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med

__all__ = ["chunks", "encode_images", "encode_texts", "torch_device"]


def torch_device(name: str | None) -> torch.device:
    """The named device, else "cuda" when available, else "cpu"."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``size`` items, in order."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def encode_images(
    med: Med, images: Sequence[Image.Image], batch_size: int = 64, device: str | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Images -> (image_embeds [N, 1+P, Dv] on the model's device, L2-normalised ITC features [N, E])."""
    import torch

    from capfilt.model.transforms import test_transform

    transform = test_transform(med.config.vision.image_size)
    dev = torch_device(device)
    embeds, feats = [], []
    with torch.inference_mode():
        for sl in tqdm(
            list(chunks(len(images), batch_size)), desc="encode images", leave=False, disable=None
        ):
            pixels = torch.stack([transform(im) for im in images[sl]]).to(dev)  # [b, 3, H, W]
            emb = med.encode_image(pixels)  # [b, 1+P, Dv]
            embeds.append(emb)
            feats.append(med.image_feat(emb).float().cpu())  # [b, E]
    return torch.cat(embeds), torch.cat(feats).numpy()


def encode_texts(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 35,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Texts (already cleaned) -> (input_ids [N, L], attention_mask [N, L], ITC features [N, E]).

    The ids are padded to the longest text of the whole set, so rows can be gathered freely for ITM.
    """
    import torch

    from capfilt.model.tokenizer import tokenize

    dev = torch_device(device)
    tokens = tokenize(tokenizer, list(texts), max_length)
    ids, mask = tokens["input_ids"].to(dev), tokens["attention_mask"].to(dev)  # [N, L]
    feats = []
    with torch.inference_mode():
        for sl in tqdm(list(chunks(len(texts), batch_size)), desc="encode texts", leave=False, disable=None):
            length = int(mask[sl].sum(dim=1).max())  # drop padding columns this batch does not need
            feats.append(med.text_feat(ids[sl, :length], mask[sl, :length]).float().cpu())  # [b, E]
    return ids, mask, torch.cat(feats).numpy()
