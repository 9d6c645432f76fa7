"""Connecting to Ray: an embedded local instance by default, or an existing cluster by address."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Whether this process started the embedded local instance (rather than joining a cluster).
_started_local = False


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    With no address, an embedded local instance starts with no dashboard. Its logical CPU count is
    at least 4: on a 2-core machine a stage whose actors take whole CPUs would otherwise starve its
    own read tasks (see docs). With an address ("auto" or "ray://host:port"), or RAY_ADDRESS set in
    the environment, we join that cluster.
    """
    import ray

    from capfilt.core.logs import adopt_engine_loggers

    adopt_engine_loggers()  # Ray's loggers exist now: to the run's log file in a quiet run
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
    global _started_local
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    log.info("starting a local Ray instance with %d logical CPUs", cpus)
    ray.init(
        # "local": a new instance even when `ray start` left one on this machine, which ray.init()
        # with no address would join (and refuse, given num_cpus).
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,
    )
    _started_local = True


def ray_running() -> bool:
    """Whether this process is connected to Ray already (without importing Ray to find out)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def shutdown_local_ray() -> None:
    """Stop the embedded local instance this process started (a joined cluster keeps running)."""
    global _started_local
    if not _started_local:
        return
    import ray

    ray.shutdown()
    _started_local = False


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def local_threads_per_worker(workers: int) -> int | None:
    """Torch threads for each of ``workers`` training workers on the embedded local instance: the
    machine's cores shared among them. Ray sets a worker's OMP_NUM_THREADS to its CPU reservation,
    which is 1 by default (kept small so the read tasks can be scheduled beside it), so a laptop
    would train on one core and leave the rest idle. None when joined to a cluster, where the
    reservation is the worker's real share of its node."""
    if not _started_local:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, workers))
