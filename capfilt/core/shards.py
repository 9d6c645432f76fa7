"""Shard bookkeeping shared by every stage: paths, atomic writes, stats files, the run manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.core.layout import INPUTS_DIR, MANIFEST, STATS_DIR, SUMMARY, TMP_DIR

__all__ = ["INPUTS_DIR", "MANIFEST", "STATS_DIR", "SUMMARY", "TMP_DIR"]


def shard_name(shard: int) -> str:
    """The file stem of shard number `shard` (a non-negative int: never text from the data)."""
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"a shard number must be a non-negative int, got {shard!r}")
    return f"{shard:05d}"


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"{shard_name(shard)}.parquet"


def stats_path(out_dir: Path, shard: int) -> Path:
    return out_dir / STATS_DIR / f"{shard_name(shard)}.json"


def safe_component(name: str, what: str = "name") -> str:
    """`name` if it is one plain path component (a file stem from the data, a manifest, a run
    name), else ValueError: empty, ".", "..", a separator, a drive or a NUL would let a path built
    from it leave its folder."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in ("/", "\\", "\x00"))
        or Path(name).is_absolute()
        or (len(name) >= 2 and name[1] == ":")
    ):
        raise ValueError(f"{what} {name!r} cannot name a file: it must be one plain path component")
    return name


def inside(root: Path, *parts: str) -> Path:
    """`root` joined with `parts`, each checked by safe_component: a path that stays in `root`."""
    path = root
    for part in parts:
        path = path / safe_component(part, "path component")
    return path


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
