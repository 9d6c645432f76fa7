"""What a run folder on object storage costs: the demo's CapFilt stage writing to the loopback S3
server (moto, ``capfilt.testing.s3_server``) against the same stage writing to a local folder.

Run as `python benchmarks/s3_overhead.py` inside the project's .venv. Both sides get the same
inputs, local in both: a shapes world written as download shards (``--images`` images at the
demo's 64 px, ``--shard-size`` per shard), and a random med-tiny exported as a transformers
captioner and filter (the same builder as ``benchmarks/capfilt_throughput.py``). They differ only
in ``out``. The CapFilt settings are the demo recipe's ``capfilt:`` section
(``pipelines/demo.yaml``). One Ray instance is started inside the S3 block (its workers then see
the AWS variables) and before any timing; each side runs ``--repeats`` times, interleaved, and the
medians and their ratio (S3 / local) are reported, after one untimed local run.

Writes the key "s3" of ``benchmarks/results/scale.json`` (read, update that key, write back: the
other keys belong to other benchmarks). Loopback S3 has no network latency, so the ratio is the
overhead of the protocol and of whole-object uploads, not of a real bucket.
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
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "scale.json"
DEMO = HERE.parent / "pipelines" / "demo.yaml"
log = logging.getLogger("s3_overhead")


def demo_capfilt_config() -> Any:
    """The demo recipe's CapFilt section, as the demo's stage runs it."""
    import yaml

    from capfilt.stages.capfilt.config import CapFiltConfig

    section = yaml.safe_load(DEMO.read_text()).get("capfilt") or {}
    return CapFiltConfig.model_validate(section)


def run_once(inputs: dict[str, Path], out: str, cfg: Any) -> dict[str, Any]:
    """One CapFilt run into ``out`` (a fresh folder or prefix); wall time and what it wrote."""
    from capfilt.core import fs
    from capfilt.stages.capfilt.driver import run_capfilt

    t0 = time.perf_counter()
    summary = run_capfilt(str(inputs["data"]), out, str(inputs["captioner"]), str(inputs["filter"]), cfg)
    wall = time.perf_counter() - t0
    loc = fs.location(out)
    files = [p for p in loc.glob("**/*.parquet")]
    return {"wall_s": wall, "images": summary.images, "parquet_files": len(files)}


def measure(images: int, shard_size: int, repeats: int) -> dict[str, Any]:
    import ray

    sys.path.insert(0, str(HERE))
    from capfilt_throughput import make_inputs

    from capfilt.core import fs
    from capfilt.core.cluster import ensure_ray
    from capfilt.testing import s3_server

    cfg = demo_capfilt_config()
    with tempfile.TemporaryDirectory(prefix="capfilt-s3-bench-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, images, image_size=64, shard_size=shard_size)
        runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
        with s3_server() as bucket:
            t0 = time.perf_counter()
            ensure_ray(num_cpus=4)
            ray_init_s = time.perf_counter() - t0
            # One untimed run first: worker processes import torch and transformers once.
            warmup = run_once(inputs, str(root / "warmup"), cfg)["wall_s"]
            fs.rmtree(root / "warmup")
            for i in range(repeats):
                # Interleaved, the order alternating, so neither side always runs on a warmer machine.
                order = ("local", "s3") if i % 2 == 0 else ("s3", "local")
                for side in order:
                    out = str(root / f"out-{i}") if side == "local" else f"{bucket}/runs/out-{i}"
                    result = run_once(inputs, out, cfg)
                    log.warning("%s run %d: %.1f s", side, i, result["wall_s"])
                    runs[side].append(result)
                    fs.rmtree(fs.location(out))
            ray.shutdown()
    walls = {side: [r["wall_s"] for r in rs] for side, rs in runs.items()}
    med = {side: statistics.median(w) for side, w in walls.items()}
    same = {side: {(r["images"], r["parquet_files"]) for r in rs} for side, rs in runs.items()}
    assert same["local"] == same["s3"] and len(same["local"]) == 1, same  # the same work on both sides
    n_images, n_files = next(iter(same["local"]))
    return {
        "what": "the demo's CapFilt stage (pipelines/demo.yaml capfilt section) with out on moto's "
        "loopback S3 vs a local folder; inputs local in both",
        "images": n_images,
        "shards": -(-images // shard_size),
        "parquet_files_written": n_files,
        "repeats": repeats,
        "wall_s": {side: [round(w, 2) for w in ws] for side, ws in walls.items()},
        "median_wall_s": {side: round(m, 2) for side, m in med.items()},
        "ratio_s3_over_local": round(med["s3"] / med["local"], 3),
        "images_per_s": {side: round(n_images / m, 1) for side, m in med.items()},
        "ray_init_s": round(ray_init_s, 2),
        "warmup_run_s": round(warmup, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(key: str, value: dict[str, Any]) -> None:
    """Set ``key`` of scale.json, keeping what other benchmarks wrote there."""
    from capfilt.core.fs import write_json_atomic

    current = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    current[key] = value
    write_json_atomic(RESULTS, current)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave scale.json alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("ray", "ray.data"):  # Ray Data logs its progress every few seconds at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = measure(args.images, args.shard_size, args.repeats)
    if not args.no_write:
        write_result("s3", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
