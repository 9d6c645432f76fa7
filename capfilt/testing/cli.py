"""The CLI run in-process as a test runs it, with the log records capfilt emitted meanwhile."""

from __future__ import annotations

import logging
from typing import Any


def invoke_with_records(args: list[str]) -> tuple[Any, list[logging.LogRecord]]:
    """(typer's Result, capfilt's log records at INFO and up, each with its stage and shard) of
    ``capfilt ARGS`` run through typer's CliRunner."""
    from typer.testing import CliRunner

    from capfilt.cli import app
    from capfilt.core.logs import ContextFilter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("capfilt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, records
