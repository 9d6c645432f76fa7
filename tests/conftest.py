"""Shared fixtures (built with capfilt.testing): one local Ray instance per test session, a small
served shapes world, its tiny random captioner and filter, and torch on one thread."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# A starved Ray Data pipeline should fail fast in tests rather than wait 30 minutes.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One embedded Ray instance for the whole session: ray.init costs seconds."""
    import ray

    from capfilt.core.cluster import ensure_ray

    ensure_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from capfilt.world import WorldConfig, make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, WorldConfig(seed=7, n_web=240, n_human=20, n_test=20, bad_rate=0.15))
    return out


@pytest.fixture(scope="session")
def served_world(small_world: Path) -> Iterator[tuple[Path, Path, object]]:
    """(world dir, URL list, server) for the session."""
    from capfilt.world import WorldServer, write_url_list

    with WorldServer(small_world) as server:
        urls = write_url_list(small_world, server.base_url, small_world / "urls.parquet")
        yield small_world, urls, server


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (capfilt.testing.one_torch_thread): the tiny models run
    faster so on a busy machine, and CPU kernels are then bitwise deterministic."""
    from capfilt.testing import one_torch_thread as one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_models(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small world's tiny random med-tiny, ITM centred on its pairs, exported as a
    transformers captioner and filter (capfilt.testing.tiny_models)."""
    from capfilt.testing import one_torch_thread as one_thread
    from capfilt.testing import tiny_models as build

    with one_thread():
        return build(small_world, tmp_path_factory.mktemp("tiny-models"))
