"""Log lines that say where they come from: the stage of a run and the shard being written.

The pipeline runner sets the stage (``log_context(stage="download")``) and the stage drivers the
shard; ``ContextFilter`` on a handler adds them to every record as ``record.stage``,
``record.shard`` and ``record.where`` (" [capfilt 00003]", or "" outside any stage), which
``FORMAT`` prints after the logger name. The context lives in context variables, so it follows
the code that set it and never leaks into another thread's lines.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

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
