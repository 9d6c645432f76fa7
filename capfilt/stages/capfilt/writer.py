"""Writing CapFilt's outputs in Ray workers: each chunk's candidate rows to a part file
(``write_parts``, the last act of the filter actor or of the unscored step), then each shard's
outputs atomically from its parts and its input shard's images (``write_web_shard``, a Ray task):
candidates, kept rows (cleaned/ or captions/), the filter's image embeddings (embeddings/), the
images dedup_before skipped (removed/), then its stats (last: they mark it done). The
driver only sees the small receipts and stats these return."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import StageFailed
from capfilt.core.fs import Location
from capfilt.core.layout import CLEANED_DIR, EMBEDDINGS_DIR, PARTS_DIR, REMOVED_DIR
from capfilt.core.shards import inside, write_json_atomic, write_parquet_atomic
from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
from capfilt.stages.capfilt.decisions import KEEP, REASON_UNDECODABLE, kept_dir, reason_key, shard_paths
from capfilt.stages.capfilt.dedup_before import skipped_table
from capfilt.stages.capfilt.embed import embedding_table
from capfilt.stages.capfilt.inputs import _Plan, input_images
from capfilt.stages.capfilt.score import CANDIDATE_FIELDS
from capfilt.stages.capfilt.select import selection_record

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
    sources = {r if r.endswith(".parquet") else str(fs.location(r).parent) for r in refs if r}
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


# What the driver gets back for each part file: where it is and the counts that tell when a
# shard has all its rows (an image's web row, and k captions when it decoded and a captioner ran).
RECEIPT = pa.schema(
    [
        ("input_shard", pa.string()),
        ("part", pa.string()),
        ("rows", pa.int64()),
        ("images", pa.int64()),
        ("decoded", pa.int64()),
    ]
)


def parts_dir(out: Location, shard: str) -> Location:
    """Where shard ``shard``'s part files wait until the shard is written."""
    return inside(out / PARTS_DIR, shard)


def _undecodable(candidates: pa.Table) -> int:
    """Web rows whose image did not decode."""
    web = pc.equal(candidates.column("text_source"), "web")
    bad = pc.starts_with(pc.fill_null(candidates.column("reason"), ""), REASON_UNDECODABLE)
    return int(pc.sum(pc.and_(web, bad)).as_py() or 0)


def write_parts(batch: pa.Table, out: str) -> pa.Table:
    """In the filter actor (or the unscored step): each (shard, chunk) of the candidate rows in
    ``batch`` goes to a part file of its own under ``out/_parts/<shard>/`` (a fresh name each
    time, so a retried call never overwrites a part another receipt names); one receipt per part
    comes back."""
    root = fs.location(out)
    rows: dict[str, list[Any]] = {name: [] for name in RECEIPT.names}
    keys = batch.select(["input_shard", "chunk"]).group_by(["input_shard", "chunk"]).aggregate([])
    for shard, chunk in zip(
        keys.column("input_shard").to_pylist(), keys.column("chunk").to_pylist(), strict=True
    ):
        mask = pc.and_(pc.equal(batch.column("input_shard"), shard), pc.equal(batch.column("chunk"), chunk))
        part = batch.filter(mask).drop(["input_shard", "chunk"])
        path = parts_dir(root, shard) / f"{chunk:06d}-{uuid.uuid4().hex[:12]}.parquet"
        write_parquet_atomic(path, part)
        images = int(pc.sum(pc.equal(part.column("text_source"), "web")).as_py() or 0)
        for key, value in zip(
            RECEIPT.names, (shard, str(path), part.num_rows, images, images - _undecodable(part)), strict=True
        ):
            rows[key].append(value)
    return pa.table(rows, schema=RECEIPT)


def write_web_shard(
    out: Location, plan: _Plan, parts: list[str], ids: _RunIds, cfg: CapFiltConfig, t0: float
) -> dict[str, Any]:
    """Ray task: one input shard's outputs from its part files (every candidate row of its
    images) and its images: candidates, kept rows, then stats (last). Returns the stats."""
    tables = [fs.read_parquet(p) for p in parts]
    candidates = candidate_table(tables, ids)
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
    if ids.filter_id is not None:  # each image's filter embedding, for dedup
        write_parquet_atomic(
            out / EMBEDDINGS_DIR / f"{plan.name}.parquet", embedding_table(tables, ids.filter_id)
        )
    if cfg.dedup_before:  # the images skipped as duplicates, with why and of what
        write_parquet_atomic(out / REMOVED_DIR / f"{plan.name}.parquet", skipped_table(plan, ids))
    extra = {
        "input": str(plan.path),
        "rows_in": plan.rows_in,
        "status_counts": plan.status_counts,
        "images": plan.images,
        "images_not_decodable": _undecodable(candidates),
        "wall_s": round(time.time() - t0, 3),
        "selection": selection_record(cfg),
        "images_skipped_duplicate": len(plan.skipped),
    }
    stats = shard_stats(plan.name, "web", candidates, cleaned.num_rows, extra, cfg.threshold)
    write_json_atomic(stats_file, stats)  # last: the shard is done
    fs.rmtree(parts_dir(out, plan.name))
    return stats


def shard_done(out: Location, name: str, kept: str = CLEANED_DIR) -> bool:
    """Whether shard ``name`` of run folder ``out`` has all its files (a rerun skips it); ``kept``
    is the folder of its kept texts (``decisions.kept_dir``)."""
    return all(p.is_file() for p in shard_paths(out, name, kept))
