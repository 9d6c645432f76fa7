"""``run_capfilt``, the CapFilt stage's driver: plan the input shards, check the manifest, run the Ray
Data pipeline and write each shard as soon as its last image comes back.

Download shards in; synthetic captions, filter scores, a decision per text, cleaned Parquet shards,
a candidates table and stats out. The work itself is two plain functions on a batch, testable
without Ray: ``caption.caption_batch`` (K synthetic captions per image) and ``score.score_batch``
(every text of every image scored with the filter's ITM head, ``[ENC]`` first, plus the ITC cosine).

The pipeline: read shards (streaming) -> decode and resize on CPU tasks (``chunks``) ->
``CaptionerActor`` pool -> ``FilterActor`` pool (``actors``) -> this driver, which writes an input
shard's outputs (``writer``). The actors load their model from a path in ``__init__`` and only call
the functions above.

Output layout of ``out``::

    cleaned/NNNNN.parquet         CLEANED: one row per (image, text) the filter kept, next round's input
    captions/NNNNN.parquet        instead of cleaned/ in a caption-only run (no filter): the texts, unscored
    cleaned/human-NNNNN.parquet   human pairs, passed through (text_source "human")
    candidates/NNNNN.parquet      CANDIDATE: every text considered, scores, decision, reason
    _stats/NNNNN.json             per input shard; written last, it marks the shard done
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.core.errors import ConfigError, StageFailed
from capfilt.core.layout import MANIFEST, SUMMARY
from capfilt.core.logs import log_context
from capfilt.core.shards import read_json, write_json_atomic
from capfilt.stages.capfilt.actors import CaptionerActor, FilterActor
from capfilt.stages.capfilt.chunks import preprocess_chunks, read_chunks, unscored_chunks
from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
from capfilt.stages.capfilt.decisions import REASON_UNDECODABLE, kept_dir
from capfilt.stages.capfilt.human import human_shards, write_human_shard
from capfilt.stages.capfilt.inputs import _input_files, _Plan, _plan
from capfilt.stages.capfilt.models import ModelRef, resolve_model
from capfilt.stages.capfilt.summary import CapFiltSummary, summarize
from capfilt.stages.capfilt.writer import _RunIds, _write_web_shard, shard_done

log = logging.getLogger(__name__)


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.exists():
        old = read_json(path)
        if old.get("stage") != STAGE:
            raise ConfigError(f"{out} holds the output of stage {old.get('stage')!r}; pass a new --out")
        old_fp, new_fp = old["fingerprint"], manifest["fingerprint"]
        diff = sorted(k for k in new_fp if k != "settings" and old_fp.get(k) != new_fp[k])
        diff += sorted(k for k in new_fp["settings"] if old_fp["settings"].get(k) != new_fp["settings"][k])
        if diff == ["threshold"]:
            was = old_fp["settings"]["threshold"]
            raise ConfigError(
                f"{out} was made with threshold {was}: pass --threshold {was} to resume it, or change it "
                f"with `capfilt rethreshold --run {out} --threshold T`"
            )
        if diff:
            raise ConfigError(
                f"{out} holds a CapFilt run with other inputs, models or settings (differs in {diff}); "
                "pass a new --out, or delete the folder to start again"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no CapFilt run; pass a new or empty --out")
    write_json_atomic(path, manifest)


def _gpus_per_actor(cfg: CapFiltConfig, actors: int) -> float:
    import ray

    if cfg.gpus_per_actor is not None:
        return cfg.gpus_per_actor
    gpus = float(ray.cluster_resources().get("GPU", 0))
    return 0.0 if gpus <= 0 else min(1.0, gpus / actors)


def _dataset(
    plans: list[_Plan], captioner: ModelRef | None, filter: ModelRef | None, cfg: CapFiltConfig
) -> Any:
    """shards -> read (tasks) -> decode (tasks) -> captioner actors -> filter actors, one chunk per block."""
    import ray

    sizes = sorted({m.image_size for m in (captioner, filter) if m is not None})
    shards = [{"path": str(p.path), "input_shard": p.name} for p in plans]
    ds: Any = ray.data.from_items(shards, override_num_blocks=len(shards))  # one read task per shard
    # Read and decode run in the same task (Ray fuses them), one task per shard, streaming.
    ds = ds.map_batches(
        read_chunks, fn_kwargs={"batch_size": cfg.batch_size}, batch_size=1, num_cpus=cfg.preprocess_cpus
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
            fn_constructor_kwargs={"ref": filter, "cfg": cfg},
            compute=ray.data.ActorPoolStrategy(size=cfg.filter_actors),
            batch_size=1,
            **resources,
        )
    else:
        ds = ds.map_batches(
            unscored_chunks, fn_kwargs={"cfg": cfg}, batch_size=1, num_cpus=cfg.preprocess_cpus
        )
    return ds


@dataclass
class _Tally:
    """Candidate rows of one shard as they come back, in any order and any split: an image is
    complete with its web row and, when its image decoded and a captioner ran, its k captions."""

    k: int
    parts: list[pa.Table] = field(default_factory=list)
    images: int = 0
    rows: int = 0
    expected: int = 0

    def add(self, part: pa.Table) -> bool:
        """Add rows; True when every image seen so far has all its rows."""
        self.parts.append(part)
        self.rows += part.num_rows
        web = part.filter(pc.equal(part.column("text_source"), "web"))
        decoded = [not (r or "").startswith(REASON_UNDECODABLE) for r in web.column("reason").to_pylist()]
        self.images += web.num_rows
        self.expected += web.num_rows + self.k * sum(decoded)
        return self.rows == self.expected


def _by_shard(batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    shards = batch.column("input_shard")
    for name in pc.unique(shards).to_pylist():
        yield name, batch.filter(pc.equal(shards, name)).drop(["input_shard"])


def run_capfilt(
    data: str | Path,
    out: str | Path,
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
    data, out = Path(data), Path(out)
    plans = _plan(_input_files(data))
    cap_ref = resolve_model(captioner, "captioner", tokenizer, arch) if captioner is not None else None
    filt_ref = resolve_model(filter, "filter", tokenizer, arch) if filter is not None else None
    humans = (
        human_shards(Path(human), Path(human_images) if human_images else None, cfg.human_shard_size)
        if human
        else []
    )
    ids = _RunIds(cfg.round, cap_ref.model_id if cap_ref else None, filt_ref.model_id if filt_ref else None)
    manifest = {
        "stage": STAGE,
        "fingerprint": {
            "data": str(data.resolve()),
            "shards": [p.name for p in plans],
            "captioner_id": ids.captioner_id,
            "filter_id": ids.filter_id,
            "human": str(Path(human).resolve()) if human else None,
            "settings": cfg.output_settings(),
        },
        "inputs": {p.name: str(p.path) for p in plans},
        "captioner": cap_ref.__dict__ if cap_ref else None,
        "filter": filt_ref.__dict__ if filt_ref else None,
        "config": cfg.model_dump(),
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest)

    kept = kept_dir(filt_ref is not None)  # where the web shards' kept texts go
    done = {p.name for p in plans if shard_done(out, p.name, kept)}
    todo = [p for p in plans if p.name not in done][:max_shards]
    log.info("%d input shards (%d already done, %d to run)", len(plans), len(done), len(todo))
    for h in humans:
        if not shard_done(out, h.name):
            with log_context(shard=h.name):
                write_human_shard(out, h, cfg)
    written = 0
    empty = [p for p in todo if p.images == 0]
    for p in empty:  # nothing for the models: write the (empty) outputs now
        _write_web_shard(out, p, [], ids, cfg, t0)
        written += 1
    busy = {p.name: p for p in todo if p.images > 0}
    if busy:
        ensure_ray(ray_address)
        ds = _dataset(list(busy.values()), cap_ref, filt_ref, cfg)
        tally = {name: _Tally(cfg.k if cap_ref else 0) for name in busy}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for name, part in _by_shard(batch):
                if tally[name].add(part) and tally[name].images == busy[name].images:
                    with log_context(shard=name):
                        st = _write_web_shard(out, busy[name], tally.pop(name).parts, ids, cfg, t0)
                        written += 1
                        log.info(
                            "shard %s done: %d images, %d kept texts", name, st["images"], st["rows_out"]
                        )
        log.debug("Ray Data stats:\n%s", ds.stats())
        unfinished = sorted(n for n in busy if not shard_done(out, n, kept))
        if unfinished:
            raise StageFailed(f"shard(s) {unfinished} did not get all their images back; rerun to retry them")

    summary = summarize(out, cfg.threshold, len(plans) + len(humans))
    summary.shards_written = written
    summary.shards_skipped = len(done)
    summary.shards_pending = len(plans) - len(done) - len(todo)
    summary.wall_s = time.time() - t0
    write_json_atomic(out / SUMMARY, summary.to_json())
    return summary
