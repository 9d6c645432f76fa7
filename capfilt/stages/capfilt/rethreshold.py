"""A finished CapFilt run re-decided at another threshold from its candidates table (no model runs), and its tables read back."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.layout import CANDIDATES_DIR, CAPTIONS_DIR, CLEANED_DIR, MANIFEST, STATS_DIR, SUMMARY
from capfilt.core.shards import read_json, safe_component, write_json_atomic, write_parquet_atomic
from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
from capfilt.stages.capfilt.decisions import KEEP, decide, kept_dir, shard_paths
from capfilt.stages.capfilt.human import HUMAN_PREFIX
from capfilt.stages.capfilt.inputs import input_images
from capfilt.stages.capfilt.summary import CapFiltSummary, summarize
from capfilt.stages.capfilt.writer import cleaned_table, shard_done, shard_stats

log = logging.getLogger(__name__)


def redecide(candidates: pa.Table, threshold: float) -> pa.Table:
    """New decisions for the scored rows of a CANDIDATE table; unscored rows keep theirs."""
    decision, reason = [], []
    for itm, d, r in zip(
        candidates.column("itm_score").to_pylist(),
        candidates.column("decision").to_pylist(),
        candidates.column("reason").to_pylist(),
        strict=True,
    ):
        new_d, new_r = (d, r) if itm is None else decide(itm, threshold)
        decision.append(new_d)
        reason.append(new_r)
    t = candidates.set_column(
        candidates.schema.get_field_index("decision"), "decision", pa.array(decision, pa.string())
    )
    return t.set_column(t.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))


def rethreshold(run_dir: str | Path | fs.RemotePath, threshold: float) -> CapFiltSummary:
    """Re-decide every scored text of a finished run at ``threshold`` and rewrite its cleaned
    shards, candidates and stats. Images come from the download shards the manifest names (they
    must still be there when images are included). Interrupted, it is safe to run again."""
    run = fs.location(run_dir)
    t0 = time.time()
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    path = run / MANIFEST
    if not path.is_file():
        raise ConfigError(
            f"{run} holds no CapFilt run ({MANIFEST} missing); pass the --out of `capfilt capfilt`"
        )
    manifest = read_json(path)
    if manifest.get("stage") != STAGE:
        raise ConfigError(f"{run} holds the output of stage {manifest.get('stage')!r}, not a CapFilt run")
    cfg = CapFiltConfig.model_validate(manifest["config"] | {"threshold": threshold})
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
    # The intent first: a rerun after a crash finishes the shards still at the old threshold.
    manifest["config"]["threshold"] = threshold
    manifest["fingerprint"]["settings"]["threshold"] = threshold
    write_json_atomic(path, manifest)
    changed = 0
    for name in web:
        candidates_file, kept_file, stats_file = shard_paths(run, name, kept_folder)
        old = read_json(stats_file)
        if old["threshold"] == threshold:
            continue
        candidates = redecide(fs.read_parquet(candidates_file, schema=S.CANDIDATE), threshold)
        kept = set(candidates.filter(pc.equal(candidates.column("decision"), KEEP)).column("uid").to_pylist())
        cleaned = cleaned_table(candidates, input_images(inputs[name], kept, cfg.images), cfg.images)
        write_parquet_atomic(candidates_file, candidates)
        write_parquet_atomic(kept_file, cleaned)
        keep_keys = ("input", "rows_in", "status_counts", "images", "images_not_decodable", "wall_s")
        stats = shard_stats(
            name, "web", candidates, cleaned.num_rows, {k: old[k] for k in keep_keys}, threshold
        )
        write_json_atomic(stats_file, stats)
        changed += 1
    human_files: list[fs.Location] = [*(run / STATS_DIR).glob(f"{HUMAN_PREFIX}*.json")]
    for human_stats in sorted(human_files, key=str):
        st = read_json(human_stats)
        if st["threshold"] != threshold:  # human pairs do not depend on it; keep the record consistent
            write_json_atomic(human_stats, st | {"threshold": threshold})
    summary = summarize(run, threshold)
    summary.shards_written = changed
    summary.shards_skipped = len(web) - changed
    summary.wall_s = time.time() - t0
    write_json_atomic(run / SUMMARY, summary.to_json())
    log.info("rethresholded %d shard(s) of %s at %.3f", changed, run, threshold)
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
