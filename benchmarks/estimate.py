"""Does the pilot price the full job? A shapes-world recipe priced by `capfilt estimate` from a few
shards, then run on every shard on the same machine, projected against measured.

Run as `python benchmarks/estimate.py [--pilot 2] [--full 8] [--shard-size 60]` inside the
project's .venv. The world is made with (full x shard_size) web rows, bad rows included, so the
full input is `full` shards and the pilot `pilot` of them; CapFilt runs the tiny random med-tiny
of capfilt.testing (ITM centred on the world, so about half the texts are kept) as init models. Results go to benchmarks/results/estimate.json:
{"projection", "measured", "ratios" (projected / measured), "rates", "machine", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "estimate.json"


def world_recipe(out: Path, n_rows: int, shard_size: int, seed: int = 0) -> dict[str, Any]:
    """A recipe whose shapes world has ``n_rows`` web rows in all (bad rows included)."""
    bad_rate = 0.05
    return {
        "name": "estimate-bench",
        "out": str(out / "run"),
        "stages": ["world", "download", "capfilt"],
        # The world adds bad rows on top of n_web: round(bad_rate * n_web / (1 - bad_rate)) of them.
        "world": {
            "seed": seed,
            "n_web": round(n_rows * (1 - bad_rate)),
            "n_human": 10,
            "n_test": 10,
            "bad_rate": bad_rate,
        },
        "download": {"image_size": 64, "shard_size": shard_size, "thread_count": 8, "timeout": 5},
        "capfilt": {"batch_size": 16},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import yaml

    from capfilt.core.cluster import ensure_ray
    from capfilt.pipeline.estimate import compare, run_estimate, run_full
    from capfilt.pipeline.recipe import load_recipe
    from capfilt.testing import one_torch_thread, tiny_models
    from capfilt.world import WorldConfig, make_world

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pilot", type=int, default=2)
    ap.add_argument("--full", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=60)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it.")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="capfilt-estimate-") as tmp:
        root = args.keep or Path(tmp)
        spec = world_recipe(root, args.full * args.shard_size, args.shard_size)
        # The pilot's world made first (the estimate reuses a world of the same config), so the
        # models can be centred on it.
        make_world(root / "pilot" / "world", WorldConfig(**spec["world"]))
        with one_torch_thread():
            models = tiny_models(root / "pilot" / "world", root / "models")
        spec["init"] = {role: str(models[role]) for role in ("captioner", "filter")}
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(spec))
        recipe = load_recipe(path)
        ensure_ray()
        load = {"start": os.getloadavg()[0]}
        t0 = time.perf_counter()
        est = run_estimate(recipe, args.pilot, root / "pilot")
        pilot_s = time.perf_counter() - t0
        load["after_pilot"] = os.getloadavg()[0]
        measured = run_full(recipe, est, root / "full")
        load["after_full"] = os.getloadavg()[0]
    result = {
        "what": f"shapes world, {args.full} shards of {args.shard_size} rows; pilot {args.pilot} shards",
        "pilot_wall_s": round(pilot_s, 1),
        "projection": est.projection,
        "measured": measured,
        "pilot": est.measured,
        "ratios": compare(est.projection, measured),
        "rates": est.rates,
        "target_cluster": est.target_cluster,
        "notes": est.notes,
        "machine": {
            # 1-minute load averages: the machine is shared, and start-up times follow its load.
            "load_average": {k: round(v, 1) for k, v in load.items()},
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cores": os.cpu_count(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "pilot_wall_s": result["pilot_wall_s"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
