"""Training pairs: where they come from (download shards, cleaned shards, COCO-Karpathy JSON), as
one streaming Ray Dataset of (image, text, image_key), and how rows of it become a training batch.

The Ray wiring is `pairs_dataset`; everything from a batch of rows to tensors (`Collator`,
`fixed_batches`) is plain Python, testable without Ray. Rows whose image does not decode or whose
text is empty are skipped and counted, never raised: one bad row must not kill a worker.

torch, transformers and timm are imported where tensors are made, not at module level: Ray Data's
read tasks unpickle this module's batch functions, and each new task process would otherwise
spend seconds importing them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import random
import sys
from collections import Counter
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location
from capfilt.core.text import pre_caption
from capfilt.io.karpathy import read_entries
from capfilt.train.config import DataSource

if TYPE_CHECKING:
    import ray.data
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PAIR_COLUMNS",
    "Collator",
    "DataSource",
    "PairCounts",
    "SkipCounts",
    "TrainBatch",
    "count_pairs",
    "fixed_batches",
    "image_key",
    "iter_texts",
    "pairs_dataset",
    "read_karpathy",
    "resolve_sources",
]

logger = logging.getLogger(__name__)

#: The columns of the training-pair dataset: encoded image bytes, raw text, and a stable int64
#: per image (rows sharing it are positives of each other when objectives use image ids).
PAIR_COLUMNS = ("image", "text", "image_key")

SourceKind = Literal["samples", "cleaned", "karpathy"]

_KARPATHY_BLOCK_ROWS = 256  # rows per block when streaming a JSON's images from disk


def _mark_fsspec_http_absent() -> None:
    """Work around a race in Ray Data's threaded file listing: each thread tries to import fsspec's
    HTTP filesystem, which fails half-way without aiohttp; a thread that looks while another is
    half-way gets ImportError instead of ModuleNotFoundError, which Ray does not catch, and
    read_parquet fails at random. Marking the module absent makes every try fail the same way."""
    name = "fsspec.implementations.http"
    if name not in sys.modules and importlib.util.find_spec("aiohttp") is None:
        sys.modules[name] = None  # type: ignore[assignment]


_mark_fsspec_http_absent()


@dataclass(frozen=True)
class _Resolved:
    kind: SourceKind
    path: Location  # a local path or a URI (capfilt.core.fs), as every path below
    files: tuple[Location, ...] = ()  # Parquet shards, sorted (samples/cleaned)
    image_root: Location | None = None  # karpathy


def image_key(name: str) -> int:
    """A stable non-negative int64 for an image name (a uid, or a Karpathy image id / path)."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# Resolving and counting sources (driver side, no Ray).
# ---------------------------------------------------------------------------------------------


def _shard_files(folder: Location) -> tuple[Location, ...]:
    # Shards are NNNNN.parquet; bookkeeping under _* and temp files starting with "." are not data.
    files: list[Location] = [p for p in folder.glob("*.parquet") if p.name[0] not in "._"]
    return tuple(sorted(files, key=str))


def _kind_of_shards(files: Sequence[Location], folder: Location) -> SourceKind:
    names = set(fs.read_schema(files[0]).names)
    if {"status", "image", "text", "uid"} <= names:
        return "samples"
    if {"text_uid", "text_source", "image", "text", "uid"} <= names:
        return "cleaned"
    raise ConfigError(
        f"{folder} holds Parquet shards with columns {sorted(names)}: neither download shards "
        f"(SAMPLE: {S.SAMPLE.names}) nor cleaned shards (CLEANED: {S.CLEANED.names})"
    )


def _ancestors(path: Location) -> Iterator[Location]:
    while path.parent != path:
        path = path.parent
        yield path


def _karpathy_root(json_path: Location, entries: list[dict[str, Any]], image_root: str | None) -> Location:
    root = fs.location(image_root) if image_root else json_path.parent
    if not root.is_dir():
        raise ConfigError(f"image_root {root} of {json_path} is not a folder")
    if entries:
        first = entries[0]["image"]
        if not (root / first).is_file():
            hint = next((p for p in _ancestors(json_path) if (p / first).is_file()), None)
            raise ConfigError(
                f"{json_path}: its first image {first!r} is not under {root}; pass image_root="
                + (f"{hint} (where it is)" if hint else "the folder its image paths are relative to")
            )
    return root


def resolve_sources(sources: Iterable[DataSource | str]) -> list[_Resolved]:
    """Check every source exists and holds data, and decide its kind; fails fast, naming the fix."""
    out: list[_Resolved] = []
    for src in sources:
        src = src if isinstance(src, DataSource) else DataSource(path=str(src))
        path = fs.location(src.path)
        if not path.exists():
            raise ConfigError(f"training data {path} does not exist")
        if src.kind == "karpathy" or (src.kind == "auto" and path.suffix == ".json"):
            if not path.is_file():
                raise ConfigError(f"{path} should be a COCO-Karpathy JSON file")
            entries = read_entries(path)
            out.append(_Resolved("karpathy", path, image_root=_karpathy_root(path, entries, src.image_root)))
            continue
        if not path.is_dir():
            raise ConfigError(f"{path} is neither a shard folder nor a .json file")
        files = _shard_files(path)
        if not files:
            raise ConfigError(f"{path} holds no Parquet shards (NNNNN.parquet); is the stage finished?")
        kind = _kind_of_shards(files, path) if src.kind == "auto" else src.kind
        if src.image_root:
            raise ConfigError(f"image_root is only for COCO-Karpathy JSON sources, not for {path}")
        out.append(_Resolved(kind, path, files))
    if not out:
        raise ConfigError("no training data given; pass at least one shard folder or JSON file")
    return out


def read_karpathy(path: str | Location, image_root: str | Location | None = None) -> pa.Table:
    """A COCO-Karpathy JSON as a table of (path: absolute image path or URI, text, image_key), one row
    per caption. A list-valued ``caption`` (the test format) gives one row per caption. The
    image key comes from ``image_id`` when present, else from the image path, so every caption
    of an image shares it."""
    json_path = fs.location(path)
    entries = read_entries(json_path)
    root = _karpathy_root(json_path, entries, str(image_root) if image_root else None)
    paths: list[str] = []
    texts: list[str] = []
    keys: list[int] = []
    for e in entries:
        captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        key = image_key(f"karpathy/{e.get('image_id', e['image'])}")
        for c in captions:
            paths.append(str(root / e["image"]))
            texts.append(c)
            keys.append(key)
    return pa.table(
        {"path": pa.array(paths, pa.string()), "text": pa.array(texts, pa.string()), "image_key": keys},
        schema=pa.schema([("path", pa.string()), ("text", pa.string()), ("image_key", pa.int64())]),
    )


@dataclass
class PairCounts:
    """Rows of the sources that training will read, and rows left out before reading (by status)."""

    usable: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    not_downloaded: dict[str, int] = field(default_factory=dict)  # SAMPLE status -> rows skipped


def count_pairs(sources: Iterable[_Resolved]) -> PairCounts:
    """Count usable rows from Parquet metadata and the status column only (no image bytes read)."""
    counts = PairCounts()
    skipped: Counter[str] = Counter()
    for src in sources:
        if src.kind == "samples":
            n = 0
            for f in src.files:
                status = Counter(fs.read_parquet(f, columns=["status"]).column("status").to_pylist())
                n += status.pop(S.SUCCESS, 0)
                skipped.update(status)
        elif src.kind == "cleaned":
            n = sum(fs.parquet_file(f).metadata.num_rows for f in src.files)
        else:
            n = read_karpathy(src.path, src.image_root).num_rows
        counts.by_source[str(src.path)] = n
        counts.usable += n
    counts.not_downloaded = dict(sorted(skipped.items()))
    return counts


def iter_texts(sources: Iterable[_Resolved], max_words: int | None = 30) -> Iterator[str]:
    """Every training text, cleaned as training cleans it; streams shard by shard (for tokenizers)."""
    for src in sources:
        if src.kind == "karpathy":
            for text in read_karpathy(src.path, src.image_root).column("text").to_pylist():
                yield pre_caption(text, max_words)
            continue
        columns = ["text", "status"] if src.kind == "samples" else ["text"]
        for f in src.files:
            for batch in fs.parquet_file(f).iter_batches(columns=columns, batch_size=8192):
                texts = batch.column("text").to_pylist()
                ok = batch.column("status").to_pylist() if src.kind == "samples" else None
                for i, text in enumerate(texts):
                    if ok is None or ok[i] == S.SUCCESS:
                        yield pre_caption(text, max_words)


# ---------------------------------------------------------------------------------------------
# The streaming Ray Dataset.
# ---------------------------------------------------------------------------------------------


def _keyed_by_uid(batch: pa.Table) -> pa.Table:
    """(uid, text, image) -> (image, text, image_key): the uid names the image (CLEANED rows of
    one image share it)."""
    keys = [image_key(u) for u in batch.column("uid").to_pylist()]
    return pa.table(
        {
            "image": batch.column("image"),
            "text": batch.column("text"),
            "image_key": pa.array(keys, pa.int64()),
        }
    )


def _load_image_files(batch: pa.Table) -> pa.Table:
    """(path, text, image_key) -> (image, text, image_key), reading each file. A file that cannot be
    read gets empty bytes, which the collator counts as undecodable."""
    images: list[bytes] = []
    for p in batch.column("path").to_pylist():
        try:
            images.append(fs.location(p).read_bytes())
        except OSError as err:
            logger.warning("cannot read image file %s: %s", p, err)
            images.append(b"")
    return pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "text": batch.column("text"),
            "image_key": batch.column("image_key"),
        }
    )


def pairs_dataset(sources: Sequence[_Resolved], seed: int = 0) -> ray.data.Dataset:
    """All sources as one lazily-read Ray Dataset with columns PAIR_COLUMNS (never materialised).

    Shard files are read in an order shuffled once by ``seed`` (so a run's order is reproducible),
    with only the needed columns; SAMPLE rows other than status success are filtered out at the
    read. Karpathy images are read from disk in the stream.
    """
    import ray.data
    from ray.data.expressions import col

    rng = random.Random(seed)
    parts: list[ray.data.Dataset] = []
    for src in sources:
        if src.kind == "karpathy":
            table = read_karpathy(src.path, src.image_root)
            order = list(range(table.num_rows))
            rng.shuffle(order)
            table = table.take(order)
            blocks = [
                table.slice(i, _KARPATHY_BLOCK_ROWS) for i in range(0, table.num_rows, _KARPATHY_BLOCK_ROWS)
            ]
            ds = ray.data.from_arrow(blocks).map_batches(_load_image_files, batch_format="pyarrow")
        else:
            files = list(src.files)
            rng.shuffle(files)
            # One filesystem object for the read tasks, built here from the driver's settings.
            paths = [fs.arrow(f)[0] for f in files]
            ds = ray.data.read_parquet(paths, filesystem=fs.arrow(files[0])[1])
            if src.kind == "samples":
                ds = ds.filter(expr=col("status") == S.SUCCESS)
            ds = ds.select_columns(["uid", "text", "image"]).map_batches(
                _keyed_by_uid, batch_format="pyarrow"
            )
        parts.append(ds)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ---------------------------------------------------------------------------------------------
# Rows -> tensors (plain Python; runs inside each training worker).
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    """One training batch, B samples. ``lm_labels`` is ``input_ids`` with padding and prompt
    positions set to -100 (aligned with input_ids, not shifted: Med.lm_loss shifts)."""

    pixel_values: torch.Tensor  # [B, 3, H, W] float32
    input_ids: torch.Tensor  # [B, L] int64, [CLS] text [SEP] pad...
    attention_mask: torch.Tensor  # [B, L] int64
    image_ids: torch.Tensor  # [B] int64, image_key of each sample
    lm_labels: torch.Tensor  # [B, L] int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(*(t.to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.pixel_values, self.input_ids, self.attention_mask, self.image_ids, self.lm_labels)


@dataclass
class SkipCounts:
    """Rows a worker read but could not train on."""

    undecodable: int = 0  # image bytes missing or not an image
    empty_text: int = 0  # nothing left after text cleaning
    reasons: Counter[str] = field(default_factory=Counter)  # first words of each decode error

    def add(self, other: SkipCounts) -> None:
        self.undecodable += other.undecodable
        self.empty_text += other.empty_text
        self.reasons.update(other.reasons)

    def as_dict(self) -> dict[str, int]:
        return {"undecodable": self.undecodable, "empty_text": self.empty_text}


class Collator:
    """Turns raw rows (image bytes, text, image_key) into a TrainBatch.

    Images: ``decode_image`` then the train transform (random crop with ``min_scale``,
    RandAugment) or the test transform. Texts: ``prompt + pre_caption(text, max_words)``,
    tokenized to at most ``max_length`` tokens; the prompt's tokens (and [CLS]) are masked from
    ``lm_labels``, as BLIP's captioner does.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        *,
        train: bool = True,
        min_scale: float = 0.5,
        max_words: int = 30,
        max_length: int = 30,
        prompt: str | None = None,
    ) -> None:
        from capfilt.model.transforms import decode_image, test_transform, train_transform

        self.tokenizer = tokenizer
        self.decode = decode_image
        self.transform = train_transform(image_size, min_scale) if train else test_transform(image_size)
        self.max_words = max_words
        self.max_length = max_length
        self.prompt = prompt or ""
        # BLIP: prompt_length = len(tokenizer(prompt).input_ids) - 1, i.e. [CLS] + prompt tokens.
        self.prompt_length = len(tokenizer(self.prompt).input_ids) - 1 if self.prompt else 0
        if self.prompt_length >= max_length - 1:
            raise ConfigError(
                f"prompt {prompt!r} takes {self.prompt_length} of max_length {max_length} tokens; "
                "raise max_length or shorten the prompt"
            )
        self.pad_id = tokenizer.pad_token_id

    def image(self, data: bytes | None) -> torch.Tensor:
        """Image bytes -> [3, H, W]; raises ValueError for bytes that do not decode."""
        return self.transform(self.decode(data or b""))

    def text(self, text: str | None) -> str:
        """Cleaned text without the prompt; "" means the row has no usable text."""
        return pre_caption(text, self.max_words)

    def tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cleaned texts -> input_ids, attention_mask, lm_labels (prompt prepended and masked)."""
        from capfilt.model.tokenizer import tokenize

        enc = tokenize(self.tokenizer, [self.prompt + t for t in texts], self.max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)  # [B, L]
        labels[:, : self.prompt_length] = -100
        return {**enc, "lm_labels": labels}

    def __call__(self, rows: Mapping[str, Sequence[Any]]) -> tuple[TrainBatch | None, SkipCounts]:
        """Every usable row of a batch dict (columns PAIR_COLUMNS) -> one TrainBatch (None if no
        row was usable), and what was skipped."""
        images: list[torch.Tensor] = []
        texts: list[str] = []
        keys: list[int] = []
        skipped = SkipCounts()
        for data, text, key in zip(rows["image"], rows["text"], rows["image_key"], strict=True):
            sample = self.sample(data, text, skipped)
            if sample is not None:
                images.append(sample[0])
                texts.append(sample[1])
                keys.append(int(key))
        return (self.batch(images, texts, keys) if images else None), skipped

    def sample(
        self, data: bytes | None, text: str | None, skipped: SkipCounts
    ) -> tuple[torch.Tensor, str] | None:
        """One row -> (image tensor, cleaned text), or None after counting why it was skipped."""
        cleaned = self.text(text)
        if not cleaned:
            skipped.empty_text += 1
            return None
        try:
            return self.image(data), cleaned
        except ValueError as err:
            skipped.undecodable += 1
            skipped.reasons[str(err).split(":", 1)[0].split(" (", 1)[0]] += 1
            logger.debug("skipping a row whose image does not decode: %s", err)
            return None

    def batch(self, images: list[torch.Tensor], texts: list[str], keys: list[int]) -> TrainBatch:
        import torch

        tok = self.tokens(texts)
        return TrainBatch(
            pixel_values=torch.stack(images),  # [B, 3, H, W]
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            image_ids=torch.tensor(keys, dtype=torch.long),
            lm_labels=tok["lm_labels"],
        )


def fixed_batches(
    raw_batches: Iterable[Mapping[str, Sequence[Any]]],
    collator: Collator,
    batch_size: int,
    skipped: SkipCounts,
    skip_rows: int = 0,
) -> Generator[tuple[TrainBatch, int], None, None]:
    """Batches of exactly ``batch_size`` usable samples from a stream of raw row batches.

    Rows are decoded one at a time, in stream order, only when a batch needs them, so the random
    augmentation of a batch depends only on the RNG state when it is built (what makes a resumed
    run repeat an uninterrupted one). Yields (batch, rows consumed so far, skipped rows included);
    the first ``skip_rows`` rows are passed over without decoding (resume), and a last partial
    batch is dropped, as equal-sized batches keep DDP workers and gathered features in step.
    """
    consumed = 0
    images: list[torch.Tensor] = []
    texts: list[str] = []
    keys: list[int] = []
    for raw in raw_batches:
        columns = [raw["image"], raw["text"], raw["image_key"]]
        for data, text, key in zip(*columns, strict=True):
            consumed += 1
            if consumed <= skip_rows:
                continue
            sample = collator.sample(data, text, skipped)
            if sample is None:
                continue
            images.append(sample[0])
            texts.append(sample[1])
            keys.append(int(key))
            if len(images) == batch_size:
                yield collator.batch(images, texts, keys), consumed
                images, texts, keys = [], [], []
