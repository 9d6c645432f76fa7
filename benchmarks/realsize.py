"""CapFilt's caption + score path against a careful transformers script, at BLIP-base size on CPU.

Run as `python benchmarks/realsize.py` (``--tiny`` for a one-minute check) inside the project's
.venv; it writes ``benchmarks/results/realsize.json`` (``--out`` elsewhere).

Models: transformers' ``BlipConfig()`` (ViT-B/16 at 384 px, a 12-layer BERT-base text side,
vocabulary 30,524) with random weights (std 0.02), saved with ``save_pretrained`` as a
BlipForConditionalGeneration and a BlipForImageTextRetrieval folder, with a BERT-sized
WordPiece vocabulary whose [PAD]/[SEP]/[DEC]/[ENC] ids are bert-base-uncased's plus BLIP's.
capfilt loads them as a user's folders are loaded (``resolve_model`` then ``load_model``);
transformers loads the same folders with ``from_pretrained``.

Work (the same for both): K=1 greedy caption per image after the prompt "a picture of ", with
min_length = max_length so every caption has the same number of tokens whatever random weights
pick; then ITM p(match) with [ENC] first for (image, web text) and (image, synthetic caption),
texts truncated at 35 tokens.

- capfilt: ``caption_batch`` then ``score_batch`` per batch (SDPA attention; the filter encodes
  each image once for both texts, ViT and cross-attention keys/values; it also computes the ITC
  cosine of every pair, which the transformers side does not).
- transformers: ``BlipForConditionalGeneration.generate`` on the batch, then
  ``BlipForImageTextRetrieval(use_itm_head=True)`` on the (image, web text) batch and on the
  (image, caption) batch: one ViT pass per call, as its API takes pixels.

The two sides alternate, ``--repeats`` times each; medians are reported, with a FLOP count of
each side per image (``flops_per_image``) beside the measured ratio. Extra measurements on the
first ``--extra-images`` images: the filter with and without shared image keys/values, eager vs
SDPA attention, and (``--compile``) torch.compile of the ViT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "realsize.json"
log = logging.getLogger("realsize")

PROMPT = "a picture of "
MAX_TEXT_TOKENS = 35
WEB_WORDS = 40  # web texts longer than 35 tokens: every ITM text pass is 35 tokens long


# ------------------------------------------------------------------------------------ FLOPs


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a BLIP model."""

    image_size: int
    patch_size: int
    dv: int  # vision width
    vision_layers: int
    vision_mlp: int
    dt: int  # text width
    text_layers: int
    text_mlp: int
    vocab: int

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @staticmethod
    def of(blip_config: Any) -> Shape:
        v, t = blip_config.vision_config, blip_config.text_config
        return Shape(
            v.image_size,
            v.patch_size,
            v.hidden_size,
            v.num_hidden_layers,
            v.intermediate_size,
            t.hidden_size,
            t.num_hidden_layers,
            t.intermediate_size,
            t.vocab_size,
        )


def vit_flops(s: Shape) -> float:
    """One ViT pass over one image (a multiply-add is 2 FLOPs)."""
    n = s.tokens
    patch = 2 * (n - 1) * 3 * s.patch_size**2 * s.dv
    block = 2 * n * (4 * s.dv * s.dv + 2 * s.dv * s.vision_mlp) + 4 * n * n * s.dv
    return patch + s.vision_layers * block


def cross_kv_flops(s: Shape) -> float:
    """The image's cross-attention keys and values in every text layer."""
    return s.text_layers * 2 * s.tokens * 2 * s.dv * s.dt


def text_flops(s: Shape, length: int, cross: bool, context: int | None = None) -> float:
    """``length`` new text tokens through every text layer, attending to ``context`` earlier
    tokens (itself when None), with cross-attention queries/outputs when ``cross`` (the image's
    keys/values are counted apart, in cross_kv_flops)."""
    ctx = length if context is None else context
    per_layer = 2 * length * 4 * s.dt * s.dt + 4 * length * ctx * s.dt + 2 * length * 2 * s.dt * s.text_mlp
    if cross:
        per_layer += 2 * length * 2 * s.dt * s.dt + 4 * length * s.tokens * s.dt
    return s.text_layers * per_layer


def caption_flops(s: Shape, max_length: int, prompt_tokens: int) -> float:
    """Greedy decoding of one caption of ``max_length`` tokens ([DEC] + prompt + caption) with a
    self-attention cache: the prompt in one pass, then one token per step; the LM head at each step."""
    start = 1 + prompt_tokens
    total = text_flops(s, start, True) + cross_kv_flops(s)
    for pos in range(start, max_length - 1):
        total += text_flops(s, 1, True, context=pos + 1)
    lm_head = 2 * s.dt * s.dt + 2 * s.dt * s.vocab
    return total + (max_length - start) * lm_head


def flops_per_image(
    s: Shape, max_length: int, prompt_tokens: int, k: int, web_len: int, cap_len: int
) -> dict[str, float]:
    """GFLOP per image of each side: K captions, then ITM of the web text and every caption."""
    cap = caption_flops(s, max_length, prompt_tokens)
    itm_text = text_flops(s, web_len, True)  # one image-grounded pass, image keys/values apart
    itc_text = text_flops(s, web_len, False)
    vit, kv = vit_flops(s), cross_kv_flops(s)
    # transformers: a ViT per generate and per ITM call; a caption's row per caption (each with
    # its image keys/values); each ITM pass computes its image keys/values.
    hf = vit + k * cap + (vit + itm_text + kv) + k * (vit + text_flops(s, cap_len, True) + kv)
    # capfilt: a ViT per model; the captioner's image keys/values once for its K rows; the filter's
    # texts padded together to the longest (web_len), its image keys/values once, plus ITC.
    ours = vit + k * cap - (k - 1) * kv + vit + kv + (1 + k) * (itm_text + itc_text)
    return {
        "transformers_gflop": hf / 1e9,
        "capfilt_gflop": ours / 1e9,
        "ratio": hf / ours,
        "vit_gflop": vit / 1e9,
        "caption_gflop": cap / 1e9,
        "itm_text_gflop": (itm_text + kv) / 1e9,
        "cross_kv_gflop": kv / 1e9,
        "itc_text_gflop": itc_text / 1e9,
    }


# ----------------------------------------------------------------------------------- inputs


def _word(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(4):
        out, i = out + letters[i % 26], i // 26
    return out


def make_tokenizer(out: Path, vocab_size: int) -> Any:
    """A WordPiece tokenizer with bert-base-uncased's layout ([PAD]=0, [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103, ``vocab_size`` entries: the prompt's words, then made-up 4-letter
    words) and BLIP's [DEC]/[ENC] after them."""
    from transformers import AutoTokenizer

    from capfilt.model.tokenizer import add_blip_special_tokens

    out.mkdir(parents=True, exist_ok=True)
    vocab = [f"[unused{i}]" for i in range(vocab_size)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    words = PROMPT.split() + [_word(j) for j in range(vocab_size)]
    for i, w in zip(range(104, vocab_size), words, strict=False):
        vocab[i] = w
    # BERT's own vocab.txt loader (as capfilt.model.tokenizer.train_wordpiece does)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = add_blip_special_tokens(AutoTokenizer.from_pretrained(out, use_fast=True, local_files_only=True))
    tok.save_pretrained(out)
    return tok


def make_models(root: Path, tiny: bool) -> tuple[Path, Path, Any]:
    """Random captioner and filter folders (BlipConfig() or a tiny one), each with the tokenizer."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.model.tokenizer import TokenIds

    base_text = BlipConfig().text_config
    tok = make_tokenizer(root / "tokenizer", 1000 if tiny else base_text.vocab_size - 2)
    ids = TokenIds.from_tokenizer(tok)
    text: dict[str, Any] = {
        "vocab_size": len(tok),
        "bos_token_id": ids.bos,
        "pad_token_id": ids.pad,
        "sep_token_id": ids.sep,
        "eos_token_id": ids.sep,
        "capfilt_enc_token_id": ids.enc,
        "initializer_range": 0.02,
    }
    vision: dict[str, Any] = {"initializer_range": 0.02}
    if tiny:
        small = {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        }
        text |= small | {"encoder_hidden_size": 64}
        vision |= small | {"image_size": 64, "patch_size": 16}
    config = BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=64 if tiny else 256)
    paths = []
    for cls, name in ((BlipForConditionalGeneration, "captioner"), (BlipForImageTextRetrieval, "filter")):
        torch.manual_seed(0)
        model = cls(config)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(root / name)
    return paths[0], paths[1], tok


def make_batches(n: int, batch: int, image_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random images (uint8, as capfilt's decode tasks hand them over) with web texts of
    WEB_WORDS words, in batches."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    texts = [" ".join(_word(int(w)) for w in rng.integers(0, 20000, WEB_WORDS)) for _ in range(n)]
    out = []
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        out.append(
            {
                "uid": np.asarray([f"img{i:05d}" for i in range(lo, hi)], dtype=object),
                "text": np.asarray(texts[lo:hi], dtype=object),
                "row": np.arange(lo, hi, dtype=np.int64),
                "error": np.asarray([""] * (hi - lo), dtype=object),
                f"pixels_{image_size}": pixels[lo:hi],
            }
        )
    return out


# ------------------------------------------------------------------------------------ sides


@dataclass
class Result:
    seconds: float
    captions: list[str]
    itm: list[float]  # web text, then caption, per image


def capfilt_side(
    cap_dir: Path, filt_dir: Path, cfg: Any, device: str = "cpu"
) -> Callable[[list[dict[str, Any]]], Result]:
    """capfilt's caption + score functions on models loaded as a user's folders are."""
    from capfilt.model.tokenizer import load_tokenizer
    from capfilt.stages.capfilt.caption import caption_batch
    from capfilt.stages.capfilt.models import load_model, resolve_model
    from capfilt.stages.capfilt.score import score_batch

    cap_ref, filt_ref = resolve_model(cap_dir, "captioner"), resolve_model(filt_dir, "filter")
    captioner = load_model(cap_ref, "captioner", cfg, device=device)
    filt = load_model(filt_ref, "filter", cfg, device=device)
    tok = load_tokenizer(cap_ref.tokenizer)

    def run(batches: list[dict[str, Any]]) -> Result:
        captions: list[str] = []
        itm: list[float] = []
        t0 = time.perf_counter()
        for b in batches:
            b = caption_batch(captioner, tok, b, cfg)
            table = score_batch(filt, tok, b, cfg).to_pydict()
            captions += [x for c in b["captions"] for x in c]
            itm += [float("nan") if x is None else float(x) for x in table["itm_score"]]
        _sync(device)
        return Result(time.perf_counter() - t0, captions, itm)

    return run


def transformers_side(
    cap_dir: Path,
    filt_dir: Path,
    tok: Any,
    max_length: int,
    dtype: Any = None,
    device: str = "cpu",
    k: int = 1,
    sample: bool = False,
) -> Callable[[list[dict[str, Any]]], Result]:
    """What a careful transformers user writes: batched generate (``k`` captions per image), then
    the retrieval model on the (image, web text) batch and on the (image, caption) batch, [ENC]
    first as BLIP's filter was trained. ``sample``: BLIP's nucleus sampling (top_p 0.9, top_k 50,
    repetition penalty 1.1) instead of greedy."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.core.text import pre_caption
    from capfilt.stages.capfilt.pixels import pixel_values

    kw: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    captioner = BlipForConditionalGeneration.from_pretrained(cap_dir, **kw).to(device).eval()
    filt = BlipForImageTextRetrieval.from_pretrained(filt_dir, **kw).to(device).eval()
    enc = filt.config.text_config.capfilt_enc_token_id
    prompt = tok([PROMPT], return_tensors="pt")["input_ids"]  # [CLS] a picture of [SEP]
    column = f"pixels_{captioner.config.vision_config.image_size}"
    n_prompt = prompt.shape[1] - 1  # generate drops the [SEP] and swaps [CLS] for [DEC]
    decode: dict[str, Any] = (
        {"do_sample": True, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "num_return_sequences": k}
        if sample
        else {
            "do_sample": False,
            "num_beams": max(k, 1),
            "num_return_sequences": k,
            "repetition_penalty": 1.0,
        }
    )

    def itm(pixels: torch.Tensor, texts: list[str]) -> list[float]:
        t = tok(
            [pre_caption(x, 30) for x in texts],
            padding="longest",
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )
        ids = t["input_ids"].to(device)
        ids[:, 0] = enc
        mask = t["attention_mask"].to(device)
        out = filt(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=True)
        return out.itm_score.float().softmax(dim=-1)[:, 1].cpu().tolist()

    def run(batches: list[dict[str, Any]]) -> Result:
        captions: list[str] = []
        scores: list[float] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                pixels = pixel_values(b[column], device, captioner.dtype)
                n = pixels.shape[0]
                out = captioner.generate(
                    pixel_values=pixels,
                    input_ids=prompt.repeat(n, 1).to(device),
                    max_length=max_length,
                    min_length=max_length,
                    **decode,
                )
                caps = [c.strip() for c in tok.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]
                web = itm(pixels, [str(x) for x in b["text"]])
                syn = itm(pixels.repeat_interleave(k, dim=0) if k > 1 else pixels, caps)
                captions += caps
                for i, w in enumerate(web):
                    scores += [w, *syn[i * k : (i + 1) * k]]
        _sync(device)
        return Result(time.perf_counter() - t0, captions, scores)

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def agreement(a: Result, b: Result) -> dict[str, float]:
    same = sum(x == y for x, y in zip(a.captions, b.captions, strict=True))
    pairs = [(x, y) for x, y in zip(a.itm, b.itm, strict=True) if x == x and y == y]  # not NaN
    return {
        "captions_equal": same / max(len(a.captions), 1),
        "itm_max_abs_diff": max((abs(x - y) for x, y in pairs), default=0.0),
    }


# ------------------------------------------------------------------------------------- main


def _write(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tiny", action="store_true", help="a tiny BLIP at 64 px: checks the script, measures nothing"
    )
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-length", type=int, default=24, help="tokens: [DEC] + 3 prompt tokens + 20 caption tokens"
    )
    ap.add_argument(
        "--extra-images", type=int, default=8, help="images for the share / attention / compile runs"
    )
    ap.add_argument("--extra-repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="images each side runs before timing")
    ap.add_argument("--variants", action="store_true", help="also time eager attention on the whole path")
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the ViT (with --variants)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    from transformers import BlipConfig

    from capfilt.stages.capfilt.config import CapFiltConfig

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="capfilt-realsize-"))
    cap_dir, filt_dir, tok = make_models(root, args.tiny)
    shape = Shape.of(BlipConfig.from_pretrained(cap_dir))
    cfg = CapFiltConfig(
        k=1,
        sample=False,
        max_length=args.max_length,
        min_length=args.max_length,
        prompt=PROMPT,
        batch_size=args.batch,
        dtype="float32",
        attention="sdpa",
    )
    batches = make_batches(args.images, args.batch, shape.image_size)
    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    cap_len = args.max_length - n_prompt - 1 + 2  # [CLS] caption [SEP]
    flops = flops_per_image(shape, args.max_length, n_prompt, 1, MAX_TEXT_TOKENS, cap_len)
    out: dict[str, Any] = {
        "what": "capfilt caption_batch + score_batch vs transformers generate + 2 BlipForImageTextRetrieval calls, CPU",
        "model": asdict(shape)
        | {
            "tiny": args.tiny,
            "weights": "random (std 0.02), BlipConfig()" if not args.tiny else "random, tiny",
        },
        "images": args.images,
        "batch": args.batch,
        "k": 1,
        "decoding": {
            "greedy": True,
            "max_length": args.max_length,
            "min_length": args.max_length,
            "prompt": PROMPT,
        },
        "torch_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "flops_per_image": flops,
        "note": "",
    }
    sides = {
        "capfilt": capfilt_side(cap_dir, filt_dir, cfg),
        "transformers": transformers_side(cap_dir, filt_dir, tok, args.max_length),
    }
    # warm-up: first-call allocations and lazy imports (seconds, against minutes per repeat at base size)
    warm = make_batches(args.warmup, 1, shape.image_size, seed=1) if args.warmup else []
    for run in sides.values():
        run(warm)
    times: dict[str, list[float]] = {k: [] for k in sides}
    last: dict[str, Result] = {}
    for rep in range(args.repeats):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            res = sides[name](batches)
            times[name].append(res.seconds)
            last[name] = res
            log.info(
                "repeat %d %s: %.1f s (%.2f images/s)", rep + 1, name, res.seconds, args.images / res.seconds
            )
        med = {k: statistics.median(v) for k, v in times.items()}
        out["seconds"] = times
        out["median_s"] = med
        out["images_per_s"] = {k: args.images / v for k, v in med.items()}
        out["speedup"] = med["transformers"] / med["capfilt"]
        out["repeats_done"] = rep + 1
        out["agreement"] = agreement(last["capfilt"], last["transformers"])
        _write(args.out, out)
    if args.extra_images > 0:
        out["extra"] = extras(
            cap_dir, filt_dir, cfg, batches, args, lambda extra: _write(args.out, out | {"extra": extra})
        )
    _write(args.out, out)
    log.info("speedup %.2fx (FLOP ratio %.2fx), written to %s", out["speedup"], flops["ratio"], args.out)
    return out


def extras(
    cap_dir: Path,
    filt_dir: Path,
    cfg: Any,
    batches: list[dict[str, Any]],
    args: Any,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Smaller measurements on the first ``--extra-images`` images: the filter with and without
    shared image keys/values (same ViT); with ``--variants`` eager vs SDPA attention, and
    torch.compile with ``--compile``; medians of
    ``--extra-repeats``."""
    import torch

    from capfilt.model.tokenizer import load_tokenizer, tokenize
    from capfilt.stages.capfilt.caption import caption_batch
    from capfilt.stages.capfilt.models import load_model, resolve_model
    from capfilt.stages.capfilt.pixels import pixel_values

    n = args.extra_images
    sub = _first(batches, n)
    cap_ref, filt_ref = resolve_model(cap_dir, "captioner"), resolve_model(filt_dir, "filter")
    tok = load_tokenizer(filt_ref.tokenizer)
    out: dict[str, Any] = {"images": sum(len(b["uid"]) for b in sub), "repeats": args.extra_repeats}

    # Filter ITM over (web, caption) pairs: image keys/values per image vs per pair.
    filt = load_model(filt_ref, "filter", cfg)
    captioner = load_model(cap_ref, "captioner", cfg)
    size = filt.config.vision.image_size
    prepared = []
    with torch.inference_mode():
        for b in sub:
            b = caption_batch(captioner, tok, b, cfg)
            texts = [t for w, c in zip(b["text"], b["captions"], strict=True) for t in (str(w), c[0])]
            toks = tokenize(tok, texts, MAX_TEXT_TOKENS)
            embeds = filt.encode_image(pixel_values(b[f"pixels_{size}"]))
            prepared.append((embeds, toks["input_ids"], toks["attention_mask"]))

    def itm(shared: bool) -> tuple[float, list[float]]:
        probs: list[float] = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for embeds, ids, mask in prepared:
                e = embeds if shared else embeds.repeat_interleave(2, dim=0)  # [B, ...] or [2B, ...]
                probs += filt.itm_prob(e, ids, mask).tolist()
        return time.perf_counter() - t0, probs

    runs: dict[str, list[float]] = {"shared": [], "per_pair": []}
    probs = {}
    for _ in range(args.extra_repeats):
        for name, shared in (("shared", True), ("per_pair", False)):
            s, probs[name] = itm(shared)
            runs[name].append(s)
    out["filter_itm_text_side"] = {
        "seconds": runs,
        "median_s": {k: statistics.median(v) for k, v in runs.items()},
        "speedup": statistics.median(runs["per_pair"]) / statistics.median(runs["shared"]),
        "max_abs_diff": max(abs(a - b) for a, b in zip(probs["shared"], probs["per_pair"], strict=True)),
        "what": "ITM image-grounded text passes of (web, caption) per image, ViT excluded",
    }

    save(out)
    if not args.variants:
        return out
    # Attention kernel (and compile) on the whole caption + score path.
    variants: dict[str, Any] = {"sdpa": cfg, "eager": cfg.model_copy(update={"attention": "eager"})}
    if args.compile:
        variants["sdpa+compile"] = cfg.model_copy(update={"compile": True})
    vt: dict[str, list[float]] = {k: [] for k in variants}
    for name, vcfg in variants.items():
        run = capfilt_side(cap_dir, filt_dir, vcfg)
        t0 = time.perf_counter()
        run(_first(sub, 2))  # warm-up (and compilation)
        if name.endswith("compile"):
            out["compile_warmup_s"] = time.perf_counter() - t0
        for _ in range(args.extra_repeats):
            vt[name].append(run(sub).seconds)
    out["capfilt_variants"] = {"seconds": vt, "median_s": {k: statistics.median(v) for k, v in vt.items()}}
    return out


def _first(batches: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        take = min(left, len(b["uid"]))
        out.append({k: v[:take] for k, v in b.items()})
        left -= take
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
