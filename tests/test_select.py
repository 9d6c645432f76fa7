"""Selection policies over an image's texts: BLIP's threshold, the n best captions, the single best text."""

from __future__ import annotations

import pyarrow as pa
import pytest

from capfilt.stages.capfilt.decisions import DROP, KEEP, REASON_BELOW
from capfilt.stages.capfilt.select import REASON_NOT_BEST, REASON_NOT_TOP, select_table


def _rows() -> pa.Table:
    # image a: web 0.7, captions 0.9 / 0.6 / 0.3; image b: web 0.2, captions 0.55 / 0.8;
    # image c: undecodable (unscored, dropped before selection).
    return pa.table(
        {
            "uid": ["a", "a", "a", "a", "b", "b", "b", "c"],
            "text_source": [
                "web",
                "synthetic",
                "synthetic",
                "synthetic",
                "web",
                "synthetic",
                "synthetic",
                "web",
            ],
            "text_index": [0, 0, 1, 2, 0, 0, 1, 0],
            "itm_score": [0.7, 0.9, 0.6, 0.3, 0.2, 0.55, 0.8, None],
            "decision": [KEEP] * 7 + [DROP],
            "reason": [None] * 7 + ["image not decodable: truncated"],
        }
    )


def _kept(t: pa.Table) -> list[tuple[str, str, int]]:
    d = t.to_pydict()
    return [
        (u, s, i)
        for u, s, i, k in zip(d["uid"], d["text_source"], d["text_index"], d["decision"], strict=True)
        if k == KEEP
    ]


def test_threshold_is_blips_rule_and_ranks_captions() -> None:
    t = select_table(_rows(), policy="threshold", threshold=0.5)
    assert _kept(t) == [
        ("a", "web", 0),
        ("a", "synthetic", 0),
        ("a", "synthetic", 1),
        ("b", "synthetic", 0),
        ("b", "synthetic", 1),
    ]
    assert t.column("rank").to_pylist() == [None, 0, 1, 2, None, 1, 0, None]
    assert t.column("reason").to_pylist()[3] == REASON_BELOW
    assert t.column("reason").to_pylist()[7].startswith("image not decodable")  # unscored: as it was


def test_top_n_keeps_the_web_text_and_the_n_best_captions_above_threshold() -> None:
    t = select_table(_rows(), policy="top_n", n=1, threshold=0.5)
    assert _kept(t) == [("a", "web", 0), ("a", "synthetic", 0), ("b", "synthetic", 1)]
    reasons = t.column("reason").to_pylist()
    assert reasons[2] == REASON_NOT_TOP and reasons[5] == REASON_NOT_TOP and reasons[3] == REASON_BELOW


def test_best_keeps_one_text_per_image_and_per_source_thresholds_apply() -> None:
    t = select_table(_rows(), policy="best", threshold=0.5)
    assert _kept(t) == [("a", "synthetic", 0), ("b", "synthetic", 1)]
    assert t.column("reason").to_pylist()[0] == REASON_NOT_BEST
    # A calibrated synthetic threshold of 0.85 leaves image b without a caption and a's best is kept.
    t = select_table(_rows(), policy="threshold", threshold=0.5, thresholds={"synthetic": 0.85})
    assert _kept(t) == [("a", "web", 0), ("a", "synthetic", 0)]


def test_rows_of_an_image_may_come_in_any_order() -> None:
    rows = _rows()
    shuffled = rows.take([6, 0, 3, 7, 1, 4, 2, 5])
    a = select_table(rows, policy="top_n", n=2).sort_by(
        [("uid", "ascending"), ("text_source", "descending"), ("text_index", "ascending")]
    )
    b = select_table(shuffled, policy="top_n", n=2).sort_by(
        [("uid", "ascending"), ("text_source", "descending"), ("text_index", "ascending")]
    )
    assert a.equals(b)


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown selection policy"):
        select_table(_rows(), policy="random")
    with pytest.raises(ValueError, match="top_n must be"):
        select_table(_rows(), policy="top_n", n=0)
