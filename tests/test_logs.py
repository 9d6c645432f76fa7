"""Log lines carry the stage and the shard they come from."""

from __future__ import annotations

import io
import logging
import threading

import pytest

from capfilt.core.logs import FORMAT, ContextFilter, current, install, log_context


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT.replace("%(asctime)s ", "")))
    install([handler])
    install([handler])  # idempotent
    assert sum(isinstance(f, ContextFilter) for f in handler.filters) == 1
    logger = logging.getLogger("capfilt.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_stage_and_shard_appear_after_the_logger_name_and_are_restored(captured):
    logger, stream = captured
    logger.info("outside")
    with log_context(stage="capfilt"):
        logger.info("in the stage")
        with log_context(shard=3):
            logger.info("writing")
            assert current() == ("capfilt", "00003")
        with log_context(shard="human-00001"):
            logger.info("human")
        logger.info("between shards")
    logger.info("after")
    assert stream.getvalue().splitlines() == [
        "INFO capfilt.test_logs: outside",
        "INFO capfilt.test_logs [capfilt]: in the stage",
        "INFO capfilt.test_logs [capfilt 00003]: writing",
        "INFO capfilt.test_logs [capfilt human-00001]: human",
        "INFO capfilt.test_logs [capfilt]: between shards",
        "INFO capfilt.test_logs: after",
    ]
    assert current() == (None, None)


def test_a_context_stays_in_its_thread(captured):
    logger, stream = captured
    seen: list[tuple[str | None, str | None]] = []
    with log_context(stage="download", shard=1):
        t = threading.Thread(target=lambda: seen.append(current()))
        t.start()
        t.join()
    assert seen == [(None, None)]


def test_an_explicit_extra_wins_over_the_context(captured):
    logger, stream = captured
    with log_context(stage="download"):
        logger.info("retry", extra={"shard": "00007"})
    assert stream.getvalue().strip() == "INFO capfilt.test_logs [download 00007]: retry"
