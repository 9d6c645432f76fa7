"""The shipped real-data recipe (pipelines/cc3m.yaml): its shape validates, and the same recipe runs
end to end on CPU with its inputs swapped for tiny local ones of the same kinds: a TSV URL list
served on loopback, COCO-Karpathy JSON files, a BLIP .pth as the pretrained model and
transformers folders as captioner and filter. Its GPU requests are scaled down by the runner;
only sizes and step counts are cut."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from capfilt.core.errors import ConfigError
from capfilt.model import get_config
from capfilt.model.blip_pth import load_blip_pth
from capfilt.model.hf import export_captioner, export_filter
from capfilt.pipeline.recipe import load_recipe, recipe_model
from capfilt.pipeline.status import DONE, run_status
from capfilt.stages.capfilt.rethreshold import read_cleaned
from capfilt.stages.download import DownloadConfig
from capfilt.testing.blip import blip_names
from capfilt.testing.cli import invoke_with_records
from capfilt.testing.models import tiny_med, tiny_tokenizer
from capfilt.world import WorldConfig, WorldServer, make_world

RECIPE = Path("pipelines/cc3m.yaml")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _raw() -> dict[str, Any]:
    return yaml.safe_load(RECIPE.read_text())


# ------------------------------------------------------------------------------ the recipe's shape


def test_the_recipe_asks_for_real_data_published_checkpoints_and_gpus():
    rec = load_recipe(RECIPE, check_paths=False)
    assert rec.stages == ["download", "pretrain", "finetune", "capfilt", "pretrain2", "evaluate"]
    assert rec.world is None and rec.urls is not None and rec.human is not None
    assert rec.urls.path.suffix == ".tsv" and rec.urls.source == "cc3m"
    assert rec.human.karpathy_test is not None
    assert rec.init.pretrained and rec.init.pretrained.endswith(".pth") and rec.init.arch == "med-base"
    assert rec.init.captioner and rec.init.filter and rec.init.tokenizer
    assert rec.pretrain.model == "med-base" and rec.pretrain.use_gpu is True
    assert rec.pretrain.num_workers >= 1
    assert (rec.capfilt.gpus_per_actor or 0) > 0 and rec.capfilt.captioner_actors >= 1
    # Where the data is not, the path check names the first missing input.
    with pytest.raises(ConfigError, match="urls.path"):
        load_recipe(RECIPE)


def test_the_recipe_validates_with_its_paths_swapped_for_existing_ones(tmp_path, checkpoints):
    raw = _raw()
    (tmp_path / "cc3m.tsv").write_text("caption\turl\na cat\thttp://x/1.jpg\n")
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "test.json").write_text("[]")
    raw["urls"]["path"] = str(tmp_path / "cc3m.tsv")
    raw["human"] = {
        "karpathy_train": str(tmp_path / "train.json"),
        "karpathy_test": str(tmp_path / "test.json"),
        "image_root": str(tmp_path),
    }
    # The published checkpoints are inputs too: validate checks they exist and fit their roles.
    with pytest.raises(
        ValueError, match="init.captioner /data/checkpoints/blip-image-captioning-base does not exist"
    ):
        recipe_model().model_validate(raw)
    raw["init"] |= {k: str(checkpoints[k]) for k in ("pretrained", "tokenizer", "captioner", "filter")}
    rec = recipe_model().model_validate(raw)
    assert rec.urls is not None and rec.urls.path == tmp_path / "cc3m.tsv"
    # A .pth holds no tokenizer: without one it is refused, naming the field. Its architecture is
    # read from its weights, so init.arch may be left out.
    bad = {**raw, "init": {k: v for k, v in raw["init"].items() if k != "tokenizer"}}
    with pytest.raises(ValueError, match="init.tokenizer"):
        recipe_model().model_validate(bad)
    no_arch = {**raw, "init": {k: v for k, v in raw["init"].items() if k != "arch"}}
    assert recipe_model().model_validate(no_arch).init.arch is None


# ---------------------------------------------------------------- tiny inputs of the same kinds


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cc3m-world")
    make_world(out, WorldConfig(seed=11, n_web=60, n_human=12, n_test=10, bad_rate=0.1))
    return out


@pytest.fixture(scope="module")
def checkpoints(world: Path, tmp_path_factory) -> dict[str, Path]:
    """A tokenizer folder, a tiny MED architecture (JSON), that model as a BLIP .pth (the
    pretrained model) and as transformers captioner and filter folders."""
    root = tmp_path_factory.mktemp("checkpoints")
    captions = pq.read_table(world / "web.parquet").column("caption").to_pylist()
    tok = tiny_tokenizer(captions, out_dir=root / "tokenizer")
    med = tiny_med(tok)
    arch = root / "med-tiny-cc3m.json"
    arch.write_text(med.config.model_dump_json(indent=2))
    with torch.no_grad():
        med.itm_head.bias[1] += 4.0  # a random filter keeps (almost) everything: round 2 gets data
    pth = root / "model_base.pth"
    torch.save({"model": blip_names(med.state_dict())}, pth)
    back = load_blip_pth(pth, get_config(arch))
    assert back.heads == {"itc", "itm", "lm"}
    assert torch.equal(back.state_dict()["vision_model.embeddings.position_embedding"],
                       med.state_dict()["vision_model.embeddings.position_embedding"])  # fmt: skip
    return {
        "tokenizer": root / "tokenizer",
        "arch": arch,
        "pretrained": pth,
        "captioner": export_captioner(med, root / "captioner", tok),
        "filter": export_filter(med, root / "filter", tok),
    }


def _swapped(
    raw: dict[str, Any], *, tsv: Path, world: Path, ckpt: dict[str, Path], out: Path
) -> dict[str, Any]:
    """The shipped recipe with its inputs swapped and its sizes cut; resources are left as written
    (GPUs included) for the runner to fit to the local Ray."""
    rec = json.loads(json.dumps(raw))
    rec["out"] = str(out)
    rec["ray_address"] = None
    rec["urls"]["path"] = str(tsv)
    rec["human"] = {
        "karpathy_train": str(world / "human" / "karpathy_train.json"),
        "karpathy_test": str(world / "human" / "karpathy_test.json"),
        "image_root": str(world),
    }
    rec["init"] |= {k: str(ckpt[k]) for k in ("pretrained", "arch", "tokenizer", "captioner", "filter")}
    rec["download"] |= {"image_size": 64, "shard_size": 25, "thread_count": 8, "timeout": 5}
    if "url_policy" in DownloadConfig.model_fields:  # the "web" here is a loopback server
        rec["download"]["url_policy"] = "allow_loopback"
    pre = {k: v for k, v in rec["pretrain"].items() if k not in ("epochs", "image_size")}
    rec["pretrain"] = pre | {
        "model": "med-tiny",
        "steps": 3,
        "warmup_steps": 1,
        "batch_size": 8,
        "min_scale": 0.6,
        "checkpoint_every": 3,
        "log_every": 1,
        "shuffle_buffer": 16,
        "torch_threads": 1,
    }
    rec["capfilt"] |= {"batch_size": 16, "max_length": 12, "torch_threads": 1}
    rec["evaluate"] |= {"k": 16, "batch_size": 16, "max_length": 12, "n_examples": 2}
    return rec


@pytest.fixture(scope="module")
def cc3m_run(ray_local, world, checkpoints, tmp_path_factory) -> tuple[Path, Any, list[logging.LogRecord]]:
    """`capfilt run` on the swapped recipe, with the world served on loopback as the web."""
    root = tmp_path_factory.mktemp("cc3m-run")
    with WorldServer(world) as server:
        # The CC3M layout after adding its header: caption first, then url.
        web = pq.read_table(world / "web.parquet").to_pylist()
        tsv = root / "cc3m.tsv"
        with tsv.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(["caption", "url"])
            w.writerows((r["caption"], f"{server.base_url.rstrip('/')}/{r['path']}") for r in web)
        recipe = root / "cc3m-tiny.yaml"
        recipe.write_text(
            yaml.safe_dump(_swapped(_raw(), tsv=tsv, world=world, ckpt=checkpoints, out=root / "run"))
        )
        result, records = invoke_with_records(["run", str(recipe)])
    return root / "run", result, records


def test_the_cc3m_recipe_runs_end_to_end_on_cpu(cc3m_run, checkpoints, world):
    out, result, _ = cc3m_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    # GPU requests scaled down, in one line that names each change.
    assert "no GPU on this Ray cluster" in result.output
    for change in ("pretrain use_gpu -> CPU", "capfilt gpus_per_actor 1 -> 0 (CPU actors)"):
        assert change in result.output
    manifests = {p.stem: json.loads(p.read_text()) for p in (out / "_stages").glob("*.json")}
    assert set(manifests) == {"download", "pretrain", "finetune", "capfilt", "pretrain2", "evaluate"}
    assert all(m["status"] == "done" for m in manifests.values())
    # Published checkpoints stand in for round 1 and the fine-tunes.
    assert manifests["pretrain"]["result"]["model_dir"] == str(checkpoints["pretrained"])
    assert manifests["finetune"]["result"]["captioner"]["model_dir"] == str(checkpoints["captioner"])
    dl = manifests["download"]["result"]
    assert dl["rows_in"] == pq.read_metadata(world / "web.parquet").num_rows and dl["downloaded"] > 0
    cleaned = read_cleaned(out / "capfilt")
    sources = set(cleaned.column("text_source").to_pylist())
    assert {"web", "synthetic", "human"} <= sources
    r2 = manifests["pretrain2"]["result"]
    assert r2["steps"] == 3 and r2["world_size"] == 1
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert set(results["rounds"]) == {"round1", "round2"}
    assert (out / "evaluate" / "report.html").is_file()


def test_status_of_the_finished_run(cc3m_run):
    out, result, _ = cc3m_run
    assert result.exit_code == 0, result.output
    st = run_status(out)
    assert st.done and st.name == "cc3m"
    assert st.stage("download").shards_done == st.stage("download").shards_total == 3
    capfilt = st.stage("capfilt")
    assert capfilt.state == DONE and capfilt.shards_done == capfilt.shards_total == 4  # 3 web + 1 human
    assert capfilt.rows["kept"] > 0
    assert st.stage("pretrain").progress.startswith("given: ")
    assert st.stage("pretrain2").progress.startswith("step 3 of 3")
    assert any("pretrain use_gpu -> CPU" in n for n in st.notes)


def test_capfilt_log_lines_name_the_stage_and_the_shard(cc3m_run):
    _, result, records = cc3m_run
    assert result.exit_code == 0, result.output
    done = [r for r in records if r.name == "capfilt.stages.capfilt.driver" and " done: " in r.getMessage()]
    assert done, "no shard log lines"
    for r in done:
        assert r.stage == "capfilt" and r.getMessage().startswith(f"shard {r.shard} done")
