"""Reading checkpoint tensors safely and copying them into a module with every key and shape checked.

Loading never unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from capfilt.core.errors import ConfigError
from capfilt.model.med import resize_pos_embed

__all__ = [
    "CheckpointError",
    "StateDict",
    "assign",
    "drop_keys",
    "fit_pos_embed",
    "is_position_ids",
    "key_list",
    "live_tensors",
    "read_state_dict",
    "required_keys",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not fit the model; the message names the keys."""


# --------------------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain containers, "
            "and capfilt only loads with torch.load(weights_only=True), which never runs code from the file. "
            "A BLIP checkpoint is a dict of tensors (under 'model'); re-save just that dict, or convert it "
            f"to safetensors. (torch said: {str(e).strip().splitlines()[-1]})"
        ) from e


def _unwrap(obj: Any, path: Path) -> StateDict:
    """A state dict from a checkpoint payload: BLIP wraps it under 'model', others under 'state_dict'."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {key_list(bad)}")
    return dict(obj)


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors from a .safetensors file, a .pth/.pt/.bin file (weights only), or a transformers
    directory (model.safetensors, a sharded index, or pytorch_model.bin)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return load_file(path / "model.safetensors")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            state: StateDict = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_file(path / shard))
            return state
        if (path / "pytorch_model.bin").is_file():
            return _unwrap(_torch_load(path / "pytorch_model.bin"), path)
        raise CheckpointError(
            f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    return _unwrap(_torch_load(path), path)


# ------------------------------------------------------------------------------ checked assignment


def key_list(keys: Iterable[str], limit: int = 25) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def live_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict key of ``module`` -> the live parameter/buffer it names (shared ones repeat)."""
    live: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    live.update(module.named_buffers(remove_duplicate=False))
    return {k: live[k] for k in module.state_dict()}


def assign(
    module: nn.Module,
    source: Mapping[str, torch.Tensor],
    required: Iterable[str],
    what: str,
    source_names: Mapping[str, str] | None = None,
) -> None:
    """Copy ``source`` into ``module``'s tensors after checking every key and shape.

    Keys that name one shared tensor (tied weights, MED's encoder/decoder sharing) count as
    one: a required key is satisfied by any of its aliases, and aliases given twice must agree.
    ``source_names`` maps a converted key back to the checkpoint's own name for messages.
    """
    names = source_names or {}
    target = live_tensors(module)
    groups: dict[int, list[str]] = {}
    for key, tensor in target.items():
        groups.setdefault(id(tensor), []).append(key)

    unexpected = [names.get(k, k) for k in source if k not in target]
    misshaped = [
        f"{names.get(k, k)}: checkpoint {list(v.shape)} vs model {list(target[k].shape)}"
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in required if not any(a in source for a in groups[id(target[k])])]
    conflicting = []
    for aliases in groups.values():
        given = [a for a in aliases if a in source]
        if len(given) > 1 and not all(
            source[a].shape == source[given[0]].shape and torch.equal(source[a], source[given[0]])
            for a in given[1:]
        ):
            conflicting.append(" = ".join(names.get(a, a) for a in given))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {key_list(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} shape mismatches: {key_list(misshaped)}")
    if conflicting:
        problems.append(
            f"{len(conflicting)} tensors that the model shares hold different values in the checkpoint "
            f"(MED ties them; a captioner and a filter must be loaded as two models): {key_list(conflicting)}"
        )
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)
    logger.info("%s: loaded %d tensors", what, len(source))


def required_keys(
    module: nn.Module, prefixes: tuple[str, ...], exclude: Callable[[str], bool] = lambda k: False
) -> list[str]:
    return [k for k in module.state_dict() if k.startswith(prefixes) and not exclude(k)]


def drop_keys(state: Mapping[str, torch.Tensor], rule: Callable[[str], bool], why: str) -> StateDict:
    kept = {k: v for k, v in state.items() if not rule(k)}
    dropped = len(state) - len(kept)
    if dropped:
        logger.info("dropped %d %s", dropped, why)
    return kept


def is_position_ids(key: str) -> bool:
    # A non-persistent buffer in current transformers; older saves (and BLIP's .pth) include it.
    return key.endswith("embeddings.position_ids")


def fit_pos_embed(source: StateDict, key: str, module: nn.Module, source_name: str) -> None:
    """Resize a ViT position table to the model's resolution, as BLIP does at 224 -> 384 px."""
    if key not in source:
        return
    want = module.state_dict()[key].shape
    have = source[key].shape
    if have != want and len(have) == 3 and have[-1] == want[-1]:
        logger.info("resizing %s from %d to %d positions", source_name, have[1], want[1])
        source[key] = resize_pos_embed(source[key], want[1] - 1)
