"""Dedup before captioning (``CapFiltConfig.dedup_before``): a cheap pass embeds every downloaded
image with the filter's ViT and ``vision_proj`` alone (no decoding, no text, no ITM), finds exact
(sha256) and near (cosine >= ``dedup_min_cosine``) duplicates with the dedup stage's core
(``capfilt.stages.dedup.find_duplicates``), and the pipeline then neither captions nor scores them.

Who is kept: with no ITM score yet, the first image of each group by input row order (the row of
the user's URL list; the download shard name breaks ties). That is deterministic, needs nothing
the pass does not have, and keeps the copy that came first in the list.

The plan (uid, input shard, reason, duplicate_of, cosine per skipped image) is written once to
``_dedup_before.parquet``, so a resumed run skips the same images without a second pass. Each
shard's writer puts its skipped images in ``removed/NNNNN.parquet`` (REMOVED: the web text,
unscored, its bytes referenced in the download shard), so every image still ends somewhere."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.fs import Location
from capfilt.core.layout import DEDUP_BEFORE
from capfilt.core.shards import write_parquet_atomic

if TYPE_CHECKING:
    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.inputs import _Plan
    from capfilt.stages.capfilt.models import ModelRef
    from capfilt.stages.capfilt.writer import _RunIds

log = logging.getLogger(__name__)

PLAN_KEY = b"capfilt.dedup_before"  # the plan file's metadata: how long its pass took, on what


def embed_images(plans: list[_Plan], ref: ModelRef, cfg: CapFiltConfig) -> pa.Table:
    """The image-embedding pass on Ray Data: read and decode tasks, then ``ImageEmbedActor``s.
    Returns uid, row, embedding (float16) and input_shard of every decodable image; only those
    small columns come back to the driver."""
    import ray

    from capfilt.stages.capfilt.actors import ImageEmbedActor
    from capfilt.stages.capfilt.chunks import EMBEDDED, preprocess_chunks, read_chunks
    from capfilt.stages.capfilt.driver import _gpus_per_actor

    shards = [{"path": str(p.path), "input_shard": p.name} for p in plans if p.images]
    if not shards:
        return EMBEDDED.empty_table()
    ds: Any = ray.data.from_items(shards, override_num_blocks=len(shards))
    ds = ds.map_batches(
        read_chunks, fn_kwargs={"batch_size": cfg.batch_size}, batch_size=1, num_cpus=cfg.preprocess_cpus
    )
    ds = ds.map_batches(
        preprocess_chunks,
        fn_kwargs={"image_sizes": [ref.image_size]},
        batch_size=1,
        num_cpus=cfg.preprocess_cpus,
    )
    ds = ds.repartition(target_num_rows_per_block=1)
    gpus = _gpus_per_actor(cfg, cfg.filter_actors)
    ds = ds.map_batches(
        ImageEmbedActor,
        fn_constructor_kwargs={"ref": ref, "cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=cfg.filter_actors),
        batch_size=1,
        num_cpus=cfg.cpus_per_actor,
        **({"num_gpus": gpus} if gpus else {}),
    )
    tables = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return (
        pa.concat_tables([t.select(EMBEDDED.names).cast(EMBEDDED) for t in tables])
        if tables
        else EMBEDDED.empty_table()
    )


def duplicates_before(plans: list[_Plan], embedded: pa.Table, min_cosine: float) -> pa.Table:
    """The images to skip: uid, input_shard, reason, duplicate_of, cosine. Every downloaded image
    takes part (an undecodable one by its hash alone); the first by input row is kept."""
    from capfilt.stages.dedup import find_duplicates

    index = {u: i for i, u in enumerate(embedded.column("uid").to_pylist())}
    images = []
    for p in plans:
        t = fs.read_parquet(p.path, columns=["uid", "row", "status", "sha256"])
        t = t.filter(pc.equal(t.column("status"), S.SUCCESS))
        images.append(
            t.select(["uid", "row", "sha256"]).append_column("input_shard", pa.array([p.name] * t.num_rows))
        )
    table = pa.concat_tables(images).sort_by([("row", "ascending"), ("input_shard", "ascending")])
    at = [index.get(u) for u in table.column("uid").to_pylist()]
    vectors = embedded.column("embedding").take(pa.array(at, pa.int64()))  # null where none
    table = table.append_column("embedding", vectors)
    dups = find_duplicates(table, min_cosine)
    shard = dict(zip(table.column("uid").to_pylist(), table.column("input_shard").to_pylist(), strict=True))
    return dups.append_column(
        "input_shard", pa.array([shard[u] for u in dups.column("uid").to_pylist()], pa.string())
    )


def plan_dedup_before(
    out: Location,
    plans: list[_Plan],
    ref: ModelRef | None,
    cfg: CapFiltConfig,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Find (or, resuming, read) the images to skip, and take them out of ``plans``: each plan's
    ``skipped`` lists them, its ``images`` counts only the rest. Returns the pass's figures."""
    from capfilt.core.cluster import ensure_ray
    from capfilt.core.errors import ConfigError

    if ref is None:
        raise ConfigError("capfilt.dedup_before embeds the images with the filter's ViT: pass a filter")
    path = out / DEDUP_BEFORE
    if path.is_file():
        dups = fs.read_parquet(path)
        info = json.loads((dups.schema.metadata or {}).get(PLAN_KEY, b"{}"))
        log.info("dedup before captioning: %d images to skip, as planned before", dups.num_rows)
    else:
        ensure_ray(ray_address)
        t0 = time.time()
        embedded = embed_images(plans, ref, cfg)
        dups = duplicates_before(plans, embedded, cfg.dedup_min_cosine)
        info = {"embed_pass_s": round(time.time() - t0, 3), "images_embedded": embedded.num_rows}
        write_parquet_atomic(path, dups.replace_schema_metadata({PLAN_KEY: json.dumps(info).encode()}))
    rows = dups.to_pylist()
    for p in plans:
        p.skipped = [
            {k: r[k] for k in ("uid", "reason", "duplicate_of", "cosine")}
            for r in rows
            if r["input_shard"] == p.name
        ]
        p.images -= len(p.skipped)
    reasons = Counter(r["reason"] for r in rows)
    figures = {
        "images_skipped": len(rows),
        "images_skipped_exact": reasons.get(S.EXACT_DUPLICATE, 0),
        "images_skipped_near": reasons.get(S.NEAR_DUPLICATE, 0),
        "min_cosine": cfg.dedup_min_cosine,
        **info,
    }
    log.info(
        "dedup before captioning: skipping %d of %d images (%d exact, %d near at cosine >= %s)",
        figures["images_skipped"],
        sum(p.images for p in plans) + len(rows),
        figures["images_skipped_exact"],
        figures["images_skipped_near"],
        cfg.dedup_min_cosine,
    )
    return figures


def skipped_table(plan: _Plan, ids: _RunIds) -> pa.Table:
    """REMOVED rows of the images ``plan`` skipped: each image's web text, unscored, its bytes left
    in the download shard (``image_ref``). Runs in the shard's writer task."""
    if not plan.skipped:
        return S.empty(S.REMOVED)
    info = {r["uid"]: r for r in plan.skipped}
    src = fs.read_parquet(plan.path, columns=["uid", "url", "text"])
    src = src.filter(pc.is_in(src.column("uid"), pa.array(sorted(info), pa.string())))
    uids = src.column("uid").to_pylist()
    texts = src.column("text").to_pylist()
    n = src.num_rows
    cols = {
        "uid": uids,
        "text_uid": [S.make_text_uid(u, "web", 0, t or "") for u, t in zip(uids, texts, strict=True)],
        "text": texts,
        "text_source": ["web"] * n,
        "itm_score": [None] * n,
        "itc_score": [None] * n,
        "round": [ids.round] * n,
        "captioner_id": [None] * n,
        "filter_id": [ids.filter_id] * n,  # its embedding found the duplicate
        "url": src.column("url").to_pylist(),
        "image": [None] * n,
        "image_ref": [str(plan.path)] * n,
        "reason": [info[u]["reason"] for u in uids],
        "duplicate_of": [info[u]["duplicate_of"] for u in uids],
        "cosine": [info[u]["cosine"] for u in uids],
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in S.REMOVED}, schema=S.REMOVED)


def per_image_seconds(shard_stats: list[dict[str, Any]], seconds: float, images: int) -> float | None:
    """Wall seconds per image of the captioning + filtering pipeline: between the first and the
    last web shard this run wrote (their stats' ``wall_s``), so actor start-up and model loading
    are left out; with fewer than two such shards, the whole pipeline's time per image."""
    done = sorted(
        (s for s in shard_stats if s.get("kind") == "web" and s.get("images")), key=lambda s: s["wall_s"]
    )
    if len(done) >= 2 and done[-1]["wall_s"] > done[0]["wall_s"]:
        return float((done[-1]["wall_s"] - done[0]["wall_s"]) / sum(s["images"] for s in done[1:]))
    return seconds / images if images else None


def work_saved(
    figures: dict[str, Any], per_image: float | None, images_run: int, seconds: float
) -> dict[str, Any]:
    """The GPU (model) work the skipped images did not cost: the measured seconds per image of
    this run's captioning + filtering (``per_image_seconds``) times the images skipped, and that
    less the embedding pass. None when no image ran this time (a rerun of a finished run)."""
    saved = per_image * figures["images_skipped"] if per_image is not None else None
    embed_s = figures.get("embed_pass_s")
    return {
        **figures,
        "images_captioned_and_scored": images_run,
        "pipeline_s": round(seconds, 3),
        "seconds_per_image": round(per_image, 6) if per_image is not None else None,
        "seconds_saved": round(saved, 3) if saved is not None else None,
        "net_seconds_saved": round(saved - embed_s, 3) if saved is not None and embed_s is not None else None,
    }
