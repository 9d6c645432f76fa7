"""Pretraining throughput of med-tiny on CPU: samples/s through Ray Train with 1 and 2 workers, and
where one step's time goes (vision pass, the three text passes, momentum encoders, optimizer).

Run as `python benchmarks/pretrain.py` inside the project's .venv. A shapes world is served on
127.0.0.1 and downloaded with capfilt's download stage, then pretrained for a few log windows per
worker count; samples/s is the median of the windows after the first (the first holds worker and
data-pipeline start-up). The split is measured in-process without Ray: each part runs forward and
backward on its own, timed with perf_counter, median over repeats; `full_step_ms` is one real
`train_step` for comparison. Results go to benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "pretrain.json"


def _download(root: Path, n_web: int) -> Path:
    from capfilt.stages.download import DownloadConfig, run_download
    from capfilt.world import WorldConfig, WorldServer, make_world, write_url_list

    world = root / "world"
    make_world(world, WorldConfig(seed=0, n_web=n_web, n_human=0, n_test=0, bad_rate=0.02))
    shards = root / "shards"
    with WorldServer(world) as server:
        urls = write_url_list(world, server.base_url, world / "urls.parquet")
        run_download(
            urls,
            shards,
            DownloadConfig(image_size=64, shard_size=250, thread_count=8, url_policy="allow_loopback"),
            progress=False,
        )
    return shards


def _ray_windows(
    shards: Path, root: Path, workers: int, batch: int, steps: int, log_every: int
) -> list[float]:
    from capfilt.train.config import TrainConfig
    from capfilt.train.driver import run_training

    cores = os.cpu_count() or 1
    cfg = TrainConfig(
        data=[str(shards)],
        out_dir=str(root / f"run-{workers}"),
        tokenizer=str(root / "run-1" / "tokenizer") if workers > 1 else None,
        steps=steps,
        warmup_steps=10,
        batch_size=batch,
        num_workers=workers,
        torch_threads=max(1, cores // workers),
        cpus_per_worker=1,
        log_every=log_every,
        checkpoint_every=steps,
        min_scale=0.6,
    )
    summary = run_training(cfg)
    return [h["samples_per_s"] for h in summary.history]


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _split(shards: Path, tokenizer_dir: Path, batch: int, repeats: int) -> dict[str, float]:
    import pyarrow.parquet as pq
    import torch

    from capfilt.model import get_config
    from capfilt.model.tokenizer import TokenIds, load_tokenizer
    from capfilt.train.config import TrainConfig
    from capfilt.train.data import Collator, SkipCounts, fixed_batches, resolve_sources
    from capfilt.train.loop import build_state, train_step

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(tokenizer_dir)
    ids = TokenIds.from_tokenizer(tok)
    med_config = get_config("med-tiny").with_token_ids(ids)
    cfg = TrainConfig(data=[str(shards)], out_dir="unused", steps=1000, warmup_steps=0, batch_size=batch)
    state = build_state(cfg, med_config)
    med, objectives = state.med, state.objectives
    (src,) = resolve_sources([str(shards)])
    rows = [r for r in pq.read_table(src.files[0]).to_pylist() if r["status"] == "success"][: batch * 2]
    raw = [
        {
            "image": [r["image"] for r in rows],
            "text": [r["text"] for r in rows],
            "image_key": list(range(len(rows))),
        }
    ]
    collator = Collator(tok, med.config.vision.image_size, min_scale=0.6, max_length=cfg.max_length)
    b, _ = next(fixed_batches(raw, collator, batch, SkipCounts()))
    px, ii, am = b.pixel_values, b.input_ids, b.attention_mask

    def vision() -> None:
        med.encode_image(px).float().pow(2).mean().backward()

    emb = med.encode_image(px).detach()

    def text_itc() -> None:
        med.text_feat(ii, am).sum().backward()

    def text_itm() -> None:  # BLIP's ITM runs 3B pairs: positives, negative texts, negative images
        e3, i3, a3 = torch.cat([emb] * 3), torch.cat([ii] * 3), torch.cat([am] * 3)
        med.itm_logits(e3, i3, a3).sum().backward()

    def text_lm() -> None:
        med.lm_loss(emb, ii, am, labels=b.lm_labels).backward()

    def momentum() -> None:
        with torch.no_grad():
            objectives.momentum_update()
            m = objectives.momentum_med
            assert m is not None
            m.image_feat(m.encode_image(px))
            m.text_feat(ii, am)

    def optimizer() -> None:
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=False)

    # Give every parameter a gradient so the optimizer step costs what it costs in training.
    train_step(state, b, 1e-4)
    for p in objectives.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    parts = {
        "vision_fwd_bwd_ms": vision,
        "text_itc_unimodal_fwd_bwd_ms": text_itc,
        "text_itm_3x_fwd_bwd_ms": text_itm,
        "text_lm_decoder_fwd_bwd_ms": text_lm,
        "momentum_encoders_and_ema_ms": momentum,
        "optimizer_ms": optimizer,
    }
    out = {name: _median_ms(fn, repeats) for name, fn in parts.items()}
    out["sum_of_parts_ms"] = sum(out.values())
    out["full_step_ms"] = _median_ms(lambda: train_step(state, b, 1e-4), repeats)
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n-web", type=int, default=3000, help="enough that no epoch ends inside the windows"
    )
    parser.add_argument("--batch", type=int, default=16, help="per worker")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--windows", type=int, default=4, help="log windows per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from capfilt.core.cluster import ensure_ray

    with tempfile.TemporaryDirectory(prefix="capfilt-bench-pretrain-") as tmp:
        root = Path(tmp)
        ensure_ray(num_cpus=4)
        shards = _download(root, args.n_web)
        steps = args.log_every * args.windows
        windows = {w: _ray_windows(shards, root, w, args.batch, steps, args.log_every) for w in (1, 2)}
        split = _split(shards, root / "run-1" / "tokenizer", args.batch, args.repeats)

    result = {
        "model": "med-tiny",
        "device": "cpu",
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "batch_per_worker": args.batch,
        "steps_per_window": args.log_every,
        "samples_per_s": {
            f"{w}_worker{'s' if w > 1 else ''}": {
                "median": round(statistics.median(v[1:]), 2),
                "windows": [round(x, 2) for x in v],
            }
            for w, v in windows.items()
        },
        "step_split_ms": split,
        "notes": (
            "samples/s: median of the log windows after the first (global samples per second, rank 0's "
            "clock); torch threads = cores / workers. Split: in-process, no Ray, batch per worker, "
            "each part forward+backward alone; the ITM pass runs 3B image-text pairs as BLIP does."
        ),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
