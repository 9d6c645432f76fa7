"""The ``download`` stage: a URL list (or the shapes world's server) in, Parquet shards of SAMPLE
rows out, one row per input row, via img2dataset on Ray. The work is in `driver`; this module
declares the stage (light to import: `capfilt status` reads download folders through it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from capfilt.core.layout import INPUTS_DIR, STATS_DIR, SUMMARY
from capfilt.core.shards import done_shards, read_json, shard_name
from capfilt.core.stage import Fit, Section, Stage, StageContext, StageStatus, json_of, readable
from capfilt.stages.download.driver import (
    DownloadConfig,
    download_shard,
    read_samples,
    run_download,
    screen_rows,
)
from capfilt.stages.download.planner import PLAN_FILE

__all__ = [
    "STAGE",
    "DownloadConfig",
    "DownloadStage",
    "download_shard",
    "read_samples",
    "run_download",
    "screen_rows",
]

#: The url_policy of a download fed by the 'world' stage. Its only URLs are the world's own server
#: on 127.0.0.1 (`capfilt.stages.world.served_world`), which "public" refuses, so such a download
#: allows loopback unless the recipe names a policy itself; naming "public" there is an error.
WORLD_URL_POLICY = "allow_loopback"


class DownloadStage(Stage):
    name = "download"
    help = "fetch and resize every image of the URL list with img2dataset into SAMPLE shards"
    sections: ClassVar[Mapping[str, Section]] = {
        "download": Section(DownloadConfig, default_factory=DownloadConfig, help="img2dataset and sharding")
    }
    reads = frozenset({"urls"})

    def effective(self, recipe: Any) -> DownloadConfig:
        """The download's config as it runs: the recipe's, with the documented world rule
        (`WORLD_URL_POLICY`) and the URL list's source name."""
        cfg: DownloadConfig = self.config(recipe)
        if recipe.has_world():
            if "url_policy" not in cfg.model_fields_set:
                cfg = cfg.model_copy(update={"url_policy": WORLD_URL_POLICY})
        elif recipe.urls is not None:
            cfg = cfg.model_copy(update={"source": recipe.urls.source})
        return cfg

    def check(self, recipe: Any, check_paths: bool) -> None:
        cfg: DownloadConfig = self.config(recipe)
        if not recipe.has_world() and recipe.urls is None:
            raise ValueError(
                "urls: a download without the 'world' stage needs a 'urls:' section (a URL list)"
            )
        if recipe.has_world() and "url_policy" in cfg.model_fields_set and cfg.url_policy == "public":
            raise ValueError(
                "download.url_policy: the 'world' stage serves its images on 127.0.0.1, which "
                "'public' refuses; use allow_loopback"
            )

    def upstream(self, recipe: Any) -> list[str]:
        return ["world"] if recipe.section("world") is not None else []

    def key(self, recipe: Any) -> Any:
        # The config as the recipe wrote it (the world rule follows from the upstream 'world').
        return {
            "download": json_of(self.config(recipe)),
            "urls": recipe.urls.model_dump(mode="json") if recipe.urls else None,
        }

    def uses_ray(self, recipe: Any) -> bool:
        return True

    def fit(self, recipe: Any, cpus: float, gpus: float) -> Fit:
        cfg: DownloadConfig = self.config(recipe)
        if cfg.cpus_per_task <= cpus:
            return Fit()
        return Fit(
            {"download": cfg.model_copy(update={"cpus_per_task": cpus})},
            [f"download cpus_per_task {cfg.cpus_per_task:g} -> {cpus:g}"],
        )

    def run(self, ctx: StageContext) -> dict[str, Any]:
        rec = ctx.recipe
        cfg = self.effective(rec)
        if rec.has_world():
            from capfilt.stages.world import served_world

            with served_world(ctx.run.dir("world")) as url_list:
                summary = run_download(url_list, ctx.dir, cfg, ray_address=rec.ray_address)
        else:
            assert rec.urls is not None
            summary = run_download(
                rec.urls.path,
                ctx.dir,
                cfg,
                url_col=rec.urls.url_col,
                caption_col=rec.urls.caption_col,
                input_format=rec.urls.input_format,
                ray_address=rec.ray_address,
            )
        return summary.to_json()

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        failed = {k: v for k, v in result.get("status_counts", {}).items() if k != "success"}
        return [
            f"rows in {readable(result.get('rows_in'))}, downloaded {readable(result.get('downloaded'))}, "
            f"not downloaded {readable(sum(failed.values()))}",
            "by status: " + (", ".join(f"{k} {readable(v)}" for k, v in sorted(failed.items())) or "-"),
            f"shards {result.get('shards_total')} ({result.get('shards_written')} written, "
            f"{result.get('shards_skipped')} done before)",
        ]

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return {k: v for k, v in result.items() if k not in ("reason_counts",)}

    def status(self, d: Path, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        """Shards, rows by status and failure reasons of a download folder."""
        done = done_shards(d)
        pending = {int(p.stem) for p in (d / INPUTS_DIR).glob("*.parquet") if p.stem.isdigit()} - done
        summary = read_json(d / SUMMARY) if (d / SUMMARY).is_file() else {}
        plan = d / INPUTS_DIR / PLAN_FILE
        planned = len(read_json(plan).get("shards", [])) if plan.is_file() else 0
        st.shards_done = len(done)
        st.shards_total = max(int(summary.get("shards_total", 0)), len(done | pending), planned)
        st.shards_failed = {
            shard_name(int(k)): str(v)
            for k, v in (summary.get("shards_failed") or {}).items()
            if int(k) not in done
        }
        rows: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for s in sorted(done):
            stats = read_json(d / STATS_DIR / f"{shard_name(s)}.json")
            rows.update(stats.get("status_counts", {}))
            reasons.update(stats.get("reason_counts", {}))
        st.rows = dict(sorted(rows.items()))
        st.failures = dict(reasons.most_common())
        if rows:
            st.progress = f"{sum(rows.values())} rows, {rows.get('success', 0)} downloaded"
        return st


STAGE = DownloadStage()
