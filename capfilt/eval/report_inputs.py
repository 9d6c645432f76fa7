"""What the report reads of a run folder besides the evaluation: each stage's manifest (state, wall
time, result, config), turned into the headline's per-stage time, throughput and resource-hours.

Read through ``capfilt.core.fs``, so a run folder on object storage reads the same as a local one.
Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from capfilt.core import fs
from capfilt.core.layout import RUN_FILE, STAGES_DIR

__all__ = ["StageRun", "requested_resources", "stage_runs", "throughput"]


@dataclass
class StageRun:
    """One stage of a run as its manifest records it."""

    name: str
    state: str  # the manifest's status: "done", "running" (or stopped), ...
    wall_s: float | None
    result: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def resources(self) -> tuple[float, float] | None:
        return requested_resources(self.config)

    @property
    def cpu_hours(self) -> float | None:
        res = self.resources
        return None if res is None or self.wall_s is None else res[0] * self.wall_s / 3600

    @property
    def gpu_hours(self) -> float | None:
        res = self.resources
        return None if res is None or self.wall_s is None else res[1] * self.wall_s / 3600


def stage_runs(run_dir: str | fs.Location) -> list[StageRun]:
    """Every stage with a manifest, in the recipe's order (``_run.json``), then any other."""
    run = fs.location(run_dir)
    info = fs.read_json(run / RUN_FILE) if (run / RUN_FILE).is_file() else {}
    found: list[fs.Location] = list((run / STAGES_DIR).glob("*.json"))
    manifests = {p.stem: fs.read_json(p) for p in sorted(found, key=str)}
    order = list(dict.fromkeys([*(info.get("stages") or []), *manifests]))
    out = []
    for name in order:
        m = manifests.get(name)
        if m is None:
            continue
        result = m.get("result") if isinstance(m.get("result"), dict) else {}
        config = m.get("config") if isinstance(m.get("config"), dict) else {}
        out.append(StageRun(name, str(m.get("status", "")), m.get("wall_s"), result or {}, config or {}))
    return out


def _walk(d: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``d`` and every dict nested in it, depth first."""
    out = [d]
    for v in d.values():
        if isinstance(v, Mapping):
            out += _walk(v)
    return out


def requested_resources(config: Mapping[str, Any]) -> tuple[float, float] | None:
    """(CPUs, GPUs) a stage's Ray work asked for, from the config its manifest records; None when
    the config does not say (a stage run in the driver, or a download sized to the cluster).

    Training sections (``steps`` set): ``num_workers`` x ``cpus_per_worker`` (default 1 x 1), one
    GPU per worker with ``use_gpu``; sections run one after another count once (the largest).
    CapFilt: (captioner + filter actors) x CPUs and GPUs per actor, plus ``preprocess_cpus``.
    Download: ``concurrency`` x ``cpus_per_task``.
    """
    best: tuple[float, float] | None = None
    for d in _walk(config):
        found: tuple[float, float] | None = None
        if "captioner_actors" in d or "filter_actors" in d:
            actors = int(d.get("captioner_actors", 1)) + int(d.get("filter_actors", 1))
            cpus = actors * float(d.get("cpus_per_actor", 0.5)) + float(d.get("preprocess_cpus", 1.0))
            found = (cpus, actors * float(d.get("gpus_per_actor") or 0.0))
        elif "cpus_per_task" in d:
            if d.get("concurrency") is None:
                continue
            found = (int(d["concurrency"]) * float(d["cpus_per_task"]), 0.0)
        elif "steps" in d and "batch_size" in d:
            workers = int(d.get("num_workers", 1))
            found = (
                workers * float(d.get("cpus_per_worker", 1.0)),
                float(workers) if d.get("use_gpu") else 0.0,
            )
        if found is not None and (best is None or found > best):
            best = found
    return best


def throughput(run: StageRun) -> tuple[float, str] | None:
    """(rate, unit) of a finished stage from its result: rows/s, images/s or samples/s."""
    r, wall = run.result, run.wall_s
    if not wall:
        return None
    if isinstance(r.get("rows_in"), int | float) and "status_counts" in r:
        return r["rows_in"] / wall, "rows/s"
    if isinstance(r.get("images"), int | float) and "texts_considered" in r:
        return r["images"] / wall, "images/s"
    if isinstance(r.get("samples"), int | float):
        return r["samples"] / wall, "samples/s"
    samples = [
        v["samples"] for v in r.values() if isinstance(v, Mapping) and isinstance(v.get("samples"), int)
    ]
    if samples:
        return sum(samples) / wall, "samples/s"
    return None
