"""Fault injection for tests and the reliability benchmark: a gated HTTP front, the CLI in a
subprocess (again when its local Ray did not start in time), a driver SIGKILL, and stand-ins that
kill a Ray worker, actor or training worker once.

The stand-ins Ray runs are built inside functions, so Ray pickles them by value; they guard each
fault with a marker file, so it fires once and the caller can see that it did. A killed process is
SIGKILLed: no finally, no atexit, no flush.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = [
    "DEADLINE_S",
    "RAY_START_TIMEOUT",
    "GaveUp",
    "Gate",
    "OsFailingReplace",
    "cli_env",
    "download_always_failing",
    "download_killed_before_rename",
    "dying_actor",
    "kill_driver",
    "log_since",
    "patched",
    "popen_cli",
    "run_cli",
    "start_cli",
    "training_killed_at",
    "wait_for",
]

logger = logging.getLogger(__name__)

DEADLINE_S = 240.0  # for anything polled: a busy 2-core machine starts Ray slowly
# Ray gives a new local node's raylet a fixed 30 s to register; a loaded machine can miss it, and
# `capfilt` then exits at start-up. Such a run is started again, as a user would.
RAY_START_TIMEOUT = "The current node timed out during startup"


class GaveUp(AssertionError, TimeoutError):
    """A polled condition did not hold in time: a failed test, a timeout to a benchmark."""


def wait_for(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S, every: float = 0.2) -> None:
    """Poll ``cond`` until it holds, or raise GaveUp after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise GaveUp(f"gave up after {deadline_s:.0f} s waiting for {what}")
        time.sleep(every)


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` for the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ------------------------------------------------------------------------------ the gate


class Gate:
    """A loopback HTTP front for the world server: answers with a redirect to the world's file,
    at once for paths in ``open_paths`` and, for the others, only once ``release`` is set (None:
    everything passes). With it a caller holds some shards mid-download for as long as it needs,
    without sleeping; ``held`` counts the requests it held."""

    def __init__(self, world_base: str, deadline_s: float = DEADLINE_S) -> None:
        self.world_base = world_base.rstrip("/")
        self.open_paths: set[str] | None = None
        self.release = threading.Event()
        self.held = 0
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                if gate.open_paths is not None and path not in gate.open_paths:
                    gate.held += 1
                    gate.release.wait(deadline_s)
                try:
                    self.send_response(HTTPStatus.FOUND)
                    self.send_header("Location", f"{gate.world_base}/{path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the client was killed meanwhile
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request: object, client_address: object) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the CLI, killed


def cli_env() -> dict[str, str]:
    """This process's environment for a `capfilt` subprocess with its own local Ray, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return env | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def popen_cli(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m capfilt ARGS` in its own session (so its Ray processes can be found after it
    is killed), output appended to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "capfilt", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=cli_env(),
            start_new_session=True,
        )


def log_since(log: Path, offset: int) -> str:
    """What ``log`` holds from byte ``offset`` on."""
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def run_cli(args: list[str], log: Path, tries: int = 3, timeout_s: float = 2 * DEADLINE_S) -> tuple[int, int]:
    """Run `capfilt ARGS` to its end, again while it fails only because its local Ray did not
    start in time. Returns (exit code, attempts)."""
    rc = 0
    for attempt in range(1, tries + 1):
        offset = log.stat().st_size if log.exists() else 0
        rc = popen_cli(args, log).wait(timeout=timeout_s)
        if rc == 0 or RAY_START_TIMEOUT not in log_since(log, offset):
            return rc, attempt
        logger.warning("capfilt %s: local Ray did not start in time; running it again", args[0])
    return rc, tries


def start_cli(
    args: list[str], log: Path, ready: Callable[[], bool], tries: int = 3, deadline_s: float = DEADLINE_S
) -> subprocess.Popen[bytes]:
    """Start `capfilt ARGS` and wait until ``ready()`` holds while it runs (starting it again if
    its local Ray did not start in time). Returns the running process; GaveUp if it ended."""
    for _ in range(tries):
        offset = log.stat().st_size if log.exists() else 0
        proc = popen_cli(args, log)

        def going(proc: subprocess.Popen[bytes] = proc) -> bool:
            return ready() or proc.poll() is not None

        wait_for(going, f"capfilt {args[0]} to get going", deadline_s)
        if proc.poll() is None:
            return proc
        if RAY_START_TIMEOUT not in log_since(log, offset):
            break
        logger.warning("capfilt %s: local Ray did not start in time; starting it again", args[0])
    raise GaveUp(f"capfilt {args[0]} ended before the fault:\n{log.read_text()[-3000:]}")


def kill_driver(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver alone. Ray's workers, raylet and GCS share its fate (PR_SET_PDEATHSIG):
    wait until they are gone, so nothing of the killed run still writes shards. Ray's dashboard
    and runtime-env agents outlive it by minutes; they run no tasks, and are killed here by pid."""
    import psutil

    started = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=60)
    if rc != -signal.SIGKILL:
        raise AssertionError(f"the driver ended with {rc} before it was killed")

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def agent(p: psutil.Process) -> bool:
        try:
            return "Agent" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    workers = [p for p in started if not agent(p)]
    try:
        wait_for(lambda: not any(alive(p) for p in workers), "the killed driver's Ray processes to exit", 60)
    finally:
        for p in started:
            if alive(p):
                p.kill()
        psutil.wait_procs(started, timeout=30)


# --------------------------------------------------------------------- stand-ins Ray runs


def download_killed_before_rename(victim: int, marker: Path) -> Callable[..., dict[str, Any]]:
    """A stand-in for download_shard (patch capfilt.stages.download.driver's): on shard ``victim``'s
    first attempt the worker fetches and encodes the whole shard, writes its temp file, and is
    SIGKILLed just before the rename (the marker gets ``{"pid", "tmp"}``). Other shards and later
    attempts are the real thing."""

    def task(shard: int, input_path: str, out_dir: str, cfg_json: str, attempt: int = 1) -> dict[str, Any]:
        import os as os_

        import capfilt.stages.download as dl

        if shard == victim and attempt == 1:
            real_replace = os_.replace

            def replace(src: Any, dst: Any) -> None:
                if str(dst).endswith(f"{victim:05d}.parquet"):
                    marker.write_text(json.dumps({"pid": os_.getpid(), "tmp": str(src)}))
                    os_.kill(os_.getpid(), signal.SIGKILL)
                real_replace(src, dst)

            os_.replace = replace  # type: ignore[assignment]  # this process dies with it
        return dl.download_shard(shard, input_path, out_dir, cfg_json, attempt)

    return task


def download_always_failing(victim: int) -> Callable[..., dict[str, Any]]:
    """A stand-in for download_shard that raises on every attempt of shard ``victim``."""

    def task(shard: int, input_path: str, out_dir: str, cfg_json: str, attempt: int = 1) -> dict[str, Any]:
        import capfilt.stages.download as dl

        if shard == victim:
            raise RuntimeError(f"injected fault: disk full on attempt {attempt}")
        return dl.download_shard(shard, input_path, out_dir, cfg_json, attempt)

    return task


class OsFailingReplace:
    """``os`` for capfilt.core.shards whose replace raises for a target path ending in ``suffix``:
    a crash between a file's temp write and its rename, in this process. ``calls`` lists the
    names replace was asked to write."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.calls: list[str] = []

    def __getattr__(self, attr: str) -> Any:
        return getattr(os, attr)

    def replace(self, src: Any, dst: Any) -> None:
        self.calls.append(Path(dst).name)
        if str(dst).endswith(self.suffix):
            raise OSError(f"injected crash before renaming {src} to {dst}")
        os.replace(src, dst)


def dying_actor(base: type, marker: Path, on_call: int) -> type:
    """``base`` whose process SIGKILLs itself on its ``on_call``-th batch, once (the marker gets
    ``{"pid", "chunks"}``)."""

    class Dying(base):  # type: ignore[misc, valid-type]
        calls = 0

        def __call__(self, batch: dict[str, Any]) -> Any:
            type(self).calls += 1
            if type(self).calls == on_call and not marker.exists():
                marker.write_text(json.dumps({"pid": os.getpid(), "chunks": len(batch["chunk"])}))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    Dying.__name__ = Dying.__qualname__ = base.__name__
    return Dying


def training_killed_at(step: int, marker: Path) -> Callable[[dict[str, Any]], Any]:
    """A stand-in for train_loop_per_worker (patch capfilt.train.driver's) whose process is
    SIGKILLed right after optimizer step ``step``, once (the marker gets ``{"pid", "step",
    "epoch"}``)."""

    def loop(config: dict[str, Any]) -> Any:
        import os as os_

        import capfilt.train.loop as T

        real_step = T.train_step

        def step_then_die(state: Any, *args: Any, **kwargs: Any) -> Any:
            out = real_step(state, *args, **kwargs)
            if state.step == step and not marker.exists():
                marker.write_text(json.dumps({"pid": os_.getpid(), "step": state.step, "epoch": state.epoch}))
                os_.kill(os_.getpid(), signal.SIGKILL)
            return out

        T.train_step = step_then_die
        return T._WorkerLoop(config).run()

    return loop
