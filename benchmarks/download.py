"""Download stage throughput: capfilt's stage vs plain img2dataset on the same URL list, same run.

Run as `python benchmarks/download.py` inside the project's .venv. Both sides fetch the same
shapes-world URL list from the same local HTTP server, resize to the same size, with the same
threads per process and shard size; img2dataset uses its multiprocessing distributor with one
process per core. Each side runs 3 times into a fresh folder; medians are reported. Ray is started
once before timing (its start-up is reported separately: a long job pays it once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

RESULTS = Path(__file__).parent / "results" / "download.json"


def _ours(urls: Path, out: Path, image_size: int, shard_size: int, threads: int) -> tuple[float, int]:
    from capfilt.stages.download import DownloadConfig, run_download

    cfg = DownloadConfig(
        image_size=image_size,
        shard_size=shard_size,
        thread_count=threads,
        timeout=10,
        url_policy="allow_loopback",  # the world is served on 127.0.0.1
    )
    t0 = time.perf_counter()
    summary = run_download(urls, out, cfg, progress=False)
    return time.perf_counter() - t0, summary.downloaded


def _img2dataset(urls: Path, out: Path, image_size: int, shard_size: int, threads: int) -> tuple[float, int]:
    import pyarrow.parquet as pq
    from img2dataset import download

    t0 = time.perf_counter()
    download(
        url_list=str(urls),
        output_folder=str(out),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="parquet",
        image_size=image_size,
        resize_mode="keep_ratio",
        processes_count=os.cpu_count() or 1,
        thread_count=threads,
        number_sample_per_shard=shard_size,
        timeout=10,
        min_image_size=10,
        max_image_area=50e6,
        max_aspect_ratio=10,
        distributor="multiprocessing",
        compute_hash="sha256",
        enable_wandb=False,
    )
    wall = time.perf_counter() - t0
    ok = sum(
        sum(1 for s in pq.read_table(f, columns=["status"]).column("status").to_pylist() if s == "success")
        for f in out.glob("*.parquet")
    )
    return wall, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-web", type=int, default=8000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from capfilt.core.cluster import ensure_ray
    from capfilt.world import WorldConfig, WorldServer, make_world, write_url_list

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_world(root / "world", WorldConfig(seed=0, n_web=args.n_web, n_human=10, n_test=10, bad_rate=0.0))
        t0 = time.perf_counter()
        ensure_ray()
        ray_init_s = time.perf_counter() - t0
        with WorldServer(root / "world") as server:
            urls = write_url_list(root / "world", server.base_url, root / "urls.parquet")
            runs: dict[str, list[float]] = {"ours": [], "img2dataset": []}
            images: dict[str, int] = {}
            for i in range(args.repeats):
                # Alternate the order so neither side always runs on a warmer machine.
                order = ["ours", "img2dataset"] if i % 2 == 0 else ["img2dataset", "ours"]
                for side in order:
                    fn = _ours if side == "ours" else _img2dataset
                    wall, ok = fn(urls, root / f"{side}{i}", args.image_size, args.shard_size, args.threads)
                    runs[side].append(ok / wall)
                    images[side] = ok
                    print(
                        f"run {i} {side:<12} {ok} images in {wall:.2f} s = {ok / wall:.0f} images/s",
                        file=sys.stderr,
                    )
        ray.shutdown()

    ours = statistics.median(runs["ours"])
    theirs = statistics.median(runs["img2dataset"])
    result = {
        "ours_images_per_s": round(ours, 1),
        "img2dataset_images_per_s": round(theirs, 1),
        "ratio": round(ours / theirs, 3),
        "runs_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
        "images_downloaded": images,
        "ray_init_s": round(ray_init_s, 2),
        "setup": {
            "urls": args.n_web,
            "image_size": args.image_size,
            "shard_size": args.shard_size,
            "threads_per_process": args.threads,
            "img2dataset_processes": os.cpu_count(),
            "cpus": os.cpu_count(),
            "repeats": args.repeats,
            "server": "capfilt.world.WorldServer on 127.0.0.1 (same process as the driver)",
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":  # img2dataset's multiprocessing distributor spawns: guard required
    main()
