"""Captioning: captions for test images (BLIP's beam search), BLEU-4 and CIDEr in percent, and the
shapes world checker's share of true captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from capfilt.core.errors import ConfigError
from capfilt.core.text import pre_caption
from capfilt.eval.config import EvalConfig
from capfilt.eval.encode import chunks, torch_device
from capfilt.eval.split import EvalSplit
from capfilt.world import check_caption

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from capfilt.model.med import Med
    from capfilt.world import Scene, World

__all__ = ["caption_scores", "checker_correct_rate", "evaluate_captioning", "generate_captions"]


def generate_captions(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[Image.Image],
    config: EvalConfig | None = None,
) -> list[str]:
    """One caption per image, prompt removed, as the tokenizer decodes it (not yet cleaned)."""
    import torch

    from capfilt.model.transforms import test_transform

    cfg = config or EvalConfig()
    med.require("lm")
    dev = torch_device(cfg.device)
    transform = test_transform(med.config.vision.image_size)
    prompt_ids = None
    if cfg.prompt:
        prompt_ids = torch.tensor(
            tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"], dtype=torch.long
        )
    start = 1 + (0 if prompt_ids is None else len(prompt_ids))  # [DEC] + prompt precede the caption
    captions: list[str] = []
    for sl in tqdm(
        list(chunks(len(images), cfg.batch_size)), desc="generate captions", leave=False, disable=None
    ):
        pixels = torch.stack([transform(im) for im in images[sl]]).to(dev)  # [b, 3, H, W]
        ids = med.generate(
            pixels,
            prompt_ids,
            sample=cfg.sample,
            num_beams=cfg.num_beams,
            max_length=cfg.max_length,
            min_length=cfg.min_length,
        )  # [b, <= max_length]
        captions += tokenizer.batch_decode(ids[:, start:].cpu(), skip_special_tokens=True)
    return [c.strip() for c in captions]


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (CIDEr-D, as in COCO's toolkit), both x100 as the BLIP paper prints them.

    Texts are cleaned with pre_caption (lowercase, BLIP's punctuation removed) instead of the
    toolkit's Java PTB tokenizer. CIDEr's IDF comes from the references of this very set, so score
    more than one image.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    res = {i: [pre_caption(c, None)] for i, c in enumerate(candidates)}
    gts = {i: [pre_caption(r, None) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise ValueError("every candidate needs at least one reference caption")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


def checker_correct_rate(scenes: Sequence[Scene], captions: Sequence[str]) -> float:
    """Share of captions the shapes world's checker accepts as true of their image's scene."""
    if len(scenes) != len(captions):
        raise ValueError(f"{len(scenes)} scenes but {len(captions)} captions")
    if not captions:
        raise ValueError("no captions to check")
    return sum(check_caption(s, c) for s, c in zip(scenes, captions, strict=True)) / len(captions)


def evaluate_captioning(
    med: Med,
    tokenizer: PreTrainedTokenizerBase,
    split: EvalSplit,
    images: Sequence[Image.Image],
    config: EvalConfig | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Captions for the split's images, scored against its references (and by the checker when a
    world is given)."""
    cfg = config or EvalConfig()
    captions = generate_captions(med, tokenizer, images, cfg)
    result: dict[str, Any] = caption_scores(captions, split.captions)
    if world is not None:
        root = world.root.resolve()
        scenes = []
        for p in split.image_paths:
            scene = world.scene_for_path(p.resolve().relative_to(root).as_posix())
            if scene is None:
                raise ConfigError(f"test image {p} is not an image of the world at {world.root}")
            scenes.append(scene)
        result["checker_correct"] = checker_correct_rate(scenes, captions)
    result["n_images"] = len(captions)
    result["examples"] = [
        {"image": p.name, "caption": c}
        for p, c in zip(split.image_paths[: cfg.n_examples], captions, strict=False)
    ]
    return result
