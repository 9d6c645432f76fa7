"""Weights in and out of MED: transformers BLIP directories, BLIP's original .pth, timm ViT, BERT,
and capfilt's own safetensors format. Every conversion checks that each key and shape lines up
and names the ones that do not.

Loading never unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.core.errors import ConfigError
from capfilt.model.config import MedConfig, TextConfig, VisionConfig, get_config
from capfilt.model.med import ALL_HEADS, Med, blip_config, resize_pos_embed

__all__ = [
    "CheckpointError",
    "export_captioner",
    "export_filter",
    "init_text_from_bert",
    "init_vision_from_timm",
    "load_blip_pth",
    "load_checkpoint",
    "load_hf",
    "load_med",
    "med_config_from_blip",
    "read_state_dict",
    "save_med",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

MED_META = "capfilt_med.json"
MED_WEIGHTS = "model.safetensors"
_MED_FORMAT = "capfilt-med/1"

_CAPTIONER = "BlipForConditionalGeneration"
_FILTER = "BlipForImageTextRetrieval"

# Med key prefixes that make up each exported / imported part.
_PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "captioner": ("vision_model.", "text_decoder."),
    "filter": ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head."),
}
_PART_HEADS = {"captioner": frozenset({"lm"}), "filter": frozenset({"itc", "itm"})}


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
        raise CheckpointError(f"{path}: entries that are not tensors: {_names(bad)}")
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


def _names(keys: Iterable[str], limit: int = 25) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _targets(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict key of ``module`` -> the live parameter/buffer it names (shared ones repeat)."""
    live: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    live.update(module.named_buffers(remove_duplicate=False))
    return {k: live[k] for k in module.state_dict()}


def _assign(
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
    target = _targets(module)
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
        problems.append(f"{len(missing)} missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} shape mismatches: {_names(misshaped)}")
    if conflicting:
        problems.append(
            f"{len(conflicting)} tensors that the model shares hold different values in the checkpoint "
            f"(MED ties them; a captioner and a filter must be loaded as two models): {_names(conflicting)}"
        )
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)
    logger.info("%s: loaded %d tensors", what, len(source))


def _required(
    module: nn.Module, prefixes: tuple[str, ...], exclude: Callable[[str], bool] = lambda k: False
) -> list[str]:
    return [k for k in module.state_dict() if k.startswith(prefixes) and not exclude(k)]


def _drop(state: Mapping[str, torch.Tensor], rule: Callable[[str], bool], why: str) -> StateDict:
    kept = {k: v for k, v in state.items() if not rule(k)}
    dropped = len(state) - len(kept)
    if dropped:
        logger.info("dropped %d %s", dropped, why)
    return kept


def _is_position_ids(key: str) -> bool:
    # A non-persistent buffer in current transformers; older saves (and BLIP's .pth) include it.
    return key.endswith("embeddings.position_ids")


def _fit_pos_embed(source: StateDict, key: str, module: nn.Module, source_name: str) -> None:
    """Resize a ViT position table to the model's resolution, as BLIP does at 224 -> 384 px."""
    if key not in source:
        return
    want = module.state_dict()[key].shape
    have = source[key].shape
    if have != want and len(have) == 3 and have[-1] == want[-1]:
        logger.info("resizing %s from %d to %d positions", source_name, have[1], want[1])
        source[key] = resize_pos_embed(source[key], want[1] - 1)


# -------------------------------------------------------------------------------- timm ViT names

_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_TIMM_BLOCK_PARTS = {
    "norm1.": "layer_norm1.",
    "norm2.": "layer_norm2.",
    "attn.qkv.": "self_attn.qkv.",
    "attn.proj.": "self_attn.projection.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_TIMM_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def _vit_key(key: str) -> str:
    """A timm / BLIP ViT key -> its name inside BlipVisionModel; unknown keys come back as given
    (and are then reported as unexpected)."""
    if key in _TIMM_TOP:
        return _TIMM_TOP[key]
    m = _TIMM_BLOCK.fullmatch(key)
    if m:
        for old, new in _TIMM_BLOCK_PARTS.items():
            if m.group(2).startswith(old):
                return f"encoder.layers.{m.group(1)}.{new}{m.group(2)[len(old) :]}"
    return key


def init_vision_from_timm(med: Med, timm_state: Mapping[str, torch.Tensor] | nn.Module | str | Path) -> None:
    """Initialise the ViT from a timm VisionTransformer (e.g. DeiT-base, ViT-L/16 in21k): its state
    dict, the model itself, or a checkpoint file. The classifier head is dropped; the position
    table is resized to the model's image size; anything else that does not fit is an error."""
    if isinstance(timm_state, nn.Module):
        timm_state = timm_state.state_dict()
    elif isinstance(timm_state, (str, Path)):
        timm_state = read_state_dict(timm_state)
    state = _drop(timm_state, lambda k: k.startswith(("head.", "fc_norm.")), "timm classifier tensors")
    source = {f"vision_model.{_vit_key(k)}": v for k, v in state.items()}
    names = {f"vision_model.{_vit_key(k)}": k for k in state}
    _fit_pos_embed(source, "vision_model.embeddings.position_embedding", med, "pos_embed")
    _assign(med, source, _required(med, ("vision_model.",)), "timm ViT state dict", names)


# ----------------------------------------------------------------------------------------- BERT


def init_text_from_bert(med: Med, bert_state: Mapping[str, torch.Tensor] | nn.Module | str | Path) -> None:
    """Initialise the text side from a BERT checkpoint (transformers BertModel / BertForMaskedLM keys).

    Both the encoder's and the decoder's self-attention start from BERT's, as in BLIP; the
    cross-attention has no BERT counterpart and keeps its init. Token-type embeddings and the
    pooler are skipped. BERT's vocabulary fills the first rows of the larger MED vocabulary
    ([DEC] and [ENC] keep their init). An MLM head, when present, initialises the LM head.
    """
    if isinstance(bert_state, nn.Module):
        bert_state = bert_state.state_dict()
    elif isinstance(bert_state, (str, Path)):
        bert_state = read_state_dict(bert_state)
    state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    state = _drop(
        state,
        lambda k: (
            k.startswith(("pooler.", "cls.seq_relationship.", "cls.predictions.decoder."))
            or "token_type_embeddings" in k
            or _is_position_ids(k)
        ),
        "BERT tensors MED does not use (token types, pooler, NSP head, tied decoder, position_ids)",
    )
    target = med.state_dict()
    source: StateDict = {}
    names: dict[str, str] = {}
    for key, value in state.items():
        if key.startswith("cls.predictions."):
            dests = [f"text_decoder.{key}"]
        elif ".attention." in key:
            dests = [f"text_encoder.{key}", f"text_decoder.bert.{key}"]
        else:
            dests = [f"text_encoder.{key}"]
        for dest in dests:
            source[dest] = _fit_rows(value, target.get(dest), key)
            names[dest] = key
    has_head = any(k.startswith("cls.") for k in state)
    required = _required(med, ("text_encoder.",), exclude=lambda k: ".crossattention." in k)
    required += [
        k for k in _required(med, ("text_decoder.",)) if ".attention." in k or (has_head and ".cls." in k)
    ]
    _assign(med, source, required, "BERT state dict", names)
    if not has_head:
        logger.info("BERT checkpoint has no MLM head: the LM head keeps its init")


def _fit_rows(value: torch.Tensor, target: torch.Tensor | None, key: str) -> torch.Tensor:
    """BERT's vocabulary / position tables are copied into the first rows of MED's larger ones."""
    if target is None or value.shape == target.shape or value.dim() != target.dim():
        return value
    if value.shape[1:] != target.shape[1:]:
        return value  # a real mismatch: _assign reports it
    if key.endswith(("word_embeddings.weight", "predictions.bias")) and value.shape[0] < target.shape[0]:
        logger.info(
            "%s: copying %d of %d rows (new tokens keep their init)", key, value.shape[0], target.shape[0]
        )
        return torch.cat([value, target[value.shape[0] :].to(value.dtype)], dim=0)
    if key.endswith("position_embeddings.weight") and value.shape[0] > target.shape[0]:
        logger.info("%s: keeping the first %d of %d positions", key, target.shape[0], value.shape[0])
        return value[: target.shape[0]]
    return value


# ------------------------------------------------------------------------------- transformers BLIP


def med_config_from_blip(
    hf: BlipConfig, *, enc_token_id: int | None = None, name: str = "from-transformers"
) -> MedConfig:
    """The MedConfig of a transformers BLIP config. [ENC] is not a transformers field: it comes from
    ``enc_token_id``, else from capfilt's exports, else BLIP's layout ([ENC] right after [DEC])."""
    v: Any = hf.vision_config
    t: Any = hf.text_config
    for part, act in (("vision", v.hidden_act), ("text", t.hidden_act)):
        if act != "gelu":
            raise CheckpointError(f"{part} hidden_act is {act!r}; MED uses exact 'gelu'")
    if enc_token_id is None:
        enc_token_id = getattr(t, "capfilt_enc_token_id", None)
    if enc_token_id is None:
        enc_token_id = t.bos_token_id + 1
        logger.info("no [ENC] id in the config: using bos+1 = %d (BLIP's tokenizer layout)", enc_token_id)
    try:
        return MedConfig(
            name=name,
            vision=VisionConfig(
                image_size=v.image_size,
                patch_size=v.patch_size,
                hidden_size=v.hidden_size,
                num_layers=v.num_hidden_layers,
                num_heads=v.num_attention_heads,
                mlp_size=v.intermediate_size,
                layer_norm_eps=v.layer_norm_eps,
                attention_dropout=v.attention_dropout,
            ),
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                intermediate_size=t.intermediate_size,
                max_position_embeddings=t.max_position_embeddings,
                dropout=t.hidden_dropout_prob,
                attention_dropout=t.attention_probs_dropout_prob,
                layer_norm_eps=t.layer_norm_eps,
                pad_token_id=t.pad_token_id,
                sep_token_id=t.sep_token_id,
                dec_token_id=t.bos_token_id,
                enc_token_id=enc_token_id,
            ),
            embed_dim=hf.image_text_hidden_size,
            label_smoothing=t.label_smoothing,
        )
    except ValueError as e:
        raise CheckpointError(f"the transformers config does not describe a valid MED: {e}") from e


def load_hf(path: str | Path, *, enc_token_id: int | None = None) -> Med:
    """A Med from a transformers directory saved by ``save_pretrained``:
    BlipForConditionalGeneration (captioner: heads {'lm'}) or BlipForImageTextRetrieval
    (filter: heads {'itc', 'itm'}). Weights the directory does not hold keep their init and
    their functions raise (see ``Med.heads``)."""
    path = Path(path)
    hf = BlipConfig.from_pretrained(path)
    archs = hf.architectures or []
    part = "captioner" if _CAPTIONER in archs else "filter" if _FILTER in archs else None
    if part is None:
        raise CheckpointError(
            f"{path} holds {archs or 'an unnamed architecture'}; capfilt loads {_CAPTIONER} (captioner) "
            f"or {_FILTER} (filter)"
        )
    med = Med(med_config_from_blip(hf, enc_token_id=enc_token_id, name=path.name))
    state = _drop(read_state_dict(path), _is_position_ids, "position_ids buffers")
    state = _drop(
        state, lambda k: k.startswith("text_encoder.pooler."), "text pooler tensors (unused by MED)"
    )
    _assign(med, state, _required(med, _PART_PREFIXES[part]), f"{archs[0]} at {path}")
    med.heads = _PART_HEADS[part]
    med.eval()
    return med


def _export(med: Med, out_dir: str | Path, part: Literal["captioner", "filter"], tokenizer: Any) -> Path:
    med.require(*_PART_HEADS[part])
    out = Path(out_dir)
    cls = BlipForConditionalGeneration if part == "captioner" else BlipForImageTextRetrieval
    hf_model = cls(blip_config(med.config))
    src = {k: v for k, v in med.state_dict().items() if k.startswith(_PART_PREFIXES[part])}
    _assign(hf_model, src, list(hf_model.state_dict()), f"export of {med.config.name} as {cls.__name__}")
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("exported %s to %s", cls.__name__, out)
    return out


def export_captioner(med: Med, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a BlipForConditionalGeneration directory (safetensors) that plain transformers loads.
    transformers' ``generate`` sets [DEC] itself; pass ``tokenizer`` to save it alongside."""
    return _export(med, out_dir, "captioner", tokenizer)


def export_filter(med: Med, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a BlipForImageTextRetrieval directory (safetensors) that plain transformers loads.

    transformers' ITM forward does not put [ENC] first (transformers issues 22732, 25629): callers
    of the exported model must set ``input_ids[:, 0]`` to ``config.text_config.capfilt_enc_token_id``
    to get the probabilities capfilt computes."""
    return _export(med, out_dir, "filter", tokenizer)


# --------------------------------------------------------------------------- BLIP's original .pth


def _blip_key(key: str) -> str:
    if key.startswith("visual_encoder."):
        return "vision_model." + _vit_key(key.removeprefix("visual_encoder."))
    return key  # text_encoder.*, text_decoder.*, vision_proj.*, text_proj.*, itm_head.*, temp


def _is_training_state(key: str) -> bool:
    """Momentum copies (visual_encoder_m, text_encoder_m, ...) and feature queues (image_queue, ...)."""
    top = key.split(".", 1)[0]
    return top.endswith("_m") or "queue" in top


def load_blip_pth(path: str | Path, config: MedConfig | str) -> Med:
    """A Med from one of BLIP's original checkpoints (model_base.pth, model_base_capfilt_large.pth,
    model_base_caption_capfilt_large.pth, model_base_retrieval_coco.pth, ...).

    ``config`` names the architecture (e.g. "med-base"), since a .pth carries none. Momentum
    copies and queues are dropped; ``temp`` is loaded when present. The parts present decide the
    heads: text_decoder.* -> 'lm', text_encoder.* + itm_head -> 'itm', projections -> 'itc'.
    A 224 px position table is resized to the config's image size.
    """
    path = Path(path)
    cfg = get_config(config) if isinstance(config, str) else config
    raw = read_state_dict(path)
    raw = _drop(raw, _is_training_state, "momentum-encoder and queue tensors")
    raw = _drop(raw, _is_position_ids, "position_ids buffers")
    source = {_blip_key(k): v for k, v in raw.items()}
    names = {_blip_key(k): k for k in raw}
    med = Med(cfg)
    _fit_pos_embed(source, "vision_model.embeddings.position_embedding", med, "visual_encoder.pos_embed")

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in source)

    prefixes = ["vision_model."]
    heads = set()
    if has("text_decoder."):
        prefixes.append("text_decoder.")
        heads.add("lm")
    if has("text_encoder."):
        prefixes.append("text_encoder.")
    if has("vision_proj.") or has("text_proj."):
        prefixes += ["vision_proj.", "text_proj."]
        heads.add("itc")
    if has("itm_head."):
        prefixes.append("itm_head.")
        heads.add("itm")
    if heads & {"itc", "itm"} and not has("text_encoder."):
        prefixes.append("text_encoder.")  # reported as missing: the heads need the encoder
    if not heads:
        raise CheckpointError(
            f"{path} has no text_decoder, projections or itm_head: nothing MED can use "
            f"(top-level keys: {_names({k.split('.', 1)[0] for k in raw})})"
        )
    _assign(med, source, _required(med, tuple(prefixes)), f"BLIP checkpoint {path}", names)
    med.heads = frozenset(heads)
    med.eval()
    return med


# --------------------------------------------------------------------------------- capfilt's own


def _canonical_state_dict(med: Med) -> StateDict:
    """The state dict with each shared tensor once (under its first name), ready for safetensors."""
    seen: set[int] = set()
    out: StateDict = {}
    for key, tensor in _targets(med).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor.detach().contiguous()
    return out


def save_med(med: Med, out_dir: str | Path) -> Path:
    """Save a Med as ``capfilt_med.json`` (config + heads) and ``model.safetensors`` (shared tensors once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_canonical_state_dict(med), out / MED_WEIGHTS, metadata={"format": _MED_FORMAT})
    meta = {"format": _MED_FORMAT, "heads": sorted(med.heads), "config": med.config.model_dump()}
    (out / MED_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_med(path: str | Path) -> Med:
    """Load what ``save_med`` wrote."""
    path = Path(path)
    meta_path = path / MED_META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} has no {MED_META}; it was not written by capfilt.model.save_med")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _MED_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {_MED_FORMAT!r}")
    med = Med(MedConfig.model_validate(meta["config"]))
    _assign(med, load_file(path / MED_WEIGHTS), list(med.state_dict()), f"capfilt checkpoint {path}")
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
    if path.is_dir():
        if (path / MED_META).is_file():
            return load_med(path)
        if (path / "config.json").is_file():
            return load_hf(path, enc_token_id=enc_token_id)
        raise CheckpointError(f"{path} has neither {MED_META} (capfilt) nor config.json (transformers)")
    if config is None:
        raise CheckpointError(
            f"{path} is an original BLIP checkpoint: pass its architecture, e.g. config='med-base'"
        )
    return load_blip_pth(path, config)
