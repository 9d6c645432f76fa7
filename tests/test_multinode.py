"""Two Ray nodes (``ray.cluster_utils.Cluster``: a head and a node with the custom resource
``node_b``, two raylets on this machine) and a run folder on S3 (moto on loopback): capfilt's own
code paths run on both nodes and find everything they need through the object store.

Each node gets its own cache folder (``CAPFILT_CACHE`` in that raylet's environment), so a copy in
a node's cache shows that code on that node fetched a remote file itself; node ids come from
inside the work (``ray.get_runtime_context().get_node_id()``). What this cannot show (one machine,
one disk, one network stack) is written in the README's cluster guide.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_data import write_sample_shards

from capfilt.core import fs


@dataclass
class TwoNodes:
    address: str
    bucket: str
    head: str  # node ids
    node_b: str
    caches: dict[str, Path]  # node id -> that node's CAPFILT_CACHE


def _node_ids() -> dict[str, str]:
    import ray

    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            out["node_b" if n["Resources"].get("node_b") else "head"] = n["NodeID"]
    return out


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    import ray
    from ray.cluster_utils import Cluster

    from capfilt.core.cluster import ensure_ray
    from capfilt.testing import s3_server

    tmp = tmp_path_factory.mktemp("two-nodes")
    caches = {"head": tmp / "cache-head", "node_b": tmp / "cache-b"}
    was_running = ray.is_initialized()
    ray.shutdown()
    with s3_server() as bucket:
        # Started inside the S3 block: both raylets, and so their workers, see the AWS variables.
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "env_vars": {"CAPFILT_CACHE": str(caches["head"])}},
        )
        cluster.add_node(
            num_cpus=2, resources={"node_b": 1}, env_vars={"CAPFILT_CACHE": str(caches["node_b"])}
        )
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        ids = _node_ids()
        assert len(ids) == 2, ray.nodes()
        try:
            yield TwoNodes(
                cluster.address, bucket, ids["head"], ids["node_b"], {ids[k]: v for k, v in caches.items()}
            )
        finally:
            ray.shutdown()
            cluster.shutdown()
    if was_running:
        ensure_ray(num_cpus=4)


def _copies(cache: Path) -> list[str]:
    """Names of the remote files and folders a node's cache holds (``fs.local_copy``)."""
    done = sorted((cache / "remote").glob("*/.complete")) if cache.is_dir() else []
    return sorted(p.name for d in done for p in d.parent.iterdir() if not p.name.startswith("."))


def test_training_runs_one_worker_per_node_with_its_checkpoints_on_s3(
    two_nodes: TwoNodes, small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two DDP workers placed STRICT_SPREAD: one per node. Ray Train refuses a node-local
    storage path on more than one node; here each rank uploads its part of every checkpoint to
    S3 and reads the run's tokenizer from S3 into its own node's cache."""
    from capfilt.train.config import TrainConfig
    from capfilt.train.driver import run_training

    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "cache-driver"))
    write_sample_shards(small_world, tmp_path / "shards", shard_size=120, undecodable=0)
    shards = fs.put(tmp_path / "shards", fs.location(f"{two_nodes.bucket}/data/shards"))
    out = f"{two_nodes.bucket}/runs/ddp"
    cfg = TrainConfig.model_validate(
        {
            "model": "med-tiny",
            "data": [str(shards)],
            "out_dir": out,
            "steps": 2,
            "warmup_steps": 1,
            "batch_size": 8,
            "checkpoint_every": 2,
            "shuffle_buffer": 0,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "torch_threads": 1,
            "placement_strategy": "STRICT_SPREAD",
        }
    )
    summary = run_training(cfg, ray_address=two_nodes.address)
    assert summary.world_size == 2 and summary.steps == 2
    ckpt = fs.location(summary.checkpoint)
    assert isinstance(ckpt, fs.RemotePath)
    assert {"worker_000.pt", "worker_001.pt", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    # Each node's workers copied the run's tokenizer (a folder on S3) into that node's cache.
    for node, cache in two_nodes.caches.items():
        assert _copies(cache).count("tokenizer") == 1, (node, _copies(cache))


def test_capfilt_models_load_on_each_node_from_their_uri(
    two_nodes: TwoNodes, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resolve_model on the driver keeps the URI; a CapFilt actor placed on node_b (custom
    resource) and a load task placed on the head each fetch the checkpoint into their own node's
    cache. The placement is a wrapper of this test: the CapFilt stage has no custom-resource knob."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from capfilt.stages.capfilt.actors import FilterActor
    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.models import load_model, resolve_model

    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "cache-driver"))
    remote = fs.put(tiny_models["filter"], fs.location(f"{two_nodes.bucket}/models/filter"))
    ref = resolve_model(str(remote), "filter")
    assert ref.path == str(remote) and ref.tokenizer == str(remote)  # no driver-local path in it
    cfg = CapFiltConfig()

    actor = ray.remote(FilterActor).options(num_cpus=0.5, resources={"node_b": 1}).remote(ref, cfg)
    actor_node = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

    @ray.remote(num_cpus=0.5)
    def load_here(ref: Any) -> tuple[str, str, list[str]]:
        med = load_model(ref, "filter", CapFiltConfig())
        return ray.get_runtime_context().get_node_id(), os.environ["CAPFILT_CACHE"], sorted(med.heads)

    task_node, task_cache, heads = ray.get(
        load_here.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(two_nodes.head, soft=False)
        ).remote(ref)
    )
    assert actor_node == two_nodes.node_b and task_node == two_nodes.head
    assert task_cache == str(two_nodes.caches[two_nodes.head]) and {"itc", "itm"} <= set(heads)
    for node in (two_nodes.head, two_nodes.node_b):
        assert "filter" in _copies(two_nodes.caches[node]), (node, _copies(two_nodes.caches[node]))
    ray.kill(actor)
