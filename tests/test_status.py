"""`capfilt status`: runs built by the real stages on a tiny world, finished, stopped at a stage,
and crashed inside the download (the files a crash leaves, then the rerun that resumes it)."""

from __future__ import annotations

import json
import re
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


# ------------------------------------------------------------------------------ status --watch

N_SHARDS = 5
ROWS_PER_SHARD = 10


def _download_in_progress(root: Path) -> Path:
    """A run folder as a download leaves it midway: world done, the download's manifest running,
    every shard's input waiting in _inputs/, no shard done yet."""
    run = root / "run"
    write_json_atomic(run / "_run.json", {"name": "watched", "stages": ["world", "download"]})
    write_json_atomic(run / "_stages" / "world.json", {"stage": "world", "status": "done", "wall_s": 1.0})
    write_json_atomic(run / "_stages" / "download.json", {"stage": "download", "status": "running"})
    for shard in range(N_SHARDS):
        (run / "download" / INPUTS_DIR).mkdir(parents=True, exist_ok=True)
        (run / "download" / INPUTS_DIR / f"{shard:05d}.parquet").write_bytes(b"")
    return run


def _finish_shard(run: Path, shard: int) -> None:
    """What the download driver does when a shard is done: the shard file, its stats file (last),
    then its input goes."""
    d = run / "download"
    (d / f"{shard:05d}.parquet").write_bytes(b"")
    write_json_atomic(
        d / STATS_DIR / f"{shard:05d}.json",
        {
            "stage": "download",
            "shard": shard,
            "rows_in": ROWS_PER_SHARD,
            "status_counts": {"success": ROWS_PER_SHARD - 1, "failed_to_download": 1},
            "reason_counts": {"failed_to_download: HTTP Error 404: Not Found": 1},
        },
    )
    (d / INPUTS_DIR / f"{shard:05d}.parquet").unlink()


class _Tmux:
    """A tmux server on a private socket, one session running a clean bash, 200 x 50."""

    def __init__(self, cwd: Path) -> None:
        import os

        self.socket = f"capfilt-test-{os.getpid()}"
        env = {"PYTHONPATH": os.pathsep.join(sys.path), "PS1": "$ ", "TERM": "xterm-256color"}
        args = ["new-session", "-d", "-s", "w", "-x", "200", "-y", "50", "-c", str(cwd)]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        self("set-option", "-g", "remain-on-exit", "on", start=args + ["bash --norc --noprofile"])

    def __call__(self, *args: str, start: list[str] | None = None) -> str:
        cmd = ["tmux", "-L", self.socket]
        if start is not None:  # the first command starts the server with the session
            subprocess.run([*cmd, *start], check=True, capture_output=True, timeout=30)
        out = subprocess.run([*cmd, *args], check=True, capture_output=True, text=True, timeout=30)
        return out.stdout

    def send(self, *keys: str) -> None:
        self("send-keys", "-t", "w", *keys)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "w")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def _download_row(screen: str) -> list[str]:
    rows = [line.split() for line in screen.splitlines() if line.split()[:1] == ["download"]]
    return rows[0] if rows else []


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_status_watch_under_tmux_follows_a_run_in_progress(tmp_path):
    from capfilt.testing import wait_for

    run = _download_in_progress(tmp_path)
    watch = f"{sys.executable} -m capfilt status {run} --watch --interval 0.5; echo WATCH-EXIT=$?"
    tmux = _Tmux(tmp_path)
    try:
        tmux.send(watch, "Enter")
        wait_for(lambda: _download_row(tmux.screen())[2:3] == [f"0/{N_SHARDS}"], "the first frame", 60)
        screen = tmux.screen()
        assert "run watched in" in screen and "1 of 2 stage(s) done" in screen
        assert _download_row(screen)[:2] == ["download", "unfinished"]

        seen = [0]
        for shard in range(3):
            _finish_shard(run, shard)
            want = f"{shard + 1}/{N_SHARDS}"
            wait_for(lambda want=want: _download_row(tmux.screen())[2:3] == [want], f"shards done {want}", 60)
            seen.append(shard + 1)
        assert seen == [0, 1, 2, 3]  # the count moved forward, one shard at a time, in place
        screen = tmux.screen()
        assert screen.count("refreshed") == 1  # redrawn in place, not scrolled
        # Three shards done: images so far, a rate from the stats files' times, an ETA for the rest.
        line = next(x for x in screen.splitlines() if x.split()[:1] == ["download"])
        m = re.search(rf"download\s+unfinished\s+3/{N_SHARDS}\s+(\d+)\s+([\d.]+)\s+(\d+ (?:s|min|h))\s", line)
        assert m, line
        assert int(m.group(1)) == 3 * (ROWS_PER_SHARD - 1) and float(m.group(2)) > 0
        assert "failures by reason:" in screen and "failed_to_download: HTTP Error 404: Not Found" in screen

        # Ctrl-C stops watching with a final line; the run is not touched.
        tmux.send("C-c")
        wait_for(lambda: "WATCH-EXIT=0" in tmux.screen(), "the watch to stop on Ctrl-C", 60)
        assert "stopped watching: 1 of 2 stage(s) done; the run goes on" in tmux.screen()

        # Watch again to the end: the last shards, then the runner marks the stage done.
        tmux.send("clear", "Enter")
        tmux.send(watch, "Enter")
        wait_for(lambda: _download_row(tmux.screen())[2:3] == [f"3/{N_SHARDS}"], "the frame again", 60)
        for shard in range(3, N_SHARDS):
            _finish_shard(run, shard)
        wait_for(lambda: _download_row(tmux.screen())[2:3] == [f"{N_SHARDS}/{N_SHARDS}"], "every shard", 60)
        assert "WATCH-EXIT" not in tmux.screen()  # all shards done, the stage not yet: still watching
        write_json_atomic(run / "download" / SUMMARY, {"shards_total": N_SHARDS, "shards_failed": {}})
        write_json_atomic(
            run / "_stages" / "download.json", {"stage": "download", "status": "done", "wall_s": 12.0}
        )
        wait_for(lambda: "WATCH-EXIT=0" in tmux.screen(), "the watch to end with the run", 60)
        screen = tmux.screen()
        assert "run done: 2 of 2 stage(s) done in 13 s of stage time" in screen
        assert _download_row(screen)[:3] == ["download", "done", f"{N_SHARDS}/{N_SHARDS}"]
    finally:
        tmux.kill()


def test_watch_says_a_stage_failed_and_stops(tmp_path):
    """A download that gave up on a shard (every attempt failed) and stopped the run: the watch
    ends at once and says so."""
    run = _download_in_progress(tmp_path)
    for shard in range(N_SHARDS - 1):
        _finish_shard(run, shard)
    write_json_atomic(
        run / "download" / SUMMARY,
        {"shards_total": N_SHARDS, "shards_failed": {str(N_SHARDS - 1): "RayTaskError: worker died"}},
    )
    result = CliRunner().invoke(app, ["status", str(run), "--watch", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert _download_row(result.output)[:3] == ["download", "failed", f"{N_SHARDS - 1}/{N_SHARDS}"]
    assert lines[-1] == "run stopped: download failed; `capfilt run` with the same recipe retries it"
    assert result.output.count("refreshed") == 1  # one frame: nothing more will happen
