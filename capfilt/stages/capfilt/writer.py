"""Writing one shard's outputs atomically: candidates, kept rows (cleaned/ or captions/), then its stats
(last: they mark it done)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import schema as S
from capfilt.core.errors import StageFailed
from capfilt.core.layout import CLEANED_DIR
from capfilt.core.shards import write_json_atomic, write_parquet_atomic
from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
from capfilt.stages.capfilt.decisions import KEEP, REASON_UNDECODABLE, kept_dir, reason_key, shard_paths
from capfilt.stages.capfilt.inputs import _Plan, input_images
from capfilt.stages.capfilt.score import CANDIDATE_FIELDS

# Schema metadata of a kept-texts shard written with images="reference".
IMAGES_KEY = b"capfilt.images"  # b"ref": the shard holds no image bytes, only image_ref
IMAGE_SOURCES_KEY = b"capfilt.image_sources"  # JSON list: the Parquet shards or image folders referenced


@dataclass
class _RunIds:
    round: int
    captioner_id: str | None
    filter_id: str | None


def candidate_table(parts: list[pa.Table], ids: _RunIds) -> pa.Table:
    """CANDIDATE rows of one shard in a fixed order: input row, web before synthetic, index."""
    table = pa.concat_tables(parts) if parts else pa.schema(CANDIDATE_FIELDS).empty_table()
    if table.num_rows:
        # "web" > "synthetic" > "human": descending puts the web text first.
        table = table.sort_by(
            [("row", "ascending"), ("text_source", "descending"), ("text_index", "ascending")]
        )
    n = table.num_rows
    for name in ("itm_score", "itc_score"):  # NaN in flight (numpy), null on disk
        col = table.column(name).cast(pa.float32())
        table = table.set_column(
            table.schema.get_field_index(name), name, pc.if_else(pc.is_nan(col), None, col)
        )
    table = table.append_column("round", pa.array([ids.round] * n, pa.int32()))
    table = table.append_column("captioner_id", pa.array([ids.captioner_id] * n, pa.string()))
    table = table.append_column("filter_id", pa.array([ids.filter_id] * n, pa.string()))
    return S.conform(table, S.CANDIDATE)


def cleaned_table(candidates: pa.Table, images: pa.Table, images_mode: str) -> pa.Table:
    """CLEANED rows: the kept candidates joined by uid with ``images`` (uid, url, image, image_ref)."""
    kept = candidates.filter(pc.equal(candidates.column("decision"), KEEP))
    index = {u: i for i, u in enumerate(images.column("uid").to_pylist())}
    missing = {u for u in kept.column("uid").to_pylist() if u not in index}
    if missing:
        raise StageFailed(f"{len(missing)} kept uids have no image row (e.g. {sorted(missing)[:3]})")
    src = images.take(pa.array([index[u] for u in kept.column("uid").to_pylist()], pa.int64()))
    n = kept.num_rows
    image = src.column("image") if images_mode == "include" else pa.nulls(n, pa.binary())
    cols = {f.name: kept.column(f.name) for f in S.CLEANED if f.name in kept.column_names}
    cols |= {"url": src.column("url"), "image": image, "image_ref": src.column("image_ref")}
    table = S.conform(pa.table(cols), S.CLEANED)
    if images_mode == "include":
        return table
    # A reader of this shard alone must learn that ``image`` is null on purpose and where to look.
    return table.replace_schema_metadata(image_ref_metadata(src.column("image_ref").to_pylist()))


def image_ref_metadata(refs: list[str | None]) -> dict[bytes, bytes]:
    """Schema metadata of a cleaned shard whose images are referenced, not embedded: the mode and
    where the referenced images are (Parquet shards by path; image files by their folder)."""
    sources = {r if r.endswith(".parquet") else str(Path(r).parent) for r in refs if r}
    return {IMAGES_KEY: b"ref", IMAGE_SOURCES_KEY: json.dumps(sorted(sources)).encode()}


def _mean_parts(candidates: pa.Table) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"texts": {}, "kept": {}, "scored": {}, "itm_sum": {}, "itc_sum": {}}
    for row in candidates.select(["text_source", "decision", "itm_score", "itc_score"]).to_pylist():
        src = row["text_source"]
        out["texts"][src] = out["texts"].get(src, 0) + 1
        out["kept"][src] = out["kept"].get(src, 0) + (row["decision"] == KEEP)
        if row["itm_score"] is not None:
            out["scored"][src] = out["scored"].get(src, 0) + 1
            out["itm_sum"][src] = out["itm_sum"].get(src, 0.0) + row["itm_score"]
            out["itc_sum"][src] = out["itc_sum"].get(src, 0.0) + row["itc_score"]
    return out


def shard_stats(
    name: str, kind: str, candidates: pa.Table, cleaned_rows: int, extra: dict[str, Any], threshold: float
) -> dict[str, Any]:
    parts = _mean_parts(candidates)
    reasons = Counter(reason_key(r) for r in candidates.column("reason").to_pylist() if r is not None)
    kept_uids = set(
        candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist()
    )
    all_uids = set(candidates.column("uid").to_pylist())
    return {
        "stage": STAGE,
        "kind": kind,
        "shard": name,
        "rows_out": cleaned_rows,
        "texts": parts["texts"],
        "kept": parts["kept"],
        "scored": parts["scored"],
        "itm_sum": parts["itm_sum"],
        "itc_sum": parts["itc_sum"],
        "images_with_texts": len(all_uids),
        "images_no_kept_text": len(all_uids - kept_uids),
        "reason_counts": dict(reasons.most_common()),
        "threshold": threshold,
        "attempts": 1,
        **extra,
    }


def _write_web_shard(
    out: Path, plan: _Plan, parts: list[pa.Table], ids: _RunIds, cfg: CapFiltConfig, t0: float
) -> dict[str, Any]:
    candidates = candidate_table(parts, ids)
    images = int(pc.sum(pc.equal(candidates.column("text_source"), "web")).as_py() or 0)
    if images != plan.images:
        raise StageFailed(f"shard {plan.name}: {plan.images} images in, {images} came back")
    kept_uids = set(
        candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist()
    )
    cleaned = cleaned_table(candidates, input_images(plan.path, kept_uids, cfg.images), cfg.images)
    candidates_file, kept_file, stats_file = shard_paths(out, plan.name, kept_dir(ids.filter_id is not None))
    write_parquet_atomic(candidates_file, candidates)
    write_parquet_atomic(kept_file, cleaned)
    undecodable = pc.sum(
        pc.and_(
            pc.equal(candidates.column("text_source"), "web"),
            pc.starts_with(pc.fill_null(candidates.column("reason"), ""), REASON_UNDECODABLE),
        )
    ).as_py()
    extra = {
        "input": str(plan.path),
        "rows_in": plan.rows_in,
        "status_counts": plan.status_counts,
        "images": plan.images,
        "images_not_decodable": int(undecodable or 0),
        "wall_s": round(time.time() - t0, 3),
    }
    stats = shard_stats(plan.name, "web", candidates, cleaned.num_rows, extra, cfg.threshold)
    write_json_atomic(stats_file, stats)  # last: the shard is done
    return stats


def shard_done(out: Path, name: str, kept: str = CLEANED_DIR) -> bool:
    """Whether shard ``name`` of run folder ``out`` has all its files (a rerun skips it); ``kept``
    is the folder of its kept texts (``decisions.kept_dir``)."""
    return all(p.is_file() for p in shard_paths(out, name, kept))
