"""The demo's bootstrapping round with two seeds: does round 2 (pretrained on CapFilt's output)
beat round 1 (pretrained on the noisy web pairs) on the held-out test split?

Run as `python benchmarks/round.py [--seeds 0 1] [--recipe pipelines/demo.yaml]` inside the
project's .venv. Each seed runs the whole recipe (world, download, pretrain, fine-tune, CapFilt,
pretrain round 2, evaluate) in its own run folder with the world's seed and every training seed
set to it; nothing else changes. Results go to benchmarks/results/demo.json:
{"seeds": {"0": {"round1": {"r1_t2i", "r1_i2t", ...}, "round2": {...}, "noise_before",
"noise_after", "wall_s"}, ...}, "mean_r1_gain": ...} with R@1 in percent.
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
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "demo.json"
TRAIN_SECTIONS = ("pretrain", "finetune_captioner", "finetune_filter")
RETRIEVAL_KEYS = ("r1_t2i", "r1_i2t", "r5_t2i", "r5_i2t", "r10_t2i", "r10_i2t", "r1_mean")


def seeded_recipe(recipe: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """The recipe with the world and every training run seeded by ``seed``, writing to ``out``."""
    r = json.loads(json.dumps(recipe))
    r["out"] = str(out)
    r["world"] = {**r.get("world", {}), "seed": seed}
    for name in TRAIN_SECTIONS:
        r[name] = {**r.get(name, {}), "seed": seed}
    r["capfilt"] = {**r.get("capfilt", {}), "seed": seed}
    if "vit" in r.get("stages", []):  # the stand-in ImageNet classifier: its own labelled scenes too
        r["vit"] = {**r.get("vit", {}), "seed": seed}
    return r


def run_seed(recipe: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    import yaml

    from capfilt.pipeline.recipe import load_recipe
    from capfilt.pipeline.runner import run_recipe

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(seeded_recipe(recipe, seed, out)))
    t0 = time.perf_counter()
    result = run_recipe(load_recipe(path))
    wall = time.perf_counter() - t0
    return collect({name: m for name, m in result.stages.items()}, wall, out)


def from_run(run_dir: Path) -> dict[str, Any]:
    """The figures of a finished run folder (e.g. `make demo`'s runs/demo), read from its stage
    manifests; its wall time is the sum of the stages' own."""
    from capfilt.core.layout import STAGES_DIR

    stages = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / STAGES_DIR).glob("*.json"))}
    stages = {k: v for k, v in stages.items() if not k.startswith("_")}
    if stages.get("evaluate", {}).get("status") != "done":
        raise SystemExit(f"{run_dir} has no finished evaluate stage")
    return collect(stages, sum(float(m.get("wall_s") or 0) for m in stages.values()), run_dir)


def collect(stages: dict[str, Any], wall: float, out: Path) -> dict[str, Any]:
    evaluation = stages["evaluate"]["result"]
    rounds = {
        label: {k: evaluation["rounds"][label]["retrieval"][k] for k in RETRIEVAL_KEYS}
        | {"checker_correct": evaluation["rounds"][label].get("captioning", {}).get("checker_correct")}
        for label in ("round1", "round2")
    }
    q = evaluation["capfilt"]
    return {
        **rounds,
        "r1_mean_gain": rounds["round2"]["r1_mean"] - rounds["round1"]["r1_mean"],
        "noise_before": q["noise_before"],
        "noise_after": q["noise_after"],
        "noise_after_web": q.get("noise_after_web"),
        "noise_after_synthetic": q.get("noise_after_synthetic"),
        "filter_auc": (q.get("filter_web") or {}).get("roc_auc"),
        "stage_wall_s": {name: m.get("wall_s") for name, m in stages.items()},
        "wall_s": round(wall, 1),
        "run_dir": str(out),
    }


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pipelines/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default=None, help="run folders go here (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--from-run",
        action="append",
        default=[],
        metavar="SEED=DIR",
        help="take this seed's figures from a finished run folder instead of running it "
        "(seed 0 is the demo recipe itself: --from-run 0=runs/demo after `make demo`)",
    )
    args = parser.parse_args()
    given = {int(k): Path(v) for k, v in (item.split("=", 1) for item in args.from_run)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    work = Path(args.work or tempfile.mkdtemp(prefix="capfilt-round-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Any] = {}
    for seed in args.seeds:
        if seed in given:
            logging.info("seed %d: reading the finished run %s", seed, given[seed])
            seeds[str(seed)] = from_run(given[seed])
            continue
        logging.info("seed %d: running %s", seed, args.recipe)
        seeds[str(seed)] = run_seed(recipe, seed, work / f"seed{seed}")
        logging.info("seed %d: %s", seed, json.dumps(seeds[str(seed)]))
    gains = [s["r1_mean_gain"] for s in seeds.values()]
    results = {
        "recipe": args.recipe,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "seeds": seeds,
        "mean_r1_gain": statistics.fmean(gains),
        "min_r1_gain": min(gains),
        "goal_r1_gain": 3.0,
        "median_wall_s": statistics.median(s["wall_s"] for s in seeds.values()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "seeds"}, indent=2))
    for seed, s in seeds.items():
        print(
            f"seed {seed}: R@1 mean {s['round1']['r1_mean']:.1f} -> {s['round2']['r1_mean']:.1f} "
            f"({s['r1_mean_gain']:+.1f}), noise {s['noise_before']:.3f} -> {s['noise_after']:.3f}, "
            f"{s['wall_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
