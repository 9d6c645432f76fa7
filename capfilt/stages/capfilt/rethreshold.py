"""A finished CapFilt run re-decided at another threshold from its candidates table (no model runs), and its tables read back."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.layout import (
    CALIBRATION,
    CANDIDATES_DIR,
    CAPTIONS_DIR,
    CLEANED_DIR,
    MANIFEST,
    STATS_DIR,
    SUMMARY,
)
from capfilt.core.shards import read_json, safe_component, write_json_atomic, write_parquet_atomic
from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
from capfilt.stages.capfilt.decisions import KEEP, kept_dir, shard_paths
from capfilt.stages.capfilt.human import HUMAN_PREFIX
from capfilt.stages.capfilt.inputs import input_images
from capfilt.stages.capfilt.select import SELECTION_FIELDS, select_table, selection_record
from capfilt.stages.capfilt.summary import CapFiltSummary, summarize
from capfilt.stages.capfilt.writer import cleaned_table, shard_done, shard_stats

log = logging.getLogger(__name__)


def redecide(candidates: pa.Table, cfg: CapFiltConfig) -> pa.Table:
    """New decisions and ranks for the scored rows of a CANDIDATE table under ``cfg``'s threshold(s)
    and selection policy; unscored rows keep theirs."""
    return select_table(
        candidates, policy=cfg.select, n=cfg.top_n, threshold=cfg.threshold, thresholds=cfg.thresholds
    )


def rethreshold(
    run_dir: str | Path | fs.RemotePath,
    threshold: float | None = None,
    *,
    select: str | None = None,
    top_n: int | None = None,
    thresholds: dict[str, float] | None = None,
    calibrated: bool = False,
) -> CapFiltSummary:
    """Re-decide every scored text of a finished run ("reselect") at a new threshold, per-source
    thresholds, selection policy or n, and rewrite its cleaned shards, candidates and stats.
    Whatever is not given stays as the run had it; ``calibrated`` takes the per-source thresholds
    ``capfilt calibrate`` wrote into the run. Images come from the download shards the manifest
    names (they must still be there when images are included). Interrupted, it is safe to run again."""
    run = fs.location(run_dir)
    t0 = time.time()
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    path = run / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{run} holds no CapFilt run ({MANIFEST} missing); pass the --out of `capfilt capfilt`"
        )
    manifest = read_json(path)
    if manifest.get("stage") != STAGE:
        raise ConfigError(f"{run} holds the output of stage {manifest.get('stage')!r}, not a CapFilt run")
    if calibrated:
        cal_path = run / CALIBRATION
        if not cal_path.is_file():
            raise ConfigError(f"{run} has no {CALIBRATION}; run `capfilt calibrate --run {run} ...` first")
        thresholds = (thresholds or {}) | read_json(cal_path)["thresholds"]
    change: dict[str, Any] = {
        k: v
        for k, v in (
            ("threshold", threshold),
            ("select", select),
            ("top_n", top_n),
            ("thresholds", thresholds),
        )
        if v is not None
    }
    try:
        cfg = CapFiltConfig.model_validate(manifest["config"] | change)
    except ValidationError as err:
        raise ConfigError(f"cannot reselect with {change}: {err}") from err
    selection = {k: getattr(cfg, k) for k in SELECTION_FIELDS}
    try:  # shard names become file names below: none may lead out of the run folder
        inputs = {safe_component(k, "shard name"): fs.location(v) for k, v in manifest["inputs"].items()}
    except ValueError as err:
        raise ConfigError(f"{path} is damaged: {err}") from err
    kept_folder = kept_dir(manifest.get("filter") is not None)
    web = [n for n in inputs if shard_done(run, n, kept_folder)]
    if cfg.images == "include":
        gone = sorted(str(inputs[n]) for n in web if not inputs[n].is_file())
        if gone:
            raise ConfigError(
                f"the download shards this run read are gone ({gone[:3]}); rethreshold needs their images"
            )
    # The intent first: a rerun after a crash finishes the shards still at the old selection.
    manifest["config"] |= selection
    manifest["fingerprint"]["settings"] |= selection
    write_json_atomic(path, manifest)
    changed = 0
    for name in web:
        candidates_file, kept_file, stats_file = shard_paths(run, name, kept_folder)
        old = read_json(stats_file)
        if old.get("selection", {"threshold": old["threshold"]}) == selection_record(cfg):
            continue
        candidates = redecide(fs.read_parquet(candidates_file, schema=S.CANDIDATE), cfg)
        kept = set(candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist())
        cleaned = cleaned_table(candidates, input_images(inputs[name], kept, cfg.images), cfg.images)
        write_parquet_atomic(candidates_file, candidates)
        write_parquet_atomic(kept_file, cleaned)
        keep_keys = ("input", "rows_in", "status_counts", "images", "images_not_decodable", "wall_s")
        stats = shard_stats(
            name,
            "web",
            candidates,
            cleaned.num_rows,
            {k: old[k] for k in keep_keys} | {"selection": selection_record(cfg)},
            cfg.threshold,
        )
        write_json_atomic(stats_file, stats)
        changed += 1
    human_files: list[fs.Location] = [*(run / STATS_DIR).glob(f"{HUMAN_PREFIX}*.json")]
    for human_stats in sorted(human_files, key=str):
        st = read_json(human_stats)
        if st["threshold"] != cfg.threshold:  # human pairs do not depend on it; keep the record consistent
            write_json_atomic(human_stats, st | {"threshold": cfg.threshold})
    summary = summarize(run, cfg.threshold)
    summary.shards_written = changed
    summary.shards_skipped = len(web) - changed
    summary.wall_s = time.time() - t0
    write_json_atomic(run / SUMMARY, summary.to_json())
    log.info("reselected %d shard(s) of %s: %s", changed, run, selection)
    return summary


def _read_folder(folder: fs.Location, schema: pa.Schema) -> pa.Table:
    files: list[fs.Location] = sorted([*folder.glob("*.parquet")], key=str)
    if not files:
        return schema.empty_table()
    return pa.concat_tables([fs.read_parquet(f, schema=schema) for f in files])


def read_cleaned(run: str | Path | fs.RemotePath) -> pa.Table:
    """Every cleaned row of a run (web shards a filter decided, then human pairs), in the CLEANED schema."""
    return _read_folder(fs.location(run) / CLEANED_DIR, S.CLEANED)


def read_captions(run: str | Path | fs.RemotePath) -> pa.Table:
    """Every text a caption-only run (no filter) kept unscored, in the CLEANED schema."""
    return _read_folder(fs.location(run) / CAPTIONS_DIR, S.CLEANED)


def read_candidates(run: str | Path | fs.RemotePath) -> pa.Table:
    """Every candidate row of a run, in the CANDIDATE schema."""
    return _read_folder(fs.location(run) / CANDIDATES_DIR, S.CANDIDATE)
