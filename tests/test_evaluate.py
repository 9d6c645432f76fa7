"""Tests of evaluation: retrieval ranking and recall, captioning scores, the checker's rate, ROC-AUC,
filter quality and noise ratios against a world's labels, and a med-tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from capfilt.core import schema as S
from capfilt.eval.captioning import caption_scores, checker_correct_rate
from capfilt.eval.config import EvalConfig
from capfilt.eval.encode import encode_images, encode_texts
from capfilt.eval.evaluate import evaluate_model, write_results
from capfilt.eval.quality import (
    evaluate_capfilt,
    filter_quality,
    label_candidates,
    noise_ratio,
    roc_auc,
    web_truth,
)
from capfilt.eval.retrieval import (
    evaluate_retrieval,
    faiss_topk,
    first_positive_ranks,
    itm_match_logits,
    recall_at,
    retrieval_from_candidates,
    retrieval_metrics,
)
from capfilt.eval.split import EvalSplit, load_world_test_split

# ------------------------------------------------------------------------------ ranks and recall


def test_first_positive_rank_counts_negatives_above_and_ties_against():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.1],  # positive at 2 -> rank 2
            [0.5, 0.5, 0.2, 0.1],  # positive tied with a negative -> rank 1 (tie counts against)
            [0.9, 0.8, 0.7, 0.6],  # no positive among candidates -> inf
            [0.1, 0.9, 0.8, 0.7],  # two positives, best is 0.8 -> only 0.9 above -> rank 1
        ]
    )
    positive = np.array(
        [
            [False, False, True, False],
            [False, True, False, False],
            [False, False, False, False],
            [False, False, True, True],
        ]
    )
    ranks = first_positive_ranks(scores, positive)
    assert ranks.tolist() == [2.0, 1.0, np.inf, 1.0]
    assert recall_at(ranks, (1, 2, 3)) == {1: 0.0, 2: 50.0, 3: 75.0}


def test_retrieval_metrics_on_a_hand_made_score_matrix():
    # 3 images, 2 texts each (texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2).
    txt2img = [0, 0, 1, 1, 2, 2]
    score = np.array(
        [
            # t0   t1   t2   t3   t4   t5
            [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0: best text t0 (own) -> rank 0
            [0.7, 0.2, 0.1, 0.6, 0.4, 0.3],  # image 1: t0 first, own t3 second -> rank 1
            [0.6, 0.5, 0.7, 0.4, 0.3, 0.2],  # image 2: own best t4 at 0.3, 4 texts above -> rank 4
        ]
    )
    # Text -> image ranks from the columns: t0 0.9 (own 0) -> 0; t1: own 0.1 < 0.2, 0.5 -> 2;
    # t2: own 0.1 < 0.8, 0.7 -> 2; t3: own 0.6 best -> 0; t4: own 0.3 < 0.4 -> 1; t5: own 0.2 < 0.0? no,
    # 0.2 < 0.3 only -> 1.
    m = retrieval_metrics(score, txt2img)
    assert m["r1_i2t"] == pytest.approx(100 / 3)
    assert m["r5_i2t"] == pytest.approx(100.0)
    assert m["r1_t2i"] == pytest.approx(100 * 2 / 6)
    assert m["r5_t2i"] == pytest.approx(100.0)
    assert m["r10_t2i"] == pytest.approx(100.0)
    assert m["r1_mean"] == pytest.approx((100 / 3 + 100 / 3) / 2)
    # The identity scores every pair right.
    perfect = np.array([[1.0 if t == i else 0.0 for t in txt2img] for i in range(3)])
    assert set(retrieval_metrics(perfect, txt2img).values()) == {100.0}
    # Scores all alike earn nothing at R@1: ties count against the query.
    flat = retrieval_metrics(np.zeros((3, 6)), txt2img)
    assert flat["r1_t2i"] == 0.0 and flat["r1_i2t"] == 0.0


def test_a_right_answer_outside_the_candidates_is_a_miss():
    txt2img = np.array([0, 1])
    i2t_idx = np.array([[1], [1]])  # image 0's only candidate is text 1 (wrong); image 1 gets text 1
    t2i_idx = np.array([[1], [1]])  # text 0's only candidate is image 1 (wrong)
    ones = np.ones((2, 1))
    m = retrieval_from_candidates(i2t_idx, ones, t2i_idx, ones, txt2img)
    assert m["r1_i2t"] == 50.0 and m["r10_i2t"] == 50.0
    assert m["r1_t2i"] == 50.0


def test_faiss_topk_is_exact_cosine_top_k():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    k = rng.normal(size=(30, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    sims, idx = faiss_topk(q, k, 5)
    full = q @ k.T
    assert idx.tolist() == np.argsort(-full, axis=1)[:, :5].tolist()
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, axis=1), rtol=1e-5, atol=1e-6)
    assert faiss_topk(q, k[:3], 10)[1].shape == (7, 3)  # k clamped to the keys there are


class _ItmOracle:
    """A stand-in Med whose ITM knows the answer: each image embed holds its image index and each
    text its text index, and the match logit is 10 for a right pair, 0 otherwise."""

    def __init__(self, txt2img: np.ndarray) -> None:
        self.txt2img = torch.as_tensor(txt2img)

    def require(self, *heads: str) -> None:
        pass

    def itm_logits(self, image_embeds, input_ids, attention_mask):
        img = image_embeds[:, 0, 0].long()
        right = self.txt2img[input_ids[:, 1]] == img
        return torch.stack([torch.zeros(len(img)), 10.0 * right.float()], dim=1)


def test_itm_rerank_fixes_the_itc_order_within_the_top_k():
    n_img, per = 12, 2
    txt2img = np.repeat(np.arange(n_img), per)
    rng = np.random.default_rng(1)
    image_feats = rng.normal(size=(n_img, 64)).astype(np.float32)  # near-orthogonal
    image_feats /= np.linalg.norm(image_feats, axis=1, keepdims=True)
    # Each text sits between its own image and the next one, closer to the next: ITC ranks it wrong.
    text_feats = 0.4 * image_feats[txt2img] + 0.6 * image_feats[(txt2img + 1) % n_img]
    text_feats /= np.linalg.norm(text_feats, axis=1, keepdims=True)
    embeds = torch.arange(n_img, dtype=torch.float32).view(n_img, 1, 1)
    ids = torch.stack([torch.zeros(len(txt2img), dtype=torch.long), torch.arange(len(txt2img))], dim=1)
    mask = torch.ones_like(ids)
    m = evaluate_retrieval(
        _ItmOracle(txt2img), embeds, image_feats, ids, mask, text_feats.astype(np.float32), txt2img, k=10
    )
    assert m["itc"]["r1_t2i"] < 50.0
    assert m["r1_t2i"] == 100.0 and m["r1_i2t"] == 100.0
    assert m["k"] == 10 and m["n_texts"] == n_img * per
    assert m["itm_pairs"] <= n_img * 10 + n_img * per * 10  # pairs shared by both directions once


def test_config_refuses_k_below_recall_at_10():
    with pytest.raises(ValueError, match="k >= 10"):
        EvalConfig(k=5)


# ------------------------------------------------------------------------------------ captioning


CAPTIONS = [
    "a red circle left of a blue square",
    "two green triangles above a small yellow circle",
    "a large purple square below an orange triangle",
    "one small blue circle",
]


def test_bleu_and_cider_are_top_for_identical_captions_and_low_for_unrelated():
    refs = [[c] for c in CAPTIONS]
    same = caption_scores(CAPTIONS, refs)
    assert same["bleu4"] == pytest.approx(100.0, abs=1e-3)
    unrelated = caption_scores(["click here for the best deals today"] * 4, refs)
    assert unrelated["bleu4"] < 1.0
    assert same["cider"] > 300.0 and unrelated["cider"] < 5.0
    # Case and BLIP's punctuation do not matter (texts go through pre_caption).
    shouted = caption_scores([c.upper() + "." for c in CAPTIONS], refs)
    assert shouted == pytest.approx(same)
    assert caption_scores(["", *CAPTIONS[1:]], refs)["bleu4"] < same["bleu4"]  # empty is scored, not fatal
    with pytest.raises(ValueError, match="3 candidates but 4"):
        caption_scores(CAPTIONS[:3], refs)


def test_checker_rate_on_the_worlds_test_scenes(small_world: Path):
    from capfilt.world import load_world

    world = load_world(small_world)
    split = load_world_test_split(small_world)
    scenes = [world.scene_for_path(p.relative_to(small_world).as_posix()) for p in split.image_paths]
    true = [caps[0] for caps in split.captions]
    assert checker_correct_rate(scenes, true) == 1.0
    assert checker_correct_rate(scenes, ["a pink elephant"] * len(scenes)) == 0.0
    half = [t if i % 2 else "a pink elephant" for i, t in enumerate(true)]
    assert checker_correct_rate(scenes, half) == 0.5


# ------------------------------------------------------------------------------ model end to end


@pytest.fixture(scope="module")
def tiny_model(small_world: Path):
    from capfilt.testing import tiny_med, tiny_tokenizer

    tok = tiny_tokenizer(load_world_test_split(small_world).texts())
    return tiny_med(tok), tok


def test_evaluate_model_end_to_end_on_a_tiny_world(small_world: Path, tiny_model, tmp_path: Path):
    from capfilt.world import load_world

    med, tok = tiny_model
    full = load_world_test_split(small_world)
    split = EvalSplit(full.image_paths[:12], full.captions[:12])  # 12 images, 60 texts: enough to run it all
    # k covers every text, so the re-rank scores every pair: the recalls must be those of the dense
    # ITM + ITC score matrix, computed here pair by pair.
    config = EvalConfig(k=60, num_beams=2, max_length=10, device="cpu")
    result = evaluate_model(med, tok, split, config, load_world(small_world))

    r = result["retrieval"]
    assert (r["n_images"], r["n_texts"], r["k"]) == (12, 60, 60)
    embeds, image_feats = encode_images(med, split.images(), device="cpu")
    ids, mask, text_feats = encode_texts(med, tok, split.texts(), device="cpu")
    pairs = np.stack([np.repeat(np.arange(12), 60), np.tile(np.arange(60), 12)], axis=1)
    dense = itm_match_logits(med, embeds, ids, mask, pairs).reshape(12, 60) + image_feats @ text_feats.T
    want = retrieval_metrics(dense, split.txt2img())
    assert {k: r[k] for k in want} == pytest.approx(want)
    c = result["captioning"]
    assert c["n_images"] == 12 and len(c["examples"]) == 8
    assert all(isinstance(e["caption"], str) for e in c["examples"])
    # A random model writes no true caption and scores as unrelated text does (measured: 0, 0, 0).
    assert c["bleu4"] < 1.0 and c["cider"] < 5.0 and c["checker_correct"] < 0.25

    path = write_results(tmp_path / "eval" / "round1.json", result)
    assert json.loads(path.read_text())["retrieval"]["k"] == 60


def test_captioning_scores_an_oracle_captioner_top_and_a_shuffled_one_low(
    small_world: Path, tiny_model, monkeypatch
):
    """Captions stand in for the model's: each image's own first reference (an oracle), then the
    next image's. The stage must pair captions with their own image's references and scene."""
    import capfilt.eval.captioning as captioning
    from capfilt.world import load_world

    med, tok = tiny_model
    full = load_world_test_split(small_world)
    split = EvalSplit(full.image_paths[:12], full.captions[:12])
    config = EvalConfig(retrieval=False, device="cpu")
    world = load_world(small_world)
    own = [caps[0] for caps in split.captions]
    monkeypatch.setattr(captioning, "generate_captions", lambda *args, **kwargs: list(own))
    oracle = evaluate_model(med, tok, split, config, world)["captioning"]
    assert oracle["bleu4"] == pytest.approx(100.0, abs=1e-3) and oracle["cider"] > 300.0
    assert oracle["checker_correct"] == 1.0
    monkeypatch.setattr(captioning, "generate_captions", lambda *args, **kwargs: own[1:] + own[:1])
    shuffled = evaluate_model(med, tok, split, config, world)["captioning"]
    # Measured: BLEU-4 17, CIDEr 39, checker 1 of 12 (two scenes the same caption is true of).
    assert shuffled["bleu4"] < 50.0 and shuffled["cider"] < 100.0 and shuffled["checker_correct"] < 0.25


def test_evaluate_model_fails_fast_without_the_heads_it_needs(small_world: Path, tiny_model):
    med, tok = tiny_model
    split = load_world_test_split(small_world)
    heads = med.heads
    med.heads = frozenset({"itc", "itm"})
    try:
        with pytest.raises(RuntimeError, match="no trained LM"):
            evaluate_model(med, tok, split, EvalConfig(device="cpu"))
    finally:
        med.heads = heads


# ------------------------------------------------------------------------------- ROC-AUC, filter


def test_roc_auc_matches_hand_computation():
    # Positives {0.35, 0.8} vs negatives {0.1, 0.4}: 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4 pairs.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Ties count one half: positives {0.5, 0.9} vs negatives {0.5, 0.5}: 0.5+0.5+1+1 over 4.
    assert roc_auc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1]) == pytest.approx(0.75)
    assert roc_auc([0.2, 0.2, 0.2], [True, False, True]) == pytest.approx(0.5)
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
    with pytest.raises(ValueError, match="needs both classes: got 3 positive and 0 negative"):
        roc_auc([0.1, 0.2, 0.3], [1, 1, 1])


def test_filter_quality_on_hand_arrays():
    q = filter_quality([0.9, 0.8, 0.3, 0.6, 0.1], [True, True, True, False, False], threshold=0.5)
    assert q["n_kept"] == 3
    assert q["precision"] == pytest.approx(2 / 3)
    assert q["recall"] == pytest.approx(2 / 3)
    assert q["noise_removed"] == pytest.approx(1 / 2)
    assert q["accuracy"] == pytest.approx(3 / 5)
    assert q["roc_auc"] == pytest.approx(5 / 6)
    one_class = filter_quality([0.9, 0.2], [True, True])
    assert one_class["roc_auc"] is None and "both classes" in one_class["roc_auc_note"]
    assert one_class["noise_removed"] is None  # no false text to remove


# ---------------------------------------------------------------------------------- noise ratio


def _samples(rows: list[int], statuses: list[str], urls: list[str] | None = None) -> pa.Table:
    return pa.table(
        {
            "uid": [f"u{r}" for r in rows],
            "row": pa.array(rows, pa.int64()),
            "status": statuses,
            "url": urls or [None] * len(rows),
        }
    )


def test_noise_ratio_of_downloaded_web_pairs_on_a_hand_table():
    labels = pa.table(
        {
            "row": pa.array([0, 1, 2, 3, 4], pa.int64()),
            "path": [f"images/web/w{i}.jpg" for i in range(5)],
            "is_correct": [True, False, True, True, False],
        }
    )
    # Rows out of order; row 2 failed to download and does not count.
    samples = _samples([3, 0, 2, 4, 1], [S.SUCCESS, S.SUCCESS, S.FAILED_TO_DOWNLOAD, S.SUCCESS, S.SUCCESS])
    truth = web_truth(samples, labels)
    assert truth["row"].to_pylist() == [0, 1, 3, 4]
    assert noise_ratio(truth["is_correct"].to_numpy()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no label"):
        web_truth(_samples([9], [S.SUCCESS]), labels)
    with pytest.raises(ValueError, match="empty"):
        noise_ratio([])


def _candidate_table(rows: list[dict]) -> pa.Table:
    """CANDIDATE rows from dicts; columns not given get a zero or null."""
    cols = {
        f.name: pa.array([r.get(f.name, 0 if pa.types.is_integer(f.type) else None) for r in rows], f.type)
        for f in S.CANDIDATE
    }
    return pa.Table.from_pydict(cols, schema=S.CANDIDATE)


def test_capfilt_quality_and_noise_against_the_worlds_labels(small_world: Path):
    from capfilt.world import load_world

    world = load_world(small_world)
    labels = world.labels.to_pylist()
    good = [r for r in labels if r["expect"] == "success" and r["label"] == "correct"][:3]
    bad = [r for r in labels if r["expect"] == "success" and r["label"] in ("mismatched", "weak")][:3]
    rows = good + bad
    samples = _samples([r["row"] for r in rows], [S.SUCCESS] * len(rows))
    expected_before = 3 / 6

    def cand(uid: str, text: str, source: str, score: float, decision: str) -> dict:
        return {
            "uid": uid,
            "text_uid": f"{uid}/{source}",
            "text": text,
            "text_source": source,
            "itm_score": score,
            "itc_score": 0.1,
            "decision": decision,
            "reason": None if decision == "keep" else "itm below threshold",
            "round": 1,
            "captioner_id": "c",
            "filter_id": "f",
        }

    cands = []
    # Web: the filter keeps two true texts and one false, drops one true and two false.
    for r, (score, dec) in zip(
        rows,
        [(0.9, "keep"), (0.8, "keep"), (0.2, "drop"), (0.7, "keep"), (0.3, "drop"), (0.1, "drop")],
        strict=True,
    ):
        cands.append(cand(f"u{r['row']}", r["caption"], "web", score, dec))
    # Synthetic: a true caption (a correct row's web text) kept on each image of `good`; a false
    # one kept on the first bad image.
    for r in good:
        cands.append(cand(f"u{r['row']}", r["caption"], "synthetic", 0.95, "keep"))
    cands.append(cand(f"u{bad[0]['row']}", "a pink elephant on a skateboard", "synthetic", 0.6, "keep"))
    table = _candidate_table(cands)

    labelled = label_candidates(table, samples, world)
    assert labelled["truth"].to_pylist() == [True, True, True, False, False, False, True, True, True, False]

    result = evaluate_capfilt(table, samples, world, threshold=0.5)
    assert result["noise_before"] == pytest.approx(expected_before)
    # Kept: web (T, T, F) + synthetic (T, T, T, F): 2 false of 7.
    assert result["noise_after"] == pytest.approx(2 / 7)
    assert result["noise_after_web"] == pytest.approx(1 / 3)
    assert result["counts"]["web"] == {"candidates": 6, "kept": 3}
    web = result["filter_web"]
    assert web["precision"] == pytest.approx(2 / 3) and web["recall"] == pytest.approx(2 / 3)
    # Positives {0.9, 0.8, 0.2} vs negatives {0.7, 0.3, 0.1}: 0.9 and 0.8 beat all 3, 0.2 beats 0.1.
    assert web["roc_auc"] == pytest.approx(7 / 9)
    assert result["filter_synthetic"]["precision"] == pytest.approx(3 / 4)
    json.dumps(result, allow_nan=False)
