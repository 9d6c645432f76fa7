"""CapFilt's cleaning quality on the seeded demo world, measured with the world's checker.

Run as `python benchmarks/quality.py [--recipe pipelines/demo.yaml] [--run DIR]` inside the
project's .venv. It runs the recipe's stages up to CapFilt in DIR (default: the recipe's own run
folder, so after `make demo` every stage is already done and is skipped), then compares every
candidate text with the ground truth of its image. Results go to benchmarks/results/quality.json:

- all_web_correct: share of correct texts among all downloaded web texts (before CapFilt);
- kept_web_correct: the same among the web texts the filter kept;
- kept_synthetic_correct: share of correct captions among the synthetic captions kept;
- filter_auc: the filter's ROC-AUC on web texts against the ground truth.
Goals (issue 4): kept web >= 0.95, kept synthetic >= 0.90, AUC >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RESULTS = Path(__file__).parent / "results" / "quality.json"
GOALS = {"kept_web_correct": 0.95, "kept_synthetic_correct": 0.90, "filter_auc": 0.95}


def measure(run_dir: Path, threshold: float) -> dict[str, Any]:
    from capfilt.eval.quality import evaluate_capfilt
    from capfilt.stages.capfilt.rethreshold import read_candidates
    from capfilt.stages.download import read_samples
    from capfilt.world import load_world

    world = load_world(run_dir / "world")
    candidates = read_candidates(run_dir / "capfilt")
    samples = read_samples(run_dir / "download", columns=["uid", "row", "status"])
    q = evaluate_capfilt(candidates, samples, world, threshold=threshold)

    def correct(noise: float | None) -> float | None:
        return None if noise is None else 1.0 - noise

    web = q.get("filter_web") or {}
    synthetic = q.get("filter_synthetic") or {}
    return {
        "all_web_correct": correct(q["noise_before"]),
        "kept_web_correct": correct(q.get("noise_after_web")),
        "kept_synthetic_correct": correct(q.get("noise_after_synthetic")),
        "filter_auc": web.get("roc_auc"),
        "threshold": threshold,
        "counts": q["counts"],
        "filter_web": web,
        "filter_synthetic": synthetic,
        "all_synthetic_correct": (synthetic.get("n_correct") / synthetic["n"])
        if synthetic.get("n")
        else None,
    }


def main() -> None:
    import yaml

    from capfilt.pipeline.recipe import load_recipe
    from capfilt.pipeline.runner import run_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pipelines/demo.yaml")
    parser.add_argument("--run", default=None, help="run folder (default: the recipe's out)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    raw = yaml.safe_load(Path(args.recipe).read_text())
    run_dir = Path(args.run or raw["out"])
    stages = raw.get("stages") or []
    up_to_capfilt = stages[: stages.index("capfilt") + 1] if "capfilt" in stages else stages
    overrides = {"out": str(run_dir), "stages": up_to_capfilt}
    recipe = load_recipe(args.recipe, overrides)
    run_recipe(recipe)
    results = {"recipe": args.recipe, "run_dir": str(run_dir), **measure(run_dir, recipe.capfilt.threshold)}
    results["goals"] = GOALS
    results["goals_met"] = {k: (results[k] is not None and results[k] >= v) for k, v in GOALS.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    keys = ("all_web_correct", "kept_web_correct", "kept_synthetic_correct", "filter_auc", "goals_met")
    print(json.dumps({k: results[k] for k in keys}, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
