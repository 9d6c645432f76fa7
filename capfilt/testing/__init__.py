"""Fixtures for tests and benchmarks: tiny models, fault injection, thread limits; imports lazily.

``import capfilt.testing`` loads neither torch nor Ray: every name is looked up in its module on
first use (``capfilt.testing.models``, ``capfilt.testing.faults``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on first use
    from capfilt.testing.faults import (
        DEADLINE_S,
        RAY_START_TIMEOUT,
        Gate,
        GaveUp,
        OsFailingReplace,
        cli_env,
        download_always_failing,
        download_killed_before_rename,
        dying_actor,
        kill_driver,
        log_since,
        patched,
        popen_cli,
        run_cli,
        start_cli,
        training_killed_at,
        wait_for,
    )
    from capfilt.testing.models import (
        TINY_VOCAB,
        center_itm,
        one_torch_thread,
        tiny_med,
        tiny_models,
        tiny_tokenizer,
    )

_WHERE = {
    # tiny models
    "TINY_VOCAB": "models",
    "center_itm": "models",
    "one_torch_thread": "models",
    "tiny_med": "models",
    "tiny_models": "models",
    "tiny_tokenizer": "models",
    # fault injection
    "DEADLINE_S": "faults",
    "RAY_START_TIMEOUT": "faults",
    "Gate": "faults",
    "GaveUp": "faults",
    "OsFailingReplace": "faults",
    "cli_env": "faults",
    "download_always_failing": "faults",
    "download_killed_before_rename": "faults",
    "dying_actor": "faults",
    "kill_driver": "faults",
    "log_since": "faults",
    "patched": "faults",
    "popen_cli": "faults",
    "run_cli": "faults",
    "start_cli": "faults",
    "training_killed_at": "faults",
    "wait_for": "faults",
}

__all__ = [
    "DEADLINE_S",
    "RAY_START_TIMEOUT",
    "TINY_VOCAB",
    "Gate",
    "GaveUp",
    "OsFailingReplace",
    "center_itm",
    "cli_env",
    "download_always_failing",
    "download_killed_before_rename",
    "dying_actor",
    "kill_driver",
    "log_since",
    "one_torch_thread",
    "patched",
    "popen_cli",
    "run_cli",
    "start_cli",
    "tiny_med",
    "tiny_models",
    "tiny_tokenizer",
    "training_killed_at",
    "wait_for",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
