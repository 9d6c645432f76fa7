"""Running a recipe: each stage in its own folder of the run, in order, skipping finished work."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.download import DownloadSummary, run_download
from capfilt.recipe import Recipe
from capfilt.shards import read_json, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    download: DownloadSummary | None = None
    world: dict[str, Any] = field(default_factory=dict)


def _world_stage(recipe: Recipe, world_dir: Path) -> dict[str, Any]:
    from capfilt.world import make_world

    assert recipe.world is not None
    info_path = world_dir / "world.json"
    wanted = json.loads(recipe.world.model_dump_json())
    if info_path.exists() and read_json(info_path).get("config") == wanted:
        log.info("world: %s already made with this config; reusing it", world_dir)
    else:
        make_world(world_dir, recipe.world)
    return dict(read_json(info_path))


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


def run_recipe(recipe: Recipe, progress: bool = True) -> RunResult:
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    result = RunResult(out=out)
    world_dir = out / "world"
    if "world" in recipe.stages:
        result.world = _world_stage(recipe, world_dir)
    if "download" in recipe.stages:
        if recipe.urls is not None and "world" not in recipe.stages:
            result.download = run_download(
                recipe.urls.path,
                out / "download",
                recipe.download,
                url_col=recipe.urls.url_col,
                caption_col=recipe.urls.caption_col,
                input_format=recipe.urls.input_format,
                ray_address=recipe.ray_address,
                progress=progress,
            )
        else:
            with _served_world(world_dir) as url_list:
                result.download = run_download(
                    url_list,
                    out / "download",
                    recipe.download,
                    ray_address=recipe.ray_address,
                    progress=progress,
                )
    return result
