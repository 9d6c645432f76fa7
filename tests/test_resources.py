"""Fitting a recipe's resource requests to the Ray cluster: the pure function on the shipped cluster
recipe, and the runner applying it (a download asking for more CPUs than local Ray has)."""

from __future__ import annotations

import json

import yaml

from capfilt.model import get_config
from capfilt.pipeline.recipe import Recipe, load_recipe, recipe_model
from capfilt.pipeline.resources import describe, fit_resources, ray_stages
from capfilt.testing.cli import invoke_with_records
from capfilt.train.section import CaptionerSection

CC3M = "pipelines/cc3m.yaml"
LAPTOP = {"CPU": 4.0, "memory": 8e9}
GPU_NODE = {"CPU": 96.0, "GPU": 8.0}


def _cc3m(**changes) -> Recipe:
    rec = load_recipe(CC3M, check_paths=False)
    return rec.model_copy(update=changes) if changes else rec


def _revalidate(rec: Recipe) -> Recipe:
    return recipe_model().model_validate(rec.model_dump(), context={"check_paths": False})


def test_a_gpu_recipe_on_a_machine_without_gpus_runs_on_cpu_and_says_what_changed():
    rec = _cc3m()
    fitted, msgs = fit_resources(rec, LAPTOP)
    assert "pretrain use_gpu -> CPU" in msgs
    assert "capfilt gpus_per_actor 1 -> 0 (CPU actors)" in msgs
    assert "capfilt dtype bfloat16 -> float32 (half precision is for GPUs)" in msgs
    assert fitted.pretrain.use_gpu is False
    # 8 workers x 8 CPUs -> 1 worker with what leaves one CPU to the read tasks.
    assert fitted.pretrain.num_workers == 1 and fitted.pretrain.cpus_per_worker == 3
    cf = fitted.capfilt
    assert cf.gpus_per_actor == 0 and cf.dtype == "float32"
    assert (cf.captioner_actors + cf.filter_actors) * cf.cpus_per_actor + cf.preprocess_cpus <= 4
    assert cf.captioner_actors >= 1 and cf.filter_actors >= 1
    # Pure: the recipe given is unchanged, and the result is still a valid recipe.
    assert rec.pretrain.use_gpu is True and rec.capfilt.gpus_per_actor == 1
    assert _revalidate(fitted).pretrain == fitted.pretrain
    line = describe(LAPTOP, msgs)
    assert line.startswith("no GPU on this Ray cluster (4 CPUs): ") and "pretrain use_gpu -> CPU" in line


def test_a_cluster_that_has_what_the_recipe_asks_changes_nothing():
    rec = _cc3m()
    fitted, msgs = fit_resources(rec, GPU_NODE)
    assert msgs == [] and fitted == rec


def test_fewer_gpus_shrink_workers_and_actors_keeping_the_itc_queue_divisible():
    rec = _cc3m()
    fitted, msgs = fit_resources(rec, {"CPU": 96.0, "GPU": 3.0})
    assert fitted.pretrain.use_gpu is True
    # 8 workers -> 2 (the largest divisor of 8 that fits 3 GPUs): the global batch still divides the queue.
    assert fitted.pretrain.num_workers == 2
    cfg = fitted.pretrain.for_run(["x"], "x")
    queue = get_config(cfg.model).queue_size
    assert queue % (cfg.batch_size * cfg.num_workers) == 0
    cf = fitted.capfilt
    assert (cf.captioner_actors + cf.filter_actors) * (cf.gpus_per_actor or 0) <= 3
    assert any(m.startswith("capfilt actors 4+4 x 1 GPU -> ") for m in msgs), msgs


def test_only_sections_the_stages_use_are_touched():
    # Published captioner and filter: the fine-tune sections train nothing, so they stay as written
    # (they are part of the finetune stage's key).
    section = {"use_gpu": True, "num_workers": 8, "steps": 10, "warmup_steps": 1}
    rec = _cc3m(finetune_captioner=CaptionerSection.model_validate(section))
    fitted, msgs = fit_resources(rec, LAPTOP)
    assert fitted.finetune_captioner == rec.finetune_captioner
    assert not any(m.startswith("finetune") for m in msgs)
    # Without the published captioner it is trained, so it is fitted.
    rec2 = rec.model_copy(update={"init": rec.init.model_copy(update={"captioner": None})})
    fitted2, msgs2 = fit_resources(rec2, LAPTOP)
    assert fitted2.finetune_captioner.use_gpu is False and "finetune captioner use_gpu -> CPU" in msgs2
    # 8 workers x 1 CPU on 4 CPUs, one left to the read tasks: 2 workers (a divisor of 8).
    assert "finetune captioner num_workers 8 -> 2 (4 CPUs)" in msgs2
    assert fitted2.finetune_captioner.for_run(["x"], "x").num_workers == 2
    # A recipe whose stages need no Ray starts none.
    only_world = _cc3m(stages=["evaluate"])
    assert ray_stages(only_world) == []


def test_evaluate_device_and_download_cpus_are_fitted():
    rec = _cc3m()
    rec = rec.model_copy(
        update={
            "evaluate": rec.evaluate.model_copy(update={"device": "cuda"}),
            "download": rec.download.model_copy(update={"cpus_per_task": 16}),
        }
    )
    fitted, msgs = fit_resources(rec, LAPTOP)
    assert fitted.evaluate.device == "cpu" and "evaluate device cuda -> cpu" in msgs
    assert fitted.download.cpus_per_task == 4 and "download cpus_per_task 16 -> 4" in msgs


# ------------------------------------------------------------------ the runner applies the fit

MINI = {
    "name": "mini-fit",
    "stages": ["world", "download"],
    "world": {"seed": 4, "n_web": 80, "n_human": 10, "n_test": 10, "bad_rate": 0.1},
    # 64 CPUs per download task: on the 4-CPU local Ray this would wait forever without the fit.
    "download": {"image_size": 32, "shard_size": 40, "thread_count": 8, "timeout": 5, "cpus_per_task": 64},
}


def test_the_runner_scales_the_recipe_to_local_ray_and_logs_stage_names(ray_local, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**MINI, "out": str(tmp_path / "run")}))
    result, records = invoke_with_records(["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "resources" in result.output
    assert "no GPU on this Ray cluster (4 CPUs): download cpus_per_task 64 -> 4" in result.output
    manifest = json.loads((tmp_path / "run" / "_stages" / "download.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["download"]["cpus_per_task"] == 4
    run_info = json.loads((tmp_path / "run" / "_run.json").read_text())
    assert run_info["stages"] == ["world", "download"] and "cpus_per_task 64 -> 4" in run_info["resources"][0]
    # Every pipeline log line names its stage.
    starting = [r for r in records if r.name == "capfilt.pipeline.runner" and "starting in" in r.getMessage()]
    assert [(r.stage, r.where) for r in starting] == [("world", " [world]"), ("download", " [download]")]
    downloads = [r for r in records if r.name.startswith("capfilt.stages.download")]
    assert downloads and all(r.stage == "download" for r in downloads)


def test_training_workers_share_the_local_machines_cores_but_not_a_clusters(monkeypatch):
    # Ray gives a worker OMP_NUM_THREADS = its CPU reservation (1 by default); on the embedded local
    # instance the training workers share the machine's cores instead, so none sit idle.
    from capfilt.core import cluster

    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(cluster, "_started_local", True)
    assert cluster.local_threads_per_worker(1) == 8
    assert cluster.local_threads_per_worker(2) == 4
    assert cluster.local_threads_per_worker(16) == 1
    monkeypatch.setattr(cluster, "_started_local", False)  # joined a cluster: Ray's reservation rules
    assert cluster.local_threads_per_worker(1) is None
