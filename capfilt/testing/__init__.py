"""Fixtures for tests and benchmarks: tiny models, fault injection, BLIP-style .pth files, thread limits; imports lazily.

``import capfilt.testing`` loads neither torch nor Ray: every name is looked up in its module on
first use (``capfilt.testing.models``, ``capfilt.testing.faults``).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    # the CLI in-process
    "invoke_with_records": "cli",
    # BLIP .pth checkpoints
    "blip_names": "blip",
    # tiny models
    "TINY_VOCAB": "models",
    "center_itm": "models",
    "one_torch_thread": "models",
    "tiny_med": "models",
    "tiny_models": "models",
    "tiny_tokenizer": "models",
    # object storage
    "s3_server": "s3",
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

__all__ = sorted(_WHERE)  # each resolved by __getattr__ on first use


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
