"""The download stage: web alt-text pairs in, Parquet shards of SAMPLE rows out, via img2dataset.

The driver plans shards and runs the duplicate pass without holding rows (`planner`); each shard
task reads its own rows, makes their uids, screens them and downloads them (`download_shard`).

img2dataset does the fetching, decoding and resizing (its Downloader and Resizer, one shard at a
time, in-process). capfilt owns what img2dataset's distributors do not do reliably: the stable uid,
per-shard retry and concurrency on Ray, one output row per input row whatever happens, atomic
shard files and a stats file per shard that marks it done, so a rerun skips finished shards.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.feather as feather
from pydantic import BaseModel, ConfigDict, Field, field_validator

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError, StageFailed
from capfilt.core.fs import Location
from capfilt.core.shards import (
    INPUTS_DIR,
    MANIFEST,
    SUMMARY,
    TMP_DIR,
    done_shards,
    read_json,
    read_shard_stats,
    shard_name,
    shard_path,
    stats_path,
    write_json_atomic,
    write_parquet_atomic,
)
from capfilt.io.imageguard import GuardedResizer
from capfilt.io.netsafety import blocked_kind, blocked_reason, safe_urlopen
from capfilt.io.urllist import UrlSource, UrlSpec, check_columns, expand_sources
from capfilt.stages.download.planner import (
    Columns,
    ShardPlan,
    dedup_root,
    fingerprint,
    group_of,
    load_plans,
    plan_shards,
    repeats_of,
    run_dedup,
    save_plans,
    shard_text,
    url_problem,
)

log = logging.getLogger(__name__)

STAGE = "download"


class DownloadConfig(BaseModel):
    """Options of the download stage; defaults suit real web data."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(384, ge=8, le=4096)
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border"] = "keep_ratio"
    encode_quality: int = Field(95, ge=1, le=100)
    shard_size: int = Field(10_000, ge=1)
    thread_count: int = Field(32, ge=1)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(0, ge=0)  # per URL, inside img2dataset
    min_image_size: int = Field(10, ge=0)
    max_image_area: float = Field(50e6, gt=0)  # pixels; larger images fail as failed_to_resize
    max_aspect_ratio: float = Field(10.0, gt=1)
    max_attempts: int = Field(3, ge=1)  # per shard, ours
    concurrency: int | None = Field(None, ge=1)  # shards in flight; default: the cluster's CPUs
    cpus_per_task: float = Field(1.0, gt=0)
    failure_budget: int = Field(0, ge=0)  # shards allowed to fail every attempt before the job fails
    source: str = "web"
    # Which addresses a URL (or a redirect) may reach. "public" refuses loopback, private,
    # link-local and cloud metadata addresses; "allow_loopback" also allows 127.0.0.0/8 and ::1
    # (the shapes world's local server); "allow_private" also allows private networks. Link-local
    # (169.254.169.254) is refused under every policy.
    url_policy: Literal["public", "allow_loopback", "allow_private"] = "public"
    # Input columns carried into every output shard after SAMPLE's own (img2dataset's
    # save_additional_columns: LAION's similarity, punsafe, WIDTH, ...). csv/tsv columns are text.
    extra_columns: list[str] = Field(default_factory=list)
    # Rows per group of the duplicate pass (capfilt.stages.download.planner): one map task and
    # one hash partition per group; a task holds about this many keys.
    dedup_partition_rows: int = Field(1_000_000, ge=1)

    @field_validator("extra_columns")
    @classmethod
    def _extra_names(cls, value: list[str]) -> list[str]:
        taken = [c for c in value if c in S.SAMPLE.names]
        if taken:
            raise ValueError(f"{taken} name SAMPLE columns; carry other columns only")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names a column twice")
        return value


# ---------------------------------------------------------------------------------------------
# Screening: rows that are never fetched still get their row.
# ---------------------------------------------------------------------------------------------


def screen_rows(pairs: pa.Table) -> tuple[list[str | None], list[str | None]]:
    """Status and reason for rows decided before any fetch: an unusable URL, or an exact repeat of
    an earlier (url, text) row. None for rows to download."""
    status: list[str | None] = []
    reason: list[str | None] = []
    first_uid: dict[tuple[str, str], str] = {}
    for uid, url, text in zip(
        pairs.column("uid").to_pylist(),
        pairs.column("url").to_pylist(),
        pairs.column("text").to_pylist(),
        strict=True,
    ):
        url = (url or "").strip()
        problem = url_problem(url)
        if problem is not None:
            status.append(S.INVALID_INPUT)
            reason.append(problem)
            continue
        key = (url, text or "")
        if key in first_uid:
            status.append(S.DUPLICATE)
            reason.append(f"same url and text as an earlier row (uid {first_uid[key]})")
            continue
        first_uid[key] = uid
        status.append(None)
        reason.append(None)
    return status, reason


# ---------------------------------------------------------------------------------------------
# One shard, in a worker: pure function of (shard input file, config) -> shard + stats files.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Collected:
    """Rows img2dataset hands back for one shard, keyed by our uid."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def _collector_class(sink: _Collected) -> type:
    """An img2dataset sample-writer class that keeps rows in memory instead of writing files."""

    class _CollectingWriter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
            sink.rows[meta["uid"]] = {**meta, "image": img_str}

        def close(self) -> None:
            pass

    return _CollectingWriter


def _run_img2dataset(todo: pa.Table, work_dir: Path, cfg: DownloadConfig) -> _Collected:
    """Fetch and resize the rows of `todo` (columns url, caption, uid) with img2dataset's own
    Downloader and Resizer, in this process."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    sink = _Collected()
    if todo.num_rows == 0:
        return sink
    arrow_path = work_dir / "input.feather"
    # img2dataset reads the shard as an Arrow IPC file and deletes it when done.
    feather.write_feather(todo, arrow_path, compression="uncompressed")
    resizer = Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=cfg.encode_quality,
        encode_format="jpg",
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )
    # Bombs are refused from the header, odd pixel formats made 8-bit RGB: see capfilt.io.imageguard.
    guarded = GuardedResizer(resizer, cfg.max_image_area)
    downloader = Downloader(
        sample_writer_class=_collector_class(sink),
        resizer=guarded,
        thread_count=cfg.thread_count,
        save_caption=True,
        extract_exif=False,
        output_folder=str(work_dir),
        column_list=["url", "caption", "uid"],
        timeout=cfg.timeout,
        number_sample_per_shard=max(todo.num_rows, 2),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=cfg.retries,
        user_agent_token=None,
        disallowed_header_directives=None,
    )
    downloader.download_shard((0, str(arrow_path)))
    return sink


def shard_task(plan: ShardPlan, cols: Columns, out: Location, cfg: DownloadConfig) -> str:
    """The `input_path` argument of download_shard for a planned shard (JSON)."""
    return json.dumps(
        {
            "plan": plan.to_json(),
            "url_col": cols.url_col,
            "caption_col": cols.caption_col,
            "extra_columns": list(cols.extra_columns),
            "dedup": str(dedup_root(out)),
            "group": group_of(plan.shard, cfg.shard_size, cfg.dedup_partition_rows),
        }
    )


def _planned_pairs(task: dict[str, Any], source: str) -> pa.Table:
    """A planned shard's rows as WEB_PAIR + pre_status/pre_reason + extra columns: read from the
    URL list, uids with the global occurrence numbers and duplicates from the duplicate pass."""
    plan = ShardPlan.from_json(task["plan"])
    cols = Columns(task["url_col"], task["caption_col"], tuple(task["extra_columns"]))
    text = shard_text(plan, cols)
    repeats = repeats_of(task["dedup"], task["group"], plan.row0, plan.rows)
    uids: list[str] = []
    status: list[str | None] = []
    reason: list[str | None] = []
    urls = text.column("url").to_pylist()
    for i, (url, caption) in enumerate(zip(urls, text.column("text").to_pylist(), strict=True)):
        occurrence, dup_of = repeats.get(plan.row0 + i, (0, None))
        uids.append(S.make_uid(source, url or "", caption, occurrence))
        problem = url_problem((url or "").strip())
        if problem is not None:
            status.append(S.INVALID_INPUT)
            reason.append(problem)
        elif dup_of is not None:
            status.append(S.DUPLICATE)
            reason.append(f"same url and text as an earlier row (uid {dup_of})")
        else:
            status.append(None)
            reason.append(None)
    n = plan.rows
    columns: dict[str, Any] = {
        "uid": pa.array(uids, pa.string()),
        "url": text.column("url"),
        "text": text.column("text"),
        "source": pa.array([source] * n, pa.string()),
        "row": pa.array(range(plan.row0, plan.row0 + n), pa.int64()),
        "pre_status": pa.array(status, pa.string()),
        "pre_reason": pa.array(reason, pa.string()),
    }
    for c in cols.extra_columns:
        columns[c] = text.column(c)
    return pa.table(columns)


_PAIR_COLUMNS = {*S.WEB_PAIR.names, "pre_status", "pre_reason"}


def download_shard(
    shard: int, input_path: str, out_dir: str, cfg_json: str, attempt: int = 1
) -> dict[str, Any]:
    """Download one shard and write its Parquet file and then its stats file, both atomically.

    `input_path` is a planned shard (the JSON of `shard_task`: the task reads its own rows from
    the URL list), or a Parquet file of WEB_PAIR rows with pre_status/pre_reason (a shard
    screened elsewhere). Columns beyond those are carried into the output after SAMPLE's.

    Every input row becomes exactly one SAMPLE row. A row that img2dataset dropped (it logs and
    skips rows whose processing raised) is written as failed_internal, never lost.

    Every fetch, redirects included, goes through an opener that refuses addresses
    `cfg.url_policy` forbids before connecting (capfilt.io.netsafety); such a row fails to download
    with a reason that starts with "blocked: "."""
    name = shard_name(shard)  # first: a shard id that is not a number never names a file
    cfg = DownloadConfig.model_validate_json(cfg_json)
    out = fs.location(out_dir)
    t0 = time.time()
    if input_path.lstrip().startswith("{"):
        pairs = _planned_pairs(json.loads(input_path), cfg.source)
    else:
        pairs = fs.read_parquet(input_path)
    status = pairs.column("pre_status").to_pylist()
    reason = pairs.column("pre_reason").to_pylist()
    fetch_idx = [i for i, s in enumerate(status) if s is None]
    todo = pa.table(
        {
            "url": pairs.column("url").take(fetch_idx),
            "caption": pairs.column("text").take(fetch_idx),
            "uid": pairs.column("uid").take(fetch_idx),
        }
    )
    # img2dataset works in a local folder: the output folder's _tmp/ when it is local.
    if isinstance(out, Path):
        work_dir = out / TMP_DIR / f"{name}-{uuid.uuid4().hex[:8]}"
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        work_dir = Path(tempfile.mkdtemp(prefix=f"capfilt-download-{name}-"))
    try:
        with safe_urlopen(cfg.url_policy):
            got = _run_img2dataset(todo, work_dir, cfg).rows
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    n = pairs.num_rows
    cols: dict[str, list[Any]] = {
        k: [None] * n
        for k in (
            "status",
            "reason",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
            "image",
        )
    }
    for i, uid in enumerate(pairs.column("uid").to_pylist()):
        if status[i] is not None:
            cols["status"][i], cols["reason"][i] = status[i], reason[i]
            continue
        meta = got.get(uid)
        if meta is None:
            cols["status"][i], cols["reason"][i] = (
                S.FAILED_INTERNAL,
                "img2dataset returned no row (see worker log)",
            )
            continue
        cols["status"][i] = meta["status"]
        if meta["status"] != S.SUCCESS:
            message = meta["error_message"]
            cols["reason"][i] = blocked_reason(message) or message
        for k in ("width", "height", "original_width", "original_height", "sha256"):
            cols[k][i] = meta.get(k)
        cols["image"][i] = meta["image"] if meta["status"] == S.SUCCESS else None

    extras = [f for f in pairs.schema if f.name not in _PAIR_COLUMNS]
    table = pa.Table.from_arrays(
        [
            pairs.column("uid"),
            pairs.column("url"),
            pairs.column("text"),
            pairs.column("source"),
            pairs.column("row"),
            pa.array([shard] * n, pa.int32()),
            *(pa.array(cols[f.name], f.type) for f in S.SAMPLE if f.name in cols),
            *(pairs.column(f.name) for f in extras),
        ],
        schema=pa.schema([*S.SAMPLE, *extras]),
    )
    write_parquet_atomic(shard_path(out, shard), table)
    stats = shard_stats(table, shard, attempt, time.time() - t0)
    write_json_atomic(stats_path(out, shard), stats)  # last: marks the shard done
    return stats


def _reason_key(status: str, reason: str) -> str:
    """A reason as counted: the duplicate reason names the first row's uid and a blocked reason
    the address; the count names neither."""
    if status == S.DUPLICATE:
        return reason.split(" (uid ")[0]
    return blocked_kind(reason)


def shard_stats(table: pa.Table, shard: int, attempts: int, wall_s: float) -> dict[str, Any]:
    statuses = Counter(table.column("status").to_pylist())
    reasons = Counter(
        f"{s}: {_reason_key(s, r)}"
        for s, r in zip(table.column("status").to_pylist(), table.column("reason").to_pylist(), strict=True)
        if r is not None
    )
    return {
        "stage": STAGE,
        "shard": shard,
        "rows_in": table.num_rows,
        "rows_out": table.num_rows,
        "status_counts": dict(sorted(statuses.items())),
        "reason_counts": dict(reasons.most_common()),
        "attempts": attempts,
        "wall_s": round(wall_s, 3),
    }


# ---------------------------------------------------------------------------------------------
# The driver: read, screen, plan shards, run them on Ray with retry, summarise.
# ---------------------------------------------------------------------------------------------


@dataclass
class DownloadSummary:
    rows_in: int
    status_counts: dict[str, int]
    reason_counts: dict[str, int]
    shards_total: int
    shards_written: int  # by this run
    shards_skipped: int  # already done by an earlier run
    shards_failed: dict[int, str]  # shard -> last error, after every attempt
    shards_pending: int  # not run yet (max_shards), to do by a rerun
    wall_s: float
    out_dir: str

    @property
    def downloaded(self) -> int:
        return self.status_counts.get(S.SUCCESS, 0)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "downloaded": self.downloaded, "shards_failed": dict(self.shards_failed)}

    def lines(self) -> list[str]:
        failed = {k: v for k, v in self.status_counts.items() if k != S.SUCCESS}
        out = [
            f"rows in:         {self.rows_in}",
            f"downloaded:      {self.downloaded}",
            f"not downloaded:  {sum(failed.values())}",
        ]
        for status, count in sorted(failed.items(), key=lambda kv: -kv[1]):
            out.append(f"  {status:<20} {count}")
        top = list(self.reason_counts.items())[:8]
        if top:
            out.append("top reasons:")
            out.extend(f"  {count:>6}  {reason[:90]}" for reason, count in top)
        out.append(
            f"shards:          {self.shards_total} total, {self.shards_written} written now, "
            f"{self.shards_skipped} already done, {len(self.shards_failed)} failed, "
            f"{self.shards_pending} left for a rerun"
        )
        out.append(f"wall time:       {self.wall_s:.1f} s")
        out.append(f"output:          {self.out_dir}")
        return out


def _check_manifest(out: Location, fp: dict[str, Any]) -> None:
    """A ConfigError if `out` holds a download of another input or shard layout."""
    path = out / MANIFEST
    if path.exists():
        old = read_json(path)
        if old.get("fingerprint") != fp:
            diff = sorted(k for k in fp if old.get("fingerprint", {}).get(k) != fp[k])
            raise ConfigError(
                f"output folder {out} holds a download of a different input or shard layout "
                f"(differs in {diff}); pass a new --out, or delete the folder to start again"
            )


def _plan(
    sources: list[UrlSource], out: Location, cols: Columns, cfg: DownloadConfig, fp: dict[str, Any]
) -> list[ShardPlan]:
    """The shard plans: an earlier run's for the same input, else planned now. A bad input found
    while planning removes what planning wrote (and `out` itself if it made it)."""
    plans = load_plans(out, fp)
    if plans is not None:
        return plans
    created = not out.exists()
    try:
        plans = plan_shards(sources, out, cols, cfg.shard_size)
    except ConfigError:
        fs.rmtree(out / INPUTS_DIR)
        if created and isinstance(out, Path) and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    save_plans(out, fp, plans)
    return plans


def run_download(
    urls: UrlSpec,
    out_dir: str | Path | fs.RemotePath,
    cfg: DownloadConfig | None = None,
    url_col: str = "url",
    caption_col: str | None = "caption",
    input_format: str | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    max_shards: int | None = None,
) -> DownloadSummary:
    """Download every row of a URL input (a file, folder, glob or list of them; local or on
    object storage) into Parquet shards under `out_dir` (local or object storage), resuming if
    asked again with the same input. `max_shards` stops after that many shards (a trial run;
    rerun to finish).

    The driver holds shard plans, never rows (capfilt.stages.download.planner): it reads list
    metadata, streams non-indexed formats once into per-shard inputs, runs the duplicate pass
    and then the shard tasks on Ray, and writes the summary from the shards' stats files."""
    import ray
    from tqdm import tqdm

    from capfilt.core.cluster import cluster_cpus, ensure_ray

    cfg = cfg or DownloadConfig()
    t0 = time.time()
    out = fs.location(out_dir)
    sources = expand_sources(urls, input_format)
    cols = Columns(url_col, caption_col, tuple(cfg.extra_columns))
    check_columns(sources, url_col, caption_col, cfg.extra_columns)
    fp = fingerprint(sources, cols, cfg.shard_size, cfg.source)
    _check_manifest(out, fp)
    plans = _plan(sources, out, cols, cfg, fp)
    write_json_atomic(out / MANIFEST, {"fingerprint": fp, "config": json.loads(cfg.model_dump_json())})

    n_shards = len(plans)
    already = done_shards(out)
    pending = [s for s in range(n_shards) if s not in already][:max_shards]
    log.info(
        "%d rows -> %d shards of %d (%d already done, %d to run)",
        sum(p.rows for p in plans),
        n_shards,
        cfg.shard_size,
        len(already),
        len(pending),
    )

    failed: dict[int, str] = {}
    if pending:
        ensure_ray(ray_address)
        retries = cfg.max_attempts - 1
        run_dedup(
            plans, out, cols, cfg.source, cfg.shard_size, cfg.dedup_partition_rows, cfg.cpus_per_task, retries
        )
        concurrency = cfg.concurrency or max(1, int(cluster_cpus() / cfg.cpus_per_task))
        remote = ray.remote(download_shard).options(num_cpus=cfg.cpus_per_task, max_retries=0)
        cfg_json = cfg.model_dump_json()
        queue = list(pending)
        attempts: Counter[int] = Counter()
        in_flight: dict[Any, int] = {}
        bar = tqdm(total=len(pending), desc="download shards", unit="shard", disable=not progress)
        ok = 0

        def submit(s: int) -> None:
            attempts[s] += 1
            task = shard_task(plans[s], cols, out, cfg)
            in_flight[remote.remote(s, task, str(out), cfg_json, attempts[s])] = s

        while queue or in_flight:
            while queue and len(in_flight) < concurrency:
                submit(queue.pop(0))
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            s = in_flight.pop(ready[0])
            try:
                st = ray.get(ready[0])
                ok += st["status_counts"].get(S.SUCCESS, 0)
                bar.update(1)
                bar.set_postfix(images=ok)
                log.debug("shard %d done: %s", s, st["status_counts"])
            except Exception as err:  # a worker died or the shard raised: our retry, not Ray's
                msg = failure_reason(err)
                if attempts[s] < cfg.max_attempts:
                    log.warning("shard %d attempt %d failed (%s); retrying", s, attempts[s], msg)
                    submit(s)
                else:
                    log.error("shard %d failed after %d attempts: %s", s, attempts[s], msg)
                    log.debug("%s", traceback.format_exc())
                    failed[s] = msg
                    bar.update(1)
        bar.close()
    if len(done_shards(out)) == n_shards:
        fs.rmtree(out / INPUTS_DIR)  # every shard is done: the plans and the duplicate pass go
    tmp = out / TMP_DIR
    if isinstance(tmp, Path) and tmp.exists() and not any(tmp.iterdir()):
        tmp.rmdir()

    stats = read_shard_stats(out)
    status_counts: Counter[str] = Counter()
    reason_counts: Counter[str] = Counter()
    for st in stats:
        status_counts.update(st["status_counts"])
        reason_counts.update(st["reason_counts"])
    summary = DownloadSummary(
        rows_in=sum(st["rows_in"] for st in stats) + sum(plans[s].rows for s in failed),
        status_counts=dict(sorted(status_counts.items())),
        reason_counts=dict(reason_counts.most_common()),
        shards_total=n_shards,
        shards_written=len(pending) - len(failed),
        shards_skipped=len(already),
        shards_failed=failed,
        shards_pending=n_shards - len(already) - len(pending),
        wall_s=time.time() - t0,
        out_dir=str(out),
    )
    write_json_atomic(out / SUMMARY, summary.to_json())
    if len(failed) > cfg.failure_budget:
        names = ", ".join(f"{shard_name(s)} ({m})" for s, m in sorted(failed.items()))
        raise StageFailed(
            f"{len(failed)} download shard(s) failed every attempt, over the failure budget of "
            f"{cfg.failure_budget}: {names}. Rerun the same command to retry them."
        )
    return summary


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def failure_reason(err: BaseException) -> str:
    """One line saying why a shard attempt failed: the task's own exception for an exception
    raised in the task (a RayTaskError's first line names only the task and its pid), Ray's
    message for a worker that died; no terminal colour codes."""
    from ray.exceptions import RayTaskError

    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    text = _ANSI.sub("", str(cause))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}"[:500] if first else type(cause).__name__


def read_samples(out_dir: str | Path | fs.RemotePath, columns: list[str] | None = None) -> pa.Table:
    """All SAMPLE rows of a finished download folder (local or remote), ordered by input row.
    Extra input columns (DownloadConfig.extra_columns) are left out; read the shards for them."""
    out = fs.location(out_dir)
    shards: list[Location] = list(out.glob("[0-9]*.parquet"))
    files = sorted(shards, key=str)
    if not files:
        return S.SAMPLE.empty_table() if columns is None else S.SAMPLE.empty_table().select(columns)
    table = pa.concat_tables([fs.read_parquet(f, columns=columns, schema=S.SAMPLE) for f in files])
    return table.sort_by("row") if "row" in table.column_names else table
