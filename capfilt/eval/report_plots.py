"""The report's figures: ITM score distributions per text source (small multiples, one panel each)
and precision and recall against the kept fraction where texts carry ground truth.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state) and
saved as PNG files beside the report; the numbers behind the threshold figure are returned too,
so the page can print them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PRCurve", "calibration_figure", "pr_curve", "pr_figure", "score_panels"]

# One colour per text source, so a source reads the same in every figure.
_COLOURS = {"web": "#4c72b0", "synthetic": "#dd8452", "human": "#55a868"}
_OTHER = "#8172b3"


def _colour(source: str) -> str:
    return _COLOURS.get(source, _OTHER)


def score_panels(path: Path, groups: Sequence[tuple[str, np.ndarray]], threshold: float) -> None:
    """One histogram panel per (text source, ITM scores), side by side on one x scale, each with
    the threshold marked and the share of its texts at or above it in the title."""
    from matplotlib.figure import Figure

    n = max(1, len(groups))
    fig = Figure(figsize=(3.3 * n, 2.7), dpi=100, layout="constrained")
    axes = fig.subplots(1, n, sharex=True, squeeze=False)[0]
    bins = np.linspace(0.0, 1.0, 21)
    for ax, (source, scores) in zip(axes, groups, strict=False):
        s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        ax.hist(s, bins=bins, color=_colour(source), edgecolor="white", linewidth=0.5)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        above = float((s >= threshold).mean()) if len(s) else 0.0
        ax.set_title(f"{source}: {len(s):,} texts, {above:.0%} ≥ {threshold:g}", fontsize=9)
        ax.set_xlabel("ITM p(match)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("texts", fontsize=8)
    fig.savefig(path, format="png")


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of keeping texts whose score is at or above each distinct score.

    ``kept[i]``, ``precision[i]`` and ``recall[i]`` hold when the threshold is ``thresholds[i]``
    (descending). ``at`` gives the point of a chosen threshold."""

    source: str
    thresholds: np.ndarray
    kept: np.ndarray  # share of texts kept, 0..1
    precision: np.ndarray  # share of kept texts that are true
    recall: np.ndarray  # share of true texts kept
    n: int
    n_true: int

    def at(self, threshold: float) -> tuple[float, float | None, float]:
        """(kept fraction, precision or None when nothing is kept, recall) at ``threshold``."""
        i = int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1
        if i < 0:
            return 0.0, None, 0.0
        return float(self.kept[i]), float(self.precision[i]), float(self.recall[i])


def pr_curve(
    source: str, scores: Sequence[float] | np.ndarray, truth: Sequence[bool] | np.ndarray
) -> PRCurve:
    """The curve over every distinct score of ``scores`` (texts with a known truth)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truth, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and truth {y.shape} must be 1-D and of one length")
    if len(s) == 0 or not y.any():
        raise ValueError(f"{source}: precision and recall need at least one true text; got {int(y.sum())}")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    true_kept = np.cumsum(y_sorted)
    kept_n = np.arange(1, len(s) + 1)
    # The last index of each run of equal scores: a threshold keeps a whole run or none of it.
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    return PRCurve(
        source=source,
        thresholds=s_sorted[last],
        kept=kept_n[last] / len(s),
        precision=true_kept[last] / kept_n[last],
        recall=true_kept[last] / int(y.sum()),
        n=len(s),
        n_true=int(y.sum()),
    )


def pr_figure(path: Path, curves: Sequence[PRCurve], threshold: float) -> None:
    """One panel per curve: precision and recall (y) against the kept fraction (x), the chosen
    threshold's point marked on both."""
    from matplotlib.figure import Figure

    n = max(1, len(curves))
    fig = Figure(figsize=(3.6 * n, 2.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, c in zip(axes, curves, strict=False):
        x = np.r_[0.0, c.kept]
        ax.plot(x, np.r_[c.precision[0], c.precision], color="#4c72b0", label="precision")
        ax.plot(x, np.r_[0.0, c.recall], color="#c44e52", label="recall")
        kept, prec, rec = c.at(threshold)
        ax.axvline(kept, color="black", linestyle="--", linewidth=1)
        if prec is not None:
            ax.plot([kept], [prec], "o", color="#4c72b0")
        ax.plot([kept], [rec], "o", color="#c44e52")
        ax.set_title(f"{c.source}: threshold {threshold:g} keeps {kept:.0%}", fontsize=9)
        ax.set_xlabel("share of texts kept", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.axhline(c.n_true / c.n, color="#999999", linewidth=0.8, linestyle=":")
    axes[0].set_ylabel("precision / recall", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.savefig(path, format="png")


def calibration_figure(path: Path, calibrations: Mapping[str, Mapping[str, Any]]) -> None:
    """One panel per text source: the labelled sample's precision and recall (y) against the
    threshold (x), from ``Calibration.curve``; the target and the chosen threshold marked."""
    from matplotlib.figure import Figure

    n = max(1, len(calibrations))
    fig = Figure(figsize=(3.6 * n, 2.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, (src, c) in zip(axes, calibrations.items(), strict=False):
        curve = c["curve"]
        t = np.asarray(curve["threshold"], dtype=np.float64)
        ax.plot(t, curve["precision"], color="#4c72b0", label="precision")
        ax.plot(t, curve["recall"], color="#c44e52", label="recall")
        ax.axhline(float(c["target"]), color="#999999", linewidth=0.8, linestyle=":")
        chosen = c.get("threshold")
        title = f"{src}: {c['n_labels']} labels"
        if chosen is not None:
            ax.axvline(float(chosen), color="black", linestyle="--", linewidth=1)
            title += f", threshold {float(chosen):.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ITM threshold", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("precision / recall", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.savefig(path, format="png")
