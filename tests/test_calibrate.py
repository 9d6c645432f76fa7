"""Calibration to a target precision: the threshold it picks keeps its promise on rows it never saw."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.core.errors import ConfigError
from capfilt.eval.calibrate import calibrate, pick_threshold, pr_curve, read_labels


def _draw(rng: np.random.Generator, n: int, positive_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores from a known mixture: correct rows ~ Beta(5, 2), wrong rows ~ Beta(2, 4)."""
    correct = rng.random(n) < positive_rate
    scores = np.where(correct, rng.beta(5, 2, n), rng.beta(2, 4, n))
    return scores, correct


def test_pr_curve_and_pick_on_a_hand_sample() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.2])
    correct = np.array([True, True, False, True, False, False])
    curve = pr_curve(scores, correct)
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.6, 0.4, 0.2]  # ties kept together
    assert curve["precision"].tolist() == pytest.approx([1.0, 2 / 3, 3 / 4, 3 / 5, 3 / 6])
    assert curve["recall"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert pick_threshold(scores, correct, 0.7) == 0.6  # the lowest threshold at >= 0.7
    assert pick_threshold(scores, correct, 0.95) == 0.9
    assert pick_threshold(scores, ~correct, 0.9) is None  # the top row is wrong: out of reach


def test_chosen_threshold_reaches_the_target_on_held_out_rows_within_its_interval() -> None:
    """On 40 labelled samples of 300 rows each, the precision on 200k unseen rows at the chosen
    threshold falls inside the sample's 95% interval nearly always, and near the target."""
    inside, gaps = 0, []
    trials = 40
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        s, c = _draw(rng, 300, 0.6)
        cal = calibrate(s, c, 0.95, resamples=400, seed=seed)
        assert cal.threshold is not None and cal.precision is not None and cal.precision >= 0.95
        hs, hc = _draw(np.random.default_rng(10_000 + seed), 200_000, 0.6)
        held = hc[hs >= cal.threshold].mean()
        lo, hi = cal.precision_ci
        inside += lo <= held <= hi
        gaps.append(held - 0.95)
    assert inside >= 0.85 * trials, f"held-out precision inside the interval {inside}/{trials} times"
    assert abs(float(np.median(gaps))) < 0.03


def test_an_unreachable_target_says_so() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(200)
    correct = rng.random(200) < 0.3  # labels unrelated to scores: no precision of 0.99
    cal = calibrate(scores, correct, 0.99, resamples=50)
    assert cal.threshold is None and "no threshold reaches" in cal.line()


def test_bad_inputs_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(ConfigError, match="target precision"):
        calibrate([0.5], [True], 1.5)
    with pytest.raises(ConfigError, match="no score"):
        calibrate([0.5, float("nan")], [True, False], 0.9)
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"text_uid": ["a"], "ok": [True]}), path)
    with pytest.raises(ConfigError, match="needs a 'correct' column"):
        read_labels(path)
    pq.write_table(pa.table({"text_uid": ["a", "b"], "correct": [1, None]}), path)
    with pytest.raises(ConfigError, match="no 'correct' value"):
        read_labels(path)


def test_the_wilson_interval_does_not_collapse_on_a_few_kept_rows() -> None:
    """Five labelled rows kept, all correct: the bootstrap interval is 1.000-1.000, the Wilson
    interval still admits a much lower precision (the demo's case: 0.961 on the other rows)."""
    from capfilt.eval.calibrate import wilson_interval

    scores = np.r_[np.linspace(0.9, 0.95, 5), np.linspace(0.1, 0.8, 295)]
    correct = np.r_[np.ones(5, bool), np.arange(295) % 2 == 1]  # the best of the rest is wrong
    cal = calibrate(scores, correct, 0.95, resamples=200)
    assert cal.kept == 5 and cal.precision == 1.0 and cal.precision_ci == (1.0, 1.0)
    assert cal.precision_wilson is not None and cal.precision_wilson[0] < 0.6 < cal.precision_wilson[1] == 1.0
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and round(hi - 0.5, 6) == round(0.5 - lo, 6)
    assert wilson_interval(0, 0) is None
