"""Why round 2 writes fewer true captions: where the wrong synthetic captions come from (which
attribute, which scene sizes) and what the round-2 model's captions get wrong against round 1's.

Run as `python experiments/round2_captions.py RUN_DIR [RUN_DIR ...] [--out FILE]` on finished
runs of the demo recipe (world ... evaluate). For each run it reads CapFilt's candidates (every
synthetic caption with its decision) and captions the test split with both rounds' models as the
evaluate stage does (beam search), then classifies every caption with the world's checker:

- ``shape``: a phrase names an object whose colour is in the scene but not with that shape;
- ``colour``: the shape is there, but not in that colour;
- ``size``: shape and colour are there, not that size;
- ``absent``: neither colour nor shape of the phrase is there;
- ``count``: the scene has a different number of them;
- ``relation``: a stated relation does not hold;
- ``unnamed``: no object is named by both colour and shape.

Also the named-shape confusion (which shape a wrong caption says, for the object of that colour),
split by the scene's number of objects. Results: experiments/results/round2_captions.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "round2_captions.json"
KINDS = ("shape", "colour", "size", "absent", "count", "relation", "unnamed")


def error_kinds(scene: Any, text: str) -> set[str]:
    """What is wrong with ``text`` as a caption of ``scene`` (empty: it is true)."""
    from capfilt.world.checker import _relation_holds, explain_caption

    result = explain_caption(scene, text)
    if result.ok:
        return set()
    kinds: set[str] = set()
    for m in result.mentions:
        n = sum(m.matches(o) for o in scene.objects)
        if n == 0:
            same_colour = any(m.colour in (None, o.colour) for o in scene.objects)
            same_shape = any(m.shape in (None, o.shape) for o in scene.objects)
            both = any(m.colour in (None, o.colour) and m.shape in (None, o.shape) for o in scene.objects)
            if both:
                kinds.add("size")
            elif same_colour and not same_shape:
                kinds.add("shape")
            elif same_shape and not same_colour:
                kinds.add("colour")
            elif same_colour and same_shape:
                kinds.add("shape")  # colour and shape are each there, on different objects
            else:
                kinds.add("absent")
        elif (m.exact and n != m.count) or (not m.exact and n < m.count):
            kinds.add("count")
    for r in result.relations:
        s, o = result.mentions[r.subject], result.mentions[r.object]
        if not _relation_holds(scene, s, r.relation, o):
            kinds.add("relation")
    if not any(m.named for m in result.mentions):
        kinds.add("unnamed")
    return kinds or {"other"}


def shape_confusion(scene: Any, text: str) -> list[tuple[str, str]]:
    """(true shape, named shape) for each named phrase whose colour matches exactly one object."""
    from capfilt.world.checker import explain_caption

    out = []
    for m in explain_caption(scene, text).mentions:
        if m.shape is None or m.colour is None:
            continue
        objs = [o for o in scene.objects if o.colour == m.colour]
        if len(objs) == 1:
            out.append((objs[0].shape, m.shape))
    return out


def tally(scenes: list[Any], texts: list[str]) -> dict[str, Any]:
    by_kind: Counter[str] = Counter()
    by_size: dict[str, Counter[str]] = {}
    confusion: Counter[str] = Counter()
    wrong = 0
    for scene, text in zip(scenes, texts, strict=True):
        kinds = error_kinds(scene, text)
        size = str(min(len(scene.objects), 3)) + ("+" if len(scene.objects) >= 3 else "")
        bucket = by_size.setdefault(size, Counter())
        bucket["n"] += 1
        if kinds:
            wrong += 1
            bucket["wrong"] += 1
            by_kind.update(kinds)
        for true, named in shape_confusion(scene, text):
            confusion[f"{true}->{named}"] += 1
    n = len(texts)
    return {
        "n": n,
        "correct": round(1 - wrong / n, 4) if n else None,
        "error_share": {k: round(by_kind[k] / n, 4) for k in (*KINDS, "other") if by_kind[k]},
        "correct_by_objects": {
            s: {"n": c["n"], "correct": round(1 - c["wrong"] / c["n"], 4)} for s, c in sorted(by_size.items())
        },
        "shape_named_for_true_shape": dict(sorted(confusion.items())),
    }


def analyse(run_dir: Path) -> dict[str, Any]:
    import pyarrow.compute as pc

    from capfilt.eval.captioning import generate_captions
    from capfilt.eval.config import EvalConfig
    from capfilt.eval.quality import web_truth
    from capfilt.eval.split import load_world_test_split
    from capfilt.model.checkpoint import load_checkpoint
    from capfilt.model.tokenizer import TokenIds, load_tokenizer
    from capfilt.stages.capfilt.rethreshold import read_candidates
    from capfilt.stages.download import read_samples
    from capfilt.world import load_world

    world = load_world(run_dir / "world")
    samples = read_samples(run_dir / "download", columns=["uid", "row", "status"])
    cands = read_candidates(run_dir / "capfilt")
    syn = cands.filter(pc.equal(cands["text_source"], "synthetic"))
    truth = web_truth(samples, world.labels)
    path_of = dict(zip(truth["uid"].to_pylist(), truth["path"].to_pylist(), strict=True))
    rows = [
        r for r in syn.select(["uid", "text", "decision"]).to_pylist() if r["uid"] in path_of and r["text"]
    ]
    scenes = [world.scene_for_path(path_of[r["uid"]]) for r in rows]
    keep = [r["decision"] == "keep" for r in rows]
    out: dict[str, Any] = {
        "synthetic_all": tally(scenes, [r["text"] for r in rows]),
        "synthetic_kept": tally(
            [s for s, k in zip(scenes, keep, strict=True) if k],
            [r["text"] for r, k in zip(rows, keep, strict=True) if k],
        ),
        "synthetic_dropped": tally(
            [s for s, k in zip(scenes, keep, strict=True) if not k],
            [r["text"] for r, k in zip(rows, keep, strict=True) if not k],
        ),
    }
    split = load_world_test_split(run_dir / "world")
    world_root = (run_dir / "world").resolve()
    test_scenes = [
        world.scene_for_path(Path(p).resolve().relative_to(world_root).as_posix()) for p in split.image_paths
    ]
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in split.image_paths]
    cfg = EvalConfig()
    for label, stage in (("round1", "pretrain"), ("round2", "pretrain2")):
        manifest = json.loads((run_dir / "_stages" / f"{stage}.json").read_text())["result"]
        tok = load_tokenizer(manifest["tokenizer_dir"])
        med = load_checkpoint(manifest["model_dir"], None, token_ids=TokenIds.from_tokenizer(tok))
        captions = generate_captions(med, tok, images, cfg)
        out[f"{label}_test"] = tally(test_scenes, captions)
        out[f"{label}_test"]["examples"] = captions[:8]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = {str(r): analyse(Path(r)) for r in args.runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"what": __doc__.splitlines()[0], "runs": results}, indent=1) + "\n")
    for run, r in results.items():
        print(run)
        for key, t in r.items():
            print(f"  {key:<18} n {t['n']:>5} correct {t['correct']}  errors {t['error_share']}")


if __name__ == "__main__":
    main()
