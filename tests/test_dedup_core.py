"""Duplicate finding on arrays: exact hashes, near-duplicate embeddings through faiss, and who is kept."""

from __future__ import annotations

import numpy as np

from capfilt.eval.dedup import exact_groups, keepers, near_groups


def test_exact_groups_and_keepers() -> None:
    groups = exact_groups(["h1", "h2", "h1", None, "h2", "h3", "h1"])
    assert sorted(map(sorted, groups)) == [[0, 2, 6], [1, 4]]
    assert keepers(groups) == {2: 0, 6: 0, 4: 1}
    # With scores the best member stays, whatever its position; a missing score ranks last.
    assert keepers(groups, [0.2, None, 0.9, None, 0.5, None, 0.9]) == {0: 2, 6: 2, 1: 4}


def _clustered(rng: np.random.Generator, n_groups: int, per: int, d: int, noise: float) -> np.ndarray:
    centres = rng.normal(size=(n_groups, d))
    return np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_groups * per, d))


def test_near_groups_find_planted_duplicates_flat_and_ivf() -> None:
    rng = np.random.default_rng(0)
    d = 32
    singles = rng.normal(size=(400, d))  # random directions in 32-d: cosines near 0
    dups = _clustered(rng, 30, 3, d, 0.05)  # 30 triples of near-identical vectors
    x = np.concatenate([singles, dups])
    truth = {frozenset(range(400 + 3 * g, 400 + 3 * g + 3)) for g in range(30)}
    for ivf_from in (10**9, 100):  # flat, then IVF
        found = {frozenset(g) for g in near_groups(x, 0.9, ivf_from=ivf_from)}
        assert found == truth, f"ivf_from={ivf_from}"


def test_transitive_links_join_one_group_and_empty_input() -> None:
    a = np.array([1.0, 0.0])
    b = np.array([np.cos(0.3), np.sin(0.3)])  # 0.3 rad from a
    c = np.array([np.cos(0.6), np.sin(0.6)])  # 0.3 rad from b, 0.6 from a
    groups = near_groups(np.stack([a, b, c]), float(np.cos(0.35)))
    assert [sorted(g) for g in groups] == [[0, 1, 2]]
    assert near_groups(np.zeros((0, 4)), 0.9) == []
