"""The captioner and filter checkpoints of a CapFilt run: checked before any work starts, loaded in the actors.

A checkpoint or tokenizer on object storage stays a URI in its ``ModelRef``: the driver checks it
through its own local copy, and each actor makes (or finds) the copy on its own node when it
loads it (``capfilt.core.fs.local_copy``), since the driver's cache is not on the other nodes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location, RemotePath
from capfilt.model.checkpoint import model_id
from capfilt.stages.capfilt.config import CapFiltConfig

if TYPE_CHECKING:
    import torch

    from capfilt.model.config import MedConfig
    from capfilt.model.med import Med
    from capfilt.model.tokenizer import TokenIds

__all__ = ["ModelRef", "inference_dtype", "load_model", "model_id", "resolve_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A captioner or filter checkpoint as the actors will load it."""

    path: str  # an absolute local path, or a URI that each actor copies to its node's cache
    tokenizer: str  # the same
    arch: str | None  # architecture name, only for an original BLIP .pth
    model_id: str  # folder/file name + hash of the weights: recorded on every row
    image_size: int


def _read_med_config(path: Location, arch: str | None, ids: TokenIds) -> MedConfig:
    """The MedConfig of a checkpoint from its config files (a folder) or key shapes (a .pth)."""
    from capfilt.model.checkpoint import checkpoint_format, inspect_checkpoint

    if checkpoint_format(path) == "blip_pth":
        return inspect_checkpoint(path, arch, token_ids=ids).config  # the .pth holds no token ids
    return inspect_checkpoint(path).config


def resolve_model(
    path: str | Path | RemotePath,
    role: Literal["captioner", "filter"],
    tokenizer: str | Path | RemotePath | None = None,
    arch: str | None = None,
) -> ModelRef:
    """Check a checkpoint and its tokenizer before any work starts: the role's heads are there and
    the tokenizer's special ids are the model's. A .pth's image size is read from its weights."""
    from capfilt.model.checkpoint import check_role
    from capfilt.model.tokenizer import TokenIds, find_tokenizer, load_tokenizer

    path = fs.location(path)
    check_role(path, role, label=f"--{role}")  # key names only: fails before anything is loaded
    tok_dir = find_tokenizer(path, tokenizer)
    ids = TokenIds.from_tokenizer(load_tokenizer(tok_dir))
    config = _read_med_config(path, arch, ids)
    t = config.text
    pairs = {"[PAD]": (ids.pad, t.pad_token_id), "[SEP]": (ids.sep, t.sep_token_id)}
    pairs |= {"[DEC]": (ids.bos, t.dec_token_id), "[ENC]": (ids.enc, t.enc_token_id)}
    wrong = {name: f"tokenizer {a} vs model {b}" for name, (a, b) in pairs.items() if a != b}
    if ids.vocab_size > t.vocab_size:
        wrong["vocab size"] = f"tokenizer {ids.vocab_size} > model {t.vocab_size}"
    if wrong:
        raise ConfigError(
            f"tokenizer {tok_dir} does not fit {role} {path}: {wrong}; pass the tokenizer the model "
            "was trained with (--tokenizer DIR)"
        )
    # resolve(): actors do not run in the driver's folder; a URI is its own absolute name.
    return ModelRef(
        str(path.resolve()), str(tok_dir.resolve()), arch, model_id(path), config.vision.image_size
    )


def inference_dtype(name: str, device: str) -> torch.dtype:
    """The dtype of ``cfg.dtype`` on ``device``: "auto" is bfloat16 on a GPU that supports it,
    float16 on an older GPU, float32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)  # type: ignore[no-any-return]
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(
    ref: ModelRef, role: Literal["captioner", "filter"], cfg: CapFiltConfig, device: str | None = None
) -> Med:
    """Load a checkpoint for inference on ``device`` (the worker's GPU if it has one), in
    ``cfg.dtype`` with ``cfg.attention``, ViT compiled when ``cfg.compile``, in eval mode."""
    import torch

    from capfilt.model.checkpoint import checkpoint_format, load_checkpoint
    from capfilt.model.tokenizer import TokenIds, load_tokenizer

    ids = None
    if checkpoint_format(ref.path) == "blip_pth":  # its special ids are the tokenizer's
        ids = TokenIds.from_tokenizer(load_tokenizer(ref.tokenizer))
    med = load_checkpoint(ref.path, ref.arch, token_ids=ids)
    med.require(*(("lm",) if role == "captioner" else ("itm", "itc")))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(cfg.dtype, device)
    med.set_attention(cfg.attention)
    med = med.to(device=device, dtype=dtype).eval()
    if cfg.compile:
        # The ViT is most of the FLOPs and has fixed shapes (one recompile for a shard's short last
        # chunk); generate's per-step shapes would recompile the text side at every length.
        med.vision_model.compile(dynamic=False)
    log.info("%s %s on %s in %s, %s attention", role, ref.model_id, device, dtype, cfg.attention)
    return med
