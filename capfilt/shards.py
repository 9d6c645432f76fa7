"""Shard bookkeeping shared by every stage: paths, atomic writes, stats files, the run manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Files and folders whose names start with "_" are skipped by pyarrow, Ray Data and pandas when
# they read a folder of Parquet shards, so bookkeeping lives there and the shards stay readable.
STATS_DIR = "_stats"
INPUTS_DIR = "_inputs"
TMP_DIR = "_tmp"
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"{shard_name(shard)}.parquet"


def stats_path(out_dir: Path, shard: int) -> Path:
    return out_dir / STATS_DIR / f"{shard_name(shard)}.json"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file and rename, so a crash never leaves a half file behind."""
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Write a Parquet file via a temp file and rename."""
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def done_shards(out_dir: Path) -> set[int]:
    """Shards whose stats file exists. The stats file is written last, so it marks a shard done."""
    sdir = out_dir / STATS_DIR
    if not sdir.exists():
        return set()
    done = set()
    for p in sdir.glob("*.json"):
        if p.stem.isdigit() and shard_path(out_dir, int(p.stem)).exists():
            done.add(int(p.stem))
    return done


def read_shard_stats(out_dir: Path) -> list[dict[str, Any]]:
    return [read_json(stats_path(out_dir, s)) for s in sorted(done_shards(out_dir))]
