"""The stage interface: what each stage of a run declares, so the recipe, the runner, resource
fitting, `capfilt status`, the CLI summary and the report can all be derived from the registry
(`capfilt.stages.registry`) instead of knowing any one stage.

A stage module imports nothing heavy at its top (no torch, no Ray): `capfilt status` reads a run
folder through the same declarations on any machine that sees it. Heavy imports go inside `run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

#: A stage's folder: a ``capfilt.core.fs.Location`` (a local Path, or a RemotePath when the run
#: folder is on object storage). Typed Any while some stage drivers still annotate their folders
#: as ``str | Path``; tighten to ``Location`` once every driver takes one.
StageDir = Any

if TYPE_CHECKING:
    from capfilt.pipeline.recipe import Recipe
    from capfilt.pipeline.runner import Run

DONE, UNFINISHED, NOT_STARTED = "done", "unfinished", "not started"


@dataclass(frozen=True)
class Section:
    """A field a stage adds to the recipe: its type and its default (a factory, or a value)."""

    type: Any
    default: Any = None
    default_factory: Callable[[], Any] | None = None
    help: str = ""


@dataclass
class StageStatus:
    """What `capfilt status` shows of one stage, read from its files."""

    name: str
    state: str  # DONE, UNFINISHED (running now, or stopped: a rerun resumes it) or NOT_STARTED
    wall_s: float | None = None  # of the finished stage
    shards_done: int | None = None  # None: the stage has no shards
    shards_total: int | None = None  # as far as the files tell
    shards_failed: dict[str, str] = field(default_factory=dict)  # shard -> last error, not done since
    rows: dict[str, int] = field(default_factory=dict)  # download: rows by status; CapFilt: texts, kept
    failures: dict[str, int] = field(default_factory=dict)  # rows (texts) by failure reason
    progress: str = ""  # one line: "step 200 of 1000", "kept 340 of 900 texts", ...


@dataclass
class StageContext:
    """What `Stage.run` gets: the run (recipe, other stages' results) and its own folder."""

    run: Run
    dir: StageDir  # a Location: a local Path, or a RemotePath when the run folder is on object storage
    resuming: bool  # the same stage (same key) stopped midway before: resume, don't start over

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe


@dataclass
class Fit:
    """A stage's resource requests scaled to a cluster: recipe fields to replace, and a message each."""

    update: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


class Stage:
    """One stage of a run. Subclasses set `name` and `sections` and override what they need.

    Lifecycle: the recipe model has a field per section of every registered stage; `check` adds
    the stage's cross-stage rules to recipe validation; `fit` scales its Ray requests to the
    cluster; the runner keys the stage by `key` and `upstream`, skips it when that key is done,
    else calls `run`; `summary` gives the CLI's lines of its result, `report` the report's table,
    `status` what its files say while it runs or after.
    """

    name: ClassVar[str]
    #: Recipe fields this stage adds, in order; the first one is "its" config (`config`).
    sections: ClassVar[Mapping[str, Section]] = {}
    #: One line for `capfilt status` and the README's table.
    help: ClassVar[str] = ""
    #: Shared recipe inputs it reads ("human", "urls"): the shapes world provides them, else the recipe must.
    reads: ClassVar[frozenset[str]] = frozenset()
    #: Whether a recipe that lists no stages runs it; an opt-in stage (dedup) runs only when listed.
    by_default: ClassVar[bool] = True

    # --- the recipe -----------------------------------------------------------------------------

    def config(self, recipe: Recipe) -> Any:
        """This stage's own section of the recipe (None for a stage without one)."""
        return recipe.section(next(iter(self.sections))) if self.sections else None

    def check(self, recipe: Recipe, check_paths: bool) -> None:
        """Cross-stage rules, checked with the recipe before any work: raise ValueError naming the
        field to change ("download.url_policy: ...")."""

    def upstream(self, recipe: Recipe) -> list[str]:
        """The stages whose outputs this one reads; a change in any of them reruns this one."""
        return []

    def key(self, recipe: Recipe) -> Any:
        """What identifies this stage's work besides its upstream: by default its config."""
        cfg = self.config(recipe)
        return json_of(cfg)

    # --- resources ------------------------------------------------------------------------------

    def uses_ray(self, recipe: Recipe) -> bool:
        return False

    def fit(self, recipe: Recipe, cpus: float, gpus: float) -> Fit:
        """Its Ray requests scaled to a cluster of `cpus` and `gpus` (``capfilt.pipeline.resources``)."""
        return Fit()

    # --- work -----------------------------------------------------------------------------------

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotImplementedError(f"stage {self.name} has no run()")

    # --- what a person reads ----------------------------------------------------------------------

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        """Lines for the CLI's end-of-run summary. Default: the result's plain values, rounded."""
        return [f"{k}: {readable(v)}" for k, v in result.items() if isinstance(v, str | int | float | bool)]

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The report's table of this stage (name -> value), or None for no table. Default: the
        summary lines, one row each."""
        lines = self.summary(result)
        return {str(i + 1): line for i, line in enumerate(lines)} if lines else None

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        """Fill `st` from the stage's folder `d` (and its manifest's result when done). `d` is a
        local Path or a RemotePath (``capfilt.core.fs``): use `/`, `glob`, `is_file`, `exists`."""
        return st


def json_of(value: Any) -> Any:
    """A config as plain JSON values (a pydantic model dumped in JSON mode), for stage keys."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def readable(value: Any, digits: int = 3) -> str:
    """A number as a person reads it: floats rounded to `digits` decimals (at least 3 significant
    figures for small ones), ints with thousands separators, a dict as "key value, ..." of those;
    anything else as str."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {readable(v, digits)}" for k, v in value.items()) or "-"
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0 or abs(value) >= 10 ** (-digits):
            text = f"{value:,.{digits}f}"
            return text.rstrip("0").rstrip(".") if "." in text else text
        return f"{value:.{digits}g}"
    return str(value)
