"""Running a recipe: each stage in its own folder of the run, in order, skipping finished work.

Every stage gets a manifest, `_stages/<stage>.json` in the run folder: the stage's key (a hash of its config and of
its upstream stages' keys), its inputs, outputs, counts and wall time. A rerun skips a stage whose
key is unchanged and whose manifest says done; it resumes a stage that stopped midway (download
and CapFilt by shard, training from its latest checkpoint); a stage whose config or inputs changed
starts over, and so does everything downstream of it.

The run folder may be local or on object storage (``out: s3://bucket/runs/x``): every file of it
is read and written through ``capfilt.core.fs``. The run's log file is then written locally and
uploaded at every stage's end and when the run ends (``capfilt.core.logs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.core import fs
from capfilt.core.fs import Location
from capfilt.core.layout import RUN_FILE, STAGES_DIR
from capfilt.core.logs import log_context, sync_logs
from capfilt.core.shards import read_json, write_json_atomic
from capfilt.core.stage import Stage, StageContext, StageDir, json_of, readable
from capfilt.pipeline.recipe import Recipe
from capfilt.stages import registry

log = logging.getLogger(__name__)


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


RUN_TOKEN = "$RUN"


def _portable(value: Any, roots: tuple[str, ...]) -> Any:
    """``value`` with every path inside the run folder written relative to it (``$RUN/...``), so a
    stage's key does not depend on how the folder is spelled (``runs/demo`` from the project root
    or its absolute path) or where it has been moved: the same stage is then recognised as done."""
    if isinstance(value, dict):
        return {k: _portable(v, roots) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v, roots) for v in value]
    if isinstance(value, Path | fs.RemotePath):
        value = str(value)
    if isinstance(value, str):
        for root in roots:
            if value == root or value.startswith(root + "/"):
                return RUN_TOKEN + value[len(root) :]
    return value


@dataclass
class RunResult:
    out: Location
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> manifest
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was scaled to fit the Ray cluster


class Run:
    """A run folder and the manifests of its stages."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.out: Location = fs.location(recipe.out)
        # Longest first, so the absolute spelling wins over a relative one that it contains
        # (a URI has one spelling).
        spellings = {str(self.out), str(self.out.absolute()), str(self.out.resolve())}
        self.roots = tuple(sorted(spellings - {"."}, key=len, reverse=True))
        self.keys: dict[str, str] = {}
        self.result = RunResult(out=self.out)

    def dir(self, name: str) -> StageDir:
        """A stage's folder: a Location (see ``capfilt.core.stage.StageDir``)."""
        return self.out / name

    def manifest_path(self, name: str) -> Location:
        return self.out / STAGES_DIR / f"{name}.json"

    def manifest(self, name: str) -> dict[str, Any]:
        if name not in self.result.stages:
            path = self.manifest_path(name)
            if not path.exists():
                raise RuntimeError(f"stage {name} has not run in {self.out}; add it to the recipe's stages")
            self.result.stages[name] = read_json(path)
        return self.result.stages[name]

    def has(self, name: str) -> bool:
        return name in self.result.stages or self.manifest_path(name).exists()

    def human_train(self) -> tuple[StageDir, StageDir]:
        """(Karpathy train JSON, its image root) of the run's human-annotated pairs."""
        rec = self.recipe
        if rec.human is not None:
            return rec.human.karpathy_train, rec.human.train_root()
        world = self.dir("world")
        return world / "human" / "karpathy_train.json", world

    def execute(self, stage: Stage) -> dict[str, Any]:
        """Run `stage` unless its key is done; its key covers its config, the shared inputs it
        reads and its upstream stages' keys."""
        rec = self.recipe
        inputs = {r: json_of(getattr(rec, r)) for r in sorted(stage.reads)}
        return self.stage(
            stage.name,
            stage.key(rec),
            stage.upstream(rec),
            lambda d, resuming: stage.run(StageContext(self, d, resuming)),
            inputs=inputs,
        )

    def stage(
        self,
        name: str,
        config: Any,
        upstream: list[str],
        fn: Callable[[Location, bool], dict[str, Any]],
        inputs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run `fn(stage_dir, resuming)` unless a finished manifest with the same key exists.
        The key hashes the stage's config, the shared recipe inputs it reads and its upstream keys."""
        d = self.dir(name)
        path = self.manifest_path(name)
        up_keys = {u: self.keys.get(u) or self.manifest(u)["key"] for u in upstream}
        payload = {"stage": name, "config": _portable(config, self.roots), "upstream": up_keys}
        if inputs:
            payload["inputs"] = _portable(inputs, self.roots)
        key = _key(payload)
        self.keys[name] = key
        old = read_json(path) if path.exists() else None
        if old and old.get("key") == key and old.get("status") == "done":
            log.info("stage %s: unchanged since its last run; skipping", name)
            self.result.stages[name] = old
            self.result.skipped.append(name)
            return dict(old["result"])
        resuming = bool(old and old.get("key") == key)
        if old and not resuming:
            log.warning("stage %s: config or inputs changed since %s ran; starting it over", name, d)
            fs.rmtree(d)
        log.info("stage %s: %s in %s", name, "resuming" if resuming else "starting", d)
        t0 = time.time()
        write_json_atomic(path, {"stage": name, "key": key, "status": "running", "upstream": up_keys})
        result = fn(d, resuming)
        manifest = {
            "stage": name,
            "key": key,
            "status": "done",
            "config": config,
            "inputs": inputs or {},
            "upstream": up_keys,
            "result": result,
            "wall_s": round(time.time() - t0, 2),
        }
        write_json_atomic(path, json.loads(json.dumps(manifest, default=str)))
        self.result.stages[name] = manifest
        sync_logs()  # a run folder on object storage gets the log up to here
        return result


def fit_to_cluster(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """Start or join Ray when a stage needs it and scale the recipe's resource requests to the
    cluster (``capfilt.pipeline.resources.fit_resources``). On a local instance the scaled recipe runs; on a
    cluster we join, whose autoscaler may still add GPU nodes, the recipe runs as written and the
    same message is a warning."""
    import os

    from capfilt.pipeline.resources import describe, fit_resources, ray_stages

    if not ray_stages(recipe):
        return recipe, []
    import ray

    from capfilt.core.cluster import ensure_ray

    ensure_ray(recipe.ray_address)
    available = {k: float(v) for k, v in ray.cluster_resources().items()}
    fitted, changes = fit_resources(recipe, available)
    if not changes:
        return recipe, []
    if recipe.ray_address or os.environ.get("RAY_ADDRESS"):
        note = (
            describe(available, changes) + " (not applied: the autoscaler may add nodes; tasks wait for them)"
        )
        log.warning("%s", note)
        return recipe, [note]
    note = describe(available, changes)
    log.warning("%s", note)
    return fitted, [note]


def run_recipe(recipe: Recipe) -> RunResult:
    recipe, notes = fit_to_cluster(recipe)
    run = Run(recipe)
    run.out.mkdir(parents=True, exist_ok=True)
    run.result.notes = notes
    # What `capfilt status` needs to list stages that have not started yet.
    write_json_atomic(
        run.out / RUN_FILE,
        {"name": recipe.name, "stages": recipe.stages, "started": time.time(), "resources": notes},
    )
    for name in recipe.stages:
        with log_context(stage=name):
            run.execute(registry.get(name))
    return run.result


# ---------------------------------------------------------------------------------------------
# The summary a person reads at the end of `capfilt run`.
# ---------------------------------------------------------------------------------------------


def summary_blocks(result: RunResult) -> list[tuple[str, list[str]]]:
    """(title, lines) per stage that ran or was skipped, in run order, as each stage words it."""
    blocks: list[tuple[str, list[str]]] = [("resources", result.notes)] if result.notes else []
    for name, m in result.stages.items():
        r = m.get("result") or {}
        skipped = name in result.skipped
        title = f"{name}" + (
            " (unchanged, skipped)" if skipped else f" ({readable(round(m.get('wall_s', 0)))} s)"
        )
        blocks.append((title, registry.get(name).summary(r) if name in registry.names() else []))
    return blocks
