"""`capfilt status`: what a run has done so far, read from the files its stages leave behind.

Nothing here changes a file or needs Ray, so it is safe beside a run in progress; the run folder
may be local or on object storage (``capfilt status s3://bucket/runs/x``). The sources:

- ``<run>/_run.json`` (the recipe's stage list, written by ``run_recipe`` at start) and
  ``<run>/_stages/<stage>.json`` (each stage's manifest: ``running``, then ``done``);
- download and CapFilt folders: ``_stats/NNNNN.json`` (written last: the shard is done),
  ``_manifest.json`` (CapFilt: every input shard), ``_inputs/`` (download: shards not done yet)
  and ``_summary.json`` (shards that failed every attempt in the last pass);
- training folders: ``train_config.json`` (planned steps), ``<run_name>/checkpoint_<step>/`` and
  ``train_summary.json`` (the run finished).

``Watcher`` (``capfilt status RUN --watch``) repeats the same reads and adds, from the stats files'
modification times, each running stage's images/s now and its ETA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.core import fs
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location, RemotePath
from capfilt.core.layout import MANIFEST, RUN_FILE, STAGES_DIR, SUMMARY
from capfilt.core.shards import read_json
from capfilt.core.stage import DONE, NOT_STARTED, UNFINISHED, StageStatus
from capfilt.stages import registry

__all__ = ["DONE", "NOT_STARTED", "UNFINISHED", "RunStatus", "StageStatus", "run_status"]


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


def _read(path: Location) -> Any:
    return read_json(path) if path.is_file() else None


def _stage_status(run: Location, name: str, manifest: dict[str, Any] | None) -> StageStatus:
    state = NOT_STARTED if manifest is None else DONE if manifest.get("status") == "done" else UNFINISHED
    st = StageStatus(name, state, wall_s=(manifest or {}).get("wall_s"))
    if state == NOT_STARTED or name not in registry.names():
        return st  # a stage this process does not know (a plugin): its manifest's state only
    result = (manifest or {}).get("result") or {}
    return registry.get(name).status(run / name, result, st)


# ---------------------------------------------------------------------------------------------
# A run folder, or one stage's folder.
# ---------------------------------------------------------------------------------------------


def run_status(path: str | Path | RemotePath) -> RunStatus:
    """What the run (or stage output folder) at ``path`` has done; see the module docstring."""
    run = fs.location(path)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder; pass a run folder of `capfilt run` (its `out:`)")
    info = _read(run / RUN_FILE)
    stages_dir = run / STAGES_DIR
    if info is not None or stages_dir.is_dir():
        files: list[Location] = list(stages_dir.glob("*.json"))
        manifests = {p.stem: read_json(p) for p in sorted(files, key=str)}
        # The recipe's order, then any stage that ran but is no longer listed.
        planned = list(dict.fromkeys([*((info or {}).get("stages") or []), *manifests]))
        stages = [_stage_status(run, s, manifests.get(s)) for s in planned]
        return RunStatus(
            str(run), (info or {}).get("name"), stages, list((info or {}).get("resources") or [])
        )
    manifest = _read(run / MANIFEST)
    if manifest is not None:
        stage = manifest.get("stage") or (manifest.get("fingerprint") or {}).get("stage")
        if stage in ("download", "capfilt"):
            st = registry.get(str(stage)).status(run, {}, StageStatus(str(stage), UNFINISHED))
            complete = st.shards_done == st.shards_total and (run / SUMMARY).is_file()
            st.state = DONE if complete and not st.shards_failed else UNFINISHED
            return RunStatus(str(run), None, [st])
    raise ConfigError(
        f"{run} is neither a run folder (no {STAGES_DIR}/ or {RUN_FILE}) nor a download or CapFilt "
        f"output folder (no {MANIFEST}); pass the `out:` folder of a recipe"
    )


# ---------------------------------------------------------------------------------------------
# `capfilt status --watch`: the same reads, repeated, with rates and ETAs from the stats files' times.
# ---------------------------------------------------------------------------------------------


def stage_failed(st: StageStatus) -> bool:
    """A sharded stage that gave up: every shard is done or failed every attempt, some failed, and
    its manifest is not done (the runner stopped there)."""
    if st.state == DONE or not st.shards_failed or st.shards_total is None or st.shards_done is None:
        return False
    return st.shards_done + len(st.shards_failed) >= st.shards_total


def run_over(st: RunStatus) -> bool:
    """Nothing more will happen without a rerun: every stage done, or one failed."""
    return st.done or any(stage_failed(s) for s in st.stages)


class Watcher:
    """Reads a run folder again and again (``poll``) and draws what it reads (``frame``).

    "Images/s now" and the ETA come from the stats files' modification times: the images of the
    last ``recent`` shards finished, over the time since the oldest of them finished, so a stage
    that stalls shows its rate falling. A stats file is read once (it is written last and never
    changed). Reads only the run's files, through ``capfilt.core.fs``.
    """

    def __init__(self, path: str | Path, recent: int = 8, clock: Any = None) -> None:
        import time

        from capfilt.core import fs

        self.path = path
        self.loc = fs.location(str(path))
        self.recent = recent
        self.clock = clock or time.time
        self.status: RunStatus | None = None
        self._stats: dict[str, tuple[float, int]] = {}  # stats file -> (mtime, images)
        self._is_run = (self.loc / RUN_FILE).is_file() or (self.loc / STAGES_DIR).is_dir()

    def poll(self) -> RunStatus:
        self.status = run_status(self.path)
        return self.status

    def _finished(self, stage: str) -> list[tuple[float, int]]:
        """(mtime, images) of every stats file of ``stage``'s folder, oldest first."""
        from capfilt.core import fs
        from capfilt.core.layout import STATS_DIR

        d = self.loc / stage if self._is_run else self.loc
        found: list[fs.Location] = list((d / STATS_DIR).glob("*.json"))
        for p in found:
            key = str(p)
            if key not in self._stats:
                stats = fs.read_json(p)
                images = stats.get("images")
                if not isinstance(images, int):  # a download shard: its rows downloaded
                    images = int((stats.get("status_counts") or {}).get("success", 0))
                self._stats[key] = (p.stat().st_mtime, images)
        return sorted(self._stats[str(p)] for p in found)

    def rates(self, stage: str) -> tuple[float, float] | None:
        """(images/s, shards/s) now, or None before two shards have finished."""
        recent = self._finished(stage)[-self.recent :]
        if len(recent) < 2:
            return None
        span = self.clock() - recent[0][0]
        if span <= 0:
            return None
        return sum(images for _, images in recent[1:]) / span, (len(recent) - 1) / span

    def frame(self, interval: float, top_reasons: int = 3) -> list[str]:
        """The screen: a title, one row per stage, failures by reason."""
        import datetime as dt

        st = self.status or self.poll()
        n_done = sum(s.state == DONE for s in st.stages)
        when = dt.datetime.now().strftime("%H:%M:%S")
        title = f"run {st.name} in {st.path}" if st.name else st.path
        out = [
            f"{title}: {n_done} of {len(st.stages)} stage(s) done",
            f"refreshed {when}, every {interval:g} s; Ctrl-C stops watching (the run goes on)",
            "",
        ]
        rows = [("stage", "state", "shards done", "images", "images/s now", "ETA", "progress")]
        for s in st.stages:
            state = "failed" if stage_failed(s) else s.state
            shards = "-" if s.shards_done is None else f"{s.shards_done}/{s.shards_total}"
            if s.shards_failed:
                shards += f" ({len(s.shards_failed)} failed)"
            images = rate = eta = "-"
            if s.shards_done is not None:
                finished = self._finished(s.name)
                images = f"{sum(i for _, i in finished):,}"
                r = self.rates(s.name) if s.state == UNFINISHED and not stage_failed(s) else None
                if r is not None:
                    rate = f"{r[0]:.1f}" if r[0] >= 1 else f"{r[0]:.3g}"
                    left = (s.shards_total or 0) - s.shards_done - len(s.shards_failed)
                    eta = _duration(left / r[1]) if r[1] > 0 and left > 0 else "-"
            if s.state == DONE and s.wall_s is not None:
                eta = f"took {_duration(s.wall_s)}"
            rows.append((s.name, state, shards, images, rate, eta, s.progress))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        out += [
            ("  " + "  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True)) + "  " + r[6]).rstrip()
            for r in rows
        ]
        failing = [s for s in st.stages if s.failures]
        if failing:
            out += ["", "failures by reason:"]
            for s in failing:
                for reason, count in list(s.failures.items())[:top_reasons]:
                    out.append(f"  {s.name:<9} {count:>8,}  {reason[:90]}")
                if len(s.failures) > top_reasons:
                    out.append(f"  {s.name:<9} {'':>8}  ... {len(s.failures) - top_reasons} more reason(s)")
        return out

    def final_line(self, interrupted: bool) -> str:
        st = self.status or self.poll()
        n_done = sum(s.state == DONE for s in st.stages)
        failed = [s.name for s in st.stages if stage_failed(s)]
        if st.done:
            walls = [s.wall_s for s in st.stages if s.wall_s is not None]
            return f"run done: {n_done} of {len(st.stages)} stage(s) done in {_duration(sum(walls))} of stage time"
        if failed:
            return f"run stopped: {', '.join(failed)} failed; `capfilt run` with the same recipe retries it"
        if interrupted:
            return f"stopped watching: {n_done} of {len(st.stages)} stage(s) done; the run goes on"
        return f"{n_done} of {len(st.stages)} stage(s) done"
