"""Scale figures a cluster user needs before trusting capfilt: `benchmarks/results/scale.json`.

Run as `python benchmarks/scale.py --part download` inside the project's .venv. Each part is one
function writing its own top-level key of the results file (read, update that key, write back), so
parts run separately and keep each other's figures.

Part "download": the planner and the download driver on URL lists of 1M and 10M rows, each split
over 10 Parquet files, and a 1M-row gzipped TSV. The URLs point at 127.0.0.1 port 9 (refused at
once) and the run stops after `--max-shards` shards: what is measured is the driver, not the
network. Each run is a fresh subprocess (so its peak RSS is its own: /proc/self/status VmHWM, not ru_maxrss, which inherits the parent's),
with Ray started before the clock (its start-up is reported apart). Figures:

- plan_s: from the call to the shard plans being ready (Parquet: metadata; TSV: streamed once
  into per-shard inputs);
- dedup_s: the duplicate pass on Ray (a map and a reduce task per 1M rows);
- first_shard_s: from the call to the first shard's stats file;
- peak_rss_mib: the driver process's peak resident memory, and rss_before_mib after Ray started.

The anchor is img2dataset's own reader (`img2dataset.reader.Reader`) on the same files, in its own
subprocess: the time to its first shard and to all shards (it writes every shard of a file as
Arrow files when it reads the file), and its peak RSS. Timings are medians of `--repeat` runs.
Generated files go under a temporary folder (about 1 GB for the 10M-row list) and are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

RESULTS = Path(__file__).parent / "results" / "scale.json"
ROOT = Path(__file__).resolve().parent.parent


def _update_results(key: str, value: dict[str, Any]) -> None:
    """Read-modify-write one top-level key of the results file."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _peak_rss_mib() -> float:
    """This process's own peak resident memory: VmHWM, the high-water mark of its address space.
    Not getrusage's ru_maxrss, which keeps the parent's peak across fork and exec (a child of a
    process that just generated 10M rows would report the parent's memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / (1 << 20)


# ---------------------------------------------------------------------------------------------
# Part "download".
# ---------------------------------------------------------------------------------------------


def _table(start: int, n: int) -> Any:
    """Synthetic LAION-like rows: url, caption, similarity; one row in 100 repeats an earlier one."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = np.arange(start, start + n, dtype=np.int64)
    ids = np.where(ids % 100 == 99, ids - 50, ids)  # exact repeats, some across shards
    text = pc.cast(pa.array(ids), pa.string())
    url = pc.binary_join_element_wise("http://127.0.0.1:9/img/", text, ".jpg", "")
    caption = pc.binary_join_element_wise("a synthetic caption for picture number ", text, " on a shelf", "")
    sim = pa.array((ids % 1000) / 1000.0, pa.float64())
    return pa.table({"url": url, "caption": caption, "similarity": sim})


def _make_parquet(folder: Path, rows: int, files: int = 10) -> Path:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    per = rows // files
    for i in range(files):
        pq.write_table(_table(i * per, per), folder / f"part-{i:05d}.parquet")
    return folder


def _make_tsv_gz(folder: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    folder.mkdir(parents=True)
    path = folder / "list.tsv.gz"
    with pa.CompressedOutputStream(str(path), "gzip") as f:
        step = 250_000
        for start in range(0, rows, step):
            t = _table(start, min(step, rows - start))
            opts = pacsv.WriteOptions(delimiter="\t", include_header=start == 0, quoting_style="none")
            pacsv.write_csv(t, f, opts)
    return path


def child_ours(urls: str, out: str, max_shards: int, shard_size: int) -> dict[str, Any]:
    """One capfilt download driver run, in this (fresh) process."""
    import ray

    import capfilt.stages.download.driver as D
    from capfilt.core.cluster import ensure_ray
    from capfilt.core.layout import STATS_DIR

    t_ray = time.perf_counter()
    # A new local instance even if another Ray cluster runs on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 << 20)
    ensure_ray()
    ray_s = time.perf_counter() - t_ray
    rss_before = _rss_mib()
    marks: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            marks[name] = time.perf_counter()
            return result

        return wrapper

    D._plan = timed("plan", D._plan)  # type: ignore[method-assign]
    D.run_dedup = timed("dedup", D.run_dedup)  # type: ignore[method-assign]
    stop = threading.Event()
    first: list[float] = []
    samples: list[float] = []

    def watch() -> None:
        stats = Path(out) / STATS_DIR
        while not stop.is_set():
            samples.append(_rss_mib())
            if not first and stats.is_dir() and any(stats.glob("*.json")):
                first.append(time.perf_counter())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cfg = D.DownloadConfig(
        shard_size=shard_size, url_policy="allow_loopback", timeout=2, thread_count=16, image_size=32
    )
    t0 = time.perf_counter()
    summary = D.run_download(urls, out, cfg, progress=False, max_shards=max_shards, input_format=None)
    end = time.perf_counter()
    stop.set()
    watcher.join()
    return {
        "ray_start_s": round(ray_s, 2),
        "plan_s": round(marks["plan"] - t0, 3),
        "dedup_s": round(marks["dedup"] - marks["plan"], 3),
        "ready_s": round(marks["dedup"] - t0, 3),  # every shard can start: img2dataset's all_shards_s
        "first_shard_s": round((first[0] if first else end) - t0, 3),
        "wall_s": round(end - t0, 3),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(max(_peak_rss_mib(), max(samples, default=0.0)), 1),
        "shards_total": summary.shards_total,
        "shards_written": summary.shards_written,
        "rows_in_written_shards": summary.rows_in,
    }


def child_img2dataset(urls: str, input_format: str, shard_size: int) -> dict[str, Any]:
    """img2dataset's own reader over the same files, in this (fresh) process."""
    from img2dataset.reader import Reader

    tmp = tempfile.mkdtemp(prefix="i2d-reader-")
    try:
        t0 = time.perf_counter()
        reader = Reader(
            urls,
            input_format,
            "url",
            "caption",
            None,
            None,
            ["similarity"],
            shard_size,
            set(),
            tmp,
        )
        first = None
        shards = 0
        for _shard_id, path in reader:
            if first is None:
                first = time.perf_counter()
            shards += 1
            os.unlink(path)  # the downloader would consume and delete it
        end = time.perf_counter()
        return {
            "first_shard_s": round((first or end) - t0, 3),
            "all_shards_s": round(end - t0, 3),
            "shards": shards,
            "peak_rss_mib": round(_peak_rss_mib(), 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed: {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _median_of(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["runs"] = runs
    return out


def _header(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "what": "planner + download driver; URLs refused at once, stopped after max_shards shards",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
        "shard_size": args.shard_size,
        "max_shards": args.max_shards,
        "repeat": args.repeat,
        "notes": [
            "ours.first_shard_s: the first output shard downloaded and written (stats file), after "
            "planning and the duplicate pass; img2dataset_reader.first_shard_s: its first input "
            "shard file ready, before any download. Compare ours.ready_s (plan + duplicate pass: "
            "every shard can start) with img2dataset_reader.all_shards_s.",
            "peak_rss_mib: the process's own VmHWM; the driver's Ray workers (duplicate pass, shard "
            "tasks) are other processes.",
            "Parts generated with pyarrow's default row groups (one per file): a shard task reads "
            "its file's whole row group for its 10k rows.",
        ],
    }


def part_download(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="capfilt-scale-", dir=args.tmp))
    cases: dict[str, Any] = {}
    try:
        inputs = {
            "parquet_1m": (lambda: _make_parquet(work / "p1m", 1_000_000), "parquet", 1_000_000),
            "tsv_gz_1m": (lambda: _make_tsv_gz(work / "t1m", 1_000_000), "tsv.gz", 1_000_000),
            "parquet_10m": (lambda: _make_parquet(work / "p10m", 10_000_000), "parquet", 10_000_000),
        }
        for name, (make, i2d_format, rows) in inputs.items():
            t0 = time.perf_counter()
            path = make()
            gen_s = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
            print(f"{name}: generated {rows} rows, {size / 2**20:.0f} MiB in {gen_s:.0f} s", flush=True)
            ours, anchor = [], []
            for r in range(args.repeat):
                out = work / f"out-{name}-{r}"
                ours.append(
                    _child(["ours", str(path), str(out), str(args.max_shards), str(args.shard_size)], 1800)
                )
                shutil.rmtree(out, ignore_errors=True)
                print(f"  ours run {r}: {ours[-1]}", flush=True)
                i2d_input = str(path) if path.is_dir() else str(path)
                anchor.append(_child(["i2d", i2d_input, i2d_format, str(args.shard_size)], 1800))
                print(f"  img2dataset reader run {r}: {anchor[-1]}", flush=True)
            cases[name] = {
                "rows": rows,
                "input_mib": round(size / 2**20, 1),
                "ours": _median_of(
                    ours, ["plan_s", "dedup_s", "ready_s", "first_shard_s", "peak_rss_mib", "rss_before_mib"]
                ),
                "img2dataset_reader": _median_of(anchor, ["first_shard_s", "all_shards_s", "peak_rss_mib"]),
            }
            _update_results("download", {**_header(args), "cases": cases, "complete": False})
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rss10 = cases["parquet_10m"]["ours"]["peak_rss_mib"]
    rss1 = cases["parquet_1m"]["ours"]["peak_rss_mib"]
    result = {
        **_header(args),
        "complete": True,
        "cases": cases,
        "goals": {
            "peak_rss_10m_mib": rss10,
            "rss_ratio_10m_over_1m": round(rss10 / rss1, 3),
            "rss_below_500_mib": rss10 < 500,
            "ratio_below_1_2": rss10 / rss1 < 1.2,
        },
    }
    _update_results("download", result)
    return result


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"download": part_download}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "ours":
            res = child_ours(rest[0], rest[1], int(rest[2]), int(rest[3]))
        else:
            res = child_img2dataset(rest[0], rest[1], int(rest[2]))
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=sorted(PARTS), required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--max-shards", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="where generated lists go (default: the system temp folder)")
    args = ap.parse_args()
    result = PARTS[args.part](args)
    print(json.dumps(result.get("goals", result), indent=2))


if __name__ == "__main__":
    main()
