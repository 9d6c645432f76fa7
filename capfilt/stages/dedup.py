"""The ``dedup`` stage: take exact and near duplicate images out of CapFilt's cleaned shards, so the
next pretraining round does not see one picture under many URLs.

- **Exact**: the same image bytes (the download's ``sha256``) under different URLs.
- **Near**: the filter's ITC image embeddings (``capfilt/embeddings/``) within ``min_cosine`` of
  each other, found with faiss (``capfilt.eval.dedup``: flat, IVF for large runs, GPU when present)
  and joined transitively.

Both join one group structure; each group keeps its best image by the best ITM score of its kept
texts (ties: the earliest input row), and every other image's rows leave ``cleaned/`` for
``removed/`` with the reason, the uid kept in their place and the cosine of the two embeddings.
Nothing is lost: rows in = rows in ``dedup/cleaned/`` + rows in ``dedup/removed/``.

``find_duplicates`` is the pure core (a table of images in, the removed images out); CapFilt's
``dedup_before`` uses it too. The driver gathers only uid, sha256, row, score and embedding
columns; each shard is rewritten by a Ray task (``write_dedup_shard``), its stats written last.

Output layout of ``dedup/``::

    cleaned/NNNNN.parquet    CLEANED: capfilt/cleaned/NNNNN minus the removed images' rows
    removed/NNNNN.parquet    REMOVED: those rows, with reason, duplicate_of, cosine
    _stats/NNNNN.json        per shard, written last: the shard is done
    _summary.json            counts (what the CLI prints)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from capfilt.core import fs
from capfilt.core import schema as S
from capfilt.core.errors import ConfigError
from capfilt.core.fs import Location
from capfilt.core.layout import CLEANED_DIR, EMBEDDINGS_DIR, MANIFEST, REMOVED_DIR, STATS_DIR, SUMMARY
from capfilt.core.shards import read_json, write_json_atomic, write_parquet_atomic
from capfilt.core.stage import Section, Stage, StageContext, StageDir, StageStatus, readable
from capfilt.eval.dedup import DEFAULT_MIN_COSINE

log = logging.getLogger(__name__)

NAME = "dedup"
MOST_REMOVED = 0.5  # removing more than this share of the images is logged as a likely bad embedding

#: What ``find_duplicates`` returns: one row per removed image.
DUPLICATES = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # one of S.DEDUP_REASONS
        pa.field("duplicate_of", pa.string(), nullable=False),  # uid of the image kept instead
        pa.field("cosine", pa.float32()),
    ]
)


class DedupConfig(BaseModel):
    """Options of the dedup stage."""

    model_config = ConfigDict(extra="forbid")

    min_cosine: float = Field(DEFAULT_MIN_COSINE, ge=-1, le=1)  # near duplicates: cosine >= this
    exact: bool = True  # identical bytes (sha256)
    near: bool = True  # embeddings within min_cosine
    k: int = Field(8, ge=2)  # neighbours faiss returns per image (itself included)
    ivf_from: int = Field(50_000, ge=1)  # an IVF index from this many images up, flat below
    use_gpu: bool | None = None  # None: faiss's GPU when it has one
    num_cpus: float = Field(1.0, gt=0)  # per shard writer task


# ----------------------------------------------------------------------------- the pure core


def find_duplicates(
    images: pa.Table,
    min_cosine: float,
    *,
    exact: bool = True,
    near: bool = True,
    k: int = 8,
    ivf_from: int = 50_000,
    use_gpu: bool | None = None,
) -> pa.Table:
    """The duplicates among ``images`` (columns ``uid``, ``sha256``, ``embedding`` (list<float>,
    null where an image has none) and optionally ``score``; their order breaks ties): exact groups
    by sha256 and near groups by cosine >= ``min_cosine`` joined into one grouping, the best
    member of each kept (highest score, then first), every other member returned (``DUPLICATES``):
    reason ``exact_duplicate`` when its bytes are the kept image's, else ``near_duplicate``."""
    from capfilt.eval.dedup import exact_groups, keepers, merge_groups, near_groups
    from capfilt.stages.capfilt.embed import vectors_of

    n = images.num_rows
    uids = images.column("uid").to_pylist()
    sha = images.column("sha256").to_pylist() if "sha256" in images.column_names else [None] * n
    scores = images.column("score").to_pylist() if "score" in images.column_names else None
    with_vector = np.flatnonzero(images.column("embedding").is_valid().to_numpy(zero_copy_only=False))
    vectors = vectors_of(images.column("embedding").take(pa.array(with_vector, pa.int64())))
    groups_exact = exact_groups(sha) if exact else []
    groups_near: list[list[int]] = []
    if near and len(with_vector) > 1:
        found = near_groups(vectors, min_cosine, k=k, ivf_from=ivf_from, use_gpu=use_gpu)
        groups_near = [[int(with_vector[j]) for j in g] for g in found]
    kept_for = keepers(merge_groups(n, groups_exact, groups_near), scores)
    at = {int(i): j for j, i in enumerate(with_vector)}  # image position -> its row in `vectors`
    norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12) if len(vectors) else np.zeros(0)
    rows: dict[str, list[Any]] = {name: [] for name in DUPLICATES.names}
    for i, best in sorted(kept_for.items()):
        same_bytes = sha[i] is not None and sha[i] == sha[best]
        cosine = None
        if i in at and best in at:
            a, b = at[i], at[best]
            cosine = float(vectors[a] @ vectors[b] / (norms[a] * norms[b]))
        rows["uid"].append(uids[i])
        rows["reason"].append(S.EXACT_DUPLICATE if same_bytes else S.NEAR_DUPLICATE)
        rows["duplicate_of"].append(uids[best])
        rows["cosine"].append(cosine)
    return pa.table(rows, schema=DUPLICATES)


def removed_rows(rows: pa.Table, duplicates: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(CLEANED rows kept, REMOVED rows) of a cleaned shard, given the removed images."""
    meta = rows.schema.metadata  # images="reference" shards say so in their schema metadata
    gone = pc.is_in(rows.column("uid"), duplicates.column("uid"))
    kept = S.conform(rows.filter(pc.invert(gone)), S.CLEANED).replace_schema_metadata(meta)
    out = rows.filter(gone)
    index = {u: i for i, u in enumerate(duplicates.column("uid").to_pylist())}
    info = duplicates.take(pa.array([index[u] for u in out.column("uid").to_pylist()], pa.int64()))
    for name in ("reason", "duplicate_of", "cosine"):
        out = out.append_column(name, info.column(name))
    return kept, S.conform(out, S.REMOVED).replace_schema_metadata(meta)


# ----------------------------------------------------------------------------- the driver


def _shards(d: Location) -> list[Location]:
    """The Parquet shards of a folder (none if it is absent), bookkeeping and temp names skipped."""
    if not d.exists():
        return []
    return sorted((p for p in d.glob("*.parquet") if not p.name.startswith(("_", "."))), key=str)


def _cleaned_files(capfilt_dir: Location) -> list[Location]:
    d = capfilt_dir / CLEANED_DIR
    files = _shards(d)
    if not files:
        raise ConfigError(f"{d} holds no cleaned shards; run the capfilt stage (with a filter) first")
    return files


def _is_web(name: str) -> bool:
    from capfilt.stages.capfilt.human import HUMAN_PREFIX

    return not name.startswith(HUMAN_PREFIX)


def gather_images(capfilt_dir: Location, download_dir: Location) -> tuple[pa.Table, dict[str, str]]:
    """The web images of the cleaned shards as ``find_duplicates`` takes them (uid, sha256,
    embedding, score: the best ITM of its kept texts), in input row order, and each image's shard.
    Reads uid, score, hash and embedding columns only: never an image or a text."""
    shard_of: dict[str, str] = {}
    scores: dict[str, float | None] = {}
    for f in _cleaned_files(capfilt_dir):
        if not _is_web(f.stem):
            continue
        t = fs.read_parquet(f, columns=["uid", "itm_score"])
        best = t.group_by("uid").aggregate([("itm_score", "max")])
        for u, s in zip(
            best.column("uid").to_pylist(), best.column("itm_score_max").to_pylist(), strict=True
        ):
            shard_of[u], scores[u] = f.stem, s
    wanted = pa.array(sorted(shard_of), pa.string())
    sha: dict[str, str | None] = {}
    order: dict[str, tuple[int, str]] = {}
    for f in _shards(download_dir):
        t = fs.read_parquet(f, columns=["uid", "row", "sha256"])
        t = t.filter(pc.is_in(t.column("uid"), wanted))
        for u, r, h in zip(*(t.column(c).to_pylist() for c in ("uid", "row", "sha256")), strict=True):
            sha[u], order[u] = h, (r, f.stem)
    vectors: dict[str, Any] = {}
    models: set[str] = set()
    for f in _shards(capfilt_dir / EMBEDDINGS_DIR):
        t = fs.read_parquet(f)
        t = t.filter(pc.is_in(t.column("uid"), wanted))
        models.update(t.column("model_id").unique().to_pylist())
        vectors.update(zip(t.column("uid").to_pylist(), t.column("embedding").to_pylist(), strict=True))
    uids = sorted(shard_of, key=lambda u: (order.get(u, (1 << 62, "")), u))
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "sha256": pa.array([sha.get(u) for u in uids], pa.string()),
            "embedding": pa.array([vectors.get(u) for u in uids], pa.list_(pa.float32())),
            "score": pa.array([scores[u] for u in uids], pa.float32()),
        }
    )
    return table.replace_schema_metadata({b"embedding_models": ",".join(sorted(models)).encode()}), shard_of


def write_dedup_shard(src: Location, out: Location, duplicates: pa.Table) -> dict[str, Any]:
    """Ray task: one cleaned shard rewritten without the ``duplicates`` images (``cleaned/``) and
    their rows in ``removed/``, then its stats (last: the shard is done). Returns the stats."""
    rows = fs.read_parquet(src)
    kept, removed = removed_rows(rows, duplicates)
    write_parquet_atomic(out / CLEANED_DIR / src.name, kept)
    write_parquet_atomic(out / REMOVED_DIR / src.name, removed)
    stats = {
        "stage": NAME,
        "shard": src.stem,
        "rows_in": rows.num_rows,
        "rows_out": kept.num_rows,
        "rows_removed": removed.num_rows,
        "images_removed": len(set(removed.column("uid").to_pylist())),
        "reason_counts": dict(Counter(removed.column("reason").to_pylist()).most_common()),
    }
    write_json_atomic(out / STATS_DIR / f"{src.stem}.json", stats)
    return stats


def _check_manifest(out: Location, manifest: dict[str, Any]) -> None:
    path = out / MANIFEST
    if path.exists():
        if read_json(path) != manifest:
            raise ConfigError(f"{out} holds a dedup run of other inputs or settings; pass a new folder")
    elif out.exists() and any(True for _ in out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no dedup run; pass a new or empty folder")
    write_json_atomic(path, manifest)


def run_dedup(
    capfilt_dir: str | Path | fs.RemotePath,
    download_dir: str | Path | fs.RemotePath,
    out: str | Path | fs.RemotePath,
    cfg: DedupConfig | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Dedup the cleaned shards of a CapFilt folder into ``out`` (resuming: shards with stats are
    skipped). Returns the summary, also written to ``out/_summary.json``."""
    import ray

    from capfilt.core.cluster import ensure_ray

    cfg = cfg or DedupConfig()
    t0 = time.time()
    cdir, ddir, odir = fs.location(capfilt_dir), fs.location(download_dir), fs.location(out)
    files = _cleaned_files(cdir)
    odir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": NAME,
        "capfilt": str(cdir.resolve()),
        "download": str(ddir.resolve()),
        "shards": [f.stem for f in files],
        "config": cfg.model_dump(),
    }
    _check_manifest(odir, manifest)
    images, shard_of = gather_images(cdir, ddir)
    no_vector = images.num_rows - int(pc.sum(images.column("embedding").is_valid()).as_py() or 0)
    if cfg.near and no_vector:
        log.warning(
            "%d of %d images have no embedding in %s (a CapFilt run of an older version?): only "
            "exact duplicates are found among them",
            no_vector,
            images.num_rows,
            cdir / EMBEDDINGS_DIR,
        )
    t1 = time.time()
    dups = find_duplicates(
        images,
        cfg.min_cosine,
        exact=cfg.exact,
        near=cfg.near,
        k=cfg.k,
        ivf_from=cfg.ivf_from,
        use_gpu=cfg.use_gpu,
    )
    search_s = time.time() - t1
    by_shard: dict[str, list[int]] = {}
    for i, u in enumerate(dups.column("uid").to_pylist()):
        by_shard.setdefault(shard_of[u], []).append(i)
    todo = [f for f in files if not (odir / STATS_DIR / f"{f.stem}.json").is_file()]
    log.info("dedup: %d shards (%d already done)", len(files), len(files) - len(todo))
    if todo:
        ensure_ray(ray_address)
        task = ray.remote(write_dedup_shard).options(num_cpus=cfg.num_cpus)
        refs = [task.remote(f, odir, dups.take(pa.array(by_shard.get(f.stem, []), pa.int64()))) for f in todo]
        ray.get(refs)
    stats = [read_json(odir / STATS_DIR / f"{f.stem}.json") for f in files]
    reasons = Counter(dups.column("reason").to_pylist())
    summary = {
        "images_in": images.num_rows,
        "images_removed": dups.num_rows,
        "images_removed_exact": reasons.get(S.EXACT_DUPLICATE, 0),
        "images_removed_near": reasons.get(S.NEAR_DUPLICATE, 0),
        "images_without_embedding": no_vector,
        "rows_in": sum(s["rows_in"] for s in stats),
        "rows_out": sum(s["rows_out"] for s in stats),
        "rows_removed": sum(s["rows_removed"] for s in stats),
        "min_cosine": cfg.min_cosine,
        "embedding_models": (images.schema.metadata or {}).get(b"embedding_models", b"").decode(),
        "search_s": round(search_s, 3),
        "shards": len(files),
        "wall_s": round(time.time() - t0, 3),
        "out_dir": str(odir),
    }
    if images.num_rows and dups.num_rows > MOST_REMOVED * images.num_rows:
        log.warning(
            "dedup removes %d of %d images: embeddings this alike suggest a filter that does not tell "
            "images apart (undertrained?); check it, or raise dedup.min_cosine (now %s)",
            dups.num_rows,
            images.num_rows,
            cfg.min_cosine,
        )
    if summary["rows_in"] != summary["rows_out"] + summary["rows_removed"]:
        raise RuntimeError(f"dedup lost rows: {summary}")
    write_json_atomic(odir / SUMMARY, summary)
    log.info(
        "dedup: %d of %d images removed (%d exact, %d near at cosine >= %s); %d of %d rows kept",
        summary["images_removed"],
        summary["images_in"],
        summary["images_removed_exact"],
        summary["images_removed_near"],
        cfg.min_cosine,
        summary["rows_out"],
        summary["rows_in"],
    )
    return summary


# ----------------------------------------------------------------------------- the stage


class DedupStage(Stage):
    name = NAME
    help = "take exact (sha256) and near (faiss on the filter's embeddings) duplicate images out of cleaned/"
    sections: ClassVar[Mapping[str, Section]] = {
        "dedup": Section(DedupConfig, default_factory=DedupConfig, help="min_cosine, exact, near, faiss")
    }
    # Opt-in: its threshold fits a trained filter's embeddings (an undertrained one embeds every
    # image alike), so a recipe names it in its stages.
    by_default = False

    def check(self, recipe: Any, check_paths: bool) -> None:
        stages = list(recipe.stages)
        for before in ("capfilt",):
            if before in stages and stages.index(before) > stages.index(NAME):
                raise ValueError(f"stages: list {NAME} after {before}: it dedups {before}'s cleaned shards")
        if "pretrain2" in stages and stages.index("pretrain2") < stages.index(NAME):
            raise ValueError(f"stages: list {NAME} before pretrain2, which trains on {NAME}/cleaned")

    def upstream(self, recipe: Any) -> list[str]:
        return ["download", "capfilt"]

    def uses_ray(self, recipe: Any) -> bool:
        return True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return run_dedup(
            ctx.run.dir("capfilt"),
            ctx.run.dir("download"),
            ctx.dir,
            self.config(ctx.recipe),
            ctx.recipe.ray_address,
        )

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        return [
            f"images removed {readable(result.get('images_removed'))} of {readable(result.get('images_in'))} "
            f"(exact {readable(result.get('images_removed_exact'))}, near {readable(result.get('images_removed_near'))} "
            f"at cosine >= {readable(result.get('min_cosine'))})",
            f"rows kept {readable(result.get('rows_out'))} of {readable(result.get('rows_in'))}, "
            f"{readable(result.get('rows_removed'))} in removed/",
        ]

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        stats = [read_json(p) for p in (d / STATS_DIR).glob("*.json")] if (d / STATS_DIR).exists() else []
        st.shards_done = len(stats)
        if (d / MANIFEST).is_file():
            st.shards_total = len(read_json(d / MANIFEST).get("shards", []))
        rows_in = sum(s["rows_in"] for s in stats)
        removed = sum(s["rows_removed"] for s in stats)
        st.rows = {"rows": rows_in, "removed": removed}
        if stats:
            st.progress = f"removed {removed} of {rows_in} rows"
        return st


STAGE = DedupStage()
