"""Log lines that say where they come from: the stage of a run and the shard being written.

The pipeline runner sets the stage (``log_context(stage="download")``) and the stage drivers the
shard; ``ContextFilter`` on a handler adds them to every record as ``record.stage``,
``record.shard`` and ``record.where`` (" [capfilt 00003]", or "" outside any stage), which
``FORMAT`` prints after the logger name. The context lives in context variables, so it follows
the code that set it and never leaks into another thread's lines.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from capfilt.core.fs import Location

FORMAT = "%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s"

_stage: ContextVar[str | None] = ContextVar("capfilt_stage", default=None)
_shard: ContextVar[str | None] = ContextVar("capfilt_shard", default=None)


@contextlib.contextmanager
def log_context(*, stage: str | None = None, shard: str | int | None = None) -> Iterator[None]:
    """Within the block, log records carry this stage and/or shard (the other one is kept)."""
    tokens = []
    if stage is not None:
        tokens.append((_stage, _stage.set(stage)))
    if shard is not None:
        tokens.append((_shard, _shard.set(f"{shard:05d}" if isinstance(shard, int) else str(shard))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> tuple[str | None, str | None]:
    """(stage, shard) of the code running now."""
    return _stage.get(), _shard.get()


class ContextFilter(logging.Filter):
    """Adds ``stage``, ``shard`` and ``where`` to each record; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        stage = getattr(record, "stage", None) or _stage.get()
        shard = getattr(record, "shard", None) or _shard.get()
        record.stage, record.shard = stage, shard
        parts = [p for p in (stage, shard) if p]
        record.where = f" [{' '.join(parts)}]" if parts else ""
        return True


def install(handlers: Iterable[logging.Handler]) -> None:
    """Put a ContextFilter on each handler that has none (idempotent)."""
    for h in handlers:
        if not any(isinstance(f, ContextFilter) for f in h.filters):
            h.addFilter(ContextFilter())


# ---------------------------------------------------------------------------------------------
# A quiet terminal: our progress on the console, the engine's chatter in the run's log file.
# ---------------------------------------------------------------------------------------------

#: Lines Ray's log monitor copies from its worker processes start with "(name pid=N)" (after a
#: carriage return and colour codes); our own loggers' lines among them name a "capfilt." logger.
_WORKER_LINE = re.compile(r"^\((?P<who>[^)]*pid=\d+[^)]*|raylet|autoscaler|gcs_server|monitor)\)")
_DECOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")
#: Ray's own loggers, which print through handlers of their own rather than the root logger's.
ENGINE_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def is_engine_line(line: str) -> bool:
    """A line Ray copied from a worker that is not one of capfilt's log lines."""
    plain = _DECOR.sub("", line)
    return bool(_WORKER_LINE.match(plain)) and " capfilt." not in plain


class OursOnly(logging.Filter):
    """Lets through capfilt's own records, and anyone's errors; the rest goes to the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.name == "capfilt" or record.name.startswith("capfilt.") or record.levelno >= logging.ERROR
        )


class _LazyFile(io.TextIOBase):
    """A log file opened at its first write, so a command that fails on its input writes nothing.

    A log on object storage (a RemotePath) cannot be appended to: the lines go to a local file
    (``$CAPFILT_CACHE/logs/<hash of the URI>/``, seeded with the log already there, so a rerun
    appends like a local one) and ``upload`` puts the whole file back, at every stage's end
    (``sync_logs``) and when the block closes."""

    def __init__(self, path: Location) -> None:
        self.path = path
        self.remote = None if isinstance(path, Path) else path
        self.local = path if isinstance(path, Path) else _local_log(path)
        self._f: TextIO | None = None
        self._uploaded = -1  # size of the local file at the last upload

    def write(self, text: str) -> int:
        if self._f is None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            if self.remote is not None:
                self.local.write_bytes(self.remote.read_bytes() if self.remote.is_file() else b"")
            self._f = self.local.open("a", encoding="utf-8")
        return self._f.write(text)

    def flush(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.flush()

    def upload(self) -> None:
        """Put the local copy of a remote log back (one put of the whole file); nothing for a
        local log, a log with no line yet, or one unchanged since the last upload."""
        if self.remote is None or self._f is None:
            return
        self.flush()
        size = self.local.stat().st_size
        if size == self._uploaded:
            return
        from capfilt.core.fs import write_atomic

        try:
            write_atomic(self.remote, self.local.read_bytes())
            self._uploaded = size
        except OSError as err:  # a log that cannot be uploaded must not fail the run
            logging.getLogger(__name__).warning("cannot upload the log to %s: %s", self.remote, err)

    def close(self) -> None:
        if self._f is not None:
            self.upload()
            self._f.close()
            self._f = None
        super().close()


def _local_log(remote: Location) -> Path:
    import hashlib

    root = Path(os.environ.get("CAPFILT_CACHE", Path.home() / ".cache" / "capfilt"))
    return root / "logs" / hashlib.sha256(str(remote).encode()).hexdigest()[:16] / Path(str(remote)).name


_open_logs: list[_LazyFile] = []  # the log files of active `engine_log` blocks, innermost last


def sync_logs() -> None:
    """Upload the log files of active `engine_log` blocks that live on object storage (the runner
    calls it at every stage's end, so a remote run's log is never more than a stage behind)."""
    for f in _open_logs:
        f.upload()


class _SplitStream(io.TextIOBase):
    """A stand-in for sys.stderr/stdout: a line copied from a Ray worker that is not one of our
    log lines goes to the log file only; every other line to the terminal, and all to the file."""

    def __init__(self, console: TextIO, file: io.TextIOBase) -> None:
        self.console, self.file, self._buf = console, file, ""

    def write(self, text: str) -> int:
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self.file.write(line + "\n")
            if not is_engine_line(line):
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._buf and not is_engine_line(self._buf):
            self.console.write(self._buf)
            self.file.write(self._buf)
            self._buf = ""
        self.console.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return False  # the engine's progress bars then draw no repaint lines

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", "utf-8")


_quiet: list[bool] = []  # set while an `engine_log` block that hides the engine is active
_adopted: dict[str, tuple[list[logging.Handler], bool]] = {}


def adopt_engine_loggers() -> None:
    """Route Ray's own loggers through the root logger (to the log file; the console shows only
    their errors) while a quiet `engine_log` block is active. Ray configures them when it is
    imported, so `capfilt.core.cluster.ensure_ray` calls this after importing it."""
    if not _quiet:
        return
    for name in ENGINE_LOGGERS:
        lg = logging.getLogger(name)
        if name in _adopted:
            continue
        _adopted[name] = (list(lg.handlers), lg.propagate)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)]
        lg.propagate = True


def _release_engine_loggers() -> None:
    for name, (handlers, propagate) in _adopted.items():
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = handlers, propagate
    _adopted.clear()


@contextlib.contextmanager
def engine_log(path: Location, *, verbose: bool = False) -> Iterator[Location]:
    """Within the block, every log record (DEBUG and up) is appended to `path` (created at the
    first line; on object storage written locally and uploaded, see `_LazyFile`); unless `verbose`, the console's handlers show only capfilt's records and errors,
    Ray's own loggers write to the file only, and lines Ray copies from its workers reach the
    terminal only when they are capfilt's own."""
    root = logging.getLogger()
    stream = _LazyFile(path)
    _open_logs.append(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.setLevel(logging.DEBUG)
    install([handler])
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
    quiet = OursOnly()
    saved = sys.stdout, sys.stderr
    root.addHandler(handler)
    if not verbose:
        # Ray Data's progress bars repaint many times a second; shard progress is ours to log.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        for h in consoles:
            h.addFilter(quiet)
        sys.stdout = _SplitStream(saved[0], stream)  # type: ignore[assignment]
        sys.stderr = _SplitStream(saved[1], stream)  # type: ignore[assignment]
        _quiet.append(True)
        if "ray" in sys.modules:
            adopt_engine_loggers()
    try:
        yield path
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sys.stdout, sys.stderr = saved
        if not verbose:
            _quiet.pop()
            if not _quiet:
                _release_engine_loggers()
        for h in consoles:
            h.removeFilter(quiet)
        root.removeHandler(handler)
        _open_logs.remove(stream)
        stream.close()
