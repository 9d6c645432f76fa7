"""The bad-input matrix once through the real download stage: which kinds were tried, rows in and
out, rows lost, and each kind's status and reason.

Run as `python benchmarks/bad_inputs.py` inside the project's .venv; it prints the result as JSON
and writes nothing. `bad_inputs()` returns the same dict for a caller (benchmarks/reliability.py)
that folds it into benchmarks/results/reliability.json. The matrix (capfilt/world/badinputs.py) is
served on 127.0.0.1 and downloaded on a local Ray instance (or `--ray-address`) with a 1 s
timeout against a 3 s slow endpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def bad_inputs(work_dir: str | Path | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Run the matrix once; {kinds_tried, rows_in, rows_out, rows_lost, rows_duplicated,
    status_by_kind, reason_by_kind, kinds_not_as_expected, status_counts, wall_s, ray_init_s}.
    Starts (or joins) Ray and leaves it running for the caller."""
    from capfilt.core.cluster import ensure_ray
    from capfilt.world.badinputs import run_matrix

    t0 = time.perf_counter()
    ensure_ray(ray_address)
    ray_init_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        result = run_matrix(Path(work_dir) if work_dir else Path(tmp), timeout=1.0, ray_address=ray_address)
    return {**result.report(), "ray_init_s": round(ray_init_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ray-address", default=None, help="join this Ray cluster; default: local Ray")
    ap.add_argument("--work-dir", default=None, help="keep the matrix files and shards here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    report = bad_inputs(args.work_dir, args.ray_address)
    ray.shutdown()
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
