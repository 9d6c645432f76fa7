"""The ``pretrain`` and ``pretrain2`` stages: MED pretrained with ITC + ITM + LM on Ray Train.
Round 1 trains on web + human pairs (or takes a published checkpoint, ``init.pretrained``);
round 2 trains a new model with the same section, steps and batch on CapFilt's cleaned shards,
so any gain comes from the data."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from capfilt.core.layout import CLEANED_DIR, TRAIN_CONFIG, TRAIN_SUMMARY
from capfilt.core.shards import read_json
from capfilt.core.stage import Fit, Section, Stage, StageContext, StageDir, StageStatus, readable
from capfilt.train.section import TrainSection

_CHECKPOINT = re.compile(r"checkpoint_(\d+)")


# --- shared by the training stages (pretrain, pretrain2, finetune) --------------------------------


def train(
    ctx: StageContext, section: TrainSection, data: list[Any], out: StageDir, run_name: str, **fixed: Any
) -> dict[str, Any]:
    """Run one training section into `out` (resuming a run that stopped there) and return its summary."""
    from capfilt.train.driver import run_training

    cfg = section.for_run(data, str(out), run_name=run_name, **fixed)
    summary = run_training(cfg, ray_address=ctx.recipe.ray_address, resume=(out / TRAIN_CONFIG).exists())
    return summary.to_json()


def fit_section(recipe: Any, field: str, label: str, cpus: float, gpus: float) -> Fit:
    from capfilt.pipeline.resources import fit_train

    section = recipe.section(field)
    if section is None:
        return Fit()
    update, messages = fit_train(section, label, cpus, gpus)
    return Fit({field: section.model_copy(update=update)} if update else {}, messages)


def _losses(d: Mapping[str, Any] | None) -> str:
    items = sorted((d or {}).items())
    return ", ".join(f"{k.removeprefix('loss_')} {readable(v)}" for k, v in items if k != "loss") or "-"


def train_lines(r: Mapping[str, Any]) -> list[str]:
    """A training summary as a person reads it."""
    if "steps" not in r:
        return [f"model: {r.get('model_dir')} (given)"]
    return [
        f"steps {r['steps']}, {readable(r['samples_per_s'], 1)} samples/s, {readable(round(r['wall_s']))} s",
        f"losses first: {_losses(r.get('first_losses'))}",
        f"losses final: {_losses(r.get('final_losses'))}",
        f"model: {r['model_dir']}",
    ]


def train_progress(d: StageDir) -> str:
    """Where a training folder stands, from its files: planned steps, checkpoints, the summary."""
    summary = read_json(d / TRAIN_SUMMARY) if (d / TRAIN_SUMMARY).is_file() else None
    config = read_json(d / TRAIN_CONFIG) if (d / TRAIN_CONFIG).is_file() else None
    planned = (summary or {}).get("total_steps") or (config or {}).get("steps")
    of = f" of {planned}" if planned else ""
    if summary:
        return f"step {summary.get('steps')}{of}, model {summary.get('model_dir')}"
    steps = [int(m.group(1)) for p in d.glob("*/checkpoint_*") if (m := _CHECKPOINT.fullmatch(p.name))]
    if steps:
        return f"checkpoint at step {max(steps)}{of}"
    return "starting" if config else ""


def vision_init(ctx_or_run: Any) -> tuple[dict[str, Any], list[str]]:
    """(TrainConfig fields, upstream stages) that start a pretraining round from the 'vit' stage's ViT."""
    run = getattr(ctx_or_run, "run", ctx_or_run)
    if "vit" not in run.recipe.stages:
        return {}, []
    return {"vision_init": run.manifest("vit")["result"]["file"]}, ["vit"]


def _section(recipe: Any) -> TrainSection:
    section: TrainSection | None = recipe.section("pretrain")
    if section is None:
        raise ValueError(
            "pretrain: the recipe trains a model but has no 'pretrain:' section (give steps or epochs)"
        )
    return section


class _TrainingStage(Stage):
    def summary(self, result: Mapping[str, Any]) -> list[str]:
        return train_lines(result)

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return {k: v for k, v in result.items() if k not in ("history", "extra")}

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        given = st.state == "done" and "steps" not in result
        st.progress = f"given: {result.get('model_dir')}" if given else train_progress(d)
        return st


class PretrainStage(_TrainingStage):
    name = "pretrain"
    help = "pretrain MED round 1 (ITC + ITM + LM) on web + human pairs, or take init.pretrained"
    sections: ClassVar[Mapping[str, Section]] = {
        "pretrain": Section(TrainSection | None, None, help="TrainConfig fields; round 2 uses the same")
    }
    reads = frozenset({"human"})

    def trains(self, recipe: Any) -> bool:
        return not recipe.init.pretrained

    def check(self, recipe: Any, check_paths: bool) -> None:
        if self.trains(recipe):
            _section(recipe)

    def upstream(self, recipe: Any) -> list[str]:
        if not self.trains(recipe):
            return []
        return ["download", *(["vit"] if "vit" in recipe.stages else [])]

    def _data(self, run: Any) -> list[dict[str, Any]]:
        karpathy, root = run.human_train()
        return [{"path": str(run.dir("download"))}, {"path": str(karpathy), "image_root": str(root)}]

    def _fixed(self, recipe: Any) -> dict[str, Any]:
        return {"tokenizer": recipe.init.tokenizer} if recipe.init.tokenizer else {}

    def key(self, recipe: Any) -> Any:
        if not self.trains(recipe):
            return {"init": recipe.init.pretrained}
        # The data and the ViT are the upstream stages' outputs; their keys are in `upstream`.
        return {"train": _section(recipe).key(), "fixed": self._fixed(recipe)}

    def uses_ray(self, recipe: Any) -> bool:
        return self.trains(recipe)

    def fit(self, recipe: Any, cpus: float, gpus: float) -> Fit:
        return fit_section(recipe, "pretrain", "pretrain", cpus, gpus) if self.trains(recipe) else Fit()

    def run(self, ctx: StageContext) -> dict[str, Any]:
        rec = ctx.recipe
        if not self.trains(rec):
            # A published checkpoint as round 1: nothing to train, the stage records where it is.
            return {
                "model_dir": rec.init.pretrained,
                "tokenizer_dir": rec.init.tokenizer or rec.init.pretrained,
            }
        vision, _ = vision_init(ctx)
        return train(
            ctx, _section(rec), self._data(ctx.run), ctx.dir, "pretrain", **self._fixed(rec), **vision
        )


class Pretrain2Stage(_TrainingStage):
    name = "pretrain2"
    help = "pretrain a new MED (round 2) with the same section on CapFilt's (or dedup's) cleaned shards"
    reads = frozenset({"human"})

    def check(self, recipe: Any, check_paths: bool) -> None:
        _section(recipe)

    def upstream(self, recipe: Any) -> list[str]:
        # calibrate re-decides capfilt's output; dedup (when listed) is what round 2 reads
        extra = [s for s in ("dedup", "calibrate", "vit") if s in recipe.stages]
        return ["capfilt", "pretrain", *extra]

    def _data_stage(self, recipe: Any) -> str:
        """Whose cleaned shards round 2 trains on: dedup's when the recipe dedups, else CapFilt's."""
        return "dedup" if "dedup" in recipe.stages else "capfilt"

    def key(self, recipe: Any) -> Any:
        return {"train": _section(recipe).key()}

    def uses_ray(self, recipe: Any) -> bool:
        return True

    def fit(self, recipe: Any, cpus: float, gpus: float) -> Fit:
        return fit_section(recipe, "pretrain", "pretrain", cpus, gpus)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        r1 = ctx.run.manifest("pretrain")["result"]
        vision, _ = vision_init(ctx)  # the same starting ViT as round 1
        # web, synthetic and human kept (duplicates out, when the recipe dedups)
        data = [{"path": str(ctx.run.dir(self._data_stage(ctx.recipe)) / CLEANED_DIR)}]
        return train(
            ctx, _section(ctx.recipe), data, ctx.dir, "pretrain2", tokenizer=r1["tokenizer_dir"], **vision
        )


PRETRAIN = PretrainStage()
PRETRAIN2 = Pretrain2Stage()
