"""A trivial stage, as a test fixture: counts the rows of the download stage by status. It lives
in this one module; registering it (``registry.register(STAGE, after="download")``) is all it
takes for recipes to run it and for status, the CLI summary and the report to show it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from capfilt.core.stage import Section, Stage, StageContext, StageStatus

COUNTS = "counts.json"


class RowCountConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: str = "success"  # the status whose rows the summary names


class RowCountStage(Stage):
    name = "rowcount"
    help = "count the download stage's rows by status"
    sections: ClassVar[Mapping[str, Section]] = {
        "rowcount": Section(RowCountConfig, default_factory=RowCountConfig)
    }

    def upstream(self, recipe: Any) -> list[str]:
        return ["download"]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        by_status: Counter[str] = Counter()
        for shard in sorted(ctx.run.dir("download").glob("*.parquet")):
            by_status.update(pq.read_table(shard, columns=["status"]).column("status").to_pylist())
        cfg: RowCountConfig = self.config(ctx.recipe)
        result = {"rows": sum(by_status.values()), "named": by_status[cfg.status], "status": cfg.status}
        ctx.dir.mkdir(parents=True, exist_ok=True)
        (ctx.dir / COUNTS).write_text(json.dumps({**result, "by_status": dict(by_status)}))
        return result

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        return [f"counted {result['rows']} rows, {result['named']} of them {result['status']}"]

    def status(self, d: Path, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        if (d / COUNTS).is_file():
            st.progress = f"rows counted: {json.loads((d / COUNTS).read_text())['rows']}"
        return st


STAGE = RowCountStage()
