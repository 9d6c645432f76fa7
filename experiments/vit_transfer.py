"""Does the 'vit' stage's broad vocabulary give useful features for shapes it never saw?

The 'vit' stage (capfilt/stages/vit.py) is the shapes world's ImageNet. Issue 17's second world
showed what a narrow one costs: a ViT taught only the default world's 3 shapes left the captioner
unable to name the shapes of a world with others. This experiment trains the stage's classifier
on a subset of the family's shapes and linear-probes shape on the shapes it held out:

- ``random``: the untrained ViT (the same init), the probe's floor;
- ``legacy_subset``: the stage's ``default_world`` vocabulary (shape head only, the default
  world's 6 colours, flat backgrounds), on the training shapes;
- ``shape_head_broad_subset``: the shape head only, but every colour and background;
- ``broad_subset``: the ``family`` vocabulary (shape, colour, size and background heads, every
  colour and background), on the training shapes only;
- ``broad_subset_flat``: the ``family_flat`` vocabulary (every colour, flat backgrounds, shape,
  colour and size heads), on the training shapes only.

And, for the stage's own default on the default world's shapes (must not be worse than before):

- ``legacy_default``: ``default_world`` (3 shapes, shape head, flat), the stage's default;
- ``broad_default``, ``broad_default_flat``: ``family`` and ``family_flat`` on every shape.

Each trains ``--steps`` (the stage's 900) steps of 32, AdamW lr 5e-4, the stage's augmentation,
then the frozen ViT's pre-logit [CLS] feature is probed (multinomial logistic regression, L-BFGS,
``shape_learning.linear_probe``) on 900 fresh one-object scenes per probe set: 600 to fit, 300 to
score. Probe sets: the held-out shapes on every colour and background (``held_out``), the same on
the default world's colours and flat backgrounds (``held_out_flat``), the training shapes
(``train_shapes``), and the default world's scenes (``default_world``). Chance is 1/3 for every
set but ``train_shapes`` (1/5).

    python experiments/vit_transfer.py [--steps 900] [--threads 1] [--only broad_subset random]

Results are merged into experiments/results/vit_transfer.json (one entry per variant).

Measured (900 steps, seed 0, 2 shared cores under heavy load): held-out probe random 0.433,
legacy_subset 0.633, broad_subset_flat 0.663 (flat: 0.507, 0.733, 0.767); on the default world's
scenes the stage's own 3-way shape accuracy is legacy_default 0.92, broad_default_flat 0.59,
broad_default 0.49. broad_subset and shape_head_broad_subset were not run for lack of time.
The first three entries were written before the ``vocabulary`` field existed; their configs
read as ``default_world`` and ``family``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results" / "vit_transfer.json"
TRAIN_SHAPES = ("circle", "square", "triangle", "star", "cross")
# Each held-out shape looks like a training one (ring/hexagon like a circle, diamond like a
# square), so the probe must use what tells shapes apart, not just "round" or "pointy".
HELD_OUT_SHAPES = ("diamond", "hexagon", "ring")
PROBE_FIT, PROBE_SCORE = 600, 300
log = logging.getLogger("vit_transfer")


def variants() -> dict[str, dict[str, Any] | None]:
    """name -> VitInitConfig fields (steps aside), None for the untrained ViT."""
    from capfilt.stages.vit import LEGACY

    return {
        "random": None,
        "legacy_subset": {**LEGACY, "shapes": TRAIN_SHAPES},
        "shape_head_broad_subset": {"vocabulary": "family", "shapes": TRAIN_SHAPES, "heads": ("shape",)},
        "broad_subset": {"vocabulary": "family", "shapes": TRAIN_SHAPES},
        "broad_subset_flat": {"vocabulary": "family_flat", "shapes": TRAIN_SHAPES},
        "legacy_default": dict(LEGACY),
        "broad_default": {"vocabulary": "family"},
        "broad_default_flat": {"vocabulary": "family_flat"},
    }


def probe_sets() -> dict[str, list[Any]]:
    """The probe's scenes, each set from a stream of its own (never the stage's training seeds)."""
    from capfilt.stages.vit import labelled_scenes
    from capfilt.world.scene import ALL_COLOURS, BACKGROUNDS, COLOURS, SHAPES

    n = PROBE_FIT + PROBE_SCORE

    def scenes(
        name: str, shapes: tuple[str, ...], colours: tuple[str, ...], bgs: tuple[str, ...]
    ) -> list[Any]:
        return labelled_scenes(
            n, random.Random(f"vit-transfer/{name}"), f"probe-{name}", shapes, colours, bgs
        )

    return {
        "held_out": scenes("held_out", HELD_OUT_SHAPES, ALL_COLOURS, BACKGROUNDS),
        "held_out_flat": scenes("held_out_flat", HELD_OUT_SHAPES, COLOURS, ("flat",)),
        "train_shapes": scenes("train_shapes", TRAIN_SHAPES, ALL_COLOURS, BACKGROUNDS),
        "default_world": scenes("default_world", SHAPES, COLOURS, ("flat",)),
    }


def features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's pre-logit [CLS] feature, [N, hidden]."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model.forward_head(model.forward_features(p), pre_logits=True) for p in pixels.split(256)]
        )


def run_variant(
    name: str,
    fields: dict[str, Any] | None,
    steps: int,
    pixels: dict[str, torch.Tensor],
    sets: dict[str, list[Any]],
) -> dict[str, Any]:
    from safetensors.torch import load_file
    from shape_learning import linear_probe

    from capfilt.model.config import get_config
    from capfilt.stages.vit import VitInitConfig, timm_vit, train_vit_classifier

    med = get_config("med-tiny")
    entry: dict[str, Any] = {"config": None}
    if fields is None:
        torch.manual_seed(0)  # the stage's init for seed 0, untrained
        model = timm_vit(med, 3)
    else:
        cfg = VitInitConfig(steps=steps, **fields)
        with tempfile.TemporaryDirectory() as d:
            summary = train_vit_classifier(cfg, med, d)
            state = load_file(summary["file"])
        model = timm_vit(med, sum(summary["heads"].values()))
        model.load_state_dict(state)
        entry["config"] = cfg.model_dump(exclude={"log_every"})
        entry["stage"] = {k: v for k, v in summary.items() if k != "file"}
    entry["probe"] = {}
    for probe, scenes in sets.items():
        labels = [s.objects[0].shape for s in scenes]
        acc = linear_probe(features(model, pixels[probe]), labels, PROBE_FIT)
        entry["probe"][probe] = round(acc, 4)
    log.info("%s: %s", name, entry["probe"])
    return entry


def merge(update: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data.setdefault("variants", {}).update(update.pop("variants", {}))
        data.update(update)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    from capfilt.model.transforms import test_transform
    from capfilt.world.render import render

    all_variants = variants()
    names = args.only or list(all_variants)
    unknown = sorted(set(names) - set(all_variants))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; use {list(all_variants)}")
    sets = probe_sets()
    transform = test_transform(64)
    pixels = {k: torch.stack([transform(render(s, 64)) for s in v]) for k, v in sets.items()}
    merge(
        {
            "train_shapes": list(TRAIN_SHAPES),
            "held_out_shapes": list(HELD_OUT_SHAPES),
            "probe": {"fit": PROBE_FIT, "score": PROBE_SCORE, "sets": list(sets)},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {args.threads} thread(s)",
        }
    )
    for name in names:
        start = time.time()
        entry = run_variant(name, all_variants[name], args.steps, pixels, sets)
        entry["wall_s"] = round(time.time() - start, 1)
        entry["steps"] = args.steps if all_variants[name] is not None else 0
        merge({"variants": {name: entry}})
    print(json.dumps({n: json.loads(RESULTS.read_text())["variants"][n]["probe"] for n in names}, indent=1))


if __name__ == "__main__":
    main()
