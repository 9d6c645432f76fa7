"""``run_capfilt``, the CapFilt stage's driver: plan the input shards, check the manifest, run the Ray
Data pipeline, and start each shard's writer task as soon as its last image is scored. The driver
holds no rows and no images: it sees one small receipt per model batch and the writers' stats.

Download shards in; synthetic captions, filter scores, a decision per text, cleaned Parquet shards,
a candidates table and stats out. The work itself is two plain functions on a batch, testable
without Ray: ``caption.caption_batch`` (K synthetic captions per image) and ``score.score_batch``
(every text of every image scored with the filter's ITM head, ``[ENC]`` first, plus the ITC cosine).

The pipeline: read shards (streaming) -> decode and resize on CPU tasks (``chunks``) ->
``CaptionerActor`` pool -> ``FilterActor`` pool (``actors``), whose last act on a chunk is
``writer.write_parts``: the chunk's candidate rows go to a part file under ``_parts/`` and a
receipt (shard, part, counts) comes back -> this driver, which counts receipts per shard and, once
a shard has every row, starts ``writer.write_web_shard`` as a Ray task: it merges the parts, reads
the input shard's images of the kept rows, and writes the shard's outputs. Human shards are
written by Ray tasks too (``human.write_human_shard``). The actors load their model from a path
in ``__init__`` and only call the functions above.

Output layout of ``out``::

    cleaned/NNNNN.parquet         CLEANED: one row per (image, text) the filter kept, next round's input
    captions/NNNNN.parquet        instead of cleaned/ in a caption-only run (no filter): the texts, unscored
    cleaned/human-NNNNN.parquet   human pairs, passed through (text_source "human")
    candidates/NNNNN.parquet      CANDIDATE: every text considered, scores, decision, reason
    _stats/NNNNN.json             per input shard; written last, it marks the shard done
    _parts/NNNNN/*.parquet        a shard's candidate rows by chunk while it runs; removed once written
    _manifest.json                inputs, models, config; a rerun with other settings is refused
    _summary.json                 the run summary (what the CLI prints)

Shard NNNNN of ``cleaned/`` and ``candidates/`` comes from the input shard with the same name.
Images in cleaned shards: ``images="include"`` (default) copies the JPEG bytes into ``image``;
``"reference"`` leaves ``image`` null and says so in the shard's Parquet schema metadata
(``capfilt.images: "ref"``, ``capfilt.image_sources``: the shards or folders referenced). Either way ``image_ref`` says where the bytes are: a
Parquet shard whose row with the same ``uid`` holds them in ``image``, or an image file.
``rethreshold.rethreshold`` re-decides from ``candidates/`` without running a model.

Determinism: captions are seeded per (image, caption) (``caption``), and a model batch is always a
chunk of ``batch_size`` consecutive images of one shard (``chunks``), so with the same settings a
rerun or a resumed shard computes exactly what an uninterrupted run computed, bit for bit on the
same hardware. With another ``batch_size`` the scores differ in the last float bits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.core import fs
from capfilt.core.errors import ConfigError, StageFailed
from capfilt.core.fs import Location
from capfilt.core.layout import MANIFEST, PARTS_DIR, STATS_DIR, SUMMARY
from capfilt.core.logs import log_context
from capfilt.core.shards import read_json, write_json_atomic
from capfilt.stages.capfilt.actors import CaptionerActor, FilterActor
from capfilt.stages.capfilt.chunks import preprocess_chunks, read_chunks, unscored_chunks
from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
from capfilt.stages.capfilt.decisions import kept_dir
from capfilt.stages.capfilt.dedup_before import per_image_seconds, plan_dedup_before, work_saved
from capfilt.stages.capfilt.human import HumanShard, human_shards, write_human_shard
from capfilt.stages.capfilt.inputs import _input_files, _Plan, _plan
from capfilt.stages.capfilt.models import ModelRef, resolve_model
from capfilt.stages.capfilt.select import SELECTION_FIELDS
from capfilt.stages.capfilt.sizing import size_for_cluster
from capfilt.stages.capfilt.summary import CapFiltSummary, summarize
from capfilt.stages.capfilt.writer import _RunIds, shard_done, write_web_shard

log = logging.getLogger(__name__)

# The shard writer, a Ray task (a module attribute, so a test can stand another in).
write_shard = write_web_shard


def _check_manifest(out: Location, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.exists():
        old = read_json(path)
        if old.get("stage") != STAGE:
            raise ConfigError(f"{out} holds the output of stage {old.get('stage')!r}; pass a new --out")
        old_fp, new_fp = old["fingerprint"], manifest["fingerprint"]
        diff = sorted(k for k in new_fp if k != "settings" and old_fp.get(k) != new_fp[k])
        # A setting added since the run was made counts as its default.
        defaults = CapFiltConfig().output_settings()
        old_settings = {k: old_fp["settings"].get(k, defaults.get(k)) for k in new_fp["settings"]}
        diff += sorted(k for k in new_fp["settings"] if old_settings[k] != new_fp["settings"][k])
        if diff == ["threshold"]:
            was = old_fp["settings"]["threshold"]
            raise ConfigError(
                f"{out} was made with threshold {was}: pass --threshold {was} to resume it, or change it "
                f"with `capfilt reselect --run {out} --threshold T`"
            )
        if diff and set(diff) <= set(SELECTION_FIELDS):
            was = {k: old_settings[k] for k in diff}
            raise ConfigError(
                f"{out} was made with {was}: resume it with those settings, or change them afterwards "
                f"with `capfilt reselect --run {out}` (no model runs)"
            )
        if diff:
            raise ConfigError(
                f"{out} holds a CapFilt run with other inputs, models or settings (differs in {diff}); "
                "pass a new --out, or delete the folder to start again"
            )
    elif out.exists() and any(True for _ in out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no CapFilt run; pass a new or empty --out")
    write_json_atomic(path, manifest)


def _gpus_per_actor(cfg: CapFiltConfig, actors: int) -> float:
    import ray

    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return 0.0 if gpus <= 0 else min(1.0, gpus / actors)


def _dataset(
    plans: list[_Plan],
    captioner: ModelRef | None,
    filter: ModelRef | None,
    cfg: CapFiltConfig,
    out: str | None = None,
) -> Any:
    """shards -> read (tasks) -> decode (tasks) -> captioner actors -> filter actors, one chunk per
    block. The rows out are candidates, or with ``out`` the receipts of their part files there
    (the last step writes them: no Ray Data step of its own, no task per chunk more)."""
    import ray

    sizes = sorted({m.image_size for m in (captioner, filter) if m is not None})
    shards = [{"path": str(p.path), "input_shard": p.name} for p in plans]
    ds: Any = ray.data.from_items(shards, override_num_blocks=len(shards))  # one read task per shard
    # Read and decode run in the same task (Ray fuses them), one task per shard, streaming.
    skip = {p.name: [r["uid"] for r in p.skipped] for p in plans if p.skipped}  # dedup_before's
    ds = ds.map_batches(
        read_chunks,
        fn_kwargs={"batch_size": cfg.batch_size, "skip": skip},
        batch_size=1,
        num_cpus=cfg.preprocess_cpus,
    )
    ds = ds.map_batches(
        preprocess_chunks, fn_kwargs={"image_sizes": sizes}, batch_size=1, num_cpus=cfg.preprocess_cpus
    )
    # One chunk per block, so a model batch moves on to the next model as soon as it is done
    # rather than waiting for the rest of its shard.
    ds = ds.repartition(target_num_rows_per_block=1)
    actors = (cfg.captioner_actors if captioner else 0) + (cfg.filter_actors if filter else 0)
    gpus = _gpus_per_actor(cfg, actors)
    resources: dict[str, float] = {"num_cpus": cfg.cpus_per_actor} | ({"num_gpus": gpus} if gpus else {})
    if captioner is not None:
        ds = ds.map_batches(
            CaptionerActor,
            fn_constructor_kwargs={"ref": captioner, "cfg": cfg},
            compute=ray.data.ActorPoolStrategy(size=cfg.captioner_actors),
            batch_size=1,  # one chunk: cfg.batch_size images
            **resources,
        )
    if filter is not None:
        ds = ds.map_batches(
            FilterActor,
            fn_constructor_kwargs={"ref": filter, "cfg": cfg, "out": out},
            compute=ray.data.ActorPoolStrategy(size=cfg.filter_actors),
            batch_size=1,
            **resources,
        )
    else:
        ds = ds.map_batches(
            unscored_chunks, fn_kwargs={"cfg": cfg, "out": out}, batch_size=1, num_cpus=cfg.preprocess_cpus
        )
    return ds


@dataclass
class _Tally:
    """The receipts of one shard's parts as they come back, in any order and any split: an image
    is complete with its web row and, when its image decoded and a captioner ran, its k captions."""

    k: int
    parts: list[str] = field(default_factory=list)
    images: int = 0
    rows: int = 0
    expected: int = 0

    def add(self, receipt: dict[str, Any]) -> bool:
        """Add a part; True when every image seen so far has all its rows."""
        self.parts.append(receipt["part"])
        self.rows += receipt["rows"]
        self.images += receipt["images"]
        self.expected += receipt["images"] + self.k * receipt["decoded"]
        return self.rows == self.expected


def _shard_written(name: str, stats: dict[str, Any]) -> None:
    with log_context(shard=name):
        log.info("shard %s done: %d images, %d kept texts", name, stats.get("images", 0), stats["rows_out"])


class _Writers:
    """The shard writer tasks in flight: started as shards complete, harvested as they end. A
    writer that fails is recorded and the others go on; ``finish`` names every failed shard."""

    def __init__(self) -> None:
        self.pending: dict[Any, tuple[str, bool]] = {}
        self.written = 0  # web shards, as the summary counts them
        self.failed: dict[str, str] = {}

    def start(self, ref: Any, name: str, web: bool = True) -> None:
        self.pending[ref] = (name, web)

    def harvest(self, timeout: float | None = 0.0) -> None:
        import ray

        if not self.pending:
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        for ref in done:
            name, web = self.pending.pop(ref)
            try:
                st = ray.get(ref)
            except Exception as err:  # noqa: BLE001  # a writer's own error, reported per shard below
                cause = getattr(err, "cause", None) or err
                self.failed[name] = f"{type(cause).__name__}: {cause}"
                log.error("shard %s failed to write: %s", name, self.failed[name])
                continue
            self.written += web
            _shard_written(name, st)

    def cancel(self) -> None:
        """Stop the writers in flight (the driver is failing): a shard they leave is not done,
        and a rerun redoes it (its files are written whole or not at all, stats last)."""
        import ray

        for ref in self.pending:
            ray.cancel(ref, force=True)
        self.pending.clear()

    def finish(self) -> None:
        self.harvest(timeout=None)
        if self.failed:
            named = "; ".join(f"{n} ({e})" for n, e in sorted(self.failed.items()))
            raise StageFailed(f"{len(self.failed)} shard(s) failed to write: {named}; rerun to retry them")


def _write_shards(
    out: Location,
    todo: list[_Plan],
    humans: list[HumanShard],
    captioner: ModelRef | None,
    filter: ModelRef | None,
    ids: _RunIds,
    cfg: CapFiltConfig,
    t0: float,
) -> int:
    """Run the pipeline over ``todo`` and have every shard written by a Ray task: human shards and
    shards with no image at once, the others when their last receipt is in. Returns the web
    shards written. If the driver fails, the writers in flight are stopped."""
    import ray

    fs.rmtree(out / PARTS_DIR)  # parts of a run that stopped: its shards are redone whole
    # Writers read and write like the read tasks, so they ask what those ask.
    write_human = ray.remote(write_human_shard).options(num_cpus=cfg.preprocess_cpus)
    write_web = ray.remote(write_shard).options(num_cpus=cfg.preprocess_cpus)
    writers = _Writers()
    try:
        for h in humans:
            writers.start(write_human.remote(out, h, cfg), h.name, web=False)
        for p in todo:
            if p.images == 0:  # nothing for the models: its (empty) outputs now
                writers.start(write_web.remote(out, p, [], ids, cfg, t0), p.name)
        busy = {p.name: p for p in todo if p.images > 0}
        if busy:
            ds = _dataset(list(busy.values()), captioner, filter, cfg, out=str(out))
            tally = {name: _Tally(cfg.k if captioner else 0) for name in busy}
            for receipts in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for receipt in receipts.to_pylist():
                    name = receipt["input_shard"]
                    if tally[name].add(receipt) and tally[name].images == busy[name].images:
                        parts = tally.pop(name).parts
                        writers.start(write_web.remote(out, busy[name], parts, ids, cfg, t0), name)
                writers.harvest()
            log.debug("Ray Data stats:\n%s", ds.stats())
            if tally:
                writers.finish()
                raise StageFailed(
                    f"shard(s) {sorted(tally)} did not get all their images back; rerun to retry them"
                )
        writers.finish()
    except BaseException:
        writers.cancel()
        raise
    fs.rmtree(out / PARTS_DIR)  # every shard written: no part is needed any more
    return writers.written


def run_capfilt(
    data: str | Path | fs.RemotePath,
    out: str | Path | fs.RemotePath,
    captioner: str | Path | None = None,
    filter: str | Path | None = None,
    cfg: CapFiltConfig | None = None,
    ray_address: str | None = None,
    *,
    tokenizer: str | Path | None = None,
    arch: str | None = None,
    human: str | Path | None = None,
    human_images: str | Path | None = None,
    max_shards: int | None = None,
) -> CapFiltSummary:
    """Caption and/or filter every downloaded image under ``data`` into ``out``, resuming a run
    that stopped: finished shards are skipped, the rest give the rows an uninterrupted run gives.

    Either model may be left out: captioner only writes captions for every image, unscored, to
    ``captions/`` (``cleaned/`` holds only what a filter kept, and human pairs);
    filter only scores the existing texts. ``tokenizer`` overrides the one found beside the
    models; ``arch`` names the architecture of an original BLIP .pth. ``human`` (a Karpathy-style
    JSON with ``human_images``, or a SAMPLE shards folder) adds human pairs, passed through.
    ``max_shards`` stops after that many input shards (a trial run; rerun to finish).
    """
    from capfilt.core.cluster import ensure_ray

    cfg = cfg or CapFiltConfig()
    t0 = time.time()
    if captioner is None and filter is None:
        raise ConfigError("pass --captioner, --filter or both: with neither there is nothing to do")
    data_dir, out_dir = fs.location(data), fs.location(out)
    plans = _plan(_input_files(data_dir))
    cap_ref = resolve_model(captioner, "captioner", tokenizer, arch) if captioner is not None else None
    filt_ref = resolve_model(filter, "filter", tokenizer, arch) if filter is not None else None
    humans = (
        human_shards(
            fs.location(human), fs.location(human_images) if human_images else None, cfg.human_shard_size
        )
        if human
        else []
    )
    ids = _RunIds(cfg.round, cap_ref.model_id if cap_ref else None, filt_ref.model_id if filt_ref else None)
    manifest = {
        "stage": STAGE,
        "fingerprint": {
            "data": str(data_dir.resolve()),
            "shards": [p.name for p in plans],
            "captioner_id": ids.captioner_id,
            "filter_id": ids.filter_id,
            "human": str(fs.location(human).resolve()) if human else None,
            "settings": cfg.output_settings(),
        },
        "inputs": {p.name: str(p.path) for p in plans},
        "captioner": cap_ref.__dict__ if cap_ref else None,
        "filter": filt_ref.__dict__ if filt_ref else None,
        "config": cfg.model_dump(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(out_dir, manifest)

    kept = kept_dir(filt_ref is not None)  # where the web shards' kept texts go
    done = {p.name for p in plans if shard_done(out_dir, p.name, kept)}
    todo = [p for p in plans if p.name not in done][:max_shards]
    log.info("%d input shards (%d already done, %d to run)", len(plans), len(done), len(todo))
    humans_todo = [h for h in humans if not shard_done(out_dir, h.name)]
    skipping = plan_dedup_before(out_dir, plans, filt_ref, cfg, ray_address) if cfg.dedup_before else None
    written = 0
    t_models, images_run = time.time(), sum(p.images for p in todo)
    if todo or humans_todo:
        ensure_ray(ray_address)
        # Batch size and actors per GPU from its free memory, where the recipe left them unset.
        cfg = size_for_cluster(cfg, cap_ref, filt_ref)
        written = _write_shards(out_dir, todo, humans_todo, cap_ref, filt_ref, ids, cfg, t0)
    t_models = time.time() - t_models

    summary = summarize(out_dir, cfg.threshold, len(plans) + len(humans))
    summary.shards_written = written
    summary.shards_skipped = len(done)
    summary.shards_pending = len(plans) - len(done) - len(todo)
    summary.wall_s = time.time() - t0
    if skipping is not None:
        ran = [
            read_json(out_dir / STATS_DIR / f"{p.name}.json")
            for p in todo
            if shard_done(out_dir, p.name, kept)
        ]
        per_image = per_image_seconds(ran, t_models, images_run)
        summary.extra["dedup_before"] = work_saved(skipping, per_image, images_run, t_models)
    write_json_atomic(out_dir / SUMMARY, summary.to_json())
    return summary
