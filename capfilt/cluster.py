"""Connecting to Ray: an embedded local instance by default, or an existing cluster by address."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    With no address, an embedded local instance starts with no dashboard. Its logical CPU count is
    at least 4: on a 2-core machine a stage whose actors take whole CPUs would otherwise starve its
    own read tasks (see docs). With an address ("auto" or "ray://host:port"), or RAY_ADDRESS set in
    the environment, we join that cluster.
    """
    import ray

    if ray.is_initialized():
        return
    # Ray's usage reporting would try the network, which our machines and many clusters lack.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # albumentations (imported by img2dataset) checks the network for updates on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # A Ray job's entrypoint (KubeRay RayJob, `ray job submit`) gets the cluster in RAY_ADDRESS.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    log.info("starting a local Ray instance with %d logical CPUs", cpus)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,
    )


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
