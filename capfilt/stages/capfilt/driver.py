"""The CapFilt stage: download shards in; synthetic captions, filter scores, a decision per text,
cleaned Parquet shards, a candidates table and stats out, on Ray Data actors.

The core is two plain functions on a batch, testable without Ray:

- ``caption_batch(captioner, tokenizer, batch, cfg)``: K synthetic captions per image;
- ``score_batch(filter, tokenizer, batch, cfg)``: every text of every image (web alt-text, then
  each synthetic caption) scored with the filter's ITM head, ``[ENC]`` as first token as BLIP's
  filter was trained (transformers' own ITM forward keeps ``[CLS]``), plus the ITC cosine; each
  image is encoded once for all its texts. A text is kept when p(match) >= threshold (0.5).

``run_capfilt`` wires them on Ray Data: read shards (streaming) -> decode and resize on CPU tasks
-> ``CaptionerActor`` pool -> ``FilterActor`` pool -> the driver, which writes an input shard's
outputs as soon as its last image comes back. The actors load their model from a path in
``__init__`` and only call the functions above.

Output layout of ``out``::

    cleaned/NNNNN.parquet         CLEANED: one row per kept (image, text), next round's input
    cleaned/human-NNNNN.parquet   human pairs, passed through (text_source "human")
    candidates/NNNNN.parquet      CANDIDATE: every text considered, scores, decision, reason
    _stats/NNNNN.json             per input shard; written last, it marks the shard done
    _manifest.json                inputs, models, config; a rerun with other settings is refused
    _summary.json                 the run summary (what the CLI prints)

Shard NNNNN of ``cleaned/`` and ``candidates/`` comes from the input shard with the same name.
Images in cleaned shards: ``images="include"`` (default) copies the JPEG bytes into ``image``;
``"reference"`` leaves ``image`` null. Either way ``image_ref`` says where the bytes are: a
Parquet shard whose row with the same ``uid`` holds them in ``image``, or an image file.
``rethreshold`` re-decides from ``candidates/`` without running a model; it takes the images for
the cleaned shards it rewrites from the download shards named in ``_manifest.json``.

Determinism: caption k of an image is sampled with uniforms drawn from a generator seeded by
``blake2b(seed, uid, k)``, one per decoding step (``SeededSampler``), so its draws do not depend
on which batch, block, actor or run the image lands in. And a model batch is always a chunk of
``batch_size`` consecutive images of one shard, so with the same settings a rerun or a resumed
shard computes exactly what an uninterrupted run computed, bit for bit on the same hardware.
With another ``batch_size`` the scores differ in the last float bits, and a caption changes only
where a draw lands within rounding of a token's CDF boundary (the draw walks the CDF in token-id
order, so near-ties in rank cannot swap tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from capfilt.core import schema as S
from capfilt.core.errors import ConfigError, StageFailed
from capfilt.core.logs import log_context
from capfilt.core.shards import (
    MANIFEST,
    STATS_DIR,
    SUMMARY,
    read_json,
    safe_component,
    write_json_atomic,
    write_parquet_atomic,
)
from capfilt.core.text import pre_caption

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.config import MedConfig
    from capfilt.model.med import Med

log = logging.getLogger(__name__)

STAGE = "capfilt"
from capfilt.core.layout import CANDIDATES_DIR, CLEANED_DIR  # noqa: E402

HUMAN_PREFIX = "human-"

KEEP, DROP = "keep", "drop"
# Reasons are categories; only "image not decodable" carries a detail, after ": ".
REASON_BELOW = "itm below threshold"
REASON_EMPTY = "empty text"
REASON_UNDECODABLE = "image not decodable"
REASON_NO_FILTER = "unscored (no filter)"
REASON_HUMAN = "human pair (kept unscored)"
REASON_MISSING = "image file missing"

_REQUIRED_INPUT = ("uid", "url", "text", "status", "row", "image")


# ---------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------


class CapFiltConfig(BaseModel):
    """Options of the CapFilt stage. Defaults are BLIP's: nucleus sampling top_p 0.9, one caption
    per image, keep p(match) >= 0.5."""

    model_config = ConfigDict(extra="forbid")

    # Captioner: what the captions are.
    k: int = Field(1, ge=1, le=64)  # synthetic captions per image; BLIP used 1
    sample: bool = True  # nucleus sampling; False: beam search (num_beams > 1) or greedy
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)  # what BLIP's released code ran with (transformers' default); 0: off
    num_beams: int = Field(1, ge=1)
    min_length: int = Field(5, ge=0)  # tokens, counting [DEC] and the prompt, as in BLIP
    max_length: int = Field(30, ge=2)
    repetition_penalty: float | None = Field(None, gt=0)  # None: 1.1 when sampling, else 1.0 (BLIP)
    prompt: str = "a picture of "  # fed to the decoder, stripped from the stored caption
    seed: int = 0
    # Filter: how texts are scored and decided.
    threshold: float = Field(0.5, ge=0, le=1)
    max_words: int = Field(30, ge=1)  # pre_caption before scoring; the stored text is the original
    max_text_tokens: int = Field(35, ge=4)  # BLIP's retrieval length
    # Outputs.
    images: Literal["include", "reference"] = "include"
    round: int = Field(1, ge=0)
    human_shard_size: int = Field(10_000, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Execution: none of these changes a single output row.
    batch_size: int = Field(32, ge=1)  # images per model call, both models
    captioner_actors: int = Field(1, ge=1)
    filter_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)  # fractional, so a 2-core machine keeps CPUs for reading
    gpus_per_actor: float | None = Field(None, ge=0)  # None: one GPU each if the cluster has enough
    # Read + decode tasks. Not the actors' value: Ray fuses map steps with equal resources, and
    # decoding inside a model actor would leave its model idle meanwhile.
    preprocess_cpus: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)  # None: what Ray gives the worker

    @model_validator(mode="after")
    def _check(self) -> CapFiltConfig:
        if self.sample and self.num_beams > 1:
            raise ValueError(
                f"num_beams {self.num_beams} with sampling: beam search is deterministic decoding; "
                "set sample=False (CLI: --beam N) or num_beams=1"
            )
        if not self.sample and self.k > self.num_beams:
            raise ValueError(
                f"k={self.k} captions per image need at least {self.k} beams without sampling "
                f"(got num_beams {self.num_beams}); raise --beam or lower --k"
            )
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        return self

    def output_settings(self) -> dict[str, Any]:
        """The fields that decide what the output rows are; a resumed run must match them."""
        execution = {
            "batch_size",
            "captioner_actors",
            "filter_actors",
            "cpus_per_actor",
            "gpus_per_actor",
            "preprocess_cpus",
            "torch_threads",
            "human_shard_size",
        }
        return {k: v for k, v in self.model_dump().items() if k not in execution}


# ---------------------------------------------------------------------------------------------
# Models: what the driver knows of a checkpoint without loading its weights.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A captioner or filter checkpoint as the actors will load it."""

    path: str
    tokenizer: str
    arch: str | None  # architecture name, only for an original BLIP .pth
    model_id: str  # folder/file name + hash of the weights: recorded on every row
    image_size: int


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))


def model_id(path: str | Path) -> str:
    """``name-<12 hex>``: the name plus the SHA-256 of the weight files, so rows name exact weights."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _weight_files(path):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return f"{path.name}-{h.hexdigest()[:12]}"


def _read_med_config(path: Path, arch: str | None, role: str) -> MedConfig:
    """The MedConfig of a checkpoint from its config files alone, checking it has the role's heads."""
    from transformers import BlipConfig

    from capfilt.model.config import MedConfig, get_config
    from capfilt.model.checkpoint import MED_META
    from capfilt.model.hf import med_config_from_blip

    want = {
        "captioner": ("lm", "BlipForConditionalGeneration"),
        "filter": ("itm", "BlipForImageTextRetrieval"),
    }
    head, hf_arch = want[role]
    if path.is_dir() and (path / MED_META).is_file():
        meta = json.loads((path / MED_META).read_text())
        if head not in meta.get("heads", []):
            raise ConfigError(f"--{role} {path} has heads {meta.get('heads')}; a {role} needs {head!r}")
        return MedConfig.model_validate(meta["config"])
    if path.is_dir() and (path / "config.json").is_file():
        hf = BlipConfig.from_pretrained(path)
        if hf_arch not in (hf.architectures or []):
            raise ConfigError(f"--{role} {path} holds {hf.architectures}; a {role} is a {hf_arch} directory")
        return med_config_from_blip(hf)
    if path.is_file():
        if arch is None:
            raise ConfigError(
                f"--{role} {path} is an original BLIP checkpoint: name its architecture (e.g. med-base)"
            )
        return get_config(arch)
    raise ConfigError(
        f"--{role} {path} is not a capfilt model folder, a transformers BLIP folder or a .pth file"
    )


def find_tokenizer(model_path: str | Path, override: str | Path | None = None) -> Path:
    """The tokenizer saved with a model: the model folder itself, ``tokenizer/`` inside it, or
    ``tokenizer/`` next to it; ``override`` wins."""
    path = Path(model_path)
    base = path if path.is_dir() else path.parent
    candidates = [Path(override)] if override else [base, base / "tokenizer", base.parent / "tokenizer"]
    for c in candidates:
        if c.is_dir() and any(
            (c / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")
        ):
            return c
    raise ConfigError(
        f"no tokenizer for {path} (looked in {', '.join(str(c) for c in candidates)}); "
        "pass --tokenizer DIR (a folder written by save_pretrained)"
    )


def resolve_model(
    path: str | Path,
    role: Literal["captioner", "filter"],
    tokenizer: str | Path | None = None,
    arch: str | None = None,
) -> ModelRef:
    """Check a checkpoint and its tokenizer before any work starts: the role's heads are there and
    the tokenizer's special ids are the model's."""
    from capfilt.model.tokenizer import TokenIds, load_tokenizer

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


# ---------------------------------------------------------------------------------------------
# Preprocessing (CPU tasks): bytes -> uint8 pixels, one error per row that cannot be decoded.
# ---------------------------------------------------------------------------------------------


def pixel_column(image_size: int) -> str:
    return f"pixels_{image_size}"


def preprocess_batch(batch: dict[str, Any], image_sizes: Sequence[int]) -> dict[str, Any]:
    """Decode each image and resize it (bicubic) to every size in ``image_sizes``.

    Returns ``uid``, ``text``, ``row``, ``error`` ("" or why the image did not decode) and one
    uint8 column ``pixels_<S>`` [N, S, S, 3] per size; the pixels of a failed row are zeros. Rows
    with a ``status`` other than success are not images and are left out. Pixels stay uint8 so the
    object store carries a quarter of the float bytes; ``pixel_values`` normalises them exactly as
    ``capfilt.model.transforms.test_transform``.
    """
    from PIL import Image

    from capfilt.model.transforms import decode_image

    n = len(batch["uid"])
    keep = [i for i in range(n) if "status" not in batch or batch["status"][i] == S.SUCCESS]
    out: dict[str, Any] = {
        "uid": np.asarray([batch["uid"][i] for i in keep], dtype=object),
        "text": np.asarray([batch["text"][i] for i in keep], dtype=object),
        "row": np.asarray([batch["row"][i] for i in keep] if "row" in batch else keep, dtype=np.int64),
    }
    errors: list[str | None] = []
    pixels = {s: np.zeros((len(keep), s, s, 3), dtype=np.uint8) for s in image_sizes}
    for j, i in enumerate(keep):
        try:
            image = decode_image(batch["image"][i])
            for s in image_sizes:
                pixels[s][j] = np.asarray(image.resize((s, s), Image.Resampling.BICUBIC))
        except Exception as err:  # any undecodable row becomes a reason, never a crashed batch
            errors.append(f"{REASON_UNDECODABLE}: {err}".splitlines()[0][:300])
            continue
        errors.append("")  # not None: a column of nulls does not survive Ray's conversions
    out["error"] = np.asarray(errors, dtype=object)
    for s in image_sizes:
        out[pixel_column(s)] = pixels[s]
    return out


def pixel_values(pixels: np.ndarray, device: Any = "cpu", dtype: Any = None) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> normalised float [N, 3, S, S] (ToTensor + CLIP Normalize)."""
    import torch

    from capfilt.model.transforms import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)  # [N, S, S, 3] uint8
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, S, S] in [0, 1]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(dtype) if dtype is not None else x


def _model_device_dtype(med: Med) -> tuple[torch.device, torch.dtype]:
    p = next(med.parameters())
    return p.device, p.dtype


def _str_or_none(value: Any) -> str | None:
    """A string cell as str or None: Ray may hand an all-null object column back as NaN floats."""
    return value if isinstance(value, str) else None


def _errors(batch: dict[str, Any], n: int) -> list[str | None]:
    """The ``error`` column with "" (no error) as None."""
    return [_str_or_none(e) or None for e in batch["error"]] if "error" in batch else [None] * n


# ---------------------------------------------------------------------------------------------
# Captioning.
# ---------------------------------------------------------------------------------------------


def caption_seed(seed: int, uid: str, k: int) -> int:
    """The generator seed of caption ``k`` of image ``uid``: independent of batches and runs."""
    digest = hashlib.blake2b(f"{seed}\x1f{uid}\x1f{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def caption_uniforms(uids: Sequence[str], k: int, seed: int, steps: int) -> torch.Tensor:
    """One uniform per decoding step for each (image, caption): [len(uids) * k, steps], float64,
    rows of one image adjacent (the order generate returns them in)."""
    import torch

    rows = []
    for uid in uids:
        for j in range(k):
            gen = torch.Generator().manual_seed(caption_seed(seed, uid, j))
            rows.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(rows)


def _seeded_sampler_class() -> type:
    """SeededSampler, built on first use so that importing this module does not import transformers."""
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        """Top-k then nucleus (top-p) sampling, as transformers' warpers do, where row r's token at
        step t is picked by the inverse CDF at ``uniforms[r, t]``. It returns scores that are 0 at the picked token and
        -inf elsewhere, so generate's greedy argmax takes it; it must run last, after
        transformers' repetition-penalty and min-length processors."""

        def __init__(self, uniforms: torch.Tensor, start_len: int, top_p: float, top_k: int) -> None:
            self.uniforms = uniforms
            self.start_len = start_len
            self.top_p = top_p
            self.top_k = top_k

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            step = input_ids.shape[1] - self.start_len
            u = self.uniforms[:, step].to(scores.device).unsqueeze(-1)  # [R, 1]
            logits = scores.float()  # [R, V]
            # Candidates best first: the top k (topk sorts them), or the whole vocabulary.
            if 0 < self.top_k < logits.shape[-1]:
                cand_logits, cand_ids = torch.topk(logits, self.top_k, dim=-1)  # [R, C]
            else:
                cand_logits, cand_ids = torch.sort(logits, dim=-1, descending=True, stable=True)
            probs = cand_logits.softmax(dim=-1)  # [R, C]
            better = probs.cumsum(dim=-1) - probs  # mass ranked above each candidate
            probs = probs.masked_fill(better >= self.top_p, 0.0)  # nucleus: smallest prefix >= top_p
            # The draw walks the CDF in token-id order, not rank order: tiny float differences
            # (another batch size) can swap two ranks, but they cannot move a token's id.
            by_id = torch.argsort(cand_ids, dim=-1)  # [R, C]
            cdf = probs.gather(-1, by_id).double().cumsum(dim=-1)  # [R, C]
            # right=True: the first candidate whose CDF exceeds the draw, never a zero-mass one
            pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(
                max=cdf.shape[-1] - 1
            )  # [R, 1]
            token = cand_ids.gather(-1, by_id.gather(-1, pick))  # [R, 1]
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, token, 0.0)

    return SeededSampler


def _generate(
    captioner: Med, image_embeds: torch.Tensor, uids: Sequence[str], prompt: list[int], cfg: CapFiltConfig
) -> torch.Tensor:
    """Token ids [B * k, <= max_length], each row [DEC] + prompt + caption, rows of one image adjacent."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    device = image_embeds.device
    prompt_ids = torch.tensor(prompt, dtype=torch.long, device=device)
    if not cfg.sample:
        return captioner.generate_from_embeds(
            image_embeds,
            prompt_ids if prompt else None,
            sample=False,
            num_beams=cfg.num_beams,
            max_length=cfg.max_length,
            min_length=cfg.min_length,
            repetition_penalty=cfg.repetition_penalty,
            num_return_sequences=cfg.k,
        )
    t = captioner.config.text
    embeds = image_embeds.repeat_interleave(cfg.k, dim=0)  # [B*k, 1+P, Dv]
    rows = embeds.shape[0]
    start = torch.full((rows, 1 + len(prompt)), t.dec_token_id, dtype=torch.long, device=device)
    start[:, 1:] = prompt_ids  # [B*k, 1+Lp]: [DEC] + prompt
    if start.shape[1] >= cfg.max_length:
        raise ConfigError(
            f"max_length {cfg.max_length} leaves no room after [DEC] + a {len(prompt)}-token prompt"
        )
    sampler = _seeded_sampler_class()(
        caption_uniforms(uids, cfg.k, cfg.seed, cfg.max_length), start.shape[1], cfg.top_p, cfg.top_k
    )
    gen = GenerationConfig(
        max_length=cfg.max_length,
        min_length=cfg.min_length,
        do_sample=False,  # the sampler picks; greedy argmax just takes its pick
        num_beams=1,
        repetition_penalty=1.1 if cfg.repetition_penalty is None else cfg.repetition_penalty,
        bos_token_id=t.dec_token_id,
        eos_token_id=t.sep_token_id,
        pad_token_id=t.pad_token_id,
    )
    return captioner.text_decoder.generate(
        input_ids=start,
        attention_mask=torch.ones_like(start),
        encoder_hidden_states=embeds,
        generation_config=gen,
        logits_processor=LogitsProcessorList([sampler]),
    )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


def caption_batch(
    captioner: Med, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Any], cfg: CapFiltConfig
) -> dict[str, Any]:
    """Add ``captions``: for each row a list of ``cfg.k`` synthetic captions (prompt stripped), or
    an empty list when its image did not decode. One generate call for the whole batch."""
    import torch

    uids = [str(u) for u in batch["uid"]]
    n = len(uids)
    ok = [i for i, err in enumerate(_errors(batch, n)) if err is None]
    captions = np.empty(n, dtype=object)
    for i in range(n):
        captions[i] = []
    if ok:
        captioner.eval()
        device, dtype = _model_device_dtype(captioner)
        size = captioner.config.vision.image_size
        prompt = prompt_ids(tokenizer, cfg.prompt)
        with torch.inference_mode():
            pixels = pixel_values(np.asarray(batch[pixel_column(size)])[ok], device, dtype)  # [B, 3, S, S]
            embeds = captioner.encode_image(pixels)  # [B, 1+P, Dv]
            ids = _generate(captioner, embeds, [uids[i] for i in ok], prompt, cfg)  # [B*k, L]
        texts = tokenizer.batch_decode(ids[:, 1 + len(prompt) :].cpu(), skip_special_tokens=True)
        for j, i in enumerate(ok):
            captions[i] = [t.strip() for t in texts[j * cfg.k : (j + 1) * cfg.k]]
    return {**batch, "captions": captions}


# ---------------------------------------------------------------------------------------------
# Scoring and deciding: one output row per (image, text).
# ---------------------------------------------------------------------------------------------

_CANDIDATE_COLUMNS = (
    "uid",
    "text_uid",
    "text",
    "text_source",
    "text_index",
    "itm_score",
    "itc_score",
    "decision",
    "reason",
)
# What score_batch returns: the CANDIDATE columns a batch decides, plus where each row came from.
_CANDIDATE_FIELDS = [S.CANDIDATE.field(c) for c in _CANDIDATE_COLUMNS] + [
    pa.field("row", pa.int64()),
    pa.field("input_shard", pa.string()),
]


def decide(itm: float, threshold: float) -> tuple[str, str | None]:
    """BLIP's rule: keep a text when the filter's p(match) >= threshold."""
    return (KEEP, None) if itm >= threshold else (DROP, REASON_BELOW)


def _assemble(
    batch: dict[str, Any], cfg: CapFiltConfig
) -> tuple[dict[str, list[Any]], list[tuple[int, str, int]]]:
    """The candidate rows of a batch (web text, then each synthetic caption, per image) with their
    decision when no score is needed, and the (image, cleaned text, candidate) triples to score."""
    n = len(batch["uid"])
    errors = _errors(batch, n)
    captions = batch["captions"] if "captions" in batch else [[]] * n
    cols: dict[str, list[Any]] = {c: [] for c in _CANDIDATE_COLUMNS}
    carry = [c for c in ("row", "input_shard") if c in batch]
    for c in carry:
        cols[c] = []
    to_score: list[tuple[int, str, int]] = []
    for i in range(n):
        uid = str(batch["uid"][i])
        web = _str_or_none(batch["text"][i])
        texts = [(web, "web", 0)] + [(c, "synthetic", j) for j, c in enumerate(captions[i])]
        for text, source, index in texts:
            r = len(cols["uid"])
            cleaned = pre_caption(text, cfg.max_words)
            cols["uid"].append(uid)
            cols["text_uid"].append(S.make_text_uid(uid, source, index, text or ""))
            cols["text"].append(text)
            cols["text_source"].append(source)
            cols["text_index"].append(index)
            cols["itm_score"].append(None)
            cols["itc_score"].append(None)
            for c in carry:
                cols[c].append(batch[c][i])
            if errors[i] is not None:
                decision, reason = DROP, str(errors[i])
            elif not cleaned:
                decision, reason = DROP, REASON_EMPTY
            else:
                decision, reason = KEEP, REASON_NO_FILTER
                to_score.append((i, cleaned, r))
            cols["decision"].append(decision)
            cols["reason"].append(reason)
    return cols, to_score


def _as_table(cols: dict[str, list[Any]]) -> pa.Table:
    """Candidate rows as Arrow with exact types (nulls stay nulls, which numpy object columns
    do not guarantee through Ray's conversions)."""
    fields = [f for f in _CANDIDATE_FIELDS if f.name in cols]
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in fields}, schema=pa.schema(fields))


def unscored_batch(batch: dict[str, Any], cfg: CapFiltConfig) -> pa.Table:
    """Candidate rows without a filter (caption-only): every non-empty text of a decodable image is
    kept, unscored."""
    cols, _ = _assemble(batch, cfg)
    return _as_table(cols)


def score_batch(
    filter: Med, tokenizer: PreTrainedTokenizerBase, batch: dict[str, Any], cfg: CapFiltConfig
) -> pa.Table:
    """One row per (image, text): the web text, then each synthetic caption in ``captions`` if the
    batch has them. ``itm_score`` is the ITM p(match) with ``[ENC]`` first, ``itc_score`` the ITC
    cosine; null where a text was not scored (empty text, undecodable image). Returns an Arrow
    table: the CANDIDATE columns a batch decides, plus ``row`` when given.

    Each image is encoded once; its embeddings are repeated for its texts, and all pairs of the
    batch go through the image-grounded encoder in one call."""
    import torch

    from capfilt.model.tokenizer import tokenize

    cols, to_score = _assemble(batch, cfg)
    if to_score:
        filter.eval()
        device, dtype = _model_device_dtype(filter)
        size = filter.config.vision.image_size
        images = sorted({i for i, _, _ in to_score})
        slot = {i: j for j, i in enumerate(images)}
        max_len = min(cfg.max_text_tokens, filter.config.text.max_position_embeddings)
        tokens = tokenize(tokenizer, [text for _, text, _ in to_score], max_len)
        with torch.inference_mode():
            pixels = pixel_values(
                np.asarray(batch[pixel_column(size)])[images], device, dtype
            )  # [B, 3, S, S]
            embeds = filter.encode_image(pixels)  # [B, 1+P, Dv], once per image
            image_feat = filter.image_feat(embeds)  # [B, E]
            which = torch.tensor([slot[i] for i, _, _ in to_score], device=device)  # [N] image of each pair
            ids = tokens["input_ids"].to(device)  # [N, L]
            mask = tokens["attention_mask"].to(device)  # [N, L]
            itm = filter.itm_prob(embeds.index_select(0, which), ids, mask)  # [N]
            itc = (image_feat.index_select(0, which) * filter.text_feat(ids, mask)).sum(dim=-1)  # [N]
        for (_, _, r), p, c in zip(
            to_score, itm.float().cpu().tolist(), itc.float().cpu().tolist(), strict=True
        ):
            cols["itm_score"][r], cols["itc_score"][r] = p, c
            cols["decision"][r], cols["reason"][r] = decide(p, cfg.threshold)
    return _as_table(cols)


# ---------------------------------------------------------------------------------------------
# Ray actors: load once, call the plain functions.
# ---------------------------------------------------------------------------------------------


def _set_threads(cfg: CapFiltConfig) -> None:
    import torch

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)


class CaptionerActor:
    """Loads the captioner from a path (never an object-store reference) and captions chunks."""

    def __init__(self, ref: ModelRef, cfg: CapFiltConfig) -> None:
        from capfilt.model.tokenizer import load_tokenizer

        t0 = time.time()
        _set_threads(cfg)
        self.cfg = cfg
        self.model = load_model(ref, "captioner", cfg)
        self.tokenizer = load_tokenizer(ref.tokenizer)
        log.info("captioner %s ready in %.1f s", ref.model_id, time.time() - t0)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        return _map_chunks(batch, lambda images: caption_batch(self.model, self.tokenizer, images, self.cfg))


class FilterActor:
    """Loads the filter from a path and turns chunks of images into scored candidate rows."""

    def __init__(self, ref: ModelRef, cfg: CapFiltConfig) -> None:
        from capfilt.model.tokenizer import load_tokenizer

        t0 = time.time()
        _set_threads(cfg)
        self.cfg = cfg
        self.model = load_model(ref, "filter", cfg)
        self.tokenizer = load_tokenizer(ref.tokenizer)
        log.info("filter %s ready in %.1f s", ref.model_id, time.time() - t0)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return _candidates_of_chunks(
            batch, lambda images: score_batch(self.model, self.tokenizer, images, self.cfg)
        )


# ---------------------------------------------------------------------------------------------
# Chunks: one Ray row per model batch.
#
# A chunk is `batch_size` consecutive downloaded images of one shard (the last chunk of a shard
# may be shorter). Every model call gets exactly one chunk, so what a model computes for a shard
# does not depend on which other shards run beside it, on Ray's block sizes or on a resume:
# floating point included, a resumed shard gives the bytes an uninterrupted run gives.
# ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> np.ndarray:
    """A one-row object column holding ``value`` (a list, or an array for a tensor column)."""
    cell = np.empty(1, dtype=object)
    cell[0] = value
    return cell


def _plain(value: Any) -> Any:
    """numpy values from Ray's batches back to Python, so they pack into Arrow lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _pack(shard: str, chunk: int, images: dict[str, Any]) -> dict[str, np.ndarray]:
    row = {"input_shard": _cell(shard), "chunk": np.asarray([chunk], dtype=np.int64)}
    for key, values in images.items():
        if key.startswith("pixels_"):
            row[key] = _cell(np.asarray(values))  # [n, S, S, 3] uint8: a tensor cell
        elif key != "input_shard":
            row[key] = _cell([_plain(v) for v in values])
    return row


def _unpack(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Row ``i`` of a batch of chunks as a batch of images."""
    skip = ("input_shard", "chunk")
    return {
        k: (np.asarray(v[i]) if k.startswith("pixels_") else list(v[i]))
        for k, v in batch.items()
        if k not in skip
    }


def _concat(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}


def _map_chunks(batch: dict[str, Any], fn: Any) -> dict[str, np.ndarray]:
    """Apply a function on a batch of images to every chunk of a batch of chunks."""
    n = len(batch["chunk"])
    return _concat(
        [_pack(str(batch["input_shard"][i]), int(batch["chunk"][i]), fn(_unpack(batch, i))) for i in range(n)]
    )


def _candidates_of_chunks(batch: dict[str, Any], fn: Any) -> pa.Table:
    """Candidate rows of every chunk of a batch, each tagged with its input shard."""
    tables = []
    for i in range(len(batch["chunk"])):
        table = fn(_unpack(batch, i))
        tables.append(
            table.append_column("input_shard", pa.array([str(batch["input_shard"][i])] * table.num_rows))
        )
    return pa.concat_tables(tables) if tables else pa.schema(_CANDIDATE_FIELDS).empty_table()


def read_chunks(batch: dict[str, Any], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray task: stream each shard in ``batch`` (``path``, ``input_shard``) and yield its
    downloaded images (status success) as chunks of ``batch_size``, one Ray row per chunk. Rows
    that are not images never leave the file; the driver counts them."""
    columns = ["uid", "text", "status", "row", "image"]
    for path, shard in zip(batch["path"], batch["input_shard"], strict=True):
        pending: list[pa.Table] = []
        buffered = chunk = 0
        for record_batch in pq.ParquetFile(str(path)).iter_batches(
            batch_size=max(batch_size, 256), columns=columns
        ):
            part = pa.Table.from_batches([record_batch])
            part = part.filter(pc.equal(part.column("status"), S.SUCCESS)).drop(["status"])
            pending.append(part)
            buffered += part.num_rows
            while buffered >= batch_size:
                table = pa.concat_tables(pending)
                yield _pack(str(shard), chunk, table.slice(0, batch_size).to_pydict())
                pending, buffered, chunk = [table.slice(batch_size)], buffered - batch_size, chunk + 1
        if buffered:
            yield _pack(str(shard), chunk, pa.concat_tables(pending).to_pydict())


def preprocess_chunks(batch: dict[str, Any], image_sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """Ray task: decode and resize the images of each chunk (``preprocess_batch``)."""
    return _map_chunks(batch, lambda images: preprocess_batch(images, image_sizes))


def unscored_chunks(batch: dict[str, Any], cfg: CapFiltConfig) -> pa.Table:
    """Ray task: candidate rows of each chunk without a filter (``unscored_batch``)."""
    return _candidates_of_chunks(batch, lambda images: unscored_batch(images, cfg))


# ---------------------------------------------------------------------------------------------
# Writing one shard: candidates, cleaned, then stats (last: marks it done).
# ---------------------------------------------------------------------------------------------


@dataclass
class _RunIds:
    round: int
    captioner_id: str | None
    filter_id: str | None


def _candidate_table(parts: list[pa.Table], ids: _RunIds) -> pa.Table:
    """CANDIDATE rows of one shard in a fixed order: input row, web before synthetic, index."""
    table = pa.concat_tables(parts) if parts else pa.schema(_CANDIDATE_FIELDS).empty_table()
    if table.num_rows:
        # "web" > "synthetic" > "human": descending puts the web text first.
        table = table.sort_by(
            [("row", "ascending"), ("text_source", "descending"), ("text_index", "ascending")]
        )
    n = table.num_rows
    for name in ("itm_score", "itc_score"):  # NaN in flight (numpy), null on disk
        col = table.column(name).cast(pa.float32())
        table = table.set_column(
            table.schema.get_field_index(name), name, pc.if_else(pc.is_nan(col), None, col)
        )
    table = table.append_column("round", pa.array([ids.round] * n, pa.int32()))
    table = table.append_column("captioner_id", pa.array([ids.captioner_id] * n, pa.string()))
    table = table.append_column("filter_id", pa.array([ids.filter_id] * n, pa.string()))
    return S.conform(table, S.CANDIDATE)


def _cleaned_table(candidates: pa.Table, images: pa.Table, images_mode: str) -> pa.Table:
    """CLEANED rows: the kept candidates joined by uid with ``images`` (uid, url, image, image_ref)."""
    kept = candidates.filter(pc.equal(candidates.column("decision"), KEEP))
    index = {u: i for i, u in enumerate(images.column("uid").to_pylist())}
    missing = {u for u in kept.column("uid").to_pylist() if u not in index}
    if missing:
        raise StageFailed(f"{len(missing)} kept uids have no image row (e.g. {sorted(missing)[:3]})")
    src = images.take(pa.array([index[u] for u in kept.column("uid").to_pylist()], pa.int64()))
    n = kept.num_rows
    image = src.column("image") if images_mode == "include" else pa.nulls(n, pa.binary())
    cols = {f.name: kept.column(f.name) for f in S.CLEANED if f.name in kept.column_names}
    cols |= {"url": src.column("url"), "image": image, "image_ref": src.column("image_ref")}
    return S.conform(pa.table(cols), S.CLEANED)


def _input_images(path: Path, uids: set[str], images_mode: str) -> pa.Table:
    """uid, url, image and image_ref of the rows of a SAMPLE shard whose uid is in ``uids``."""
    columns = ["uid", "url"] + (["image"] if images_mode == "include" else [])
    table = pq.read_table(path, columns=columns)
    table = table.filter(pc.is_in(table.column("uid"), pa.array(sorted(uids), pa.string())))
    if "image" not in table.column_names:
        table = table.append_column("image", pa.nulls(table.num_rows, pa.binary()))
    return table.append_column("image_ref", pa.array([str(path)] * table.num_rows, pa.string()))


def _mean_parts(candidates: pa.Table) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"texts": {}, "kept": {}, "scored": {}, "itm_sum": {}, "itc_sum": {}}
    for row in candidates.select(["text_source", "decision", "itm_score", "itc_score"]).to_pylist():
        src = row["text_source"]
        out["texts"][src] = out["texts"].get(src, 0) + 1
        out["kept"][src] = out["kept"].get(src, 0) + (row["decision"] == KEEP)
        if row["itm_score"] is not None:
            out["scored"][src] = out["scored"].get(src, 0) + 1
            out["itm_sum"][src] = out["itm_sum"].get(src, 0.0) + row["itm_score"]
            out["itc_sum"][src] = out["itc_sum"].get(src, 0.0) + row["itc_score"]
    return out


def reason_key(reason: str) -> str:
    """A reason as counted: the detail after ": " (which image error) is left out."""
    return reason.split(": ", 1)[0]


def _shard_stats(
    name: str, kind: str, candidates: pa.Table, cleaned_rows: int, extra: dict[str, Any], threshold: float
) -> dict[str, Any]:
    parts = _mean_parts(candidates)
    reasons = Counter(reason_key(r) for r in candidates.column("reason").to_pylist() if r is not None)
    kept_uids = set(
        candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist()
    )
    all_uids = set(candidates.column("uid").to_pylist())
    return {
        "stage": STAGE,
        "kind": kind,
        "shard": name,
        "rows_out": cleaned_rows,
        "texts": parts["texts"],
        "kept": parts["kept"],
        "scored": parts["scored"],
        "itm_sum": parts["itm_sum"],
        "itc_sum": parts["itc_sum"],
        "images_with_texts": len(all_uids),
        "images_no_kept_text": len(all_uids - kept_uids),
        "reason_counts": dict(reasons.most_common()),
        "threshold": threshold,
        "attempts": 1,
        **extra,
    }


@dataclass
class _Plan:
    """One input shard: where it is and what it holds."""

    name: str
    path: Path
    rows_in: int
    images: int
    status_counts: dict[str, int]


def _write_web_shard(
    out: Path, plan: _Plan, parts: list[pa.Table], ids: _RunIds, cfg: CapFiltConfig, t0: float
) -> dict[str, Any]:
    candidates = _candidate_table(parts, ids)
    images = int(pc.sum(pc.equal(candidates.column("text_source"), "web")).as_py() or 0)
    if images != plan.images:
        raise StageFailed(f"shard {plan.name}: {plan.images} images in, {images} came back")
    kept_uids = set(
        candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist()
    )
    cleaned = _cleaned_table(candidates, _input_images(plan.path, kept_uids, cfg.images), cfg.images)
    write_parquet_atomic(out / CANDIDATES_DIR / f"{plan.name}.parquet", candidates)
    write_parquet_atomic(out / CLEANED_DIR / f"{plan.name}.parquet", cleaned)
    undecodable = pc.sum(
        pc.and_(
            pc.equal(candidates.column("text_source"), "web"),
            pc.starts_with(pc.fill_null(candidates.column("reason"), ""), REASON_UNDECODABLE),
        )
    ).as_py()
    extra = {
        "input": str(plan.path),
        "rows_in": plan.rows_in,
        "status_counts": plan.status_counts,
        "images": plan.images,
        "images_not_decodable": int(undecodable or 0),
        "wall_s": round(time.time() - t0, 3),
    }
    stats = _shard_stats(plan.name, "web", candidates, cleaned.num_rows, extra, cfg.threshold)
    write_json_atomic(out / STATS_DIR / f"{plan.name}.json", stats)  # last: the shard is done
    return stats


def _done(out: Path, name: str) -> bool:
    return all(
        p.is_file()
        for p in (
            out / STATS_DIR / f"{name}.json",
            out / CANDIDATES_DIR / f"{name}.parquet",
            out / CLEANED_DIR / f"{name}.parquet",
        )
    )


# ---------------------------------------------------------------------------------------------
# Human pairs: passed through, unscored.
# ---------------------------------------------------------------------------------------------


@dataclass
class _HumanShard:
    name: str
    pairs: pa.Table  # uid, text, text_index, url, image_ref, and image when read from shards


def _human_shards(human: Path, images_dir: Path | None, shard_size: int) -> list[_HumanShard]:
    """Human pairs from a COCO-Karpathy-style JSON list (``image``: path under ``images_dir``,
    ``caption``: str or list) or from a folder of SAMPLE shards (success rows)."""
    if human.is_dir():
        shards = []
        for f in _input_files(human, "--human"):
            t = pq.read_table(f, columns=["uid", "url", "text", "status", "image"])
            t = t.filter(pc.equal(t.column("status"), S.SUCCESS)).drop(["status"])
            t = t.append_column("text_index", pa.array([0] * t.num_rows, pa.int64()))
            t = t.append_column("image_ref", pa.array([str(f.resolve())] * t.num_rows, pa.string()))
            shards.append(_HumanShard(f"{HUMAN_PREFIX}{f.stem}", t))
        return shards
    if not human.is_file():
        raise ConfigError(
            f"--human {human} does not exist; pass a Karpathy-style JSON file or a shards folder"
        )
    try:
        entries = json.loads(human.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--human {human} is not JSON: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e for e in entries):
        raise ConfigError(f"--human {human}: expected a list of {{'image': ..., 'caption': ...}} entries")
    root = images_dir or human.parent
    cols: dict[str, list[Any]] = {"uid": [], "text": [], "text_index": [], "url": [], "image_ref": []}
    seen: Counter[str] = Counter()
    for e in entries:
        caps = e.get("caption", [])
        for cap in caps if isinstance(caps, list) else [caps]:
            image = str(e["image"])
            uid = S.make_uid("human", image, "")
            cols["uid"].append(uid)
            cols["text"].append(cap)
            cols["text_index"].append(seen[uid])
            cols["url"].append(None)
            cols["image_ref"].append(str((root / image).resolve()))
            seen[uid] += 1
    table = pa.table(
        cols,
        schema=pa.schema(
            [
                ("uid", pa.string()),
                ("text", pa.string()),
                ("text_index", pa.int64()),
                ("url", pa.string()),
                ("image_ref", pa.string()),
            ]
        ),
    )
    return [
        _HumanShard(f"{HUMAN_PREFIX}{i:05d}", table.slice(start, shard_size))
        for i, start in enumerate(range(0, table.num_rows, shard_size))
    ]


def _write_human_shard(out: Path, shard: _HumanShard, cfg: CapFiltConfig) -> dict[str, Any]:
    t0 = time.time()
    pairs = shard.pairs
    n = pairs.num_rows
    from_files = "image" not in pairs.column_names
    refs = pairs.column("image_ref").to_pylist()
    exists = [Path(r).is_file() for r in refs] if from_files else [True] * n
    decision, reason = [], []
    for text, ok, ref in zip(pairs.column("text").to_pylist(), exists, refs, strict=True):
        if not ok:
            decision.append(DROP)
            reason.append(f"{REASON_MISSING}: {ref}")
        elif not pre_caption(text, cfg.max_words):
            decision.append(DROP)
            reason.append(REASON_EMPTY)
        else:
            decision.append(KEEP)
            reason.append(REASON_HUMAN)
    uids, texts, idx = (
        pairs.column("uid").to_pylist(),
        pairs.column("text").to_pylist(),
        pairs.column("text_index"),
    )
    candidates = pa.table(
        {
            "uid": uids,
            "text_uid": [
                S.make_text_uid(u, "human", i, t or "")
                for u, i, t in zip(uids, idx.to_pylist(), texts, strict=True)
            ],
            "text": texts,
            "text_source": ["human"] * n,
            "text_index": idx,
            "itm_score": pa.nulls(n, pa.float32()),
            "itc_score": pa.nulls(n, pa.float32()),
            "decision": decision,
            "reason": reason,
            "round": pa.array([cfg.round] * n, pa.int32()),
            "captioner_id": pa.nulls(n, pa.string()),
            "filter_id": pa.nulls(n, pa.string()),
        }
    )
    candidates = S.conform(candidates, S.CANDIDATE)
    if from_files:
        want = cfg.images == "include"
        data = [
            Path(r).read_bytes() if want and ok and d == KEEP else None
            for r, ok, d in zip(refs, exists, decision, strict=True)
        ]
        images = pairs.append_column("image", pa.array(data, pa.binary()))
    else:
        images = pairs
    # One image row per uid: the join is by uid.
    _, first = np.unique(np.asarray(images.column("uid").to_pylist(), dtype=object), return_index=True)
    images = images.take(pa.array(np.sort(first))).select(["uid", "url", "image", "image_ref"])
    cleaned = _cleaned_table(candidates, images, cfg.images)
    write_parquet_atomic(out / CANDIDATES_DIR / f"{shard.name}.parquet", candidates)
    write_parquet_atomic(out / CLEANED_DIR / f"{shard.name}.parquet", cleaned)
    stats = _shard_stats(
        shard.name,
        "human",
        candidates,
        cleaned.num_rows,
        {"rows_in": n, "wall_s": round(time.time() - t0, 3)},
        cfg.threshold,
    )
    write_json_atomic(out / STATS_DIR / f"{shard.name}.json", stats)
    return stats


# ---------------------------------------------------------------------------------------------
# Summary.
# ---------------------------------------------------------------------------------------------


@dataclass
class CapFiltSummary:
    images: int  # downloaded images (success rows) of finished shards
    images_not_decodable: int
    images_no_kept_text: int  # web images none of whose texts was kept
    rows_not_images: dict[str, int]  # input rows skipped, by download status
    texts_considered: dict[str, int]  # by text_source
    kept: dict[str, int]
    mean_itm: dict[str, float | None]  # over scored texts, by source
    mean_itc: dict[str, float | None]
    reason_counts: dict[str, int]
    threshold: float
    shards_total: int
    shards_written: int = 0
    shards_skipped: int = 0
    shards_pending: int = 0
    human_pairs: int = 0
    wall_s: float = 0.0
    out_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        def by_source(d: dict[str, Any], fmt: str = "{}") -> str:
            return (
                ", ".join(f"{k} {fmt.format(v) if v is not None else '-'}" for k, v in sorted(d.items()))
                or "-"
            )

        total_t, total_k = sum(self.texts_considered.values()), sum(self.kept.values())
        out = [
            f"images:             {self.images} ({self.images_not_decodable} not decodable)",
            f"not images:         {sum(self.rows_not_images.values())} input rows "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.rows_not_images.items())) or 'none'})",
            f"texts considered:   {total_t} ({by_source(self.texts_considered)})",
            f"kept:               {total_k} ({by_source(self.kept)}) at p(match) >= {self.threshold}",
            f"mean ITM p(match):  {by_source(self.mean_itm, '{:.3f}')}",
            f"mean ITC cosine:    {by_source(self.mean_itc, '{:.3f}')}",
            f"images, none kept:  {self.images_no_kept_text}",
        ]
        if self.human_pairs:
            out.append(f"human pairs:        {self.human_pairs}")
        drops = [(r, c) for r, c in self.reason_counts.items() if r not in (REASON_NO_FILTER, REASON_HUMAN)]
        if drops:
            out.append("drop reasons:")
            out.extend(f"  {count:>7}  {reason}" for reason, count in drops[:6])
        out.append(
            f"shards:             {self.shards_total} total, {self.shards_written} written now, "
            f"{self.shards_skipped} already done, {self.shards_pending} left for a rerun"
        )
        out.append(f"wall time:          {self.wall_s:.1f} s")
        out.append(f"cleaned shards:     {Path(self.out_dir) / CLEANED_DIR}")
        return out


def summarize(out: str | Path, threshold: float, shards_total: int = 0) -> CapFiltSummary:
    """Add up every finished shard's stats under ``out``."""
    out = Path(out)
    stats = (
        [read_json(p) for p in sorted((out / STATS_DIR).glob("*.json"))] if (out / STATS_DIR).exists() else []
    )
    sums: dict[str, Counter[str]] = defaultdict(Counter)
    fsums: dict[str, defaultdict[str, float]] = {"itm_sum": defaultdict(float), "itc_sum": defaultdict(float)}
    images = undecodable = no_kept = human = 0
    for st in stats:
        for key in ("texts", "kept", "scored", "reason_counts"):
            sums[key].update(st[key])
        for key, acc in fsums.items():
            for src, v in st[key].items():
                acc[src] += v
        if st["kind"] == "web":
            sums["status"].update({k: v for k, v in st["status_counts"].items() if k != S.SUCCESS})
            images += st["images"]
            undecodable += st["images_not_decodable"]
            no_kept += st["images_no_kept_text"]
        else:
            human += st["rows_in"]
    scored = sums["scored"]
    return CapFiltSummary(
        images=images,
        images_not_decodable=undecodable,
        images_no_kept_text=no_kept,
        rows_not_images=dict(sorted(sums["status"].items())),
        texts_considered=dict(sorted(sums["texts"].items())),
        kept=dict(sorted(sums["kept"].items())),
        mean_itm={s: (fsums["itm_sum"][s] / scored[s] if scored[s] else None) for s in sorted(sums["texts"])},
        mean_itc={s: (fsums["itc_sum"][s] / scored[s] if scored[s] else None) for s in sorted(sums["texts"])},
        reason_counts=dict(sums["reason_counts"].most_common()),
        threshold=threshold,
        shards_total=shards_total or len(stats),
        human_pairs=human,
        out_dir=str(out),
    )


# ---------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------


def _input_files(data: Path, flag: str = "--data") -> list[Path]:
    """The shard files of a folder, skipping bookkeeping (``_*``) and temp (``.*``) names."""
    if not data.is_dir():
        raise ConfigError(f"{flag} {data} is not a folder; pass the output folder of `capfilt download`")
    files = sorted(p for p in data.glob("*.parquet") if not p.name.startswith(("_", ".")))
    if not files:
        raise ConfigError(
            f"{flag} {data} holds no .parquet shards; pass the output folder of `capfilt download`"
        )
    return files


def _plan(files: list[Path]) -> list[_Plan]:
    plans = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in _REQUIRED_INPUT if c not in names]
        if missing:
            raise ConfigError(
                f"input shard {f} lacks column(s) {missing}; CapFilt reads SAMPLE shards ({list(_REQUIRED_INPUT)})"
            )
        status = Counter(pq.read_table(f, columns=["status"]).column("status").to_pylist())
        plans.append(
            _Plan(
                f.stem,
                f.resolve(),
                sum(status.values()),
                status.get(S.SUCCESS, 0),
                dict(sorted(status.items())),
            )
        )
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError("input shards must have distinct file names")
    return plans


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.exists():
        old = read_json(path)
        if old.get("stage") != STAGE:
            raise ConfigError(f"{out} holds the output of stage {old.get('stage')!r}; pass a new --out")
        old_fp, new_fp = old["fingerprint"], manifest["fingerprint"]
        diff = sorted(k for k in new_fp if k != "settings" and old_fp.get(k) != new_fp[k])
        diff += sorted(k for k in new_fp["settings"] if old_fp["settings"].get(k) != new_fp["settings"][k])
        if diff == ["threshold"]:
            was = old_fp["settings"]["threshold"]
            raise ConfigError(
                f"{out} was made with threshold {was}: pass --threshold {was} to resume it, or change it "
                f"with `capfilt rethreshold --run {out} --threshold T`"
            )
        if diff:
            raise ConfigError(
                f"{out} holds a CapFilt run with other inputs, models or settings (differs in {diff}); "
                "pass a new --out, or delete the folder to start again"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no CapFilt run; pass a new or empty --out")
    write_json_atomic(path, manifest)


def _gpus_per_actor(cfg: CapFiltConfig, actors: int) -> float:
    import ray

    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return 0.0 if gpus <= 0 else min(1.0, gpus / actors)


def _dataset(
    plans: list[_Plan], captioner: ModelRef | None, filter: ModelRef | None, cfg: CapFiltConfig
) -> Any:
    """shards -> read (tasks) -> decode (tasks) -> captioner actors -> filter actors, one chunk per block."""
    import ray

    sizes = sorted({m.image_size for m in (captioner, filter) if m is not None})
    shards = [{"path": str(p.path), "input_shard": p.name} for p in plans]
    ds: Any = ray.data.from_items(shards, override_num_blocks=len(shards))  # one read task per shard
    # Read and decode run in the same task (Ray fuses them), one task per shard, streaming.
    ds = ds.map_batches(
        read_chunks, fn_kwargs={"batch_size": cfg.batch_size}, batch_size=1, num_cpus=cfg.preprocess_cpus
    )
    ds = ds.map_batches(
        preprocess_chunks, fn_kwargs={"image_sizes": sizes}, batch_size=1, num_cpus=cfg.preprocess_cpus
    )
    # One chunk per block, so a model batch moves on to the next model as soon as it is done
    # rather than waiting for the rest of its shard.
    ds = ds.repartition(target_num_rows_per_block=1)
    actors = (cfg.captioner_actors if captioner else 0) + (cfg.filter_actors if filter else 0)
    gpus = _gpus_per_actor(cfg, actors)
    resources: dict[str, float] = {"num_cpus": cfg.cpus_per_actor} | ({"num_gpus": gpus} if gpus else {})
    if captioner is not None:
        ds = ds.map_batches(
            CaptionerActor,
            fn_constructor_kwargs={"ref": captioner, "cfg": cfg},
            compute=ray.data.ActorPoolStrategy(size=cfg.captioner_actors),
            batch_size=1,  # one chunk: cfg.batch_size images
            **resources,
        )
    if filter is not None:
        ds = ds.map_batches(
            FilterActor,
            fn_constructor_kwargs={"ref": filter, "cfg": cfg},
            compute=ray.data.ActorPoolStrategy(size=cfg.filter_actors),
            batch_size=1,
            **resources,
        )
    else:
        ds = ds.map_batches(
            unscored_chunks, fn_kwargs={"cfg": cfg}, batch_size=1, num_cpus=cfg.preprocess_cpus
        )
    return ds


@dataclass
class _Tally:
    """Candidate rows of one shard as they come back, in any order and any split: an image is
    complete with its web row and, when its image decoded and a captioner ran, its k captions."""

    k: int
    parts: list[pa.Table] = field(default_factory=list)
    images: int = 0
    rows: int = 0
    expected: int = 0

    def add(self, part: pa.Table) -> bool:
        """Add rows; True when every image seen so far has all its rows."""
        self.parts.append(part)
        self.rows += part.num_rows
        web = part.filter(pc.equal(part.column("text_source"), "web"))
        decoded = [not (r or "").startswith(REASON_UNDECODABLE) for r in web.column("reason").to_pylist()]
        self.images += web.num_rows
        self.expected += web.num_rows + self.k * sum(decoded)
        return self.rows == self.expected


def _by_shard(batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    shards = batch.column("input_shard")
    for name in pc.unique(shards).to_pylist():
        yield name, batch.filter(pc.equal(shards, name)).drop(["input_shard"])


def run_capfilt(
    data: str | Path,
    out: str | Path,
    captioner: str | Path | None = None,
    filter: str | Path | None = None,
    cfg: CapFiltConfig | None = None,
    ray_address: str | None = None,
    *,
    tokenizer: str | Path | None = None,
    arch: str | None = None,
    human: str | Path | None = None,
    human_images: str | Path | None = None,
    max_shards: int | None = None,
) -> CapFiltSummary:
    """Caption and/or filter every downloaded image under ``data`` into ``out``, resuming a run
    that stopped: finished shards are skipped, the rest give the rows an uninterrupted run gives.

    Either model may be left out: captioner only writes captions for every image (kept unscored);
    filter only scores the existing texts. ``tokenizer`` overrides the one found beside the
    models; ``arch`` names the architecture of an original BLIP .pth. ``human`` (a Karpathy-style
    JSON with ``human_images``, or a SAMPLE shards folder) adds human pairs, passed through.
    ``max_shards`` stops after that many input shards (a trial run; rerun to finish).
    """
    from capfilt.core.cluster import ensure_ray

    cfg = cfg or CapFiltConfig()
    t0 = time.time()
    if captioner is None and filter is None:
        raise ConfigError("pass --captioner, --filter or both: with neither there is nothing to do")
    data, out = Path(data), Path(out)
    plans = _plan(_input_files(data))
    cap_ref = resolve_model(captioner, "captioner", tokenizer, arch) if captioner is not None else None
    filt_ref = resolve_model(filter, "filter", tokenizer, arch) if filter is not None else None
    humans = (
        _human_shards(Path(human), Path(human_images) if human_images else None, cfg.human_shard_size)
        if human
        else []
    )
    ids = _RunIds(cfg.round, cap_ref.model_id if cap_ref else None, filt_ref.model_id if filt_ref else None)
    manifest = {
        "stage": STAGE,
        "fingerprint": {
            "data": str(data.resolve()),
            "shards": [p.name for p in plans],
            "captioner_id": ids.captioner_id,
            "filter_id": ids.filter_id,
            "human": str(Path(human).resolve()) if human else None,
            "settings": cfg.output_settings(),
        },
        "inputs": {p.name: str(p.path) for p in plans},
        "captioner": cap_ref.__dict__ if cap_ref else None,
        "filter": filt_ref.__dict__ if filt_ref else None,
        "config": cfg.model_dump(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)

    done = {p.name for p in plans if _done(out, p.name)}
    todo = [p for p in plans if p.name not in done][:max_shards]
    log.info("%d input shards (%d already done, %d to run)", len(plans), len(done), len(todo))
    for h in humans:
        if not _done(out, h.name):
            with log_context(shard=h.name):
                _write_human_shard(out, h, cfg)
    written = 0
    empty = [p for p in todo if p.images == 0]
    for p in empty:  # nothing for the models: write the (empty) outputs now
        _write_web_shard(out, p, [], ids, cfg, t0)
        written += 1
    busy = {p.name: p for p in todo if p.images > 0}
    if busy:
        ensure_ray(ray_address)
        ds = _dataset(list(busy.values()), cap_ref, filt_ref, cfg)
        tally = {name: _Tally(cfg.k if cap_ref else 0) for name in busy}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for name, part in _by_shard(batch):
                if tally[name].add(part) and tally[name].images == busy[name].images:
                    with log_context(shard=name):
                        st = _write_web_shard(out, busy[name], tally.pop(name).parts, ids, cfg, t0)
                        written += 1
                        log.info(
                            "shard %s done: %d images, %d kept texts", name, st["images"], st["rows_out"]
                        )
        log.debug("Ray Data stats:\n%s", ds.stats())
        unfinished = sorted(n for n in busy if not _done(out, n))
        if unfinished:
            raise StageFailed(f"shard(s) {unfinished} did not get all their images back; rerun to retry them")

    summary = summarize(out, cfg.threshold, len(plans) + len(humans))
    summary.shards_written = written
    summary.shards_skipped = len(done)
    summary.shards_pending = len(plans) - len(done) - len(todo)
    summary.wall_s = time.time() - t0
    write_json_atomic(out / SUMMARY, summary.to_json())
    return summary


# ---------------------------------------------------------------------------------------------
# Re-thresholding from the candidates table: no model runs.
# ---------------------------------------------------------------------------------------------


def redecide(candidates: pa.Table, threshold: float) -> pa.Table:
    """New decisions for the scored rows of a CANDIDATE table; unscored rows keep theirs."""
    decision, reason = [], []
    for itm, d, r in zip(
        candidates.column("itm_score").to_pylist(),
        candidates.column("decision").to_pylist(),
        candidates.column("reason").to_pylist(),
        strict=True,
    ):
        new_d, new_r = (d, r) if itm is None else decide(itm, threshold)
        decision.append(new_d)
        reason.append(new_r)
    t = candidates.set_column(
        candidates.schema.get_field_index("decision"), "decision", pa.array(decision, pa.string())
    )
    return t.set_column(t.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))


def rethreshold(run: str | Path, threshold: float) -> CapFiltSummary:
    """Re-decide every scored text of a finished run at ``threshold`` and rewrite its cleaned
    shards, candidates and stats. Images come from the download shards the manifest names (they
    must still be there when images are included). Interrupted, it is safe to run again."""
    run = Path(run)
    t0 = time.time()
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    path = run / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{run} holds no CapFilt run ({MANIFEST} missing); pass the --out of `capfilt capfilt`"
        )
    manifest = read_json(path)
    if manifest.get("stage") != STAGE:
        raise ConfigError(f"{run} holds the output of stage {manifest.get('stage')!r}, not a CapFilt run")
    cfg = CapFiltConfig.model_validate(manifest["config"] | {"threshold": threshold})
    try:  # shard names become file names below: none may lead out of the run folder
        inputs = {safe_component(k, "shard name"): Path(v) for k, v in manifest["inputs"].items()}
    except ValueError as err:
        raise ConfigError(f"{path} is damaged: {err}") from err
    web = [n for n in inputs if _done(run, n)]
    if cfg.images == "include":
        gone = sorted(str(inputs[n]) for n in web if not inputs[n].is_file())
        if gone:
            raise ConfigError(
                f"the download shards this run read are gone ({gone[:3]}); rethreshold needs their images"
            )
    # The intent first: a rerun after a crash finishes the shards still at the old threshold.
    manifest["config"]["threshold"] = threshold
    manifest["fingerprint"]["settings"]["threshold"] = threshold
    write_json_atomic(path, manifest)
    changed = 0
    for name in web:
        stats_file = run / STATS_DIR / f"{name}.json"
        old = read_json(stats_file)
        if old["threshold"] == threshold:
            continue
        candidates = redecide(
            pq.read_table(run / CANDIDATES_DIR / f"{name}.parquet", schema=S.CANDIDATE), threshold
        )
        kept = set(candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist())
        cleaned = _cleaned_table(candidates, _input_images(inputs[name], kept, cfg.images), cfg.images)
        write_parquet_atomic(run / CANDIDATES_DIR / f"{name}.parquet", candidates)
        write_parquet_atomic(run / CLEANED_DIR / f"{name}.parquet", cleaned)
        keep_keys = ("input", "rows_in", "status_counts", "images", "images_not_decodable", "wall_s")
        stats = _shard_stats(
            name, "web", candidates, cleaned.num_rows, {k: old[k] for k in keep_keys}, threshold
        )
        write_json_atomic(stats_file, stats)
        changed += 1
    for human_stats in sorted((run / STATS_DIR).glob(f"{HUMAN_PREFIX}*.json")):
        st = read_json(human_stats)
        if st["threshold"] != threshold:  # human pairs do not depend on it; keep the record consistent
            write_json_atomic(human_stats, st | {"threshold": threshold})
    summary = summarize(run, threshold)
    summary.shards_written = changed
    summary.shards_skipped = len(web) - changed
    summary.wall_s = time.time() - t0
    write_json_atomic(run / SUMMARY, summary.to_json())
    log.info("rethresholded %d shard(s) of %s at %.3f", changed, run, threshold)
    return summary


def read_cleaned(run: str | Path) -> pa.Table:
    """Every cleaned row of a run (web shards, then human), in the CLEANED schema."""
    files = sorted((Path(run) / CLEANED_DIR).glob("*.parquet"))
    if not files:
        return S.CLEANED.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=S.CLEANED) for f in files])


def read_candidates(run: str | Path) -> pa.Table:
    """Every candidate row of a run, in the CANDIDATE schema."""
    files = sorted((Path(run) / CANDIDATES_DIR).glob("*.parquet"))
    if not files:
        return S.CANDIDATE.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=S.CANDIDATE) for f in files])
