"""Fitting what a recipe asks of Ray to the cluster it runs on.

Each stage declares what it needs in its own section of the recipe and scales it in its `fit`
(download: ``cpus_per_task``; the training stages: ``num_workers``, ``use_gpu``,
``cpus_per_worker``; capfilt: actor pools, GPUs and CPUs per actor, ``preprocess_cpus``, dtype;
evaluate: ``device``).

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
from capfilt.stages import registry

# CPUs a training run leaves to Ray Data's read tasks on a small cluster.
_TRAIN_READ_CPUS = 1.0


def _largest_divisor(n: int, limit: float) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1). Worker counts shrink to
    divisors so a global batch that divided the ITC queue still does."""
    return max([d for d in range(1, n + 1) if n % d == 0 and d <= limit] or [1])


def fit_train(section: Any, label: str, cpus: float, gpus: float) -> tuple[dict[str, Any], list[str]]:
    """A training section's workers scaled to a cluster: (fields to change, a message each)."""
    update: dict[str, Any] = {}
    msgs: list[str] = []
    workers = int(section.num_workers)
    if section.use_gpu:
        if gpus <= 0:
            update["use_gpu"] = False
            msgs.append(f"{label} use_gpu -> CPU")
        elif workers > gpus:
            new = _largest_divisor(workers, gpus)
            update["num_workers"] = new
            msgs.append(f"{label} num_workers {workers} -> {new} ({gpus:g} GPUs)")
            workers = new
    cpw = float(section.cpus_per_worker)
    budget = max(cpus - _TRAIN_READ_CPUS, min(cpus, 1.0))
    if workers * cpw > budget:
        new = _largest_divisor(workers, budget / cpw)
        if new != workers:
            msgs.append(f"{label} num_workers {workers} -> {new} ({cpus:g} CPUs)")
            update["num_workers"] = workers = new
        if workers * cpw > budget:
            fitted = budget / workers
            msgs.append(f"{label} cpus_per_worker {cpw:g} -> {fitted:g}")
            update["cpus_per_worker"] = fitted
    return update, msgs


def ray_stages(recipe: Recipe) -> list[str]:
    """The stages of a recipe that run on Ray (a stage given published checkpoints trains nothing)."""
    return [s for s in recipe.stages if registry.get(s).uses_ray(recipe)]


def fit_resources(recipe: Recipe, available: Mapping[str, float]) -> tuple[Recipe, list[str]]:
    """``recipe`` with its resource requests scaled to ``available`` (``ray.cluster_resources()``:
    "CPU", "GPU"), and one message per change, e.g. ``"pretrain use_gpu -> CPU"``. Pure: the
    recipe given is not changed, and a recipe that fits comes back equal with no messages.
    Only sections the recipe's stages use are touched, so no unused section changes a stage key."""
    cpus = float(available.get("CPU", 0.0)) or 1.0
    gpus = float(available.get("GPU", 0.0))
    msgs: list[str] = []
    for name in recipe.stages:
        fit = registry.get(name).fit(recipe, cpus, gpus)
        if fit.update:
            recipe = recipe.model_copy(update=fit.update)
        msgs += fit.messages
    return recipe, msgs


def describe(available: Mapping[str, float], changes: list[str]) -> str:
    """One line naming the cluster and every change, for the log and the run summary."""
    cpus = float(available.get("CPU", 0.0))
    gpus = float(available.get("GPU", 0.0))
    where = (
        f"no GPU on this Ray cluster ({cpus:g} CPUs)"
        if gpus <= 0
        else f"this Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    )
    return f"{where}: " + "; ".join(changes)
