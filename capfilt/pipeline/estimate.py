"""Pricing a job before running it: the recipe's download and CapFilt on a few shards (a pilot),
measured, and projected to the full input on the recipe's cluster: wall time, CPU- and GPU-hours,
and bytes on disk.

The cost model, per stage (every constant measured by the pilot):

- download: ``planning + makespan``, where shards run ``slots`` at a time and a shard takes
  ``rows x seconds_per_row``, plus a start-up the first time a worker runs one (its imports). The
  pilot runs its shards in two waves, so the second wave runs on warm workers and the two are told
  apart. On an embedded local Ray whose logical CPUs exceed the machine's cores
  (``ensure_ray`` asks for at least 4), tasks share the cores: the projection slows them to match,
  and prices the workers' start-ups one after another.
- CapFilt: ``startup + images / images_per_s``. The pilot runs CapFilt twice, on one model batch
  (the probe) and on the sample shards; the difference prices an image, the rest is the start-up
  (Ray Data, actors loading their models). On another cluster the rate scales with the actor
  pools: ``min(captioners / pilot captioners, filters / pilot filters)``.
- bytes: per input row (download shards), per text (candidates) and per kept text (cleaned shards,
  written both ways: image bytes included, and referenced).

The sample is the input's first shards, not a random draw: a list sorted by domain prices the
domains at its start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.core.errors import ConfigError
from capfilt.core.layout import CANDIDATES_DIR, CLEANED_DIR, STAGES_DIR
from capfilt.core.shards import read_json, read_shard_stats, write_json_atomic
from capfilt.pipeline.recipe import Recipe

log = logging.getLogger(__name__)

PILOT_SUFFIX = "-pilot"  # default pilot folder: <recipe.out>-pilot
ESTIMATE_FILE = "estimate.json"  # written into the pilot folder


# ---------------------------------------------------------------------------------------------
# The input's size.
# ---------------------------------------------------------------------------------------------


def count_input_rows(urls: Any, input_format: str | None = None) -> int:
    """Rows of a URL input (a file, folder, glob or list of them, as the download stage takes it)
    without loading it: Parquet from its metadata, other formats streamed in bounded batches by the
    download's own reader (``capfilt.io.urllist``)."""
    from capfilt.core import fs
    from capfilt.io.urllist import columns_of, expand_sources, iter_batches

    rows = 0
    for src in expand_sources(urls, input_format):
        if src.indexed:
            rows += int(fs.parquet_file(src.path).metadata.num_rows)
        else:
            first = columns_of(src).names[:1]
            rows += sum(batch.num_rows for batch in iter_batches(src, first))
    return rows


# ---------------------------------------------------------------------------------------------
# The cluster a projection is for.
# ---------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Resources the download and CapFilt get: the pilot's, or the target's."""

    cpus: float
    gpus: float
    download_slots: int  # shards downloading at once
    download_cpus_per_task: float
    captioner_actors: int
    filter_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    preprocess_cpus: float
    cores: float | None = None  # real cores behind the CPUs, where fewer (an embedded local Ray)
    basis: str = ""  # where the numbers come from, for a person

    @property
    def actors(self) -> int:
        return self.captioner_actors + self.filter_actors

    @property
    def capfilt_gpus(self) -> float:
        return self.actors * self.gpus_per_actor

    @property
    def capfilt_cpus(self) -> float:
        return self.actors * self.cpus_per_actor + self.preprocess_cpus

    @property
    def download_cpus(self) -> float:
        return self.download_slots * self.download_cpus_per_task

    def slowdown(self, cpus_busy: float) -> float:
        """How much slower each task runs when ``cpus_busy`` logical CPUs share fewer cores."""
        if self.cores is None or cpus_busy <= self.cores:
            return 1.0
        return cpus_busy / self.cores


def _actor_gpus(gpus_per_actor: float | None, actors: int, gpus: float) -> float:
    """GPUs per CapFilt actor as the driver resolves them (None: share the cluster's, at most one)."""
    if gpus_per_actor is not None:
        return float(gpus_per_actor)
    return 0.0 if gpus <= 0 else min(1.0, gpus / actors)


def _slots(cfg: Any, cpus: float) -> int:
    """Download shards in flight: the recipe's concurrency, at most what the CPUs run at once."""
    fit = max(1, int(cpus / cfg.cpus_per_task))
    return max(1, min(int(cfg.concurrency), fit)) if cfg.concurrency else fit


def _cores() -> float:
    try:
        return float(len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return float(os.cpu_count() or 1)


def cluster_of(recipe: Recipe, cpus: float, gpus: float, cores: float | None, basis: str) -> Cluster:
    """The resources ``recipe``'s download and CapFilt get on a cluster of ``cpus`` and ``gpus``,
    after the runner scales its requests to it (``resources.fit_resources``)."""
    from capfilt.pipeline.resources import fit_resources

    fitted, _ = fit_resources(recipe, {"CPU": cpus, "GPU": gpus})
    dl, cf = fitted.section("download"), fitted.section("capfilt")
    actors = cf.captioner_actors + cf.filter_actors
    return Cluster(
        cpus=cpus,
        gpus=gpus,
        download_slots=_slots(dl, cpus),
        download_cpus_per_task=float(dl.cpus_per_task),
        captioner_actors=int(cf.captioner_actors),
        filter_actors=int(cf.filter_actors),
        gpus_per_actor=_actor_gpus(cf.gpus_per_actor, actors, gpus),
        cpus_per_actor=float(cf.cpus_per_actor),
        preprocess_cpus=float(cf.preprocess_cpus),
        cores=cores,
        basis=basis,
    )


def target_cluster(
    recipe: Recipe, pilot: Cluster, cpus: float | None = None, gpus: float | None = None
) -> tuple[Cluster, list[str]]:
    """The cluster to project for, and a note on where its size comes from: ``cpus``/``gpus`` when
    given; else what the recipe asks for (download ``concurrency`` x ``cpus_per_task``, CapFilt's
    actor pools x ``gpus_per_actor``); else, for what the recipe leaves to the cluster, the pilot's."""
    if cpus is not None or gpus is not None:
        c = float(cpus if cpus is not None else pilot.cpus)
        g = float(gpus if gpus is not None else 0.0)
        return cluster_of(recipe, c, g, None, "given"), [f"target cluster as given: {c:g} CPUs, {g:g} GPUs"]
    dl, cf = recipe.section("download"), recipe.section("capfilt")
    notes = []
    if dl.concurrency:
        dl_cpus = float(dl.concurrency * dl.cpus_per_task)
        notes.append(f"download: {dl.concurrency} shards at once, as the recipe asks")
    else:
        dl_cpus = pilot.cpus
        notes.append(
            f"download: the recipe sets no concurrency, so the pilot's cluster ({pilot.cpus:g} CPUs)"
        )
    if cf.gpus_per_actor is not None:
        cf_gpus = float((cf.captioner_actors + cf.filter_actors) * cf.gpus_per_actor)
        notes.append(
            f"capfilt: {cf.captioner_actors}+{cf.filter_actors} actors x {cf.gpus_per_actor:g} GPU, "
            "as the recipe asks"
        )
    else:
        cf_gpus = pilot.gpus
        notes.append(f"capfilt: the recipe sets no gpus_per_actor, so the pilot's GPUs ({pilot.gpus:g})")
    cf_cpus = (cf.captioner_actors + cf.filter_actors) * cf.cpus_per_actor + cf.preprocess_cpus
    total = max(dl_cpus, cf_cpus)
    from_pilot = not dl.concurrency and cf.gpus_per_actor is None
    cluster = cluster_of(
        recipe, total, cf_gpus, pilot.cores if from_pilot else None, "pilot" if from_pilot else "recipe"
    )
    return cluster, notes


# ---------------------------------------------------------------------------------------------
# What the pilot measured, and the projection: pure functions of numbers.
# ---------------------------------------------------------------------------------------------


@dataclass
class DownloadMeasure:
    shard_rows: list[int]  # per pilot shard, in shard order
    shard_images: list[int]
    shard_wall_s: list[float]  # each shard's own time, from its stats file
    cold_shards: int  # the first shards, which ran on workers that had not run one before
    wall_s: float  # the whole pilot download, planning included
    shard_bytes: int  # the pilot's shard files
    shard_size: int
    image_bytes: int = 0  # JPEG bytes of the images in them

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)

    @property
    def images(self) -> int:
        return sum(self.shard_images)

    @property
    def success_rate(self) -> float:
        return self.images / self.rows if self.rows else 0.0

    def per_row_s(self) -> float:
        """Seconds per row on a warm worker: the warm shards' if any, else every shard's."""
        warm = range(self.cold_shards, len(self.shard_rows))
        idx = list(warm) or list(range(len(self.shard_rows)))
        rows = sum(self.shard_rows[i] for i in idx)
        return sum(self.shard_wall_s[i] for i in idx) / rows if rows else 0.0

    def startup_s(self) -> float:
        """A worker's extra time on its first shard (imports): 0 when no shard ran warm."""
        if self.cold_shards >= len(self.shard_rows):
            return 0.0
        t = self.per_row_s()
        cold = [self.shard_wall_s[i] - self.shard_rows[i] * t for i in range(self.cold_shards)]
        return max(0.0, sum(cold) / len(cold)) if cold else 0.0

    def planning_s(self, slots: int) -> float:
        """The driver's time outside the shards (reading and screening the list, Ray's scheduling)."""
        durations = self.shard_wall_s
        return max(0.0, self.wall_s - _list_schedule(durations, slots))


@dataclass
class CapFiltMeasure:
    probe_images: int
    probe_wall_s: float
    images: int
    texts: int
    kept: int
    wall_s: float
    candidates_bytes: int
    cleaned_bytes: dict[str, int]  # "include" / "reference" -> bytes of the pilot's cleaned shards
    images_mode: str  # the recipe's

    def rate_and_startup(self) -> tuple[float, float, list[str]]:
        """(images/s, start-up s): the per-image time from the probe and the pilot runs, the
        start-up as what of the pilot's own time that does not explain (anchored on the pilot, the
        run the projection extends)."""
        di, dt = self.images - self.probe_images, self.wall_s - self.probe_wall_s
        notes = []
        if di <= 0 or dt <= 0:
            notes.append(
                "capfilt: the pilot was no slower than its one-batch probe (start-up dominates, or the "
                "machine's load changed): its per-image time is taken as 0, a lower bound; sample more shards"
            )
            return math.inf, self.wall_s, notes
        per_image = dt / di
        return 1.0 / per_image, max(0.0, self.wall_s - self.images * per_image), notes


def _finite(x: float, digits: int = 2) -> float | None:
    """``x`` rounded for the JSON, None for an infinite rate (JSON has no infinity)."""
    return round(x, digits) if math.isfinite(x) else None


def _list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of tasks run in order, each on the first slot free."""
    import heapq

    free = [0.0] * max(1, min(slots, len(durations)))
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free) if durations else 0.0


def _equal_shards_makespan(
    n_shards: int, full_s: float, last_s: float, slots: int, startup_s: float
) -> float:
    """Makespan of ``n_shards`` (all ``full_s`` long but the last, ``last_s``) on ``slots``, each
    slot paying ``startup_s`` once: shard i runs on slot i mod slots. O(slots), not O(shards)."""
    if n_shards <= 0:
        return 0.0
    s = max(1, min(slots, n_shards))
    last_slot = (n_shards - 1) % s
    span = 0.0
    for j in range(s):
        count = len(range(j, n_shards, s))
        has_last = j == last_slot
        span = max(span, startup_s + (count - has_last) * full_s + has_last * last_s)
    return span


def project(
    rows: int,
    shard_size: int,
    dl: DownloadMeasure,
    cf: CapFiltMeasure | None,
    pilot: Cluster,
    target: Cluster,
) -> tuple[dict[str, Any], list[str]]:
    """The full job's wall time, resource hours and bytes on ``target``, from the pilot's measures."""
    notes: list[str] = []
    n_shards = math.ceil(rows / shard_size)
    last_rows = rows - (n_shards - 1) * shard_size
    # The pilot ran its shards uncontended (at most one per core): target tasks slow down only
    # where the target's own logical CPUs outnumber its cores.
    busy = min(target.download_slots, n_shards)
    slowdown = target.slowdown(busy * target.download_cpus_per_task)
    t_row = dl.per_row_s() * slowdown
    # Where the cores are known (an embedded local Ray) the workers' start-ups (imports) are priced
    # one after another: four cold workers started at once on 2 shared cores took 4-5x one alone
    # (benchmarks/results/estimate.json), and Ray starts at most one worker per core at a time.
    startup = dl.startup_s() * (busy if target.cores is not None else 1.0)
    if dl.cold_shards >= len(dl.shard_rows):
        notes.append("download: no pilot shard ran on a warm worker, so its start-up is priced per row")
    planning = dl.planning_s(min(dl.cold_shards, len(dl.shard_rows)) or 1)
    span = _equal_shards_makespan(
        n_shards, shard_size * t_row, last_rows * t_row, target.download_slots, startup
    )
    dl_wall = planning + span
    images = rows * dl.success_rate
    task_s = rows * t_row + busy * startup
    out: dict[str, Any] = {
        "rows": rows,
        "shards": n_shards,
        "images": round(images),
        "download": {
            "wall_s": round(dl_wall, 1),
            "cpu_hours": round(task_s * target.download_cpus_per_task / 3600, 4),
            "gpu_hours": 0.0,
            "images_per_s": round(images / dl_wall, 2) if dl_wall > 0 else None,
        },
    }
    bytes_out: dict[str, int] = {"download_shards": round(rows * dl.shard_bytes / dl.rows) if dl.rows else 0}
    if cf is not None:
        rate, cf_startup, cf_notes = cf.rate_and_startup()
        notes += cf_notes
        scale = _actor_scale(pilot, target, notes)
        cf_rate = rate * scale / target.slowdown(target.capfilt_cpus) * pilot.slowdown(pilot.capfilt_cpus)
        cf_wall = cf_startup + (images / cf_rate if cf_rate > 0 else math.inf)  # inf rate: + 0
        texts_per_image = cf.texts / cf.images if cf.images else 0.0
        keep = cf.kept / cf.texts if cf.texts else 0.0
        texts = images * texts_per_image
        out["texts"] = round(texts)
        out["kept"] = round(texts * keep)
        out["capfilt"] = {
            "wall_s": round(cf_wall, 1),
            "cpu_hours": round(cf_wall * target.capfilt_cpus / 3600, 4),
            "gpu_hours": round(cf_wall * target.capfilt_gpus / 3600, 4),
            "images_per_s": _finite(cf_rate),
        }
        bytes_out["candidates"] = round(texts * cf.candidates_bytes / cf.texts) if cf.texts else 0
        if cf.kept:
            for mode, b in cf.cleaned_bytes.items():
                bytes_out[_cleaned_key(mode)] = round(texts * keep * b / cf.kept)
        else:
            # Nothing kept (random weights keep little): every text kept, each row its image and
            # about a candidate's bytes, as an upper bound.
            notes.append(
                "capfilt: the pilot kept no text; cleaned sizes are for every text kept (an upper bound)"
            )
            image_b = dl.image_bytes / dl.images if dl.images else 0.0
            per_text = cf.candidates_bytes / cf.texts if cf.texts else 0.0
            bytes_out[_cleaned_key("include")] = round(texts * (image_b + per_text))
            bytes_out[_cleaned_key("reference")] = round(texts * per_text)
    stages = [s for s in ("download", "capfilt") if s in out]
    wall = sum(out[s]["wall_s"] for s in stages)
    out["total"] = {
        "wall_s": round(wall, 1),
        "cpu_hours": round(sum(out[s]["cpu_hours"] for s in stages), 4),
        "gpu_hours": round(sum(out[s]["gpu_hours"] for s in stages), 4),
        "cluster_cpu_hours": round(wall * target.cpus / 3600, 4),
        "cluster_gpu_hours": round(wall * target.gpus / 3600, 4),
    }
    out["bytes"] = bytes_out
    return out, notes


def _cleaned_key(mode: str) -> str:
    return f"cleaned_images_{'included' if mode == 'include' else 'referenced'}"


def _actor_scale(pilot: Cluster, target: Cluster, notes: list[str]) -> float:
    """How much faster the target's CapFilt pools run than the pilot's: the bottleneck pool may be
    either, so the smaller of the two ratios."""
    scale = min(target.captioner_actors / pilot.captioner_actors, target.filter_actors / pilot.filter_actors)
    pilot_gpu, target_gpu = pilot.gpus_per_actor > 0, target.gpus_per_actor > 0
    if target_gpu and not pilot_gpu:
        notes.append(
            "capfilt: the pilot ran its models on CPU and the target on GPUs; the GPU time is priced at "
            "CPU speed (an upper bound, likely far above): run the pilot on one GPU node to price it"
        )
    elif pilot_gpu and not target_gpu:
        notes.append(
            "capfilt: the pilot ran on GPUs and the target has none; CPU time is priced at GPU speed"
        )
    elif pilot_gpu and target_gpu and target.gpus_per_actor != pilot.gpus_per_actor:
        scale *= target.gpus_per_actor / pilot.gpus_per_actor
        notes.append("capfilt: GPU shares per actor differ from the pilot's; scaled linearly")
    return scale


def rates(dl: DownloadMeasure, cf: CapFiltMeasure | None, pilot: Cluster) -> dict[str, Any]:
    """Images/s per stage and per resource, as the pilot ran."""
    shard_s = sum(dl.shard_wall_s)
    out: dict[str, Any] = {
        "download": {
            "images_per_s_per_task": round(dl.images / shard_s, 2) if shard_s else None,
            "images_per_cpu_s": round(dl.images / (shard_s * pilot.download_cpus_per_task), 2)
            if shard_s
            else None,
            "success_rate": round(dl.success_rate, 4),
            "bytes_per_row": round(dl.shard_bytes / dl.rows) if dl.rows else None,
        }
    }
    if cf is not None:
        rate, startup, _ = cf.rate_and_startup()
        out["capfilt"] = {
            "images_per_s": _finite(rate),
            "startup_s": round(startup, 1),
            "images_per_cpu_s": _finite(rate / pilot.capfilt_cpus) if pilot.capfilt_cpus else None,
            "images_per_gpu_s": _finite(rate / pilot.capfilt_gpus) if pilot.capfilt_gpus else None,
            "texts_per_image": round(cf.texts / cf.images, 3) if cf.images else None,
            "kept_fraction": round(cf.kept / cf.texts, 4) if cf.texts else None,
            "candidates_bytes_per_text": round(cf.candidates_bytes / cf.texts) if cf.texts else None,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Running the pilot.
# ---------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    recipe: str
    pilot_dir: str
    sample_shards: int
    input: dict[str, Any]
    models: dict[str, str]
    pilot_cluster: dict[str, Any]
    target_cluster: dict[str, Any]
    measured: dict[str, Any]
    rates: dict[str, Any]
    projection: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(json.loads(json.dumps(asdict(self), default=str)))

    def lines(self) -> list[str]:
        p = self.projection
        t = self.target_cluster
        out = [
            f"input:    {_n(p['rows'])} rows in {p['shards']} shards -> ~{_n(p['images'])} images "
            f"({self.rates['download']['success_rate']:.1%} downloaded in the pilot)",
            f"cluster:  {t['cpus']:g} CPUs, {t['gpus']:g} GPUs ({t['basis']})",
            "",
            f"{'stage':<10}{'wall':>10}{'images/s':>11}{'CPU-h':>10}{'GPU-h':>10}",
        ]
        for stage in ("download", "capfilt", "total"):
            if stage not in p:
                continue
            s = p[stage]
            ips = s.get("images_per_s")
            out.append(
                f"{stage:<10}{_duration(s['wall_s']):>10}{(f'{ips:.1f}' if ips else '-'):>11}"
                f"{s['cpu_hours']:>10.3g}{s['gpu_hours']:>10.3g}"
            )
        out.append("")
        for name, b in p["bytes"].items():
            out.append(f"{name.replace('_', ' '):<32}{_bytes(b):>10}")
        out += [f"note: {n}" for n in self.notes]
        return out


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "inf"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"  # pragma: no cover


def default_pilot_dir(recipe: Recipe) -> Path:
    out = Path(str(recipe.out))
    return out.with_name(out.name + PILOT_SUFFIX)


@contextlib.contextmanager
def _url_list(recipe: Recipe, pilot: Path) -> Iterator[tuple[Path, str, str | None, str | None]]:
    """(URL list, url_col, caption_col, input_format) of the recipe's input, the shapes world made
    and served from the pilot folder when the recipe makes one."""
    if recipe.has_world():
        from capfilt.stages.world import served_world
        from capfilt.world import make_world

        world_dir = pilot / "world"
        cfg = recipe.section("world")
        done = world_dir / "world.json"
        if not (done.is_file() and read_json(done).get("config") == cfg.model_dump()):
            log.info("making the recipe's shapes world in %s", world_dir)
            make_world(world_dir, cfg)
        with served_world(world_dir) as urls:
            yield urls, "url", "caption", None
        return
    if recipe.urls is None:
        raise ConfigError("the recipe has neither a 'urls:' section nor the 'world' stage: nothing to price")
    yield recipe.urls.path, recipe.urls.url_col, recipe.urls.caption_col, recipe.urls.input_format


def _finished_finetune(recipe: Recipe) -> dict[str, Any] | None:
    path = Path(str(recipe.out)) / STAGES_DIR / "finetune.json"
    if not path.is_file():
        return None
    manifest = read_json(path)
    return manifest.get("result") if manifest.get("status") == "done" else None


def pilot_models(recipe: Recipe, pilot: Path, download_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The captioner and filter the pilot runs, each the recipe's ``init.<role>``, else the run
    folder's finished fine-tune, else random weights of the recipe's architecture (the same cost
    per image). Returns run_capfilt's model arguments and a note per choice."""
    notes = []
    tuned = _finished_finetune(recipe)
    paths: dict[str, str | None] = {}
    tokenizer = recipe.init.tokenizer
    for role in ("captioner", "filter"):
        given = getattr(recipe.init, role)
        if given:
            paths[role] = given
            notes.append(f"{role}: init.{role} ({given})")
        elif tuned and role in tuned:
            paths[role] = tuned[role]["model_dir"]
            tokenizer = tokenizer or tuned[role].get("tokenizer_dir")
            notes.append(f"{role}: the fine-tuned one in {recipe.out}")
        else:
            paths[role] = None
    if None in paths.values():
        arch, made = _random_models(recipe, pilot / "_models", download_dir, tokenizer)
        for role in ("captioner", "filter"):
            if paths[role] is None:
                paths[role] = str(made[role])
                notes.append(
                    f"{role}: random weights of {arch} (same cost per image; a random captioner may "
                    "write to max_length, so caption time is an upper bound, and kept counts mean nothing)"
                )
    return {**paths, "tokenizer": tokenizer, "arch": recipe.init.arch}, notes


def _random_models(
    recipe: Recipe, root: Path, download_dir: Path, tokenizer: str | None
) -> tuple[str, dict[str, Path]]:
    """A random MED of the recipe's architecture exported as a captioner and a filter, with the
    recipe's tokenizer or a WordPiece trained on the pilot's texts."""
    from capfilt.core.text import pre_caption
    from capfilt.model import create_med, get_config
    from capfilt.model.hf import export_captioner, export_filter
    from capfilt.model.tokenizer import TokenIds, load_tokenizer, train_wordpiece

    section = recipe.section("pretrain")
    arch = recipe.init.arch or (section.model if section is not None else "med-tiny")
    cfg = get_config(arch)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        texts = [
            pre_caption(t or "")
            for f in sorted(download_dir.glob("[0-9]*.parquet"))
            for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()
        ]
        tok = train_wordpiece(texts, vocab_size=cfg.text.vocab_size)
    import torch

    torch.manual_seed(0)
    med = create_med(cfg.with_token_ids(TokenIds.from_tokenizer(tok))).eval()
    shutil.rmtree(root, ignore_errors=True)
    return arch, {
        "captioner": export_captioner(med, root / "captioner", tok),
        "filter": export_filter(med, root / "filter", tok),
    }


def _probe_input(download_dir: Path, probe_dir: Path, images: int) -> int:
    """A one-batch CapFilt input: the first ``images`` downloaded rows of the first pilot shard."""
    first = sorted(download_dir.glob("[0-9]*.parquet"))[0]
    table = pq.read_table(first)
    ok = table.filter(pc.equal(table.column("status"), "success")).slice(0, images)
    probe_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(ok, probe_dir / first.name, compression="zstd")
    return int(ok.num_rows)


def _dir_bytes(d: Path, pattern: str = "*.parquet") -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if not p.name.startswith(("_", ".")))


def _image_bytes(download_dir: Path) -> int:
    total = 0
    for f in sorted(download_dir.glob("[0-9]*.parquet")):
        lengths = pc.binary_length(pq.read_table(f, columns=["image"]).column("image"))
        total += int(pc.sum(lengths).as_py() or 0)
    return total


def _parquet_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return int(sink.getvalue().size)


def cleaned_bytes_both_ways(cleaned_dir: Path, mode: str) -> dict[str, int]:
    """Bytes of the cleaned shards as written (``mode``), and as they would be the other way: the
    other mode's files are written in memory, and scaled by written/in-memory of this mode."""
    on_disk = in_memory = other = 0
    for f in sorted(cleaned_dir.glob("[0-9]*.parquet")):  # web shards, not human-*
        table = pq.read_table(f)
        on_disk += f.stat().st_size
        in_memory += _parquet_bytes(table)
        other += _parquet_bytes(_with_images(table) if mode == "reference" else _without_images(table))
    other_mode = "include" if mode == "reference" else "reference"
    scaled = round(other * on_disk / in_memory) if in_memory else 0
    return {mode: on_disk, other_mode: scaled}


def _without_images(table: pa.Table) -> pa.Table:
    i = table.schema.get_field_index("image")
    return table.set_column(i, table.schema.field(i), pa.nulls(table.num_rows, table.schema.field(i).type))


def _with_images(table: pa.Table) -> pa.Table:
    """A referenced cleaned table with the image bytes copied back from the shards it references."""
    images: dict[str, bytes] = {}
    for ref in sorted({r for r in table.column("image_ref").to_pylist() if r and r.endswith(".parquet")}):
        src = pq.read_table(ref, columns=["uid", "image"])
        images.update(zip(src.column("uid").to_pylist(), src.column("image").to_pylist(), strict=True))
    i = table.schema.get_field_index("image")
    col = pa.array([images.get(u) for u in table.column("uid").to_pylist()], table.schema.field(i).type)
    return table.set_column(i, table.schema.field(i), col)


def _pilot_cluster(recipe: Recipe) -> Cluster:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
    local = not (recipe.ray_address or os.environ.get("RAY_ADDRESS"))
    cores = _cores() if local else None
    return cluster_of(recipe, cpus, gpus, cores if cores is not None and cores < cpus else None, "pilot")


def run_estimate(
    recipe: Recipe,
    sample_shards: int,
    out: str | Path | None = None,
    *,
    cpus: float | None = None,
    gpus: float | None = None,
    progress: bool = False,
) -> Estimate:
    """Run the recipe's download and CapFilt on ``sample_shards`` shards in a pilot folder (default
    ``<recipe.out>-pilot``; its download and CapFilt folders are made afresh), measure them and
    project the full input; the estimate is also written to ``<pilot>/estimate.json``."""
    from capfilt.pipeline.runner import fit_to_cluster
    from capfilt.stages.capfilt.driver import run_capfilt
    from capfilt.stages.download import STAGE as DOWNLOAD
    from capfilt.stages.download import run_download

    if sample_shards < 1:
        raise ConfigError(f"--sample-shards must be at least 1, got {sample_shards}")
    if "download" not in recipe.stages:
        raise ConfigError("the recipe has no 'download' stage: the estimate prices its download and CapFilt")
    pilot = Path(out) if out is not None else default_pilot_dir(recipe)
    if pilot.resolve() == Path(str(recipe.out)).resolve():
        raise ConfigError(f"the pilot folder {pilot} is the recipe's run folder; pass another --out")
    fitted, fit_notes = fit_to_cluster(recipe)  # starts or joins Ray, as `capfilt run` does
    pilot_res = _pilot_cluster(fitted)
    notes = list(fit_notes)
    dl_dir, cf_dir, probe = pilot / "download", pilot / "capfilt", pilot / "_probe"
    for d in (dl_dir, cf_dir, probe):
        shutil.rmtree(d, ignore_errors=True)
    pilot.mkdir(parents=True, exist_ok=True)
    dl_cfg = DOWNLOAD.effective(fitted)
    # Two waves of shards: the second runs on warm workers, which tells start-up from work; at
    # most one shard per core, so the pilot's shard times are uncontended.
    cores = pilot_res.cores or pilot_res.cpus
    concurrency = max(1, min(math.ceil(sample_shards / 2), int(cores / dl_cfg.cpus_per_task)))
    if dl_cfg.concurrency:
        concurrency = min(concurrency, dl_cfg.concurrency)
    with _url_list(fitted, pilot) as (urls, url_col, caption_col, fmt):
        rows = count_input_rows(urls, fmt)
        t0 = time.time()
        dl_sum = run_download(
            urls,
            dl_dir,
            dl_cfg.model_copy(update={"concurrency": concurrency}),
            url_col=url_col,
            caption_col=caption_col,
            input_format=fmt,
            ray_address=fitted.ray_address,
            progress=progress,
            max_shards=sample_shards,
        )
        dl_wall = time.time() - t0
    stats = sorted(read_shard_stats(dl_dir), key=lambda st: int(st["shard"]))
    if not stats:
        raise ConfigError(f"the pilot download wrote no shard (summary: {dl_sum.to_json()})")
    dl = DownloadMeasure(
        shard_rows=[int(st["rows_in"]) for st in stats],
        shard_images=[int(st["status_counts"].get("success", 0)) for st in stats],
        shard_wall_s=[float(st["wall_s"]) for st in stats],
        cold_shards=min(concurrency, len(stats)),
        wall_s=dl_wall,
        shard_bytes=_dir_bytes(dl_dir, "[0-9]*.parquet"),
        shard_size=int(dl_cfg.shard_size),
        image_bytes=_image_bytes(dl_dir),
    )
    cf: CapFiltMeasure | None = None
    models: dict[str, Any] = {}
    if "capfilt" in fitted.stages and dl.images:
        models, model_notes = pilot_models(fitted, pilot, dl_dir)
        notes += model_notes
        cf_cfg = fitted.section("capfilt")
        kwargs = {
            "captioner": models["captioner"],
            "filter": models["filter"],
            "cfg": cf_cfg,
            "ray_address": fitted.ray_address,
            "tokenizer": models["tokenizer"],
            "arch": models["arch"],
        }
        probe_images = _probe_input(dl_dir, probe / "data", cf_cfg.batch_size)
        t0 = time.time()
        run_capfilt(probe / "data", probe / "capfilt", **kwargs)
        probe_wall = time.time() - t0
        t0 = time.time()
        cf_sum = run_capfilt(dl_dir, cf_dir, max_shards=sample_shards, **kwargs)
        cf_wall = time.time() - t0
        cf = CapFiltMeasure(
            probe_images=probe_images,
            probe_wall_s=probe_wall,
            images=cf_sum.images,
            texts=sum(cf_sum.texts_considered.values()),
            kept=sum(cf_sum.kept.values()),
            wall_s=cf_wall,
            candidates_bytes=_dir_bytes(cf_dir / CANDIDATES_DIR),
            cleaned_bytes=cleaned_bytes_both_ways(cf_dir / CLEANED_DIR, cf_cfg.images),
            images_mode=cf_cfg.images,
        )
        notes.append("capfilt: human pairs (passed through unscored) are not priced")
    elif "capfilt" in fitted.stages:
        notes.append("capfilt: the pilot downloaded no image, so CapFilt is not priced")
    target, target_notes = target_cluster(fitted, pilot_res, cpus, gpus)
    notes += target_notes
    projection, proj_notes = project(rows, dl.shard_size, dl, cf, pilot_res, target)
    notes += proj_notes
    if dl.rows < rows and len(stats) < sample_shards:
        notes.append(f"the input has only {len(stats)} shard(s); the pilot ran them all")
    est = Estimate(
        recipe=recipe.name,
        pilot_dir=str(pilot),
        sample_shards=len(stats),
        input={"path": str(recipe.urls.path) if recipe.urls else "world", "rows": rows},
        models={k: str(v) for k, v in models.items() if v},
        pilot_cluster=asdict(pilot_res),
        target_cluster=asdict(target),
        measured={"download": asdict(dl), "capfilt": asdict(cf) if cf else None},
        rates=rates(dl, cf, pilot_res),
        projection=projection,
        notes=notes,
    )
    write_json_atomic(pilot / ESTIMATE_FILE, est.to_json())
    return est


# ---------------------------------------------------------------------------------------------
# Checking a projection: the same stages on the whole input, measured the same way.
# ---------------------------------------------------------------------------------------------


def run_full(recipe: Recipe, est: Estimate, out: str | Path) -> dict[str, Any]:
    """Download and CapFilt every shard of the recipe's input into ``out`` with the pilot's
    models and the recipe's settings (fitted to this cluster, as the pilot ran), and measure what
    the projection predicts: wall time per stage, counts and bytes on disk."""
    from capfilt.pipeline.runner import fit_to_cluster
    from capfilt.stages.capfilt.driver import run_capfilt
    from capfilt.stages.download import STAGE as DOWNLOAD
    from capfilt.stages.download import run_download

    out = Path(out)
    fitted, _ = fit_to_cluster(recipe)
    dl_dir, cf_dir = out / "download", out / "capfilt"
    for d in (dl_dir, cf_dir):
        shutil.rmtree(d, ignore_errors=True)
    with _url_list(fitted, Path(est.pilot_dir)) as (urls, url_col, caption_col, fmt):
        t0 = time.time()
        dl_sum = run_download(
            urls,
            dl_dir,
            DOWNLOAD.effective(fitted),
            url_col=url_col,
            caption_col=caption_col,
            input_format=fmt,
            ray_address=fitted.ray_address,
            progress=False,
        )
        dl_wall = time.time() - t0
    measured: dict[str, Any] = {
        "rows": dl_sum.rows_in,
        "shards": dl_sum.shards_total,
        "images": dl_sum.downloaded,
        "download": {"wall_s": round(dl_wall, 1)},
        "bytes": {"download_shards": _dir_bytes(dl_dir, "[0-9]*.parquet")},
    }
    if est.projection.get("capfilt") is not None:
        cf_cfg = fitted.section("capfilt")
        t0 = time.time()
        cf_sum = run_capfilt(
            dl_dir,
            cf_dir,
            captioner=est.models["captioner"],
            filter=est.models["filter"],
            cfg=cf_cfg,
            ray_address=fitted.ray_address,
            tokenizer=est.models.get("tokenizer"),
            arch=est.models.get("arch"),
        )
        cf_wall = time.time() - t0
        measured["texts"] = sum(cf_sum.texts_considered.values())
        measured["kept"] = sum(cf_sum.kept.values())
        measured["capfilt"] = {"wall_s": round(cf_wall, 1)}
        measured["bytes"]["candidates"] = _dir_bytes(cf_dir / CANDIDATES_DIR)
        measured["bytes"][_cleaned_key(cf_cfg.images)] = _dir_bytes(cf_dir / CLEANED_DIR, "[0-9]*.parquet")
    stages = [s for s in ("download", "capfilt") if s in measured]
    measured["total"] = {"wall_s": round(sum(measured[s]["wall_s"] for s in stages), 1)}
    return measured


def compare(projection: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
    """projected / measured for every figure both have (1.0: exact)."""
    out: dict[str, float] = {}
    for key in ("rows", "images", "texts", "kept"):
        if measured.get(key):
            out[key] = round(projection[key] / measured[key], 4)
    for stage in ("download", "capfilt", "total"):
        if stage in measured and measured[stage]["wall_s"]:
            out[f"{stage}_wall_s"] = round(projection[stage]["wall_s"] / measured[stage]["wall_s"], 4)
    for key, b in measured["bytes"].items():
        if b:
            out[f"bytes_{key}"] = round(projection["bytes"][key] / b, 4)
    return out
