"""MED, BLIP's multimodal mixture of encoder-decoder, assembled from transformers' BLIP modules.

One ViT and one BERT-style text network serve three functions:

- unimodal text encoder (the tokenizer's first token, no cross-attention)  -> ITC
- image-grounded text encoder (``[ENC]`` first token, cross-attention)     -> ITM
- image-grounded text decoder (``[DEC]`` first token, causal self-attention) -> LM / captions

The decoder shares every parameter with the encoder except its self-attention blocks (query,
key, value, output dense and the LayerNorm after them), as in BLIP. Sharing is done by
assigning the encoder's modules into the decoder, so shared tensors are the same objects.

Shapes: B batch, P image patches, Dv vision width, L text length, Dt text width, E embed_dim,
V vocab size.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    BlipConfig,
    BlipTextConfig,
    BlipTextLMHeadModel,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from capfilt.model.attention import Attention, set_attention
from capfilt.model.config import MedConfig
from capfilt.model.generation import Decoding

__all__ = [
    "ALL_HEADS",
    "ITC_MODULES",
    "Med",
    "blip_config",
    "blip_text_config",
    "blip_vision_config",
    "resize_pos_embed",
]

logger = logging.getLogger(__name__)

# What a Med can be used for. A freshly built Med has all three; one loaded from a captioner-only
# or filter-only checkpoint has only the heads that checkpoint trained (see Med.heads).
ALL_HEADS = frozenset({"itc", "itm", "lm"})

# The submodules BLIP keeps momentum (EMA) copies of for ITC distillation.
ITC_MODULES = ("vision_model", "vision_proj", "text_encoder", "text_proj")

# The initialiser std is MedConfig.init_std (BLIP's 0.02 by default), set explicitly everywhere:
# transformers' BlipVisionConfig defaults to 1e-10 (it assumes weights are loaded), which would
# leave a from-scratch ViT at zero.


def blip_vision_config(cfg: MedConfig) -> BlipVisionConfig:
    """transformers' vision config for ``cfg``, every value that differs from BLIP set explicitly."""
    v = cfg.vision
    return BlipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.mlp_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="gelu",
        layer_norm_eps=v.layer_norm_eps,
        attention_dropout=v.attention_dropout,
        initializer_range=cfg.init_std,
    )


def blip_text_config(cfg: MedConfig) -> BlipTextConfig:
    """transformers' text config for ``cfg``. ``is_decoder=True`` is what gives every layer its
    cross-attention block; whether a pass is causal is chosen per call."""
    t = cfg.text
    # capfilt_enc_token_id is not a transformers field: carried so an exported model remembers
    # which id is [ENC] (transformers keeps unknown config keys through save/load).
    extra: dict[str, Any] = {"capfilt_enc_token_id": t.enc_token_id}
    return BlipTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        encoder_hidden_size=cfg.vision.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act="gelu",
        layer_norm_eps=t.layer_norm_eps,
        hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.attention_dropout,
        initializer_range=cfg.init_std,
        bos_token_id=t.dec_token_id,
        eos_token_id=t.sep_token_id,
        pad_token_id=t.pad_token_id,
        sep_token_id=t.sep_token_id,
        is_decoder=True,
        use_cache=True,
        tie_word_embeddings=True,
        label_smoothing=cfg.label_smoothing,
        **extra,
    )


def blip_config(cfg: MedConfig) -> BlipConfig:
    """The composite transformers config used when exporting captioner / filter directories."""
    return BlipConfig(
        text_config=blip_text_config(cfg).to_dict(),
        vision_config=blip_vision_config(cfg).to_dict(),
        image_text_hidden_size=cfg.embed_dim,
        label_smoothing=cfg.label_smoothing,
        initializer_range=cfg.init_std,
    )


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position table ``[1, 1+N, D]`` to ``[1, 1+num_patches, D]`` (bicubic on the grid),
    as BLIP does when a 224 px checkpoint is fine-tuned at 384 px. The [CLS] row is kept as is."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"position embedding must be [1, 1+N, D], got {list(pos_embed.shape)}")
    old_n = pos_embed.shape[1] - 1
    old_grid, new_grid = round(old_n**0.5), round(num_patches**0.5)
    if old_grid * old_grid != old_n or new_grid * new_grid != num_patches:
        raise ValueError(
            f"cannot resize a {old_n}-patch position table to {num_patches}: grids must be square"
        )
    if old_n == num_patches:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
    grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, num_patches, dim)  # [1, N', D]
    return torch.cat([cls_pos, grid_pos.to(pos_embed.dtype)], dim=1)


class Med(nn.Module):
    """BLIP's MED. Build with ``capfilt.model.create_med(name)``; load published weights with
    ``capfilt.model.checkpoint``.

    There is no ``forward``: the objectives call the functions below and wrap them in their own
    module (which is what DDP should wrap).
    """

    def __init__(self, config: MedConfig) -> None:
        super().__init__()
        self.config = config
        text_cfg = blip_text_config(config)
        self.vision_model = BlipVisionModel(blip_vision_config(config))
        self.text_encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_cfg)
        self._share_decoder_with_encoder()
        set_attention(self, "eager")  # capfilt's attention classes: SDPA and shared image keys on demand

        self.vision_proj = nn.Linear(config.vision.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        # The functions this instance's weights were trained for; loaders narrow it.
        self.heads: frozenset[str] = ALL_HEADS

    def _share_decoder_with_encoder(self) -> None:
        enc, dec = self.text_encoder, self.text_decoder.bert
        dec.embeddings = enc.embeddings
        for enc_layer, dec_layer in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
            # `attention` (self-attention + its output dense/LayerNorm) stays the decoder's own.
            dec_layer.crossattention = enc_layer.crossattention
            dec_layer.intermediate = enc_layer.intermediate
            dec_layer.output = enc_layer.output
        # The LM head's output matrix is the word embedding (BERT tying), now the shared one.
        self.text_decoder.cls.predictions.decoder.weight = enc.embeddings.word_embeddings.weight

    def set_attention(self, impl: Attention) -> None:
        """The attention kernel of every block: ``"eager"`` (transformers' BLIP code, the default)
        or ``"sdpa"`` (PyTorch's fused attention; attention maps are then not returned)."""
        set_attention(self, impl)

    # ----------------------------------------------------------------------------- capabilities

    def require(self, *heads: str) -> None:
        """Fail fast when a function is used whose weights this Med was never given."""
        missing = sorted(set(heads) - self.heads)
        if missing:
            source = (
                "a captioner (BlipForConditionalGeneration, or a .pth with text_decoder.*)"
                if missing == ["lm"]
                else "a filter (BlipForImageTextRetrieval, or a .pth with text_encoder.*, vision_proj.*, "
                "text_proj.* and itm_head.*)"
            )
            raise RuntimeError(
                f"this Med has no trained {', '.join(h.upper() for h in missing)} weights "
                f"(it has: {sorted(self.heads)}); load {source} to use it"
            )

    # ----------------------------------------------------------------------------------- image

    def encode_image(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """[B, 3, H, W] -> image_embeds [B, 1+P, Dv] (last layer, post-LayerNorm; row 0 is [CLS])."""
        out = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return out.last_hidden_state

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds [B, 1+P, Dv] -> L2-normalised ITC feature [B, E]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    # ------------------------------------------------------------------------------------ ITC

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unimodal text encoder: [B, L] (first token as tokenized, [CLS]) -> [B, L, Dt]."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] -> L2-normalised ITC feature [B, E] from the first token."""
        hidden = self.encode_text(input_ids, attention_mask)  # [B, L, Dt]
        return F.normalize(self.text_proj(hidden[:, 0, :]), dim=-1)

    def itc_sim(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cosine similarity of every image with every text: [B_img, B_txt], in [-1, 1], no temperature
        (what transformers' BlipForImageTextRetrieval returns with ``use_itm_head=False``)."""
        self.require("itc")
        return self.image_feat(image_embeds) @ self.text_feat(input_ids, attention_mask).t()

    def itc_logits(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """Contrastive logits ``image_feat @ text_feat.T / temp``: [B_img, E] x [N_txt, E] -> [B_img, N_txt].
        Call ``clamp_temp`` after each optimiser step, as BLIP does."""
        return image_feat @ text_feat.t() / self.temp

    def itc_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the ITC towers (ITC_MODULES), in a fixed order: what BLIP's momentum
        encoder averages. Zip a model's list with its momentum copy's for the EMA update."""
        return [
            (f"{name}.{pname}", p)
            for name in ITC_MODULES
            for pname, p in getattr(self, name).named_parameters()
        ]

    @torch.no_grad()
    def clamp_temp(self, low: float = 0.001, high: float = 0.5) -> None:
        self.temp.clamp_(low, high)

    # ------------------------------------------------------------------------------------ ITM

    def encode_multimodal(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image-grounded text encoder: the first token is replaced by [ENC]; [B*R, L] x [B, 1+P, Dv] -> [B*R, L, Dt].

        Texts ``b*R .. b*R+R-1`` are paired with image b (R = 1: text i with image i); the image's
        cross-attention keys and values are computed once for its R texts."""
        if image_embeds.shape[0] == 0 or input_ids.shape[0] % image_embeds.shape[0]:
            raise ValueError(
                f"ITM pairs each image with R adjacent texts: got {image_embeds.shape[0]} images, "
                f"{input_ids.shape[0]} texts"
            )
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.config.text.enc_token_id
        out = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
        )
        return out.last_hidden_state

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ITM logits [B*R, 2] (column 1 = match) for the pairs (image b, text b*R + j); R = 1 pairs image i with text i."""
        self.require("itm")
        hidden = self.encode_multimodal(image_embeds, input_ids, attention_mask)  # [B, L, Dt]
        return self.itm_head(hidden[:, 0, :])

    def itm_prob(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(match) = softmax(ITM logits)[:, 1], shape [B]. CapFilt's filter keeps a text when it is >= 0.5."""
        # float32 softmax: a bf16 probability has 3 significant digits, too coarse near the threshold
        return self.itm_logits(image_embeds, input_ids, attention_mask).float().softmax(dim=-1)[:, 1]

    # ------------------------------------------------------------------------------------- LM

    def lm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder logits [B, L, V]; position t predicts token t+1. The first token is replaced by [DEC]."""
        self.require("lm")
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.config.text.dec_token_id
        out = self.text_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            use_cache=False,
        )
        return out.logits

    def lm_loss(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: Literal["mean", "none"] = "mean",
        label_smoothing: float | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy with label smoothing (config default 0.1).

        ``labels`` [B, L] are aligned with ``input_ids`` (not shifted); -100 is ignored. By default
        they are ``input_ids`` with padding set to -100; mask a prompt by setting its positions to
        -100. ``reduction="mean"`` averages over every target token of the batch (BLIP's
        pretraining loss); ``"none"`` gives each sample's mean over its own targets, [B].
        """
        if labels is None:
            labels = input_ids.masked_fill(input_ids == self.config.text.pad_token_id, -100)
        logits = self.lm_logits(image_embeds, input_ids, attention_mask)  # [B, L, V]
        logits, targets = logits[:, :-1, :], labels[:, 1:]  # [B, L-1, V], [B, L-1]
        smoothing = self.config.label_smoothing if label_smoothing is None else label_smoothing
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=-100,
            label_smoothing=smoothing,
            reduction="none",
        ).view(targets.shape)  # [B, L-1]
        valid = (targets != -100).to(token_loss.dtype)
        if reduction == "mean":
            return token_loss.sum() / valid.sum().clamp(min=1)
        if reduction == "none":
            return token_loss.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        decoding: Decoding | None = None,
        *,
        interpolate_pos_encoding: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Captions for a batch of images; see ``generate_from_embeds``."""
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
        return self.generate_from_embeds(image_embeds, prompt_ids, decoding, **options)

    @torch.no_grad()
    def generate_from_embeds(
        self,
        image_embeds: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        decoding: Decoding | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Decode captions with transformers' GenerationMixin; returns token ids
        [B * num_return_sequences, <= max_length], rows of one image adjacent.

        ``decoding`` (BLIP's defaults when None) with ``options`` (its fields, e.g. ``sample=False,
        num_beams=3``) replacing some of them: see ``capfilt.model.generation.Decoding``. Each row
        starts with [DEC] then the prompt (``prompt_ids``: [Lp] or [B, Lp], tokens of the prompt
        with no special tokens), so the caption proper starts at ``1 + Lp``; rows that ended early
        are padded with pad_token_id after [SEP]. ``max_length``/``min_length`` count the [DEC] and
        prompt tokens too, as in BLIP.
        """
        self.require("lm")
        dec = replace(decoding or Decoding(), **options)
        t = self.config.text
        batch = image_embeds.shape[0]
        start = torch.full((batch, 1), t.dec_token_id, dtype=torch.long, device=image_embeds.device)
        if prompt_ids is not None:
            prompt_ids = prompt_ids.to(image_embeds.device, torch.long)
            if prompt_ids.dim() == 1:
                prompt_ids = prompt_ids.unsqueeze(0).expand(batch, -1)  # [B, Lp]
            start = torch.cat([start, prompt_ids], dim=1)  # [B, 1+Lp]
        if start.shape[1] >= dec.max_length:
            raise ValueError(
                f"max_length {dec.max_length} leaves no room after [DEC] + a {start.shape[1] - 1}-token prompt"
            )
        return self.text_decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=image_embeds,
            generation_config=dec.generation_config(t),
        )

    # ------------------------------------------------------------------------------- training

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute every ViT and text layer in the backward pass (memory for compute).

        transformers refuses ``gradient_checkpointing_enable`` on BlipTextModel, but its layers
        are GradientCheckpointingLayer, whose documented switch is set here directly.
        """
        func = functools.partial(checkpoint, use_reentrant=False)
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = enable
                setattr(module, "_gradient_checkpointing_func", func)  # noqa: B010 (not a declared attribute)

    def set_image_size(self, image_size: int) -> None:
        """Change the input resolution (e.g. 224 -> 384 for fine-tuning), resizing the position table."""
        old_size = self.config.vision.image_size
        vision = self.config.vision.model_dump() | {"image_size": image_size}
        config = MedConfig.model_validate(self.config.model_dump() | {"vision": vision})
        emb = self.vision_model.embeddings
        new_pos = resize_pos_embed(emb.position_embedding.data, config.vision.num_patches)
        emb.position_embedding = nn.Parameter(new_pos)
        emb.image_size = image_size
        emb.num_patches = config.vision.num_patches
        emb.num_positions = config.vision.num_patches + 1
        self.vision_model.config.image_size = image_size
        self.config = config
        # A WARNING: the weights were trained at the other size, which callers should know.
        logger.warning(
            "image size changed from %d px to %d px: position embeddings resized (%d -> %d patches)",
            old_size,
            image_size,
            (old_size // config.vision.patch_size) ** 2,
            config.vision.num_patches,
        )
