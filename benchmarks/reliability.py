"""Reliability figures: faults injected into every stage, the bad-input matrix, and the peak memory
of a soak run; written to benchmarks/results/reliability.json.

Run as `nice python benchmarks/reliability.py` inside the project's .venv (several minutes).

Faults (each on local Ray, on a served shapes world of `--fault-web` rows, against an
uninterrupted run of the same input; tests/test_faults.py injects the same faults, both with
capfilt.testing.faults):

- download_worker_killed: the worker of one download shard is SIGKILLed on its first attempt
  between the shard's temp file and its rename; the shard retry redoes it.
- download_shard_fails_within_budget: one shard raises on every attempt, failure_budget 1: the job
  finishes with that shard failed (reason in the summary); the same command, the fault gone,
  finishes it.
- download_shard_fails_over_budget: the same with failure_budget 0: the job fails naming the shard
  (survived: false, as expected), finished shards kept; the rerun finishes it.
- download_crash_before_rename: a shard's Parquet rename raises (in-process download_shard); the
  rerun of the stage redoes the shard.
- download_driver_killed: `capfilt download` in a subprocess, shard 0's URLs served and the others
  held, SIGKILLed once shard 0 is done; the same command again.
- capfilt_actors_killed: the captioner actor dies on its 2nd model batch and the filter actor on
  its 3rd, once each (Ray Data restarts actors and retries their batches).
- capfilt_crash_before_rename: the driver's rename of a cleaned shard raises; rerun.
- capfilt_driver_killed: `capfilt capfilt` in a subprocess, SIGKILLed once a shard is done; rerun.
- training_worker_killed: the Ray Train worker is SIGKILLed after step 5 of 8 (checkpoints every
  3 steps, max_failures 1); Ray Train restarts it from the step-3 checkpoint.

Row accounting, per run: `rows_in` input rows (download: URL-list rows; CapFilt: images, i.e.
success rows of its input shards), `rows_out` the distinct ones in the output, `rows_failed` those
in shards the run reported as failed after every attempt, `rows_pending` those in shards an
interrupted run had not finished (a rerun does them), and `rows_lost` the rest: input rows that are
nowhere, neither written nor reported. `rows_duplicated` counts uids written twice. A fault's
final run must also equal the uninterrupted run row for row (`matches_uninterrupted`).

A CLI run whose local Ray fails to start (Ray gives its raylet 30 s to register, which a loaded
machine can miss) is run again, as a user would; `rerun_attempts` records it.

`--faults NAME ...` and `--sizes N ...` choose what runs (`--faults` or `--sizes` with nothing after
it: none); with `--merge` the results already in `--out` are kept and only what ran now replaced.

Soak: worlds of `--sizes` web pairs (10,000 then 40,000), each served on loopback and run through
`run_download` and `run_capfilt` (random med-tiny captioner and filter, k=1) in a fresh subprocess
with its own local Ray; a thread samples the subprocess's process tree every 0.5 s: the driver's
RSS, and the RSS and PSS summed over Ray's worker processes (and over the whole tree).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from capfilt.testing import (
    Gate,
    OsFailingReplace,
    cli_env,
    download_always_failing,
    download_killed_before_rename,
    dying_actor,
    kill_driver,
    patched,
    run_cli,
    start_cli,
    tiny_models,
    training_killed_at,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results" / "reliability.json"
log = logging.getLogger("reliability")

SHARD_SIZE = 50
DEADLINE_S = 600.0
MIB = 1 << 20


# ------------------------------------------------------------------------------ accounting


def download_rows(
    urls: Path, out: Path, failed: set[int] | None = None, shard_size: int = SHARD_SIZE
) -> dict[str, Any]:
    """rows_in / rows_out / rows_failed / rows_pending / rows_lost / rows_duplicated of a
    download folder, for the URL list `urls` (see the module docstring)."""
    from capfilt.core.shards import done_shards
    from capfilt.io.urllist import read_url_list
    from capfilt.stages.download import read_samples

    uids = read_url_list(urls, source="shapes").column("uid").to_pylist()
    got = read_samples(out, ["uid"]).column("uid").to_pylist() if out.exists() else []
    done = done_shards(out) if out.exists() else set()
    failed = failed or set()
    shard_of = {u: i // shard_size for i, u in enumerate(uids)}
    written = set(got)
    return {
        "rows_in": len(uids),
        "rows_out": len(written),
        "rows_failed": sum(1 for u in uids if shard_of[u] in failed and u not in written),
        "rows_pending": sum(
            1 for u in uids if shard_of[u] not in failed and shard_of[u] not in done and u not in written
        ),
        "rows_lost": sum(1 for u in uids if shard_of[u] in done and u not in written),
        "rows_duplicated": len(got) - len(written),
    }


def capfilt_rows(data: Path, out: Path) -> dict[str, Any]:
    """The same accounting for a CapFilt run: an image is out when its web text is a candidate."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from capfilt.core import schema as S
    from capfilt.core.shards import STATS_DIR
    from capfilt.stages.capfilt.rethreshold import read_candidates

    images: dict[str, str] = {}
    for f in sorted(data.glob("[0-9]*.parquet")):
        t = pq.read_table(f, columns=["uid", "status"])
        for u in t.filter(pc.equal(t.column("status"), S.SUCCESS)).column("uid").to_pylist():
            images[u] = f.stem
    done = {p.stem for p in (out / STATS_DIR).glob("*.json")} if out.exists() else set()
    cands = read_candidates(out) if out.exists() else S.CANDIDATE.empty_table()
    web = cands.filter(pc.equal(cands.column("text_source"), "web")).column("uid").to_pylist()
    written = set(web)
    text_uids = cands.column("text_uid").to_pylist()
    return {
        "rows_in": len(images),
        "rows_out": len(written),
        "rows_failed": 0,
        "rows_pending": sum(1 for u, s in images.items() if s not in done and u not in written),
        "rows_lost": sum(1 for u, s in images.items() if s in done and u not in written),
        "rows_duplicated": (len(web) - len(written)) + (len(text_uids) - len(set(text_uids))),
    }


def same_samples(a: Path, b: Path) -> bool:
    from capfilt.stages.download import read_samples

    return bool(read_samples(a).equals(read_samples(b)))


def same_capfilt(a: Path, b: Path) -> bool:
    from capfilt.stages.capfilt.rethreshold import read_candidates, read_cleaned

    keys = [("uid", "ascending"), ("text_uid", "ascending")]
    return bool(
        read_candidates(a).sort_by(keys).equals(read_candidates(b).sort_by(keys))
        and read_cleaned(a).sort_by(keys).equals(read_cleaned(b).sort_by(keys))
    )


class Record:
    """Collects the faults, and every run with its rows."""

    def __init__(self) -> None:
        self.faults: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []

    def run(self, fault: str, run: str, stage: str, outcome: str, rows: dict[str, Any]) -> dict[str, Any]:
        entry = {"fault": fault, "run": run, "stage": stage, "outcome": outcome, **rows}
        self.runs.append(entry)
        log.info("%s / %s: %s %s", fault, run, outcome, rows)
        return entry

    def fault(
        self, name: str, stage: str, what: str, survived: bool, final: dict[str, Any], **extra: Any
    ) -> None:
        entry = {
            "name": name,
            "stage": stage,
            "fault": what,
            "survived": survived,
            "rows_in": final.get("rows_in"),
            "rows_out": final.get("rows_out"),
            "rows_lost": final.get("rows_lost"),
            **extra,
        }
        self.faults.append(entry)
        log.info("fault %s: %s", name, entry)


# ------------------------------------------------------------------------------- the faults


class Faults:
    """The fault scenarios, sharing one world, its reference runs and the models."""

    def __init__(self, work: Path, n_web: int, rec: Record) -> None:
        from capfilt.stages.capfilt.config import CapFiltConfig
        from capfilt.stages.download import DownloadConfig
        from capfilt.world import WorldConfig, make_world

        self.work, self.rec = work, rec
        self.world = work / "world"
        make_world(self.world, WorldConfig(seed=11, n_web=n_web, n_human=10, n_test=10, bad_rate=0.1))
        self.dl = DownloadConfig(
            image_size=64,
            shard_size=SHARD_SIZE,
            thread_count=8,
            timeout=5,
            source="shapes",
            url_policy="allow_loopback",
        )
        self.cli_dl = ["--image-size", "64", "--shard-size", str(SHARD_SIZE), "--thread-count", "8"]
        self.cli_dl += ["--timeout", "5", "--source", "shapes", "--allow-loopback"]
        self.cf = CapFiltConfig(k=2, max_length=12, min_length=5, batch_size=8, torch_threads=1)
        self.cli_cf = ["--k", "2", "--max-length", "12", "--min-length", "5", "--batch-size", "8"]
        self._models: dict[str, Path] | None = None
        self._cref: Path | None = None

    # shared inputs ---------------------------------------------------------------------

    def setup_download(self, server_url: str) -> None:
        from capfilt.stages.download import run_download
        from capfilt.world import write_url_list

        self.gate = Gate(server_url, DEADLINE_S)
        self.urls = write_url_list(self.world, self.gate.base_url, self.work / "urls.parquet")
        self.ref = self.work / "ref-download"
        run_download(self.urls, self.ref, self.dl, progress=False)
        self.rec.run("none", "uninterrupted", "download", "done", download_rows(self.urls, self.ref))

    @property
    def models(self) -> dict[str, Path]:
        if self._models is None:
            self._models = tiny_models(self.world, self.work / "models")
        return self._models

    @property
    def capfilt_data(self) -> Path:
        """The first four download shards."""
        data = self.work / "capfilt-data"
        if not data.exists():
            data.mkdir()
            for f in sorted(self.ref.glob("[0-9]*.parquet"))[:4]:
                shutil.copy(f, data / f.name)
        return data

    @property
    def capfilt_ref(self) -> Path:
        from capfilt.stages.capfilt.driver import run_capfilt

        if self._cref is None:
            self._cref = self.work / "ref-capfilt"
            run_capfilt(
                self.capfilt_data, self._cref, self.models["captioner"], self.models["filter"], self.cf
            )
            rows = capfilt_rows(self.capfilt_data, self._cref)
            self.rec.run("none", "uninterrupted", "capfilt", "done", rows)
        return self._cref

    # the faults ------------------------------------------------------------------------

    def download_worker_killed(self) -> None:
        import capfilt.stages.download.driver as D  # run_download looks download_shard up here

        out, marker = self.work / "dl-worker-killed", self.work / "dl-worker-killed.marker"
        with patched(D, "download_shard", download_killed_before_rename(1, marker)):
            s = D.run_download(self.urls, out, self.dl, progress=False)
        rows = self.rec.run(
            "download_worker_killed", "run", "download", "done", download_rows(self.urls, out)
        )
        self.rec.fault(
            "download_worker_killed",
            "download",
            "Ray worker of shard 1 SIGKILLed on attempt 1, after its temp file, before the rename",
            survived=not s.shards_failed and marker.exists(),
            final=rows,
            fired=marker.exists(),
            matches_uninterrupted=same_samples(out, self.ref),
            runs=1,
        )

    def _always_failing(self, name: str, budget: int) -> None:
        import capfilt.stages.download.driver as D  # run_download looks download_shard up here
        from capfilt.core.errors import StageFailed

        out = self.work / name
        cfg = self.dl.model_copy(update={"max_attempts": 2, "failure_budget": budget})
        error = None
        with patched(D, "download_shard", download_always_failing(2)):
            try:
                s = D.run_download(self.urls, out, cfg, progress=False)
                failed, reason = set(s.shards_failed), s.shards_failed.get(2)
            except StageFailed as err:
                error = str(err)
                summary = json.loads((out / "_summary.json").read_text())
                failed = {int(k) for k in summary["shards_failed"]}
                reason = summary["shards_failed"].get("2")
        rows = download_rows(self.urls, out, failed)
        self.rec.run(name, "with the fault", "download", "failed" if error else "done", rows)
        s2 = D.run_download(self.urls, out, cfg, progress=False)
        rows = self.rec.run(name, "rerun, fault gone", "download", "done", download_rows(self.urls, out))
        self.rec.fault(
            name,
            "download",
            f"shard 2 raises on every attempt (max_attempts 2), failure_budget {budget}",
            survived=error is None,
            final=rows,
            as_expected=(error is None) == (budget >= 1) and failed == {2},
            failed_shard_reason=reason,
            job_error=error,
            rerun_finished=not s2.shards_failed and s2.shards_written == 1,
            matches_uninterrupted=same_samples(out, self.ref),
            runs=2,
        )

    def download_shard_fails_within_budget(self) -> None:
        self._always_failing("download_shard_fails_within_budget", 1)

    def download_shard_fails_over_budget(self) -> None:
        self._always_failing("download_shard_fails_over_budget", 0)

    def download_crash_before_rename(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        import capfilt.core.shards as shards_mod
        from capfilt.core.shards import done_shards
        from capfilt.io.urllist import read_url_list
        from capfilt.stages.download import download_shard, run_download, screen_rows

        out = self.work / "dl-crash-before-rename"
        pairs = read_url_list(self.urls, source="shapes")
        st, rs = screen_rows(pairs)
        pairs = pairs.append_column("pre_status", pa.array(st, pa.string()))
        pairs = pairs.append_column("pre_reason", pa.array(rs, pa.string()))
        inp = self.work / "shard3-input.parquet"
        pq.write_table(pairs.slice(3 * SHARD_SIZE, SHARD_SIZE), inp)
        crashed = False
        with patched(shards_mod, "os", OsFailingReplace("00003.parquet")):
            try:
                download_shard(3, str(inp), str(out), self.dl.model_dump_json())
            except OSError:
                crashed = True
        trusted = done_shards(out)
        leftovers = [str(p) for p in out.rglob("*.tmp")]
        run_download(self.urls, out, self.dl, progress=False)
        rows = download_rows(self.urls, out)
        self.rec.run("download_crash_before_rename", "rerun", "download", "done", rows)
        self.rec.fault(
            "download_crash_before_rename",
            "download",
            "os.replace of shard 3's Parquet file raises; then the stage runs again",
            survived=crashed and not trusted and not leftovers,
            final=rows,
            shards_trusted_after_crash=sorted(trusted),
            temp_files_left=leftovers,
            matches_uninterrupted=same_samples(out, self.ref),
            runs=2,
        )

    def download_driver_killed(self) -> None:
        import pyarrow.parquet as pq

        out, cli_log = self.work / "dl-driver-killed", self.work / "dl-driver-killed.log"
        argv = ["download", "--urls", str(self.urls), "--out", str(out)]
        argv += self.cli_dl
        first = pq.read_table(self.urls).slice(0, SHARD_SIZE).column("url").to_pylist()
        self.gate.open_paths = {u.removeprefix(self.gate.base_url + "/") for u in first}
        self.gate.release.clear()
        try:
            proc = start_cli(
                argv, cli_log, lambda: (out / "_stats" / "00000.json").exists(), deadline_s=DEADLINE_S
            )
            kill_driver(proc)
        finally:
            self.gate.open_paths = None
            self.gate.release.set()
        killed = self.rec.run(
            "download_driver_killed", "killed", "download", "killed", download_rows(self.urls, out)
        )
        rc, attempts = run_cli(argv, cli_log, timeout_s=DEADLINE_S)
        outcome = "done" if rc == 0 else f"exit {rc}"
        rows = self.rec.run(
            "download_driver_killed", "rerun", "download", outcome, download_rows(self.urls, out)
        )
        self.rec.fault(
            "download_driver_killed",
            "download",
            "`capfilt download` SIGKILLed once shard 0 was done, other shards in flight; same command again",
            survived=rc == 0 and killed["rows_pending"] > 0,
            final=rows,
            shards_done_when_killed=killed["rows_out"] // SHARD_SIZE,
            rerun_attempts=attempts,
            matches_uninterrupted=same_samples(out, self.ref),
            runs=2,
        )

    def capfilt_actors_killed(self) -> None:
        import capfilt.stages.capfilt.driver as C

        cref, data, models = self.capfilt_ref, self.capfilt_data, self.models
        out = self.work / "cf-actors-killed"
        cm, fm = self.work / "captioner.marker", self.work / "filter.marker"
        with (
            patched(C, "CaptionerActor", dying_actor(C.CaptionerActor, cm, 2)),
            patched(C, "FilterActor", dying_actor(C.FilterActor, fm, 3)),
        ):
            C.run_capfilt(data, out, models["captioner"], models["filter"], self.cf)
        rows = self.rec.run("capfilt_actors_killed", "run", "capfilt", "done", capfilt_rows(data, out))
        self.rec.fault(
            "capfilt_actors_killed",
            "capfilt",
            "captioner actor SIGKILLed on its 2nd batch, filter actor on its 3rd, once each",
            survived=cm.exists() and fm.exists(),
            final=rows,
            fired={"captioner": cm.exists(), "filter": fm.exists()},
            matches_uninterrupted=same_capfilt(out, cref),
            runs=1,
        )

    def capfilt_crash_before_rename(self) -> None:
        import capfilt.core.shards as shards_mod
        from capfilt.stages.capfilt.driver import run_capfilt

        cref, data, models = self.capfilt_ref, self.capfilt_data, self.models
        out = self.work / "cf-crash-before-rename"
        crashed = False
        with patched(shards_mod, "os", OsFailingReplace("cleaned/00001.parquet")):
            try:
                run_capfilt(data, out, models["captioner"], models["filter"], self.cf)
            except OSError:
                crashed = True
        rows = capfilt_rows(data, out)
        self.rec.run("capfilt_crash_before_rename", "crashed", "capfilt", "crashed", rows)
        trusted = (out / "_stats" / "00001.json").exists()
        run_capfilt(data, out, models["captioner"], models["filter"], self.cf)
        rows = self.rec.run(
            "capfilt_crash_before_rename", "rerun", "capfilt", "done", capfilt_rows(data, out)
        )
        self.rec.fault(
            "capfilt_crash_before_rename",
            "capfilt",
            "os.replace of cleaned/00001.parquet raises in the driver; then the stage runs again",
            survived=crashed and not trusted,
            final=rows,
            matches_uninterrupted=same_capfilt(out, cref),
            runs=2,
        )

    def capfilt_driver_killed(self) -> None:
        from capfilt.stages.capfilt.driver import run_capfilt

        models = self.models
        out, cli_log = self.work / "cf-driver-killed", self.work / "cf-driver-killed.log"
        argv = ["capfilt", "--data", str(self.ref), "--out", str(out)]
        argv += ["--captioner", str(models["captioner"]), "--filter", str(models["filter"]), *self.cli_cf]
        cref_all = self.work / "ref-capfilt-all"
        run_capfilt(self.ref, cref_all, models["captioner"], models["filter"], self.cf)
        rows = capfilt_rows(self.ref, cref_all)
        self.rec.run("none", "uninterrupted (all shards)", "capfilt", "done", rows)
        proc = start_cli(argv, cli_log, lambda: any((out / "_stats").glob("*.json")), deadline_s=DEADLINE_S)
        kill_driver(proc)
        killed = self.rec.run(
            "capfilt_driver_killed", "killed", "capfilt", "killed", capfilt_rows(self.ref, out)
        )
        rc, attempts = run_cli(argv, cli_log, timeout_s=DEADLINE_S)
        outcome = "done" if rc == 0 else f"exit {rc}"
        rows = self.rec.run("capfilt_driver_killed", "rerun", "capfilt", outcome, capfilt_rows(self.ref, out))
        self.rec.fault(
            "capfilt_driver_killed",
            "capfilt",
            "`capfilt capfilt` SIGKILLed once a shard was done; same command again",
            survived=rc == 0 and killed["rows_pending"] > 0,
            final=rows,
            rerun_attempts=attempts,
            matches_uninterrupted=same_capfilt(out, cref_all),
            runs=2,
        )

    def training_worker_killed(self) -> None:
        import capfilt.train.driver as T
        from capfilt.train.config import TrainConfig

        out, marker = self.work / "train", self.work / "train.marker"
        tcfg = TrainConfig.model_validate(
            {
                "model": "med-tiny",
                "data": [str(self.ref)],
                "out_dir": str(out),
                "steps": 8,
                "batch_size": 8,
                "warmup_steps": 2,
                "checkpoint_every": 3,
                "log_every": 1,
                "shuffle_buffer": 32,
                "torch_threads": 1,
                "max_failures": 1,
            }
        )
        error, summary = None, None
        try:
            with patched(T, "train_loop_per_worker", training_killed_at(5, marker)):
                summary = T.run_training(tcfg)
        except Exception as err:  # recorded, not raised: the figures say it did not survive
            error = f"{type(err).__name__}: {err}"
        killed = json.loads(marker.read_text()) if marker.exists() else None
        if killed:  # the figures keep step and epoch; the pid is of a process long gone
            killed.pop("pid", None)
        self.rec.fault(
            "training_worker_killed",
            "pretrain",
            "Ray Train worker SIGKILLed after step 5 of 8 (epoch 0), checkpoints every 3 steps, max_failures 1",
            survived=error is None and killed is not None,
            final={},
            killed_at=killed,
            steps=summary.steps if summary else None,
            resumed_from_step=summary.resumed_from_step if summary else None,
            error=error,
            runs=1,
        )


FAULTS = (
    "download_worker_killed",
    "download_shard_fails_within_budget",
    "download_shard_fails_over_budget",
    "download_crash_before_rename",
    "download_driver_killed",
    "capfilt_actors_killed",
    "capfilt_crash_before_rename",
    "capfilt_driver_killed",
    "training_worker_killed",
)


def run_faults(work: Path, n_web: int, rec: Record, names: list[str]) -> None:
    from capfilt.world import WorldServer

    faults = Faults(work, n_web, rec)
    with WorldServer(faults.world) as server:
        faults.setup_download(server.base_url)
        try:
            for name in names:
                t0 = time.time()
                getattr(faults, name)()
                log.info("fault %s done in %.0f s", name, time.time() - t0)
        finally:
            faults.gate.close()


# ------------------------------------------------------------------------------------- soak

_SOAK_CHILD = """
import json, sys, time
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.driver import run_capfilt
from capfilt.core.cluster import ensure_ray
from capfilt.stages.download import DownloadConfig, run_download
a = json.loads(sys.argv[1])
for attempt in range(3):  # Ray gives its raylet 30 s to register: a loaded machine can miss it
    try:
        ensure_ray(num_cpus=4)
        break
    except Exception:
        import ray
        ray.shutdown()
        if attempt == 2:
            raise
t0 = time.perf_counter()
d = run_download(a["urls"], a["download"], DownloadConfig(image_size=64, shard_size=a["shard_size"],
    thread_count=16, timeout=10, source="shapes", url_policy="allow_loopback"), progress=False)
t1 = time.perf_counter()
c = run_capfilt(a["download"], a["capfilt"], a["captioner"], a["filter"],
    CapFiltConfig(k=1, max_length=20, batch_size=64, torch_threads=1))
t2 = time.perf_counter()
print(json.dumps({"download_wall_s": t1 - t0, "capfilt_wall_s": t2 - t1, "rows_in": d.rows_in,
    "downloaded": d.downloaded, "shards_failed": len(d.shards_failed), "images": c.images}))
"""


def _is_ray_worker(cmdline: list[str]) -> bool:
    text = " ".join(cmdline)
    return text.startswith("ray::") or "default_worker.py" in text or "setup_worker.py" in text


def soak(work: Path, n_web: int, models_world: Path | None = None) -> dict[str, Any]:
    """A world of `n_web` pairs through download and CapFilt in a subprocess; peak memory."""
    import psutil

    from capfilt.world import WorldConfig, WorldServer, make_world, write_url_list

    root = work / f"soak-{n_web}"
    world = root / "world"
    t0 = time.time()
    make_world(world, WorldConfig(seed=3, n_web=n_web, n_human=10, n_test=10, bad_rate=0.05))
    models = tiny_models(world, root / "models")
    log.info("soak %d: world and models in %.0f s", n_web, time.time() - t0)
    with WorldServer(world) as server, open(root / "soak.log", "w") as child_log:
        urls = write_url_list(world, server.base_url, root / "urls.parquet")
        args = {
            "urls": str(urls),
            "download": str(root / "download"),
            "capfilt": str(root / "capfilt"),
            "captioner": str(models["captioner"]),
            "filter": str(models["filter"]),
            "shard_size": 1000,
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", _SOAK_CHILD, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=child_log,
            text=True,
            env=cli_env(),
        )
        top = psutil.Process(proc.pid)
        peak = {"driver_rss": 0, "workers_rss": 0, "workers_pss": 0, "worker_rss_max": 0, "tree_rss": 0}
        peak_workers = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_workers
            while not stop.is_set():
                try:
                    procs = top.children(recursive=True)
                    driver = top.memory_info().rss
                except psutil.Error:
                    break
                workers_rss = workers_pss = tree = worker_max = n_workers = 0
                for p in procs:
                    try:
                        if _is_ray_worker(p.cmdline()):
                            full = p.memory_full_info()
                            workers_rss += full.rss
                            workers_pss += full.pss
                            worker_max = max(worker_max, full.rss)
                            n_workers += 1
                            tree += full.rss
                        else:
                            tree += p.memory_info().rss
                    except psutil.Error:
                        continue
                peak["driver_rss"] = max(peak["driver_rss"], driver)
                peak["workers_rss"] = max(peak["workers_rss"], workers_rss)
                peak["workers_pss"] = max(peak["workers_pss"], workers_pss)
                peak["worker_rss_max"] = max(peak["worker_rss_max"], worker_max)
                peak["tree_rss"] = max(peak["tree_rss"], tree + driver)
                peak_workers = max(peak_workers, n_workers)
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, _ = proc.communicate()
        stop.set()
        sampler.join()
    if proc.returncode:
        raise RuntimeError(f"the soak subprocess for {n_web} pairs failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    dl_rows = download_rows(urls, root / "download", shard_size=args["shard_size"])
    cf_rows = capfilt_rows(root / "download", root / "capfilt")
    shutil.rmtree(world, ignore_errors=True)
    return {
        "web_pairs": n_web,
        "download": {
            **dl_rows,
            "downloaded": result["downloaded"],
            "wall_s": round(result["download_wall_s"], 1),
        },
        "capfilt": {**cf_rows, "wall_s": round(result["capfilt_wall_s"], 1)},
        "peak_driver_rss_mib": round(peak["driver_rss"] / MIB),
        "peak_ray_workers_rss_sum_mib": round(peak["workers_rss"] / MIB),
        "peak_ray_workers_pss_sum_mib": round(peak["workers_pss"] / MIB),
        "peak_single_ray_worker_rss_mib": round(peak["worker_rss_max"] / MIB),
        "peak_process_tree_rss_mib": round(peak["tree_rss"] / MIB),
        "peak_ray_worker_processes": peak_workers,
    }


# -------------------------------------------------------------------------------------- main


ROW_KEYS = ("rows_in", "rows_out", "rows_failed", "rows_pending", "rows_lost", "rows_duplicated")


def summarize(
    result: dict[str, Any],
    faults: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    soaks: list[dict[str, Any]],
) -> None:
    """The totals and comparisons derived from the faults, runs and soak entries."""
    soaks = sorted(soaks, key=lambda e: e["web_pairs"])
    # A merged run records the uninterrupted reference runs again: keep the latest of each.
    latest = {(r["run"], r["stage"]): i for i, r in enumerate(runs) if r["fault"] == "none"}
    runs = [r for i, r in enumerate(runs) if r["fault"] != "none" or latest[(r["run"], r["stage"])] == i]
    result["faults"] = faults
    result["faults_injected"] = len(faults)
    result["faults_survived"] = sum(1 for f in faults if f["survived"])
    # The over-budget fault must fail the job (naming the shard): as expected, though not survived.
    result["faults_as_expected"] = sum(1 for f in faults if f.get("as_expected", f["survived"]))
    result["bad_input_kinds"] = result.get("bad_inputs", {}).get("kinds_tried", [])
    result["runs"] = runs
    result["soak"] = soaks
    result["sizes_run"] = [e["web_pairs"] for e in soaks]
    if len(soaks) >= 2:
        lo, hi = soaks[0], soaks[-1]
        keys = ("peak_driver_rss_mib", "peak_ray_workers_pss_sum_mib", "peak_single_ray_worker_rss_mib")
        result["soak_growth"] = {
            "sizes": [lo["web_pairs"], hi["web_pairs"]],
            **{k: round(hi[k] / lo[k], 3) if lo[k] else None for k in keys},
        }
    result["rows_lost"] = sum(r["rows_lost"] for r in runs if r.get("rows_lost") is not None)
    result["rows_duplicated"] = sum(
        r["rows_duplicated"] for r in runs if r.get("rows_duplicated") is not None
    )
    result["definitions"] = {
        "rows_lost": "input rows of a finished shard missing from the output, summed over every run "
        "(rows of shards reported failed or not yet run by an interrupted run are counted apart)",
        "survived": "the job finished (after the rerun the fault calls for) with the fault having fired",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fault-web", type=int, default=600, help="web rows of the fault-injection world")
    ap.add_argument(
        "--faults", nargs="*", choices=FAULTS, default=list(FAULTS), help="faults to inject (default: all)"
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 40_000], help="soak sizes (web pairs)")
    ap.add_argument("--skip-bad-inputs", action="store_true")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep what --out already holds and replace only the faults, soak sizes (and bad inputs) run now",
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="keep the work files here (default: a temp folder)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default=None, help="why this --merge run was made (kept in the results)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in (
        "capfilt.stages.download",
        "capfilt.stages.capfilt",
        "capfilt.train.loop",
        "capfilt.train.driver",
        "capfilt.io.urllist",
        "capfilt.core.cluster",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray

    from capfilt.core.cluster import ensure_ray

    t0 = time.time()
    rec = Record()
    soaks: list[dict[str, Any]] = []
    result: dict[str, Any] = {"soak_errors": {}}
    kept_times: dict[str, Any] = {}
    if args.merge:  # drop what this run redoes
        result = json.loads(args.out.read_text())
        redo = {*args.faults, *(f"soak_{n}" for n in args.sizes)}
        if not args.skip_bad_inputs:
            redo.add("bad_inputs")
        rec.faults = [f for f in result.get("faults", []) if f["name"] not in redo]
        rec.runs = [r for r in result.get("runs", []) if r["fault"] not in redo]
        soaks = [e for e in result.get("soak", []) if e["web_pairs"] not in args.sizes]
        errors = result.get("soak_errors", {})
        result["soak_errors"] = {k: v for k, v in errors.items() if int(k) not in args.sizes}
        if "wall_s" in result:  # written by an earlier version of this script
            result["first_run_wall_s"] = result.pop("wall_s")
        kept_times = {k: result.pop(k) for k in ("faults_wall_s", "soak_wall_s") if k in result}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.faults or not args.skip_bad_inputs:
            ensure_ray(num_cpus=4)
            if not args.skip_bad_inputs:
                from bad_inputs import bad_inputs

                bad = bad_inputs(work / "bad-inputs")
                result["bad_inputs"] = bad
                rows = {k: bad.get(k, 0) for k in ROW_KEYS}
                rec.run("bad_inputs", "matrix", "download", "done", rows)
            if args.faults:
                run_faults(work / "faults", args.fault_web, rec, args.faults)
            ray.shutdown()
            result["faults_wall_s"] = round(time.time() - t0, 1)
        t1 = time.time()
        for n in args.sizes:
            try:
                entry = soak(work, n)
            except Exception as err:  # recorded: the sizes actually run are what the file says
                log.exception("soak at %d pairs failed", n)
                result["soak_errors"][str(n)] = f"{type(err).__name__}: {err}"
                continue
            soaks.append(entry)
            for stage in ("download", "capfilt"):
                rec.run(f"soak_{n}", "soak", stage, "done", {k: entry[stage][k] for k in ROW_KEYS})
            log.info("soak %d: %s", n, entry)
        if args.sizes:
            result["soak_wall_s"] = round(time.time() - t1, 1)
    if args.merge:  # this run's times go with its record, not over the first run's
        merge = {"faults": args.faults, "sizes": args.sizes, "bad_inputs": not args.skip_bad_inputs}
        merge |= {k: result.pop(k) for k in ("faults_wall_s", "soak_wall_s") if k in result}
        merge |= {"note": args.note, "wall_s": round(time.time() - t0, 1)}
        result.setdefault("merged_runs", []).append(merge)
        result |= kept_times
    rec.faults.sort(key=lambda f: FAULTS.index(f["name"]))
    result["sizes_requested"] = sorted({*args.sizes, *(e["web_pairs"] for e in soaks)})
    summarize(result, rec.faults, rec.runs, soaks)
    result["setup"] = {
        "cpus": os.cpu_count(),
        "ray_logical_cpus": 4,
        "fault_world_web_rows": args.fault_web,
        "shard_size_faults": SHARD_SIZE,
        "shard_size_soak": 1000,
        "models": "med-tiny, random init, exported as transformers BLIP captioner and filter",
        "soak_capfilt": "k=1, max_length 20, batch_size 64, 1 captioner + 1 filter actor, 1 torch thread",
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    keys = ("faults_injected", "faults_survived", "faults_as_expected", "rows_lost", "sizes_run")
    print(json.dumps({k: result.get(k) for k in keys}))


if __name__ == "__main__":
    main()
