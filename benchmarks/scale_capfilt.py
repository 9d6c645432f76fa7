"""The CapFilt driver at scale: what the driver process costs as the number of input shards grows,
with writers in the Ray workers (this tree) against the driver-side writer of e00eb85.

Run as `python benchmarks/scale_capfilt.py` inside the project's .venv; it writes key "capfilt"
of benchmarks/results/scale.json (read-modify-write, other keys kept). ``run(args)`` is what
benchmarks/scale.py calls.

Input: ``--images`` synthetic downloaded images (small JPEGs from a pool of distinct ones, every
row a distinct uid and text) written straight as SAMPLE download shards, split into each of
``--shards`` shard counts (the same rows each time). Models: a random med-tiny at 32 px (tokenizer
trained on the texts), exported as a transformers captioner and filter.

Each (implementation, shard count) runs ``--repeats`` times in a fresh subprocess with its own
local Ray (``ensure_ray(num_cpus=4)`` before timing; model loading and actor start-up inside),
interleaved. The old implementation is the same driver code at commit ``--old-commit``, checked
out with ``git worktree add`` and put first on PYTHONPATH. Measured in the subprocess:

- driver CPU: ``getrusage(RUSAGE_SELF)`` of the driver process (every thread: Ray Data's
  streaming executor runs there) over ``run_capfilt``; per 1,000 images.
- stage CPU: the driver plus every process of its Ray tree (GCS, raylet, workers and actors: user
  + system, and what their reaped children used), the same span.
- driver peak RSS: the driver's ``ru_maxrss`` over its life (imports included, equal on both sides).
- images/s: images / wall time of ``run_capfilt``.

Medians over the repeats. Goals: driver CPU < 5% of the stage's CPU, driver peak RSS at the most
shards / at the fewest < 1.2, images/s not below the old implementation's. ``--concurrent`` runs
old and new side by side, so that a shared machine's load hits both alike.

Recorded in scale.json (12-03, a 2-core machine shared with four other jobs, load 30-60):
``--images 6400 --shards 100 400 --repeats 1 --batch-size 64 --max-length 12 --concurrent``;
50k images would have taken hours at the 20-30 img/s this machine gave then.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
OLD_COMMIT = "e00eb85"
OLD_TREE = Path("/tmp/capfilt-old")
IMAGE_SIZE = 32
POOL = 512  # distinct JPEGs, reused across rows
WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "small",
    "big",
    "round",
    "square",
    "star",
    "circle",
    "triangle",
    "dog",
    "cat",
    "bird",
    "tree",
    "house",
    "car",
    "boat",
    "sky",
    "sea",
    "field",
    "road",
    "city",
    "night",
    "day",
    "two",
    "three",
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "near",
]


# ------------------------------------------------------------------------------------ inputs


def _jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8) // 4
        x0, y0 = rng.integers(0, size // 2, 2)
        pixels[y0 : y0 + size // 2, x0 : x0 + size // 2] = rng.integers(64, 255, 3, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _texts(n: int, seed: int = 1) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) + f" {i}" for i in range(n)]


def make_shards(data: Path, texts: list[str], images: list[bytes], shards: int) -> None:
    """``len(texts)`` SAMPLE rows, all success, split into ``shards`` download shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.core import schema as S

    n_total = len(texts)
    data.mkdir(parents=True)
    per = -(-n_total // shards)
    for shard in range(shards):
        rows = range(shard * per, min(n_total, (shard + 1) * per))
        n = len(rows)
        urls = [f"http://synthetic.invalid/{i}.jpg" for i in rows]
        cols = {
            "uid": [S.make_uid("synthetic", urls[j], texts[i]) for j, i in enumerate(rows)],
            "url": urls,
            "text": [texts[i] for i in rows],
            "source": ["synthetic"] * n,
            "row": list(rows),
            "shard": [shard] * n,
            "status": [S.SUCCESS] * n,
            "reason": [None] * n,
            "width": [IMAGE_SIZE] * n,
            "height": [IMAGE_SIZE] * n,
            "original_width": [IMAGE_SIZE] * n,
            "original_height": [IMAGE_SIZE] * n,
            "sha256": [None] * n,
            "image": [images[i % len(images)] for i in rows],
        }
        pq.write_table(pa.table(cols, schema=S.SAMPLE), data / f"{shard:05d}.parquet")


def make_models(root: Path, texts: list[str]) -> dict[str, str]:
    """A random med-tiny at 32 px for a tokenizer trained on ``texts``, exported for both roles."""
    import torch

    from capfilt.model import create_med, get_config
    from capfilt.model.hf import export_captioner, export_filter
    from capfilt.model.tokenizer import TokenIds
    from capfilt.testing import tiny_tokenizer

    tok = tiny_tokenizer(texts[:5000])
    cfg = get_config("med-tiny").with_token_ids(TokenIds.from_tokenizer(tok))
    cfg = cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"image_size": IMAGE_SIZE})})
    torch.manual_seed(0)
    med = create_med(cfg).eval()
    return {
        "captioner": str(export_captioner(med, root / "captioner", tok)),
        "filter": str(export_filter(med, root / "filter", tok)),
    }


def old_tree(commit: str) -> Path:
    """The old implementation checked out (once) with ``git worktree add``."""
    if not (OLD_TREE / "capfilt" / "stages" / "capfilt" / "driver.py").is_file():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(OLD_TREE), commit], check=True
        )
    return OLD_TREE


# ----------------------------------------------------------------------- one measured run


def _tree_cpu() -> float:
    """CPU seconds of this process and every process under it (live ones, plus what their
    reaped children used)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _threads_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by thread name (Linux /proc)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of ``run_capfilt`` in this process (the driver), measured."""
    import ray

    import capfilt
    from capfilt.core.cluster import ensure_ray
    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.driver import run_capfilt

    ensure_ray(num_cpus=4)
    cfg = CapFiltConfig.model_validate(spec["cfg"])
    threads0 = _threads_cpu()
    cpu0, tree0, t0 = _self_cpu(), _tree_cpu(), time.perf_counter()
    summary = run_capfilt(spec["data"], spec["out"], spec["captioner"], spec["filter"], cfg)
    wall = time.perf_counter() - t0
    cpu1, tree1 = _self_cpu(), _tree_cpu()
    threads = {k: v - threads0.get(k, 0.0) for k, v in _threads_cpu().items()}
    ray.shutdown()
    assert summary.images == spec["images"] and summary.shards_written == spec["shards"], summary
    return {
        "code": str(Path(capfilt.__file__).parent.parent),
        "images": summary.images,
        "wall_s": wall,
        "driver_cpu_s": cpu1 - cpu0,
        "stage_cpu_s": tree1 - tree0,
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Where the driver's CPU went, by thread name (the busiest few).
        "driver_threads_cpu_s": dict(sorted(threads.items(), key=lambda kv: -kv[1])[:6]),
    }


def _start(spec: dict[str, Any], code: Path, log: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def _finish(proc: subprocess.Popen[str], code: Path, log: Path) -> dict[str, Any]:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({code}):\n{log.read_text()[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- the study


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (implementation, shard count) ``args.repeats`` times; the figures as a dict."""
    sides = {"new": ROOT, "old": old_tree(args.old_commit)}
    cfg = {"k": args.k, "batch_size": args.batch_size, "max_length": args.max_length, "torch_threads": 1}
    with tempfile.TemporaryDirectory(prefix="scale-capfilt-") as tmp:
        root = Path(tmp)
        texts, images = _texts(args.images), _jpegs(POOL, IMAGE_SIZE)
        models = make_models(root / "models", texts)
        data = {}
        for s in args.shards:
            make_shards(root / f"data-{s}", texts, images, s)
            data[s] = str(root / f"data-{s}")
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rep in range(args.repeats):
            for s in args.shards:
                results: dict[str, dict[str, Any]] = {}
                running = []
                for side, code in sides.items():
                    spec = {
                        "data": data[s],
                        "out": str(root / f"out-{side}-{s}-{rep}"),
                        "images": args.images,
                        "shards": s,
                        "cfg": cfg,
                        **models,
                    }
                    log = root / f"log-{side}-{s}-{rep}.txt"
                    proc = _start(spec, code, log)
                    if args.concurrent:
                        running.append((side, code, log, proc))
                    else:
                        results[side] = _finish(proc, code, log)
                for side, code, log, proc in running:
                    results[side] = _finish(proc, code, log)
                for side, code in sides.items():
                    r = results[side]
                    assert Path(r["code"]) == code, f"{side} ran the code at {r['code']}"
                    runs.setdefault((side, s), []).append(r)
                    print(
                        f"{side} {s} shards rep {rep}: {args.images / r['wall_s']:.1f} img/s, driver "
                        f"{r['driver_cpu_s']:.1f} of {r['stage_cpu_s']:.1f} CPU-s, "
                        f"{r['driver_peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    figures: dict[str, Any] = {}
    for side in sides:
        by_shards = {}
        for s in args.shards:
            rs = runs[(side, s)]
            driver, stage = _median(rs, "driver_cpu_s"), _median(rs, "stage_cpu_s")
            by_shards[str(s)] = {
                "images_per_s": round(args.images / _median(rs, "wall_s"), 1),
                "wall_s": round(_median(rs, "wall_s"), 2),
                "driver_cpu_s": round(driver, 2),
                "driver_cpu_s_per_1k_images": round(1000 * driver / args.images, 3),
                "stage_cpu_s": round(stage, 1),
                "driver_cpu_share": round(driver / stage, 4),
                "driver_peak_rss_mib": round(_median(rs, "driver_peak_rss_mib"), 1),
                "runs": rs,
            }
        lo, hi = str(min(args.shards)), str(max(args.shards))
        figures[side] = {
            "shards": by_shards,
            "rss_ratio_most_to_fewest_shards": round(
                by_shards[hi]["driver_peak_rss_mib"] / by_shards[lo]["driver_peak_rss_mib"], 3
            ),
        }
    new, old = figures["new"], figures["old"]
    speed = {
        s: round(new["shards"][s]["images_per_s"] / old["shards"][s]["images_per_s"], 3)
        for s in new["shards"]
    }
    return {
        "setup": {
            "images": args.images,
            "shards": args.shards,
            "repeats": args.repeats,
            "model": f"med-tiny at {IMAGE_SIZE} px, random weights",
            "capfilt": cfg,
            "ray": "local, num_cpus=4 (logical), 1 captioner + 1 filter actor at 0.5 CPU each",
            "machine": f"{os.cpu_count()} cores, shared with other jobs",
            "old_and_new_side_by_side": args.concurrent,
            "old": f"commit {args.old_commit}: driver-side tally and writer (iter_batches of candidate rows)",
            "new": "receipts only; parts, shards and stats written by Ray tasks",
        },
        "new": new,
        "old": old,
        "speed_new_over_old": speed,
        "goals": {
            "driver_cpu_share_below_0.05": all(v["driver_cpu_share"] < 0.05 for v in new["shards"].values()),
            "rss_ratio_below_1.2": new["rss_ratio_most_to_fewest_shards"] < 1.2,
            "not_slower": all(v >= 1.0 for v in speed.values()),
        },
    }


def write_result(key: str, value: dict[str, Any], path: Path = RESULTS) -> None:
    """Set ``key`` of the results file, keeping the others (read-modify-write)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--shards", type=int, nargs="+", default=[100, 400])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--old-commit", default=OLD_COMMIT)
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="run old and new side by side (a shared machine's load then hits both alike)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    result = run(args)
    write_result("capfilt", result)
    print(json.dumps({k: result[k] for k in ("speed_new_over_old", "goals")}, indent=2))


if __name__ == "__main__":
    main()
