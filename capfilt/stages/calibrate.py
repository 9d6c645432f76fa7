"""The ``calibrate`` stage: CapFilt's thresholds chosen for a target precision from a small labelled
sample, then applied to the run's cleaned shards before round 2 trains on them.

- Labels: ``calibrate.labels`` (a file a person labelled: ``correct`` plus ``text_uid``, or
  ``uid`` and ``text``; see ``capfilt.eval.calibrate.read_labels``). A run on the shapes world
  may instead label ``world_sample`` downloaded web pairs from the world's side table, as a
  person would label a few hundred by hand: one fixed sample, drawn with ``seed``, written to
  ``calibrate/labels.parquet`` and used for nothing else (the quality benchmark leaves those rows
  out of what it measures). With ``synthetic`` in ``sources`` it also labels ``world_sample``
  synthetic captions of other images with the world's checker, as a person judging captions
  against their images would.
- Thresholds: per text source in ``sources``, the lowest one whose kept labelled rows reach
  ``target_precision`` (``capfilt.eval.calibrate``), written to the capfilt folder's
  ``_calibration.json``.
- Applied: the capfilt folder is re-decided with them (``capfilt reselect --calibrated``, no model
  runs), so ``pretrain2`` reads the calibrated cleaned shards. A source whose target is out of
  reach on the sample keeps the threshold it had.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from capfilt.core import fs
from capfilt.core.stage import Section, Stage, StageContext, readable

log = logging.getLogger(__name__)

LABELS_FILE = "labels.parquet"


class CalibrateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: str | None = None  # a labels file; None: label `world_sample` pairs of the shapes world
    world_sample: int = Field(300, ge=10)
    target_precision: float = Field(0.95, gt=0, lt=1)
    sources: tuple[Literal["web", "synthetic"], ...] = ("web",)
    seed: int = 0
    resamples: int = Field(1000, ge=10)
    # False: calibrate and report only; the capfilt folder keeps the thresholds it was run with
    # (the demo: at target 0.95 its filter keeps 3% of the true web texts, too few to train on).
    apply: bool = True


def world_labels(samples: Any, world: Any, n: int, seed: int) -> Any:
    """``n`` downloaded web pairs labelled from the world's truth (uid, text, correct), drawn
    uniformly with ``seed``: what a person labelling a few hundred pairs by hand would give."""
    import numpy as np
    import pyarrow as pa

    from capfilt.eval.quality import web_truth

    truth = web_truth(samples, world.labels)
    texts = dict(zip(samples.column("uid").to_pylist(), samples.column("text").to_pylist(), strict=True))
    uids = sorted(truth["uid"].to_pylist())  # an order that does not depend on how shards were read
    correct = dict(zip(truth["uid"].to_pylist(), truth["is_correct"].to_pylist(), strict=True))
    if len(uids) < n:
        raise ValueError(f"calibrate.world_sample {n}: the run has only {len(uids)} downloaded web pairs")
    pick = sorted(np.random.default_rng(seed).choice(len(uids), size=n, replace=False).tolist())
    chosen = [uids[i] for i in pick]
    return pa.table(
        {
            "uid": chosen,
            "text": [texts[u] for u in chosen],
            "correct": pa.array([bool(correct[u]) for u in chosen], pa.bool_()),
        }
    )


def world_caption_labels(labelled: Any, n: int, seed: int, avoid_uids: set[str]) -> Any:
    """``n`` scored synthetic captions of images outside ``avoid_uids`` with the world checker's
    verdict (text_uid, correct): what a person judging captions against their images gives.
    ``labelled``: CANDIDATE rows with the ``truth`` column of ``eval.quality.label_candidates``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    syn = labelled.filter(
        pc.and_(
            pc.and_(pc.equal(labelled["text_source"], "synthetic"), pc.is_valid(labelled["itm_score"])),
            pc.is_valid(labelled["truth"]),
        )
    )
    if avoid_uids:
        syn = syn.filter(pc.invert(pc.is_in(syn["uid"], pa.array(sorted(avoid_uids), pa.string()))))
    syn = syn.sort_by("text_uid")
    if syn.num_rows < n:
        raise ValueError(
            f"calibrate.world_sample {n}: the run has only {syn.num_rows} scored synthetic captions"
        )
    pick = np.sort(np.random.default_rng(seed).choice(syn.num_rows, size=n, replace=False))
    part = syn.take(pa.array(pick))
    return pa.table({"text_uid": part["text_uid"], "correct": part["truth"]})


class CalibrateStage(Stage):
    name = "calibrate"
    help = "pick CapFilt's thresholds for a target precision from labelled pairs, and apply them"
    by_default = False  # opt-in: it needs labels (or the shapes world's truth to draw them from)
    sections: ClassVar[Mapping[str, Section]] = {
        "calibrate": Section(
            CalibrateConfig, default_factory=CalibrateConfig, help="labels, target precision"
        )
    }

    def check(self, recipe: Any, check_paths: bool) -> None:
        cfg: CalibrateConfig = self.config(recipe)
        if "capfilt" not in recipe.stages:
            raise ValueError("stages: 'calibrate' re-decides the capfilt stage's output; list 'capfilt' too")
        if cfg.labels is None and not recipe.has_world():
            raise ValueError("calibrate.labels: give a labels file (only the shapes world labels itself)")
        if cfg.labels is not None and check_paths and not fs.location(cfg.labels).is_file():
            raise ValueError(f"calibrate.labels: {cfg.labels} does not exist")

    def upstream(self, recipe: Any) -> list[str]:
        return ["capfilt"]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from capfilt.core.shards import write_parquet_atomic
        from capfilt.eval.calibrate import calibrate_run
        from capfilt.stages.capfilt.rethreshold import rethreshold

        cfg: CalibrateConfig = self.config(ctx.recipe)
        capfilt_dir = ctx.run.dir("capfilt")
        labels: Any = cfg.labels
        if labels is None:
            import pyarrow as pa
            import pyarrow.compute as pc

            from capfilt.eval.quality import label_candidates
            from capfilt.stages.capfilt.rethreshold import read_candidates
            from capfilt.stages.download import read_samples
            from capfilt.world import load_world

            samples = read_samples(ctx.run.dir("download"), columns=["uid", "row", "status", "text"])
            world = load_world(ctx.run.dir("world"))
            web = world_labels(samples, world, cfg.world_sample, cfg.seed)
            cands = read_candidates(capfilt_dir)
            # The web pairs' text_uids, so web and caption labels share one key.
            rows = cands.filter(pc.equal(cands["text_source"], "web")).select(["uid", "text", "text_uid"])
            keyed = web.join(rows, keys=["uid", "text"], join_type="inner").select(["text_uid", "correct"])
            parts = [keyed] if "web" in cfg.sources else []
            if "synthetic" in cfg.sources:
                labelled = label_candidates(cands, samples, world)
                avoid = set(web["uid"].to_pylist())
                parts.append(world_caption_labels(labelled, cfg.world_sample, cfg.seed, avoid))
            table = pa.concat_tables(parts)
            ctx.dir.mkdir(parents=True, exist_ok=True)
            labels = ctx.dir / LABELS_FILE
            write_parquet_atomic(labels, table)
            log.info(
                "labelled %d rows from the world's truth (%d correct)",
                table.num_rows,
                sum(table["correct"].to_pylist()),
            )
        found = calibrate_run(
            capfilt_dir,
            labels,
            cfg.target_precision,
            sources=cfg.sources,
            resamples=cfg.resamples,
            seed=cfg.seed,
        )
        for c in found.values():
            log.info("calibrate %s", c.line())
        summary = rethreshold(capfilt_dir, calibrated=True) if cfg.apply else None
        return {
            "labels": str(labels),
            "target_precision": cfg.target_precision,
            "thresholds": {s: c.threshold for s, c in found.items()},
            "calibration": {
                s: {k: v for k, v in c.to_json().items() if k != "curve"} for s, c in found.items()
            },
            "applied": cfg.apply,
            "kept": summary.to_json().get("kept") if summary is not None else None,
        }

    def summary(self, result: Mapping[str, Any]) -> list[str]:
        lines = []
        for src, c in (result.get("calibration") or {}).items():
            if c.get("threshold") is None:
                lines.append(
                    f"{src}: no threshold reaches precision {c['target']} on {c['n_labels']} labels; unchanged"
                )
                continue
            lo, hi = c.get("precision_ci") or (None, None)
            lines.append(
                f"{src}: threshold {readable(c['threshold'])} for precision {c['target']} "
                f"({c['n_labels']} labels: precision {readable(c['precision'])}, interval "
                f"{readable(lo)}-{readable(hi)}, recall {readable(c['recall'])})"
            )
        if result.get("applied") is False:
            lines.append("not applied (calibrate.apply: false): capfilt/ keeps the thresholds it ran with")
        return lines


def held_out_precision(labelled: Any, calibration: Mapping[str, Any], labels: Any) -> dict[str, Any]:
    """Per text source, precision and recall at its calibrated threshold on the rows with ground
    truth that were not labelled: what the calibration promised, measured. ``labelled``: CANDIDATE
    rows with ``truth`` (eval.quality.label_candidates); ``labels``: the labels table used."""
    import numpy as np

    key = "text_uid" if "text_uid" in labels.column_names else None
    taken = (
        set(labels["text_uid"].to_pylist())
        if key
        else set(zip(labels["uid"].to_pylist(), labels["text"].to_pylist(), strict=True))
    )
    cols = labelled.select(["uid", "text", "text_uid", "text_source", "itm_score", "truth"]).to_pydict()
    out: dict[str, Any] = {}
    for src, c in calibration.items():
        t = c.get("threshold")
        if t is None:
            continue
        rows = [
            (s, bool(y))
            for u, x, tu, so, s, y in zip(*cols.values(), strict=True)
            if so == src and s is not None and y is not None and ((tu if key else (u, x)) not in taken)
        ]
        if not rows:
            continue
        score = np.asarray([r[0] for r in rows])
        truth = np.asarray([r[1] for r in rows])
        kept = score >= t
        out[src] = {
            "threshold": t,
            "target": c.get("target"),
            "rows": len(rows),
            "precision": round(float(truth[kept].mean()), 4) if kept.any() else None,
            "recall": round(float((kept & truth).sum() / max(1, truth.sum())), 4),
            "kept": int(kept.sum()),
        }
    return out


STAGE = CalibrateStage()
