"""CapFilt against a shapes world's ground truth: the filter's precision, recall and ROC-AUC, and the
noise ratio (share of pairs whose text is false of its image) before and after CapFilt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core.schema import SUCCESS
from capfilt.world import check_caption

if TYPE_CHECKING:
    from capfilt.world import World

__all__ = ["evaluate_capfilt", "filter_quality", "label_candidates", "noise_ratio", "roc_auc", "web_truth"]

log = logging.getLogger(__name__)


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
