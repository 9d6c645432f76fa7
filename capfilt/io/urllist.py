"""Reading the URL lists users bring (CC3M/CC12M/LAION style) into web pairs with stable uids."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from capfilt.core.errors import ConfigError
from capfilt.core.schema import WEB_PAIR, make_uids

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "tsv", "jsonl")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def infer_format(path: Path) -> str:
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format of URL list {path} from its extension {path.suffix!r}; "
            f"use one of {sorted(_EXTENSIONS)} or pass --input-format ({', '.join(FORMATS)})"
        )
    return fmt


def _read_table(path: Path, fmt: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt in ("csv", "tsv"):
            return pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(
                    delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True
                ),
                # Every column as text: a numeric-looking caption must stay a caption.
                convert_options=pacsv.ConvertOptions(column_types=None, strings_can_be_null=False),
                read_options=pacsv.ReadOptions(autogenerate_column_names=False),
            )
        if fmt == "jsonl":
            return pajson.read_json(path)
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err) or path.stat().st_size == 0:
            raise ConfigError(f"URL list {path} is empty: it needs a header and at least one row") from err
        raise ConfigError(f"URL list {path} is not readable as {fmt}: {err}") from err
    raise ConfigError(f"unknown URL list format {fmt!r}; use one of {', '.join(FORMATS)}")


def _as_text(table: pa.Table, col: str, path: Path) -> pa.Array:
    arr = table.column(col).combine_chunks()
    if pa.types.is_dictionary(arr.type):  # pandas categoricals written to Parquet
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        # Parquet bytes columns, and csv columns that are not valid UTF-8 (the csv reader types
        # those as bytes): text if they decode, else say which row does not.
        for i, raw in enumerate(arr.to_pylist()):
            try:
                (raw or b"").decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"column {col!r} of URL list {path} is not UTF-8 text (row {i}: {err.reason} at "
                    f"byte {err.start}); save the file as UTF-8"
                ) from err
        return arr.cast(pa.string())
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        # csv readers type an all-numeric column as numbers; text it back (a caption may be "2024").
        return pc.cast(arr, pa.string())
    raise ConfigError(f"column {col!r} of URL list {path} has type {arr.type}; it must hold text (strings)")


def read_url_list(
    path: str | Path,
    url_col: str = "url",
    caption_col: str | None = "caption",
    source: str = "web",
    input_format: str | None = None,
) -> pa.Table:
    """Read a URL list into the WEB_PAIR schema. Fails before any work if the file, a column or
    the format is wrong, with a message that says what to change."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"URL list {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"URL list {path} is a folder; pass one file (.parquet, .csv, .tsv or .jsonl)")
    fmt = input_format or infer_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown URL list format {fmt!r}; use one of {', '.join(FORMATS)}")
    table = _read_table(path, fmt)
    if table.num_rows == 0:
        raise ConfigError(f"URL list {path} has no rows")
    for role, col in (("--url-col", url_col), ("--caption-col", caption_col)):
        if col is not None and col not in table.column_names:
            raise ConfigError(
                f"URL list {path} has no column {col!r} ({role}); its columns are {table.column_names}"
            )
    urls = _as_text(table, url_col, path)
    texts = _as_text(table, caption_col, path) if caption_col else pa.nulls(table.num_rows, pa.string())
    # A missing caption is an empty caption: the image can still get a synthetic one later.
    texts = pc.fill_null(texts, "")
    url_list = [u if u is not None else "" for u in urls.to_pylist()]
    uids, _ = make_uids(source, url_list, texts.to_pylist())
    log.info("read %d rows from %s (%s)", table.num_rows, path, fmt)
    return pa.Table.from_arrays(
        [
            pa.array(uids, pa.string()),
            urls,
            texts,
            pa.array([source] * table.num_rows, pa.string()),
            pa.array(range(table.num_rows), pa.int64()),
        ],
        schema=WEB_PAIR,
    )
