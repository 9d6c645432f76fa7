"""The ``evaluate`` stage: both rounds zero-shot on the test split (retrieval R@k, BLEU/CIDEr),
CapFilt's filter and noise against the world's ground truth, and the HTML report of the run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from capfilt.core import fs
from capfilt.core.layout import CALIBRATION
from capfilt.core.stage import Section, Stage, StageContext, StageDir, StageStatus, readable
from capfilt.eval.config import EvalConfig
from capfilt.stages import registry

log = logging.getLogger(__name__)

ROUNDS = (("round1", "pretrain"), ("round2", "pretrain2"))


class EvaluateStage(Stage):
    name = "evaluate"
    help = "evaluate both rounds zero-shot on the test split and write the report"
    sections: ClassVar[Mapping[str, Section]] = {
        "evaluate": Section(EvalConfig, default_factory=EvalConfig, help="retrieval k, batch, device")
    }

    def check(self, recipe: Any, check_paths: bool) -> None:
        if not recipe.has_world() and (recipe.human is None or recipe.human.karpathy_test is None):
            raise ValueError(
                "human.karpathy_test: evaluate needs a test split (the shapes world or this JSON)"
            )

    def upstream(self, recipe: Any) -> list[str]:
        return [s for s in ("pretrain", "pretrain2", "capfilt", "calibrate") if s in recipe.stages]

    def fit(self, recipe: Any, cpus: float, gpus: float) -> Any:
        from capfilt.core.stage import Fit

        cfg: EvalConfig = self.config(recipe)
        if gpus <= 0 and cfg.device and cfg.device.startswith("cuda"):
            return Fit(
                {"evaluate": cfg.model_copy(update={"device": "cpu"})},
                [f"evaluate device {cfg.device} -> cpu"],
            )
        return Fit()

    def run(self, ctx: StageContext) -> dict[str, Any]:
        ctx.dir.mkdir(parents=True, exist_ok=True)
        return evaluate_run(ctx.run, ctx.dir)

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        from capfilt.eval.report import round_rows, summary_table

        rounds = result.get("rounds") or {}
        lines = summary_table(round_rows(rounds)).splitlines() if rounds else []
        q = result.get("capfilt") or {}
        if q:
            lines.append(
                f"noise before CapFilt {readable(q.get('noise_before'))}, after {readable(q.get('noise_after'))}"
            )
            for src, h in (q.get("calibrated_held_out") or {}).items():
                lines.append(
                    f"calibrated {src} threshold {readable(h['threshold'])} (target precision {h['target']}): "
                    f"precision {readable(h['precision'])}, recall {readable(h['recall'])} on the "
                    f"{h['rows']:,} rows not labelled"
                )
        lines.append(f"report: {result.get('report')}")
        return lines

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return None  # the report is this stage's own output

    def status(self, d: StageDir, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        if result.get("report"):
            st.progress = f"report {result['report']}"
        return st


def evaluate_run(run: Any, d: StageDir) -> dict[str, Any]:
    """Both rounds zero-shot on the test split, CapFilt's quality against the world, the report.
    A remote stage folder gets its report written in a local temp folder, then uploaded."""
    import tempfile

    from capfilt.eval.evaluate import evaluate_model, write_results
    from capfilt.eval.quality import evaluate_capfilt, label_candidates
    from capfilt.eval.report import write_report
    from capfilt.eval.report_inputs import stage_runs
    from capfilt.eval.split import load_split, load_world_test_split
    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.model.tokenizer import TokenIds, load_tokenizer
    from capfilt.stages.capfilt.rethreshold import read_candidates
    from capfilt.stages.download import read_samples
    from capfilt.world import load_world

    rec = run.recipe
    cfg: EvalConfig = rec.section("evaluate")
    world = load_world(run.dir("world")) if rec.has_world() else None
    if world is not None:
        split = load_world_test_split(run.dir("world"))
    else:
        assert rec.human is not None and rec.human.karpathy_test is not None  # checked with the recipe
        split = load_split(rec.human.karpathy_test, rec.human.test_root())
    rounds: dict[str, Any] = {}
    for label, stage in ROUNDS:
        if not run.has(stage):
            continue
        res = run.manifest(stage)["result"]
        tok = load_tokenizer(res["tokenizer_dir"])
        # A .pth holds no token ids: the tokenizer's (folders carry theirs and ignore these).
        med = load_checkpoint(res["model_dir"], rec.init.arch, token_ids=TokenIds.from_tokenizer(tok))
        log.info("evaluate: %s (%s)", label, res["model_dir"])
        rounds[label] = evaluate_model(med, tok, split, cfg, world=world)
    quality: dict[str, Any] = {}
    candidates = samples = None
    threshold = rec.section("capfilt").threshold
    if run.has("capfilt"):
        candidates = read_candidates(run.dir("capfilt"))
        samples = read_samples(
            run.dir("download"), columns=["uid", "row", "url", "status", "reason", "image"]
        )
        if world is not None:
            quality = evaluate_capfilt(candidates, samples, world, threshold=threshold)
            candidates = label_candidates(candidates, samples, world)
    elif run.has("download"):  # the report's example URLs of failed downloads
        samples = read_samples(run.dir("download"), columns=["uid", "row", "url", "status", "reason"])
    calibration = None
    if run.has("capfilt") and (run.dir("capfilt") / CALIBRATION).is_file():
        doc = fs.read_json(run.dir("capfilt") / CALIBRATION)
        calibration = doc.get("sources")
        if (
            world is not None
            and calibration
            and candidates is not None
            and "truth" in candidates.column_names
        ):
            from capfilt.eval.calibrate import read_labels
            from capfilt.stages.calibrate import held_out_precision

            # The calibration's promise against the world's truth, on every row not labelled.
            quality["calibrated_held_out"] = held_out_precision(
                candidates, calibration, read_labels(doc["labels"])
            )
    results = {"rounds": rounds, "capfilt": quality}
    write_results(d / "results.json", results)
    with tempfile.TemporaryDirectory(prefix="capfilt-report-") as tmp:
        local = d if isinstance(d, Path) else Path(tmp)
        report = write_report(
            str(run.out),
            local.resolve() / "report.html",  # absolute: write_report places a relative path inside run.out
            title=f"capfilt run {rec.name}",
            stages=stage_tables(run),
            runs=stage_runs(run.out),
            rounds=rounds,
            capfilt=quality,
            candidates=candidates,
            images=samples,
            samples=samples,
            threshold=threshold,
            calibration=calibration,
        )
        if not isinstance(d, Path):
            fs.put(local, d)
            report = d / report.name
    return {**results, "report": str(report)}


def stage_tables(run: Any) -> dict[str, Mapping[str, Any]]:
    """The report's table of every stage that has run, in run order, as each stage declares it."""
    out: dict[str, Mapping[str, Any]] = {}
    for name in run.recipe.stages:
        if name == EvaluateStage.name or not run.has(name):
            continue
        result = run.manifest(name).get("result")
        table = registry.get(name).report(result) if isinstance(result, dict) else None
        if table:
            out[name] = table
    return out


STAGE = EvaluateStage()
