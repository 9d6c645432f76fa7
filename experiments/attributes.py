"""Which attributes of a shape the models of a demo run can see: colour, shape and size, judged by
the world's ground truth on freshly rendered one-object scenes.

Run as `python experiments/attributes.py --run runs/demo [--run DIR ...]` inside the project's
.venv, after `make demo` (or `benchmarks/round.py --work DIR`). For every model a run folder holds
(round 1 `pretrain/model`, the fine-tuned `finetune/filter/model` and `finetune/captioner/model`,
round 2 `pretrain2/model`) it renders the same N scenes of one object, then:

- ITC and ITM: for each attribute, the texts "a {size} {colour} {shape}" that differ from the
  truth in that attribute only (6 colours, 3 shapes, 2 sizes); accuracy is how often the true
  text scores highest. Chance is 1/6, 1/3 and 1/2.
- captioner (LM): one caption per image, decoded as the evaluation decodes (beam 3); the share
  that names the object's colour, its shape, and the share the world's checker calls true.

This is the measurement behind issue 5's "why the gain is limited": a model that cannot tell a
circle from a square writes captions with the wrong shape, and a filter with the same blind spot
cannot reject them. Results go to experiments/results/attributes.json, one entry per run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

RESULTS = Path(__file__).parent / "results" / "attributes.json"
MODELS = {
    "round1": "pretrain/model",
    "filter": "finetune/filter/model",
    "captioner": "finetune/captioner/model",
    "round2": "pretrain2/model",
}
ATTRIBUTES = ("colour", "shape", "size")


def probe_scenes(n: int, seed: int) -> list[Any]:
    """``n`` one-object scenes, attributes uniform, the centre kept away from the border."""
    from capfilt.stages.vit import labelled_scenes

    return labelled_scenes(n, random.Random(seed), "probe")


def describe(size: str, colour: str, shape: str) -> str:
    return f"a {size} {colour} {shape}"


def options(obj: Any, attribute: str) -> tuple[list[str], int]:
    """The texts that differ from ``obj``'s description in ``attribute`` only, and the true one's index."""
    from capfilt.world.scene import COLOURS, SHAPES, SIZES

    values = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attribute]
    truth = {"colour": obj.colour, "shape": obj.shape, "size": obj.size}
    texts = [describe(**(truth | {attribute: v})) for v in values]
    return texts, list(values).index(truth[attribute])


def matching_accuracy(med: Any, tokenizer: Any, images: Any, objs: list[Any]) -> dict[str, dict[str, float]]:
    """ITC and ITM accuracy per attribute: how often the true text scores highest of its options."""
    import numpy as np
    import torch

    from capfilt.model.tokenizer import tokenize

    out: dict[str, dict[str, float]] = {"itc": {}, "itm": {}}
    with torch.inference_mode():
        embeds = med.encode_image(images)  # [N, 1+P, Dv]
        image_feat = med.image_feat(embeds)  # [N, E]
        for attribute in ATTRIBUTES:
            per = [options(o, attribute) for o in objs]
            k = len(per[0][0])
            truth = np.asarray([t for _, t in per])
            tokens = tokenize(tokenizer, [text for texts, _ in per for text in texts], 35)
            ids, mask = tokens["input_ids"], tokens["attention_mask"]  # [N*k, L]
            itc = (image_feat.repeat_interleave(k, 0) * med.text_feat(ids, mask)).sum(-1)  # [N*k]
            pair_embeds = embeds.repeat_interleave(k, 0)  # [N*k, 1+P, Dv]
            itm = torch.cat(
                [
                    med.itm_prob(pair_embeds[s : s + 512], ids[s : s + 512], mask[s : s + 512])
                    for s in range(0, ids.shape[0], 512)
                ]
            )  # [N*k]
            for name, scores in (("itc", itc), ("itm", itm)):
                picked = scores.view(len(objs), k).argmax(1).numpy()
                out[name][attribute] = round(float((picked == truth).mean()), 3)
    return out


def caption_accuracy(med: Any, tokenizer: Any, pil_images: list[Any], scenes: list[Any]) -> dict[str, Any]:
    from capfilt.eval.captioning import generate_captions
    from capfilt.eval.config import EvalConfig
    from capfilt.world.checker import check_caption, tokenize

    captions = generate_captions(med, tokenizer, pil_images, EvalConfig(device="cpu"))
    words = [set(tokenize(c)) for c in captions]
    objs = [s.objects[0] for s in scenes]
    n = len(captions)
    return {
        "names_colour": round(sum(o.colour in w for o, w in zip(objs, words, strict=True)) / n, 3),
        "names_shape": round(sum(o.shape in w for o, w in zip(objs, words, strict=True)) / n, 3),
        "checker_true": round(sum(check_caption(s, c) for s, c in zip(scenes, captions, strict=True)) / n, 3),
        "examples": [
            {"caption": c, "object": describe(o.size, o.colour, o.shape)}
            for c, o in list(zip(captions, objs, strict=True))[:6]
        ],
    }


def measure_run(run: Path, n: int, seed: int) -> dict[str, Any]:
    import torch

    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.model.tokenizer import load_tokenizer
    from capfilt.model.transforms import test_transform
    from capfilt.world.render import render

    scenes = probe_scenes(n, seed)
    result: dict[str, Any] = {"run": str(run), "probes": n}
    for label, rel in MODELS.items():
        path = run / rel
        if not path.is_dir():
            continue
        med = load_checkpoint(path).eval()
        tokenizer = load_tokenizer(path)
        size = med.config.vision.image_size
        pil = [render(s, size).convert("RGB") for s in scenes]
        if label == "captioner":
            result[label] = caption_accuracy(med, tokenizer, pil, scenes)
        else:
            transform = test_transform(size)
            images = torch.stack([transform(im) for im in pil])
            result[label] = matching_accuracy(med, tokenizer, images, [s.objects[0] for s in scenes])
        logging.info("%s %s: %s", run, label, {k: v for k, v in result[label].items() if k != "examples"})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="a finished run folder (repeatable)")
    parser.add_argument("--label", action="append", help="a name per --run (default: the folder)")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    torch.manual_seed(args.seed)
    labels = args.label or [str(r) for r in args.run]
    if len(labels) != len(args.run):
        sys.exit("give one --label per --run")
    runs = {
        label: measure_run(Path(r), args.probes, args.seed) for label, r in zip(labels, args.run, strict=True)
    }
    chance = {"colour": round(1 / 6, 3), "shape": round(1 / 3, 3), "size": 0.5}
    Path(args.out).write_text(json.dumps({"chance": chance, "runs": runs}, indent=2) + "\n")
    brief = {
        label: {m: {k: v for k, v in r[m].items() if k != "examples"} for m in MODELS if m in r}
        for label, r in runs.items()
    }
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
