"""Does the 'vit' stage learn the shapes reliably? Its classifier trained at a constant lr (the
stage before warmup + cosine) against the schedule, over seeds, 900 steps of 32, on one thread.

Run as `python experiments/vit_schedule.py [--seeds 0 1 2 3] [--modes schedule constant]`
inside the project's .venv. Results: experiments/results/vit_schedule.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "vit_schedule.json"


def main() -> None:
    import torch

    from capfilt.model.config import get_config
    from capfilt.stages.vit import VitInitConfig, train_vit_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--modes", nargs="+", default=["schedule", "constant"])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    runs = []
    for mode in args.modes:
        for seed in args.seeds:
            kw = {"seed": seed}
            if mode == "constant":  # the stage before the schedule: 5e-4 from the first step
                kw |= {"warmup_steps": 0, "min_lr": VitInitConfig().lr}
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                r = train_vit_classifier(VitInitConfig(**kw), get_config("med-tiny"), tmp)
            runs.append(
                {
                    "mode": mode,
                    "seed": seed,
                    "final_loss": r["final_loss"],
                    "held_out_accuracy": r["held_out_accuracy"],
                    "wall_s": round(time.time() - t0),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"what": __doc__.splitlines()[0], "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
