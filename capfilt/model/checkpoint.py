"""Checkpoints as files: which format a path holds, what it says without loading its weights, capfilt's
own format (``save_med`` / ``load_med``), and ``load_checkpoint`` for any supported format.

Formats: a capfilt folder (``capfilt_med.json`` + ``model.safetensors``), a transformers BLIP folder
(``config.json``, written by ``save_pretrained``) or one of BLIP's original ``.pth`` files. This
module imports torch and transformers only when it loads weights or reads a transformers config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from capfilt.core.errors import ConfigError
from capfilt.model.config import MedConfig, get_config

if TYPE_CHECKING:
    from capfilt.model.med import Med
    from capfilt.model.weights import StateDict

__all__ = [
    "HF_CONFIG",
    "MED_META",
    "MED_WEIGHTS",
    "CheckpointFormat",
    "CheckpointInfo",
    "checkpoint_format",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_med",
    "model_id",
    "save_med",
    "weight_files",
]

logger = logging.getLogger(__name__)

MED_META = "capfilt_med.json"
MED_WEIGHTS = "model.safetensors"
_MED_FORMAT = "capfilt-med/1"
HF_CONFIG = "config.json"  # what save_pretrained writes beside the weights of a transformers folder
# Files whose bytes are a checkpoint's weights (what model_id hashes).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

CheckpointFormat = Literal["capfilt", "transformers", "blip_pth"]


def _checkpoint_error(message: str) -> ConfigError:
    from capfilt.model.weights import CheckpointError  # torch: only once something is wrong

    return CheckpointError(message)


def checkpoint_format(path: str | Path) -> CheckpointFormat:
    """The format of a checkpoint: a folder with ``capfilt_med.json`` is capfilt's, a folder with
    ``config.json`` a transformers one, anything else (a file) an original BLIP checkpoint."""
    path = Path(path)
    if path.is_dir():
        if (path / MED_META).is_file():
            return "capfilt"
        if (path / HF_CONFIG).is_file():
            return "transformers"
        raise _checkpoint_error(f"{path} has neither {MED_META} (capfilt) nor {HF_CONFIG} (transformers)")
    return "blip_pth"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's config files say, without reading its weights."""

    format: CheckpointFormat
    config: MedConfig
    heads: frozenset[str] | None  # None: a .pth, whose heads show only in its weights
    architectures: tuple[str, ...] = ()  # a transformers folder's model classes


def inspect_checkpoint(
    path: str | Path, config: MedConfig | str | None = None, *, enc_token_id: int | None = None
) -> CheckpointInfo:
    """The MedConfig and heads of a checkpoint from its config files alone; ``config`` names the
    architecture of a .pth (which carries none)."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "capfilt":
        meta = json.loads((path / MED_META).read_text())
        return CheckpointInfo(fmt, MedConfig.model_validate(meta["config"]), frozenset(meta.get("heads", [])))
    if fmt == "transformers":
        from transformers import BlipConfig

        from capfilt.model.hf import PART_HEADS, arch_part, med_config_from_blip

        hf = BlipConfig.from_pretrained(path)
        archs = tuple(hf.architectures or [])
        part = arch_part(archs)
        heads = PART_HEADS[part] if part else frozenset()
        return CheckpointInfo(fmt, med_config_from_blip(hf, enc_token_id=enc_token_id), heads, archs)
    if config is None:
        raise _checkpoint_error(
            f"{path} is an original BLIP checkpoint: pass its architecture, e.g. config='med-base'"
        )
    return CheckpointInfo(fmt, get_config(config) if isinstance(config, str) else config, None)


def weight_files(path: str | Path) -> list[Path]:
    """The files holding a checkpoint's weights: the file itself, or a folder's weight files by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def model_id(path: str | Path) -> str:
    """``name-<12 hex>``: the name plus the SHA-256 of the weight files, so rows name exact weights."""
    path = Path(path)
    h = hashlib.sha256()
    for f in weight_files(path):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return f"{path.name}-{h.hexdigest()[:12]}"


# --------------------------------------------------------------------------------- capfilt's own


def _canonical_state_dict(med: Med) -> StateDict:
    """The state dict with each shared tensor once (under its first name), ready for safetensors."""
    from capfilt.model.weights import live_tensors

    seen: set[int] = set()
    out: StateDict = {}
    for key, tensor in live_tensors(med).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor.detach().contiguous()
    return out


def save_med(med: Med, out_dir: str | Path) -> Path:
    """Save a Med as ``capfilt_med.json`` (config + heads) and ``model.safetensors`` (shared tensors once)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_canonical_state_dict(med), out / MED_WEIGHTS, metadata={"format": _MED_FORMAT})
    meta = {"format": _MED_FORMAT, "heads": sorted(med.heads), "config": med.config.model_dump()}
    (out / MED_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_med(path: str | Path) -> Med:
    """Load what ``save_med`` wrote."""
    from safetensors.torch import load_file

    from capfilt.model.med import ALL_HEADS, Med
    from capfilt.model.weights import CheckpointError, assign

    path = Path(path)
    meta_path = path / MED_META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {MED_META}; it was not written by capfilt.model.save_med")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _MED_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {_MED_FORMAT!r}")
    med = Med(MedConfig.model_validate(meta["config"]))
    assign(med, load_file(path / MED_WEIGHTS), list(med.state_dict()), f"capfilt checkpoint {path}")
    unknown = set(meta["heads"]) - ALL_HEADS
    if unknown:
        raise CheckpointError(f"{meta_path}: unknown heads {sorted(unknown)}")
    med.heads = frozenset(meta["heads"])
    med.eval()
    return med


def load_checkpoint(
    source: str | Path, config: MedConfig | str | None = None, *, enc_token_id: int | None = None
) -> Med:
    """Any supported checkpoint -> Med: a capfilt directory (save_med), a transformers directory
    (load_hf), or an original BLIP file (load_blip_pth, which needs ``config``)."""
    path = Path(source)
    fmt = checkpoint_format(path)
    if fmt == "capfilt":
        return load_med(path)
    if fmt == "transformers":
        from capfilt.model.hf import load_hf

        return load_hf(path, enc_token_id=enc_token_id)
    if config is None:
        raise _checkpoint_error(
            f"{path} is an original BLIP checkpoint: pass its architecture, e.g. config='med-base'"
        )
    from capfilt.model.blip_pth import load_blip_pth

    return load_blip_pth(path, config)
