"""The cluster configs in docker/: the Ray cluster launcher file and the KubeRay RayJob parse, run the
image docker/README.md documents, name recipes that exist and validate, request GPUs where the
recipe needs them, and have room for everything the recipe asks (fit_resources changes nothing)."""

from __future__ import annotations

import json
import re
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.pipeline.recipe import Recipe, load_recipe
from capfilt.pipeline.resources import fit_resources

LAUNCHER = Path("docker/ray-cluster.yaml")
RAYJOB = Path("docker/rayjob.yaml")
IMAGE_DIR = "/opt/src"  # WORKDIR of docker/Dockerfile, where it copies pipelines/
RECIPE_REF = re.compile(r"(?:/opt/src/)?(pipelines/[\w.-]+\.ya?ml)")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cpus(quantity: str | int) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _recipes(path: Path) -> list[Path]:
    found = sorted({Path(m) for m in RECIPE_REF.findall(path.read_text())})
    assert found, f"{path} names no recipe"
    return found


def test_both_parse_and_run_one_pinned_image_documented_in_docker_readme():
    launcher, job = _load(LAUNCHER), _load(RAYJOB)
    image = launcher["docker"]["image"]
    assert {c["image"] for c in _containers(job)} == {image}
    version = installed_version("capfilt")
    repo, tag = image.rsplit(":", 1)
    assert tag == version and repo.endswith("/capfilt"), image  # a registry path, pinned
    readme = Path("docker/README.md").read_text()
    assert image in readme and f"-t capfilt:{version}" in readme
    dockerfile = Path("docker/Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile and "COPY pipelines ./pipelines" in dockerfile


@pytest.mark.parametrize("config", [LAUNCHER, RAYJOB], ids=lambda p: p.name)
def test_every_recipe_they_name_exists_and_validates(config: Path):
    for rel in _recipes(config):
        assert rel.is_file(), f"{config} names {rel}, which is not in pipelines/"
        rec = load_recipe(rel, check_paths=False)
        assert str(rec.out).startswith("/data/"), "the run folder must be on the volume every node mounts"
        result = CliRunner().invoke(app, ["validate", "--skip-paths", str(rel)])
        assert result.exit_code == 0 and "is valid" in result.output, result.output


def test_the_launcher_config_passes_rays_schema_and_has_cpu_and_gpu_node_types():
    import jsonschema
    import ray.autoscaler

    cfg = _load(LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [k for k, v in workers.items() if v["resources"].get("GPU", 0) > 0]
    cpu = [
        k for k, v in workers.items() if not v["resources"].get("GPU") and v["resources"].get("CPU", 0) > 0
    ]
    assert gpu and cpu, types
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= cfg["max_workers"]
    assert any("/data" in opt for opt in cfg["docker"]["run_options"])  # the shared volume


def test_the_rayjob_runs_a_capfilt_command_on_a_cluster_with_gpu_workers():
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["capfilt", "run"] and RECIPE_REF.fullmatch(argv[2])
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
    assert gpu_groups
    for g in gpu_groups:
        for c in g["template"]["spec"]["containers"]:
            res = c["resources"]
            assert _gpus(c) > 0 and res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    for c in _containers(job):
        assert any(m["mountPath"] == "/data" for m in c["volumeMounts"]), c["name"]


def _launcher_capacity(cfg: dict[str, Any]) -> tuple[dict[str, float], float]:
    """Every node at its max_workers (the head once), and the CPUs of the GPU node type."""
    total = {"CPU": 0.0, "GPU": 0.0}
    gpu_node_cpus = 0.0
    for name, t in cfg["available_node_types"].items():
        n = 1 if name == cfg["head_node_type"] else t.get("max_workers", 0)
        for k in total:
            total[k] += n * float(t["resources"].get(k, 0))
        if t["resources"].get("GPU"):
            gpu_node_cpus = max(gpu_node_cpus, float(t["resources"]["CPU"]))
    return total, gpu_node_cpus


def _rayjob_capacity(job: dict[str, Any]) -> tuple[dict[str, float], float]:
    """Every worker group at its maxReplicas, and the CPUs of a GPU pod."""
    total = {"CPU": 0.0, "GPU": 0.0}
    gpu_node_cpus = 0.0
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            cpus = _cpus(c["resources"]["limits"]["cpu"])
            total["CPU"] += g["maxReplicas"] * cpus
            total["GPU"] += g["maxReplicas"] * _gpus(c)
            if _gpus(c):
                gpu_node_cpus = max(gpu_node_cpus, cpus)
    return total, gpu_node_cpus


@pytest.mark.parametrize(
    "config, capacity",
    [(LAUNCHER, _launcher_capacity), (RAYJOB, _rayjob_capacity)],
    ids=["ray-cluster", "rayjob"],
)
def test_the_cluster_has_room_for_what_the_recipe_asks(config: Path, capacity):
    for rel in _recipes(config):
        rec: Recipe = load_recipe(rel, check_paths=False)
        available, gpu_node_cpus = capacity(_load(config))
        _, changes = fit_resources(rec, available)
        assert changes == [], f"{config} is too small for {rel}: {changes}"
        # GPU training workers and CapFilt actors run on GPU nodes: their CPUs must fit one there.
        if rec.pretrain.use_gpu:
            assert rec.pretrain.cpus_per_worker * rec.pretrain.num_workers <= gpu_node_cpus
        cf = rec.capfilt
        assert (cf.captioner_actors + cf.filter_actors) * cf.cpus_per_actor <= gpu_node_cpus
