"""Shard bookkeeping shared by every stage: paths, atomic writes, stats files, the run manifest."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.core import fs
from capfilt.core.fs import Location
from capfilt.core.layout import INPUTS_DIR, MANIFEST, STATS_DIR, SUMMARY, TMP_DIR

__all__ = ["INPUTS_DIR", "MANIFEST", "STATS_DIR", "SUMMARY", "TMP_DIR"]


def shard_name(shard: int) -> str:
    """The file stem of shard number `shard` (a non-negative int: never text from the data)."""
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"a shard number must be a non-negative int, got {shard!r}")
    return f"{shard:05d}"


def shard_path(out_dir: Location, shard: int) -> Location:
    return out_dir / f"{shard_name(shard)}.parquet"


def stats_path(out_dir: Location, shard: int) -> Location:
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


def inside(root: Location, *parts: str) -> Location:
    """`root` joined with `parts`, each checked by safe_component: a path that stays in `root`."""
    path = root
    for part in parts:
        path = path / safe_component(part, "path component")
    return path


def write_json_atomic(path: Location, obj: Any) -> None:
    """Write JSON so a crash never leaves a half file behind (``capfilt.core.fs.write_atomic``)."""
    fs.write_json_atomic(path, obj)


def write_parquet_atomic(path: Location, table: pa.Table) -> None:
    """Write a Parquet file whole or not at all: temp file and rename locally, one put remotely."""
    if isinstance(path, fs.RemotePath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        fs.write_atomic(path, sink.getvalue().to_pybytes())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Location | str) -> Any:
    return fs.read_json(path)


def done_shards(out_dir: Location) -> set[int]:
    """Shards whose stats file exists. The stats file is written last, so it marks a shard done."""
    sdir = out_dir / STATS_DIR
    if not sdir.exists():
        return set()
    shards = {p.stem for p in out_dir.glob("*.parquet")}  # one listing, not one request per shard
    return {int(p.stem) for p in sdir.glob("*.json") if p.stem.isdigit() and p.stem in shards}


def read_shard_stats(out_dir: Location) -> list[dict[str, Any]]:
    return [read_json(stats_path(out_dir, s)) for s in sorted(done_shards(out_dir))]
