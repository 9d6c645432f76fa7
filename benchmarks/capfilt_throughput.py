"""CapFilt stage throughput and memory: capfilt's stage on Ray vs two transformers scripts.

Run as `python benchmarks/capfilt_throughput.py` inside the project's .venv. All three sides get
the same images (a shapes world written as download shards), the same two models (a random
med-tiny exported as transformers' BlipForConditionalGeneration and BlipForImageTextRetrieval,
loaded from the same folders), the same K, the same decoding (nucleus top_p 0.9, top_k 50,
repetition penalty 1.1, prompt "a picture of ", max length 30) and compute the same outputs:
K captions per image, then ITM p(match) (with [ENC] first) and the ITC cosine for the web text and
every caption.

- stage: ``capfilt.stages.capfilt.driver.run_capfilt`` on a local Ray instance started once before timing
  (a long job pays ``ray.init`` once; actor start-up and model loading are inside the timing),
  writing cleaned shards, candidates and stats.
- per_sample: one ``generate`` call per image, then the retrieval model once per (image, text)
  pair for ITM and once more for ITC, as per-sample curation operators do.
- batched: what a careful user writes with transformers' public API: batched ``generate`` with
  ``num_return_sequences=K``; one ITM forward over all pairs of the batch (the API takes
  ``pixel_values``, so each image is encoded again for each of its texts); one ITC forward over
  the batch's images and texts (a similarity matrix, so images are encoded once there).

Each side runs ``--repeats`` times, interleaved so that none always runs on a warmer or quieter
machine; medians are reported. Fairness on a shared machine: Ray runs its workers at niceness 15,
so after starting Ray the benchmark lowers its own priority to 15 too, and the baselines compete
for the CPU on the same terms as the stage's actors. Each baseline runs at 1 torch thread or at
torch's default, whichever was faster on a few images first (on a busy 2-core machine two threads
can be many times slower). The per-sample loop is timed on the first ``--per-sample-images``
images only (it has no start-up cost; its rate carries over).

Peak memory: the stage runs in a fresh subprocess (its own Ray instance) on 2,000 and on 8,000
images; the whole process tree (driver, Ray's GCS and raylet, every worker) is sampled every
0.25 s for the sum of RSS and of PSS (PSS counts shared pages once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "capfilt_throughput.json"
log = logging.getLogger("capfilt_throughput")

MAX_LENGTH, MIN_LENGTH, TOP_P, TOP_K, REPETITION = 30, 5, 0.9, 50, 1.1
PROMPT = "a picture of "
RAY_WORKER_NICENESS = 15  # what Ray 2.60's raylet gives its worker processes
MAX_TEXT_TOKENS = 35


# ------------------------------------------------------------------------------------ inputs


def make_inputs(root: Path, n_images: int, image_size: int, shard_size: int) -> dict[str, Path]:
    """A shapes world written straight into download shards (SAMPLE rows, all success), and a
    tokenizer and random med-tiny captioner/filter exported as transformers folders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.core import schema as S
    from capfilt.model.hf import export_captioner, export_filter
    from capfilt.testing import tiny_med, tiny_tokenizer
    from capfilt.world import WorldConfig, make_world

    world = root / "world"
    make_world(
        world, WorldConfig(seed=0, n_web=n_images, n_human=10, n_test=10, image_size=image_size, bad_rate=0.0)
    )
    web = pq.read_table(world / "web.parquet").to_pydict()
    data = root / "shards"
    data.mkdir()
    for shard, start in enumerate(range(0, n_images, shard_size)):
        paths, texts = web["path"][start : start + shard_size], web["caption"][start : start + shard_size]
        n = len(paths)
        images = [(world / p).read_bytes() for p in paths]
        cols = {
            "uid": [S.make_uid("shapes", p, t) for p, t in zip(paths, texts, strict=True)],
            "url": paths,
            "text": texts,
            "source": ["shapes"] * n,
            "row": list(range(start, start + n)),
            "shard": [shard] * n,
            "status": [S.SUCCESS] * n,
            "reason": [None] * n,
            "width": [image_size] * n,
            "height": [image_size] * n,
            "original_width": [image_size] * n,
            "original_height": [image_size] * n,
            "sha256": [None] * n,
            "image": images,
        }
        pq.write_table(pa.table(cols, schema=S.SAMPLE), data / f"{shard:05d}.parquet")

    tok = tiny_tokenizer(web["caption"])
    med = tiny_med(tok)
    return {
        "data": data,
        "captioner": export_captioner(med, root / "captioner", tok),
        "filter": export_filter(med, root / "filter", tok),
    }


def _samples(data: Path) -> tuple[list[bytes], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(
        [pq.read_table(f, columns=["image", "text"]) for f in sorted(data.glob("*.parquet"))]
    )
    return table.column("image").to_pylist(), table.column("text").to_pylist()


# ------------------------------------------------------------------------------------- sides


def run_stage(inputs: dict[str, Path], out: Path, k: int, batch_size: int, captioner_actors: int) -> float:
    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.driver import run_capfilt

    cfg = CapFiltConfig(k=k, batch_size=batch_size, captioner_actors=captioner_actors, max_length=MAX_LENGTH)
    t0 = time.perf_counter()
    summary = run_capfilt(inputs["data"], out, inputs["captioner"], inputs["filter"], cfg)
    wall = time.perf_counter() - t0
    assert summary.texts_considered["synthetic"] == k * summary.images, summary.texts_considered
    return wall


class _Transformers:
    """The two transformers models and what both baselines share: preprocessing and decoding."""

    def __init__(self, inputs: dict[str, Path]) -> None:
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

        from capfilt.model.transforms import test_transform

        self.cap = BlipForConditionalGeneration.from_pretrained(inputs["captioner"]).eval()
        self.ret = BlipForImageTextRetrieval.from_pretrained(inputs["filter"]).eval()
        self.tok = AutoTokenizer.from_pretrained(inputs["captioner"])
        self.enc = self.ret.config.text_config.capfilt_enc_token_id  # [ENC]: transformers keeps [CLS]
        self.transform = test_transform(self.cap.config.vision_config.image_size)
        self.prompt = self.tok(PROMPT, return_tensors="pt")  # [CLS] a picture of [SEP]
        self.prompt_len = self.prompt["input_ids"].shape[1] - 1  # [DEC] + prompt, as generated

    def pixels(self, images: list[bytes]) -> Any:
        import torch

        from capfilt.model.transforms import decode_image

        return torch.stack([self.transform(decode_image(b)) for b in images])  # [B, 3, S, S]

    def captions(self, pixels: Any, k: int) -> list[str]:
        b = pixels.shape[0]
        out = self.cap.generate(
            pixel_values=pixels,
            input_ids=self.prompt["input_ids"].repeat(b, 1),
            attention_mask=self.prompt["attention_mask"].repeat(b, 1),
            do_sample=True,
            top_p=TOP_P,
            top_k=TOP_K,
            repetition_penalty=REPETITION,
            max_length=MAX_LENGTH,
            min_length=MIN_LENGTH,
            num_return_sequences=k,
        )
        return [t.strip() for t in self.tok.batch_decode(out[:, self.prompt_len :], skip_special_tokens=True)]

    def tokens(self, texts: list[str]) -> Any:
        return self.tok(
            texts, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )

    def itm(self, pixels: Any, texts: list[str]) -> list[float]:
        t = self.tokens(texts)
        ids = t["input_ids"].clone()
        ids[:, 0] = self.enc
        logits = self.ret(input_ids=ids, attention_mask=t["attention_mask"], pixel_values=pixels).itm_score
        return logits.softmax(dim=-1)[:, 1].tolist()

    def itc(self, pixels: Any, texts: list[str]) -> Any:
        t = self.tokens(texts)
        return self.ret(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            pixel_values=pixels,
            use_itm_head=False,
        ).itm_score  # [B_img, N_txt] cosines


def run_per_sample(model: _Transformers, images: list[bytes], texts: list[str], k: int) -> float:
    import torch

    from capfilt.core.text import pre_caption

    t0 = time.perf_counter()
    with torch.inference_mode():
        for image, web in zip(images, texts, strict=True):
            pixels = model.pixels([image])  # [1, 3, S, S]
            for text in [pre_caption(web), *model.captions(pixels, k)]:
                model.itm(pixels, [text])
                model.itc(pixels, [text])
    return time.perf_counter() - t0


def run_batched(
    model: _Transformers, images: list[bytes], texts: list[str], k: int, batch_size: int
) -> float:
    import torch

    from capfilt.core.text import pre_caption

    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = model.pixels(images[start : start + batch_size])  # [B, 3, S, S]
            b = pixels.shape[0]
            captions = model.captions(pixels, k)  # [B*k], rows of one image adjacent
            pair_texts = [pre_caption(t) for t in texts[start : start + b]] + captions
            pair_image = torch.cat(
                [torch.arange(b), torch.arange(b).repeat_interleave(k)]
            )  # image of each text
            model.itm(pixels[pair_image], pair_texts)  # every image encoded again for each text
            model.itc(pixels, pair_texts)[pair_image, torch.arange(len(pair_texts))]
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ memory

_RSS_CHILD = """
import json, sys, time
from capfilt.stages.capfilt.config import CapFiltConfig
from capfilt.stages.capfilt.driver import run_capfilt
from capfilt.core.cluster import ensure_ray
ensure_ray(num_cpus=4)
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
s = run_capfilt(a["data"], a["out"], a["captioner"], a["filter"], CapFiltConfig(k=a["k"], batch_size=a["batch_size"]))
print(json.dumps({"images": s.images, "wall_s": time.perf_counter() - t0}))
"""


def peak_memory(args: dict[str, Any]) -> dict[str, float]:
    """Run the stage in a subprocess; sample its whole process tree until it exits."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", _RSS_CHILD, json.dumps(args)], stdout=subprocess.PIPE, text=True
    )
    root = psutil.Process(proc.pid)
    peak = {"rss": 0, "pss": 0, "driver_rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = pss = 0
            try:
                procs = [root, *root.children(recursive=True)]
                driver = root.memory_info().rss
            except psutil.Error:
                break
            for p in procs:
                try:
                    full = p.memory_full_info()
                    rss, pss = rss + full.rss, pss + full.pss
                except psutil.Error:
                    continue
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            peak["driver_rss"] = max(peak["driver_rss"], driver)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"the stage subprocess failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    mib = 1 << 20
    return {
        "images": result["images"],
        "wall_s": round(result["wall_s"], 1),
        "peak_tree_rss_mib": round(peak["rss"] / mib),
        "peak_tree_pss_mib": round(peak["pss"] / mib),
        "peak_driver_rss_mib": round(peak["driver_rss"] / mib),
    }


# -------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8000, help="images in the throughput runs")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--captioner-actors", type=int, default=1)
    ap.add_argument(
        "--image-size", type=int, default=128, help="size of the downloaded images (the model takes 64)"
    )
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--calibration-images", type=int, default=32, help="images to pick each baseline's threads"
    )
    ap.add_argument("--per-sample-images", type=int, default=250, help="per-sample loop timed on this many")
    ap.add_argument("--rss-images", type=int, nargs=2, default=[2000, 8000])
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument(
        "--work", type=Path, default=None, help="folder for inputs and outputs (default: a temp folder)"
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("capfilt", "ray", "transformers", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import ray
    import torch

    from capfilt.core.cluster import ensure_ray

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        n_rss = max(args.rss_images)
        t0 = time.perf_counter()
        inputs = make_inputs(root / "in", max(args.images, n_rss), args.image_size, args.shard_size)
        log.info("inputs ready in %.0f s", time.perf_counter() - t0)
        # The throughput runs read the first `--images` images, as their own shards folder.
        bench = root / "bench_shards"
        bench.mkdir()
        for f in sorted(inputs["data"].glob("*.parquet"))[: -(-args.images // args.shard_size)]:
            os.link(f, bench / f.name)
        bench_inputs = inputs | {"data": bench}
        images, texts = _samples(bench)
        n = len(images)
        model = _Transformers(inputs)

        t0 = time.perf_counter()
        ensure_ray(num_cpus=4)
        ray_init_s = time.perf_counter() - t0
        # Ray runs its workers at niceness 15. On a shared machine, baselines at 0 would take the
        # CPU from them; at the same niceness both sides compete for it on equal terms.
        niceness = os.nice(RAY_WORKER_NICENESS - os.nice(0))
        # Threads for the baselines: whichever of 1 and torch's default is faster on this machine
        # (on a busy 2-core machine two threads can be many times slower than one).
        threads: dict[str, int] = {}
        calibration: dict[str, float] = {}
        few = min(args.calibration_images, n)
        for side, fn in (
            ("batched", lambda: run_batched(model, images[:few], texts[:few], args.k, args.batch_size)),
            ("per_sample", lambda: run_per_sample(model, images[: few // 4], texts[: few // 4], args.k) * 4),
        ):
            for t in sorted({1, default_threads}):
                torch.set_num_threads(t)
                calibration[f"{side}_{t}t"] = round(few / fn(), 1)
            threads[side] = max(sorted({1, default_threads}), key=lambda t: calibration[f"{side}_{t}t"])
        torch.set_num_threads(default_threads)
        log.info("baseline images/s on %d images by torch threads: %s", few, calibration)

        m = min(args.per_sample_images, n)
        sides = ["stage", "batched", "per_sample"]
        walls: dict[str, list[float]] = {s: [] for s in sides}
        loads: list[float] = []
        for i in range(args.repeats):
            for side in sides if i % 2 == 0 else sides[::-1]:
                loads.append(os.getloadavg()[0])
                if side == "stage":
                    wall = run_stage(
                        bench_inputs, root / f"out{i}", args.k, args.batch_size, args.captioner_actors
                    )
                else:
                    torch.set_num_threads(threads[side])
                    if side == "batched":
                        wall = run_batched(model, images, texts, args.k, args.batch_size)
                    else:  # the slowest side: timed on the first m images, the rate carries over
                        wall = run_per_sample(model, images[:m], texts[:m], args.k) * n / m
                    torch.set_num_threads(default_threads)
                walls[side].append(wall)
                log.info("run %d %-10s %d images: %6.1f s = %6.1f images/s", i, side, n, wall, n / wall)
        ray.shutdown()

        rss: dict[str, Any] = {}
        if not args.skip_rss:
            for count in args.rss_images:
                data = root / f"rss_{count}"
                data.mkdir()
                for f in sorted(inputs["data"].glob("*.parquet"))[: -(-count // args.shard_size)]:
                    os.link(f, data / f.name)
                rss[str(count)] = peak_memory(
                    {
                        "data": str(data),
                        "out": str(root / f"rss_out_{count}"),
                        "captioner": str(inputs["captioner"]),
                        "filter": str(inputs["filter"]),
                        "k": args.k,
                        "batch_size": args.batch_size,
                    }
                )
                log.info("memory at %d images: %s", count, rss[str(count)])

    rate = {s: n / statistics.median(w) for s, w in walls.items()}
    result: dict[str, Any] = {
        "ratio_vs_per_sample": round(rate["stage"] / rate["per_sample"], 2),
        "ratio_vs_batched": round(rate["stage"] / rate["batched"], 2),
        "images_per_s_median": {s: round(r, 1) for s, r in rate.items()},
        "wall_s_median": {s: round(statistics.median(w), 2) for s, w in walls.items()},
        "wall_s_runs": {s: [round(x, 2) for x in w] for s, w in walls.items()},
        "baseline_torch_threads": threads,
        "calibration_images_per_s": calibration,
        "ray_init_s": round(ray_init_s, 2),
        "niceness": niceness,
        "load_average_1min_at_run_starts": [round(x, 1) for x in loads],
    }
    if rss:
        lo, hi = (rss[str(c)] for c in args.rss_images)
        result["rss_growth"] = round(hi["peak_tree_rss_mib"] / lo["peak_tree_rss_mib"], 3)
        result["pss_growth"] = round(hi["peak_tree_pss_mib"] / lo["peak_tree_pss_mib"], 3)
        result["driver_rss_growth"] = round(hi["peak_driver_rss_mib"] / lo["peak_driver_rss_mib"], 3)
        result["memory"] = rss
    result["setup"] = {
        "images": n,
        "per_sample_timed_on": min(args.per_sample_images, n),
        "k": args.k,
        "batch_size": args.batch_size,
        "captioner_actors": args.captioner_actors,
        "filter_actors": 1,
        "model": "med-tiny (random init), 64 px, exported as transformers BLIP",
        "download_image_size": args.image_size,
        "shard_size": args.shard_size,
        "decoding": {
            "top_p": TOP_P,
            "top_k": TOP_K,
            "repetition_penalty": REPETITION,
            "max_length": MAX_LENGTH,
        },
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "torch_threads_default": default_threads,
        "device": "cpu",
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
