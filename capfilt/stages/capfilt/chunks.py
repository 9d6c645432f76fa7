"""Chunks: one Ray row per model batch, and the Ray tasks that read and decode them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.embed import VECTOR
from capfilt.stages.capfilt.pixels import preprocess_batch
from capfilt.stages.capfilt.score import CANDIDATE_FIELDS, unscored_batch
from capfilt.stages.capfilt.writer import write_parts

# What the image-embedding pass (dedup before captioning) returns per image.
EMBEDDED = pa.schema(
    [("uid", pa.string()), ("row", pa.int64()), ("embedding", VECTOR), ("input_shard", pa.string())]
)

# Chunks: one Ray row per model batch.
#
# A chunk is `batch_size` consecutive downloaded images of one shard (the last chunk of a shard
# may be shorter). Every model call gets exactly one chunk, so what a model computes for a shard
# does not depend on which other shards run beside it, on Ray's block sizes or on a resume:
# floating point included, a resumed shard gives the bytes an uninterrupted run gives.


def _cell(value: Any) -> np.ndarray:
    """A one-row object column holding ``value`` (a list, or an array for a tensor column)."""
    cell = np.empty(1, dtype=object)
    cell[0] = value
    return cell


def _plain(value: Any) -> Any:
    """numpy values from Ray's batches back to Python, so they pack into Arrow lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _pack(shard: str, chunk: int, images: dict[str, Any]) -> dict[str, np.ndarray]:
    row = {"input_shard": _cell(shard), "chunk": np.asarray([chunk], dtype=np.int64)}
    for key, values in images.items():
        if key.startswith("pixels_"):
            row[key] = _cell(np.asarray(values))  # [n, S, S, 3] uint8: a tensor cell
        elif key != "input_shard":
            row[key] = _cell([_plain(v) for v in values])
    return row


def _unpack(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Row ``i`` of a batch of chunks as a batch of images."""
    skip = ("input_shard", "chunk")
    return {
        k: (np.asarray(v[i]) if k.startswith("pixels_") else list(v[i]))
        for k, v in batch.items()
        if k not in skip
    }


def _concat(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}


def map_chunks(batch: dict[str, Any], fn: Any) -> dict[str, np.ndarray]:
    """Apply a function on a batch of images to every chunk of a batch of chunks."""
    n = len(batch["chunk"])
    return _concat(
        [_pack(str(batch["input_shard"][i]), int(batch["chunk"][i]), fn(_unpack(batch, i))) for i in range(n)]
    )


def candidates_of_chunks(batch: dict[str, Any], fn: Any) -> pa.Table:
    """Candidate rows of every chunk of a batch, each tagged with its input shard and chunk."""
    tables = []
    for i in range(len(batch["chunk"])):
        table = fn(_unpack(batch, i))
        n = table.num_rows
        table = table.append_column("input_shard", pa.array([str(batch["input_shard"][i])] * n, pa.string()))
        tables.append(table.append_column("chunk", pa.array([int(batch["chunk"][i])] * n, pa.int64())))
    if tables:
        return pa.concat_tables(tables)
    return pa.schema([*CANDIDATE_FIELDS, pa.field("chunk", pa.int64())]).empty_table()


def embeddings_of_chunks(batch: dict[str, Any], fn: Any) -> pa.Table:
    """Embedding rows (uid, row, embedding; ``embed.embed_batch``) of every chunk of a batch, each
    tagged with its input shard."""
    tables = []
    for i in range(len(batch["chunk"])):
        table = fn(_unpack(batch, i))
        shard = pa.array([str(batch["input_shard"][i])] * table.num_rows, pa.string())
        tables.append(table.append_column("input_shard", shard))
    return pa.concat_tables(tables) if tables else EMBEDDED.empty_table()


def read_chunks(
    batch: dict[str, Any], batch_size: int, skip: dict[str, list[str]] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray task: stream each shard in ``batch`` (``path``, ``input_shard``) and yield its
    downloaded images (status success) as chunks of ``batch_size``, one Ray row per chunk. Rows
    that are not images never leave the file; the driver counts them (``inputs._plan``). The
    uids in ``skip[shard]`` (duplicates found before captioning) are left out too."""
    columns = ["uid", "text", "status", "row", "image"]
    for path, shard in zip(batch["path"], batch["input_shard"], strict=True):
        skipped = pa.array(sorted((skip or {}).get(str(shard), [])), pa.string())
        pending: list[pa.Table] = []
        buffered = chunk = 0
        for record_batch in fs.parquet_file(str(path)).iter_batches(
            batch_size=max(batch_size, 256), columns=columns
        ):
            part = pa.Table.from_batches([record_batch])
            wanted = pc.equal(part.column("status"), S.SUCCESS)
            if len(skipped):
                wanted = pc.and_(wanted, pc.invert(pc.is_in(part.column("uid"), skipped)))
            part = part.filter(wanted).drop(["status"])
            pending.append(part)
            buffered += part.num_rows
            while buffered >= batch_size:
                table = pa.concat_tables(pending)
                yield _pack(str(shard), chunk, table.slice(0, batch_size).to_pydict())
                pending, buffered, chunk = [table.slice(batch_size)], buffered - batch_size, chunk + 1
        if buffered:
            yield _pack(str(shard), chunk, pa.concat_tables(pending).to_pydict())


def preprocess_chunks(batch: dict[str, Any], image_sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """Ray task: decode and resize the images of each chunk (``preprocess_batch``)."""
    return map_chunks(batch, lambda images: preprocess_batch(images, image_sizes))


def unscored_chunks(batch: dict[str, Any], cfg: CapFiltConfig, out: str | None = None) -> pa.Table:
    """Ray task: candidate rows of each chunk without a filter (``unscored_batch``); with ``out``,
    written to part files there (``writer.write_parts``), their receipts returned."""
    candidates = candidates_of_chunks(batch, lambda images: unscored_batch(images, cfg))
    return candidates if out is None else write_parts(candidates, out)
