"""Runs that live on object storage: the run folder, the human JSONs and images, the checkpoints
and the training data all on a real S3 API (moto's server on loopback), through
``capfilt.core.fs``. What must hold: every file lands under the bucket (nothing in a local folder
spelt like the URI), a rerun recognises finished stages there, ``capfilt status`` reads the run
from the URI, Ray Train writes and resumes its checkpoints there."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_data import write_sample_shards
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core import fs
from capfilt.core.fs import Location, RemotePath
from capfilt.core.layout import LOG_FILE, RUN_FILE, STAGES_DIR
from capfilt.pipeline.status import DONE, run_status


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    """The S3 server, with Ray started inside its block (Ray's workers then see the AWS
    variables); the session's Ray comes back afterwards for the modules that follow."""
    import ray

    from capfilt.core.cluster import ensure_ray
    from capfilt.testing import s3_server

    was_running = ray.is_initialized()
    ray.shutdown()
    with s3_server() as uri:
        ensure_ray(num_cpus=4)
        yield uri
        ray.shutdown()
    if was_running:
        ensure_ray(num_cpus=4)


@pytest.fixture(scope="module")
def remote_world(bucket: str, small_world: Path) -> RemotePath:
    """The small world (human JSONs and every image) copied to s3://<bucket>/world."""
    dest = fs.location(f"{bucket}/world")
    assert isinstance(dest, RemotePath)
    fs.put(small_world, dest)
    return dest


@pytest.fixture(scope="module")
def remote_models(bucket: str, tiny_models: dict[str, Path]) -> dict[str, str]:
    out = {}
    for role, local in tiny_models.items():
        out[role] = str(fs.put(local, fs.location(f"{bucket}/models/{role}")))
    return out


def _checkpoints(folder: Location) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(r"checkpoint_\d+", p.name))


def _no_local_uri_folder(cwd: Path) -> None:
    # Path("s3://b/x") is "s3:/b/x": code that took a URI for a local path leaves an "s3:" folder.
    assert not (cwd / "s3:").exists(), "a URI was written as a local path"


def test_a_recipe_run_and_its_status_on_s3(
    bucket: str,
    remote_world: RemotePath,
    remote_models: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="capfilt")  # in-process, the CLI's level is pytest's
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "cache"))
    run = f"{bucket}/runs/given"
    body = {
        "name": "given",
        "out": run,
        "stages": ["pretrain", "finetune", "evaluate"],
        "human": {
            "karpathy_train": f"{remote_world}/human/karpathy_train.json",
            "karpathy_test": f"{remote_world}/human/karpathy_test.json",
            "image_root": str(remote_world),
        },
        # Published checkpoints on S3: nothing trains, evaluate loads them through the cache.
        "init": {
            "pretrained": remote_models["filter"],
            "captioner": remote_models["captioner"],
            "filter": remote_models["filter"],
        },
        "evaluate": {"captioning": False, "batch_size": 8},
    }
    recipe = tmp_path / "given.yaml"
    recipe.write_text(yaml.safe_dump(body))

    cli = CliRunner()
    first = cli.invoke(app, ["run", str(recipe)])
    assert first.exit_code == 0, first.output
    root = fs.location(run)
    names = {p.name for p in root.iterdir()}
    assert {STAGES_DIR, RUN_FILE, LOG_FILE, "evaluate"} <= names
    manifests = {p.stem: fs.read_json(p) for p in (root / STAGES_DIR).glob("*.json")}
    assert {k: m["status"] for k, m in manifests.items()} == dict.fromkeys(
        ["pretrain", "finetune", "evaluate"], DONE
    )
    results = fs.read_json(root / "evaluate" / "results.json")
    # The 20 test images were read from S3 (the split's images through fs).
    assert results["rounds"]["round1"]["n_images"] == 20
    assert 0 <= results["rounds"]["round1"]["retrieval"]["r1_t2i"] <= 100
    assert (root / "evaluate" / "report.html").is_file()
    assert manifests["evaluate"]["result"]["report"] == f"{run}/evaluate/report.html"
    # The log was written locally and uploaded: it holds this run's stage lines.
    log = (root / LOG_FILE).read_text()
    assert "stage evaluate: starting" in log
    _no_local_uri_folder(tmp_path)

    # A rerun finds every stage done on S3 (the keys do not depend on where the run is).
    second = cli.invoke(app, ["run", str(recipe)])
    assert second.exit_code == 0, second.output
    assert second.output.count("unchanged, skipped") == 3, second.output
    assert (root / LOG_FILE).read_text().startswith(log)  # appended to, not replaced

    st = run_status(run)
    assert (
        st.name == "given" and st.done and [s.name for s in st.stages] == ["pretrain", "finetune", "evaluate"]
    )
    shown = cli.invoke(app, ["status", run])
    assert shown.exit_code == 0, shown.output
    assert f"run given in {run}: 3 of 3 stage(s) done" in shown.output


def test_a_recipe_with_a_missing_s3_input_fails_before_any_work(bucket: str, tmp_path: Path) -> None:
    from capfilt.core.errors import ConfigError
    from capfilt.pipeline.recipe import load_recipe

    body = {
        "name": "missing",
        "out": f"{bucket}/runs/missing",
        "stages": ["finetune"],
        "human": {"karpathy_train": f"{bucket}/nope/karpathy_train.json"},
        "init": {"pretrained": "x", "captioner": "x", "filter": "x"},
    }
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(
        ConfigError, match=r"human.karpathy_train: s3://.*/nope/karpathy_train.json does not exist"
    ):
        load_recipe(path)
    assert not fs.location(f"{bucket}/runs/missing").exists()


def test_training_writes_and_resumes_its_checkpoints_on_s3(
    bucket: str, remote_world: RemotePath, small_world: Path, tmp_path: Path, monkeypatch
) -> None:
    """Data (SAMPLE shards and a Karpathy JSON with its images), run folder and Ray Train's
    checkpoints on S3: stop at step 2, then `capfilt pretrain --resume --out s3://...` to 4."""
    from capfilt.model.checkpoint import load_med
    from capfilt.model.tokenizer import is_tokenizer_dir
    from capfilt.train.config import TrainConfig
    from capfilt.train.driver import run_training

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "cache"))
    write_sample_shards(small_world, tmp_path / "shards", shard_size=120, undecodable=1)
    shards = fs.put(tmp_path / "shards", fs.location(f"{bucket}/train-data/shards"))
    out = f"{bucket}/runs/train"
    cfg = TrainConfig.model_validate(
        {
            "model": "med-tiny",
            "data": [
                str(shards),
                {"path": f"{remote_world}/human/karpathy_train.json", "image_root": str(remote_world)},
            ],
            "out_dir": out,
            "steps": 4,
            "stop_at_step": 2,
            "warmup_steps": 1,
            "batch_size": 8,
            "checkpoint_every": 2,
            "log_every": 1,
            "shuffle_buffer": 0,
            "torch_threads": 1,
        }
    )
    first = run_training(cfg)
    assert first.steps == 2 and first.checkpoint.startswith(f"{out}/train/checkpoint_")
    root = fs.location(out)
    assert (root / "train_config.json").is_file() and is_tokenizer_dir(root / "tokenizer")
    assert _checkpoints(root / "train") == ["checkpoint_00000002"]

    # The CLI reads the saved config from S3; only the stop moves.
    resumed = CliRunner().invoke(app, ["pretrain", "--resume", "--out", out, "--stop-at-step", "4"])
    assert resumed.exit_code == 0, resumed.output
    summary = fs.read_json(root / "train_summary.json")
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert summary["model_dir"] == f"{out}/model"
    assert _checkpoints(root / "train") == ["checkpoint_00000002", "checkpoint_00000004"]
    med = load_med(summary["model_dir"])  # through the cache, from the URI
    assert med.heads >= {"itc", "itm", "lm"}
    assert json.loads((root / "model" / "capfilt_med.json").read_text())["heads"] == sorted(med.heads)
    _no_local_uri_folder(tmp_path)


def test_checkpoints_and_tokenizers_resolve_from_s3(
    bucket: str, remote_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver checks a remote checkpoint through its own cache, but what it hands the actors
    (ModelRef) and what its messages name is the URI."""
    from capfilt.core.errors import ConfigError
    from capfilt.model.checkpoint import check_role
    from capfilt.model.tokenizer import find_tokenizer, load_tokenizer
    from capfilt.stages.capfilt.config import CapFiltConfig
    from capfilt.stages.capfilt.models import load_model, resolve_model

    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "cache"))
    ref = resolve_model(remote_models["captioner"], "captioner")
    assert (ref.path, ref.tokenizer) == (remote_models["captioner"], remote_models["captioner"])
    assert ref.model_id.startswith("captioner-")
    assert str(find_tokenizer(remote_models["filter"])) == remote_models["filter"]
    assert load_tokenizer(remote_models["filter"]).vocab_size > 0
    assert "lm" in load_model(ref, "captioner", CapFiltConfig()).heads
    copies = sorted(p.name for p in (tmp_path / "cache" / "remote").glob("*/*") if not p.name.startswith("."))
    assert copies == ["captioner", "filter"]  # one copy each, however many readers
    with pytest.raises(ConfigError, match=rf"--captioner {remote_models['filter']} holds"):
        check_role(remote_models["filter"], "captioner", label="--captioner")
    with pytest.raises(ConfigError, match="does not exist"):
        check_role(f"{bucket}/models/nope", "filter")
