"""Shard plans for a URL input, and the exact-duplicate pass, with no rows in the driver.

Plans. A shard is (file, row range, first global row number). For Parquet the planner reads only
each file's metadata (row counts): shard k of a file is rows [k * shard_size, (k + 1) *
shard_size) of that file, and its shard task reads those rows itself, from the row groups the
range overlaps (a list whose row groups are much larger than a shard is read that many times
over: write row groups of about a shard, or a few). CSV, TSV, JSON lines and compressed files
have no row index: the planner streams each once, one block at a time, and writes each shard's
rows (url, text, extra columns) to ``_inputs/NNNNN.parquet`` as soon as it has them, so it holds
at most one shard and one block. Shards never span two files; rows are numbered across the files
in order, so a single file shards exactly as before.

Duplicates. ``duplicate`` keeps its meaning over the whole input: a row whose (url, text) an
earlier row (a lower global row number) already had, with the URL's surrounding spaces ignored
and only rows with a usable URL counting; its reason names the earlier row's uid. The uid of an
exact repeat mixes in its occurrence number (capfilt.core.schema.make_uids), also global. Both
come from a hash-partitioned pass on Ray before any download, in groups of consecutive shards
(about ``dedup_partition_rows`` rows each; as many hash partitions as groups):

1. map, one task per group: read the group's rows, hash each row's (source, url, text) into its
   uid-of-first-occurrence key, and write (key, row) to the partition the key's hash picks;
2. reduce, one task per partition: sort its keys, and for every row that repeats an earlier one
   write (row, occurrence, first row's uid) into the folder of the row's group.

A shard task then reads only its own group's repeat rows. The driver holds shard plans and
object refs, never a row: its memory does not grow with the input. The pass is done once per
output folder (``_inputs/dedup/_complete.json``) and kept until every shard is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location
from capfilt.core.layout import INPUTS_DIR
from capfilt.core.schema import make_uid
from capfilt.core.shards import read_json, shard_name, write_json_atomic, write_parquet_atomic
from capfilt.io.urllist import UrlSource, check_columns, iter_batches, text_columns

log = logging.getLogger(__name__)

_SEP = "\x1f"  # capfilt.core.schema's field separator

PLAN_FILE = "plan.json"  # under _inputs/: the shard plans, reused by a rerun of the same input
DEDUP_DIR = "dedup"  # under _inputs/: the duplicate pass's keys and results
DEDUP_DONE = "_complete.json"


def url_problem(url: str) -> str | None:
    """Why a (stripped) URL cannot be fetched, or None."""
    if not url:
        return "url is empty"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        return f"unsupported url scheme {scheme!r}" if scheme else "url has no scheme"
    return None


@dataclass(frozen=True)
class ShardPlan:
    """Rows [start, start + rows) of `path` are shard `shard`, global rows from `row0`.
    `prepared`: `path` is a planner-written file under _inputs/ (columns url, text, extras);
    otherwise it is the user's Parquet file, read with the user's column names."""

    shard: int
    path: str
    start: int
    rows: int
    row0: int
    prepared: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardPlan:
        return cls(**d)


@dataclass(frozen=True)
class Columns:
    """Which columns of the user's files a task reads."""

    url_col: str
    caption_col: str | None
    extra_columns: tuple[str, ...] = ()

    def of(self, plan: ShardPlan) -> tuple[str, str | None, list[str]]:
        """(url column, caption column, columns to read) of a plan's file."""
        if plan.prepared:
            return "url", "text", ["url", "text", *self.extra_columns]
        cols = [self.url_col] + ([self.caption_col] if self.caption_col else []) + list(self.extra_columns)
        return self.url_col, self.caption_col, list(dict.fromkeys(cols))


def fingerprint(sources: Sequence[UrlSource], cols: Columns, shard_size: int, source: str) -> dict[str, Any]:
    """What makes an output folder reusable by a rerun: the same input files and shard layout.
    Each file counts by its path, its size and a hash of its content: for Parquet the SHA-256 of
    its footer (the metadata: schema, row groups, their offsets and statistics; a few KB whatever
    the rows), for the other formats of its bytes, streamed in 1 MiB reads (the planner streams
    such a file whole anyway). Not the modification time: a list rewritten with the same bytes
    (the world stage's) is the same input."""
    files = []
    for src in sources:
        loc = fs.location(src.path)
        files.append(
            {
                "path": str(loc.resolve()),
                "format": src.fmt,
                "compression": src.compression,
                "bytes": loc.stat().st_size,
                "sha256": _content_hash(loc, src.fmt == "parquet"),
            }
        )
    return {
        "stage": "download",
        "inputs": files,
        "url_col": cols.url_col,
        "caption_col": cols.caption_col,
        "extra_columns": list(cols.extra_columns),
        "shard_size": shard_size,
        "source": source,
    }


def _content_hash(loc: Location, footer_only: bool) -> str:
    h = hashlib.sha256()
    with loc.open("rb") as f:
        if footer_only:
            f.seek(-8, 2)
            tail = f.read(8)
            n = int.from_bytes(tail[:4], "little")
            f.seek(-(8 + n), 2)
            h.update(f.read(n + 8))
            return "footer:" + h.hexdigest()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Planning.
# ---------------------------------------------------------------------------------------------


def _stream_shards(
    src: UrlSource,
    cols: Columns,
    extra_types: dict[str, pa.DataType],
    shard_size: int,
) -> Iterator[pa.Table]:
    """A non-indexed file's rows as tables of `shard_size` rows (the last one shorter), each in
    (url, text, extras) text columns; at most one shard and one block in memory."""
    _, _, read = cols.of(ShardPlan(0, src.path, 0, 0, 0))
    buffer: list[pa.Table] = []
    held = 0
    seen = 0
    for batch in iter_batches(src, read, batch_rows=shard_size):
        part = text_columns(batch, src.path, cols.url_col, cols.caption_col, extra_types, seen)
        seen += part.num_rows
        buffer.append(part)
        held += part.num_rows
        while held >= shard_size:
            table = pa.concat_tables(buffer)
            yield table.slice(0, shard_size)
            rest = table.slice(shard_size)
            buffer, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_tables(buffer)


def plan_shards(
    sources: Sequence[UrlSource], out: Location, cols: Columns, shard_size: int
) -> list[ShardPlan]:
    """Every shard's plan, reading Parquet metadata and streaming the other formats once into
    _inputs/. A ConfigError (a bad row, no rows at all) before any download."""
    extra_types = check_columns(sources, cols.url_col, cols.caption_col, cols.extra_columns)
    inputs = out / INPUTS_DIR
    plans: list[ShardPlan] = []
    row0 = 0
    for src in sources:
        if src.indexed:
            n = fs.parquet_file(src.path).metadata.num_rows
            for start in range(0, n, shard_size):
                rows = min(shard_size, n - start)
                plans.append(ShardPlan(len(plans), src.path, start, rows, row0 + start))
            row0 += n
            continue
        for table in _stream_shards(src, cols, extra_types, shard_size):
            path = inputs / f"{shard_name(len(plans))}.parquet"
            write_parquet_atomic(path, table)
            plans.append(ShardPlan(len(plans), str(path), 0, table.num_rows, row0, prepared=True))
            row0 += table.num_rows
        log.info("streamed %s into shard inputs (%d rows so far)", src.path, row0)
    if row0 == 0:
        names = ", ".join(s.path for s in sources)
        raise ConfigError(f"URL list {names} has no rows")
    return plans


def save_plans(out: Location, fp: dict[str, Any], plans: Sequence[ShardPlan]) -> None:
    paths = sorted({p.path for p in plans})
    index = {p: i for i, p in enumerate(paths)}
    rows = [[index[p.path], p.start, p.rows, p.row0, int(p.prepared)] for p in plans]
    write_json_atomic(out / INPUTS_DIR / PLAN_FILE, {"fingerprint": fp, "paths": paths, "shards": rows})


def load_plans(out: Location, fp: dict[str, Any]) -> list[ShardPlan] | None:
    """The plans an earlier run of the same input wrote, or None."""
    path = out / INPUTS_DIR / PLAN_FILE
    if not path.is_file():
        return None
    saved = read_json(path)
    if saved.get("fingerprint") != fp:
        return None
    paths = saved["paths"]
    return [
        ShardPlan(i, paths[k], start, rows, row0, bool(prep))
        for i, (k, start, rows, row0, prep) in enumerate(saved["shards"])
    ]


def read_range(path: str, start: int, rows: int, columns: list[str]) -> pa.Table:
    """Rows [start, start + rows) of a Parquet file, reading only the row groups they fall in."""
    pf = fs.parquet_file(path)
    meta = pf.metadata
    groups, first, at = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if at + n > start and at < start + rows:
            groups.append(g)
            first = at if first is None else first
        at += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    table = pf.read_row_groups(groups, columns=columns)
    assert first is not None
    return table.slice(start - first, rows)


def shard_text(plan: ShardPlan, cols: Columns) -> pa.Table:
    """A shard's rows as (url, text, extras) text columns."""
    url_col, caption_col, read = cols.of(plan)
    table = read_range(plan.path, plan.start, plan.rows, read)
    if table.num_rows != plan.rows:
        raise RuntimeError(
            f"shard {plan.shard}: {plan.path} has {table.num_rows} rows from row {plan.start}, "
            f"the plan {plan.rows}: the file changed since it was planned"
        )
    extra_types = {c: table.schema.field(c).type for c in cols.extra_columns}
    if not plan.prepared:
        for c, kind in extra_types.items():
            if pa.types.is_binary(kind) or pa.types.is_dictionary(kind):
                extra_types[c] = pa.string()
    return text_columns(table, plan.path, url_col, caption_col, extra_types, plan.start)


# ---------------------------------------------------------------------------------------------
# The duplicate pass.
# ---------------------------------------------------------------------------------------------


def dedup_root(out: Location) -> Location:
    return out / INPUTS_DIR / DEDUP_DIR


def groups_of(plans: Sequence[ShardPlan], shard_size: int, partition_rows: int) -> list[list[ShardPlan]]:
    per = max(1, partition_rows // shard_size)
    return [list(plans[i : i + per]) for i in range(0, len(plans), per)]


def group_of(shard: int, shard_size: int, partition_rows: int) -> int:
    return shard // max(1, partition_rows // shard_size)


def first_uid(source: str, url: str, text: str) -> str:
    """`make_uid(source, url, text)` (occurrence 0) in one hash call: the duplicate pass's key.
    Hashing the joined fields is hashing them one after the other, as make_uid does; a field
    holding the separator takes make_uid's own path."""
    joined = f"{source}{_SEP}{url}{_SEP}{text}"
    if joined.count(_SEP) != 2:
        return make_uid(source, url, text)
    return hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _contiguous(plans: list[ShardPlan]) -> list[ShardPlan]:
    """Consecutive plans over adjacent rows of one Parquet file merged, so a group reads each
    row group once."""
    merged: list[ShardPlan] = []
    for p in plans:
        last = merged[-1] if merged else None
        if (
            last is not None
            and not p.prepared
            and not last.prepared
            and last.path == p.path
            and last.start + last.rows == p.start
        ):
            merged[-1] = ShardPlan(last.shard, last.path, last.start, last.rows + p.rows, last.row0)
        else:
            merged.append(p)
    return merged


def dedup_map(
    group: int, plans_json: list[dict[str, Any]], cols: Columns, source: str, partitions: int, root: str
) -> int:
    """Map task: the (key, row) pairs of a group's rows, written by hash partition. Returns the
    number of rows read."""
    skeys: list[str] = []
    ukeys: list[str] = []
    valid: list[bool] = []
    rows: list[np.ndarray] = []
    for plan in _contiguous([ShardPlan.from_json(pj) for pj in plans_json]):
        table = shard_text(plan, Columns(cols.url_col, cols.caption_col))
        for url, text in zip(table.column("url").to_pylist(), table.column("text").to_pylist(), strict=True):
            url = url or ""
            stripped = url.strip()
            skey = first_uid(source, stripped, text)
            skeys.append(skey)
            ukeys.append(skey if stripped == url else first_uid(source, url, text))
            valid.append(url_problem(stripped) is None)
        rows.append(np.arange(plan.row0, plan.row0 + plan.rows, dtype=np.int64))
    n = len(skeys)
    part = np.fromiter((int(k[:12], 16) % partitions for k in skeys), dtype=np.int64, count=n)
    order = np.argsort(part, kind="stable")
    table = pa.table(
        {
            "skey": pa.array(skeys, pa.string()),
            "ukey": pa.array(ukeys, pa.string()),
            "row": pa.array(np.concatenate(rows) if rows else np.empty(0, np.int64)),
            "valid": pa.array(valid, pa.bool_()),
        }
    ).take(pa.array(order))
    counts = np.bincount(part, minlength=partitions)
    at = 0
    base = fs.location(root) / "keys"
    for p, c in enumerate(counts):
        if c:
            write_parquet_atomic(base / f"p{p:05d}" / f"g{group:05d}.parquet", table.slice(at, int(c)))
        at += int(c)
    return n


def _runs(keys: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """For sorted `keys`: whether each starts a run of equal keys, and the index of its run's start."""
    n = len(keys)
    new = np.ones(n, dtype=bool)
    if n > 1:
        new[1:] = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    idx = np.arange(n)
    return new, np.maximum.accumulate(np.where(new, idx, 0))


def dedup_reduce(partition: int, root: str, group_starts: list[int]) -> dict[str, int]:
    """Reduce task: for one hash partition, every row that repeats an earlier one, as (row,
    occurrence of its exact (url, text), uid of the first row it duplicates or null), written
    into the folder of the row's group."""
    folder = fs.location(root) / "keys" / f"p{partition:05d}"
    parts = [fs.read_parquet(f) for f in folder.iterdir()] if folder.exists() else []
    if not parts:
        return {"repeats": 0, "duplicates": 0}
    t = pa.concat_tables(parts)
    # Occurrence numbers of exact (url, text) repeats: the uid's.
    t = t.sort_by([("ukey", "ascending"), ("row", "ascending")])
    new, start = _runs(t.column("ukey"))
    occ = np.arange(len(new)) - start
    rows = t.column("row").to_numpy()
    occ_rows, occ_vals = rows[occ > 0], occ[occ > 0]
    # Duplicates: among rows with a usable URL, every row after the first of its (stripped) key.
    # The first has occurrence 0 (any exact repeat before it would itself be first), so its
    # uid is its key.
    v = t.filter(t.column("valid")).sort_by([("skey", "ascending"), ("row", "ascending")])
    vnew, vstart = _runs(v.column("skey"))
    dup_rows = v.column("row").to_numpy()[~vnew]
    dup_of = v.column("ukey").take(pa.array(vstart[~vnew]))
    all_rows = np.union1d(occ_rows, dup_rows)
    occ_all = np.zeros(len(all_rows), dtype=np.int32)
    occ_all[np.searchsorted(all_rows, occ_rows)] = occ_vals
    dup_idx = np.full(len(all_rows), -1, dtype=np.int64)
    dup_idx[np.searchsorted(all_rows, dup_rows)] = np.arange(len(dup_rows))
    dup_col = pa.array(
        [dup_of[int(i)].as_py() if i >= 0 else None for i in dup_idx]
        if len(dup_rows)
        else [None] * len(all_rows),
        pa.string(),
    )
    result = pa.table({"row": pa.array(all_rows, pa.int64()), "occurrence": occ_all, "dup_of": dup_col})
    groups = np.searchsorted(np.asarray(group_starts, dtype=np.int64), all_rows, side="right") - 1
    base = fs.location(root) / "rows"
    for g in np.unique(groups):
        sel = np.flatnonzero(groups == g)
        write_parquet_atomic(
            base / f"g{int(g):05d}" / f"p{partition:05d}.parquet", result.take(pa.array(sel))
        )
    return {"repeats": len(occ_rows), "duplicates": len(dup_rows)}


def repeats_of(root: str, group: int, row0: int, rows: int) -> dict[int, tuple[int, str | None]]:
    """row -> (occurrence, uid of the earlier row it duplicates or None) for the repeat rows of
    [row0, row0 + rows): what the duplicate pass found for one shard."""
    folder = fs.location(root) / "rows" / f"g{group:05d}"
    if not folder.exists():
        return {}
    out: dict[int, tuple[int, str | None]] = {}
    for f in folder.iterdir():
        t = fs.read_parquet(f, filters=[("row", ">=", row0), ("row", "<", row0 + rows)])
        for r, o, d in zip(*(t.column(c).to_pylist() for c in ("row", "occurrence", "dup_of")), strict=True):
            out[r] = (o, d)
    return out


def run_dedup(
    plans: Sequence[ShardPlan],
    out: Location,
    cols: Columns,
    source: str,
    shard_size: int,
    partition_rows: int,
    cpus: float,
    retries: int,
) -> dict[str, int]:
    """The duplicate pass on Ray (see the module docstring), once per output folder."""
    import ray

    root = dedup_root(out)
    done = root / DEDUP_DONE
    if done.is_file():
        before = dict(read_json(done))
        if before.get("partition_rows") == partition_rows:
            return before
    fs.rmtree(root)  # a pass that did not finish, or grouped otherwise: do it again
    groups = groups_of(plans, shard_size, partition_rows)
    opts = {"num_cpus": cpus, "max_retries": retries, "retry_exceptions": True}
    mapper = ray.remote(dedup_map).options(**opts)
    reducer = ray.remote(dedup_reduce).options(**opts)
    n = len(groups)
    read = ray.get(
        [
            mapper.remote(g, [p.to_json() for p in grp], cols, source, n, str(root))
            for g, grp in enumerate(groups)
        ]
    )
    starts = [grp[0].row0 for grp in groups]
    found = ray.get([reducer.remote(p, str(root), starts) for p in range(n)])
    result = {
        "rows": int(sum(read)),
        "partitions": n,
        "partition_rows": partition_rows,
        "repeats": sum(f["repeats"] for f in found),
        "duplicates": sum(f["duplicates"] for f in found),
    }
    write_json_atomic(done, result)
    log.info("duplicate pass: %s", json.dumps(result))
    return result
