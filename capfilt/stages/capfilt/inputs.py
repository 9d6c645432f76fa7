"""CapFilt's input: the download shards of a folder (local or on object storage), what each holds,
and the images of given rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location

REQUIRED_INPUT = ("uid", "url", "text", "status", "row", "image")


@dataclass
class _Plan:
    """One input shard: where it is and what it holds."""

    name: str
    path: Location
    rows_in: int
    images: int  # downloaded images the models see: dedup_before's skipped ones are not counted
    status_counts: dict[str, int]
    # Images dedup_before skips (never captioned or scored): uid, reason, duplicate_of, cosine each.
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _input_files(data: Location, flag: str = "--data") -> list[Location]:
    """The shard files of a folder, skipping bookkeeping (``_*``) and temp (``.*``) names."""
    if not data.is_dir():
        raise ConfigError(f"{flag} {data} is not a folder; pass the output folder of `capfilt download`")
    files = sorted((p for p in data.glob("*.parquet") if not p.name.startswith(("_", "."))), key=str)
    if not files:
        raise ConfigError(
            f"{flag} {data} holds no .parquet shards; pass the output folder of `capfilt download`"
        )
    return files


def _plan(files: list[Location]) -> list[_Plan]:
    """What each shard holds, from its schema and its status column (never its images)."""
    plans = []
    for f in files:
        names = fs.read_schema(f).names
        missing = [c for c in REQUIRED_INPUT if c not in names]
        if missing:
            raise ConfigError(
                f"input shard {f} lacks column(s) {missing}; CapFilt reads SAMPLE shards ({list(REQUIRED_INPUT)})"
            )
        status = Counter(fs.read_parquet(f, columns=["status"]).column("status").to_pylist())
        plans.append(
            _Plan(
                f.stem,
                f.resolve(),
                sum(status.values()),
                status.get(S.SUCCESS, 0),
                dict(sorted(status.items())),
            )
        )
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError("input shards must have distinct file names")
    return plans


def input_images(path: Location, uids: set[str], images_mode: str) -> pa.Table:
    """uid, url, image and image_ref of the rows of a SAMPLE shard whose uid is in ``uids``. Runs
    where the shard is written (a Ray worker), never in the driver: it reads image bytes."""
    columns = ["uid", "url"] + (["image"] if images_mode == "include" else [])
    table = fs.read_parquet(path, columns=columns)
    table = table.filter(pc.is_in(table.column("uid"), pa.array(sorted(uids), pa.string())))
    if "image" not in table.column_names:
        table = table.append_column("image", pa.nulls(table.num_rows, pa.binary()))
    return table.append_column("image_ref", pa.array([str(path)] * table.num_rows, pa.string()))
