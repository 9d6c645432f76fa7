"""Checkpoints as files: which format a path holds, what it says without loading its weights, capfilt's
own format (``save_med`` / ``load_med``), and ``load_checkpoint`` for any supported format.

Formats: a capfilt folder (``capfilt_med.json`` + ``model.safetensors``), a transformers BLIP folder
(``config.json``, written by ``save_pretrained``) or one of BLIP's original ``.pth`` files. This
module imports torch and transformers only when it loads weights or reads a transformers config.

Any path may be a URI (``s3://bucket/models/captioner``): it is copied once to the local cache
(``capfilt.core.fs.local_copy``) and read from there, so every reader here works on local files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import RemotePath
from capfilt.model.config import MedConfig

if TYPE_CHECKING:
    from capfilt.model.med import Med
    from capfilt.model.tokenizer import TokenIds
    from capfilt.model.weights import StateDict

__all__ = [
    "HF_CONFIG",
    "MED_META",
    "MED_WEIGHTS",
    "CheckpointFormat",
    "CheckpointInfo",
    "check_role",
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


def checkpoint_format(path: str | Path | RemotePath) -> CheckpointFormat:
    """The format of a checkpoint: a folder with ``capfilt_med.json`` is capfilt's, a folder with
    ``config.json`` a transformers one, anything else (a file) an original BLIP checkpoint."""
    path = fs.local_copy(path)
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
    path: str | Path | RemotePath,
    config: MedConfig | str | None = None,
    *,
    enc_token_id: int | None = None,
    token_ids: TokenIds | None = None,
) -> CheckpointInfo:
    """The MedConfig and heads of a checkpoint without reading its weights: a folder's config
    files, or a .pth's key names and shapes (memory-mapped). For a .pth ``config`` names the
    family and ``token_ids`` the tokenizer's ids (see ``load_blip_pth``)."""
    path = fs.local_copy(path)
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
    from capfilt.model.blip_keys import config_from_shapes, drop_reason, heads_from_keys

    shapes = {k: tuple(v.shape) for k, v in _pth_tensors(path).items() if drop_reason(k) is None}
    cfg = config_from_shapes(shapes, config, path, token_ids, enc_token_id)
    return CheckpointInfo(fmt, cfg, heads_from_keys(shapes))


def _pth_tensors(path: Path) -> StateDict:
    from capfilt.model.weights import read_state_dict

    return read_state_dict(path, mmap=True)


# The heads each role of a CapFilt run needs, and where a checkpoint keeps them (for messages).
_ROLE_NEEDS = {
    "captioner": (
        frozenset({"lm"}),
        "an LM head (BLIP: text_decoder.*; transformers: BlipForConditionalGeneration)",
    ),
    "filter": (
        frozenset({"itm", "itc"}),
        "ITM and ITC heads (BLIP: text_encoder.*, itm_head.*, vision_proj.*, text_proj.*; "
        "transformers: BlipForImageTextRetrieval)",
    ),
}


def check_role(
    path: str | Path | RemotePath, role: Literal["captioner", "filter"], *, label: str | None = None
) -> frozenset[str]:
    """The heads of a checkpoint, after checking it has those ``role`` needs (captioner: LM;
    filter: ITM + projections); a ``ConfigError`` naming the file and the heads it has otherwise.
    Reads config files or key names only, never the weights. ``label`` prefixes the message
    (e.g. ``--captioner``). A URI is checked where it is, then read from its local copy."""
    label = label or role
    given = fs.location(path)
    if not given.exists():
        raise ConfigError(f"{label} {given} does not exist")
    path = fs.local_copy(given)
    try:
        fmt = checkpoint_format(path)
    except ConfigError as err:
        raise ConfigError(
            f"{label} {given} is not a capfilt model folder, a transformers BLIP folder or a .pth file"
        ) from err
    if fmt == "capfilt":
        heads = frozenset(json.loads((path / MED_META).read_text()).get("heads", []))
    elif fmt == "transformers":
        from capfilt.model.hf import PART_HEADS, arch_part

        archs = json.loads((path / HF_CONFIG).read_text()).get("architectures") or []
        part = arch_part(archs)
        heads = PART_HEADS[part] if part else frozenset()
        if part != role:
            hf_arch = "BlipForConditionalGeneration" if role == "captioner" else "BlipForImageTextRetrieval"
            raise ConfigError(
                f"{label} {given} holds {archs} (heads {sorted(heads) or 'none'}); "
                f"a {role} is a {hf_arch} directory"
            )
    else:
        from capfilt.model.blip_keys import drop_reason, heads_from_keys

        keys = [k for k in _pth_tensors(path) if drop_reason(k) is None]
        heads = heads_from_keys(keys)
    need, where = _ROLE_NEEDS[role]
    if not need <= heads:
        raise ConfigError(
            f"{label} {given} ({fmt}) has heads {sorted(heads) or 'none'}; a {role} needs {where}"
        )
    return heads


def weight_files(path: str | Path | RemotePath) -> list[Path]:
    """The files holding a checkpoint's weights: the file itself, or a folder's weight files by name."""
    path = fs.local_copy(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def model_id(path: str | Path | RemotePath) -> str:
    """``name-<12 hex>``: the name plus the SHA-256 of the weight files, so rows name exact weights."""
    path = fs.local_copy(path)
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


def load_med(path: str | Path | RemotePath) -> Med:
    """Load what ``save_med`` wrote."""
    from safetensors.torch import load_file

    from capfilt.model.med import ALL_HEADS, Med
    from capfilt.model.weights import CheckpointError, assign

    path = fs.local_copy(path)
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
    source: str | Path | RemotePath,
    config: MedConfig | str | None = None,
    *,
    enc_token_id: int | None = None,
    token_ids: TokenIds | None = None,
    image_size: int | None = None,
    strict: bool = True,
) -> Med:
    """Any supported checkpoint -> Med: a capfilt directory (save_med), a transformers directory
    (load_hf), or an original BLIP file (load_blip_pth: ``config`` names its family, found from
    its shapes when None; ``token_ids`` are its tokenizer's; ``image_size`` resizes its position
    table; ``strict=False`` skips keys MED does not know). Folders carry their own config."""
    path = fs.local_copy(source)
    fmt = checkpoint_format(path)
    if fmt == "capfilt":
        return load_med(path)
    if fmt == "transformers":
        from capfilt.model.hf import load_hf

        return load_hf(path, enc_token_id=enc_token_id)
    from capfilt.model.blip_pth import load_blip_pth

    return load_blip_pth(
        path, config, token_ids=token_ids, enc_token_id=enc_token_id, image_size=image_size, strict=strict
    )
