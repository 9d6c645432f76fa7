"""The Arrow schemas of every table capfilt reads or writes, declared once, and the row uid."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa

# ---------------------------------------------------------------------------------------------
# Row identity.
# A uid is 128 bits of BLAKE2b over (source dataset, url, text), written as 32 hex characters.
# It depends only on what the row says, never on its position, so it is stable across reruns,
# reshardings and reorderings of the input. An exact repeat of a (source, url, text) row gets
# the occurrence number mixed in, so every input row still has a uid of its own.
# ---------------------------------------------------------------------------------------------

_SEP = "\x1f"  # ASCII unit separator: no valid URL and hardly any text holds it


def make_uid(source: str, url: str, text: str, occurrence: int = 0) -> str:
    """128-bit hex uid of one input row; `occurrence` counts exact repeats of the same row."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source.encode("utf-8", "surrogatepass"))
    h.update(_SEP.encode())
    h.update(url.encode("utf-8", "surrogatepass"))
    h.update(_SEP.encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    if occurrence:
        h.update(_SEP.encode())
        h.update(str(occurrence).encode())
    if _SEP in source or _SEP in url or _SEP in text:
        # A field holding the separator would make ("a<SEP>b", "c") and ("a", "b<SEP>c") hash the
        # same; the field lengths at the end tell them apart. Added only here, so every other
        # row keeps the uid it always had; and no such row can hash the bytes of one of these,
        # which hold at least four separators to its three at most.
        h.update(_SEP.encode())
        h.update(f"lengths:{len(source)},{len(url)},{len(text)}".encode())
    return h.hexdigest()


def make_uids(source: str, urls: Iterable[str], texts: Iterable[str]) -> tuple[list[str], list[int]]:
    """uids for a whole input in order, and for each row the index of its first exact repeat
    (-1 when the row is the first of its kind)."""
    first_index: dict[tuple[str, str], int] = {}
    seen: dict[tuple[str, str], int] = {}
    uids: list[str] = []
    dup_of: list[int] = []
    for i, (url, text) in enumerate(zip(urls, texts, strict=True)):
        key = (url, text)
        n = seen.get(key, 0)
        seen[key] = n + 1
        uids.append(make_uid(source, url, text, n))
        if n == 0:
            first_index[key] = i
            dup_of.append(-1)
        else:
            dup_of.append(first_index[key])
    return uids, dup_of


def make_text_uid(image_uid: str, text_source: str, index: int, text: str) -> str:
    """uid of one caption candidate: the image's uid, where the text came from, and the text."""
    h = hashlib.blake2b(digest_size=16)
    for part in (image_uid, text_source, str(index), text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(_SEP.encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Status vocabulary of a downloaded sample. Every input row ends with exactly one of these.
# ---------------------------------------------------------------------------------------------

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"  # img2dataset: HTTP error, timeout, refused, ...
FAILED_TO_RESIZE = "failed_to_resize"  # img2dataset: undecodable, too small, too large, ...
DUPLICATE = "duplicate"  # exact repeat of an earlier (url, text) row; not fetched twice
INVALID_INPUT = "invalid_input"  # no usable URL in the row
FAILED_INTERNAL = "failed_internal"  # the downloader lost the row (logged); never silent
SAMPLE_STATUSES = (SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE, DUPLICATE, INVALID_INPUT, FAILED_INTERNAL)

# Where a caption candidate came from.
TEXT_SOURCES = ("web", "synthetic", "human")

# ---------------------------------------------------------------------------------------------
# Schemas.
# ---------------------------------------------------------------------------------------------

#: A web alt-text pair after reading the user's URL list (one row per input row).
WEB_PAIR = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source", pa.string(), nullable=False),  # dataset name, e.g. "cc3m"
        pa.field("row", pa.int64(), nullable=False),  # position in the user's list, for reports
    ]
)

#: A downloaded sample: one row per input row, whatever happened to it.
SAMPLE = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # one of SAMPLE_STATUSES
        pa.field("reason", pa.string()),  # null on success, else why
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the downloaded bytes
        pa.field("image", pa.binary()),  # encoded JPEG after resizing; null unless success
    ]
)

#: One text considered for one image by CapFilt: web alt-text, synthetic caption or human caption.
CANDIDATE = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),  # the image's (input row's) uid
        pa.field("text_uid", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("text_source", pa.string(), nullable=False),  # one of TEXT_SOURCES
        pa.field("text_index", pa.int32(), nullable=False),  # web 0; caption k of K; human caption i
        pa.field("itm_score", pa.float32()),  # filter's ITM softmax p(match)
        pa.field("itc_score", pa.float32()),  # filter's ITC cosine similarity
        pa.field("rank", pa.int32()),  # a scored synthetic caption's place among its image's by ITM, 0 = best
        pa.field("decision", pa.string(), nullable=False),  # "keep" | "drop"
        pa.field("reason", pa.string()),  # why dropped, or why kept without scoring
        pa.field("round", pa.int32(), nullable=False),
        pa.field("captioner_id", pa.string()),
        pa.field("filter_id", pa.string()),
    ]
)

#: A cleaned pair: one row per kept (image, text), the next round's pretraining input.
CLEANED = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("text_uid", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("text_source", pa.string(), nullable=False),
        pa.field("itm_score", pa.float32()),
        pa.field("itc_score", pa.float32()),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("captioner_id", pa.string()),
        pa.field("filter_id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("image", pa.binary()),  # encoded image; null when the run references images
        # Where the image bytes are: a Parquet shard whose row with this uid holds them in `image`
        # (a download shard), or an image file (human pairs from a Karpathy JSON).
        pa.field("image_ref", pa.string()),
    ]
)

#: One image's embedding from the filter, per CapFilt shard (``embeddings/NNNNN.parquet``), one row
#: per decodable image: the L2-normalised ITC image feature (``vision_proj`` of the ViT's [CLS]) it
#: was scored with, in float16. ``list<halffloat>`` round-trips through Parquet (pyarrow >= 15) and
#: holds any model's width under this one schema; a fixed_size_list would need a schema per width.
EMBEDDING = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),  # the image's (input row's) uid
        pa.field("model_id", pa.string(), nullable=False),  # the filter's id (name + hash of its weights)
        pa.field("embedding", pa.list_(pa.float16()), nullable=False),
    ]
)

# Why dedup removed a row (``REMOVED.reason``).
EXACT_DUPLICATE = "exact_duplicate"  # the same image bytes (sha256) as the kept image, another URL
NEAR_DUPLICATE = "near_duplicate"  # an embedding within min_cosine of the kept image's (transitively)
DEDUP_REASONS = (EXACT_DUPLICATE, NEAR_DUPLICATE)

#: A row dedup removed (``removed/NNNNN.parquet``): every CLEANED column, so a removed row can be
#: put back as it was, plus why, the uid of the image kept in its place, and the cosine of their
#: embeddings (null when one has none). Before captioning a removed row is the image's web text,
#: unscored (``text`` may then be null), its bytes referenced in the download shard (``image_ref``).
REMOVED = pa.schema(
    [f if f.name != "text" else f.with_nullable(True) for f in CLEANED]
    + [
        pa.field("reason", pa.string(), nullable=False),  # one of DEDUP_REASONS
        pa.field("duplicate_of", pa.string(), nullable=False),  # uid of the image kept instead
        pa.field("cosine", pa.float32()),
    ]
)

#: Per-shard statistics, written as JSON beside each shard, last, to mark the shard done.
SHARD_STATS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("rows_in", pa.int64(), nullable=False),
        pa.field("rows_out", pa.int64(), nullable=False),
        pa.field("status_counts", pa.map_(pa.string(), pa.int64()), nullable=False),
        pa.field("reason_counts", pa.map_(pa.string(), pa.int64()), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("wall_s", pa.float64(), nullable=False),
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema`, in its order; fail naming missing columns."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks column(s) {missing} required by the schema; has {table.column_names}")
    cols = [table.column(f.name).cast(f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
