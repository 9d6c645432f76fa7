"""MED's attention kernels: transformers' eager BLIP attention, or PyTorch's fused
``scaled_dot_product_attention`` (SDPA), and image keys/values shared by all texts of an image.

transformers 5.24 offers only eager attention for BLIP (no ``_supports_sdpa`` on its BLIP
classes), so capfilt swaps the class of its attention modules for the subclasses below. They keep
every parameter and key name; ``"eager"`` with one text per image runs transformers' own forward
unchanged, which is what training and the golden tests use.

Shared image keys/values: a cross-attention call whose text batch has R times the rows of its
image batch (``encoder_hidden_states`` [B, 1+P, Dv] with text rows [B*R, L, Dt], the R texts of
image b adjacent) projects each image to keys and values once and folds the R texts' queries into
one sequence per image. Each query attends to the keys on its own, so the result is the per-pair
attention; the K/V projections (about 16 GFLOP per text at BLIP-base, 384 px) run once per image.
In generation, transformers' EncoderDecoderCache keeps those keys/values for every decoding step.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

__all__ = ["ATTENTION", "Attention", "TextAttention", "VisionAttention", "set_attention"]

Attention = Literal["eager", "sdpa"]
ATTENTION: tuple[Attention, ...] = ("eager", "sdpa")


def _attend(
    impl: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: nn.Dropout,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(d) + mask) v: q [B, H, Lq, d], k/v [B, H, Lk, d], mask additive and
    broadcastable to [B, H, Lq, Lk] -> ([B, H, Lq, d], probabilities or None with SDPA)."""
    if impl == "sdpa":
        p = dropout.p if dropout.training else 0.0
        mask = mask.to(q.dtype) if mask is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if mask is not None:
        scores = scores + mask.to(scores.device)
    probs = scores.softmax(dim=-1)
    return torch.matmul(dropout(probs), v), probs


class VisionAttention(BlipAttention):
    """BLIP's ViT self-attention with a choice of kernel (``attn_impl``)."""

    attn_impl: Attention = "eager"

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.attn_impl == "eager":
            return super().forward(hidden_states, **kwargs)
        bsz, n, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(bsz, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
        p = self.dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)  # [B, H, N, d]
        return self.projection(ctx.transpose(1, 2).reshape(bsz, n, dim)), None


class TextAttention(BlipTextSelfAttention):
    """BLIP's text self- or cross-attention with a choice of kernel (``attn_impl``), and image
    keys/values shared by the R adjacent texts of each image (see the module docstring)."""

    attn_impl: Attention = "eager"

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cross = encoder_hidden_states is not None
        shared = cross and encoder_hidden_states.shape[0] != hidden_states.shape[0]  # type: ignore[union-attr]
        if self.attn_impl == "eager" and not shared:
            return super().forward(
                hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache, **kwargs
            )
        rows, lq = hidden_states.shape[:2]
        heads, d = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).view(rows, lq, heads, d).transpose(1, 2)  # [rows, H, Lq, d]
        mask = encoder_attention_mask if cross else attention_mask
        k, v = self._keys_values(hidden_states, encoder_hidden_states, cache, kwargs)  # [Bk, H, Lk, d]
        images = k.shape[0]
        if rows % images:
            raise ValueError(f"{rows} text rows cannot share the keys of {images} images (rows = images x R)")
        r = rows // images
        if r > 1:  # fold: the R texts of image b become one query sequence [b, H, R*Lq, d]
            if mask is not None and mask.shape[0] not in (1, images):
                raise ValueError(
                    f"a shared cross-attention mask must have {images} rows, got {mask.shape[0]}"
                )
            q = q.reshape(images, r, heads, lq, d).transpose(1, 2).reshape(images, heads, r * lq, d)
        ctx, probs = _attend(self.attn_impl, q, k, v, mask, self.dropout)  # [Bk, H, R*Lq, d]
        if r > 1:  # unfold back to one row per text
            ctx = ctx.reshape(images, heads, r, lq, d).transpose(1, 2).reshape(rows, heads, lq, d)
            if probs is not None:
                lk = probs.shape[-1]
                probs = probs.reshape(images, heads, r, lq, lk).transpose(1, 2).reshape(rows, heads, lq, lk)
        return ctx.transpose(1, 2).reshape(rows, lq, heads * d), probs  # [rows, Lq, Dt]

    def _keys_values(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        cache: Cache | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, Lk, d], from the cache when its cross-attention part is filled
        (the same rules as transformers' BlipTextSelfAttention)."""
        cross = encoder_hidden_states is not None
        current = encoder_hidden_states if cross else hidden_states
        assert current is not None
        store: Any = cache
        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = bool(cache.is_updated.get(self.layer_idx))
            store = cache.cross_attention_cache if cross else cache.self_attention_cache
        if cross and store is not None and is_updated:
            return store.layers[self.layer_idx].keys, store.layers[self.layer_idx].values
        shape = (*current.shape[:-1], -1, self.attention_head_size)
        k = self.key(current).view(shape).transpose(1, 2)  # [B, H, Lk, d]
        v = self.value(current).view(shape).transpose(1, 2)
        if store is not None:
            k, v = store.update(k, v, self.layer_idx, kwargs=kwargs)
            if cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return k, v


def set_attention(module: nn.Module, impl: Attention = "eager") -> nn.Module:
    """Give every BLIP attention block in ``module`` capfilt's class and the kernel ``impl``
    (in place; parameters and state-dict keys are unchanged). Returns ``module``."""
    if impl not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {impl!r}")
    for m in module.modules():
        if isinstance(m, BlipAttention):
            m.__class__ = VisionAttention
        elif isinstance(m, BlipTextSelfAttention):
            m.__class__ = TextAttention
        if isinstance(m, VisionAttention | TextAttention):
            m.attn_impl = impl
    return module
