"""Batch size and actor counts of a GPU CapFilt run, chosen from the GPU's free memory when the
recipe leaves them unset (``auto_batch``, a pure function of the configs and a byte count).

The estimate per model is its weights plus, per image of a batch, the largest of: the ViT's live
activations in one block, the captioner's decoding state (cached cross-attention keys/values of
the image, self-attention cache and float32 logits of its k rows), and the filter's
image-grounded pass over the image's 1 + k texts. A margin covers the allocator and CUDA's own
buffers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from capfilt.core.errors import ConfigError
from capfilt.stages.capfilt.config import CapFiltConfig

if TYPE_CHECKING:
    from capfilt.model.config import MedConfig
    from capfilt.stages.capfilt.models import ModelRef

__all__ = [
    "MAX_ACTORS_PER_GPU",
    "MAX_AUTO_BATCH",
    "Sizing",
    "activation_bytes",
    "auto_batch",
    "gpu_free_bytes",
    "size_for_cluster",
    "param_count",
    "sized",
]

log = logging.getLogger(__name__)

# Beyond 128 images a call, a ViT-B batch gains little throughput on an H100-class GPU and a
# chunk (the unit of work and of retry) grows long.
MAX_AUTO_BATCH = 128
# Two (captioner, filter) pairs per GPU overlap one pair's host-side work (tokenising, decoding
# text, Arrow) with the other's kernels; more only divide the same GPU.
MAX_ACTORS_PER_GPU = 2
USABLE = 0.85  # of the free bytes: CUDA context, allocator fragmentation, compile workspaces
MARGIN = 1.5  # on the activation estimate: temporaries the count below leaves out


@dataclass(frozen=True)
class Sizing:
    batch_size: int
    captioner_actors: int
    filter_actors: int
    per_gpu_bytes: int  # the estimate at this size, for the log line


def param_count(m: MedConfig) -> int:
    """Parameters of a MED (ViT + text encoder with cross-attention + the decoder's own
    self-attention + heads), counted from its config, tied LM head once."""
    v, t = m.vision, m.text
    dv, dt = v.hidden_size, t.hidden_size
    vit_block = 4 * dv * dv + 2 * dv * v.mlp_size + 9 * dv + v.mlp_size  # qkv, proj, fc1, fc2, 2 LNs
    vit = 3 * v.patch_size**2 * dv + dv + (v.num_patches + 1) * dv + v.num_layers * vit_block + 2 * dv
    self_attn = 4 * dt * dt + 6 * dt  # q, k, v, out dense (+ biases) and its LayerNorm
    cross = 2 * dt * dt + 2 * dv * dt + 6 * dt
    ffn = 2 * dt * t.intermediate_size + t.intermediate_size + 3 * dt
    text = (t.vocab_size + t.max_position_embeddings) * dt + 2 * dt
    text += t.num_layers * (2 * self_attn + cross + ffn)  # encoder's and decoder's self-attention
    heads = (
        dt * dt + 3 * dt + t.vocab_size + 2 * (dv + dt) * m.embed_dim + 2 * dt
    )  # LM transform, bias; proj; ITM
    return vit + text + heads


def activation_bytes(m: MedConfig, role: str, cfg: CapFiltConfig, elem: int) -> int:
    """Peak bytes one image adds to a batch of ``role`` ("captioner" or "filter")."""
    v, t = m.vision, m.text
    n = v.num_patches + 1
    attn = 0 if cfg.attention == "sdpa" else 2 * v.num_heads * n * n  # eager keeps scores and probs
    vit = n * (5 * v.hidden_size + 2 * v.mlp_size) + attn  # residual, qkv, context; fc1 + GELU
    embeds = n * v.hidden_size
    if role == "captioner":
        rows = cfg.k * max(cfg.num_beams, 1)
        cross_kv = 2 * t.num_layers * n * t.hidden_size  # once per image (shared by its rows)
        if cfg.num_beams > 1:
            cross_kv *= cfg.num_beams  # beam search expands the image per beam
        self_kv = 2 * t.num_layers * cfg.max_length * t.hidden_size * rows
        logits = 3 * t.vocab_size * rows * 4 // elem  # float32 scores and the processors' copies
        work = cross_kv + self_kv + logits
    else:
        texts = 1 + cfg.k
        hidden = 8 * texts * cfg.max_text_tokens * t.hidden_size
        scores = 2 * t.num_heads * texts * cfg.max_text_tokens * n
        work = 2 * n * t.hidden_size + hidden + scores  # one layer's image keys/values at a time
    return int((embeds + max(vit, work)) * elem * MARGIN)


def _elem(dtype: str) -> int:
    return 4 if dtype == "float32" else 2  # "auto" is half precision on a GPU


def auto_batch(
    cfg: CapFiltConfig,
    captioner: MedConfig | None,
    filter: MedConfig | None,
    free_bytes: int,
    gpus: int,
) -> Sizing:
    """Batch size and actor counts for ``gpus`` GPUs with ``free_bytes`` free on each (the least of
    them). Values the recipe set (``cfg.model_fields_set``) are kept; the batch is the largest
    power of two, at most MAX_AUTO_BATCH, at which one (captioner, filter) pair fits; then as many
    pairs per GPU as fit, at most MAX_ACTORS_PER_GPU. Raises ConfigError when one image does not fit."""
    if gpus < 1:
        raise ValueError(f"auto_batch sizes GPU runs; got {gpus} GPUs")
    elem = _elem(cfg.dtype)
    roles = [(m, r) for m, r in ((captioner, "captioner"), (filter, "filter")) if m is not None]
    if not roles:
        raise ValueError("auto_batch needs a captioner or a filter config")
    weights = sum(param_count(m) * elem for m, _ in roles)
    per_image = sum(activation_bytes(m, r, cfg, elem) for m, r in roles)
    usable = int(free_bytes * USABLE)
    given = cfg.model_fields_set
    if "batch_size" in given:
        batch = cfg.batch_size
    else:
        batch = MAX_AUTO_BATCH
        while batch > 1 and weights + batch * per_image > usable:
            batch //= 2
    pair = weights + batch * per_image
    if pair > usable:
        raise ConfigError(
            f"a batch of {batch} needs about {pair / 2**30:.1f} GiB per GPU ({weights / 2**30:.2f} GiB of "
            f"weights, {per_image / 2**20:.0f} MiB per image) but {free_bytes / 2**30:.1f} GiB are free; "
            "lower capfilt.batch_size or use a GPU with more memory"
        )
    per_gpu = max(1, min(MAX_ACTORS_PER_GPU, usable // pair))
    actors = per_gpu * gpus
    sizing = Sizing(
        batch_size=batch,
        captioner_actors=cfg.captioner_actors if "captioner_actors" in given else actors,
        filter_actors=cfg.filter_actors if "filter_actors" in given else actors,
        per_gpu_bytes=int(per_gpu * pair),
    )
    log.info(
        "capfilt sized from GPU memory (%.1f GiB free x %d GPUs): batch %d, actors %d+%d, ~%.1f GiB per GPU",
        free_bytes / 2**30,
        gpus,
        sizing.batch_size,
        sizing.captioner_actors,
        sizing.filter_actors,
        sizing.per_gpu_bytes / 2**30,
    )
    return sizing


def sized(
    cfg: CapFiltConfig,
    captioner: MedConfig | None,
    filter: MedConfig | None,
    free_bytes: int | None,
    gpus: int,
) -> CapFiltConfig:
    """``cfg`` with the batch size and actor counts of ``auto_batch``; ``cfg`` itself on CPU
    (``gpus`` 0 or no free-memory figure)."""
    if gpus < 1 or free_bytes is None:
        return cfg
    s = auto_batch(cfg, captioner, filter, free_bytes, gpus)
    return cfg.model_copy(
        update={
            "batch_size": s.batch_size,
            "captioner_actors": s.captioner_actors,
            "filter_actors": s.filter_actors,
        }
    )


def gpu_free_bytes() -> int | None:
    """Free bytes on the least free visible CUDA device of this process, None without CUDA. In a
    Ray driver without a GPU, run it in a task that asks for one (``num_gpus=1``)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))


def size_for_cluster(
    cfg: CapFiltConfig, captioner: ModelRef | None, filter: ModelRef | None
) -> CapFiltConfig:
    """``sized`` for the connected Ray cluster: its GPU count, and the free memory one GPU task
    reports. A CPU cluster gets ``cfg`` back without a task. Call it in the driver once Ray is up,
    before the chunks are cut (they are ``batch_size`` images)."""
    import ray

    from capfilt.model.tokenizer import TokenIds, load_tokenizer
    from capfilt.stages.capfilt.models import _read_med_config

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        return cfg
    free = ray.get(ray.remote(num_gpus=1)(gpu_free_bytes).remote())

    def config(ref: ModelRef | None) -> MedConfig | None:
        if ref is None:
            return None
        ids = TokenIds.from_tokenizer(load_tokenizer(ref.tokenizer))
        return _read_med_config(Path(ref.path), ref.arch, ids)

    return sized(cfg, config(captioner), config(filter), free, gpus)
