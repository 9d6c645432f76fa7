"""Which texts of an image CapFilt keeps: the selection policies, as one pure function on candidate rows.

BLIP keeps every text whose ITM p(match) reaches the threshold (``threshold``). With K synthetic
captions per image (best-of-K, as LAION-COCO did with 40 captions ranked by CLIP) two more
policies choose among them:

- ``threshold``: every text with p >= its source's threshold (BLIP's rule).
- ``top_n``: the web text if p >= its threshold, and the ``n`` best synthetic captions by ITM,
  each still >= its threshold.
- ``best``: the single best text of the image, web or synthetic, if it reaches its threshold.

Thresholds may differ per text source (``capfilt calibrate`` picks them for a target precision);
a source without one uses the default threshold. Rows that were not scored (empty text,
undecodable image, caption-only runs, human pairs) keep their decision. ``rank`` is each scored
synthetic caption's place among its image's captions by ITM (0 = best; ties by caption index), so
``capfilt rethreshold`` can change the policy and n later without running a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa

from capfilt.stages.capfilt.decisions import DROP, KEEP, REASON_BELOW

Policy = Literal["threshold", "top_n", "best"]
POLICIES: tuple[str, ...] = ("threshold", "top_n", "best")
REASON_NOT_TOP = "not among the top n captions"
REASON_NOT_BEST = "not the best text of its image"


def threshold_for(source: str, threshold: float, thresholds: Mapping[str, float] | None) -> float:
    return float(thresholds[source]) if thresholds and source in thresholds else threshold


def select_rows(
    uids: list[str],
    sources: list[str],
    indexes: list[int],
    scores: list[float | None],
    decisions: list[str],
    reasons: list[str | None],
    *,
    policy: str = "threshold",
    n: int = 1,
    threshold: float = 0.5,
    thresholds: Mapping[str, float] | None = None,
) -> tuple[list[str], list[str | None], list[int | None]]:
    """(decision, reason, rank) for every row; rows of one image may come in any order."""
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; use one of {', '.join(POLICIES)}")
    if n < 1:
        raise ValueError(f"top_n must be >= 1, got {n}")
    decision, reason = list(decisions), list(reasons)
    rank: list[int | None] = [None] * len(uids)
    by_image: dict[str, list[int]] = {}
    for r, score in enumerate(scores):
        if score is None:
            continue  # unscored: its decision stands
        t = threshold_for(sources[r], threshold, thresholds)
        decision[r], reason[r] = (KEEP, None) if score >= t else (DROP, REASON_BELOW)
        by_image.setdefault(uids[r], []).append(r)
    for rows in by_image.values():
        synthetic = sorted(
            (r for r in rows if sources[r] == "synthetic"),
            key=lambda r: (-float(scores[r] or 0.0), indexes[r]),
        )
        for place, r in enumerate(synthetic):
            rank[r] = place
        if policy == "top_n":
            for r in synthetic[n:]:
                if decision[r] == KEEP:
                    decision[r], reason[r] = DROP, REASON_NOT_TOP
        elif policy == "best":
            order = sorted(rows, key=lambda r: (-float(scores[r] or 0.0), sources[r] != "web", indexes[r]))
            for r in order[1:]:
                if decision[r] == KEEP:
                    decision[r], reason[r] = DROP, REASON_NOT_BEST
    return decision, reason, rank


def select_table(
    table: pa.Table,
    *,
    policy: str = "threshold",
    n: int = 1,
    threshold: float = 0.5,
    thresholds: Mapping[str, float] | None = None,
) -> pa.Table:
    """``select_rows`` on a table with uid, text_source, text_index, itm_score, decision and reason;
    returns it with those decisions and a ``rank`` column (replaced if present)."""
    cols: dict[str, Any] = {
        c: table.column(c).to_pylist()
        for c in ("uid", "text_source", "text_index", "itm_score", "decision", "reason")
    }
    scores = [None if s is None or s != s else s for s in cols["itm_score"]]  # NaN in flight: unscored
    decision, reason, rank = select_rows(
        cols["uid"],
        cols["text_source"],
        cols["text_index"],
        scores,
        cols["decision"],
        cols["reason"],
        policy=policy,
        n=n,
        threshold=threshold,
        thresholds=thresholds,
    )
    out = table
    for name, values, typ in (("decision", decision, pa.string()), ("reason", reason, pa.string())):
        out = out.set_column(out.schema.get_field_index(name), name, pa.array(values, typ))
    ranks = pa.array(rank, pa.int32())
    if "rank" in out.column_names:
        return out.set_column(out.schema.get_field_index("rank"), "rank", ranks)
    return out.append_column("rank", ranks)


SELECTION_FIELDS = ("threshold", "thresholds", "select", "top_n")


def selection_record(cfg: Any) -> dict[str, Any]:
    """What a shard's decisions were made with, as its stats file records it (``selection``): BLIP's
    rule is just its threshold; any other selection names every field."""
    if cfg.select == "threshold" and not cfg.thresholds:
        return {"threshold": cfg.threshold}
    return {k: getattr(cfg, k) for k in SELECTION_FIELDS}
