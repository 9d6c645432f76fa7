"""Zero-shot retrieval by BLIP's protocol: ITC top-k with faiss both ways, ITM re-rank, R@1/5/10 in percent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from capfilt.eval.config import RECALL_AT
from capfilt.eval.encode import chunks

if TYPE_CHECKING:
    import torch

    from capfilt.model.med import Med

__all__ = [
    "evaluate_retrieval",
    "faiss_topk",
    "first_positive_ranks",
    "itm_match_logits",
    "recall_at",
    "retrieval_from_candidates",
    "retrieval_metrics",
]

log = logging.getLogger(__name__)


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
        for sl in tqdm(list(chunks(len(pairs), batch_size)), desc="ITM re-rank", leave=False, disable=None):
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
