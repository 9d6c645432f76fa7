"""Fault injection on local Ray: workers, actors, training workers and drivers killed mid-stage,
shards that fail every attempt, and crashes between a temp file and its rename. Every job must
end with exactly the rows of an uninterrupted run (by uid and content), or fail naming the shards.

Faults fire inside Ray workers from functions the test hands to Ray (capfilt.testing.faults, or
defined here inside a test), guarded by a marker file so that each fires exactly once and the test
can see that it did. Functions defined inside functions are pickled by value, so the workers need
not import this module. A killed process is SIGKILLed: no finally, no atexit, no flush.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import capfilt.core.fs as fs_mod
import capfilt.core.shards as shards_mod
import capfilt.stages.capfilt.driver as C
import capfilt.stages.download.driver as D
from capfilt.core.errors import StageFailed
from capfilt.core.shards import INPUTS_DIR, STATS_DIR, done_shards, read_json, stats_path
from capfilt.io.urllist import read_url_list
from capfilt.pipeline.status import run_status
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.driver import run_capfilt
from capfilt.stages.capfilt.rethreshold import read_candidates, read_cleaned
from capfilt.stages.download import DownloadConfig, download_shard, read_samples, run_download, screen_rows
from capfilt.testing.faults import (
    Gate,
    OsFailingReplace,
    download_always_failing,
    download_killed_before_rename,
    dying_actor,
    kill_driver,
    run_cli,
    start_cli,
    training_killed_at,
    wait_for,
)

SHARD_SIZE = 30  # the session's world has 282 web rows (bad rows included): 10 download shards
# The same download settings in process and on the command line, so their runs compare.
DL = DownloadConfig(
    image_size=64,
    shard_size=SHARD_SIZE,
    thread_count=4,
    timeout=5,
    source="shapes",
    url_policy="allow_loopback",
)
CLI_DOWNLOAD = [
    "--image-size",
    "64",
    "--shard-size",
    str(SHARD_SIZE),
    "--thread-count",
    "4",
    "--timeout",
    "5",
]
CLI_DOWNLOAD += ["--source", "shapes", "--allow-loopback"]
CF = CapFiltConfig(k=2, max_length=12, min_length=5, batch_size=8, torch_threads=1, cpus_per_actor=0.5)


# ------------------------------------------------------------------------------ helpers


def _sorted_rows(table: pa.Table, keys: tuple[str, ...] = ("uid",)) -> list[dict[str, Any]]:
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def _same_samples(got: pa.Table, want: pa.Table) -> None:
    """Same rows by uid and content: no loss, no duplicate, every column equal."""
    uids = got.column("uid").to_pylist()
    assert len(set(uids)) == len(uids), "a uid appears twice"
    assert set(uids) == set(want.column("uid").to_pylist()), "rows lost or added"
    assert got.schema == want.schema
    assert got.equals(want), "rows differ from an uninterrupted run"


def _same_capfilt(got: Path, want: Path) -> None:
    keys = ("uid", "text_uid")
    assert _sorted_rows(read_candidates(got), keys) == _sorted_rows(read_candidates(want), keys)
    assert _sorted_rows(read_cleaned(got), keys) == _sorted_rows(read_cleaned(want), keys)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gate(served_world) -> Iterator[Gate]:
    _, _, server = served_world
    g = Gate(server.base_url)  # type: ignore[attr-defined]
    yield g
    g.close()


@pytest.fixture(scope="module")
def urls(served_world, gate: Gate, tmp_path_factory) -> Path:
    """The world's URL list, every URL through the gate (open unless a test closes it)."""
    from capfilt.world import write_url_list

    world, _, _ = served_world
    return write_url_list(world, gate.base_url, tmp_path_factory.mktemp("faults") / "urls.parquet")


@pytest.fixture(scope="module")
def reference(ray_local, urls: Path, tmp_path_factory) -> Path:
    """An uninterrupted download: what every faulted run must end up with."""
    out = tmp_path_factory.mktemp("faults-ref") / "download"
    summary = run_download(urls, out, DL, progress=False)
    assert summary.shards_total >= 6 and not summary.shards_failed
    return out


@pytest.fixture
def fault_dir(tmp_path: Path) -> Path:
    d = tmp_path / "faults"
    d.mkdir()
    return d


# ------------------------------------------------------------------ download: worker killed


def test_download_worker_killed_mid_shard_is_retried_to_the_same_rows(
    ray_local, urls, reference, fault_dir, tmp_path, monkeypatch
):
    marker = fault_dir / "killed.json"
    monkeypatch.setattr(D, "download_shard", download_killed_before_rename(3, marker))
    out = tmp_path / "download"
    summary = run_download(urls, out, DL, progress=False)

    killed = json.loads(marker.read_text())  # the fault fired: a worker died holding a temp file
    assert killed["pid"] != os.getpid()
    assert Path(killed["tmp"]).exists(), "SIGKILL leaves the temp file: nothing cleaned it"
    n = len(done_shards(reference))
    assert summary.shards_written == n and not summary.shards_failed
    assert read_json(stats_path(out, 3))["attempts"] == 2
    assert {read_json(stats_path(out, s))["attempts"] for s in range(n) if s != 3} == {1}
    _same_samples(read_samples(out), read_samples(reference))
    # The half-written file is invisible to every reader of the folder.
    assert pq.read_table(out).num_rows == read_samples(reference).num_rows
    assert run_status(out).stages[0].shards_done == n


# ------------------------------------------------------- download: a shard that always fails


def test_a_shard_failing_every_attempt_within_the_budget_does_not_stop_the_job(
    ray_local, urls, reference, tmp_path, monkeypatch
):
    cfg = DL.model_copy(update={"max_attempts": 2, "failure_budget": 1})
    monkeypatch.setattr(D, "download_shard", download_always_failing(5))
    out = tmp_path / "download"
    summary = run_download(urls, out, cfg, progress=False)

    # It ends as failed, with the reason of its last attempt; the other shards are all there.
    assert set(summary.shards_failed) == {5}
    assert summary.shards_failed[5] == "RuntimeError: injected fault: disk full on attempt 2"
    assert read_json(out / "_summary.json")["shards_failed"] == {"5": summary.shards_failed[5]}
    assert done_shards(out) == done_shards(reference) - {5}
    ref = read_samples(reference)
    assert summary.rows_in == ref.num_rows, "rows of the failed shard still count as rows in"
    assert sum(summary.status_counts.values()) == ref.num_rows - SHARD_SIZE
    got = read_samples(out)
    _same_samples(got, ref.filter(pc.not_equal(ref.column("shard"), 5)))
    status = run_status(out)
    assert status.stages[0].shards_failed == {"00005": summary.shards_failed[5]}
    assert "failed shard: download 00005: RuntimeError: injected fault" in "\n".join(status.lines())

    # The same command again, the fault gone: the failed shard is retried, nothing else is redone.
    monkeypatch.undo()
    again = run_download(urls, out, cfg, progress=False)
    assert (
        again.shards_written == 1
        and again.shards_skipped == len(done_shards(reference)) - 1
        and not again.shards_failed
    )
    _same_samples(read_samples(out), ref)
    assert not run_status(out).stages[0].shards_failed


def test_shards_failing_beyond_the_budget_fail_the_job_naming_them(
    ray_local, urls, reference, tmp_path, monkeypatch
):
    cfg = DL.model_copy(update={"max_attempts": 2, "failure_budget": 0})
    monkeypatch.setattr(D, "download_shard", download_always_failing(2))
    out = tmp_path / "download"
    with pytest.raises(StageFailed) as err:
        run_download(urls, out, cfg, progress=False)
    message = str(err.value)
    assert "1 download shard(s) failed every attempt, over the failure budget of 0" in message
    assert "00002 (RuntimeError: injected fault: disk full on attempt 2)" in message
    # Failing the job does not throw away the shards that finished.
    assert done_shards(out) == done_shards(reference) - {2}
    assert read_json(out / "_summary.json")["shards_failed"] == {
        "2": "RuntimeError: injected fault: disk full on attempt 2"
    }


# ------------------------------------------------------------ download: atomic shard files


def _shard_input(urls: Path, tmp_path: Path, shard: int) -> Path:
    pairs = read_url_list(urls, source=DL.source)
    status, reason = screen_rows(pairs)
    pairs = pairs.append_column("pre_status", pa.array(status, pa.string()))
    pairs = pairs.append_column("pre_reason", pa.array(reason, pa.string()))
    path = tmp_path / f"in-{shard}.parquet"
    pq.write_table(pairs.slice(shard * SHARD_SIZE, SHARD_SIZE), path)
    return path


@pytest.mark.parametrize("crash_at", ["00001.parquet", "00001.json"])
def test_a_crash_between_temp_write_and_rename_leaves_nothing_a_rerun_trusts(
    ray_local, urls, reference, tmp_path, monkeypatch, crash_at
):
    """The shard file and then its stats file are each written to a temp name and renamed; a
    crash before either rename leaves no shard that counts as done, and the rerun rewrites it."""
    out = tmp_path / "download"
    inp = _shard_input(urls, tmp_path, 1)
    shim = OsFailingReplace(crash_at)
    monkeypatch.setattr(shards_mod, "os", shim)  # Parquet shards
    monkeypatch.setattr(fs_mod, "os", shim)  # stats files (core.fs.write_atomic)
    with pytest.raises(OSError, match="injected crash"):
        download_shard(1, str(inp), str(out), DL.model_dump_json())
    monkeypatch.undo()
    assert shim.calls[-1] == crash_at
    assert not list(out.rglob("*.tmp")), "the temp file is removed when the write fails"
    assert done_shards(out) == set()
    assert (out / "00001.parquet").exists() == (crash_at == "00001.json")
    assert not stats_path(out, 1).exists()
    # A rerun of the whole stage redoes shard 1 and gives the uninterrupted rows.
    summary = run_download(urls, out, DL, progress=False)
    assert summary.shards_written == len(done_shards(reference)) and summary.shards_skipped == 0
    _same_samples(read_samples(out), read_samples(reference))
    assert not (out / INPUTS_DIR).exists()


# --------------------------------------------------------------------- the driver, killed


def test_download_driver_killed_mid_stage_then_rerun_gives_the_same_rows(urls, reference, gate, tmp_path):
    """`capfilt download` in a subprocess: shard 0's URLs answer, the others hang until the test
    lets them go; once shard 0 is done the driver is SIGKILLed with shards in flight. The same
    command again finishes the job with exactly an uninterrupted run's rows."""
    out = tmp_path / "download"
    log = tmp_path / "cli.log"
    first_shard = pq.read_table(urls).slice(0, SHARD_SIZE).column("url").to_pylist()
    gate.open_paths = {u.removeprefix(gate.base_url + "/") for u in first_shard}
    gate.release.clear()
    args = ["download", "--urls", str(urls), "--out", str(out), *CLI_DOWNLOAD]
    try:
        proc = start_cli(args, log, lambda: stats_path(out, 0).exists())
        try:
            wait_for(lambda: gate.held > 0, "a held request: shards in flight")
        finally:
            kill_driver(proc)
    finally:
        gate.open_paths = None
        gate.release.set()
    assert done_shards(out) == {0}, "the driver died mid-stage"
    assert (out / INPUTS_DIR).is_dir() and not (out / "_summary.json").exists()

    assert run_cli(args, log)[0] == 0, log.read_text()[-3000:]
    summary = read_json(out / "_summary.json")
    assert summary["shards_skipped"] == 1
    assert summary["shards_written"] == len(done_shards(reference)) - 1
    _same_samples(read_samples(out), read_samples(reference))
    assert not (out / INPUTS_DIR).exists()


# ------------------------------------------------------------------------ CapFilt: actors


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path]) -> dict[str, Path]:
    """The session's random med-tiny captioner and filter (conftest), ITM centred on the world."""
    return tiny_models


@pytest.fixture(scope="module")
def capfilt_data(reference: Path, tmp_path_factory) -> Path:
    """Two download shards (about 45 images): six model batches for each actor."""
    data = tmp_path_factory.mktemp("fault-capfilt-data")
    for name in ("00000.parquet", "00001.parquet"):
        shutil.copy(reference / name, data / name)
    return data


@pytest.fixture(scope="module")
def capfilt_reference(ray_local, capfilt_data, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-capfilt-ref") / "run"
    summary = run_capfilt(capfilt_data, out, models["captioner"], models["filter"], CF)
    assert summary.shards_written == 2 and 0 < sum(summary.kept.values()) < sum(
        summary.texts_considered.values()
    )
    return out


def test_capfilt_actors_killed_mid_stage_are_restarted_to_the_same_rows(
    ray_local, capfilt_data, models, capfilt_reference, fault_dir, tmp_path, monkeypatch
):
    """The captioner actor dies on its second model batch and the filter actor on its third,
    each once; Ray restarts them and retries the batch they held (Ray Data's defaults,
    max_restarts=-1 and max_task_retries=-1: see the next test)."""
    cap_marker, filt_marker = fault_dir / "captioner.json", fault_dir / "filter.json"
    monkeypatch.setattr(C, "CaptionerActor", dying_actor(C.CaptionerActor, cap_marker, 2))
    monkeypatch.setattr(C, "FilterActor", dying_actor(C.FilterActor, filt_marker, 3))
    out = tmp_path / "run"
    summary = run_capfilt(capfilt_data, out, models["captioner"], models["filter"], CF)
    assert cap_marker.exists() and filt_marker.exists(), "both faults fired"
    assert json.loads(cap_marker.read_text())["pid"] != json.loads(filt_marker.read_text())["pid"]
    assert summary.shards_written == 2
    _same_capfilt(out, capfilt_reference)


def test_capfilt_actors_get_restarts_and_batch_retries_from_ray_data(
    ray_local, capfilt_data, models, monkeypatch
):
    """run_capfilt passes no max_restarts / max_task_retries of its own (Ray 2.60 deprecates
    passing them to map_batches, for removal in 2.64): the actor pools take Ray Data's defaults,
    restart a dead actor without limit and retry the batches it held. This pins those defaults,
    so a Ray upgrade that changes them fails here rather than in a long run."""
    import ray.data
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    calls: list[tuple[Any, dict[str, Any]]] = []
    real = ray.data.Dataset.map_batches

    def spy(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((fn, kwargs))
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    cap = C.resolve_model(models["captioner"], "captioner")
    filt = C.resolve_model(models["filter"], "filter")
    C._dataset(C._plan(C._input_files(capfilt_data)), cap, filt, CF)
    actors = {fn: kw for fn, kw in calls if isinstance(fn, type)}
    assert set(actors) == {C.CaptionerActor, C.FilterActor}
    for kw in actors.values():
        remote_args = {
            k: v for k, v in kw.items() if k in ("num_cpus", "num_gpus", "max_restarts", "max_task_retries")
        }
        assert set(remote_args) <= {"num_cpus", "num_gpus"}, "fault tolerance is Ray Data's"
        applied = ActorPoolMapOperator._apply_default_remote_args(remote_args, DataContext.get_current())
        assert applied["max_restarts"] == -1 and applied["max_task_retries"] == -1


# ----------------------------------------------------------------- training: worker killed


def _train_config(data: Path, out: Path, **overrides: Any) -> Any:
    from capfilt.train.config import TrainConfig

    base: dict[str, Any] = {
        "model": "med-tiny",
        "data": [str(data)],
        "out_dir": str(out),
        "steps": 8,
        "batch_size": 8,
        "warmup_steps": 2,
        "checkpoint_every": 3,
        "keep_checkpoints": None,
        "log_every": 1,
        "shuffle_buffer": 32,
        "torch_threads": 1,
        "max_failures": 1,
        "seed": 0,
    }
    return TrainConfig.model_validate(base | overrides)


@pytest.fixture(scope="module")
def killed_training(ray_local, reference, tmp_path_factory) -> tuple[Any, Path, dict[str, Any]]:
    """8 steps on the reference download, checkpoints at 3 and 6, max_failures 1; the worker
    process is SIGKILLed after step 5, mid-epoch 0 (an epoch is about 30 steps)."""
    import capfilt.train.driver as TD

    root = tmp_path_factory.mktemp("fault-train")
    marker = root / "killed.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TD, "train_loop_per_worker", training_killed_at(5, marker))
        summary = TD.run_training(_train_config(reference, root / "train"))
    return summary, root / "train", json.loads(marker.read_text())


def test_training_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(killed_training):
    summary, out, killed = killed_training
    assert killed == {"pid": killed["pid"], "step": 5, "epoch": 0}, "killed mid-epoch 0"
    assert summary.steps == 8
    assert summary.resumed_from_step == 3, "restarted from the step-3 checkpoint, not from scratch"
    assert [h["step"] for h in summary.history] == [float(s) for s in range(1, 9)]
    ckpts = sorted(p.name for p in (out / "train").glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000003", "checkpoint_00000006", "checkpoint_00000008"]
    assert (out / "model").is_dir()


@pytest.mark.slow
def test_training_killed_and_restarted_ends_where_an_uninterrupted_run_ends(
    ray_local, reference, killed_training, tmp_path
):
    """One torch thread: CPU kernels are bitwise deterministic, so the restarted run (checkpoint
    restore, RNG states, data position mid-epoch) must reach the very same weights."""
    from safetensors.torch import load_file

    import capfilt.train.loop as T
    from capfilt.train.driver import run_training

    _, killed_out, _ = killed_training
    out = tmp_path / "train"
    cfg = _train_config(reference, out, tokenizer=str(killed_out / "tokenizer"), max_failures=0)
    summary = run_training(cfg)
    assert summary.resumed_from_step is None and summary.steps == 8
    want = load_file(str(out / "train" / "checkpoint_00000008" / T.MODEL_FILE))
    got = load_file(str(killed_out / "train" / "checkpoint_00000008" / T.MODEL_FILE))
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    assert [h["loss"] for h in summary.history] == [h["loss"] for h in killed_training[0].history]


# ----------------------------------------------------------- CapFilt: slow driver-side faults


@pytest.mark.slow
def test_capfilt_crash_before_a_rename_leaves_nothing_a_rerun_trusts(
    ray_local, capfilt_data, models, capfilt_reference, tmp_path, monkeypatch
):
    """A shard's writer task writes its candidates, cleaned file, then stats; a crash in the
    worker before the cleaned file's rename leaves the shard not done, the driver names it, and
    the rerun redoes it."""

    def writer(out: Any, plan: Any, *args: Any) -> Any:
        import os as os_

        import capfilt.core.shards as shards_
        import capfilt.stages.capfilt.writer as W
        from capfilt.testing.faults import OsFailingReplace

        if plan.name == "00001":
            shards_.os = OsFailingReplace("cleaned/00001.parquet")  # type: ignore[assignment]
        try:
            return W.write_web_shard(out, plan, *args)
        finally:
            shards_.os = os_  # the worker process runs other tasks after this one

    out = tmp_path / "run"
    monkeypatch.setattr(C, "write_shard", writer)
    with pytest.raises(StageFailed, match=r"1 shard\(s\) failed to write: 00001 \(OSError: .*injected crash"):
        run_capfilt(capfilt_data, out, models["captioner"], models["filter"], CF)
    monkeypatch.undo()
    assert (out / "candidates" / "00001.parquet").exists(), "the crash came after the candidates"
    assert not (out / "cleaned" / "00001.parquet").exists()
    assert not list(out.rglob("*.tmp"))
    assert not (out / STATS_DIR / "00001.json").exists()
    assert (out / STATS_DIR / "00000.json").exists(), "the other shard's writer went on"
    summary = run_capfilt(capfilt_data, out, models["captioner"], models["filter"], CF)
    assert summary.shards_written == 1 and summary.shards_skipped == 1
    _same_capfilt(out, capfilt_reference)
    assert not (out / "_parts").exists(), "parts are removed once every shard is written"


@pytest.mark.slow
def test_capfilt_driver_killed_mid_stage_then_rerun_gives_the_same_rows(
    ray_local, reference, models, tmp_path
):
    """`capfilt capfilt` over every download shard in a subprocess, SIGKILLed once a shard is
    done; the same command again gives the rows of an uninterrupted in-process run."""
    want = tmp_path / "want"
    run_capfilt(reference, want, models["captioner"], models["filter"], CF)
    out, log = tmp_path / "run", tmp_path / "cli.log"
    args = ["capfilt", "--data", str(reference), "--out", str(out)]
    args += ["--captioner", str(models["captioner"]), "--filter", str(models["filter"])]
    args += ["--k", "2", "--max-length", "12", "--min-length", "5", "--batch-size", "8"]
    kill_driver(start_cli(args, log, lambda: any((out / STATS_DIR).glob("*.json"))))
    total = len(done_shards(reference))
    done = {p.stem for p in (out / STATS_DIR).glob("*.json")}
    assert 0 < len(done) < total, "the driver died mid-stage"
    assert run_cli(args, log)[0] == 0, log.read_text()[-3000:]
    summary = read_json(out / "_summary.json")
    assert summary["shards_skipped"] == len(done) and summary["shards_written"] == total - len(done)
    _same_capfilt(out, want)


# ------------------------------------------------------------- download: a soak of faults


@pytest.mark.slow
def test_download_survives_a_worker_kill_on_every_other_shard(
    ray_local, urls, reference, fault_dir, tmp_path, monkeypatch
):
    """Half the shards lose their worker on the first attempt, at different points: before any
    fetch, and between the shard's temp file and its rename."""
    n = len(done_shards(reference))
    victims = list(range(0, n, 2))

    def task(shard: int, input_path: str, out_dir: str, cfg_json: str, attempt: int = 1) -> dict[str, Any]:
        import os as os_

        import capfilt.stages.download.driver as dl

        if shard in victims and attempt == 1:
            marker = fault_dir / f"killed-{shard}"
            if shard % 4 == 0:
                marker.write_text(str(os_.getpid()))
                os_.kill(os_.getpid(), signal.SIGKILL)
            real_replace = os_.replace

            def replace(src: Any, dst: Any) -> None:
                if str(dst).endswith(f"{shard:05d}.parquet"):
                    marker.write_text(str(os_.getpid()))
                    os_.kill(os_.getpid(), signal.SIGKILL)
                real_replace(src, dst)

            os_.replace = replace
        return dl.download_shard(shard, input_path, out_dir, cfg_json, attempt)

    monkeypatch.setattr(D, "download_shard", task)
    out = tmp_path / "download"
    summary = run_download(urls, out, DL, progress=False)
    assert sorted(int(p.name.split("-")[1]) for p in fault_dir.glob("killed-*")) == victims
    assert not summary.shards_failed
    assert {s: read_json(stats_path(out, s))["attempts"] for s in range(n)} == {
        s: 2 if s in victims else 1 for s in range(n)
    }
    _same_samples(read_samples(out), read_samples(reference))
