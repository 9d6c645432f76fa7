"""`capfilt status`: runs built by the real stages on a tiny world, finished, stopped at a stage,
and crashed inside the download (the files a crash leaves, then the rerun that resumes it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import ConfigError
from capfilt.core.shards import INPUTS_DIR, STATS_DIR, SUMMARY, write_json_atomic
from capfilt.pipeline import recipe
from capfilt.pipeline.recipe import load_recipe
from capfilt.pipeline.runner import run_recipe
from capfilt.pipeline.status import DONE, NOT_STARTED, UNFINISHED, run_status
from capfilt.stages.capfilt import decisions as capfilt_stage

WORLD = {"seed": 9, "n_web": 60, "n_human": 10, "n_test": 10, "bad_rate": 0.1}
DOWNLOAD = {"image_size": 32, "shard_size": 40, "thread_count": 8, "timeout": 5, "source": "shapes"}


def _recipe(tmp: Path, name: str, **extra: Any) -> recipe.Recipe:
    body = {"name": name, "out": str(tmp / name), "world": WORLD, "download": DOWNLOAD, **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_recipe(path)


@pytest.fixture(scope="module")
def stopped_at_pretrain(ray_local, tmp_path_factory) -> Path:
    """world and download finish; pretrain fails on its config after its manifest says running
    (a global batch larger than the data), as a run stops when a stage raises."""
    tmp = tmp_path_factory.mktemp("status-stopped")
    pre = {"model": "med-tiny", "steps": 2, "warmup_steps": 1, "batch_size": 4096}
    rec = _recipe(tmp, "stopped", stages=["world", "download", "pretrain", "evaluate"], pretrain=pre)
    with pytest.raises(ConfigError, match="no full global batch"):
        run_recipe(rec)
    return Path(rec.out)


@pytest.fixture(scope="module")
def download_run(ray_local, tmp_path_factory) -> tuple[recipe.Recipe, Path]:
    tmp = tmp_path_factory.mktemp("status-download")
    rec = _recipe(tmp, "dl", stages=["world", "download"])
    run_recipe(rec)
    return rec, Path(rec.out)


def test_status_reads_runs_without_importing_torch_or_ray():
    # `capfilt status` runs beside a job, on any machine that sees the run folder: it reads every
    # stage's files through the stage declarations, which import nothing heavy.
    code = (
        "import sys\n"
        "from capfilt.pipeline.status import run_status\n"
        "from capfilt.stages import registry\n"
        "names = [s.name for s in registry.stages()]\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules)\n"
        "print(names, heavy)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'capfilt'" in out.stdout and "'evaluate'" in out.stdout


def test_a_run_stopped_at_a_stage(stopped_at_pretrain):
    st = run_status(stopped_at_pretrain)
    assert st.name == "stopped" and not st.done
    assert [(s.name, s.state) for s in st.stages] == [
        ("world", DONE),
        ("download", DONE),
        ("pretrain", UNFINISHED),
        ("evaluate", NOT_STARTED),
    ]
    dl = st.stage("download")
    assert dl.shards_done == dl.shards_total == 2 and dl.wall_s is not None
    summary = json.loads((stopped_at_pretrain / "download" / SUMMARY).read_text())
    assert dl.rows == summary["status_counts"] and sum(dl.rows.values()) == summary["rows_in"]
    assert dl.rows.get("success", 0) > 0 and len(dl.rows) > 1  # the world's bad rows fail
    assert sum(dl.failures.values()) == sum(v for k, v in dl.rows.items() if k != "success")
    result = CliRunner().invoke(app, ["status", str(stopped_at_pretrain)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("2 of 4 stage(s) done")
    assert any(line.split()[:3] == ["download", "done", "2/2"] for line in lines)
    assert any(line.split()[:2] == ["pretrain", "unfinished"] for line in lines)
    assert any(line.split()[:3] == ["evaluate", "not", "started"] for line in lines)
    assert (
        "failures by reason:" in result.output
        and "`capfilt run` with the same recipe resumes it" in result.output
    )


def test_a_download_crashed_midway_then_resumed(download_run):
    rec, out = download_run
    assert run_status(out).done
    d = out / "download"
    # What a crash while shard 1 was being written leaves: the stage manifest as the runner wrote it
    # before starting, shard 1's input still in _inputs/, its stats file (written last) missing,
    # and no _summary.json (written at the end).
    manifest_path = out / "_stages" / "download.json"
    done = json.loads(manifest_path.read_text())
    write_json_atomic(
        manifest_path, {k: done[k] for k in ("stage", "key", "upstream")} | {"status": "running"}
    )
    (d / SUMMARY).unlink()
    (d / STATS_DIR / "00001.json").unlink()
    (d / INPUTS_DIR).mkdir(exist_ok=True)
    shutil.copy(d / "00001.parquet", d / INPUTS_DIR / "00001.parquet")
    st = run_status(out)
    dl = st.stage("download")
    assert (dl.state, dl.shards_done, dl.shards_total, dl.shards_failed) == (UNFINISHED, 1, 2, {})
    assert sum(dl.rows.values()) == 40  # the rows of the finished shard only
    # An earlier pass that gave up on shard 1 left it in _summary.json: listed until it is done.
    write_json_atomic(d / SUMMARY, {"shards_total": 2, "shards_failed": {"1": "RayTaskError: worker died"}})
    dl = run_status(out).stage("download")
    assert dl.shards_failed == {"00001": "RayTaskError: worker died"}
    assert "failed shard: download 00001: RayTaskError: worker died" in run_status(out).lines()
    # The rerun resumes the download (same key, manifest not done) and finishes it.
    result = run_recipe(rec)
    assert "download" not in result.skipped and "world" in result.skipped
    st = run_status(out)
    assert st.done and st.stage("download").shards_done == 2 and st.stage("download").shards_failed == {}


def test_a_stage_folder_alone(download_run):
    _, out = download_run
    st = run_status(out / "download")
    assert [s.name for s in st.stages] == ["download"]
    assert st.stages[0].shards_total == 2


def test_capfilt_shards_from_its_manifest_and_stats(tmp_path):
    """The files run_capfilt writes: the manifest lists every input shard at start; a shard is
    done when its stats, cleaned and candidates files all exist."""
    d = tmp_path / "capfilt"
    write_json_atomic(d / "_manifest.json", {"stage": "capfilt", "inputs": {"00000": "a", "00001": "b"}})
    stats = {"texts": {"web": 10, "synthetic": 10}, "kept": {"web": 4, "synthetic": 7}}
    reasons = {capfilt_stage.REASON_BELOW: 8, "image not decodable": 1, capfilt_stage.REASON_NO_FILTER: 0}
    write_json_atomic(d / STATS_DIR / "00000.json", stats | {"reason_counts": reasons})
    for sub in ("cleaned", "candidates"):
        (d / sub).mkdir()
        (d / sub / "00000.parquet").write_bytes(b"")
    write_json_atomic(d / STATS_DIR / "00001.json", stats | {"reason_counts": {}})  # no shard files yet
    st = run_status(d).stages[0]
    assert (st.name, st.state, st.shards_done, st.shards_total) == ("capfilt", UNFINISHED, 1, 2)
    assert st.rows == {"texts": 20, "kept": 11} and st.progress == "kept 11 of 20 texts"
    assert st.failures == {capfilt_stage.REASON_BELOW: 8, "image not decodable": 1}


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="neither a run folder"):
        run_status(tmp_path)
    result = CliRunner().invoke(app, ["status", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a folder" in result.output
