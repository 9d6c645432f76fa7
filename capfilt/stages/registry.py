"""The registry of stages: every stage a recipe may name, in the order they run.

Adding a stage is one module under `capfilt/stages/` (a `Stage` subclass, see `capfilt.core.stage`)
and one entry in `_BUILTIN` below; the recipe model, the runner, resource fitting, `capfilt status`,
the CLI summary and the report pick it up from here. `register` adds one at run time (a plugin, or
a test's fixture stage).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

from capfilt.core.stage import Stage

#: (module, attribute) of each built-in stage, in run order. Modules are light to import.
_BUILTIN: tuple[tuple[str, str], ...] = (
    ("capfilt.stages.world", "STAGE"),
    ("capfilt.stages.download", "STAGE"),
    ("capfilt.stages.vit", "STAGE"),
    ("capfilt.stages.pretrain", "PRETRAIN"),
    ("capfilt.stages.finetune", "STAGE"),
    ("capfilt.stages.capfilt", "STAGE"),
    ("capfilt.stages.calibrate", "STAGE"),
    ("capfilt.stages.dedup", "STAGE"),
    ("capfilt.stages.pretrain", "PRETRAIN2"),
    ("capfilt.stages.evaluate", "STAGE"),
)

_stages: list[Stage] | None = None
_version = 0  # bumped by register/unregister, so models derived from the registry are rebuilt


def _load() -> list[Stage]:
    global _stages
    if _stages is None:
        _stages = [getattr(importlib.import_module(m), attr) for m, attr in _BUILTIN]
    return _stages


def stages() -> Iterator[Stage]:
    yield from list(_load())


def names() -> tuple[str, ...]:
    return tuple(s.name for s in _load())


def default_names() -> tuple[str, ...]:
    """The stages a recipe runs when it lists none: every stage but the opt-in ones."""
    return tuple(s.name for s in _load() if s.by_default)


def get(name: str) -> Stage:
    for s in _load():
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; known stages are {list(names())}")


def version() -> int:
    return _version


def register(stage: Stage, *, after: str | None = None) -> None:
    """Add `stage` (after the stage named `after`, default: last). Its name and its sections must
    be new: two stages never write the same recipe field."""
    global _version
    loaded = _load()
    if stage.name in names():
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    taken = {sec for s in loaded for sec in s.sections}
    clash = sorted(taken & set(stage.sections))
    if clash:
        raise ValueError(f"stage {stage.name!r}: recipe section(s) {clash} belong to another stage")
    at = len(loaded) if after is None else [s.name for s in loaded].index(after) + 1
    loaded.insert(at, stage)
    _version += 1


def unregister(name: str) -> None:
    global _version
    loaded = _load()
    loaded[:] = [s for s in loaded if s.name != name]
    _version += 1
