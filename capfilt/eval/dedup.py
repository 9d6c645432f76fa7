"""Duplicate images: exact (identical bytes under different URLs) and near (the same picture
re-encoded, resized or slightly cropped), found with faiss on L2-normalised image embeddings.

Pure functions on arrays, used by the dedup stage and its benchmark:

- ``exact_groups(sha256)``: rows whose image bytes are identical.
- ``near_groups(embeddings, min_cosine)``: rows linked by a cosine similarity >= ``min_cosine``,
  joined transitively (single linkage, union-find). A flat inner-product index for small sets; an
  IVF index (``nlist`` cells, ``nprobe`` searched) from ``ivf_from`` rows up, where an exact
  search would cost O(n^2); on a GPU when faiss has one.
- ``keepers(groups, scores)``: one member per group, the best by ``scores`` (the best ITM of
  its kept texts), ties by position; every other member is a duplicate of it.

faiss is the only ANN library: ``faiss-cpu`` by default, ``faiss-gpu`` in the ``gpu`` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MIN_COSINE",
    "exact_groups",
    "keepers",
    "merge_groups",
    "near_groups",
    "search_neighbours",
]

#: Near duplicates: embeddings at least this close (cosine). Chosen by benchmarks/dedup.py on a
#: world with near duplicates (seed 1) other than the one it reports (seed 2): the lowest swept
#: threshold whose precision reached 0.97 with the ITC embeddings of a med-tiny pretrained 400
#: steps (round 1; a tiny model embeds distinct shapes scenes within ~0.01 of each other).
#: A better-trained filter spreads images further apart: rerun the benchmark and set it lower.
DEFAULT_MIN_COSINE = 0.9995


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earliest row is the root

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return [g for g in out.values() if len(g) > 1]


def exact_groups(sha256: Sequence[str | None]) -> list[list[int]]:
    """Groups (positions, two or more) of rows with the same image hash; rows without one are skipped."""
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(sha256):
        if h:
            by_hash.setdefault(h, []).append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, d], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def search_neighbours(
    embeddings: np.ndarray,
    k: int = 8,
    *,
    ivf_from: int = 50_000,
    nlist: int | None = None,
    nprobe: int = 16,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, positions), each [n, k], of every row's k nearest rows (itself
    included). Flat index below ``ivf_from`` rows, IVF-Flat above."""
    import faiss

    x = _normalised(embeddings)
    n, d = x.shape
    k = min(k, n)
    index: Any
    if n < ivf_from:
        index = faiss.IndexFlatIP(d)
    else:
        cells = nlist or int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[rng.choice(n, size=min(n, cells * 64), replace=False)]
        index.train(train)
        index.nprobe = min(nprobe, cells)
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    log.debug("faiss %s over %d x %d (gpu %s)", type(index).__name__, n, d, gpu)
    sims, idx = index.search(x, k)
    return sims, idx


def near_groups(
    embeddings: np.ndarray,
    min_cosine: float,
    *,
    k: int = 8,
    ivf_from: int = 50_000,
    use_gpu: bool | None = None,
) -> list[list[int]]:
    """Groups (positions) of rows whose embeddings are within ``min_cosine`` of another member."""
    if len(embeddings) == 0:
        return []
    sims, idx = search_neighbours(embeddings, k, ivf_from=ivf_from, use_gpu=use_gpu)
    uf = _UnionFind(len(embeddings))
    rows, cols = np.nonzero(sims >= min_cosine)
    for i, j in zip(rows.tolist(), idx[rows, cols].tolist(), strict=True):
        if j >= 0 and j != i:
            uf.union(i, j)
    return uf.groups()


def merge_groups(n: int, *group_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """The groups of several groupings of the same ``n`` rows, joined where they share a row."""
    uf = _UnionFind(n)
    for groups in group_lists:
        for group in groups:
            for i in group[1:]:
                uf.union(group[0], i)
    return uf.groups()


def keepers(groups: Sequence[Sequence[int]], scores: Sequence[float | None] | None = None) -> dict[int, int]:
    """For every non-kept member of every group, the position of the member kept in its place:
    the best by ``scores`` (None scores last), the earliest on ties or with no scores."""
    out: dict[int, int] = {}
    for group in groups:
        if scores is None:
            best = min(group)
        else:
            best = min(group, key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
        for i in group:
            if i != best:
                out[i] = best
    return out
