"""Evaluation: zero-shot retrieval and captioning on a test split, and CapFilt's filter and noise against ground truth.

Three groups of functions, each usable on its own:

- **retrieval** by BLIP's protocol: ITC features for every image and text, exact top-k by cosine
  with faiss in both directions, then ITM re-rank of the top k with score = ITM match logit + ITC
  similarity; R@1/5/10 text->image and image->text, in percent;
- **captioning**: captions for the test images (beam 3, max 20, min 5 as BLIP's eval), BLEU-4 and
  CIDEr with pycocoevalcap's scorers (in percent, as the paper prints them), and the shapes world
  checker's share of true captions;
- **CapFilt quality** against a shapes world's labels: the filter's precision, recall and ROC-AUC,
  and the noise ratio (share of pairs whose text is false of its image) before and after CapFilt.

Rates and shares (precision, recall, ROC-AUC, noise ratio, checker correctness) are fractions in
[0, 1]; recalls, BLEU and CIDEr are percentages. Every result is a JSON-ready dict.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from capfilt.core.errors import ConfigError
from capfilt.core.schema import SUCCESS
from capfilt.core.text import pre_caption
from capfilt.world import check_caption

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med
    from capfilt.world import Scene, World

__all__ = [
    "RECALL_AT",
    "EvalConfig",
    "EvalSplit",
    "caption_scores",
    "checker_correct_rate",
    "encode_images",
    "encode_texts",
    "evaluate_capfilt",
    "evaluate_captioning",
    "evaluate_model",
    "evaluate_retrieval",
    "faiss_topk",
    "filter_quality",
    "first_positive_ranks",
    "generate_captions",
    "itm_match_logits",
    "label_candidates",
    "load_split",
    "load_world_test_split",
    "noise_ratio",
    "recall_at",
    "retrieval_from_candidates",
    "retrieval_metrics",
    "roc_auc",
    "web_truth",
    "write_results",
]

log = logging.getLogger(__name__)

RECALL_AT: tuple[int, ...] = (1, 5, 10)


# ============================================================================== configuration


class EvalConfig(BaseModel):
    """How to evaluate a model on a test split. Defaults follow BLIP's evaluation, except ``k``
    (BLIP: 256 on COCO, 128 on Flickr), which suits test sets of a few hundred images."""

    model_config = ConfigDict(extra="forbid")

    retrieval: bool = True
    captioning: bool = True
    k: int = Field(16, ge=1)  # ITC candidates re-ranked by ITM, per query, in each direction
    batch_size: int = Field(64, ge=1)  # images or texts per forward pass
    itm_batch_size: int = Field(256, ge=1)  # (image, text) pairs per ITM forward pass
    max_text_length: int = Field(35, ge=2)  # tokens, [CLS] and [SEP] included (BLIP's retrieval eval)
    max_words: int = Field(30, ge=1)  # pre_caption's truncation of the test texts
    # Captioning, as BLIP's caption eval: beam search 3, at most 20 and at least 5 tokens, the
    # lengths counting [DEC] and the prompt. The prompt must be the one the model was trained with.
    prompt: str = "a picture of "
    num_beams: int = Field(3, ge=1)
    sample: bool = False
    max_length: int = Field(20, ge=2)
    min_length: int = Field(5, ge=0)
    device: str | None = None  # None: "cuda" when available, else "cpu"
    n_examples: int = Field(8, ge=0)  # generated captions kept in the results for reading

    @field_validator("k")
    @classmethod
    def _k_covers_recall(cls, v: int) -> int:
        if v < max(RECALL_AT):
            raise ValueError(
                f"k={v} re-ranks fewer candidates than R@{max(RECALL_AT)} looks at; use k >= {max(RECALL_AT)} "
                "(BLIP: 256 on COCO, 128 on Flickr)"
            )
        return v


# ================================================================================= test split


@dataclass(frozen=True)
class EvalSplit:
    """A test split in BLIP's karpathy_test.json form: images, each with its reference captions."""

    image_paths: tuple[Path, ...]
    captions: tuple[tuple[str, ...], ...]  # the references as written, per image

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.captions):
            raise ValueError(f"{len(self.image_paths)} images but {len(self.captions)} caption lists")
        empty = [str(p) for p, caps in zip(self.image_paths, self.captions, strict=True) if not caps]
        if empty:
            raise ValueError(f"{len(empty)} test image(s) have no caption, e.g. {empty[:3]}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def texts(self, max_words: int | None = 30) -> list[str]:
        """Every reference, cleaned with pre_caption, image by image (the retrieval gallery)."""
        return [pre_caption(c, max_words) for caps in self.captions for c in caps]

    def txt2img(self) -> np.ndarray:
        """[N_txt] int64: the image of each text in ``texts()`` order."""
        return np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions]).astype(np.int64)

    def images(self) -> _LazyImages:
        """The images as a sequence that decodes on access, so a large split is never all in memory.
        Fails now if any file is missing."""
        missing = [str(p) for p in self.image_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} test image(s) not found, e.g. {missing[:3]}; check the split's image root"
            )
        return _LazyImages(self.image_paths)


class _LazyImages(Sequence["Image.Image"]):
    """Image files decoded to RGB when indexed; a slice is another lazy sequence."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> Image.Image: ...
    @overload
    def __getitem__(self, i: slice) -> _LazyImages: ...
    def __getitem__(self, i: int | slice) -> Image.Image | _LazyImages:
        if isinstance(i, slice):
            return _LazyImages(self.paths[i])
        from capfilt.model.transforms import decode_image

        return decode_image(self.paths[i].read_bytes())


def load_split(annotation: str | Path, image_root: str | Path | None = None) -> EvalSplit:
    """Read a karpathy_test.json-style list of ``{"image": path, "caption": [str, ...]}``; image
    paths are relative to ``image_root`` (default: the annotation file's folder)."""
    path = Path(annotation)
    root = Path(image_root) if image_root is not None else path.parent
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path} must hold a non-empty JSON list of {{'image', 'caption'}} objects")
    paths, captions = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "caption" not in item:
            raise ConfigError(f"{path}: item {i} lacks 'image' or 'caption': {str(item)[:200]}")
        caps = item["caption"]
        paths.append(root / item["image"])
        captions.append(tuple([caps] if isinstance(caps, str) else caps))
    return EvalSplit(tuple(paths), tuple(captions))


def load_world_test_split(world_root: str | Path) -> EvalSplit:
    """The shapes world's test split (human/karpathy_test.json, paths relative to the world root)."""
    root = Path(world_root)
    return load_split(root / "human" / "karpathy_test.json", root)


# ================================================================================== encoding


def _device(name: str | None) -> torch.device:
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def encode_images(
    med: Med, images: Sequence[Image.Image], batch_size: int = 64, device: str | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Images -> (image_embeds [N, 1+P, Dv] on the model's device, L2-normalised ITC features [N, E])."""
    import torch

    from capfilt.model.transforms import test_transform

    transform = test_transform(med.config.vision.image_size)
    dev = _device(device)
    embeds, feats = [], []
    with torch.inference_mode():
        for sl in tqdm(
            list(_chunks(len(images), batch_size)), desc="encode images", leave=False, disable=None
        ):
            pixels = torch.stack([transform(im) for im in images[sl]]).to(dev)  # [b, 3, H, W]
            emb = med.encode_image(pixels)  # [b, 1+P, Dv]
            embeds.append(emb)
            feats.append(med.image_feat(emb).float().cpu())  # [b, E]
    return torch.cat(embeds), torch.cat(feats).numpy()


def encode_texts(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 35,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Texts (already cleaned) -> (input_ids [N, L], attention_mask [N, L], ITC features [N, E]).

    The ids are padded to the longest text of the whole set, so rows can be gathered freely for ITM.
    """
    import torch

    from capfilt.model.tokenizer import tokenize

    dev = _device(device)
    tokens = tokenize(tokenizer, list(texts), max_length)
    ids, mask = tokens["input_ids"].to(dev), tokens["attention_mask"].to(dev)  # [N, L]
    feats = []
    with torch.inference_mode():
        for sl in tqdm(list(_chunks(len(texts), batch_size)), desc="encode texts", leave=False, disable=None):
            length = int(mask[sl].sum(dim=1).max())  # drop padding columns this batch does not need
            feats.append(med.text_feat(ids[sl, :length], mask[sl, :length]).float().cpu())  # [b, E]
    return ids, mask, torch.cat(feats).numpy()


# ================================================================================= retrieval


def faiss_topk(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k keys by inner product for each query: (similarities [Nq, k], indices [Nq, k]),
    best first. Features should be L2-normalised, so the inner product is the cosine.

    Uses a GPU index when the installed faiss has GPUs, else the CPU one (faiss-cpu and faiss-gpu
    install the same module; a faiss-gpu wheel imports on a machine without GPUs).
    """
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "retrieval evaluation needs faiss: pip install 'capfilt[cpu]' (faiss-cpu) or 'capfilt[gpu]' (faiss-gpu)"
        ) from err
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"features must be [N, E] of one width, got {queries.shape} and {keys.shape}")
    k = min(k, keys.shape[0])
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    index: Any = faiss.IndexFlatIP(keys.shape[1])
    resources = None  # must outlive the GPU index
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
        try:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
        except Exception as err:  # a CPU index gives the same (exact) answer
            log.warning("faiss GPU index unavailable (%s); searching on CPU", err)
            index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    sims, idx = index.search(queries, k)
    del resources
    return sims, idx.astype(np.int64)


def itm_match_logits(
    med: Med,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pairs: np.ndarray,
    batch_size: int = 256,
) -> np.ndarray:
    """ITM match logit (column 1 of the ITM head, as BLIP's eval) for (image, text) index pairs [P, 2]."""
    import torch

    out = np.empty(len(pairs), dtype=np.float32)
    dev = image_embeds.device
    # Pairs in order of text length, so each batch is cut to little more than its texts need.
    lengths = attention_mask.sum(dim=1).cpu().numpy()[pairs[:, 1]]
    order = np.argsort(lengths, kind="stable")
    with torch.inference_mode():
        for sl in tqdm(list(_chunks(len(pairs), batch_size)), desc="ITM re-rank", leave=False, disable=None):
            batch = pairs[order[sl]]
            img = torch.as_tensor(batch[:, 0], device=dev)
            txt = torch.as_tensor(batch[:, 1], device=dev)
            length = int(lengths[order[sl]].max())
            mask = attention_mask[txt, :length]  # [b, l]
            logits = med.itm_logits(image_embeds[img], input_ids[txt, :length], mask)  # [b, 2]
            out[order[sl]] = logits[:, 1].float().cpu().numpy()
    return out


def first_positive_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best-scoring positive among its candidates; inf when none of the
    candidates is a positive.

    ``scores`` and ``positive`` are [Nq, K] (candidate scores, and whether each candidate is a right
    answer). Ties count against the query: a negative scoring the same as the best positive ranks
    above it, so a model that scores everything alike gets no credit from the candidates' order.
    """
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be the same [Nq, K]")
    best = np.where(positive, scores, -np.inf).max(axis=1, initial=-np.inf)  # [Nq]
    above = (~positive & (scores >= best[:, None])).sum(axis=1).astype(np.float64)  # [Nq]
    return np.where(positive.any(axis=1), above, np.inf)


def recall_at(ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """R@k in percent: share of queries whose first right answer ranks within the top k."""
    if len(ranks) == 0:
        raise ValueError("recall of an empty query set")
    return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def _metrics(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray) -> dict[str, float]:
    t2i, i2t = recall_at(t2i_ranks), recall_at(i2t_ranks)
    out = {f"r{k}_t2i": v for k, v in t2i.items()} | {f"r{k}_i2t": v for k, v in i2t.items()}
    out["r1_mean"] = (t2i[1] + i2t[1]) / 2
    out["r_mean"] = float(np.mean([*t2i.values(), *i2t.values()]))
    return out


def retrieval_from_candidates(
    i2t_idx: np.ndarray,
    i2t_scores: np.ndarray,
    t2i_idx: np.ndarray,
    t2i_scores: np.ndarray,
    txt2img: np.ndarray,
) -> dict[str, float]:
    """R@1/5/10 both ways (percent) from each query's candidates and their scores.

    ``i2t_idx`` [N_img, K]: text candidates of each image; ``t2i_idx`` [N_txt, K]: image candidates of
    each text; ``txt2img`` [N_txt]: each text's image. A text's right answer is its own image; an
    image's right answers are all of its texts. A right answer outside the candidates is a miss.
    """
    txt2img = np.asarray(txt2img)
    n_img = i2t_idx.shape[0]
    if t2i_idx.shape[0] != len(txt2img):
        raise ValueError(f"{t2i_idx.shape[0]} text queries but txt2img has {len(txt2img)} texts")
    t2i_pos = t2i_idx == txt2img[:, None]  # [N_txt, K]
    i2t_pos = txt2img[i2t_idx] == np.arange(n_img)[:, None]  # [N_img, K]
    return _metrics(first_positive_ranks(t2i_scores, t2i_pos), first_positive_ranks(i2t_scores, i2t_pos))


def retrieval_metrics(score_i2t: np.ndarray, txt2img: Sequence[int] | np.ndarray) -> dict[str, float]:
    """R@1/5/10 both ways (percent) from a dense image x text score matrix [N_img, N_txt]."""
    score_i2t = np.asarray(score_i2t, dtype=np.float64)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_img, n_txt = score_i2t.shape
    if len(txt2img) != n_txt:
        raise ValueError(f"score matrix has {n_txt} texts but txt2img has {len(txt2img)}")
    i2t_idx = np.broadcast_to(np.arange(n_txt), (n_img, n_txt))
    t2i_idx = np.broadcast_to(np.arange(n_img), (n_txt, n_img))
    return retrieval_from_candidates(i2t_idx, score_i2t, t2i_idx, score_i2t.T, txt2img)


def evaluate_retrieval(
    med: Med,
    image_embeds: torch.Tensor,
    image_feats: np.ndarray,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_feats: np.ndarray,
    txt2img: np.ndarray,
    k: int = 16,
    itm_batch_size: int = 256,
) -> dict[str, Any]:
    """BLIP's retrieval protocol on encoded images and texts: ITC top-k (faiss) in both directions,
    ITM re-rank with match logit + ITC similarity, then R@1/5/10. ``itc`` holds the recalls of the
    ITC ranking alone, before the re-rank."""
    med.require("itc", "itm")
    n_img, n_txt = len(image_feats), len(text_feats)
    i2t_sim, i2t_idx = faiss_topk(image_feats, text_feats, k)  # [N_img, k]
    t2i_sim, t2i_idx = faiss_topk(text_feats, image_feats, k)  # [N_txt, k]
    itc = retrieval_from_candidates(i2t_idx, i2t_sim, t2i_idx, t2i_sim, txt2img)

    # Each (image, text) pair is scored once, even when it is a candidate in both directions.
    i2t_pairs = np.stack([np.repeat(np.arange(n_img), i2t_idx.shape[1]), i2t_idx.ravel()], axis=1)
    t2i_pairs = np.stack([t2i_idx.ravel(), np.repeat(np.arange(n_txt), t2i_idx.shape[1])], axis=1)
    pair_keys = np.concatenate([i2t_pairs, t2i_pairs])  # [P, 2] (image, text)
    unique, inverse = np.unique(pair_keys[:, 0] * n_txt + pair_keys[:, 1], return_inverse=True)
    pairs = np.stack([unique // n_txt, unique % n_txt], axis=1)
    logits = itm_match_logits(med, image_embeds, input_ids, attention_mask, pairs, itm_batch_size)
    pair_logit = logits[inverse.ravel()]
    i2t_scores = pair_logit[: len(i2t_pairs)].reshape(i2t_idx.shape) + i2t_sim
    t2i_scores = pair_logit[len(i2t_pairs) :].reshape(t2i_idx.shape) + t2i_sim

    result: dict[str, Any] = retrieval_from_candidates(i2t_idx, i2t_scores, t2i_idx, t2i_scores, txt2img)
    result["itc"] = itc
    result |= {"k": int(i2t_idx.shape[1]), "n_images": n_img, "n_texts": n_txt, "itm_pairs": len(pairs)}
    return result


# ================================================================================ captioning


def generate_captions(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    config: EvalConfig | None = None,
) -> list[str]:
    """One caption per image, prompt removed, as the tokenizer decodes it (not yet cleaned)."""
    import torch

    from capfilt.model.transforms import test_transform

    cfg = config or EvalConfig()
    med.require("lm")
    dev = _device(cfg.device)
    transform = test_transform(med.config.vision.image_size)
    prompt_ids = None
    if cfg.prompt:
        prompt_ids = torch.tensor(
            tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"], dtype=torch.long
        )
    start = 1 + (0 if prompt_ids is None else len(prompt_ids))  # [DEC] + prompt precede the caption
    captions: list[str] = []
    for sl in tqdm(
        list(_chunks(len(images), cfg.batch_size)), desc="generate captions", leave=False, disable=None
    ):
        pixels = torch.stack([transform(im) for im in images[sl]]).to(dev)  # [b, 3, H, W]
        ids = med.generate(
            pixels,
            prompt_ids,
            sample=cfg.sample,
            num_beams=cfg.num_beams,
            max_length=cfg.max_length,
            min_length=cfg.min_length,
        )  # [b, <= max_length]
        captions += tokenizer.batch_decode(ids[:, start:].cpu(), skip_special_tokens=True)
    return [c.strip() for c in captions]


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (CIDEr-D, as in COCO's toolkit), both x100 as the BLIP paper prints them.

    Texts are cleaned with pre_caption (lowercase, BLIP's punctuation removed) instead of the
    toolkit's Java PTB tokenizer. CIDEr's IDF comes from the references of this very set, so score
    more than one image.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    res = {i: [pre_caption(c, None)] for i, c in enumerate(candidates)}
    gts = {i: [pre_caption(r, None) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise ValueError("every candidate needs at least one reference caption")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


def checker_correct_rate(scenes: Sequence[Scene], captions: Sequence[str]) -> float:
    """Share of captions the shapes world's checker accepts as true of their image's scene."""
    if len(scenes) != len(captions):
        raise ValueError(f"{len(scenes)} scenes but {len(captions)} captions")
    if not captions:
        raise ValueError("no captions to check")
    return sum(check_caption(s, c) for s, c in zip(scenes, captions, strict=True)) / len(captions)


def evaluate_captioning(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    split: EvalSplit,
    images: Sequence[Image.Image],
    config: EvalConfig | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Captions for the split's images, scored against its references (and by the checker when a
    world is given)."""
    cfg = config or EvalConfig()
    captions = generate_captions(med, tokenizer, images, cfg)
    result: dict[str, Any] = caption_scores(captions, split.captions)
    if world is not None:
        root = world.root.resolve()
        scenes = []
        for p in split.image_paths:
            scene = world.scene_for_path(p.resolve().relative_to(root).as_posix())
            if scene is None:
                raise ConfigError(f"test image {p} is not an image of the world at {world.root}")
            scenes.append(scene)
        result["checker_correct"] = checker_correct_rate(scenes, captions)
    result["n_images"] = len(captions)
    result["examples"] = [
        {"image": p.name, "caption": c}
        for p, c in zip(split.image_paths[: cfg.n_examples], captions, strict=False)
    ]
    return result


# ============================================================================== whole model


def evaluate_model(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    split: EvalSplit,
    config: EvalConfig | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Retrieval and captioning of one model on one test split: ``{"retrieval": {...},
    "captioning": {...}, "wall_s": ...}``. Pass the shapes world to get the checker's rate."""
    cfg = config or EvalConfig()
    heads = (["itc", "itm"] if cfg.retrieval else []) + (["lm"] if cfg.captioning else [])
    med.require(*heads)  # before any work
    dev = _device(cfg.device)
    med.eval().to(dev)
    t0 = time.perf_counter()
    images = split.images()
    result: dict[str, Any] = {"n_images": len(split)}
    if cfg.retrieval:
        t = time.perf_counter()
        image_embeds, image_feats = encode_images(med, images, cfg.batch_size, str(dev))
        ids, mask, text_feats = encode_texts(
            med, tokenizer, split.texts(cfg.max_words), cfg.max_text_length, cfg.batch_size, str(dev)
        )
        result["retrieval"] = evaluate_retrieval(
            med, image_embeds, image_feats, ids, mask, text_feats, split.txt2img(), cfg.k, cfg.itm_batch_size
        )
        result["retrieval"]["wall_s"] = time.perf_counter() - t
        del image_embeds
        log.info(
            "retrieval: R@1 t2i %.1f, i2t %.1f (%d images, %d texts, k=%d)",
            result["retrieval"]["r1_t2i"],
            result["retrieval"]["r1_i2t"],
            len(image_feats),
            len(text_feats),
            result["retrieval"]["k"],
        )
    if cfg.captioning:
        t = time.perf_counter()
        result["captioning"] = evaluate_captioning(med, tokenizer, split, images, cfg, world)
        result["captioning"]["wall_s"] = time.perf_counter() - t
        log.info(
            "captioning: BLEU-4 %.1f, CIDEr %.1f, checker %s",
            result["captioning"]["bleu4"],
            result["captioning"]["cider"],
            result["captioning"].get("checker_correct", "n/a"),
        )
    result["wall_s"] = time.perf_counter() - t0
    return result


# ========================================================================= CapFilt vs labels


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative,
    ties counting one half (Mann-Whitney U with mid-ranks)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D and of one length")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} score(s) are NaN; drop unscored rows first")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes: got {n_pos} positive and {n_neg} negative label(s)")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Mid-rank of each run of equal scores: ranks are 1-based positions in ascending order.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]  # exclusive
    mid = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def filter_quality(
    scores: Sequence[float] | np.ndarray, is_correct: Sequence[bool] | np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """How well ITM scores separate true texts from false ones, keeping a text when score >= threshold.

    ``precision``: share of kept texts that are true; ``recall``: share of true texts kept;
    ``noise_removed``: share of false texts dropped; ``roc_auc``: threshold-free separation
    (None, with ``roc_auc_note``, when only one class is present). A share over zero texts is None.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_correct, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and is_correct {y.shape} must be 1-D and of one length")
    kept = s >= threshold

    def share(num: int, den: int) -> float | None:
        return num / den if den else None

    out: dict[str, Any] = {
        "threshold": threshold,
        "n": len(s),
        "n_correct": int(y.sum()),
        "n_kept": int(kept.sum()),
        "precision": share(int((kept & y).sum()), int(kept.sum())),
        "recall": share(int((kept & y).sum()), int(y.sum())),
        "noise_removed": share(int((~kept & ~y).sum()), int((~y).sum())),
        "accuracy": share(int((kept == y).sum()), len(s)),
    }
    try:
        out["roc_auc"] = roc_auc(s, y)
    except ValueError as err:
        out["roc_auc"] = None
        out["roc_auc_note"] = str(err)
    return out


def noise_ratio(truth: Sequence[bool] | np.ndarray) -> float:
    """Share of pairs whose text is false of its image."""
    t = np.asarray(truth, dtype=bool)
    if t.size == 0:
        raise ValueError("noise ratio of an empty dataset")
    return float(1.0 - t.mean())


def web_truth(samples: pa.Table, labels: pa.Table) -> pa.Table:
    """Ground truth of every downloaded web pair: (uid, row, is_correct, path) for SAMPLE rows with
    status success. A SAMPLE row's ``row`` is its position in the URL list, i.e. its labels row."""
    for name, table, cols in (
        ("samples", samples, ("uid", "row", "status")),
        ("labels", labels, ("row", "is_correct", "path")),
    ):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{name} table lacks column(s) {missing}; has {table.column_names}")
    ok = samples.filter(pc.equal(samples["status"], SUCCESS)).select(["uid", "row"])
    joined = ok.join(labels.select(["row", "is_correct", "path"]), keys="row", join_type="left outer")
    unmatched = joined.filter(pc.is_null(joined["is_correct"]))
    if unmatched.num_rows:
        raise ValueError(
            f"{unmatched.num_rows} downloaded row(s) have no label, e.g. rows "
            f"{unmatched['row'].to_pylist()[:5]}; were the samples downloaded from this world's URL list?"
        )
    return joined.sort_by("row")


def label_candidates(candidates: pa.Table, samples: pa.Table, world: World) -> pa.Table:
    """The candidates with a ``truth`` column: is the text true of its image? Web texts are judged by
    the world's labels, synthetic texts by the checker against the image's scene, human texts are
    true. Null where it cannot be told (an image not in the samples or not in the world)."""
    truth_by_uid = web_truth(samples, world.labels)
    uids = truth_by_uid["uid"].to_pylist()
    web = dict(zip(uids, truth_by_uid["is_correct"].to_pylist(), strict=True))
    paths = dict(zip(uids, truth_by_uid["path"].to_pylist(), strict=True))
    truth: list[bool | None] = []
    for uid, source, text in zip(
        candidates["uid"].to_pylist(),
        candidates["text_source"].to_pylist(),
        candidates["text"].to_pylist(),
        strict=True,
    ):
        if source == "human":
            truth.append(True)
        elif source == "web":
            truth.append(web.get(uid))
        else:
            scene = world.scene_for_path(paths[uid]) if uid in paths else None
            truth.append(None if scene is None or text is None else check_caption(scene, text))
    unknown = sum(t is None for t in truth)
    if unknown:
        log.warning(
            "%d of %d candidate(s) have no ground truth (image not downloaded or not in the world)",
            unknown,
            len(truth),
        )
    return candidates.append_column("truth", pa.array(truth, type=pa.bool_()))


def evaluate_capfilt(
    candidates: pa.Table, samples: pa.Table, world: World, threshold: float = 0.5
) -> dict[str, Any]:
    """Filter quality and noise ratios of one CapFilt round against a shapes world's ground truth.

    ``candidates``: CANDIDATE rows of one round; ``samples``: the download's SAMPLE rows (uid, row,
    status at least). ``noise_before`` is over every downloaded web pair; ``noise_after`` over the
    kept web and synthetic texts (human pairs, true by construction, are left out of both).
    """
    labelled = label_candidates(candidates, samples, world)
    cols = labelled.select(["text_source", "itm_score", "decision", "truth"]).to_pydict()
    source = np.asarray(cols["text_source"], dtype=object)
    score = np.asarray([np.nan if v is None else v for v in cols["itm_score"]], dtype=np.float64)
    kept = np.asarray(cols["decision"], dtype=object) == "keep"
    known = np.asarray([t is not None for t in cols["truth"]])
    truth = np.asarray([bool(t) for t in cols["truth"]])

    result: dict[str, Any] = {
        "threshold": threshold,
        "noise_before": noise_ratio(web_truth(samples, world.labels)["is_correct"].to_numpy()),
    }
    after = kept & known & (source != "human")
    result["noise_after"] = noise_ratio(truth[after]) if after.any() else None
    result["counts"] = {}
    for src in ("web", "synthetic", "human"):
        rows = source == src
        if not rows.any():
            continue
        result["counts"][src] = {"candidates": int(rows.sum()), "kept": int((rows & kept).sum())}
        sel = rows & kept & known
        result[f"noise_after_{src}"] = noise_ratio(truth[sel]) if sel.any() else None
        scored = rows & known & ~np.isnan(score)
        if src != "human" and scored.any():
            result[f"filter_{src}"] = filter_quality(score[scored], truth[scored], threshold)
    return result


# ==================================================================================== output


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, paths as strings, NaN/inf as None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(path: str | Path, results: Mapping[str, Any]) -> Path:
    """Write results as strict JSON (no NaN), atomically; returns the path."""
    from capfilt.core.shards import write_json_atomic

    out = Path(path)
    clean = _jsonable(results)
    json.dumps(clean, allow_nan=False)  # fail here, naming nothing half-written, if anything slipped through
    write_json_atomic(out, clean)
    return out
