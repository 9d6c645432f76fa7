"""Fitting what a recipe asks of Ray to the cluster it runs on.

Each stage declares what it needs in its own section of the recipe:

| stage | fields |
|---|---|
| download | ``download.cpus_per_task`` (one Ray task per shard), ``download.concurrency`` |
| pretrain, pretrain2 | ``pretrain.num_workers``, ``use_gpu`` (one GPU per worker), ``cpus_per_worker`` |
| finetune | the same fields in ``finetune_captioner`` and ``finetune_filter`` |
| capfilt | ``captioner_actors``, ``filter_actors``, ``gpus_per_actor``, ``cpus_per_actor``, ``preprocess_cpus`` |
| evaluate | ``evaluate.device`` |

A recipe written for a GPU cluster would wait forever on a laptop: Ray keeps a task that asks for
a GPU pending until one appears. ``fit_resources`` scales such requests down to what a cluster
has (GPU -> CPU, worker and actor counts to what fits) and says what it changed. The pipeline
applies it on a local Ray instance; on a cluster it joins, the autoscaler may still add the nodes,
so there it only warns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from capfilt.pipeline.recipe import Recipe

# CPUs a training run leaves to Ray Data's read tasks on a small cluster.
_TRAIN_READ_CPUS = 1.0
_HALF = ("bfloat16", "float16")


def _num(x: float) -> str:
    return f"{x:g}"


def _largest_divisor(n: int, limit: float) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1). Worker counts shrink to
    divisors so a global batch that divided the ITC queue still does."""
    return max([d for d in range(1, n + 1) if n % d == 0 and d <= limit] or [1])


def _shrink_actors(a: int, b: int, per: float, fixed: float, budget: float) -> tuple[int, int, float]:
    """Actor counts (a, b) and the amount each asks for (``per``) so that (a + b) * per + fixed fits
    ``budget``: the larger pool loses an actor first; with one actor each, ``per`` shrinks."""
    while (a + b) * per + fixed > budget and max(a, b) > 1:
        if a >= b:
            a -= 1
        else:
            b -= 1
    if (a + b) * per + fixed > budget:
        per = max((budget - fixed) / (a + b), 0.0)
    return a, b, per


def train_sections(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe field, label) of every training section a stage of this recipe trains with."""
    stages = set(recipe.stages)
    init = recipe.init
    out = []
    if "pretrain2" in stages or ("pretrain" in stages and not init.pretrained):
        out.append(("pretrain", "pretrain"))
    if "finetune" in stages:
        if not init.captioner:
            out.append(("finetune_captioner", "finetune captioner"))
        if not init.filter:
            out.append(("finetune_filter", "finetune filter"))
    return out


def ray_stages(recipe: Recipe) -> list[str]:
    """The stages of a recipe that run on Ray (a stage given published checkpoints trains nothing)."""
    init = recipe.init
    out = []
    for s in recipe.stages:
        given = (s == "pretrain" and init.pretrained) or (s == "finetune" and init.captioner and init.filter)
        if s in ("download", "pretrain", "finetune", "capfilt", "pretrain2") and not given:
            out.append(s)
    return out


def _fit_train(
    section: dict[str, Any], label: str, cpus: float, gpus: float
) -> tuple[dict[str, Any], list[str]]:
    out = dict(section)
    msgs: list[str] = []
    workers = int(out.get("num_workers", 1))
    if out.get("use_gpu"):
        if gpus <= 0:
            out["use_gpu"] = False
            msgs.append(f"{label} use_gpu -> CPU")
        elif workers > gpus:
            new = _largest_divisor(workers, gpus)
            out["num_workers"] = workers = new
            msgs.append(f"{label} num_workers {section.get('num_workers')} -> {new} ({_num(gpus)} GPUs)")
    cpw = float(out.get("cpus_per_worker", 1.0))
    budget = max(cpus - _TRAIN_READ_CPUS, min(cpus, 1.0))
    if workers * cpw > budget:
        new = _largest_divisor(workers, budget / cpw)
        if new != workers:
            msgs.append(f"{label} num_workers {workers} -> {new} ({_num(cpus)} CPUs)")
            out["num_workers"] = workers = new
        if workers * cpw > budget:
            fitted = budget / workers
            msgs.append(f"{label} cpus_per_worker {_num(cpw)} -> {_num(fitted)}")
            out["cpus_per_worker"] = fitted
    return out, msgs


def fit_resources(recipe: Recipe, available: Mapping[str, float]) -> tuple[Recipe, list[str]]:
    """``recipe`` with its resource requests scaled to ``available`` (``ray.cluster_resources()``:
    "CPU", "GPU"), and one message per change, e.g. ``"pretrain use_gpu -> CPU"``. Pure: the
    recipe given is not changed, and a recipe that fits comes back equal with no messages.
    Only sections the recipe's stages use are touched, so no unused section changes a stage key."""
    cpus = float(available.get("CPU", 0.0)) or 1.0
    gpus = float(available.get("GPU", 0.0))
    stages = set(recipe.stages)
    update: dict[str, Any] = {}
    msgs: list[str] = []

    for field, label in train_sections(recipe):
        section, changed = _fit_train(getattr(recipe, field), label, cpus, gpus)
        if changed:
            update[field] = section
            msgs += changed

    if "capfilt" in stages:
        cf = recipe.capfilt
        cf_update: dict[str, Any] = {}
        gpa = cf.gpus_per_actor
        if gpa and gpus <= 0:
            cf_update["gpus_per_actor"] = 0.0
            msgs.append(f"capfilt gpus_per_actor {_num(gpa)} -> 0 (CPU actors)")
        elif gpa and (cf.captioner_actors + cf.filter_actors) * gpa > gpus:
            a, b, per = _shrink_actors(cf.captioner_actors, cf.filter_actors, gpa, 0.0, gpus)
            cf_update |= {"captioner_actors": a, "filter_actors": b, "gpus_per_actor": per}
            msgs.append(
                f"capfilt actors {cf.captioner_actors}+{cf.filter_actors} x {_num(gpa)} GPU -> "
                f"{a}+{b} x {_num(per)} GPU ({_num(gpus)} GPUs)"
            )
        if gpus <= 0 and cf.dtype in _HALF:
            cf_update["dtype"] = "float32"
            msgs.append(f"capfilt dtype {cf.dtype} -> float32 (half precision is for GPUs)")
        a0 = int(cf_update.get("captioner_actors", cf.captioner_actors))
        b0 = int(cf_update.get("filter_actors", cf.filter_actors))
        pre = min(cf.preprocess_cpus, cpus)
        if pre != cf.preprocess_cpus:
            cf_update["preprocess_cpus"] = pre
            msgs.append(f"capfilt preprocess_cpus {_num(cf.preprocess_cpus)} -> {_num(pre)}")
        if (a0 + b0) * cf.cpus_per_actor + pre > cpus:
            a, b, per = _shrink_actors(a0, b0, cf.cpus_per_actor, pre, cpus)
            if per <= 0:  # not even a sliver left beside the read tasks: share the CPUs
                per = cpus / (a + b + 1)
            cf_update |= {"captioner_actors": a, "filter_actors": b, "cpus_per_actor": per}
            msgs.append(
                f"capfilt actors {a0}+{b0} x {_num(cf.cpus_per_actor)} CPU -> {a}+{b} x {_num(per)} CPU "
                f"({_num(cpus)} CPUs)"
            )
        if cf_update:
            update["capfilt"] = cf.model_copy(update=cf_update)

    if "download" in stages and recipe.download.cpus_per_task > cpus:
        update["download"] = recipe.download.model_copy(update={"cpus_per_task": cpus})
        msgs.append(f"download cpus_per_task {_num(recipe.download.cpus_per_task)} -> {_num(cpus)}")

    device = recipe.evaluate.device
    if "evaluate" in stages and gpus <= 0 and device and device.startswith("cuda"):
        update["evaluate"] = recipe.evaluate.model_copy(update={"device": "cpu"})
        msgs.append(f"evaluate device {device} -> cpu")

    return (recipe.model_copy(update=update) if update else recipe), msgs


def describe(available: Mapping[str, float], changes: list[str]) -> str:
    """One line naming the cluster and every change, for the log and the run summary."""
    cpus = float(available.get("CPU", 0.0))
    gpus = float(available.get("GPU", 0.0))
    where = (
        f"no GPU on this Ray cluster ({_num(cpus)} CPUs)"
        if gpus <= 0
        else f"this Ray cluster has {_num(cpus)} CPUs and {_num(gpus)} GPUs"
    )
    return f"{where}: " + "; ".join(changes)
