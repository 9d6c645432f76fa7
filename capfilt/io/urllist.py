"""Reading the URL lists users bring (CC3M/CC12M/LAION style), at any size.

A URL input is a file, a folder (its list files, one level, sorted by name), a glob
(``parts/*.parquet``, ``s3://bucket/laion/**/*.parquet``) or a list of those, local or on any
filesystem ``capfilt.core.fs`` reaches. Each file is Parquet, CSV, TSV or JSON lines, told by its
extension under an optional compression suffix (``.gz``, ``.zst``, ``.bz2``): ``cc12m.tsv.gz`` is
a gzipped TSV. Rows are numbered across the files in that order.

Nothing here reads a whole file at once: Parquet is read by row range or in batches, the other
formats through pyarrow's streaming readers (``pyarrow.csv.open_csv``, ``pyarrow.json.open_json``)
over a decompressing stream, one block at a time. `read_url_list` gathers a whole (small) list
into WEB_PAIR rows with uids, for tests and tools; the download stage never calls it.
"""

from __future__ import annotations

import glob as globlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.schema import WEB_PAIR, make_uids

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "tsv", "jsonl")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
#: Compression suffixes, as pyarrow's input streams name the codecs.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}
#: Bytes per block of the streaming CSV/JSON readers: what one read holds in memory.
BLOCK_BYTES = 8 << 20
_GLOB_CHARS = "*?["

UrlSpec = str | Path | fs.RemotePath | Sequence[str | Path | fs.RemotePath]


@dataclass(frozen=True)
class UrlSource:
    """One file of a URL input: where it is, its format and its compression (None: plain)."""

    path: str  # a local path or a URI, as capfilt.core.fs.location reads it
    fmt: str
    compression: str | None = None

    @property
    def indexed(self) -> bool:
        """Whether rows can be read by range from metadata (Parquet), not only by streaming."""
        return self.fmt == "parquet"


def _suffixes(name: str) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a file name."""
    stem, dot, last = name.rpartition(".")
    if not dot or not stem:
        return "", None
    if f".{last.lower()}" in COMPRESSIONS:
        inner = stem.rpartition(".")
        return (f".{inner[2].lower()}" if inner[1] else ""), f".{last.lower()}"
    return f".{last.lower()}", None


def infer_format(path: str | Path, input_format: str | None = None) -> tuple[str, str | None]:
    """(format, compression) of a URL list file from its name; `input_format` overrides the
    format (the compression still comes from the name)."""
    name = fs.location(path).name
    ext, comp = _suffixes(name)
    compression = COMPRESSIONS[comp] if comp else None
    if input_format is not None:
        if input_format not in FORMATS:
            raise ConfigError(f"unknown URL list format {input_format!r}; use one of {', '.join(FORMATS)}")
        return input_format, compression
    fmt = _EXTENSIONS.get(ext)
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format of URL list {path} from its extension {ext or name!r}; "
            f"use one of {sorted(_EXTENSIONS)} (optionally with {', '.join(COMPRESSIONS)}) "
            f"or pass --input-format ({', '.join(FORMATS)})"
        )
    if fmt == "parquet" and compression:
        raise ConfigError(f"URL list {path}: a Parquet file compresses itself; drop the {comp} suffix")
    return fmt, compression


def _is_list_file(name: str) -> bool:
    return not name.startswith(("_", ".")) and _suffixes(name)[0] in _EXTENSIONS


def _expand_glob(pattern: str) -> list[str]:
    if not fs.is_remote(pattern):
        return sorted(
            str(p) for p in globlib.glob(str(fs.location(pattern)), recursive=True) if Path(p).is_file()
        )
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
    base = fs.location("/".join(parts[:first]))
    rest = "/".join(parts[first:])
    try:
        return [str(p) for p in base.glob(rest) if p.is_file()]
    except ValueError as err:
        raise ConfigError(f"URL list glob {pattern}: {err}") from err


def expand_sources(spec: UrlSpec, input_format: str | None = None) -> list[UrlSource]:
    """The files of a URL input, in row order; a ConfigError naming what is wrong before any
    work: a path that does not exist, a glob or folder with no list files, an unknown format."""
    entries: list[str | Path | fs.RemotePath] = (
        [spec] if isinstance(spec, (str, Path, fs.RemotePath)) else list(spec)
    )
    if not entries:
        raise ConfigError("no URL list given")
    files: list[str] = []
    for entry in entries:
        text = str(entry)
        loc = fs.location(entry)
        if any(c in loc.name or c in str(loc.parent) for c in _GLOB_CHARS) and not loc.exists():
            # Bookkeeping names (_SUCCESS, .crc files) are no list files, whatever the glob.
            found = [f for f in _expand_glob(text) if not fs.location(f).name.startswith(("_", "."))]
            if not found:
                raise ConfigError(f"URL list glob {text} matches no file")
            files.extend(found)
        elif not loc.exists():
            raise ConfigError(f"URL list {text} does not exist")
        elif loc.is_dir():
            children: list[fs.Location] = list(loc.iterdir())
            found = sorted(str(p) for p in children if _is_list_file(p.name) and p.is_file())
            if not found:
                raise ConfigError(
                    f"URL list folder {text} holds no list files (.parquet, .csv, .tsv, .jsonl, "
                    f"optionally {', '.join(COMPRESSIONS)}); pass a file, a glob, or a folder of them"
                )
            files.extend(found)
        else:
            files.append(str(loc))
    if len(set(files)) != len(files):
        dup = sorted({f for f in files if files.count(f) > 1})
        raise ConfigError(f"URL list names file(s) {dup} more than once")
    return [UrlSource(f, *infer_format(f, input_format)) for f in files]


# ---------------------------------------------------------------------------------------------
# Text columns.
# ---------------------------------------------------------------------------------------------


def as_text(arr: pa.Array | pa.ChunkedArray, col: str, path: str, row_offset: int = 0) -> pa.Array:
    """A column as UTF-8 strings, or a ConfigError saying why it cannot be (the row number is
    `row_offset` plus the row's index in `arr`)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):  # pandas categoricals written to Parquet
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        # Parquet bytes columns, and csv columns (read as bytes): text if they decode, else say
        # which row does not.
        try:
            return arr.cast(pa.string())
        except pa.ArrowInvalid:
            pass
        for i, raw in enumerate(arr.to_pylist()):
            try:
                (raw or b"").decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"column {col!r} of URL list {path} is not UTF-8 text (row {row_offset + i}: "
                    f"{err.reason} at byte {err.start}); save the file as UTF-8"
                ) from err
        return arr.cast(pa.string())
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        # A numeric-typed column texted back (a caption may be "2024").
        return pc.cast(arr, pa.string())
    raise ConfigError(f"column {col!r} of URL list {path} has type {arr.type}; it must hold text (strings)")


# ---------------------------------------------------------------------------------------------
# Streaming readers.
# ---------------------------------------------------------------------------------------------


def _input_stream(src: UrlSource) -> Any:
    path, filesystem = fs.arrow(src.path)
    return (filesystem or pafs.LocalFileSystem()).open_input_stream(path, compression=src.compression)


def _size(src: UrlSource) -> int | None:
    try:
        return int(fs.location(src.path).stat().st_size)
    except OSError:
        return None


def _unreadable(src: UrlSource, err: Exception) -> ConfigError:
    if "Empty CSV file" in str(err) or _size(src) == 0:
        return ConfigError(f"URL list {src.path} is empty: it needs a header and at least one row")
    if "Empty JSON stream" in str(err):
        return ConfigError(f"URL list {src.path} has no rows")
    return ConfigError(f"URL list {src.path} is not readable as {src.fmt}: {err}")


def _csv_reader(src: UrlSource, column_types: dict[str, pa.DataType] | None) -> Any:
    return pacsv.open_csv(
        _input_stream(src),
        read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(
            delimiter="\t" if src.fmt == "tsv" else ",", newlines_in_values=True
        ),
        convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
    )


def columns_of(src: UrlSource) -> pa.Schema:
    """The columns of a URL list file, reading its metadata (Parquet) or its first block."""
    try:
        if src.fmt == "parquet":
            return fs.read_schema(src.path)
        if src.fmt in ("csv", "tsv"):
            reader = _csv_reader(src, None)
            names = reader.schema.names
            reader.close()
            # Every csv column as bytes: the text check says which row is not UTF-8, and a
            # numeric-looking caption stays a caption.
            return pa.schema([pa.field(n, pa.binary()) for n in names])
        if src.fmt == "jsonl":
            if _size(src) == 0:
                raise ConfigError(f"URL list {src.path} is empty: it needs at least one row")
            return pajson.open_json(
                _input_stream(src), read_options=pajson.ReadOptions(block_size=BLOCK_BYTES)
            ).schema
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(src, err) from err
    raise ConfigError(f"unknown URL list format {src.fmt!r}; use one of {', '.join(FORMATS)}")


def iter_batches(src: UrlSource, columns: list[str], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The rows of one file in bounded batches (`columns` only; csv columns as bytes)."""
    try:
        if src.fmt == "parquet":
            pf = fs.parquet_file(src.path)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
            return
        if src.fmt in ("csv", "tsv"):
            names = columns_of(src).names
            reader = _csv_reader(src, {n: pa.binary() for n in names})
        else:
            reader = pajson.open_json(
                _input_stream(src), read_options=pajson.ReadOptions(block_size=BLOCK_BYTES)
            )
        for batch in reader:
            yield batch.select(columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(src, err) from err


def check_columns(
    sources: Iterable[UrlSource],
    url_col: str,
    caption_col: str | None,
    extra_columns: Sequence[str] = (),
) -> dict[str, pa.DataType]:
    """Check every file has the columns asked for, with text-like types for url and caption,
    reading metadata or first blocks only. Returns the extra columns' types (all files must
    agree on them)."""
    extra_types: dict[str, pa.DataType] = {}
    for src in sources:
        schema = columns_of(src)
        for role, col in (("--url-col", url_col), ("--caption-col", caption_col)):
            if col is not None and col not in schema.names:
                raise ConfigError(
                    f"URL list {src.path} has no column {col!r} ({role}); its columns are {schema.names}"
                )
            if col is not None and src.fmt == "parquet":
                as_text(pa.array([], schema.field(col).type), col, src.path)
        for col in extra_columns:
            if col not in schema.names:
                raise ConfigError(
                    f"URL list {src.path} has no column {col!r} (download.extra_columns); "
                    f"its columns are {schema.names}"
                )
            kind = pa.string() if src.fmt in ("csv", "tsv") else schema.field(col).type
            if col in extra_types and extra_types[col] != kind:
                raise ConfigError(
                    f"extra column {col!r} is {extra_types[col]} in an earlier URL list file but "
                    f"{kind} in {src.path}; the files must agree"
                )
            extra_types[col] = kind
    return extra_types


def text_columns(
    batch: pa.RecordBatch | pa.Table,
    src: str,
    url_col: str,
    caption_col: str | None,
    extra_types: dict[str, pa.DataType],
    row_offset: int = 0,
) -> pa.Table:
    """A batch of a URL list as a table of `url`, `text` (a missing caption is "") and the extra
    columns under their own names, cast to `extra_types`."""
    n = batch.num_rows
    urls = as_text(batch.column(url_col), url_col, src, row_offset)
    texts = (
        as_text(batch.column(caption_col), caption_col, src, row_offset)
        if caption_col
        else pa.nulls(n, pa.string())
    )
    cols: dict[str, Any] = {"url": urls, "text": pc.fill_null(texts, "")}
    for col, kind in extra_types.items():
        arr = batch.column(col)
        if pa.types.is_string(kind):
            arr = as_text(arr, col, src, row_offset)
        try:
            cols[col] = arr.cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ConfigError(
                f"extra column {col!r} of URL list {src} does not cast to {kind}: {err}"
            ) from err
    return pa.table(cols)


def read_url_list(
    path: UrlSpec,
    url_col: str = "url",
    caption_col: str | None = "caption",
    source: str = "web",
    input_format: str | None = None,
) -> pa.Table:
    """A whole URL list in the WEB_PAIR schema, with the download stage's uids (for small lists:
    tests and tools; the download stage plans shards instead). Fails before any work if a file, a
    column or the format is wrong, with a message that says what to change."""
    sources = expand_sources(path, input_format)
    check_columns(sources, url_col, caption_col)
    parts: list[pa.Table] = []
    n = 0
    for src in sources:
        cols = [url_col] + ([caption_col] if caption_col else [])
        for batch in iter_batches(src, list(dict.fromkeys(cols))):
            parts.append(text_columns(batch, src.path, url_col, caption_col, {}, n))
            n += batch.num_rows
    if n == 0:
        raise ConfigError(f"URL list {path} has no rows")
    table = pa.concat_tables(parts)
    urls, texts = table.column("url"), table.column("text")
    uids, _ = make_uids(source, [u if u is not None else "" for u in urls.to_pylist()], texts.to_pylist())
    log.info("read %d rows from %s", n, ", ".join(s.path for s in sources))
    return pa.Table.from_arrays(
        [
            pa.array(uids, pa.string()),
            urls.combine_chunks(),
            texts.combine_chunks(),
            pa.array([source] * n, pa.string()),
            pa.array(range(n), pa.int64()),
        ],
        schema=WEB_PAIR,
    )
