"""Running a recipe: each stage in its own folder of the run, in order, skipping finished work.

Every stage gets a manifest, `_stages/<stage>.json` in the run folder: the stage's key (a hash of its config and of
its upstream stages' keys), its inputs, outputs, counts and wall time. A rerun skips a stage whose
key is unchanged and whose manifest says done; it resumes a stage that stopped midway (download
and CapFilt by shard, training from its latest checkpoint); a stage whose config or inputs changed
starts over, and so does everything downstream of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.core.logs import log_context
from capfilt.core.shards import read_json, write_json_atomic
from capfilt.pipeline.recipe import CAPTIONER_DEFAULTS, FILTER_DEFAULTS, Recipe, merge, train_config

log = logging.getLogger(__name__)

STAGES_DIR = "_stages"


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
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        for root in roots:
            if value == root or value.startswith(root + "/"):
                return RUN_TOKEN + value[len(root) :]
    return value


@dataclass
class RunResult:
    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> manifest
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was scaled to fit the Ray cluster


class Run:
    """A run folder and the manifests of its stages."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.out = Path(recipe.out)
        # Longest first, so the absolute spelling wins over a relative one that it contains.
        spellings = {str(self.out), str(self.out.absolute()), str(self.out.resolve())}
        self.roots = tuple(sorted(spellings - {"."}, key=len, reverse=True))
        self.keys: dict[str, str] = {}
        self.result = RunResult(out=self.out)

    def dir(self, name: str) -> Path:
        return self.out / name

    def manifest_path(self, name: str) -> Path:
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

    def stage(
        self,
        name: str,
        config: Any,
        upstream: list[str],
        fn: Callable[[Path, bool], dict[str, Any]],
    ) -> dict[str, Any]:
        """Run `fn(stage_dir, resuming)` unless a finished manifest with the same key exists."""
        d = self.dir(name)
        path = self.manifest_path(name)
        up_keys = {u: self.keys.get(u) or self.manifest(u)["key"] for u in upstream}
        key = _key({"stage": name, "config": _portable(config, self.roots), "upstream": up_keys})
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
            shutil.rmtree(d, ignore_errors=True)
        log.info("stage %s: %s in %s", name, "resuming" if resuming else "starting", d)
        t0 = time.time()
        write_json_atomic(path, {"stage": name, "key": key, "status": "running", "upstream": up_keys})
        result = fn(d, resuming)
        manifest = {
            "stage": name,
            "key": key,
            "status": "done",
            "config": config,
            "upstream": up_keys,
            "result": result,
            "wall_s": round(time.time() - t0, 2),
        }
        write_json_atomic(path, json.loads(json.dumps(manifest, default=str)))
        self.result.stages[name] = manifest
        return result


# ---------------------------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------------------------


def _world_stage(run: Run) -> dict[str, Any]:
    from capfilt.world import make_world

    cfg = run.recipe.world
    assert cfg is not None

    def go(d: Path, resuming: bool) -> dict[str, Any]:
        info = make_world(d, cfg)
        return {"root": str(d), "counts": info.counts}

    return run.stage("world", json.loads(cfg.model_dump_json()), [], go)


@contextlib.contextmanager
def _served_world(world_dir: Path) -> Iterator[Path]:
    """Serve the world on loopback and yield its URL list. The port of the last run is tried
    first, so a rerun sees the same URLs (and uids) and resumes instead of starting over."""
    from capfilt.world import WorldServer, write_url_list

    state = world_dir / "server.json"
    port = int(read_json(state)["port"]) if state.exists() else 0
    try:
        server = WorldServer(world_dir, port=port)
    except OSError:
        log.info("port %d is taken; serving the world on a new port", port)
        server = WorldServer(world_dir, port=0)
    with server:
        write_json_atomic(state, {"port": server.port})
        yield write_url_list(world_dir, server.base_url, world_dir / "urls.parquet")


def _download_stage(run: Run) -> dict[str, Any]:
    from capfilt.stages.download import run_download

    rec = run.recipe
    cfg = rec.download

    def go(d: Path, resuming: bool) -> dict[str, Any]:
        if "world" not in rec.stages:
            assert rec.urls is not None
            summary = run_download(
                rec.urls.path,
                d,
                cfg.model_copy(update={"source": rec.urls.source}),
                url_col=rec.urls.url_col,
                caption_col=rec.urls.caption_col,
                input_format=rec.urls.input_format,
                ray_address=rec.ray_address,
            )
        else:
            with _served_world(run.dir("world")) as url_list:
                summary = run_download(url_list, d, cfg, ray_address=rec.ray_address)
        return summary.to_json()

    upstream = ["world"] if rec.world is not None else []
    config = {
        "download": json.loads(cfg.model_dump_json()),
        "urls": rec.urls.model_dump(mode="json") if rec.urls else None,
    }
    return run.stage("download", config, upstream, go)


def _human(run: Run) -> tuple[Path, Path]:
    """(Karpathy train JSON, image root) of the run's human-annotated pairs."""
    rec = run.recipe
    if rec.human is not None:
        root = rec.human.image_root or rec.human.karpathy_train.parent
        return rec.human.karpathy_train, root
    world = run.dir("world")
    return world / "human" / "karpathy_train.json", world


def _train(
    run: Run, name: str, section: dict[str, Any], data: list[Any], upstream: list[str], **fixed: Any
) -> dict[str, Any]:
    from capfilt.train.loop import CONFIG_FILE, run_training

    def go(d: Path, resuming: bool) -> dict[str, Any]:
        cfg = train_config(section, data=data, out_dir=str(d), run_name=name, **fixed)
        summary = run_training(cfg, ray_address=run.recipe.ray_address, resume=(d / CONFIG_FILE).exists())
        return summary.to_json()

    config = {"train": section, "data": data, "fixed": fixed}
    return run.stage(name, config, upstream, go)


def _pretrain_data(run: Run) -> list[dict[str, Any]]:
    karpathy, root = _human(run)
    return [{"path": str(run.dir("download"))}, {"path": str(karpathy), "image_root": str(root)}]


def _vit_stage(run: Run) -> dict[str, Any]:
    """The stand-in for BLIP's ImageNet ViT: a classifier of the shapes world's objects, with the
    pretraining's architecture (capfilt.stages.vit)."""
    from capfilt.model.config import get_config
    from capfilt.stages.vit import train_vit_classifier

    rec = run.recipe
    model = str(rec.pretrain.get("model", "med-tiny"))
    config = {"vit": rec.vit.model_dump(), "model": model}
    return run.stage("vit", config, [], lambda d, r: train_vit_classifier(rec.vit, get_config(model), d))


def _vision_init(run: Run) -> tuple[dict[str, Any], list[str]]:
    """(TrainConfig fields, upstream stages) that start a pretraining round from the 'vit' stage's ViT."""
    if "vit" not in run.recipe.stages:
        return {}, []
    return {"vision_init": run.manifest("vit")["result"]["file"]}, ["vit"]


def _pretrain_stage(run: Run) -> dict[str, Any]:
    rec = run.recipe
    if rec.init.pretrained:
        # Published checkpoint as round 1: nothing to train, the stage records where it is.
        return run.stage(
            "pretrain",
            {"init": rec.init.pretrained},
            [],
            lambda d, r: {
                "model_dir": rec.init.pretrained,
                "tokenizer_dir": rec.init.tokenizer or rec.init.pretrained,
            },
        )
    vision, vision_up = _vision_init(run)
    fixed = ({"tokenizer": rec.init.tokenizer} if rec.init.tokenizer else {}) | vision
    return _train(run, "pretrain", rec.pretrain, _pretrain_data(run), ["download", *vision_up], **fixed)


def _finetune_stage(run: Run) -> dict[str, Any]:
    """The captioner and the filter: two separate copies of the round-1 model (decoupled, as BLIP
    found sharing them lets the filter confirm the captioner's mistakes)."""
    rec = run.recipe
    base = run.manifest("pretrain")["result"]
    karpathy, root = _human(run)
    data = [{"path": str(karpathy), "image_root": str(root)}]
    fixed = {"init": base["model_dir"], "tokenizer": base["tokenizer_dir"]}

    def go(d: Path, resuming: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, section, defaults, given in (
            ("captioner", rec.finetune_captioner, CAPTIONER_DEFAULTS, rec.init.captioner),
            ("filter", rec.finetune_filter, FILTER_DEFAULTS, rec.init.filter),
        ):
            if given:
                out[role] = {"model_dir": given, "tokenizer_dir": rec.init.tokenizer or base["tokenizer_dir"]}
                continue
            from capfilt.train.loop import CONFIG_FILE, run_training

            cfg = train_config(
                merge(defaults, section), data=data, out_dir=str(d / role), run_name=role, **fixed
            )
            summary = run_training(cfg, ray_address=rec.ray_address, resume=(d / role / CONFIG_FILE).exists())
            out[role] = summary.to_json()
        return out

    config = {
        "captioner": merge(CAPTIONER_DEFAULTS, rec.finetune_captioner),
        "filter": merge(FILTER_DEFAULTS, rec.finetune_filter),
        "given": rec.init.model_dump(),
        "data": data,
    }
    return run.stage("finetune", config, ["pretrain"], go)


def _capfilt_stage(run: Run) -> dict[str, Any]:
    from capfilt.stages.capfilt.driver import run_capfilt

    rec = run.recipe
    tuned = run.manifest("finetune")["result"]
    karpathy, root = _human(run)

    def go(d: Path, resuming: bool) -> dict[str, Any]:
        summary = run_capfilt(
            run.dir("download"),
            d,
            captioner=tuned["captioner"]["model_dir"],
            filter=tuned["filter"]["model_dir"],
            cfg=rec.capfilt,
            ray_address=rec.ray_address,
            tokenizer=tuned["captioner"]["tokenizer_dir"],
            arch=rec.init.arch,
            human=karpathy,
            human_images=root,
        )
        return summary.to_json()

    config = {"capfilt": json.loads(rec.capfilt.model_dump_json()), "human": [str(karpathy), str(root)]}
    return run.stage("capfilt", config, ["download", "finetune"], go)


def _pretrain2_stage(run: Run) -> dict[str, Any]:
    """Round 2: a new model (not the round-1 model continued) with the same steps and batch size,
    on the bootstrapped data, so any gain comes from the data."""
    rec = run.recipe
    r1 = run.manifest("pretrain")["result"]
    vision, vision_up = _vision_init(run)  # the same starting ViT as round 1
    fixed = {"tokenizer": r1["tokenizer_dir"]} | vision
    return _train(
        run,
        "pretrain2",
        rec.pretrain,
        [{"path": str(run.dir("capfilt") / "cleaned")}],  # CLEANED shards (web, synthetic and human)
        ["capfilt", "pretrain", *vision_up],
        **fixed,
    )


def _evaluate_stage(run: Run) -> dict[str, Any]:
    rec = run.recipe

    def go(d: Path, resuming: bool) -> dict[str, Any]:
        d.mkdir(parents=True, exist_ok=True)
        return evaluate_run(run, d)

    upstream = [s for s in ("pretrain", "pretrain2", "capfilt") if s in rec.stages or run.has(s)]
    return run.stage("evaluate", json.loads(rec.evaluate.model_dump_json()), upstream, go)


def evaluate_run(run: Run, d: Path) -> dict[str, Any]:
    """Both rounds zero-shot on the test split, CapFilt's quality against the world, the report."""
    from capfilt.eval.metrics import (
        evaluate_capfilt,
        evaluate_model,
        load_split,
        load_world_test_split,
        write_results,
    )
    from capfilt.eval.report import write_report
    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.model.tokenizer import load_tokenizer
    from capfilt.stages.capfilt.rethreshold import read_candidates
    from capfilt.stages.download import read_samples
    from capfilt.world import load_world

    rec = run.recipe
    world = load_world(run.dir("world")) if rec.world is not None else None
    if world is not None:
        split = load_world_test_split(run.dir("world"))
    elif rec.human is not None and rec.human.karpathy_test is not None:
        split = load_split(rec.human.karpathy_test, rec.human.image_root)
    else:
        raise RuntimeError("evaluate needs a test split: the shapes world or human.karpathy_test")
    rounds: dict[str, Any] = {}
    for label, stage in (("round1", "pretrain"), ("round2", "pretrain2")):
        if not run.has(stage):
            continue
        res = run.manifest(stage)["result"]
        med = load_checkpoint(res["model_dir"], rec.init.arch)
        tok = load_tokenizer(res["tokenizer_dir"])
        log.info("evaluate: %s (%s)", label, res["model_dir"])
        rounds[label] = evaluate_model(med, tok, split, rec.evaluate, world=world)
    quality: dict[str, Any] = {}
    candidates = None
    samples = None
    if run.has("capfilt"):
        candidates = read_candidates(run.dir("capfilt"))
        samples = read_samples(run.dir("download"), columns=["uid", "row", "status", "image"])
        if world is not None:
            quality = evaluate_capfilt(candidates, samples, world, threshold=rec.capfilt.threshold)
    results = {"rounds": rounds, "capfilt": quality}
    write_results(d / "results.json", results)
    stages = {
        name: m["result"] if isinstance(m.get("result"), dict) else {}
        for name, m in ((s, run.manifest(s)) for s in ("download", "vit", "capfilt") if run.has(s))
    }
    report = write_report(
        run.out,
        d.resolve() / "report.html",  # absolute: write_report places a relative path inside run.out
        title=f"capfilt run {rec.name}",
        stages={k: _brief(v) for k, v in stages.items()},
        rounds=rounds,
        capfilt=quality,
        candidates=_labelled(candidates, samples, world),
        images=samples,
        threshold=rec.capfilt.threshold,
    )
    return {**results, "report": str(report)}


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """A stage summary without its bulky parts, for the report's stats table."""
    return {k: v for k, v in summary.items() if k not in ("history", "reason_counts", "extra")}


def _labelled(candidates: Any, samples: Any, world: Any) -> Any:
    if candidates is None or samples is None or world is None:
        return candidates
    from capfilt.eval.metrics import label_candidates

    return label_candidates(candidates, samples, world)


RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "world": _world_stage,
    "download": _download_stage,
    "vit": _vit_stage,
    "pretrain": _pretrain_stage,
    "finetune": _finetune_stage,
    "capfilt": _capfilt_stage,
    "pretrain2": _pretrain2_stage,
    "evaluate": _evaluate_stage,
}


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


RUN_FILE = "_run.json"


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
            RUNNERS[name](run)
    return run.result


# ---------------------------------------------------------------------------------------------
# The summary a person reads at the end of `capfilt run`.
# ---------------------------------------------------------------------------------------------


def _losses(d: dict[str, Any] | None) -> str:
    return (
        ", ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in sorted((d or {}).items()) if k != "loss")
        or "-"
    )


def _train_lines(r: dict[str, Any]) -> list[str]:
    if "steps" not in r:
        return [f"model: {r.get('model_dir')} (given)"]
    return [
        f"steps {r['steps']}, {r['samples_per_s']:.1f} samples/s, {r['wall_s']:.0f} s",
        f"losses first: {_losses(r.get('first_losses'))}",
        f"losses final: {_losses(r.get('final_losses'))}",
        f"model: {r['model_dir']}",
    ]


def summary_blocks(result: RunResult) -> list[tuple[str, list[str]]]:
    """(title, lines) per stage that ran or was skipped, in run order."""
    from capfilt.eval.report import round_rows, summary_table
    from capfilt.stages.capfilt.summary import by_source, num

    blocks: list[tuple[str, list[str]]] = [("resources", result.notes)] if result.notes else []
    for name, m in result.stages.items():
        r = m.get("result") or {}
        title = f"{name}" + (
            " (unchanged, skipped)" if name in result.skipped else f" ({m.get('wall_s', 0):.0f} s)"
        )
        lines: list[str]
        if name == "world":
            lines = [f"{k}: {v}" for k, v in (r.get("counts") or {}).items()]
        elif name == "download":
            failed = {k: v for k, v in r.get("status_counts", {}).items() if k != "success"}
            lines = [
                f"rows in {r.get('rows_in')}, downloaded {r.get('downloaded')}, not downloaded {sum(failed.values())}",
                "by status: " + (", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "-"),
                f"shards {r.get('shards_total')} ({r.get('shards_written')} written, {r.get('shards_skipped')} done before)",
            ]
        elif name == "vit":
            lines = [
                f"steps {r.get('steps')}, loss {r.get('first_loss')} -> {r.get('final_loss')}, "
                f"held-out shape accuracy {r.get('held_out_accuracy')} (chance 0.333)",
                f"ViT for both pretraining rounds: {r.get('file')}",
            ]
        elif name in ("pretrain", "pretrain2"):
            lines = _train_lines(r)
        elif name == "finetune":
            lines = [
                f"{role}: {line}"
                for role in ("captioner", "filter")
                for line in _train_lines(r.get(role, {}))[:3]
            ]
        elif name == "capfilt":
            lines = [
                f"images {r.get('images')}, texts considered {r.get('texts_considered')}",
                f"kept {r.get('kept')}, images with no kept text {r.get('images_no_kept_text')}",
                f"mean ITM {by_source(r.get('mean_itm') or {}, num)}",
            ]
        elif name == "evaluate":
            rounds = r.get("rounds") or {}
            lines = summary_table(round_rows(rounds)).splitlines() if rounds else []
            q = r.get("capfilt") or {}
            if q:
                lines.append(f"noise before CapFilt {q.get('noise_before')}, after {q.get('noise_after')}")
            lines.append(f"report: {r.get('report')}")
        else:
            lines = [json.dumps(r)[:200]]
        blocks.append((title, lines))
    return blocks
