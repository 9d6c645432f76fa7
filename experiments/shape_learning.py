"""Why med-tiny, trained from scratch in the demo's budget, does not learn shape: which training
signal teaches its ViT to tell a circle from a square in 900 steps, and which does not.

Two parts, both in-process (no Ray), batch 32, AdamW with the demo's lr 5e-4 and weight decay 0.05:

- ``probe``: the demo's med-tiny on freshly rendered one-object scenes (a new batch every step, so
  there is no noise and no overfitting), 900 steps, one objective each:
  - ``classify``: a linear 3-way shape head on the ViT's [CLS] (supervised; the upper bound);
  - ``itc``: CLIP-style ITC against "a {size} {colour} {shape}" through the text encoder;
  - ``itc_table``: the same ITC against a learnt embedding per (size, colour, shape), i.e. a
    text side that is perfect from step 0;
  - ``itc_same_colour``: ITC through the text encoder, half of each batch one colour and size,
    so half the in-batch negatives differ only in shape;
  - ``lm``: the captioning loss on the same texts (image-grounded decoder).
- ``pretrain``: round-1 pretraining of the demo (web + human rows of a finished run, ITC + ITM +
  LM, ``experiments/itm_hardness.py``'s loop) with one change per variant: the demo's settings,
  lr 1e-3, the ViT's lr x3, ITM negatives of hardness 0.5, LM only, ITC only; and the demo's fix,
  the ViT started from the 'vit' stage's shape classifier (capfilt/vitinit.py, 900 steps).

Every ``--every`` steps each variant measures the ViT on 1,200 rendered one-object scenes: a
linear probe (multinomial logistic regression on 900, accuracy on 300) of shape from the [CLS]
feature, and for pretraining variants also the ITC/ITM shape accuracy of ``attributes.py``.
Chance is 1/3. A random, untrained ViT gives the probe's floor.

    python experiments/shape_learning.py --part probe
    python experiments/shape_learning.py --part pretrain --run runs/demo [--only base lr_1e-3]

Results are merged into experiments/results/shape_learning.json (one entry per variant).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results" / "shape_learning.json"
BATCH = 32
LR = 5e-4
log = logging.getLogger("shape_learning")

# name -> (objectives, options); options: "lr", "vision_lr_mult", "vit_steps" (start the ViT from
# capfilt.stages.vit's classifier trained for that many steps, as the demo's 'vit' stage does).
PRETRAIN_BASE = {"distill": False, "queue_size": 0, "itm_hardness": 0}  # the demo's round 1
PRETRAIN_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, float]]] = {
    "base": (PRETRAIN_BASE, {}),
    "lr_1e-3": (PRETRAIN_BASE, {"lr": 1e-3}),
    "vision_lr_x3": (PRETRAIN_BASE, {"vision_lr_mult": 3}),
    "itm_hardness_0.5": (PRETRAIN_BASE | {"itm_hardness": 0.5}, {}),
    "lm_only": (PRETRAIN_BASE | {"itc": 0, "itm": 0}, {}),
    "itc_only": (PRETRAIN_BASE | {"lm": 0, "itm": 0}, {}),
    # the demo's fix: the ViT starts from the 'vit' stage's shape classifier (900 steps)
    "vit_init": (PRETRAIN_BASE, {"vit_steps": 900}),
}
PROBE_VARIANTS = ("random_init", "classify", "itc", "itc_table", "itc_same_colour", "lm")


def linear_probe(features: torch.Tensor, labels: list[str], n_train: int) -> float:
    """Accuracy on the rows after ``n_train`` of an L2-regularised multinomial logistic regression
    fitted (L-BFGS) on the first ``n_train`` rows, features standardised by the training rows."""
    x = features.detach().float()
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean())


class Probe:
    """1,200 rendered one-object scenes (seed 5, apart from attributes.py's seed 0) for the linear
    probe, and attributes.py's 300 (seed 0) for ITC/ITM accuracy."""

    def __init__(self) -> None:
        from attributes import probe_scenes

        from capfilt.model.transforms import test_transform
        from capfilt.world.render import render

        transform = test_transform(64)
        scenes = probe_scenes(1200, 5)
        self.pixels = torch.stack([transform(render(s, 64).convert("RGB")) for s in scenes])
        self.shapes = [s.objects[0].shape for s in scenes]
        matching = probe_scenes(300, 0)
        self.match_pixels = torch.stack([transform(render(s, 64).convert("RGB")) for s in matching])
        self.match_objs = [s.objects[0] for s in matching]

    def measure(self, med: Any, tokenizer: Any | None = None) -> dict[str, float]:
        from attributes import matching_accuracy

        was_training = med.training
        med.eval()
        with torch.no_grad():
            cls = med.encode_image(self.pixels)[:, 0]
        out = {"probe_shape": round(linear_probe(cls, self.shapes, 900), 3)}
        if tokenizer is not None:
            try:
                acc = matching_accuracy(med, tokenizer, self.match_pixels, self.match_objs)
            except RuntimeError:  # no trained ITC or ITM head (lm_only, itc_only)
                acc = {}
            for head, per in acc.items():
                out[f"{head}_shape"] = per["shape"]
                out[f"{head}_colour"] = per["colour"]
        med.train(was_training)
        return out


# ----------------------------------------------------------------------------- probe part


def run_probe_variant(name: str, steps: int, every: int, probe: Probe, run: Path) -> dict[str, Any]:
    from capfilt.model.checkpoint import load_med
    from capfilt.model.med import Med
    from capfilt.model.tokenizer import load_tokenizer, tokenize
    from capfilt.model.transforms import train_transform
    from capfilt.world.render import render
    from capfilt.world.scene import COLOURS, SHAPES, SIZES, Obj, Scene

    config = load_med(run / "pretrain" / "model").config
    tokenizer = load_tokenizer(run / "pretrain" / "model")
    torch.manual_seed(0)
    med = Med(config)
    med.train()
    if name == "random_init":
        return {"curve": [{"step": 0, **probe.measure(med)}]}
    extra: nn.Module = nn.Linear(config.vision.hidden_size, len(SHAPES))
    if name == "itc_table":
        extra = nn.Embedding(len(SIZES) * len(COLOURS) * len(SHAPES), config.embed_dim)
    params = [p for p in med.parameters() if p.requires_grad] + list(extra.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05)
    rng = random.Random(0)
    augment = train_transform(64, min_scale=0.6)

    def obj(colour: str | None = None, size: str | None = None) -> Any:
        return Obj(
            rng.choice(SHAPES),
            colour or rng.choice(COLOURS),
            size or rng.choice(SIZES),
            rng.uniform(0.25, 0.75),
            rng.uniform(0.25, 0.75),
        )

    def loss_of(objs: list[Any], pixels: torch.Tensor) -> torch.Tensor:
        embeds = med.encode_image(pixels)
        if name == "classify":
            target = torch.tensor([SHAPES.index(o.shape) for o in objs])
            return F.cross_entropy(extra(embeds[:, 0]), target)
        texts = [f"a {o.size} {o.colour} {o.shape}" for o in objs]
        tokens = tokenize(tokenizer, texts, 35)
        if name == "lm":
            ids = tokens["input_ids"].clone()
            ids[:, 0] = config.text.dec_token_id  # the decoder's [DEC] in place of [CLS]
            return med.lm_loss(embeds, ids, tokens["attention_mask"])
        if name == "itc_table":
            index = torch.tensor(
                [
                    (SIZES.index(o.size) * len(COLOURS) + COLOURS.index(o.colour)) * len(SHAPES)
                    + SHAPES.index(o.shape)
                    for o in objs
                ]
            )
            text_feat = F.normalize(extra(index), dim=-1)
        else:
            text_feat = med.text_feat(tokens["input_ids"], tokens["attention_mask"])
        logits = med.itc_logits(med.image_feat(embeds), text_feat)
        labels = torch.arange(len(objs))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    curve, losses, start = [], [], time.time()
    for step in range(1, steps + 1):
        objs = [obj() for _ in range(BATCH)]
        if name == "itc_same_colour":
            colour, size = rng.choice(COLOURS), rng.choice(SIZES)
            objs = objs[: BATCH // 2] + [obj(colour, size) for _ in range(BATCH - BATCH // 2)]
        pixels = torch.stack(
            [augment(render(Scene(f"train-{step}-{i}", (o,)), 64).convert("RGB")) for i, o in enumerate(objs)]
        )
        loss = loss_of(objs, pixels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        med.clamp_temp()
        losses.append(loss.item())
        if step % every == 0:
            point = {
                "step": step,
                "loss": round(sum(losses[-50:]) / len(losses[-50:]), 3),
                **probe.measure(med),
            }
            log.info("%s %s", name, point)
            curve.append(point)
    return {"steps": steps, "curve": curve, "wall_s": round(time.time() - start, 1)}


# -------------------------------------------------------------------------- pretrain part


def run_pretrain_variant(name: str, steps: int, every: int, probe: Probe, data: Any) -> dict[str, Any]:
    from itm_hardness import batches

    from capfilt.train.config import TrainConfig
    from capfilt.train.data import Collator
    from capfilt.train.loop import build_state, train_step

    objectives, opts = PRETRAIN_VARIANTS[name]
    lr = opts.get("lr", LR)
    vision_init, vit = None, None
    if "vit_steps" in opts:
        from capfilt.stages.vit import VitInitConfig, train_vit_classifier

        vit = train_vit_classifier(
            VitInitConfig(steps=int(opts["vit_steps"])), data.med_config, tempfile.mkdtemp(prefix="vit-")
        )
        vision_init = vit["file"]
    cfg = TrainConfig.model_validate(
        {
            "model": "med-tiny",
            "data": ["unused"],
            "out_dir": "unused",
            "steps": steps,
            "lr": lr,
            "warmup_steps": min(50, steps - 1),  # the schedule below warms up itself
            "objectives": objectives,
            "seed": 0,
            "vision_init": vision_init,
        }
    )
    state = build_state(cfg, data.med_config)
    mult = opts.get("vision_lr_mult", 1.0)
    if mult != 1.0:
        # The ViT in a group of its own whose lr is `mult` x the schedule's: train_step sets every
        # group to the schedule's lr, and the wrapped optimizer step scales it just before stepping.
        vision = {id(p) for p in state.med.vision_model.parameters()}
        params = [p for p in state.objectives.parameters() if p.requires_grad]
        state.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if id(p) in vision], "mult": mult},
                {"params": [p for p in params if id(p) not in vision], "mult": 1.0},
            ],
            lr=lr,
            weight_decay=cfg.weight_decay,
        )
        plain_step = state.optimizer.step

        def scaled_step(*args: Any, **kwargs: Any) -> Any:
            for group in state.optimizer.param_groups:
                group["lr"] *= group["mult"]
            return plain_step(*args, **kwargs)

        state.optimizer.step = scaled_step  # type: ignore[method-assign]
    rows = data.web_rows + data.human_rows
    collator = Collator(data.tokenizer, 64, train=True, min_scale=0.6)
    curve, history, start = [], [], time.time()
    for step, batch in zip(range(1, steps + 1), batches(rows, collator, seed=0), strict=False):
        # the demo's schedule: 50 warm-up steps, then BLIP's 0.9 per epoch
        step_lr = lr * min(1.0, step / 50) * 0.9 ** ((step - 1) * BATCH // len(rows))
        history.append({k: float(v) for k, v in train_step(state, batch, step_lr).items()})
        if step % every == 0:
            window = history[-100:]
            point = {
                "step": step,
                **{
                    k: round(sum(h[k] for h in window) / len(window), 3)
                    for k in window[-1]
                    if k.startswith("loss")
                },
                **probe.measure(state.med, data.tokenizer),
            }
            log.info("%s %s", name, point)
            curve.append(point)
    return {
        "steps": steps,
        "objectives": objectives,
        "options": opts,
        **({"vit": {k: v for k, v in vit.items() if k != "file"}} if vit else {}),
        "curve": curve,
        "wall_s": round(time.time() - start, 1),
    }


def merge_results(path: Path, part: str, meta: dict[str, Any], results: dict[str, Any]) -> None:
    """Merge this invocation's variants into ``path`` under ``part`` (locked: parts may run at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(path.read_text()) if path.exists() else {}
        section = current.setdefault(part, {"variants": {}})
        section.update(meta)
        section["variants"].update(results)
        path.write_text(json.dumps(current, indent=2) + "\n")
    path.with_suffix(".lock").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("probe", "pretrain"), required=True)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run folder")
    parser.add_argument("--only", nargs="*", help="variant names (default: all of the part)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every", type=int, default=None, help="probe interval (default 150 / 300)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("capfilt").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    probe = Probe()
    names = list(PROBE_VARIANTS if args.part == "probe" else PRETRAIN_VARIANTS)
    unknown = set(args.only or []) - set(names)
    if unknown:
        parser.error(f"unknown {args.part} variants {sorted(unknown)}; known: {names}")
    names = [n for n in names if n in (args.only or names)]
    results: dict[str, Any] = {}
    if args.part == "probe":
        every = args.every or 150
        for name in names:
            results[name] = run_probe_variant(name, args.steps, every, probe, args.run)
    else:
        from itm_hardness import Data

        every = args.every or 300
        data = Data(args.run)
        for name in names:
            results[name] = run_pretrain_variant(name, args.steps, every, probe, data)
    meta = {
        "run": str(args.run),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {args.threads} thread(s) per variant",
        "batch": BATCH,
        "chance": round(1 / 3, 3),
    }
    merge_results(args.out, args.part, meta, results)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
