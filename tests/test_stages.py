"""The stage interface: a new stage is one module plus one registry entry; recipes, `capfilt
status`, the CLI summary and the report pick it up. Also the recipe checks every stage shares
(human image roots, --set) and the quiet terminal."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import ConfigError
from capfilt.core.logs import engine_log
from capfilt.core.stage import readable
from capfilt.pipeline.recipe import load_recipe, parse_assignments
from capfilt.pipeline.status import DONE, run_status
from capfilt.stages import registry

WORLD = {"seed": 11, "n_web": 60, "n_human": 10, "n_test": 10, "bad_rate": 0.1}
DOWNLOAD = {"image_size": 32, "shard_size": 40, "thread_count": 8, "timeout": 5}


@pytest.fixture
def rowcount():
    """The fixture stage, registered after download for the test, then removed."""
    import stage_rowcount

    registry.register(stage_rowcount.STAGE, after="download")
    yield stage_rowcount
    registry.unregister("rowcount")


def test_a_registered_stage_runs_and_shows_in_status_summary_and_report(ray_local, rowcount, tmp_path):
    recipe = {
        "name": "rows",
        "out": str(tmp_path / "run"),
        "stages": ["world", "download", "rowcount", "evaluate"],
        "world": WORLD,
        "download": DOWNLOAD,
        "rowcount": {"status": "success"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    # What the stage must report, from the download's own files.
    statuses = [
        s
        for f in sorted((tmp_path / "run" / "download").glob("*.parquet"))
        for s in pq.read_table(f, columns=["status"]).column("status").to_pylist()
    ]
    line = f"counted {len(statuses)} rows, {statuses.count('success')} of them success"
    assert 0 < statuses.count("success") < len(statuses)  # the world has bad rows
    assert "rowcount (" in result.output and line in result.output  # the CLI summary
    st = run_status(tmp_path / "run")
    assert [s.name for s in st.stages] == ["world", "download", "rowcount", "evaluate"]
    assert st.stage("rowcount").state == DONE
    assert st.stage("rowcount").progress == f"rows counted: {len(statuses)}"
    shown = CliRunner().invoke(app, ["status", str(tmp_path / "run")])
    assert shown.exit_code == 0 and "rows counted:" in shown.output
    report = (tmp_path / "run" / "evaluate" / "report.html").read_text()
    assert "<h3>rowcount</h3>" in report and line in report
    # Its config is a recipe field like any other, also from the command line.
    rec = load_recipe(path, parse_assignments(["rowcount.status=duplicate"]))
    assert rec.section("rowcount").status == "duplicate"
    with pytest.raises(ConfigError, match="rowcount.stat"):
        load_recipe(path, parse_assignments(["rowcount.stat=x"]))


def test_an_unregistered_stage_is_refused_by_name(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"name": "x", "out": str(tmp_path), "stages": ["world", "rowcount"], "world": {}})
    )
    with pytest.raises(ConfigError, match=r"stages: unknown stage\(s\) \['rowcount'\]"):
        load_recipe(path)


def test_registering_a_stage_twice_or_a_taken_section_is_refused(rowcount):
    with pytest.raises(ValueError, match="registered already"):
        registry.register(rowcount.STAGE)

    class Thief(rowcount.RowCountStage):
        name = "thief"
        sections = {"download": rowcount.RowCountStage.sections["rowcount"]}

    with pytest.raises(ValueError, match=r"section\(s\) \['download'\] belong to another stage"):
        registry.register(Thief())


def test_set_overrides_any_recipe_field_with_yaml_values(tmp_path):
    assert parse_assignments(["capfilt.k=3", "capfilt.sample=false", "download.image_size=64"]) == {
        "capfilt": {"k": 3, "sample": False},
        "download": {"image_size": 64},
    }
    rec = load_recipe("pipelines/demo.yaml", parse_assignments(["capfilt.k=3", "pretrain.steps=100"]))
    assert rec.section("capfilt").k == 3 and rec.section("pretrain").steps == 100
    assert rec.section("pretrain").batch_size == 32  # the rest of the section as the recipe has it
    for bad, field in (("capfilt.k=0", "capfilt.k"), ("download.nope=1", "download.nope"), ("k", "--set")):
        with pytest.raises(ConfigError, match=field):
            load_recipe("pipelines/demo.yaml", parse_assignments([bad]))
    out = CliRunner().invoke(app, ["validate", "pipelines/demo.yaml", "--set", "capfilt.threshold=2"])
    assert out.exit_code == 2 and "capfilt.threshold" in out.output


def test_generated_options_restate_no_default(tmp_path):
    # `capfilt capfilt --k` exists because CapFiltConfig has `k`; unset options leave its default.
    from capfilt.stages.capfilt.config import CapFiltConfig

    # rich sizes the help from COLUMNS, not from click's terminal_width: a long flag pair
    # (--dedup-before/--no-dedup-before) would otherwise cut other names short at 80 columns.
    help_text = (
        CliRunner().invoke(app, ["capfilt", "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    )
    for field in CapFiltConfig.model_fields:
        assert f"--{field.replace('_', '-')}" in help_text, field
    bad = CliRunner().invoke(app, ["capfilt", "--data", str(tmp_path), "--out", str(tmp_path), "--k", "0"])
    assert bad.exit_code == 2 and "--k" in bad.output


def _karpathy(folder: Path, images: list[str]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, rel in enumerate(images):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / rel)
        entries.append({"image": rel, "caption": f"a picture {i}", "image_id": i})
    return folder


def test_human_jsons_have_their_own_image_roots_and_every_image_is_checked(tmp_path):
    """Train and test images in two folders, as a new user has them: the test JSON's images are
    looked up under its own root, and a recipe that points elsewhere fails before any work."""
    train_imgs = _karpathy(tmp_path / "train_imgs", ["a/1.jpg", "a/2.jpg"])
    test_imgs = _karpathy(tmp_path / "test_imgs", ["b/1.jpg", "b/2.jpg", "b/3.jpg"])
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "train.json").write_text(
        json.dumps([{"image": f"a/{i}.jpg", "caption": "x", "image_id": i} for i in (1, 2)])
    )
    (ann / "test.json").write_text(json.dumps([{"image": f"b/{i}.jpg", "caption": ["x"]} for i in (1, 2, 3)]))
    body = {
        "name": "h",
        "out": str(tmp_path / "run"),
        "stages": ["pretrain", "evaluate"],
        "init": {"pretrained": str(tmp_path)},
        "human": {
            "karpathy_train": str(ann / "train.json"),
            "karpathy_test": str(ann / "test.json"),
            "image_root": str(train_imgs),
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2
    assert "human.karpathy_test: 3 of 3 images it names are not under human.image_root" in out.output
    assert str(train_imgs / "b" / "1.jpg") in out.output
    body["human"] = {
        **body["human"],
        "image_root": None,
        "train_image_root": str(train_imgs),
        "test_image_root": str(test_imgs),
    }
    path.write_text(yaml.safe_dump(body))
    rec = load_recipe(path)
    assert rec.human is not None and rec.human.test_root() == test_imgs
    (test_imgs / "b" / "2.jpg").unlink()
    with pytest.raises(ConfigError, match=r"human.karpathy_test: 1 of 3 images .* human.test_image_root"):
        load_recipe(path)
    assert load_recipe(path, check_paths=False).human is not None  # a cluster recipe, checked elsewhere


def test_numbers_in_summaries_are_rounded_for_a_person():
    assert readable(0.35414565059636216) == "0.354"
    assert readable(24.9) == "24.9" and readable(1108.04) == "1,108.04" and readable(12000) == "12,000"
    assert readable(0.00012345) == "0.000123" and readable(None) == "-" and readable(0.5) == "0.5"
    by_source = {"human": None, "synthetic": 0.35015193663628125, "web": 1500}
    assert readable(by_source) == "human -, synthetic 0.35, web 1,500"


def test_the_terminal_shows_our_lines_and_the_log_file_keeps_everything(tmp_path, capfd):
    log_file = tmp_path / "_run.log"
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with engine_log(log_file):
            logging.getLogger("capfilt.stages.x").info("shard 00001 done")
            logging.getLogger("ray.train").warning(
                "PlacementGroupCleaner: Failed to query Ray Train Controller"
            )
            sys.stderr.write("(RayTrainWorker pid=77) PlacementGroupCleaner chatter\n")
            sys.stderr.write(
                "(RayTrainWorker pid=77) 10:00:01 INFO capfilt.train.loop [pretrain]: step 100\n"
            )
            sys.stderr.write(
                "\x1b[33m(raylet)\x1b[0m WARNING: 12 PYTHON worker processes have been started\n"
            )
            sys.stderr.write("a line of ours\n")
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    with engine_log(tmp_path / "never.log"):
        pass  # nothing logged: no file (a command that fails on its input writes nothing)
    shown = capfd.readouterr().err
    assert "shard 00001 done" in shown and "step 100" in shown and "a line of ours" in shown
    assert "PlacementGroupCleaner" not in shown and "PYTHON worker processes" not in shown
    kept = log_file.read_text()
    assert not (tmp_path / "never.log").exists()
    assert kept.count("PlacementGroupCleaner") == 2 and "shard 00001 done" in kept and "step 100" in kept
