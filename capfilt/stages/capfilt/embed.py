"""The filter's image embeddings: the L2-normalised ITC image feature each image is scored with,
kept in float16 for dedup. The filter actor carries each image's vector on its web candidate row
(``EMBEDDING_COLUMN``) through the part files to the shard writer, which splits it off into
``embeddings/NNNNN.parquet`` (schema ``EMBEDDING``); ``embed_batch`` computes it alone (the ViT
and ``vision_proj``, no text, no decoding) for dedup before captioning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import schema as S
from capfilt.stages.capfilt.pixels import device_dtype, error_column, pixel_column, pixel_values

if TYPE_CHECKING:
    from capfilt.model.med import Med

# The column of a candidate part that holds its image's embedding (web rows; null elsewhere).
EMBEDDING_COLUMN = "image_embedding"
VECTOR = pa.list_(pa.float16())


def vector_array(vectors: Sequence[np.ndarray | None]) -> pa.Array:
    """float16 list cells from vectors (None: a null cell)."""
    return pa.array([None if v is None else np.asarray(v, np.float16) for v in vectors], VECTOR)


def vectors_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<halffloat> column without nulls as a float32 [n, d] array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size % n:
        raise ValueError(f"embeddings of unequal widths: {flat.size} values in {n} rows")
    return flat.reshape(n, flat.size // n)


def image_features(filter: Med, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [B, S, S, 3] -> the filter's L2-normalised ITC image features [B, E], float32."""
    import torch

    device, dtype = device_dtype(filter)
    with torch.inference_mode():
        embeds = filter.encode_image(pixel_values(pixels, device, dtype))  # [B, 1+P, Dv]
        return filter.image_feat(embeds).float().cpu().numpy()  # [B, E]


def embed_batch(filter: Med, batch: dict[str, Any]) -> pa.Table:
    """uid, row and embedding of every image of a preprocessed batch that decoded: the pass that
    dedup before captioning runs instead of the captioner and the filter's text side."""
    n = len(batch["uid"])
    ok = [i for i, e in enumerate(error_column(batch, n)) if e is None]
    feats = np.zeros((0, 0), np.float32)
    if ok:
        filter.eval()
        pixels = np.asarray(batch[pixel_column(filter.config.vision.image_size)])[ok]
        feats = image_features(filter, pixels)
    return pa.table(
        {
            "uid": pa.array([str(batch["uid"][i]) for i in ok], pa.string()),
            "row": pa.array([int(batch["row"][i]) for i in ok], pa.int64()),
            "embedding": vector_array(list(feats)),
        }
    )


def with_embeddings(candidates: pa.Table, feats: dict[str, np.ndarray]) -> pa.Table:
    """``candidates`` with each image's vector on its web row (``EMBEDDING_COLUMN``)."""
    uids = candidates.column("uid").to_pylist()
    web = candidates.column("text_source").to_pylist()
    cells = [feats.get(u) if s == "web" else None for u, s in zip(uids, web, strict=True)]
    return candidates.append_column(EMBEDDING_COLUMN, vector_array(cells))


def embedding_table(parts: Sequence[pa.Table], model_id: str) -> pa.Table:
    """EMBEDDING rows of a shard from its candidate parts, in input row order."""
    tables = [p.select(["uid", "row", EMBEDDING_COLUMN]) for p in parts if EMBEDDING_COLUMN in p.column_names]
    if not tables:
        return S.empty(S.EMBEDDING)
    t = pa.concat_tables(tables)
    t = t.filter(pc.is_valid(t.column(EMBEDDING_COLUMN))).sort_by([("row", "ascending")])
    return pa.table(
        {
            "uid": t.column("uid"),
            "model_id": pa.array([model_id] * t.num_rows, pa.string()),
            "embedding": t.column(EMBEDDING_COLUMN),
        },
        schema=S.EMBEDDING,
    )
