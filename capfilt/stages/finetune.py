"""The ``finetune`` stage: a captioner (LM) and a filter (ITC + ITM) fine-tuned separately from the
round-1 model on the human pairs. Two copies, decoupled, as BLIP found that sharing them lets the
filter confirm the captioner's mistakes. A published model given as ``init.captioner`` or
``init.filter`` replaces that fine-tune."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from capfilt.core.stage import Fit, Section, Stage, StageContext, StageDir, StageStatus
from capfilt.stages.pretrain import fit_section, train, train_lines, train_progress
from capfilt.train.section import CaptionerSection, FilterSection, TrainSection

ROLES = ("captioner", "filter")


class FinetuneStage(Stage):
    name = "finetune"
    help = "fine-tune the captioner and the filter on the human pairs (or take init.captioner/filter)"
    sections: ClassVar[Mapping[str, Section]] = {
        "finetune_captioner": Section(CaptionerSection | None, None, help="the captioner's training (LM)"),
        "finetune_filter": Section(FilterSection | None, None, help="the filter's training (ITC + ITM)"),
    }
    reads = frozenset({"human"})

    def given(self, recipe: Any, role: str) -> str | None:
        return getattr(recipe.init, role)

    def _section(self, recipe: Any, role: str) -> TrainSection:
        field = f"finetune_{role}"
        section: TrainSection | None = recipe.section(field)
        if section is None:
            raise ValueError(
                f"{field}: the {role} is fine-tuned here but the recipe has no '{field}:' section "
                f"(give steps or epochs, or a published model as init.{role})"
            )
        return section

    def check(self, recipe: Any, check_paths: bool) -> None:
        for role in ROLES:
            given = self.given(recipe, role)
            if not given:
                self._section(recipe, role)
            elif check_paths:
                # A published model must have the heads its role needs (a retrieval .pth is no
                # captioner): said now, naming the file and its heads, not inside a Ray actor.
                from capfilt.core.errors import ConfigError
                from capfilt.model.checkpoint import check_role

                try:
                    check_role(given, role, label=f"init.{role}")  # type: ignore[arg-type]
                except ConfigError as err:
                    raise ValueError(str(err)) from None

    def upstream(self, recipe: Any) -> list[str]:
        return ["pretrain"]

    def key(self, recipe: Any) -> Any:
        out: dict[str, Any] = {"given": recipe.init.model_dump()}
        for role in ROLES:
            if not self.given(recipe, role):
                out[role] = self._section(recipe, role).key()
        return out

    def uses_ray(self, recipe: Any) -> bool:
        return not all(self.given(recipe, role) for role in ROLES)

    def fit(self, recipe: Any, cpus: float, gpus: float) -> Fit:
        fit = Fit()
        for role in ROLES:
            if not self.given(recipe, role):
                part = fit_section(recipe, f"finetune_{role}", f"finetune {role}", cpus, gpus)
                fit.update.update(part.update)
                fit.messages += part.messages
        return fit

    def run(self, ctx: StageContext) -> dict[str, Any]:
        rec = ctx.recipe
        base = ctx.run.manifest("pretrain")["result"]
        karpathy, root = ctx.run.human_train()
        data = [{"path": str(karpathy), "image_root": str(root)}]
        out: dict[str, Any] = {}
        for role in ROLES:
            given = self.given(rec, role)
            if given:
                out[role] = {"model_dir": given, "tokenizer_dir": rec.init.tokenizer or base["tokenizer_dir"]}
                continue
            out[role] = train(
                ctx,
                self._section(rec, role),
                data,
                ctx.dir / role,
                role,
                init=base["model_dir"],
                tokenizer=base["tokenizer_dir"],
            )
        return out

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        return [f"{role}: {line}" for role in ROLES for line in train_lines(result.get(role, {}))[:3]]

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return {
            role: {k: v for k, v in (result.get(role) or {}).items() if k not in ("history", "extra")}
            for role in ROLES
        }

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        parts = []
        for role in ROLES:
            r = result.get(role) or {}
            if r and "steps" not in r:
                parts.append(f"{role} given")
            elif (d / role).is_dir():
                parts.append(f"{role} {train_progress(d / role)}")
        st.progress = "; ".join(parts)
        return st


STAGE = FinetuneStage()
