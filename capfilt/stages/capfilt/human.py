"""Human pairs (COCO-Karpathy JSON or SAMPLE shards): passed through CapFilt unscored, into their own
shards. The driver plans them from texts and image paths only; ``write_human_shard`` runs as a Ray
task and is the only reader of their images."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location
from capfilt.core.shards import write_json_atomic, write_parquet_atomic
from capfilt.core.text import pre_caption
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.decisions import (
    DROP,
    KEEP,
    REASON_EMPTY,
    REASON_HUMAN,
    REASON_MISSING,
    shard_paths,
)
from capfilt.stages.capfilt.inputs import _input_files, input_images
from capfilt.stages.capfilt.writer import cleaned_table, shard_stats

HUMAN_PREFIX = "human-"  # human shards are named human-NNNNN beside the web shards


@dataclass
class HumanShard:
    name: str
    pairs: pa.Table  # uid, text, text_index, url, image_ref: no image bytes
    source: Location | None = None  # the SAMPLE shard whose rows hold the images; None: image files


def human_shards(human: Location, images_dir: Location | None, shard_size: int) -> list[HumanShard]:
    """Human pairs from a COCO-Karpathy-style JSON list (``image``: path under ``images_dir``,
    ``caption``: str or list) or from a folder of SAMPLE shards (success rows)."""
    if human.is_dir():
        shards = []
        for f in _input_files(human, "--human"):
            t = fs.read_parquet(f, columns=["uid", "url", "text", "status"])
            t = t.filter(pc.equal(t.column("status"), S.SUCCESS)).drop(["status"])
            t = t.append_column("text_index", pa.array([0] * t.num_rows, pa.int64()))
            t = t.append_column("image_ref", pa.array([str(f.resolve())] * t.num_rows, pa.string()))
            shards.append(HumanShard(f"{HUMAN_PREFIX}{f.stem}", t, f.resolve()))
        return shards
    if not human.is_file():
        raise ConfigError(
            f"--human {human} does not exist; pass a Karpathy-style JSON file or a shards folder"
        )
    try:
        entries = json.loads(human.read_bytes())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--human {human} is not JSON: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "image" in e for e in entries):
        raise ConfigError(f"--human {human}: expected a list of {{'image': ..., 'caption': ...}} entries")
    root = images_dir or human.parent
    cols: dict[str, list[Any]] = {"uid": [], "text": [], "text_index": [], "url": [], "image_ref": []}
    seen: Counter[str] = Counter()
    for e in entries:
        caps = e.get("caption", [])
        for cap in caps if isinstance(caps, list) else [caps]:
            image = str(e["image"])
            uid = S.make_uid("human", image, "")
            cols["uid"].append(uid)
            cols["text"].append(cap)
            cols["text_index"].append(seen[uid])
            cols["url"].append(None)
            cols["image_ref"].append(str((root / image).resolve()))
            seen[uid] += 1
    table = pa.table(
        cols,
        schema=pa.schema(
            [
                ("uid", pa.string()),
                ("text", pa.string()),
                ("text_index", pa.int64()),
                ("url", pa.string()),
                ("image_ref", pa.string()),
            ]
        ),
    )
    return [
        HumanShard(f"{HUMAN_PREFIX}{i:05d}", table.slice(start, shard_size))
        for i, start in enumerate(range(0, table.num_rows, shard_size))
    ]


def write_human_shard(out: Location, shard: HumanShard, cfg: CapFiltConfig) -> dict[str, Any]:
    """Ray task: a human shard's candidates, cleaned rows (images read here), then stats (last)."""
    t0 = time.time()
    pairs = shard.pairs
    n = pairs.num_rows
    from_files = shard.source is None
    refs = pairs.column("image_ref").to_pylist()
    exists = [fs.location(r).is_file() for r in refs] if from_files else [True] * n
    decision, reason = [], []
    for text, ok, ref in zip(pairs.column("text").to_pylist(), exists, refs, strict=True):
        if not ok:
            decision.append(DROP)
            reason.append(f"{REASON_MISSING}: {ref}")
        elif not pre_caption(text, cfg.max_words):
            decision.append(DROP)
            reason.append(REASON_EMPTY)
        else:
            decision.append(KEEP)
            reason.append(REASON_HUMAN)
    uids, texts, idx = (
        pairs.column("uid").to_pylist(),
        pairs.column("text").to_pylist(),
        pairs.column("text_index"),
    )
    candidates = pa.table(
        {
            "uid": uids,
            "text_uid": [
                S.make_text_uid(u, "human", i, t or "")
                for u, i, t in zip(uids, idx.to_pylist(), texts, strict=True)
            ],
            "text": texts,
            "text_source": ["human"] * n,
            "text_index": idx,
            "itm_score": pa.nulls(n, pa.float32()),
            "itc_score": pa.nulls(n, pa.float32()),
            "rank": pa.nulls(n, pa.int32()),
            "decision": decision,
            "reason": reason,
            "round": pa.array([cfg.round] * n, pa.int32()),
            "captioner_id": pa.nulls(n, pa.string()),
            "filter_id": pa.nulls(n, pa.string()),
        }
    )
    candidates = S.conform(candidates, S.CANDIDATE)
    if shard.source is None:
        want = cfg.images == "include"
        data = [
            fs.location(r).read_bytes() if want and ok and d == KEEP else None
            for r, ok, d in zip(refs, exists, decision, strict=True)
        ]
        images = pairs.append_column("image", pa.array(data, pa.binary()))
        # One image row per uid: the join is by uid.
        _, first = np.unique(np.asarray(images.column("uid").to_pylist(), dtype=object), return_index=True)
        images = images.take(pa.array(np.sort(first))).select(["uid", "url", "image", "image_ref"])
    else:
        kept = {u for u, d in zip(uids, decision, strict=True) if d == KEEP}
        images = input_images(shard.source, kept, cfg.images)
    cleaned = cleaned_table(candidates, images, cfg.images)
    candidates_file, kept_file, stats_file = shard_paths(out, shard.name)
    write_parquet_atomic(candidates_file, candidates)
    write_parquet_atomic(kept_file, cleaned)
    stats = shard_stats(
        shard.name,
        "human",
        candidates,
        cleaned.num_rows,
        {"rows_in": n, "wall_s": round(time.time() - t0, 3)},
        cfg.threshold,
    )
    write_json_atomic(stats_file, stats)
    return stats
