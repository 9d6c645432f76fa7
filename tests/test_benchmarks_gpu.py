"""benchmarks/gpu.py runs on CPU with a tiny model (so it cannot rot while no GPU is at hand),
writes only where it is told, and its FLOP count is BLIP-base's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import realsize  # noqa: E402


def test_gpu_script_runs_on_cpu_tiny_and_writes_sane_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny"]
    cmd += ["--batches", "2", "--ks", "1,3", "--batches-per-run", "1", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["model"]["tiny"] is True
    assert data["peak_dense_tflops"] is None, "no FLOP bound on CPU"
    assert [(r["k"], r["batch_size"]) for r in data["runs"]] == [(1, 2), (3, 2)]
    for r in data["runs"]:
        for side in ("capfilt", "transformers"):
            assert r[side]["images_per_s"] > 0 and math.isfinite(r[side]["images_per_s"])
            assert r[side]["peak_memory_bytes"] is None
        assert r["speedup"] == pytest.approx(r["capfilt"]["images_per_s"] / r["transformers"]["images_per_s"])
        assert r["capfilt_tflops"] == pytest.approx(
            r["capfilt_gflop_per_image"] * r["capfilt"]["images_per_s"] / 1e3
        )
        assert r["fraction_of_peak"] is None
    k1, k3 = data["runs"]
    assert k3["transformers_gflop_per_image"] > k1["transformers_gflop_per_image"]


def test_gpu_script_refuses_to_write_cpu_numbers_to_gpu_json():
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--device cpu needs --out" in done.stderr


def test_flop_count_at_blip_base_384_is_referencess():
    from transformers import BlipConfig

    s = realsize.Shape.of(BlipConfig())
    f = realsize.flops_per_image(s, max_length=24, prompt_tokens=3, k=1, web_len=35, cap_len=22)
    # REFERENCE.md section 7: ~111 GFLOP per ViT-B/16 pass at 384 px, ~24 per ITM text pass,
    # ~21 per 20-token caption; a per-pair user ~400 GFLOP per image
    assert f["vit_gflop"] == pytest.approx(111, rel=0.05)
    assert f["itm_text_gflop"] == pytest.approx(24, rel=0.15)
    assert f["caption_gflop"] == pytest.approx(21, rel=0.15)
    assert f["transformers_gflop"] == pytest.approx(400, rel=0.1)
    assert f["capfilt_gflop"] < f["transformers_gflop"] * 0.8
