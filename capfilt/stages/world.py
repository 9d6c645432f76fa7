"""The ``world`` stage: make the seeded synthetic shapes world (images, noisy web pairs, human
captions, test split, ground truth) that stands in for the web on a machine without one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from capfilt.core.shards import read_json, write_json_atomic
from capfilt.core.stage import Section, Stage, StageContext, StageDir, StageStatus, readable
from capfilt.world.make import WorldConfig

log = logging.getLogger(__name__)


class WorldStage(Stage):
    name = "world"
    help = "make the seeded shapes world: web pairs with known noise, human pairs, test split"
    sections: ClassVar[Mapping[str, Section]] = {
        "world": Section(WorldConfig | None, None, help="the shapes world to make (with the 'world' stage)")
    }

    def check(self, recipe: Any, check_paths: bool) -> None:
        if recipe.section("world") is None:
            raise ValueError("world: the stage 'world' is listed but the recipe has no 'world:' section")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from capfilt.world import make_world

        info = make_world(ctx.dir, self.config(ctx.recipe))
        return {"root": str(ctx.dir), "counts": info.counts}

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        return [f"{k}: {_counts(v)}" for k, v in (result.get("counts") or {}).items()]

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        counts = result.get("counts") or {}
        images = counts.get("images") if isinstance(counts.get("images"), dict) else {}
        parts = [f"{k} {v}" for k, v in (images or {}).items()]
        parts += [f"{k} {v}" for k, v in counts.items() if isinstance(v, int)]
        st.progress = ("images: " if images else "") + ", ".join(parts)
        return st


def _counts(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {readable(v)}" for k, v in value.items())
    return readable(value)


@contextlib.contextmanager
def served_world(world_dir: Path) -> Iterator[Path]:
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


STAGE = WorldStage()
