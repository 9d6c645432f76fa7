"""The run report: one HTML file, with its figures, thumbnails and raw JSON in a sibling folder, that
answers a data team's questions in order: the headline (what went in, what came out, what it cost),
is the threshold right, what is being removed, and what failed. Also the CLI's short summary table.

The page opens with no network and without capfilt: inline CSS, no scripts, every image a file
beside it. Everything that comes from data (captions, URLs, reasons, stage names, keys, values) is
HTML-escaped, so a caption holding ``<script>`` shows as text.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa

from capfilt.eval import report_audit as audit
from capfilt.eval.report_inputs import StageRun, stage_runs, throughput
from capfilt.eval.report_plots import PRCurve, pr_curve, pr_figure, score_panels

__all__ = [
    "ROUND_METRICS",
    "SECTIONS",
    "flatten",
    "round_rows",
    "summary_table",
    "write_report",
]

log = logging.getLogger(__name__)

# The metrics of the round-by-round table, as (dotted key in an evaluation dict, label). Keys
# missing from every round are left out; flat dicts (``{"r1_t2i": ...}``) match by their last part.
ROUND_METRICS: tuple[tuple[str, str], ...] = (
    ("retrieval.r1_t2i", "R@1 text->image"),
    ("retrieval.r5_t2i", "R@5 text->image"),
    ("retrieval.r10_t2i", "R@10 text->image"),
    ("retrieval.r1_i2t", "R@1 image->text"),
    ("retrieval.r5_i2t", "R@5 image->text"),
    ("retrieval.r10_i2t", "R@10 image->text"),
    ("retrieval.r1_mean", "R@1 mean"),
    ("retrieval.r_mean", "recall mean"),
    ("captioning.bleu4", "BLEU-4"),
    ("captioning.cider", "CIDEr"),
    ("captioning.checker_correct", "true captions (checker)"),
    ("noise_before", "noise before CapFilt"),
    ("noise_after", "noise after CapFilt"),
)


# ============================================================================ tables and text


def _e(value: Any) -> str:
    """HTML-escape anything for text or an attribute value."""
    return html.escape("" if value is None else str(value), quote=True)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            return "-"
        return f"{number:.3f}" if abs(number) < 1 and number != 0 else f"{number:.2f}"
    if isinstance(value, list | tuple):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _is_num(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _lookup(flat: Mapping[str, Any], key: str) -> Any:
    if key in flat:
        return flat[key]
    last = key.rsplit(".", 1)[-1]
    return flat.get(last)


def round_rows(
    rounds: Mapping[str, Mapping[str, Any]], metrics: Sequence[tuple[str, str]] = ROUND_METRICS
) -> list[dict[str, Any]]:
    """Rows of the round-by-round table: ``{"metric": label, <round>: value, ..., "change": last - first}``.

    ``rounds`` maps a round's name (``"round1"``) to its evaluation dict (``evaluate_model``'s
    result, optionally with CapFilt figures merged in). ``change`` is there when there are two or
    more rounds.
    """
    flat = {name: flatten(result) for name, result in rounds.items()}
    names = list(rounds)
    rows = []
    for key, label in metrics:
        values = {name: _lookup(flat[name], key) for name in names}
        if all(v is None for v in values.values()):
            continue
        row: dict[str, Any] = {"metric": label, **values}
        if len(names) >= 2:
            first, last = values[names[0]], values[names[-1]]
            row["change"] = last - first if _is_num(first) and _is_num(last) else None
        rows.append(row)
    return rows


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table for the terminal: one line per row, columns in order of first appearance,
    numbers right-aligned with two decimals (three below 1)."""
    if not rows:
        return "(no results)"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    numeric = [all(_is_num(row.get(c)) or row.get(c) is None for row in rows) for c in columns]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(c) for c in cells)])


def _html_table(rows: Sequence[Mapping[str, Any]], changes: bool = False) -> str:
    if not rows:
        return '<p class="note">nothing to show</p>'
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        tds = []
        for c in columns:
            v = row.get(c)
            cls = "num" if _is_num(v) else ""
            if changes and c == "change" and _is_num(v) and v != 0:
                cls += " up" if v > 0 else " down"
            text = _fmt(v)
            if changes and c == "change" and _is_num(v) and v > 0:
                text = "+" + text
            tds.append(f'<td class="{cls.strip()}">{_e(text)}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kv_table(d: Mapping[str, Any]) -> str:
    return _html_table([{"key": k, "value": v} for k, v in flatten(d).items()])


# ============================================================================ human numbers


def _int(n: Any) -> str:
    return "-" if not _is_num(n) else f"{int(n):,}"


def _pct(x: Any, digits: int = 1) -> str:
    return "-" if not _is_num(x) or not math.isfinite(float(x)) else f"{100 * float(x):.{digits}f} %"


def _dur(seconds: Any) -> str:
    if not _is_num(seconds):
        return "-"
    s = float(seconds)
    if s < 100:
        return f"{s:.1f} s"
    if s < 6000:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _num(x: Any, digits: int = 2) -> str:
    return "-" if not _is_num(x) or not math.isfinite(float(x)) else f"{float(x):,.{digits}f}"


def _rate(x: float) -> str:
    """A rate to three significant figures at most (0.0111, 2.0, 312), thousands separated."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _hours(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.4f}" if x < 0.01 else f"{x:.2f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], num: Sequence[int] = (), cls: str = "") -> str:
    """A table of already formatted cells (escaped here); columns in ``num`` align right."""
    if not rows:
        return '<p class="note">nothing to show</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if i in num else f"<td>{_e(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f'<table class="{_e(cls)}"><tr>{th}</tr>{body}</table>'


def _tile(label: str, value: str, sub: str = "") -> str:
    note = f'<div class="tsub">{_e(sub)}</div>' if sub else ""
    return f'<div class="tile"><div class="tlabel">{_e(label)}</div><div class="tvalue">{_e(value)}</div>{note}</div>'


# Units of the round table's metrics, by label.
_ROUND_UNITS = {
    "BLEU-4": "0-100",
    "CIDEr": "0-100+",
    "true captions (checker)": "share",
    "noise before CapFilt": "share",
    "noise after CapFilt": "share",
}

#: The report's sections, as (anchor id, heading), in page order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("headline", "The headline"),
    ("threshold", "Is the threshold right?"),
    ("removed", "What is being removed?"),
    ("failures", "Failures"),
    ("details", "Stage details"),
)


# ================================================================================= headline


def _by_name(runs: Sequence[StageRun]) -> dict[str, StageRun]:
    return {r.name: r for r in runs}


def _texts_by_source(
    capfilt_result: Mapping[str, Any], candidates: pa.Table | None
) -> list[tuple[str, int, int]]:
    """(source, texts considered, kept): from the CapFilt result, else counted in the candidates."""
    considered = capfilt_result.get("texts_considered")
    kept = capfilt_result.get("kept")
    if isinstance(considered, Mapping) and isinstance(kept, Mapping):
        return [(str(s), int(n), int(kept.get(s, 0))) for s, n in considered.items()]
    if candidates is None:
        return []
    counts: Counter[tuple[str, bool]] = Counter(
        (s, d == "keep")
        for s, d in zip(
            candidates["text_source"].to_pylist(), candidates["decision"].to_pylist(), strict=True
        )
    )
    sources = list(dict.fromkeys(candidates["text_source"].to_pylist()))
    return [(s, counts[(s, True)] + counts[(s, False)], counts[(s, True)]) for s in sources]


def _headline(
    runs: Sequence[StageRun],
    rounds: Mapping[str, Mapping[str, Any]] | None,
    quality: Mapping[str, Any] | None,
    candidates: pa.Table | None,
) -> str:
    by = _by_name(runs)
    dl = by["download"].result if "download" in by else {}
    cf = by["capfilt"].result if "capfilt" in by else {}
    q = quality or {}
    tiles = []
    rows_in = dl.get("rows_in")
    if _is_num(rows_in):
        tiles.append(_tile("Rows in", _int(rows_in), "rows of the URL list"))
    if _is_num(dl.get("downloaded")):
        share = dl["downloaded"] / rows_in if _is_num(rows_in) and rows_in else None
        tiles.append(_tile("Images downloaded", _int(dl["downloaded"]), f"{_pct(share)} of rows"))
    texts = _texts_by_source(cf, candidates)
    if texts:
        n, k = sum(t[1] for t in texts), sum(t[2] for t in texts)
        tiles.append(_tile("Texts kept", _int(k), f"of {n:,} considered ({_pct(k / n if n else None)})"))
    if _is_num(cf.get("images")):
        lost = cf.get("images_no_kept_text")
        tiles.append(_tile("Images CapFilt saw", _int(cf["images"]), f"{_int(lost)} left with no text"))
    if _is_num(q.get("noise_before")):
        tiles.append(
            _tile(
                "False pairs",
                f"{_pct(q['noise_before'])} → {_pct(q.get('noise_after'))}",
                "before → after CapFilt",
            )
        )
    walls = [r.wall_s for r in runs if _is_num(r.wall_s)]
    if walls:
        tiles.append(_tile("Wall time", _dur(sum(walls)), f"{len(walls)} stage(s) finished"))
    parts = [f'<div class="tiles">{"".join(tiles)}</div>' if tiles else ""]

    if texts:
        rows = [[s, f"{n:,}", f"{k:,}", _pct(k / n if n else None)] for s, n, k in texts]
        parts.append(
            "<h3>Texts kept by source</h3>"
            + _table(["source", "considered", "kept", "kept share"], rows, (1, 2, 3))
        )
    if q:
        noise_rows = [["downloaded web pairs, before CapFilt", _pct(q.get("noise_before"))]]
        noise_rows.append(["every kept web and synthetic text, after", _pct(q.get("noise_after"))])
        for src in ("web", "synthetic", "human"):
            if f"noise_after_{src}" in q:
                noise_rows.append([f"kept {src} texts, after", _pct(q.get(f"noise_after_{src}"))])
        parts.append(
            "<h3>Noise: share of pairs whose text is false of its image</h3>"
            '<p class="note">judged by the world\'s ground truth</p>'
            + _table(["pairs", "false"], noise_rows, (1,))
        )
    if rounds:
        rr = round_rows(rounds)
        names = list(rounds)
        head = ["metric", "unit", *names] + (["change"] if len(names) >= 2 else [])
        body = []
        for r in rr:
            unit = _ROUND_UNITS.get(r["metric"], "%")
            cells = [r["metric"], unit, *(_fmt(r.get(n)) for n in names)]
            if len(names) >= 2:
                ch = r.get("change")
                cells.append("-" if not _is_num(ch) else f"{ch:+.3f}" if abs(ch) < 1 else f"{ch:+.2f}")
            body.append(cells)
        parts.append(
            "<h3>Round 1 vs round 2</h3>"
            '<p class="note">each round\'s model zero-shot on the test split; R@k in %</p>'
            + _table(head, body, tuple(range(2, len(head))), cls="rounds")
        )
    if runs:
        total = sum(walls) if walls else 0.0
        body = []
        for sr in runs:
            rate = throughput(sr)
            res = sr.resources
            body.append(
                [
                    sr.name,
                    sr.state,
                    _dur(sr.wall_s),
                    _pct(sr.wall_s / total if _is_num(sr.wall_s) and total else None, 0),
                    "-" if rate is None else f"{_rate(rate[0])} {rate[1]}",
                    "-" if res is None else f"{res[0]:g} CPU, {res[1]:g} GPU",
                    _hours(sr.cpu_hours),
                    _hours(sr.gpu_hours),
                ]
            )
        parts.append(
            "<h3>Wall time and cost per stage</h3>"
            '<p class="note">cost: wall time × the CPUs and GPUs the stage\'s Ray work requested (its '
            "recipe section after fitting to the cluster); - where the stage does not say (work in "
            "the driver, or a download sized to the whole cluster)</p>"
            + _table(
                ["stage", "state", "wall time", "share", "throughput", "requested", "CPU-hours", "GPU-hours"],
                body,
                (2, 3, 4, 6, 7),
            )
        )
    return "".join(parts) or '<p class="note">no stage has finished</p>'


# ========================================================================== the threshold


def _scored(candidates: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(text_source, itm_score, truth with None or None) of the candidates that have a score."""
    cols = candidates.to_pydict()
    score = np.asarray([np.nan if s is None else s for s in cols["itm_score"]], dtype=np.float64)
    source = np.asarray(cols["text_source"], dtype=object)
    truth = np.asarray(cols["truth"], dtype=object) if "truth" in cols else None
    ok = ~np.isnan(score)
    return source[ok], score[ok], None if truth is None else truth[ok]


def _threshold(candidates: pa.Table, quality: Mapping[str, Any], files: Path, threshold: float) -> str:
    source, score, truth = _scored(candidates)
    if len(score) == 0:
        return '<p class="note">no candidate has an ITM score</p>'
    sources = list(dict.fromkeys(source.tolist()))
    score_panels(files / "itm_by_source.png", [(str(s), score[source == s]) for s in sources], threshold)
    parts = [
        f"<h3>ITM score by text source</h3>{_figure(files, 'itm_by_source.png', 'ITM score distribution, one panel per text source; dashed: the threshold')}"
    ]
    if truth is None:
        parts.append(
            '<p class="note">no ground truth: precision and recall against the kept fraction are not shown</p>'
        )
        return "".join(parts)
    curves: list[PRCurve] = []
    for s in sources:
        sel = (source == s) & np.asarray([t is not None for t in truth])
        y = np.asarray([bool(t) for t in truth[sel]])
        if sel.sum() and y.any() and not y.all():
            curves.append(pr_curve(str(s), score[sel], y))
    if not curves:
        parts.append('<p class="note">no text source has both true and false labelled texts</p>')
        return "".join(parts)
    pr_figure(files / "precision_recall.png", curves, threshold)
    rows = []
    for c in curves:
        kept, prec, rec = c.at(threshold)
        auc = (quality.get(f"filter_{c.source}") or {}).get("roc_auc")
        rows.append(
            [c.source, f"{c.n:,}", _pct(c.n_true / c.n), _pct(kept), _pct(prec), _pct(rec), _num(auc, 3)]
        )
    parts.append(
        "<h3>Precision and recall against the share kept</h3>"
        + _figure(
            files,
            "precision_recall.png",
            "precision (blue) and recall (red) of keeping the top-scored texts; dashed: the chosen threshold; dotted: the true share",
        )
        + f'<p class="note">at the chosen threshold {threshold:g}, among texts with ground truth</p>'
        + _table(
            ["source", "labelled texts", "true share", "kept", "precision", "recall", "ROC-AUC"],
            rows,
            (1, 2, 3, 4, 5, 6),
        )
    )
    return "".join(parts)


def _calibration(calibration: Mapping[str, Mapping[str, Any]], files: Path) -> str:
    """The thresholds `capfilt calibrate` picked: the labelled sample's precision and recall
    against the threshold per text source, the target and the chosen point marked."""
    from capfilt.eval.report_plots import calibration_figure

    rows, curves = [], {}
    for src, c in calibration.items():
        lo, hi = c.get("precision_ci") or (None, None)
        t_lo, t_hi = c.get("threshold_ci") or (None, None)
        rows.append(
            [
                src,
                f"{c.get('n_labels', 0):,}",
                _num(c.get("target"), 2),
                _num(c.get("threshold"), 3) if c.get("threshold") is not None else "out of reach",
                f"{_num(t_lo, 3)} – {_num(t_hi, 3)}",
                _pct(c.get("precision")),
                f"{_pct(lo)} – {_pct(hi)}",
                "{} – {}".format(*(_pct(x) for x in (c.get("precision_wilson") or (None, None)))),
                _pct(c.get("recall")),
            ]
        )
        if c.get("curve"):
            curves[src] = c
    parts = [
        "<h3>Calibrated thresholds</h3>"
        + _table(
            [
                "source",
                "labels",
                "target",
                "threshold",
                "threshold range",
                "precision",
                "precision interval (bootstrap)",
                "(Wilson)",
                "recall",
            ],
            rows,
            (1, 2, 3, 5, 8),
        )
        + '<p class="note">on the labelled sample; 95 % intervals: the threshold range and the first precision interval by bootstrap, the second by Wilson score (it does not collapse when the few kept rows are all correct); the precision on unlabelled rows should fall inside</p>'
    ]
    if curves:
        calibration_figure(files / "calibration.png", curves)
        parts.append(
            _figure(
                files,
                "calibration.png",
                "labelled sample: precision (blue) and recall (red) of keeping texts at or above each threshold; dotted: the target; dashed: the chosen threshold",
            )
        )
    return "".join(parts)


def _figure(files: Path, name: str, caption: str) -> str:
    src = f"{files.name}/{name}"
    return f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


# ============================================================================== what is removed


def _image_lookup(images: Mapping[str, bytes] | pa.Table | None, uids: set[str]) -> dict[str, bytes]:
    if images is None:
        return {}
    if isinstance(images, pa.Table):
        missing = [c for c in ("uid", "image") if c not in images.column_names]
        if missing:
            raise ValueError(
                f"images table lacks column(s) {missing}; pass SAMPLE rows or a uid -> bytes mapping"
            )
        return {
            u: b
            for u, b in zip(images["uid"].to_pylist(), images["image"].to_pylist(), strict=True)
            if u in uids and b
        }
    return {u: images[u] for u in uids if u in images}


def _removed(
    candidates: pa.Table,
    images: Mapping[str, bytes] | pa.Table | None,
    files: Path,
    threshold: float,
    per_bin: int,
    n_borderline: int,
    seed: int,
) -> str:
    shown = audit.audit_images(candidates)
    if not shown:
        return '<p class="note">no image has a scored web text</p>'
    cells = audit.stratified(shown, per_bin, seed)
    near = audit.borderline(shown, threshold, n_borderline)
    wanted = {im.uid for im in near} | {im.uid for v in cells.values() for _, _, picked in v for im in picked}
    thumbs = audit.Thumbnails(_image_lookup(images, wanted), files / "thumbs", f"{files.name}/thumbs")
    return (
        f"<h3>Borderline: the {len(near)} web texts scored nearest the threshold {threshold:g}</h3>"
        '<p class="note">one line each, by score; truth from the world where it exists</p>'
        + audit.borderline_html(near, thumbs, threshold)
        + "<h3>By score bin and by what happened to the web text</h3>"
        + f'<p class="note">up to {per_bin} images per bin, sampled with seed {seed} (the same on every rerun); '
        "binned by the web text's ITM score; every text of the image shown with its score and decision</p>"
        + audit.grids_html(cells, thumbs)
    )


# ================================================================================== failures


def _failures(
    runs: Sequence[StageRun], candidates: pa.Table | None, samples: pa.Table | None, n_urls: int = 3
) -> str:
    by = _by_name(runs)
    parts = []
    dl = by["download"].result if "download" in by else {}
    reasons = dl.get("reason_counts") or {}
    # Example URLs per counted reason: a counted reason is the sample's "status: reason" without
    # what names one row (the duplicate's first uid, a blocked address), so match by prefix.
    examples: dict[str, list[str]] = {reason: [] for reason in reasons}
    if samples is not None and {"url", "status", "reason"} <= set(samples.column_names):
        for url, status, reason in zip(
            samples["url"].to_pylist(),
            samples["status"].to_pylist(),
            samples["reason"].to_pylist(),
            strict=True,
        ):
            if status == "success" or url is None:
                continue
            key = f"{status}: {reason}" if reason else str(status)
            for counted, got in examples.items():
                if len(got) < n_urls and key.startswith(counted):
                    got.append(str(url))
                    break
    if reasons:
        rows_in = dl.get("rows_in")
        body = [
            f'<tr><td>{_e(reason)}</td><td class="num">{_e(_int(count))}</td>'
            f'<td class="num">{_e(_pct(count / rows_in if _is_num(rows_in) and rows_in else None))}</td>'
            f'<td class="urls">{"<br>".join(_e(u) for u in examples.get(reason, [])) or "-"}</td></tr>'
            for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])
        ]
        parts.append(
            "<h3>Download: rows not downloaded, by reason</h3>"
            f"<table><tr><th>reason</th><th>rows</th><th>share of rows in</th><th>example URLs</th></tr>{''.join(body)}</table>"
        )
    elif "download" in by:
        parts.append('<p class="note">download: every row downloaded</p>')
    for r in runs:
        failed = r.result.get("shards_failed") or {}
        if failed:
            rows = [[r.name, str(k), str(v)[:200]] for k, v in sorted(failed.items())]
            parts.append(
                f"<h3>{_e(r.name)}: shards that failed every attempt</h3>"
                + _table(["stage", "shard", "last error"], rows)
            )
    if candidates is not None:
        counts: Counter[tuple[str, str, str]] = Counter(
            (str(reason), str(src), str(dec))
            for reason, src, dec in zip(
                candidates["reason"].to_pylist()
                if "reason" in candidates.column_names
                else [None] * candidates.num_rows,
                candidates["text_source"].to_pylist(),
                candidates["decision"].to_pylist(),
                strict=True,
            )
            if reason
        )
        sources = list(dict.fromkeys(candidates["text_source"].to_pylist()))
        keys = sorted({(reason, dec) for reason, _, dec in counts}, key=lambda k: (k[1] != "drop", k[0]))
        rows = [
            [
                reason,
                dec,
                *(_int(counts[(reason, s, dec)]) for s in sources),
                _int(sum(counts[(reason, s, dec)] for s in sources)),
            ]
            for reason, dec in keys
        ]
        parts.append(
            "<h3>CapFilt: texts by reason</h3>"
            + _table(["reason", "decision", *sources, "total"], rows, tuple(range(2, 3 + len(sources))))
        )
        cf = by["capfilt"].result if "capfilt" in by else {}
        not_images = cf.get("rows_not_images") or {}
        if not_images or _is_num(cf.get("images_not_decodable")):
            rows = [[f"download status {k}", _int(v)] for k, v in not_images.items()]
            rows.append(["image not decodable", _int(cf.get("images_not_decodable"))])
            parts.append("<h3>CapFilt: rows without an image</h3>" + _table(["what", "rows"], rows, (1,)))
    return "".join(parts) or '<p class="note">nothing failed</p>'


# ================================================================================== report

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1400px; line-height: 1.35; }
h1 { margin: 0 0 0.2em; font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 2px solid #ddd; }
h3 { margin: 1.2em 0 0.4em; font-size: 1.05em; }
.meta { color: #666; font-size: 0.9em; margin: 0; } nav { margin: 0.6em 0 0; font-size: 0.95em; }
a { color: #2456a4; }
table { border-collapse: collapse; margin: 0.4em 0; font-size: 0.9em; }
th, td { border: 1px solid #d6d6d6; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.urls { font-family: ui-monospace, monospace; font-size: 0.85em; overflow-wrap: anywhere; max-width: 38em; }
.tiles { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 0.8em 0; }
.tile { border: 1px solid #d6d6d6; border-radius: 6px; padding: 0.5em 0.9em; min-width: 8.5em; background: #fafafa; }
.tlabel { color: #555; font-size: 0.85em; } .tvalue { font-size: 1.5em; font-weight: 600; }
.tsub { color: #777; font-size: 0.8em; }
figure { margin: 0.4em 0; } figure img { max-width: 100%; border: 1px solid #e3e3e3; }
figcaption { color: #666; font-size: 0.85em; }
.note { color: #777; font-style: italic; font-size: 0.9em; }
.stages { display: flex; flex-wrap: wrap; gap: 1.2em; } details summary { cursor: pointer; color: #2456a4; }
.binrow { display: flex; gap: 0.6em; border-top: 1px solid #eee; padding: 0.4em 0; }
.binhead { flex: none; width: 6.5em; white-space: nowrap; font-size: 0.85em; font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 0.5em; flex: 1; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.4em; display: flex; gap: 0.5em; font-size: 0.8em; min-width: 0; }
.card img, .card .noimg { width: 72px; height: 72px; object-fit: contain; image-rendering: pixelated; flex: none; }
img.small, .noimg.small { width: 40px; height: 40px; object-fit: contain; image-rendering: pixelated; }
.noimg { background: #eee; color: #888; font-size: 0.75em; display: flex; align-items: center; justify-content: center; }
.text { margin-bottom: 0.3em; } .said { overflow-wrap: anywhere; }
.src { font-weight: 600; } .keep { color: #107010; font-weight: 600; } .drop { color: #b01010; font-weight: 600; }
.score { color: #555; font-variant-numeric: tabular-nums; } .reason { color: #999; }
.true { color: #107010; } .false { color: #b01010; }
table.borderline td { padding: 0.1em 0.5em; vertical-align: middle; font-size: 0.95em; }
"""


def write_report(
    run_dir: str | Path,
    out_html: str | Path,
    *,
    title: str = "capfilt run report",
    stages: Mapping[str, Mapping[str, Any]] | None = None,
    runs: Sequence[StageRun] | None = None,
    rounds: Mapping[str, Mapping[str, Any]] | None = None,
    capfilt: Mapping[str, Any] | None = None,
    candidates: pa.Table | None = None,
    images: Mapping[str, bytes] | pa.Table | None = None,
    samples: pa.Table | None = None,
    threshold: float = 0.5,
    calibration: Mapping[str, Mapping[str, Any]] | None = None,
    per_bin: int = 4,
    n_borderline: int = 50,
    seed: int = 0,
) -> Path:
    """Write the HTML report of a run; returns its path. Figures, thumbnails and ``report.json``
    (every figure the page shows, for machines) go to ``<out_html stem>_files/``.

    - ``run_dir``: the run's folder, shown in the header; a relative ``out_html`` is placed in it.
    - ``stages``: stage name -> its report table (``Stage.report``), shown under Stage details.
    - ``runs``: the stages' manifests (``report_inputs.stage_runs``); read from ``run_dir`` when None.
    - ``rounds``: round name -> evaluation dict (``evaluate_model``'s result), for the round table.
    - ``capfilt``: ``evaluate_capfilt``'s result (filter quality and noise).
    - ``candidates``: CANDIDATE rows of the CapFilt round; with a ``truth`` column
      (``evaluate.label_candidates``) the threshold section adds precision and recall.
    - ``images``: thumbnails: uid -> encoded image bytes, or a table with uid and image columns
      (SAMPLE rows); only the images shown are decoded.
    - ``samples``: SAMPLE rows with url, status and reason, for example URLs of failed downloads.
    - ``calibration``: text source -> its ``Calibration`` (``_calibration.json``'s ``sources``),
      shown with its labelled sample's precision/recall curve.
    """
    run = Path(run_dir)
    out = Path(out_html)
    if not out.is_absolute():
        out = run / out
    out.parent.mkdir(parents=True, exist_ok=True)
    files = out.parent / f"{out.stem}_files"
    files.mkdir(exist_ok=True)
    if runs is None:
        runs = stage_runs(run) if run.is_dir() else []
    if candidates is not None:
        missing = [
            c
            for c in ("uid", "text", "text_source", "itm_score", "decision")
            if c not in candidates.column_names
        ]
        if missing:
            raise ValueError(f"candidates lack column(s) {missing}; pass CANDIDATE rows")

    body = {
        "headline": _headline(runs, rounds, capfilt, candidates),
        "threshold": (
            _threshold(candidates, capfilt or {}, files, threshold)
            if candidates is not None
            else '<p class="note">no CapFilt round in this run</p>'
        )
        + (_calibration(calibration, files) if calibration else ""),
        "removed": _removed(candidates, images, files, threshold, per_bin, n_borderline, seed)
        if candidates is not None
        else '<p class="note">no CapFilt round in this run</p>',
        "failures": _failures(runs, candidates, samples),
        "details": _details(stages, capfilt),
    }
    raw = {
        "title": title,
        "threshold": threshold,
        "stages": {r.name: {"state": r.state, "wall_s": r.wall_s, "result": r.result} for r in runs},
        "rounds": rounds or {},
        "capfilt": capfilt or {},
    }
    (files / "report.json").write_text(json.dumps(_plain(raw), indent=1, default=str))
    links = [f'<a href="{_e(files.name)}/report.json">raw JSON (report.json)</a>']
    if (out.parent / "results.json").is_file():
        links.append('<a href="results.json">results.json</a>')
    nav = " · ".join(f'<a href="#{key}">{_e(heading)}</a>' for key, heading in SECTIONS)
    sections = "".join(
        f'<section id="{key}"><h2>{_e(heading)}</h2>{body[key]}</section>' for key, heading in SECTIONS
    )
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="meta">run {_e(run)} · written {_e(when)} · threshold ITM ≥ {threshold:g} · '
        f"{' · '.join(links)}</p><nav>{nav}</nav>{sections}</body></html>\n"
    )
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    log.info("wrote report %s", out)
    return out


def _plain(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None, so report.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _details(stages: Mapping[str, Mapping[str, Any]] | None, quality: Mapping[str, Any] | None) -> str:
    """Every field each stage reports, and CapFilt's quality figures, as recorded (collapsed)."""
    tables = "".join(f"<div><h3>{_e(name)}</h3>{_kv_table(t)}</div>" for name, t in (stages or {}).items())
    if quality:
        tables += f"<div><h3>CapFilt quality</h3>{_kv_table(quality)}</div>"
    if not tables:
        return '<p class="note">no stage table</p>'
    return f'<details><summary>every field, as the stages record it</summary><div class="stages">{tables}</div></details>'
