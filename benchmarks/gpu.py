"""CapFilt's caption + score path against a careful transformers script on one GPU, BLIP-base at
384 px in bf16, K=1 and K=3 captions per image, batch sizes 32/64/128.

Run on a CUDA machine as `python benchmarks/gpu.py` inside the project's .venv; it writes
``benchmarks/results/gpu.json``. `python benchmarks/gpu.py --device cpu --tiny --out X.json`
runs the same code on a tiny model on CPU (what tests/test_benchmarks_gpu.py does, so the script
cannot rot); on CPU ``--out`` is required, so CPU numbers never land in gpu.json.

The models, inputs and the two sides are ``benchmarks/realsize.py``'s, with BLIP's CapFilt
decoding: nucleus sampling (top_p 0.9, top_k 50, repetition penalty 1.1; capfilt's seeded
sampler, transformers' own) with min_length = max_length, so every caption has the same length.
transformers gets ``num_return_sequences=K`` and one ITM call on the (image, web text) batch and
one on the (image, caption) batch of B*K rows (K ViT passes per image there).

Per (K, batch size): images/s of each side (median of ``--repeats``), peak GPU memory
(``torch.cuda.max_memory_allocated`` over the timed runs), and the fraction of the GPU's dense
bf16 peak that capfilt's FLOP count per image (``realsize.flops_per_image``) at its measured rate
makes. ``sizing`` records what ``capfilt.stages.capfilt.sizing.auto_batch`` would choose for this
GPU's free memory.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import realsize as R  # noqa: E402  (the sibling script: models, inputs, the two sides, FLOPs)

RESULTS = Path(__file__).parent / "results" / "gpu.json"
log = logging.getLogger("gpu")

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(). Unknown GPUs get null and the fraction is not computed.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,  # the SXM part's device name
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _memory(device: str) -> tuple[Any, Any]:
    import torch

    if device != "cuda":
        return (lambda: None), (lambda: None)
    return torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny BLIP at 64 px (for CPU checks)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--ks", default="1,3")
    ap.add_argument("--batches-per-run", type=int, default=4, help="images per timed run = this x batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    from transformers import BlipConfig

    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.sizing import auto_batch, gpu_free_bytes

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny --out FILE to check the script on CPU")
    if args.device == "cpu" and args.out is None:
        raise SystemExit("--device cpu needs --out: gpu.json holds GPU figures only")
    out_path = args.out or RESULTS
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_tflops(name) if args.device == "cuda" and args.dtype != "float32" else None
    root = Path(tempfile.mkdtemp(prefix="capfilt-gpu-"))
    cap_dir, filt_dir, tok = R.make_models(root, args.tiny)
    shape = R.Shape.of(BlipConfig.from_pretrained(cap_dir))
    n_prompt = len(tok(R.PROMPT, add_special_tokens=False)["input_ids"])
    cap_len = args.max_length - n_prompt - 1 + 2
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    out: dict[str, Any] = {
        "what": "capfilt caption_batch + score_batch vs transformers generate + 2 BlipForImageTextRetrieval calls",
        "device": name,
        "dtype": args.dtype,
        "model": {"image_size": shape.image_size, "tiny": args.tiny},
        "torch": torch.__version__,
        "peak_dense_tflops": peak,
        "decoding": {
            "sample": True,
            "top_p": 0.9,
            "top_k": 50,
            "max_length": args.max_length,
            "min_length": args.max_length,
        },
        "runs": [],
    }
    free = gpu_free_bytes() if args.device == "cuda" else None
    if free is not None:  # what capfilt would choose on this GPU, from its free memory now
        from capfilt.model.hf import load_hf

        caption_cfg, filter_cfg = load_hf(cap_dir).config, load_hf(filt_dir).config
        s = auto_batch(CapFiltConfig(k=1, dtype=args.dtype), caption_cfg, filter_cfg, free, 1)
        out["sizing"] = {
            "free_bytes": free,
            "batch_size": s.batch_size,
            "actors_per_pool": s.captioner_actors,
        }
    reset, peak_mem = _memory(args.device)
    for k in ks:
        flops = R.flops_per_image(shape, args.max_length, n_prompt, k, R.MAX_TEXT_TOKENS, cap_len)
        for bs in batches:
            cfg = CapFiltConfig(
                k=k,
                sample=True,
                max_length=args.max_length,
                min_length=args.max_length,
                prompt=R.PROMPT,
                batch_size=bs,
                dtype=args.dtype,
                attention="sdpa",
            )
            data = R.make_batches(bs * args.batches_per_run, bs, shape.image_size)
            builders = {
                "capfilt": lambda cfg=cfg: R.capfilt_side(cap_dir, filt_dir, cfg, device=args.device),
                "transformers": lambda k=k: R.transformers_side(
                    cap_dir, filt_dir, tok, args.max_length, dtype=dtype, device=args.device, k=k, sample=True
                ),
            }
            row: dict[str, Any] = {"k": k, "batch_size": bs, "images": bs * args.batches_per_run}
            for side, build in builders.items():
                run = build()  # one side's models on the device at a time: its own peak memory
                run(data[:1])  # warm-up: kernels, allocator
                reset()
                secs = [run(data).seconds for _ in range(args.repeats)]
                med = statistics.median(secs)
                row[side] = {
                    "seconds": secs,
                    "images_per_s": row["images"] / med,
                    "peak_memory_bytes": peak_mem(),
                }
                del run
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            row["speedup"] = row["capfilt"]["images_per_s"] / row["transformers"]["images_per_s"]
            achieved = flops["capfilt_gflop"] * row["capfilt"]["images_per_s"] / 1e3  # TFLOP/s
            row["capfilt_gflop_per_image"] = flops["capfilt_gflop"]
            row["transformers_gflop_per_image"] = flops["transformers_gflop"]
            row["capfilt_tflops"] = achieved
            row["fraction_of_peak"] = achieved / peak if peak else None
            out["runs"].append(row)
            log.info(
                "K=%d batch %d: capfilt %.1f images/s, transformers %.1f images/s (%.2fx)",
                k,
                bs,
                row["capfilt"]["images_per_s"],
                row["transformers"]["images_per_s"],
                row["speedup"],
            )
            R._write(out_path, out)
    R._write(out_path, out)
    log.info("written to %s", out_path)
    return out


if __name__ == "__main__":
    main()
