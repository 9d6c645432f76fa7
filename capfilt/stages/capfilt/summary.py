"""The run summary of a CapFilt folder: every finished shard's stats added up, and the lines the CLI prints."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.layout import CLEANED_DIR, MANIFEST, STATS_DIR
from capfilt.core.shards import read_json
from capfilt.stages.capfilt.decisions import REASON_HUMAN, REASON_NO_FILTER, kept_dir


@dataclass
class CapFiltSummary:
    images: int  # downloaded images (success rows) of finished shards
    images_not_decodable: int
    images_no_kept_text: int  # web images none of whose texts was kept
    rows_not_images: dict[str, int]  # input rows skipped, by download status
    texts_considered: dict[str, int]  # by text_source
    kept: dict[str, int]
    mean_itm: dict[str, float | None]  # over scored texts, by source
    mean_itc: dict[str, float | None]
    reason_counts: dict[str, int]
    threshold: float
    shards_total: int
    shards_written: int = 0
    shards_skipped: int = 0
    shards_pending: int = 0
    human_pairs: int = 0
    wall_s: float = 0.0
    out_dir: str = ""
    kept_dir: str = CLEANED_DIR  # where the web shards' kept texts are: captions/ without a filter
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        total_t, total_k = sum(self.texts_considered.values()), sum(self.kept.values())
        filtered = self.kept_dir == CLEANED_DIR
        rule = f"at p(match) >= {num(self.threshold)}" if filtered else "unscored (no filter)"
        out = [
            f"images:             {self.images} ({self.images_not_decodable} not decodable)",
            f"not images:         {sum(self.rows_not_images.values())} input rows "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.rows_not_images.items())) or 'none'})",
            f"texts considered:   {total_t} ({by_source(self.texts_considered)})",
            f"kept:               {total_k} ({by_source(self.kept)}) {rule}",
            f"mean ITM p(match):  {by_source(self.mean_itm, num)}",
            f"mean ITC cosine:    {by_source(self.mean_itc, num)}",
            f"images, none kept:  {self.images_no_kept_text}",
        ]
        if self.human_pairs:
            out.append(f"human pairs:        {self.human_pairs}")
        drops = [(r, c) for r, c in self.reason_counts.items() if r not in (REASON_NO_FILTER, REASON_HUMAN)]
        if drops:
            out.append("drop reasons:")
            out.extend(f"  {count:>7}  {reason}" for reason, count in drops[:6])
        out.append(
            f"shards:             {self.shards_total} total, {self.shards_written} written now, "
            f"{self.shards_skipped} already done, {self.shards_pending} left for a rerun"
        )
        out.append(f"wall time:          {self.wall_s:.1f} s")
        if not filtered:
            out.append(f"caption shards:     {fs.location(self.out_dir) / self.kept_dir}")
        if filtered or self.human_pairs:
            out.append(f"cleaned shards:     {fs.location(self.out_dir) / CLEANED_DIR}")
        return out


def num(x: float) -> str:
    """A score or threshold for a person: 3 significant digits (0.354, not 0.35414565059636216)."""
    return f"{x:.3g}"


def by_source(d: Mapping[str, Any], fmt: Callable[[Any], str] = str) -> str:
    """``{"synthetic": 0.35, "web": None}`` as "synthetic 0.35, web -" (sorted by source)."""
    return ", ".join(f"{k} {fmt(v) if v is not None else '-'}" for k, v in sorted(d.items())) or "-"


def summarize(out: str | Path | fs.RemotePath, threshold: float, shards_total: int = 0) -> CapFiltSummary:
    """Add up every finished shard's stats under ``out`` (a local folder or a URI)."""
    out = fs.location(out)
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    files: list[fs.Location] = [*(out / STATS_DIR).glob("*.json")] if (out / STATS_DIR).exists() else []
    stats = [read_json(p) for p in sorted(files, key=str)]
    sums: dict[str, Counter[str]] = defaultdict(Counter)
    fsums: dict[str, defaultdict[str, float]] = {"itm_sum": defaultdict(float), "itc_sum": defaultdict(float)}
    images = undecodable = no_kept = human = 0
    for st in stats:
        for key in ("texts", "kept", "scored", "reason_counts"):
            sums[key].update(st[key])
        for key, acc in fsums.items():
            for src, v in st[key].items():
                acc[src] += v
        if st["kind"] == "web":
            sums["status"].update({k: v for k, v in st["status_counts"].items() if k != S.SUCCESS})
            images += st["images"]
            undecodable += st["images_not_decodable"]
            no_kept += st["images_no_kept_text"]
        else:
            human += st["rows_in"]
    scored = sums["scored"]
    return CapFiltSummary(
        images=images,
        images_not_decodable=undecodable,
        images_no_kept_text=no_kept,
        rows_not_images=dict(sorted(sums["status"].items())),
        texts_considered=dict(sorted(sums["texts"].items())),
        kept=dict(sorted(sums["kept"].items())),
        mean_itm={s: (fsums["itm_sum"][s] / scored[s] if scored[s] else None) for s in sorted(sums["texts"])},
        mean_itc={s: (fsums["itc_sum"][s] / scored[s] if scored[s] else None) for s in sorted(sums["texts"])},
        reason_counts=dict(sums["reason_counts"].most_common()),
        threshold=threshold,
        shards_total=shards_total or len(stats),
        human_pairs=human,
        out_dir=str(out),
        kept_dir=kept_dir(manifest.get("filter") is not None) if manifest else CLEANED_DIR,
    )
