"""`capfilt status`: what a run has done so far, read from the files its stages leave behind.

Nothing here changes a file or needs Ray, so it is safe beside a run in progress. The sources:

- ``<run>/_run.json`` (the recipe's stage list, written by ``run_recipe`` at start) and
  ``<run>/_stages/<stage>.json`` (each stage's manifest: ``running``, then ``done``);
- download and CapFilt folders: ``_stats/NNNNN.json`` (written last: the shard is done),
  ``_manifest.json`` (CapFilt: every input shard), ``_inputs/`` (download: shards not done yet)
  and ``_summary.json`` (shards that failed every attempt in the last pass);
- training folders: ``train_config.json`` (planned steps), ``<run_name>/checkpoint_<step>/`` and
  ``train_summary.json`` (the run finished).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.core.errors import ConfigError
from capfilt.core.shards import INPUTS_DIR, MANIFEST, STATS_DIR, SUMMARY, done_shards, read_json, shard_name

DONE, UNFINISHED, NOT_STARTED = "done", "unfinished", "not started"

# Names the stages write (capfilt.pipeline.runner, capfilt.train.loop, capfilt.stages.capfilt.driver), repeated here so
# that `capfilt status` imports neither torch nor Ray; tests check they agree.
STAGE_ORDER = ("world", "download", "vit", "pretrain", "finetune", "capfilt", "pretrain2", "evaluate")
STAGES_DIR = "_stages"
RUN_FILE = "_run.json"
TRAIN_CONFIG = "train_config.json"
TRAIN_SUMMARY = "train_summary.json"
CLEANED_DIR = "cleaned"
CANDIDATES_DIR = "candidates"
# CapFilt reasons for texts kept without a score: not failures.
_KEPT_REASONS = ("unscored (no filter)", "human pair (kept unscored)")
_CHECKPOINT = re.compile(r"checkpoint_(\d+)")


@dataclass
class StageStatus:
    name: str
    state: str  # DONE, UNFINISHED (running now, or stopped: a rerun resumes it) or NOT_STARTED
    wall_s: float | None = None  # of the finished stage
    shards_done: int | None = None  # None: the stage has no shards
    shards_total: int | None = None  # as far as the files tell
    shards_failed: dict[str, str] = field(default_factory=dict)  # shard -> last error, not done since
    rows: dict[str, int] = field(default_factory=dict)  # download: rows by status; CapFilt: texts, kept
    failures: dict[str, int] = field(default_factory=dict)  # rows (texts) by failure reason
    progress: str = ""  # one line: "step 200 of 1000", "kept 340 of 900 texts", ...


@dataclass
class RunStatus:
    path: str
    name: str | None
    stages: list[StageStatus]
    notes: list[str] = field(default_factory=list)  # resources scaled to the cluster at start

    @property
    def done(self) -> bool:
        return all(s.state == DONE for s in self.stages)

    def stage(self, name: str) -> StageStatus:
        return next(s for s in self.stages if s.name == name)

    def lines(self, top_reasons: int = 5) -> list[str]:
        """A short table: one row per stage, then failures by reason and failed shards."""
        n_done = sum(s.state == DONE for s in self.stages)
        title = f"run {self.name} in {self.path}" if self.name else f"{self.path}"
        out = [f"{title}: {n_done} of {len(self.stages)} stage(s) done"]
        out += [f"  {note}" for note in self.notes]
        rows = [("stage", "state", "shards", "time", "progress")]
        for s in self.stages:
            shards = "-" if s.shards_done is None else f"{s.shards_done}/{s.shards_total}"
            if s.shards_failed:
                shards += f" ({len(s.shards_failed)} failed)"
            wall = _duration(s.wall_s) if s.wall_s is not None else "-"
            rows.append((s.name, s.state, shards, wall, s.progress))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out += [
            ("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]).rstrip()
            for r in rows
        ]
        failing = [s for s in self.stages if s.failures]
        if failing:
            out.append("failures by reason:")
            for s in failing:
                for reason, count in list(s.failures.items())[:top_reasons]:
                    out.append(f"  {s.name:<9} {count:>8}  {reason[:100]}")
                if len(s.failures) > top_reasons:
                    out.append(f"  {s.name:<9} {'':>8}  ... {len(s.failures) - top_reasons} more reason(s)")
        for s in self.stages:
            for shard, err in sorted(s.shards_failed.items()):
                out.append(f"failed shard: {s.name} {shard}: {err[:120]}")
        if any(s.state == UNFINISHED for s in self.stages):
            out.append("unfinished: running now, or stopped; `capfilt run` with the same recipe resumes it")
        return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# One stage folder.
# ---------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _by_count(counter: Counter[str]) -> dict[str, int]:
    return dict(counter.most_common())


def download_status(d: Path, st: StageStatus) -> StageStatus:
    """Shards, rows by status and failure reasons of a download folder."""
    done = done_shards(d)
    pending = {int(p.stem) for p in (d / INPUTS_DIR).glob("*.parquet") if p.stem.isdigit()} - done
    summary = _read(d / SUMMARY) or {}
    st.shards_done = len(done)
    st.shards_total = max(int(summary.get("shards_total", 0)), len(done | pending))
    st.shards_failed = {
        shard_name(int(k)): str(v)
        for k, v in (summary.get("shards_failed") or {}).items()
        if int(k) not in done
    }
    rows: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in sorted(done):
        stats = read_json(d / STATS_DIR / f"{shard_name(s)}.json")
        rows.update(stats.get("status_counts", {}))
        reasons.update(stats.get("reason_counts", {}))
    st.rows = dict(sorted(rows.items()))
    st.failures = _by_count(reasons)
    if rows:
        st.progress = f"{sum(rows.values())} rows, {rows.get('success', 0)} downloaded"
    return st


def capfilt_status(d: Path, st: StageStatus) -> StageStatus:
    """Shards, texts kept and drop reasons of a CapFilt folder."""
    manifest = _read(d / MANIFEST) or {}
    web = set((manifest.get("inputs") or {}).keys())
    done = {
        p.stem
        for p in (d / STATS_DIR).glob("*.json")
        if (d / CLEANED_DIR / f"{p.stem}.parquet").is_file()
        and (d / CANDIDATES_DIR / f"{p.stem}.parquet").is_file()
    }
    st.shards_done = len(done)
    st.shards_total = len(web | done)
    texts = kept = 0
    reasons: Counter[str] = Counter()
    for name in sorted(done):
        stats = read_json(d / STATS_DIR / f"{name}.json")
        texts += sum(stats.get("texts", {}).values())
        kept += sum(stats.get("kept", {}).values())
        reasons.update({r: c for r, c in stats.get("reason_counts", {}).items() if r not in _KEPT_REASONS})
    st.rows = {"texts": texts, "kept": kept}
    st.failures = _by_count(reasons)
    if texts:
        st.progress = f"kept {kept} of {texts} texts"
    return st


def _train_progress(d: Path) -> str:
    summary = _read(d / TRAIN_SUMMARY)
    config = _read(d / TRAIN_CONFIG)
    planned = (summary or {}).get("total_steps") or (config or {}).get("steps")
    of = f" of {planned}" if planned else ""
    if summary:
        return f"step {summary.get('steps')}{of}, model {summary.get('model_dir')}"
    steps = [int(m.group(1)) for p in d.glob("*/checkpoint_*") if (m := _CHECKPOINT.fullmatch(p.name))]
    if steps:
        return f"checkpoint at step {max(steps)}{of}"
    return "starting" if config else ""


def _stage_status(run: Path, name: str, manifest: dict[str, Any] | None) -> StageStatus:
    state = NOT_STARTED if manifest is None else DONE if manifest.get("status") == "done" else UNFINISHED
    st = StageStatus(name, state, wall_s=(manifest or {}).get("wall_s"))
    if state == NOT_STARTED:
        return st
    d = run / name
    result = (manifest or {}).get("result") or {}
    if name == "download":
        return download_status(d, st)
    if name == "capfilt":
        return capfilt_status(d, st)
    if name == "world":
        counts = result.get("counts") or {}
        images: dict[str, Any] = counts["images"] if isinstance(counts.get("images"), dict) else {}
        st.progress = ", ".join(
            [f"{k} {v}" for k, v in images.items()]
            + [f"{k} {v}" for k, v in counts.items() if isinstance(v, int)]
        )
        st.progress = f"images: {st.progress}" if images else st.progress
    elif name == "vit":
        if result:
            st.progress = f"held-out shape accuracy {result.get('held_out_accuracy')}"
    elif name in ("pretrain", "pretrain2"):
        given = state == DONE and "steps" not in result
        st.progress = f"given: {result.get('model_dir')}" if given else _train_progress(d)
    elif name == "finetune":
        parts = []
        for role in ("captioner", "filter"):
            r = result.get(role) or {}
            if r and "steps" not in r:
                parts.append(f"{role} given")
            elif (d / role).is_dir():
                parts.append(f"{role} {_train_progress(d / role)}")
        st.progress = "; ".join(parts)
    elif name == "evaluate" and result.get("report"):
        st.progress = f"report {result['report']}"
    return st


# ---------------------------------------------------------------------------------------------
# A run folder, or one stage's folder.
# ---------------------------------------------------------------------------------------------


def run_status(path: str | Path) -> RunStatus:
    """What the run (or stage output folder) at ``path`` has done; see the module docstring."""
    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder; pass a run folder of `capfilt run` (its `out:`)")
    info = _read(run / RUN_FILE)
    stages_dir = run / STAGES_DIR
    if info is not None or stages_dir.is_dir():
        manifests = {p.stem: read_json(p) for p in stages_dir.glob("*.json") if p.stem in STAGE_ORDER}
        planned = set((info or {}).get("stages") or []) | set(manifests)
        stages = [_stage_status(run, s, manifests.get(s)) for s in STAGE_ORDER if s in planned]
        return RunStatus(
            str(run), (info or {}).get("name"), stages, list((info or {}).get("resources") or [])
        )
    manifest = _read(run / MANIFEST)
    if manifest is not None:
        stage = manifest.get("stage") or (manifest.get("fingerprint") or {}).get("stage")
        if stage in ("download", "capfilt"):
            st = StageStatus(str(stage), UNFINISHED)
            st = download_status(run, st) if stage == "download" else capfilt_status(run, st)
            complete = st.shards_done == st.shards_total and (run / SUMMARY).is_file()
            st.state = DONE if complete and not st.shards_failed else UNFINISHED
            return RunStatus(str(run), None, [st])
    raise ConfigError(
        f"{run} is neither a run folder (no {STAGES_DIR}/ or {RUN_FILE}) nor a download or CapFilt "
        f"output folder (no {MANIFEST}); pass the `out:` folder of a recipe"
    )
