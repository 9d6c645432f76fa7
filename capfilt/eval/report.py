"""The run report: one HTML file (plots as PNGs in a sibling folder) and the CLI's short summary table.

Everything that comes from data (captions, reasons, stage names, keys, values) is HTML-escaped, so
a caption holding ``<script>`` shows as text. The page has no scripts of its own.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa

__all__ = [
    "ROUND_METRICS",
    "example_uids",
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

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.up { color: #107010; } .down { color: #b01010; }
.stages { display: flex; flex-wrap: wrap; gap: 1.2em; } .stages h3 { margin: 0.4em 0 0; }
.plots img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0.4em 0 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 0.8em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.5em; display: flex; gap: 0.6em; }
.card img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; flex: none; }
.noimg { width: 96px; height: 96px; background: #eee; color: #888; font-size: 0.8em; flex: none;
         display: flex; align-items: center; justify-content: center; }
.texts { font-size: 0.85em; min-width: 0; } .text { margin-bottom: 0.35em; overflow-wrap: anywhere; }
.src { font-weight: 600; } .keep { color: #107010; font-weight: 600; } .drop { color: #b01010; font-weight: 600; }
.score { color: #555; } .uid { color: #999; font-size: 0.75em; }
.note { color: #777; font-style: italic; }
"""


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


# ================================================================================== plots


def _hist_png(
    path: Path, groups: Sequence[tuple[str, np.ndarray]], title: str, threshold: float | None
) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas renders PNGs

    fig = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 26).tolist()
    for label, scores in groups:
        ax.hist(np.clip(scores, 0.0, 1.0), bins=bins, alpha=0.55, label=f"{label} (n={len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("ITM p(match)")
    ax.set_ylabel("texts")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png")


def _scores(candidates: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(text_source, itm_score, truth or None) of the candidates that have a score."""
    cols = candidates.to_pydict()
    score = np.asarray([np.nan if s is None else s for s in cols["itm_score"]], dtype=np.float64)
    source = np.asarray(cols["text_source"], dtype=object)
    truth = None
    if "truth" in cols:
        truth = np.asarray([None if t is None else bool(t) for t in cols["truth"]], dtype=object)
    ok = ~np.isnan(score)
    return source[ok], score[ok], None if truth is None else truth[ok]


def _histograms(candidates: pa.Table, files_dir: Path, threshold: float) -> list[tuple[str, str | None]]:
    """Write the ITM histograms; returns (file name or note, caption) pairs to show."""
    source, score, truth = _scores(candidates)
    if len(score) == 0:
        return [("", "no candidate has an ITM score")]
    shown: list[tuple[str, str | None]] = []
    by_source = [(str(s), score[source == s]) for s in dict.fromkeys(source.tolist())]
    _hist_png(files_dir / "itm_by_source.png", by_source, "ITM score by text source", threshold)
    shown.append(("itm_by_source.png", "ITM score by text source"))
    if truth is None:
        shown.append(("", "no ground truth column: ITM scores by ground truth are not shown"))
        return shown
    known = np.asarray([t is not None for t in truth])
    is_true = np.asarray([bool(t) for t in truth])
    groups = [
        (f"{src}, {'true' if t else 'false'}", score[known & (source == src) & (is_true == t)])
        for src in dict.fromkeys(source.tolist())
        for t in (True, False)
    ]
    groups = [g for g in groups if len(g[1])]
    if groups:
        _hist_png(files_dir / "itm_by_truth.png", groups, "ITM score by ground truth", threshold)
        shown.append(("itm_by_truth.png", "ITM score by ground truth (is the text true of its image?)"))
    return shown


# ================================================================================ examples


def example_uids(candidates: pa.Table, n: int = 6, seed: int = 0) -> dict[str, list[str]]:
    """Up to ``n`` image uids whose web text was kept and ``n`` whose web text was removed (images
    without a web text go by their first candidate), picked at random with ``seed``. Load the
    thumbnails of just these for ``write_report``."""
    decision: dict[str, tuple[bool, str]] = {}  # uid -> (is web, decision)
    for uid, src, dec in zip(
        candidates["uid"].to_pylist(),
        candidates["text_source"].to_pylist(),
        candidates["decision"].to_pylist(),
        strict=True,
    ):
        if uid not in decision or (src == "web" and not decision[uid][0]):
            decision[uid] = (src == "web", dec)
    rng = random.Random(seed)
    out = {}
    for name, dec in (("kept", "keep"), ("removed", "drop")):
        # Images with a web text first: the grids are about web texts, and human-only images
        # (passed through, not downloaded) have no thumbnail to show.
        web = sorted(u for u, (is_web, d) in decision.items() if d == dec and is_web)
        other = sorted(u for u, (is_web, d) in decision.items() if d == dec and not is_web)
        picked = rng.sample(web, min(n, len(web)))
        picked += rng.sample(other, min(n - len(picked), len(other)))
        out[name] = sorted(picked)
    return out


def _thumbnail(data: bytes | None, size: int = 128) -> str | None:
    """A PNG data URI of the image, at most ``size`` px a side; None when it cannot be decoded."""
    if not data:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            thumb = opened.convert("RGB")
        thumb.thumbnail((size, size))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
    except Exception as err:  # a broken image must not break the report
        log.debug("no thumbnail: %s", err)
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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


def _card(uid: str, rows: list[dict[str, Any]], image: bytes | None) -> str:
    uri = _thumbnail(image)
    pic = f'<img src="{_e(uri)}" alt="image {_e(uid)}">' if uri else '<div class="noimg">no image</div>'
    texts = []
    for r in sorted(rows, key=lambda r: (r["text_source"] != "web", str(r.get("text_uid")))):
        dec = r["decision"]
        scores = " ".join(
            f"{name} {_fmt(r.get(col))}"
            for name, col in (("ITM", "itm_score"), ("ITC", "itc_score"))
            if r.get(col) is not None
        )
        truth = r.get("truth")
        mark = "" if truth is None else (" · true" if truth else " · false")
        reason = f" ({_e(r['reason'])})" if r.get("reason") else ""
        texts.append(
            f'<div class="text"><span class="src">{_e(r["text_source"])}</span> '
            f'<span class="{"keep" if dec == "keep" else "drop"}">{_e(dec)}</span>{reason} '
            f'<span class="score">{_e(scores)}{_e(mark)}</span><br>{_e(r.get("text"))}</div>'
        )
    return (
        f'<div class="card">{pic}<div class="texts">{"".join(texts)}'
        f'<div class="uid">{_e(uid)}</div></div></div>'
    )


def _examples(candidates: pa.Table, images: Mapping[str, bytes] | pa.Table | None, n: int, seed: int) -> str:
    picked = example_uids(candidates, n, seed)
    wanted = {u for uids in picked.values() for u in uids}
    by_uid: dict[str, list[dict[str, Any]]] = {u: [] for u in wanted}
    for row in candidates.to_pylist():
        if row["uid"] in by_uid:
            by_uid[row["uid"]].append(row)
    lookup = _image_lookup(images, wanted)
    parts = []
    for name, title in (("kept", "Web text kept"), ("removed", "Web text removed")):
        cards = "".join(_card(u, by_uid[u], lookup.get(u)) for u in picked[name])
        body = f'<div class="grid">{cards}</div>' if cards else '<p class="note">no such example</p>'
        parts.append(f"<h3>{_e(title)}</h3>{body}")
    return "".join(parts)


# ================================================================================== report


def write_report(
    run_dir: str | Path,
    out_html: str | Path,
    *,
    title: str = "capfilt run report",
    stages: Mapping[str, Mapping[str, Any]] | None = None,
    rounds: Mapping[str, Mapping[str, Any]] | None = None,
    capfilt: Mapping[str, Any] | None = None,
    candidates: pa.Table | None = None,
    images: Mapping[str, bytes] | pa.Table | None = None,
    threshold: float = 0.5,
    n_examples: int = 6,
    seed: int = 0,
) -> Path:
    """Write the HTML report of a run; returns its path. Plots go to ``<out_html stem>_files/``.

    - ``run_dir``: the run's folder, shown in the header; a relative ``out_html`` is placed in it.
    - ``stages``: stage name -> its stats dict (nested dicts are flattened), one table each.
    - ``rounds``: round name -> evaluation dict (``evaluate_model``'s result), for the round table.
    - ``capfilt``: ``evaluate_capfilt``'s result (filter quality and noise).
    - ``candidates``: CANDIDATE rows of the CapFilt round; with a ``truth`` column
      (``evaluate.label_candidates``) the histograms also split by ground truth.
    - ``images``: thumbnails for the examples: uid -> encoded image bytes, or a table with uid and
      image columns (SAMPLE rows); only the uids of ``example_uids`` are used.
    """
    run = Path(run_dir)
    out = Path(out_html)
    if not out.is_absolute():
        out = run / out
    out.parent.mkdir(parents=True, exist_ok=True)
    files_dir = out.parent / f"{out.stem}_files"
    files_dir.mkdir(exist_ok=True)

    sections = []
    if rounds:
        rows = round_rows(rounds)
        sections.append(f"<h2>Rounds</h2>{_html_table(rows, changes=True)}")
    if capfilt:
        sections.append(f"<h2>CapFilt quality</h2>{_kv_table(capfilt)}")
    if stages:
        tables = "".join(
            f"<div><h3>{_e(name)}</h3>{_kv_table(stats)}</div>" for name, stats in stages.items()
        )
        sections.append(f'<h2>Stages</h2><div class="stages">{tables}</div>')
    if candidates is not None:
        missing = [
            c
            for c in ("uid", "text", "text_source", "itm_score", "decision")
            if c not in candidates.column_names
        ]
        if missing:
            raise ValueError(f"candidates lack column(s) {missing}; pass CANDIDATE rows")
        plots = []
        for name, caption in _histograms(candidates, files_dir, threshold):
            if name:
                src = f"{files_dir.name}/{name}"
                plots.append(
                    f'<figure><img src="{_e(src)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
                )
            else:
                plots.append(f'<p class="note">{_e(caption)}</p>')
        sections.append(f'<h2>ITM scores</h2><div class="plots">{"".join(plots)}</div>')
        sections.append(f"<h2>Examples</h2>{_examples(candidates, images, n_examples, seed)}")

    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="meta">run {_e(run)} · written {_e(when)}</p>'
        f"{''.join(sections) or '<p class=note>nothing to report</p>'}"
        "</body></html>\n"
    )
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    log.info("wrote report %s", out)
    return out
