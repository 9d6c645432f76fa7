"""The captioner and filter checkpoints of a CapFilt run: checked before any work starts, loaded in the actors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from capfilt.core.errors import ConfigError
from capfilt.model.checkpoint import model_id
from capfilt.stages.capfilt.config import CapFiltConfig

if TYPE_CHECKING:
    from capfilt.model.config import MedConfig
    from capfilt.model.med import Med

__all__ = ["ModelRef", "load_model", "model_id", "resolve_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A captioner or filter checkpoint as the actors will load it."""

    path: str
    tokenizer: str
    arch: str | None  # architecture name, only for an original BLIP .pth
    model_id: str  # folder/file name + hash of the weights: recorded on every row
    image_size: int


def _read_med_config(path: Path, arch: str | None, role: str) -> MedConfig:
    """The MedConfig of a checkpoint from its config files alone, checking it has the role's heads."""
    from capfilt.model.checkpoint import checkpoint_format, inspect_checkpoint
    from capfilt.model.hf import CAPTIONER_ARCH, FILTER_ARCH

    head, hf_arch = {"captioner": ("lm", CAPTIONER_ARCH), "filter": ("itm", FILTER_ARCH)}[role]
    try:
        fmt = checkpoint_format(path)
    except ConfigError as err:
        raise ConfigError(
            f"--{role} {path} is not a capfilt model folder, a transformers BLIP folder or a .pth file"
        ) from err
    if fmt == "blip_pth" and arch is None:
        raise ConfigError(
            f"--{role} {path} is an original BLIP checkpoint: name its architecture (e.g. med-base)"
        )
    info = inspect_checkpoint(path, arch)
    if fmt == "transformers" and hf_arch not in info.architectures:
        raise ConfigError(
            f"--{role} {path} holds {list(info.architectures)}; a {role} is a {hf_arch} directory"
        )
    if fmt == "capfilt" and head not in (info.heads or ()):
        raise ConfigError(f"--{role} {path} has heads {sorted(info.heads or ())}; a {role} needs {head!r}")
    return info.config


def resolve_model(
    path: str | Path,
    role: Literal["captioner", "filter"],
    tokenizer: str | Path | None = None,
    arch: str | None = None,
) -> ModelRef:
    """Check a checkpoint and its tokenizer before any work starts: the role's heads are there and
    the tokenizer's special ids are the model's."""
    from capfilt.model.tokenizer import TokenIds, find_tokenizer, load_tokenizer

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--{role} {path} does not exist")
    config = _read_med_config(path, arch, role)
    tok_dir = find_tokenizer(path, tokenizer)
    ids = TokenIds.from_tokenizer(load_tokenizer(tok_dir))
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
    return ModelRef(
        str(path.resolve()), str(tok_dir.resolve()), arch, model_id(path), config.vision.image_size
    )


def load_model(ref: ModelRef, role: Literal["captioner", "filter"], cfg: CapFiltConfig) -> Med:
    """Load a checkpoint for inference on the worker's device, in ``cfg.dtype``, in eval mode."""
    import torch

    from capfilt.model.checkpoint import load_checkpoint

    med = load_checkpoint(ref.path, ref.arch)
    med.require(*(("lm",) if role == "captioner" else ("itm", "itc")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return med.to(device=device, dtype=getattr(torch, cfg.dtype)).eval()
