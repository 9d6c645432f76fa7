"""Dedup against known truth: precision and recall of exact and semantic dedup on shapes worlds with
near duplicates, the default ``min_cosine`` chosen on one world and reported on another, rows
removed by the dedup stage, and the images (and seconds) dedup before captioning saves.

Run as ``python benchmarks/dedup.py --run DIR`` (a finished demo-like run: its fine-tuned
captioner and filter are used; a run that stopped after round 1 lends its pretrained model as
both) or ``--captioner DIR --filter DIR``. Writes
``benchmarks/results/dedup.json``.

- Worlds: ``--n-web`` web rows (3,000) with ``near_duplicate_rate`` 0.1 (the world's transforms:
  jpeg_quality 40-75, resize to 0.5-2x, crop of up to 6% a side, exact copy; each an even share,
  each under another URL and alt-text). ``--tune-seed`` (1) picks the default threshold,
  ``--report-seed`` (2) is reported; neither is the world the filter was trained on (seed 0).
  Each is served on 127.0.0.1 and downloaded with the download stage (its sha256 column).
- Embeddings: the filter's L2-normalised ITC image feature (what the filter actors write and the
  dedup-before pass computes: ``capfilt.stages.capfilt.embed.image_features``) and, for
  comparison, two cheaper-to-get-wrong alternatives: the ViT's [CLS] before ``vision_proj`` and
  the mean of its patch tokens.
- Truth: the world's side table (``duplicate_of``): each original and its near duplicates form
  one group. A removed image is a true positive when the image kept in its place is in its truth
  group; precision = TP / removed; recall = TP / sum over truth groups of (size - 1). Recall per
  transform: the share of (near duplicate, original) pairs that end in one found group.
- Exact dedup: sha256 groups alone. Semantic: faiss groups alone (``exact=False``), swept over
  ``min_cosine``. Combined (the stage's default): both.
- Before captioning (``--skip-capfilt`` leaves it out): CapFilt runs twice on the report world,
  plain and with ``dedup_before``; the dedup stage then runs on the plain run's cleaned shards
  (the filter actors' embeddings table, keepers by best ITM). Reported: images skipped, the
  summary's estimated seconds saved (the per-image cost of the pipeline times the images skipped)
  and the measured difference in wall time of the two runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "dedup.json"
log = logging.getLogger("dedup_benchmark")

SWEEP = (0.80, 0.85, 0.90, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995)
TRANSFORMS = ("jpeg_quality", "resize", "crop", "exact", "same_url")
PRECISION_GOAL, RECALL_GOAL = 0.95, 0.90
TUNE_PRECISION = 0.97  # the default is the lowest swept threshold at this precision on the tune world


# ------------------------------------------------------------------------------ truth + metrics


def truth_of(
    labels: list[dict[str, Any]], uid_of_row: dict[int, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(uid -> its truth group (the uid of the group's first row), near duplicate uid -> its
    transform) over the rows present in ``uid_of_row``; images of no group are absent. A group
    is an original and its near duplicates (``duplicate_of``), and rows that name the very same
    image file (the world's ``duplicate_url`` rows: one URL listed again with another text)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.get(i, i) != i:
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    present = [r for r in labels if r["row"] in uid_of_row]
    first_with_path: dict[str, int] = {}
    transform: dict[str, str] = {}
    for r in present:
        join(first_with_path.setdefault(r["path"], r["row"]), r["row"])
        if r["duplicate_of"] is not None and r["duplicate_of"] in uid_of_row:
            join(r["duplicate_of"], r["row"])
            transform[uid_of_row[r["row"]]] = r["duplicate_transform"].split(":")[0]
        elif r["bad_kind"] == "duplicate_url" and first_with_path[r["path"]] != r["row"]:
            transform[uid_of_row[r["row"]]] = "same_url"
    members: dict[int, list[int]] = {}
    for r in present:
        members.setdefault(root(r["row"]), []).append(r["row"])
    group = {uid_of_row[i]: uid_of_row[g] for g, rows in members.items() if len(rows) > 1 for i in rows}
    return group, {u: t for u, t in transform.items() if u in group}


def metrics(dups: list[dict[str, Any]], group: dict[str, str], transform: dict[str, str]) -> dict[str, Any]:
    """Precision, recall (and per transform) of removed images ``dups`` (uid, duplicate_of)
    against the truth groups, restricted to the images the truth was built on."""
    kept_for = {d["uid"]: d["duplicate_of"] for d in dups}
    tp = sum(
        1
        for d in dups
        if group.get(d["uid"]) is not None and group.get(d["uid"]) == group.get(d["duplicate_of"])
    )
    sizes = Counter(group.values())
    should = sum(n - 1 for n in sizes.values())
    found: Counter[str] = Counter()
    total: Counter[str] = Counter(transform.values())
    for u, t in transform.items():
        original = group[u]  # a group's first row: an original comes before its copies
        if kept_for.get(u, u) == kept_for.get(original, original):
            found[t] += 1
    return {
        "removed": len(dups),
        "true_positives": tp,
        "true_duplicates": should,
        "precision": round(tp / len(dups), 4) if dups else None,
        "recall": round(tp / should, 4) if should else None,
        "pair_recall_by_transform": {t: round(found[t] / total[t], 4) for t in TRANSFORMS if total[t]},
    }


# ------------------------------------------------------------------------------ worlds + embeddings


def make_downloaded_world(root: Path, seed: int, n_web: int, rate: float) -> dict[str, Any]:
    """A world with near duplicates, served and downloaded; its images, labels and shards."""
    import pyarrow.parquet as pq

    from capfilt.stages.download import DownloadConfig, read_samples, run_download
    from capfilt.world import WorldConfig, WorldServer, make_world, write_url_list

    world = root / f"world-{seed}-{n_web}-{rate:g}"
    dl = root / f"download-{seed}-{n_web}-{rate:g}"
    if not (dl / "_summary.json").is_file():  # else made by an earlier run with this --work
        make_world(
            world, WorldConfig(seed=seed, n_web=n_web, n_human=20, n_test=20, near_duplicate_rate=rate)
        )
        cfg = DownloadConfig(
            image_size=64,
            shard_size=500,
            thread_count=16,
            timeout=5,
            source="shapes",
            url_policy="allow_loopback",
        )
        with WorldServer(world) as server:
            urls = write_url_list(world, server.base_url, world / "urls.parquet")
            run_download(urls, dl, cfg, progress=False)
    samples = read_samples(dl, ["uid", "row", "status", "sha256", "image"])
    ok = [r for r in samples.to_pylist() if r["status"] == "success"]
    labels = pq.read_table(world / "web_labels.parquet").to_pylist()
    return {"world": world, "download": dl, "images": ok, "labels": labels}


def embeddings(
    filter_dir: str, images: list[dict[str, Any]], tokenizer: str | None = None
) -> dict[str, np.ndarray]:
    """The filter's ITC image features, its ViT's [CLS] and its mean patch token, L2-normalised,
    float16-rounded as the embeddings table stores them, [n, d] each."""
    import torch

    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.embed import image_features
    from capfilt.stages.capfilt.models import load_model, resolve_model
    from capfilt.stages.capfilt.pixels import pixel_column, pixel_values, preprocess_batch

    ref = resolve_model(filter_dir, "filter", tokenizer)
    med = load_model(ref, "filter", CapFiltConfig(dtype="float32"), device="cpu")
    out: dict[str, list[np.ndarray]] = {"itc": [], "vit_cls": [], "vit_mean_patch": [], "thumbnail": []}
    for i in range(0, len(images), 128):
        chunk = images[i : i + 128]
        raw = {
            "uid": np.asarray([r["uid"] for r in chunk], dtype=object),
            "text": np.asarray([""] * len(chunk), dtype=object),
            "image": np.asarray([r["image"] for r in chunk], dtype=object),
        }
        pixels = preprocess_batch(raw, [ref.image_size])[pixel_column(ref.image_size)]
        out["itc"].append(image_features(med, pixels))
        # No model at all: a 16x16 colour thumbnail, centred per image so the cosine compares the
        # picture's layout rather than its mean colour.
        thumbs = pixels.reshape(len(chunk), 16, pixels.shape[1] // 16, 16, pixels.shape[2] // 16, 3)
        flat = thumbs.mean(axis=(2, 4)).reshape(len(chunk), -1)
        flat = flat - flat.mean(axis=1, keepdims=True)
        out["thumbnail"].append(flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12))
        with torch.inference_mode():
            h = med.encode_image(pixel_values(pixels))  # [B, 1+P, Dv]
            out["vit_cls"].append(torch.nn.functional.normalize(h[:, 0], dim=-1).numpy())
            out["vit_mean_patch"].append(torch.nn.functional.normalize(h[:, 1:].mean(1), dim=-1).numpy())
    return {k: np.concatenate(v).astype(np.float16).astype(np.float32) for k, v in out.items()}


def _dups(
    images: list[dict[str, Any]], vectors: np.ndarray | None, min_cosine: float, **kw: Any
) -> list[dict[str, Any]]:
    import pyarrow as pa

    from capfilt.stages.dedup import find_duplicates

    n = len(images)
    table = pa.table(
        {
            "uid": [r["uid"] for r in images],
            "sha256": [r["sha256"] for r in images],
            "embedding": pa.array(
                list(vectors) if vectors is not None else [None] * n, pa.list_(pa.float32())
            ),
        }
    )
    return find_duplicates(table, min_cosine, **kw).to_pylist()  # type: ignore[no-any-return]


def evaluate_world(w: dict[str, Any], models: dict[str, str], default: float) -> dict[str, Any]:
    images = sorted(w["images"], key=lambda r: r["row"])  # keepers: the first by input row
    group, transform = truth_of(w["labels"], {r["row"]: r["uid"] for r in images})
    t0 = time.time()
    emb = embeddings(models["filter"], images, models.get("tokenizer"))
    embed_s = time.time() - t0
    out: dict[str, Any] = {
        "images": len(images),
        "true_groups": len(set(group.values())),
        "true_duplicates_by_transform": dict(Counter(transform.values())),
        "embed_s_in_process": round(embed_s, 2),
        "exact": metrics(_dups(images, None, 1.0, near=False), group, transform),
        "combined_itc_at_default": metrics(_dups(images, emb["itc"], default), group, transform),
    }
    for kind, vectors in emb.items():
        sweep = {}
        for c in SWEEP:
            t1 = time.time()
            m = metrics(_dups(images, vectors, c, exact=False), group, transform)
            m["search_s"] = round(time.time() - t1, 3)
            sweep[f"{c:g}"] = m
        out[f"semantic_{kind}"] = sweep
    log.info("world %s: %d images, %d true duplicates", w["world"].name, len(images), len(transform))
    return out


def choose_threshold(sweep: dict[str, dict[str, Any]]) -> tuple[float, str]:
    """The lowest swept min_cosine whose precision reaches TUNE_PRECISION (most recall at that);
    when none does, the one of the best F1. Returns it and which rule chose it."""
    ok = [float(c) for c, m in sweep.items() if (m["precision"] or 0.0) >= TUNE_PRECISION]
    if ok:
        return min(ok), f"lowest with precision >= {TUNE_PRECISION}"

    def f1(m: dict[str, Any]) -> float:
        p, r = m["precision"] or 0.0, m["recall"] or 0.0
        return 2 * p * r / (p + r) if p + r else 0.0

    best = max(sweep, key=lambda c: (f1(sweep[c]), float(c)))
    return float(best), f"no threshold reaches precision {TUNE_PRECISION}: the best F1"


# ------------------------------------------------------------------------------ CapFilt runs


def capfilt_runs(w: dict[str, Any], models: dict[str, str], root: Path, min_cosine: float) -> dict[str, Any]:
    """CapFilt plain, then the dedup stage on it; CapFilt with dedup_before. Counts and seconds."""
    import pyarrow.parquet as pq

    from capfilt.core import schema as S
    from capfilt.core.layout import CLEANED_DIR, REMOVED_DIR
    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.driver import run_capfilt
    from capfilt.stages.dedup import DedupConfig, run_dedup

    cfg = CapFiltConfig(batch_size=64)  # the demo's CapFilt section
    kw = {"captioner": models["captioner"], "filter": models["filter"], "tokenizer": models.get("tokenizer")}
    t0 = time.time()
    plain = run_capfilt(w["download"], root / "capfilt", cfg=cfg, **kw)
    plain_s = time.time() - t0
    stage = run_dedup(root / "capfilt", w["download"], root / "dedup", DedupConfig(min_cosine=min_cosine))
    images = {r["uid"]: r for r in w["images"]}
    cleaned = set(pq.read_table(root / "capfilt" / CLEANED_DIR, schema=S.CLEANED).column("uid").to_pylist())
    group, transform = truth_of(w["labels"], {r["row"]: u for u, r in images.items() if u in cleaned})
    removed = pq.read_table(root / "dedup" / REMOVED_DIR, schema=S.REMOVED).to_pylist()
    by_image = list({r["uid"]: r for r in removed}.values())
    t0 = time.time()
    before_cfg = cfg.model_copy(update={"dedup_before": True, "dedup_min_cosine": min_cosine})
    before = run_capfilt(w["download"], root / "capfilt-before", cfg=before_cfg, **kw)
    before_s = time.time() - t0
    figures = before.extra["dedup_before"]
    skipped = pq.read_table(root / "capfilt-before" / REMOVED_DIR, schema=S.REMOVED).to_pylist()
    g_all, t_all = truth_of(w["labels"], {r["row"]: u for u, r in images.items()})
    return {
        "capfilt_config": {"batch_size": cfg.batch_size, "k": cfg.k},
        "dedup_stage": {
            **{
                k: stage[k]
                for k in ("images_in", "images_removed", "images_removed_exact", "images_removed_near")
            },
            **{
                k: stage[k]
                for k in ("rows_in", "rows_out", "rows_removed", "min_cosine", "search_s", "wall_s")
            },
            "vs_truth_on_cleaned_images": metrics(by_image, group, transform),
        },
        "dedup_before": {
            "images": plain.images,
            "images_skipped": figures["images_skipped"],
            "images_skipped_exact": figures["images_skipped_exact"],
            "images_skipped_near": figures["images_skipped_near"],
            "vs_truth": metrics(skipped, g_all, t_all),
            "embed_pass_s": figures["embed_pass_s"],
            "estimated_seconds_saved": figures["seconds_saved"],
            "estimated_net_seconds_saved": figures["net_seconds_saved"],
            "seconds_per_image": figures["seconds_per_image"],
            "capfilt_wall_s_plain": round(plain_s, 2),
            "capfilt_wall_s_dedup_before": round(before_s, 2),
            "measured_seconds_saved": round(plain_s - before_s, 2),
            "texts_considered_plain": sum(plain.texts_considered.values()),
            "texts_considered_dedup_before": sum(before.texts_considered.values()),
        },
    }


# ------------------------------------------------------------------------------ main


def _models(args: argparse.Namespace) -> dict[str, str]:
    if args.run:
        stages = Path(args.run) / "_stages"
        if not (stages / "finetune.json").is_file():  # a run that stopped after round 1: its model for both
            r1 = json.loads((stages / "pretrain.json").read_text())["result"]
            return {"captioner": r1["model_dir"], "filter": r1["model_dir"], "tokenizer": r1["tokenizer_dir"]}
        tuned = json.loads((stages / "finetune.json").read_text())["result"]
        return {
            "captioner": tuned["captioner"]["model_dir"],
            "filter": tuned["filter"]["model_dir"],
            "tokenizer": tuned["captioner"]["tokenizer_dir"],
        }
    if not (args.captioner and args.filter):
        raise SystemExit("pass --run DIR (a finished demo-like run) or --captioner DIR --filter DIR")
    return {"captioner": args.captioner, "filter": args.filter}


def main() -> None:
    from capfilt.core.cluster import ensure_ray
    from capfilt.eval.dedup import DEFAULT_MIN_COSINE
    from capfilt.stages.capfilt.models import model_id

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a finished demo-like run folder: its fine-tuned captioner and filter")
    p.add_argument("--captioner")
    p.add_argument("--filter")
    p.add_argument("--n-web", type=int, default=3000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--tune-seed", type=int, default=1)
    p.add_argument("--report-seed", type=int, default=2)
    p.add_argument(
        "--skip-capfilt", action="store_true", help="leave out the CapFilt runs (before captioning)"
    )
    p.add_argument("--capfilt-n-web", type=int, help="web rows of the report-seed world CapFilt runs on")
    p.add_argument("--work", help="a folder for the worlds and runs (default: a temp folder)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    models = _models(args)
    ensure_ray(None)
    work = Path(args.work or tempfile.mkdtemp(prefix="dedup-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tune = make_downloaded_world(work, args.tune_seed, args.n_web, args.rate)
    tune_eval = evaluate_world(tune, models, DEFAULT_MIN_COSINE)
    chosen = {
        k[len("semantic_") :]: choose_threshold(v) for k, v in tune_eval.items() if k.startswith("semantic_")
    }
    report = make_downloaded_world(work, args.report_seed, args.n_web, args.rate)
    report_eval = evaluate_world(report, models, DEFAULT_MIN_COSINE)
    at_default = report_eval["semantic_itc"].get(f"{DEFAULT_MIN_COSINE:g}")
    if at_default is None:
        raise SystemExit(f"add the default min_cosine {DEFAULT_MIN_COSINE} to SWEEP")
    result: dict[str, Any] = {
        "filter": {"path": models["filter"], "model_id": model_id(Path(models["filter"]))},
        "worlds": {
            "n_web": args.n_web,
            "near_duplicate_rate": args.rate,
            "tune_seed": args.tune_seed,
            "report_seed": args.report_seed,
        },
        "default_min_cosine": DEFAULT_MIN_COSINE,
        "chosen_on_tune_world": chosen,
        "tune_rule": f"lowest swept min_cosine with precision >= {TUNE_PRECISION} on the tune world, else best F1",
        "report_world_at_each_kinds_tuned_threshold": {
            kind: {"min_cosine": c, **report_eval[f"semantic_{kind}"][f"{c:g}"]}
            for kind, (c, _) in chosen.items()
        },
        "goal": {"precision": PRECISION_GOAL, "recall": RECALL_GOAL},
        "report_world": {
            "exact": report_eval["exact"],
            "semantic_itc_at_default": at_default,
            "semantic_meets_goal": bool(
                (at_default["precision"] or 0) >= PRECISION_GOAL
                and (at_default["recall"] or 0) >= RECALL_GOAL
            ),
            "combined_itc_at_default": report_eval["combined_itc_at_default"],
        },
        "tune_world": tune_eval,
        "report_world_sweeps": report_eval,
    }
    if not args.skip_capfilt:
        n = args.capfilt_n_web or args.n_web
        world = report if n == args.n_web else make_downloaded_world(work, args.report_seed, n, args.rate)
        result["capfilt"] = {
            "n_web": n,
            **capfilt_runs(world, models, work / f"runs-{n}", DEFAULT_MIN_COSINE),
        }
    result["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
