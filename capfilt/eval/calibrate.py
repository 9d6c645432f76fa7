"""Thresholds that mean something: the ITM threshold per text source that reaches a target precision
on a small labelled sample, with a bootstrap confidence interval.

A person labels a few hundred (image, text) rows of a CapFilt run as correct or not. For each text
source (web, synthetic) this picks the lowest threshold whose kept rows (score >= threshold) reach
the target precision on the sample, which keeps the most rows at that precision. The bootstrap
(resampling the labelled rows) gives two intervals:

- ``precision_ci``: the precision at the chosen threshold across resamples. It is where the
  precision on the unlabelled rows is expected to fall (95% by default): what a user can promise.
- ``threshold_ci``: the threshold the same rule picks across resamples: how much it moves.

Pure functions on arrays (``pick_threshold``, ``calibrate``) at the core; ``calibrate_run`` joins
a labels file to a run's candidates table and writes ``_calibration.json`` into the run folder,
where ``capfilt rethreshold`` reads per-source thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from capfilt.core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Calibration", "calibrate", "calibrate_run", "pick_threshold", "pr_curve", "read_labels"]

SOURCES = ("web", "synthetic")


def pr_curve(scores: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and kept fraction when keeping rows with score >= t, for every distinct
    score t (descending). Recall is of the correct rows in ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    tp = np.cumsum(c)
    kept = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # last row of each tie group
    positives = max(int(c.sum()), 1)
    return {
        "threshold": s[last],
        "precision": tp[last] / kept[last],
        "recall": tp[last] / positives,
        "kept_fraction": kept[last] / max(len(s), 1),
    }


def pick_threshold(scores: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest score t such that the rows with score >= t have precision >= ``target``; None
    when no threshold reaches it (not even keeping only the top-scored row)."""
    curve = pr_curve(scores, correct)
    ok = np.flatnonzero(curve["precision"] >= target)
    return float(curve["threshold"][ok[-1]]) if len(ok) else None


def _precision_at(scores: np.ndarray, correct: np.ndarray, t: float) -> tuple[float | None, float, int]:
    kept = scores >= t
    n = int(kept.sum())
    positives = int(correct.sum())
    tp = int((kept & correct).sum())
    return (tp / n if n else None), (tp / positives if positives else 0.0), n


@dataclass
class Calibration:
    source: str
    target: float
    n_labels: int
    n_correct: int
    threshold: float | None  # None: the target is out of reach on this sample
    precision: float | None  # on the sample, at the threshold
    recall: float | None
    kept: int  # labelled rows at or above the threshold
    precision_ci: tuple[float, float] | None
    threshold_ci: tuple[float, float] | None
    unreachable_resamples: float  # share of bootstrap resamples where no threshold reached the target
    confidence: float = 0.95
    curve: dict[str, list[float]] = field(default_factory=dict)
    # Wilson score interval of the precision on the `kept` labelled rows. The bootstrap interval
    # collapses when few rows are kept and all are correct (5 of 5 gives 1.000-1.000); this one
    # does not (5 of 5: 0.566-1.000). A promise should quote its lower end.
    precision_wilson: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.threshold is None:
            return (
                f"{self.source}: no threshold reaches precision {self.target:.2f} on {self.n_labels} "
                f"labelled rows ({self.n_correct} correct)"
            )
        p_lo, p_hi = self.precision_ci or (float("nan"), float("nan"))
        w_lo, w_hi = self.precision_wilson or (float("nan"), float("nan"))
        t_lo, t_hi = self.threshold_ci or (float("nan"), float("nan"))
        return (
            f"{self.source}: threshold {self.threshold:.3f} (range {t_lo:.3f}-{t_hi:.3f}) keeps "
            f"{self.kept}/{self.n_labels} labelled rows at precision {self.precision:.3f} "
            f"({self.confidence:.0%} interval {p_lo:.3f}-{p_hi:.3f} bootstrap, {w_lo:.3f}-{w_hi:.3f} Wilson), "
            f"recall {self.recall:.3f}"
        )


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (successes of n)."""
    from statistics import NormalDist

    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)


def calibrate(
    scores: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    target: float,
    *,
    source: str = "web",
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Calibration:
    """The threshold reaching ``target`` precision on (scores, correct), with bootstrap intervals."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"target precision must be in (0, 1), got {target}")
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    if s.shape != c.shape or s.ndim != 1:
        raise ConfigError(f"scores and labels must be two lists of one length, got {s.shape} and {c.shape}")
    if len(s) == 0:
        raise ConfigError(f"no labelled {source} rows to calibrate on")
    if np.isnan(s).any():
        raise ConfigError(f"{int(np.isnan(s).sum())} labelled {source} rows have no score")
    t = pick_threshold(s, c, target)
    curve = {k: [round(float(x), 6) for x in v] for k, v in pr_curve(s, c).items()}
    if t is None:
        return Calibration(
            source, target, len(s), int(c.sum()), None, None, None, 0, None, None, 1.0, confidence, curve
        )
    precision, recall, kept = _precision_at(s, c, t)
    rng = np.random.default_rng(seed)
    precisions, thresholds, unreachable = [], [], 0
    for _ in range(resamples):
        idx = rng.integers(0, len(s), len(s))
        rs, rc = s[idx], c[idx]
        p, _, _ = _precision_at(rs, rc, t)
        if p is not None:
            precisions.append(p)
        rt = pick_threshold(rs, rc, target)
        if rt is None:
            unreachable += 1
        else:
            thresholds.append(rt)
    alpha = (1.0 - confidence) / 2

    def interval(values: list[float]) -> tuple[float, float] | None:
        if not values:
            return None
        lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
        return round(float(lo), 6), round(float(hi), 6)

    return Calibration(
        source=source,
        target=target,
        n_labels=len(s),
        n_correct=int(c.sum()),
        threshold=round(t, 6),
        precision=precision,
        recall=recall,
        kept=kept,
        precision_ci=interval(precisions),
        threshold_ci=interval(thresholds),
        unreachable_resamples=unreachable / resamples,
        confidence=confidence,
        curve=curve,
        precision_wilson=wilson_interval(round((precision or 0.0) * kept), kept, confidence),
    )


def read_labels(path: Any) -> Any:
    """A labels table (Parquet, CSV or JSONL): ``correct`` plus ``text_uid``, or ``uid`` and
    ``text``. Checked before any work."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    from capfilt.core import fs

    loc = fs.location(path)
    if not loc.is_file():
        raise ConfigError(f"labels file {loc} does not exist")
    name = loc.name.lower()
    if name.endswith(".parquet"):
        table = fs.read_parquet(loc)
    elif name.endswith((".csv", ".jsonl", ".json")):
        with loc.open("rb") as f:
            table = pacsv.read_csv(f) if name.endswith(".csv") else pajson.read_json(f)
    else:
        raise ConfigError(f"labels file {loc}: use .parquet, .csv or .jsonl")
    cols = set(table.column_names)
    if "correct" not in cols or not ({"text_uid"} <= cols or {"uid", "text"} <= cols):
        raise ConfigError(
            f"labels file {loc} needs a 'correct' column and 'text_uid' (or 'uid' and 'text'); "
            f"it has {sorted(cols)}"
        )
    correct = table.column("correct")
    if not pa.types.is_boolean(correct.type):
        try:
            correct = pc.cast(correct, pa.bool_())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ConfigError(f"labels file {loc}: 'correct' must be true/false or 1/0 ({err})") from err
    if correct.null_count:
        raise ConfigError(f"labels file {loc}: {correct.null_count} row(s) have no 'correct' value")
    return table.set_column(table.schema.get_field_index("correct"), "correct", correct)


def calibrate_run(
    run: Any,
    labels: Any,
    target: float,
    *,
    sources: Sequence[str] = SOURCES,
    resamples: int = 1000,
    seed: int = 0,
    write: bool = True,
) -> dict[str, Calibration]:
    """Calibrate a CapFilt run folder's thresholds per text source from a labels file and write
    them to ``<run>/_calibration.json``. Labels that match no candidate are an error."""
    import pyarrow.compute as pc

    from capfilt.core import fs
    from capfilt.core.layout import CALIBRATION
    from capfilt.stages.capfilt.rethreshold import read_candidates

    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ConfigError(f"--source {bad}: calibrate the text sources {list(SOURCES)}")
    table = read_labels(labels)
    candidates = read_candidates(run)
    if candidates.num_rows == 0:
        raise ConfigError(f"{run} holds no candidates; pass the output folder of `capfilt capfilt`")
    cand = candidates.select(["uid", "text_uid", "text", "text_source", "itm_score"])
    key = ["text_uid"] if "text_uid" in table.column_names else ["uid", "text"]
    joined = table.select([*key, "correct"]).join(cand, keys=key, join_type="inner")
    unmatched = table.num_rows - joined.num_rows
    if unmatched:
        raise ConfigError(
            f"{unmatched} of {table.num_rows} labelled rows match no candidate of {run} by {key}; "
            "label rows of this run"
        )
    out: dict[str, Calibration] = {}
    for src in sources:
        part = joined.filter(pc.equal(joined.column("text_source"), src))
        unscored = part.num_rows - part.filter(pc.is_valid(part.column("itm_score"))).num_rows
        if unscored:  # an empty text or an undecodable image: dropped without a score, not calibrated
            log.info(
                "%d labelled %s row(s) were never scored (empty text or bad image); left out", unscored, src
            )
            part = part.filter(pc.is_valid(part.column("itm_score")))
        if part.num_rows == 0:
            log.info("no labelled %s rows: its threshold stays as it is", src)
            continue
        out[src] = calibrate(
            part.column("itm_score").to_numpy(zero_copy_only=False),
            part.column("correct").to_numpy(zero_copy_only=False),
            target,
            source=src,
            resamples=resamples,
            seed=seed,
        )
        log.info("%s", out[src].line())
    if not out:
        raise ConfigError(f"none of the labelled rows are of the sources {list(sources)}")
    if write:
        doc = {
            "target_precision": target,
            "labels": str(labels),
            "thresholds": {s: c.threshold for s, c in out.items() if c.threshold is not None},
            "sources": {s: c.to_json() for s, c in out.items()},
        }
        fs.write_json_atomic(fs.location(run) / CALIBRATION, doc)
    return out
