"""The ``capfilt`` stage: caption every web image, score every text with the filter's ITM, and
write cleaned shards (and every candidate with its scores) for the next pretraining round. The
work is in this package's modules; this one declares the stage and stays light to import."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from capfilt.core.layout import CANDIDATES_DIR, CAPTIONS_DIR, CLEANED_DIR, MANIFEST, STATS_DIR
from capfilt.core.shards import read_json
from capfilt.core.stage import Fit, Section, Stage, StageContext, StageStatus, readable
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.decisions import REASON_HUMAN, REASON_NO_FILTER

# CapFilt reasons for texts kept without a score: not failures.
KEPT_REASONS = (REASON_NO_FILTER, REASON_HUMAN)
_HALF = ("bfloat16", "float16")


def _shrink_actors(a: int, b: int, per: float, fixed: float, budget: float) -> tuple[int, int, float]:
    """Actor counts (a, b) and the amount each asks for (``per``) so that (a + b) * per + fixed fits
    ``budget``: the larger pool loses an actor first; with one actor each, ``per`` shrinks."""
    while (a + b) * per + fixed > budget and max(a, b) > 1:
        if a >= b:
            a -= 1
        else:
            b -= 1
    if (a + b) * per + fixed > budget:
        per = max((budget - fixed) / (a + b), 0.0)
    return a, b, per


def fit_capfilt(cf: CapFiltConfig, cpus: float, gpus: float) -> tuple[dict[str, Any], list[str]]:
    """CapFilt's actor pools scaled to a cluster: (fields to change, a message each)."""
    update: dict[str, Any] = {}
    msgs: list[str] = []
    gpa = cf.gpus_per_actor
    if gpa and gpus <= 0:
        update["gpus_per_actor"] = 0.0
        msgs.append(f"capfilt gpus_per_actor {gpa:g} -> 0 (CPU actors)")
    elif gpa and (cf.captioner_actors + cf.filter_actors) * gpa > gpus:
        a, b, per = _shrink_actors(cf.captioner_actors, cf.filter_actors, gpa, 0.0, gpus)
        update |= {"captioner_actors": a, "filter_actors": b, "gpus_per_actor": per}
        msgs.append(
            f"capfilt actors {cf.captioner_actors}+{cf.filter_actors} x {gpa:g} GPU -> "
            f"{a}+{b} x {per:g} GPU ({gpus:g} GPUs)"
        )
    if gpus <= 0 and cf.dtype in _HALF:
        update["dtype"] = "float32"
        msgs.append(f"capfilt dtype {cf.dtype} -> float32 (half precision is for GPUs)")
    a0 = int(update.get("captioner_actors", cf.captioner_actors))
    b0 = int(update.get("filter_actors", cf.filter_actors))
    pre = min(cf.preprocess_cpus, cpus)
    if pre != cf.preprocess_cpus:
        update["preprocess_cpus"] = pre
        msgs.append(f"capfilt preprocess_cpus {cf.preprocess_cpus:g} -> {pre:g}")
    if (a0 + b0) * cf.cpus_per_actor + pre > cpus:
        a, b, per = _shrink_actors(a0, b0, cf.cpus_per_actor, pre, cpus)
        if per <= 0:  # not even a sliver left beside the read tasks: share the CPUs
            per = cpus / (a + b + 1)
        update |= {"captioner_actors": a, "filter_actors": b, "cpus_per_actor": per}
        msgs.append(
            f"capfilt actors {a0}+{b0} x {cf.cpus_per_actor:g} CPU -> {a}+{b} x {per:g} CPU ({cpus:g} CPUs)"
        )
    return update, msgs


class CapFiltStage(Stage):
    name = "capfilt"
    help = "caption every web image, filter every text by ITM, write cleaned and candidate shards"
    sections: ClassVar[Mapping[str, Section]] = {
        "capfilt": Section(CapFiltConfig, default_factory=CapFiltConfig, help="decoding, threshold, actors")
    }
    reads = frozenset({"human"})

    def upstream(self, recipe: Any) -> list[str]:
        return ["download", "finetune"]

    def uses_ray(self, recipe: Any) -> bool:
        return True

    def fit(self, recipe: Any, cpus: float, gpus: float) -> Fit:
        cf: CapFiltConfig = self.config(recipe)
        update, msgs = fit_capfilt(cf, cpus, gpus)
        return Fit({"capfilt": cf.model_copy(update=update)} if update else {}, msgs)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from capfilt.stages.capfilt.driver import run_capfilt

        rec = ctx.recipe
        tuned = ctx.run.manifest("finetune")["result"]
        karpathy, root = ctx.run.human_train()
        summary = run_capfilt(
            ctx.run.dir("download"),
            ctx.dir,
            captioner=tuned["captioner"]["model_dir"],
            filter=tuned["filter"]["model_dir"],
            cfg=self.config(rec),
            ray_address=rec.ray_address,
            tokenizer=tuned["captioner"]["tokenizer_dir"],
            arch=rec.init.arch,
            human=karpathy,
            human_images=root,
        )
        return summary.to_json()

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        lines = [
            f"images {readable(result.get('images'))}, texts considered {readable(result.get('texts_considered'))}",
            f"kept {readable(result.get('kept'))}, images with no kept text {readable(result.get('images_no_kept_text'))}",
            f"mean ITM {readable(result.get('mean_itm'))}",
        ]
        before = (result.get("extra") or {}).get("dedup_before")
        if before:
            lines.append(
                f"dedup before captioning: {readable(before['images_skipped'])} images skipped "
                f"(exact {readable(before['images_skipped_exact'])}, near {readable(before['images_skipped_near'])}), "
                f"about {readable(before.get('seconds_saved'))} s of captioning + filtering saved "
                f"for {readable(before.get('embed_pass_s'))} s of embedding"
            )
        return lines

    def report(self, result: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return {k: v for k, v in result.items() if k not in ("reason_counts",)}

    def status(self, d: Path, result: Mapping[str, Any], st: StageStatus) -> StageStatus:
        """Shards, texts kept and drop reasons of a CapFilt folder."""
        manifest = read_json(d / MANIFEST) if (d / MANIFEST).is_file() else {}
        web = set((manifest.get("inputs") or {}).keys())
        done = {
            p.stem
            for p in (d / STATS_DIR).glob("*.json")
            if (d / CANDIDATES_DIR / f"{p.stem}.parquet").is_file()
            and any((d / kept / f"{p.stem}.parquet").is_file() for kept in (CLEANED_DIR, CAPTIONS_DIR))
        }
        st.shards_done = len(done)
        st.shards_total = len(web | done)
        texts = kept = 0
        reasons: Counter[str] = Counter()
        for name in sorted(done):
            stats = read_json(d / STATS_DIR / f"{name}.json")
            texts += sum(stats.get("texts", {}).values())
            kept += sum(stats.get("kept", {}).values())
            reasons.update({r: c for r, c in stats.get("reason_counts", {}).items() if r not in KEPT_REASONS})
        st.rows = {"texts": texts, "kept": kept}
        st.failures = dict(reasons.most_common())
        if texts:
            st.progress = f"kept {kept} of {texts} texts"
        return st


STAGE = CapFiltStage()
