"""How hard ITM's negatives should be when MED is trained from scratch.

Trains med-tiny in-process (no Ray: the objectives and `train_step` of the real loop, batch 32,
BLIP's step decay) on a finished demo run's round-1 data (the downloaded web shards plus the
human pairs), once per variant, and measures its ITM head against the world's ground truth:

- ``test_auc_mismatched``: held-out test images, their first human caption against another test
  image's caption that the checker says is false of them;
- ``web_auc_*``: p(match) of 1,500 downloaded web pairs, correct texts against all noisy ones and
  against each noise kind (weak alt-text, near miss, mismatched);
- the median p(match) per kind, and what a 0.5 threshold keeps (how many, how many correct).

Variants are pretraining from scratch (web + human) with BLIP's hard negatives (hardness 1), a
ramp 0 -> 1 over the run, hardness 0.5 and uniform negatives (0); then filter fine-tunes (human
pairs only, ITC + ITM, positives by image id) from two of the pretrained models with hard or
uniform negatives. The pretrain variants run 600 steps, the two saved for the fine-tunes 900 (the
demo's length).

    python experiments/itm_hardness.py --run runs/demo --out experiments/results/itm_hardness.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from capfilt.eval.quality import roc_auc
from capfilt.model.checkpoint import load_med
from capfilt.model.tokenizer import load_tokenizer
from capfilt.model.transforms import decode_image, test_transform
from capfilt.train.config import TrainConfig
from capfilt.train.data import Collator, TrainBatch
from capfilt.train.loop import build_state, train_step
from capfilt.world import check_caption, load_world

log = logging.getLogger("itm_hardness")
BATCH = 32
PRETRAIN = {"distill": False, "queue_size": 0}  # the demo's from-scratch ITC
FILTER = {"distill": False, "queue_size": 0, "lm": 0, "positives": "image_id"}  # the demo's filter

# (name, steps, objectives, options): options "save" (a name for later "init"), "human_only", "lr".
VARIANTS: list[tuple[str, int, dict[str, Any], dict[str, Any]]] = [
    ("pretrain_hard", 600, PRETRAIN, {}),
    ("pretrain_ramp_0_to_1", 600, PRETRAIN | {"itm_hardness_ramp_steps": 600}, {}),
    ("pretrain_half", 600, PRETRAIN | {"itm_hardness": 0.5}, {}),
    ("pretrain_uniform", 600, PRETRAIN | {"itm_hardness": 0}, {}),
    ("pretrain_hard_no_itc", 600, PRETRAIN | {"itc": 0}, {}),  # negatives from an untrained ITC
    ("pretrain_hard_itm_weight_3", 600, PRETRAIN | {"itm": 3}, {}),
    ("pretrain_hard_no_lm", 600, PRETRAIN | {"lm": 0}, {}),
    ("pretrain_uniform_900", 900, PRETRAIN | {"itm_hardness": 0}, {"save": "uniform"}),
    ("pretrain_half_900", 900, PRETRAIN | {"itm_hardness": 0.5}, {"save": "half"}),
    ("filter_hard_from_uniform", 600, FILTER, {"init": "uniform", "human_only": True, "lr": 3e-4}),
    (
        "filter_uniform_from_uniform",
        600,
        FILTER | {"itm_hardness": 0},
        {"init": "uniform", "human_only": True, "lr": 3e-4},
    ),
    ("filter_hard_from_half", 600, FILTER, {"init": "half", "human_only": True, "lr": 3e-4}),
    (
        "filter_uniform_from_half",
        600,
        FILTER | {"itm_hardness": 0},
        {"init": "half", "human_only": True, "lr": 3e-4},
    ),
]


def auc(pos: Any, neg: Any) -> float:
    """ROC-AUC of positives' scores against negatives' (capfilt.eval.quality.roc_auc)."""
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    return roc_auc(np.r_[pos, neg], np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)])


class Data:
    """A demo run's round-1 training rows and its ground truth."""

    def __init__(self, run: Path) -> None:
        self.world_dir = run / "world"
        self.tokenizer = load_tokenizer(run / "pretrain" / "model")
        self.med_config = load_med(run / "pretrain" / "model").config
        web = (
            ds.dataset(run / "download", format="parquet")
            .to_table(columns=["row", "text", "image", "status"])
            .to_pandas()
        )
        labels = pq.read_table(self.world_dir / "web_labels.parquet").to_pandas()
        self.web = web[web.status == "success"].merge(labels[["row", "label", "is_correct"]], on="row")
        self.web_rows = [(r.image, r.text, i) for i, r in enumerate(self.web.itertuples())]
        self.human_rows = []
        for j, e in enumerate(json.loads((self.world_dir / "human" / "karpathy_train.json").read_text())):
            data = (self.world_dir / e["image"]).read_bytes()
            captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
            self.human_rows += [(data, c, 100_000 + j) for c in captions]
        # Held-out pairs: each test image's first caption, and another test image's caption
        # that the checker says is false of it.
        world = load_world(self.world_dir)
        entries = json.loads((self.world_dir / "human" / "karpathy_test.json").read_text())
        self.test_images = [(self.world_dir / e["image"]).read_bytes() for e in entries]
        self.test_true = [e["caption"][0] for e in entries]
        rng = random.Random(1)
        self.test_false = []
        for i, e in enumerate(entries):
            scene = world.scene_for_path(e["image"])
            others = [c for j, c in enumerate(self.test_true) if j != i]
            rng.shuffle(others)
            self.test_false.append(next(c for c in others if not check_caption(scene, c)))


def batches(rows: list[tuple[bytes, str, int]], collator: Collator, seed: int) -> Iterator[TrainBatch]:
    rng = random.Random(seed)
    rows = list(rows)
    while True:
        rng.shuffle(rows)
        for b in range(0, len(rows) - BATCH + 1, BATCH):
            chunk = rows[b : b + BATCH]
            batch, _ = collator(
                {
                    "image": [c[0] for c in chunk],
                    "text": [c[1] for c in chunk],
                    "image_key": [c[2] for c in chunk],
                }
            )
            assert batch is not None
            yield batch


def evaluate(med: Any, data: Data) -> dict[str, Any]:
    med.eval()
    collator = Collator(data.tokenizer, 64, train=False)
    transform = test_transform(med.config.vision.image_size)

    def itm(images: list[bytes], texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for b in range(0, len(texts), 128):
                pixels = torch.stack([transform(decode_image(x)) for x in images[b : b + 128]])
                tok = collator.tokens([collator.text(t) for t in texts[b : b + 128]])
                out.append(med.itm_prob(med.encode_image(pixels), tok["input_ids"], tok["attention_mask"]))
        return torch.cat(out).numpy()

    p_pos, p_neg = itm(data.test_images, data.test_true), itm(data.test_images, data.test_false)
    web = data.web.sample(n=min(1500, len(data.web)), random_state=0)
    web = web.assign(p=itm(list(web.image), list(web.text)))
    correct = web.p[web.label == "correct"]
    out: dict[str, Any] = {
        "test_auc_mismatched": round(auc(p_pos, p_neg), 4),
        "test_p_median": {
            "true": round(float(np.median(p_pos)), 3),
            "false": round(float(np.median(p_neg)), 3),
        },
        "web_auc_all": round(auc(web.p[web.is_correct], web.p[~web.is_correct]), 4),
    }
    for kind in ("weak", "near_miss", "mismatched"):
        out[f"web_auc_{kind}"] = round(auc(correct, web.p[web.label == kind]), 4)
    out["web_p_median"] = {k: round(float(v), 3) for k, v in web.groupby("label").p.median().items()}
    kept = web[web.p >= 0.5]
    out["web_kept_at_0.5"] = {
        "of": len(web),
        "kept": len(kept),
        "correct": round(float(kept.is_correct.mean()), 4) if len(kept) else None,
        "recall": round(float(kept.is_correct.sum() / web.is_correct.sum()), 4),
    }
    return out


def run_variant(
    data: Data,
    name: str,
    steps: int,
    objectives: dict[str, Any],
    opts: dict[str, Any],
    saved: dict[str, Path],
) -> dict[str, Any]:
    lr = opts.get("lr", 5e-4)
    cfg = TrainConfig.model_validate(
        {
            "model": "med-tiny",
            "data": ["unused"],
            "out_dir": "unused",
            "steps": steps,
            "lr": lr,
            "warmup_steps": 5,
            "objectives": objectives,
            "seed": 0,
        }
    )
    state = build_state(cfg, data.med_config)
    if "init" in opts:
        state.med.load_state_dict(torch.load(saved[opts["init"]], weights_only=True), strict=False)
    rows = data.human_rows if opts.get("human_only") else data.web_rows + data.human_rows
    collator = Collator(data.tokenizer, 64, train=True, min_scale=0.6)
    start, history = time.time(), []
    for step, batch in zip(range(steps), batches(rows, collator, seed=0), strict=False):
        # warm up over 50 steps, then BLIP's 0.9 per epoch
        step_lr = lr * min(1.0, (step + 1) / 50) * 0.9 ** (step * BATCH // len(rows))
        history.append({k: float(v) for k, v in train_step(state, batch, step_lr).items()})
        if (step + 1) % 100 == 0:
            log.info("%s step %d %s", name, step + 1, pd.DataFrame(history[-100:]).mean().round(3).to_dict())
    if "save" in opts:
        saved[opts["save"]] = Path(tempfile.mkdtemp()) / "med.pt"
        torch.save(state.med.state_dict(), saved[opts["save"]])
    frame = pd.DataFrame(history)
    loss_keys = [k for k in frame.columns if k.startswith("loss_")]
    result = {
        "steps": steps,
        "objectives": objectives,
        "options": {k: v for k, v in opts.items() if k != "save"},
        "train_loss_first_100": frame[loss_keys].head(100).mean().round(4).to_dict(),
        "train_loss_last_100": frame[loss_keys].tail(100).mean().round(4).to_dict(),
        **evaluate(state.med, data),
        "wall_s": round(time.time() - start, 1),
    }
    log.info("%s %s", name, json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "itm_hardness.json")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    data = Data(args.run)
    saved: dict[str, Path] = {}
    results = {}
    wanted = set(args.only or [name for name, *_ in VARIANTS])
    inits = {o["init"] for n, _, _, o in VARIANTS if n in wanted and "init" in o}
    wanted |= {n for n, _, _, o in VARIANTS if o.get("save") in inits}  # the models they start from
    for name, steps, objectives, opts in VARIANTS:
        if name not in wanted:
            continue
        results[name] = run_variant(data, name, steps, objectives, opts, saved)
    args.out.write_text(
        json.dumps({"run": str(args.run), "batch": BATCH, "variants": results}, indent=2) + "\n"
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
