"""The report's audit of CapFilt's decisions: images grouped by what happened to their web text
(kept, replaced by a synthetic caption, or every text dropped) and by the web text's ITM score bin,
sampled reproducibly; and the borderline list, the web texts scored nearest the threshold.

Thumbnails are small PNG files beside the report (one per image shown), so the page needs no
network and no capfilt to open. Every text from data is HTML-escaped.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "BINS",
    "CATEGORIES",
    "AuditImage",
    "Thumbnails",
    "audit_images",
    "bin_of",
    "borderline",
    "borderline_html",
    "grids_html",
    "stratified",
]

log = logging.getLogger(__name__)

#: Score bins of the grids, as (low, high): a score s is in a bin when low <= s < high (the last
#: bin holds 1.0 too).
BINS: tuple[tuple[float, float], ...] = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))

#: What happened to an image's web text, as (key, heading).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("kept_web", "Web text kept"),
    ("replaced", "Web text replaced by a synthetic caption"),
    ("all_dropped", "Every text dropped (the image leaves the set)"),
)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def bin_of(score: float) -> int:
    """The index in BINS of a score (clipped to 0..1)."""
    for i, (_, high) in enumerate(BINS):
        if score < high:
            return i
    return len(BINS) - 1


def bin_label(i: int) -> str:
    low, high = BINS[i]
    return f"{low:.1f}-{high:.1f}"


@dataclass
class AuditImage:
    """One image with a scored web text: every text considered for it and the category."""

    uid: str
    web_score: float
    category: str  # a key of CATEGORIES
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def web(self) -> dict[str, Any]:
        return next(r for r in self.rows if r["text_source"] == "web")


def audit_images(candidates: pa.Table) -> list[AuditImage]:
    """The images whose web text has an ITM score, in uid order, with their category."""
    by_uid: dict[str, list[dict[str, Any]]] = {}
    for row in candidates.to_pylist():
        by_uid.setdefault(row["uid"], []).append(row)
    out = []
    for uid in sorted(by_uid):
        rows = by_uid[uid]
        web = [r for r in rows if r["text_source"] == "web" and r.get("itm_score") is not None]
        if not web:
            continue  # human-only images, or a web text dropped unscored (empty): not the filter's call
        if web[0]["decision"] == "keep":
            category = "kept_web"
        elif any(r["decision"] == "keep" for r in rows):
            category = "replaced"
        else:
            category = "all_dropped"
        out.append(AuditImage(uid, float(web[0]["itm_score"]), category, rows))
    return out


def stratified(
    images: Sequence[AuditImage], per_bin: int, seed: int = 0
) -> dict[str, list[tuple[int, int, list[AuditImage]]]]:
    """category -> [(bin index, images in the bin, up to ``per_bin`` of them)], sampled with a
    generator seeded by (seed, category, bin), so a rerun shows the same images."""
    out: dict[str, list[tuple[int, int, list[AuditImage]]]] = {}
    for key, _ in CATEGORIES:
        cells = []
        for b in range(len(BINS)):
            pool = [im for im in images if im.category == key and bin_of(im.web_score) == b]
            rng = random.Random(f"{seed}:{key}:{b}")
            picked = sorted(rng.sample(pool, min(per_bin, len(pool))), key=lambda im: im.web_score)
            cells.append((b, len(pool), picked))
        out[key] = cells
    return out


def borderline(images: Sequence[AuditImage], threshold: float, n: int) -> list[AuditImage]:
    """The ``n`` images whose web text scored nearest the threshold, in score order."""
    near = sorted(images, key=lambda im: (abs(im.web_score - threshold), im.uid))[:n]
    return sorted(near, key=lambda im: (im.web_score, im.uid))


# ============================================================================== thumbnails


class Thumbnails:
    """Writes one small PNG per image shown into ``folder`` and gives its path relative to the page."""

    def __init__(self, images: Mapping[str, bytes], folder: Path, prefix: str, size: int = 128) -> None:
        self.images = images
        self.folder = folder
        self.prefix = prefix  # the folder as the page links it: "report_files/thumbs"
        self.size = size
        self.written: dict[str, str | None] = {}

    def src(self, uid: str) -> str | None:
        if uid not in self.written:
            self.written[uid] = self._write(uid)
        return self.written[uid]

    def _write(self, uid: str) -> str | None:
        data = self.images.get(uid)
        if not data:
            return None
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as opened:
                thumb = opened.convert("RGB")
            thumb.thumbnail((self.size, self.size))
            name = hashlib.sha1(uid.encode("utf-8")).hexdigest()[:16] + ".png"
            self.folder.mkdir(parents=True, exist_ok=True)
            thumb.save(self.folder / name, format="PNG")
        except Exception as err:  # a broken image must not break the report
            log.debug("no thumbnail for %s: %s", uid, err)
            return None
        return f"{self.prefix}/{name}"


# ==================================================================================== HTML


def _score(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def _pic(thumbs: Thumbnails, uid: str, cls: str = "") -> str:
    src = thumbs.src(uid)
    if src is None:
        return f'<div class="noimg {cls}">no image</div>'
    return f'<img class="{cls}" src="{_e(src)}" alt="image {_e(uid)}">'


def _text_line(r: Mapping[str, Any]) -> str:
    dec = r["decision"]
    truth = r.get("truth")
    mark = (
        ""
        if truth is None
        else (' <span class="true">true</span>' if truth else ' <span class="false">false</span>')
    )
    reason = f' <span class="reason">{_e(r["reason"])}</span>' if r.get("reason") and dec == "drop" else ""
    return (
        f'<div class="text"><span class="src">{_e(r["text_source"])}</span> '
        f'<span class="{"keep" if dec == "keep" else "drop"}">{_e(dec)}</span> '
        f'<span class="score">ITM {_e(_score(r.get("itm_score")))}</span>{mark}{reason}'
        f'<div class="said">{_e(r.get("text"))}</div></div>'
    )


def _card(im: AuditImage, thumbs: Thumbnails) -> str:
    rows = sorted(
        im.rows, key=lambda r: (r["text_source"] != "web", r["text_source"], r.get("text_index") or 0)
    )
    return (
        f'<div class="card" data-uid="{_e(im.uid)}" data-score="{im.web_score:.4f}">'
        f"{_pic(thumbs, im.uid)}<div>{''.join(_text_line(r) for r in rows)}</div></div>"
    )


def grids_html(cells: Mapping[str, list[tuple[int, int, list[AuditImage]]]], thumbs: Thumbnails) -> str:
    """One block per category; one row of cards per score bin, with the bin's image count."""
    parts = []
    for key, heading in CATEGORIES:
        total = sum(count for _, count, _ in cells.get(key, []))
        rows = []
        for b, count, picked in cells.get(key, []):
            cards = "".join(_card(im, thumbs) for im in picked)
            body = cards or '<span class="note">none</span>'
            rows.append(
                f'<div class="binrow" data-bin="{_e(bin_label(b))}" data-count="{count}"><div class="binhead">web ITM<br>{_e(bin_label(b))}<br>'
                f'<span class="note">{count:,} image{"" if count == 1 else "s"}</span></div>'
                f'<div class="cards">{body}</div></div>'
            )
        parts.append(
            f'<div class="grid" id="grid-{_e(key)}" data-category="{_e(key)}">'
            f'<h3>{_e(heading)} <span class="note">({total:,} images)</span></h3>{"".join(rows)}</div>'
        )
    return "".join(parts)


def borderline_html(images: Sequence[AuditImage], thumbs: Thumbnails, threshold: float) -> str:
    """A compact table, one line per image: thumbnail, web ITM, decision, the web text and what
    was kept instead."""
    if not images:
        return '<p class="note">no scored web text</p>'
    body = []
    for im in images:
        web = im.web
        others = [r for r in im.rows if r["text_source"] != "web" and r["decision"] == "keep"]
        dec = web["decision"]
        if others:
            instead = "; ".join(str(r.get("text")) for r in others)
        else:
            instead = "" if dec == "keep" else "(nothing: the image leaves the set)"
        truth = web.get("truth")
        mark = "" if truth is None else ("true" if truth else "false")
        body.append(
            f'<tr data-uid="{_e(im.uid)}" data-score="{im.web_score:.4f}"><td>{_pic(thumbs, im.uid, "small")}</td>'
            f'<td class="num">{_e(f"{im.web_score:.4f}")}</td>'
            f'<td class="{"keep" if dec == "keep" else "drop"}">{_e(dec)}</td>'
            f'<td class="{_e(mark)}">{_e(mark)}</td><td>{_e(web.get("text"))}</td><td>{_e(instead)}</td></tr>'
        )
    head = (
        "<tr><th>image</th><th>web ITM</th><th>decision</th><th>truth</th><th>web text</th>"
        "<th>kept instead (synthetic, human)</th></tr>"
    )
    return f'<table class="borderline">{head}{"".join(body)}</table>'
