"""A whole bootstrapping round in miniature on local Ray: download, pretrain, fine-tune captioner
and filter, CapFilt, round 2 on the cleaned shards, evaluation and the report. The round is
interrupted inside CapFilt once and rerun, as a user would after a crash.

A few hundred images and a few steps per stage: this checks the plumbing and the accounting,
not the quality (benchmarks/quality.py and benchmarks/round.py measure that)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import capfilt.stages.capfilt.driver as capfilt_stage
from capfilt.cli import app
from capfilt.core import schema as S
from capfilt.core.layout import STAGES_DIR
from capfilt.eval.config import EvalConfig
from capfilt.eval.evaluate import evaluate_model
from capfilt.eval.split import load_world_test_split
from capfilt.model.checkpoint import load_checkpoint
from capfilt.model.tokenizer import load_tokenizer
from capfilt.stages import registry
from capfilt.stages.capfilt.rethreshold import read_candidates, read_cleaned
from capfilt.stages.download import read_samples

TRAIN = {
    "model": "med-tiny",
    "batch_size": 8,
    "steps": 6,
    "warmup_steps": 2,
    "checkpoint_every": 3,
    "log_every": 3,
    "torch_threads": 1,
    "shuffle_buffer": 32,
}
STAGES = registry.default_names()  # dedup is opt-in, and its tests are test_dedup_stage.py
MINI_ROUND: dict[str, Any] = {
    "name": "mini-round",
    "stages": list(STAGES),
    "world": {"seed": 11, "n_web": 160, "n_human": 12, "n_test": 16, "image_size": 32, "bad_rate": 0.05},
    "download": {"image_size": 32, "shard_size": 60, "thread_count": 8, "timeout": 5, "source": "shapes"},
    "vit": {"steps": 4, "batch_size": 8, "held_out": 8},
    "pretrain": {**TRAIN, "image_size": 32, "objectives": {"distill": False, "queue_size": 0}},
    "finetune_captioner": {**TRAIN, "steps": 4},
    "finetune_filter": {**TRAIN, "steps": 4, "objectives": {"distill": False, "queue_size": 0}},
    "capfilt": {"batch_size": 16, "max_length": 12, "torch_threads": 1},
    "evaluate": {"k": 10, "num_beams": 1, "max_length": 10, "n_examples": 2},
}


class SimulatedCrash(RuntimeError):
    """Raised into the run right after a CapFilt shard is written, as a crash of the driver there.
    (Not a KeyboardInterrupt: Ray's driver treats that as a signal and the session's later Ray
    calls fail.)"""


@pytest.fixture(scope="module")
def round_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the recipe, interrupted after CapFilt's first output shard, then run it again."""
    tmp = tmp_path_factory.mktemp("round")
    out = tmp / "run"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**MINI_ROUND, "out": str(out)}))
    runner = CliRunner()

    real_written = capfilt_stage._shard_written
    written: list[str] = []

    def written_then_crash(name: str, stats: Any) -> None:
        real_written(name, stats)
        written.append(name)
        raise SimulatedCrash(f"simulated crash after CapFilt shard {name}")

    mp = pytest.MonkeyPatch()
    # The driver learns that a writer task finished a shard, and crashes right there.
    mp.setattr(capfilt_stage, "_shard_written", written_then_crash)
    windows: dict[str, tuple[float, float]] = {}  # wall-clock span of each invocation
    t0 = time.time()
    try:
        first = runner.invoke(app, ["run", str(recipe)])
    finally:
        mp.undo()
    windows["first"] = (t0, time.time())
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "capfilt" / "cleaned").glob("*.parquet")}
    # Shards done when it crashed: the one it heard of, and any other writer that finished first
    # (web shards NNNNN and human shards human-NNNNN, each written by its own task).
    done = sorted(p.stem for p in (out / "capfilt" / "_stats").glob("*.json"))
    # The manifests as the crash left them (the reruns below rewrite them).
    after_crash = {p.stem: json.loads(p.read_text()) for p in (out / STAGES_DIR).glob("*.json")}
    t0 = time.time()
    second = runner.invoke(app, ["run", str(recipe)])
    windows["second"] = (t0, time.time())
    third = runner.invoke(app, ["run", str(recipe)])
    return {
        "out": out,
        "first": first,
        "second": second,
        "third": third,
        "crashed_after": written,
        "done_at_crash": done,
        "mtimes": mtimes,
        "after_crash": after_crash,
        "windows": windows,
    }


def _manifest(out: Path, stage: str) -> dict[str, Any]:
    return json.loads((out / STAGES_DIR / f"{stage}.json").read_text())


def test_the_interrupted_run_stopped_inside_capfilt(round_run: dict[str, Any]) -> None:
    first = round_run["first"]
    assert isinstance(first.exception, SimulatedCrash), first.output
    assert len(round_run["crashed_after"]) == 1
    manifests = round_run["after_crash"]
    for stage in ("world", "download", "pretrain", "finetune"):
        assert manifests[stage]["status"] == "done", stage
    assert manifests["capfilt"]["status"] == "running"
    assert "pretrain2" not in manifests


def test_the_rerun_resumes_capfilt_and_finishes_every_stage(round_run: dict[str, Any]) -> None:
    out, second = round_run["out"], round_run["second"]
    assert second.exit_code == 0, second.output
    for stage in ("world", "download", "pretrain", "finetune"):
        assert f"{stage} (unchanged, skipped)" in second.output
    capfilt = _manifest(out, "capfilt")
    assert capfilt["status"] == "done"
    # The shards finished before the crash were kept, not redone.
    done = round_run["done_at_crash"]
    web_done = [n for n in done if n.isdigit()]  # the summary counts web shards
    assert round_run["crashed_after"][0] in done and capfilt["result"]["shards_skipped"] == len(web_done)
    for name in done:
        kept = out / "capfilt" / "cleaned" / f"{name}.parquet"
        assert kept.stat().st_mtime_ns == round_run["mtimes"][kept.name]
    for stage in STAGES:
        m = _manifest(out, stage)
        assert m["status"] == "done" and re.fullmatch(r"[0-9a-f]{16}", m["key"]), stage
        assert isinstance(m["result"], dict), stage
        # wall_s is the stage's own time: it ran inside the invocation that finished it.
        done_first = round_run["after_crash"].get(stage, {}).get("status") == "done"
        start, end = round_run["windows"]["first" if done_first else "second"]
        written = (out / STAGES_DIR / f"{stage}.json").stat().st_mtime
        assert 0 < m["wall_s"] <= end - start, stage
        assert start - 0.1 <= written - m["wall_s"] and written <= end + 0.1, stage
    # Each manifest names the keys of the stages it read from.
    assert set(_manifest(out, "pretrain2")["upstream"]) == {"capfilt", "pretrain", "vit"}
    assert set(_manifest(out, "capfilt")["upstream"]) == {"download", "finetune"}


def test_a_third_run_skips_everything(round_run: dict[str, Any]) -> None:
    third = round_run["third"]
    assert third.exit_code == 0, third.output
    for stage in STAGES:
        assert f"{stage} (unchanged, skipped)" in third.output, stage


def test_capfilt_accounts_for_every_downloaded_image_and_kept_text(round_run: dict[str, Any]) -> None:
    out = round_run["out"]
    samples = read_samples(out / "download", columns=["uid", "status"]).to_pylist()
    downloaded = {r["uid"] for r in samples if r["status"] == S.SUCCESS}
    candidates = read_candidates(out / "capfilt")
    cleaned = read_cleaned(out / "capfilt")
    cand_rows = candidates.to_pylist()
    web_images = {r["uid"] for r in cand_rows if r["text_source"] in ("web", "synthetic")}
    assert web_images == downloaded, "every downloaded image is in the candidates table, and only those"
    text_uids = [r["text_uid"] for r in cand_rows]
    assert len(text_uids) == len(set(text_uids)), "no text considered twice (after the resume too)"
    # One web text and one synthetic caption (K=1) per downloaded image.
    by_source = {s: sum(r["text_source"] == s for r in cand_rows) for s in ("web", "synthetic")}
    assert by_source == {"web": len(downloaded), "synthetic": len(downloaded)}
    kept = {r["text_uid"] for r in cand_rows if r["decision"] == "keep"}
    assert set(cleaned.column("text_uid").to_pylist()) == kept
    assert cleaned.num_rows == len(kept)
    for f in sorted((out / "capfilt" / "cleaned").glob("*.parquet")):
        assert pq.read_schema(f).equals(S.CLEANED, check_metadata=False), f
    web = [r for r in cleaned.to_pylist() if r["text_source"] != "human"]
    assert all(r["image"] for r in web) and all(r["itm_score"] is not None for r in web)


def test_round_two_trained_on_the_cleaned_shards(round_run: dict[str, Any]) -> None:
    out = round_run["out"]
    r2 = _manifest(out, "pretrain2")["result"]
    cleaned_rows = read_cleaned(out / "capfilt").num_rows
    assert r2["steps"] == MINI_ROUND["pretrain"]["steps"] == _manifest(out, "pretrain")["result"]["steps"]
    assert r2["samples"] == r2["steps"] * MINI_ROUND["pretrain"]["batch_size"] and cleaned_rows > 0
    assert Path(r2["model_dir"]).is_dir()


def test_evaluation_and_report(round_run: dict[str, Any]) -> None:
    out = round_run["out"]
    results = json.loads((out / "evaluate" / "results.json").read_text())
    # Each round's recalls are those of its own model on the world's test split.
    split = load_world_test_split(out / "world")
    config = EvalConfig.model_validate({**MINI_ROUND["evaluate"], "captioning": False})
    for label, stage in (("round1", "pretrain"), ("round2", "pretrain2")):
        trained = _manifest(out, stage)["result"]
        med = load_checkpoint(trained["model_dir"])  # as the stage loads it (init.arch unset)
        want = evaluate_model(med, load_tokenizer(trained["tokenizer_dir"]), split, config)["retrieval"]
        got = results["rounds"][label]["retrieval"]
        recalls = [k for k in want if k.startswith("r") and k != "itc"]
        assert {k: got[k] for k in recalls} == pytest.approx({k: want[k] for k in recalls}), label
    quality = results["capfilt"]
    # The noise before CapFilt is the share of downloaded web pairs the world made wrong.
    labels = pq.read_table(out / "world" / "web_labels.parquet", columns=["row", "is_correct"]).to_pylist()
    is_correct = {r["row"]: r["is_correct"] for r in labels}
    rows = read_samples(out / "download", columns=["row", "status"]).to_pylist()
    ok = [is_correct[r["row"]] for r in rows if r["status"] == S.SUCCESS]
    assert quality["noise_before"] == pytest.approx(1 - sum(ok) / len(ok))
    assert 0 < sum(ok) < len(ok), "the world has both true and false pairs"
    # Web texts scored and with ground truth: all but empty texts (dropped unscored).
    assert 0 < quality["filter_web"]["n"] <= quality["counts"]["web"]["candidates"]
    html = (out / "evaluate" / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(images) >= 3, "histograms and example grids"
    for src in images:
        if not src.startswith("data:"):
            assert (out / "evaluate" / src).is_file(), src
    assert "round1" in html and "round2" in html
    assert "<h3>vit</h3>" in html and "held_out_accuracy" in html  # the ViT's starting point
    assert "report:" in round_run["second"].output
