"""BLIP-style `.pth` checkpoints for tests: a Med's (or a transformers BLIP model's) weights under
BLIP's original names, written with a mapping of its own (timm's ViT names, from BLIP's
`visual_encoder`), so a test of the loader does not check the loader against itself."""

from __future__ import annotations

from typing import Any

#: transformers' BLIP vision names -> timm's, as BLIP's `visual_encoder` has them.
_TOP = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
_BLOCK = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def blip_names(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with transformers' (and Med's) vision names renamed to BLIP's originals
    (``vision_model.encoder.layers.3.self_attn.qkv.weight`` -> ``visual_encoder.blocks.3.attn.qkv.weight``);
    every other key unchanged. Tensors are cloned."""
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            rest = key.removeprefix("vision_model.")
            if rest in _TOP:
                rest = _TOP[rest]
            else:
                _, _, layer, tail = rest.split(".", 3)  # encoder.layers.<i>.<tail>
                part = next(p for p in _BLOCK if tail.startswith(p + "."))
                rest = f"blocks.{layer}.{_BLOCK[part]}{tail[len(part) :]}"
            key = f"visual_encoder.{rest}"
        out[key] = value.detach().clone()
    return out
