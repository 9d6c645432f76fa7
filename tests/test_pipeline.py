"""Recipes: validation that names the field, and `capfilt run` of a miniature demo end to end."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.core.errors import ConfigError
from capfilt.pipeline.recipe import load_recipe
from capfilt.pipeline.runner import Run
from capfilt.stages.download import read_samples

MINI = {
    "name": "mini",
    "out": "OUT",
    "stages": ["world", "download"],
    "world": {"seed": 3, "n_web": 120, "n_human": 10, "n_test": 10, "bad_rate": 0.1},
    "download": {
        "image_size": 32,
        "shard_size": 50,
        "thread_count": 8,
        "timeout": 5,
        "source": "shapes",
        "url_policy": "allow_loopback",  # the world is served on 127.0.0.1
    },
}


def _write(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_shipped_demo_recipe_is_valid():
    rec = load_recipe("pipelines/demo.yaml")
    assert rec.stages[:2] == ["world", "download"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"stages": ["world", "donwload"]}, "stages"),
        ({"name": None}, "name"),
        ({"download": {"image_size": "big"}}, "download.image_size"),
        ({"download": {"shard_sise": 10}}, "download.shard_sise"),
        ({"stages": ["download"], "urls": {"path": "/no/such/list.parquet"}}, "urls.path"),
        ({"stages": ["download"]}, "urls"),
        ({"download": {**MINI["download"], "url_policy": "public"}}, "download.url_policy"),
        ({"download": {**MINI["download"], "url_policy": "anything"}}, "download.url_policy"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, change, field):
    recipe = {**MINI, "out": str(tmp_path / "run"), **change}
    if change.get("name", "x") is None:
        del recipe["name"]
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, recipe))
    assert field in str(err.value)


def test_the_world_download_may_reach_loopback_and_a_url_list_download_may_not(tmp_path):
    """The world stage serves its images on 127.0.0.1: by the download stage's documented rule
    (WORLD_URL_POLICY) its download runs with allow_loopback unless the recipe names a policy; the
    recipe itself stays as written. A download of a user's URL list keeps the default, public."""
    from capfilt.stages.download import STAGE as DOWNLOAD
    from capfilt.stages.download import WORLD_URL_POLICY

    unset = {k: v for k, v in MINI["download"].items() if k != "url_policy"}
    rec = load_recipe(_write(tmp_path, {**MINI, "out": str(tmp_path / "run"), "download": unset}))
    assert rec.download.url_policy == "public"  # not rewritten
    assert DOWNLOAD.effective(rec).url_policy == WORLD_URL_POLICY == "allow_loopback"
    named = load_recipe(
        _write(
            tmp_path,
            {**MINI, "out": str(tmp_path / "run"), "download": {**unset, "url_policy": "allow_private"}},
        )
    )
    assert DOWNLOAD.effective(named).url_policy == "allow_private"
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://example.com/1.jpg,x\n")
    own = {**MINI, "out": str(tmp_path / "run2"), "stages": ["download"], "urls": {"path": str(urls)}}
    rec = load_recipe(_write(tmp_path, {**own, "download": unset}))
    assert rec.download.url_policy == DOWNLOAD.effective(rec).url_policy == "public"


def test_recipes_never_execute_yaml_tags(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\nout: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)
    assert not (tmp_path / "pwned").exists()


def test_run_a_miniature_recipe_then_rerun_skips_it(ray_local, tmp_path):
    path = _write(tmp_path, {**MINI, "out": str(tmp_path / "run")})
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(path)])
    assert first.exit_code == 0, first.output
    # Every web row of the world the recipe made is a row of its URL list.
    web_rows = pq.read_metadata(tmp_path / "run" / "world" / "web.parquet").num_rows
    assert web_rows > 100
    assert f"rows in {web_rows}, downloaded" in first.output and "by status:" in first.output
    assert (tmp_path / "run" / "download" / "_summary.json").exists()
    manifest = json.loads((tmp_path / "run" / "_stages" / "download.json").read_text())
    assert manifest["status"] == "done" and manifest["result"]["rows_in"] == web_rows
    second = runner.invoke(app, ["run", str(path)])
    assert second.exit_code == 0, second.output
    assert "world (unchanged, skipped)" in second.output and "download (unchanged, skipped)" in second.output


def test_a_changed_stage_config_reruns_that_stage_only(ray_local, tmp_path):
    path = _write(tmp_path, {**MINI, "out": str(tmp_path / "run")})
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    changed = {**MINI, "out": str(tmp_path / "run"), "download": {**MINI["download"], "image_size": 48}}
    result = CliRunner().invoke(app, ["run", str(_write(tmp_path, changed))])
    assert result.exit_code == 0, result.output
    assert "world (unchanged, skipped)" in result.output and "download (unchanged" not in result.output
    sizes = {
        r["width"]
        for r in read_samples(tmp_path / "run" / "download").to_pylist()
        if r["status"] == "success"
    }
    assert sizes == {48}


def _run(tmp_path, out: str) -> Run:
    return Run(load_recipe(_write(tmp_path, {**MINI, "out": out}), check_paths=False))


def _stage_naming_run_folders(run: Run, calls: list[str]) -> dict:
    """A stage whose config names folders of its own run, as the training stages' data lists do."""

    def go(d, resuming):
        calls.append(str(d))
        return {"n": 1}

    config = {"data": [str(run.dir("capfilt") / "cleaned"), {"path": run.dir("download")}], "steps": 5}
    run.stage("pretrain2", config, [], go)
    return run.manifest("pretrain2")


def test_a_stage_key_ignores_how_the_run_folder_is_spelled_or_where_it_moved(tmp_path, monkeypatch):
    """The same run reached as `runs/demo` from its project, by its absolute path, or after the
    folder was moved, is the same run: its finished stages are skipped, not trained again."""
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []
    first = _stage_naming_run_folders(_run(tmp_path, "runs/demo"), calls)
    assert len(calls) == 1 and first["status"] == "done"
    absolute = _stage_naming_run_folders(_run(tmp_path, str(tmp_path / "runs" / "demo")), calls)
    assert absolute["key"] == first["key"]
    (tmp_path / "moved").mkdir()
    (tmp_path / "runs" / "demo").rename(tmp_path / "moved" / "demo")
    moved = _stage_naming_run_folders(_run(tmp_path, str(tmp_path / "moved" / "demo")), calls)
    assert moved["key"] == first["key"]
    assert len(calls) == 1, "a finished stage ran again"
    # A path outside the run still counts: pointing the stage at other data runs it again.
    run = _run(tmp_path, str(tmp_path / "moved" / "demo"))
    run.stage("pretrain2", {"data": [str(tmp_path / "elsewhere")], "steps": 5}, [], lambda d, r: {"n": 2})
    assert run.manifest("pretrain2")["key"] != first["key"]


def test_validate_command(tmp_path):
    good = _write(tmp_path, {**MINI, "out": str(tmp_path / "run")})
    assert CliRunner().invoke(app, ["validate", str(good)]).exit_code == 0
    bad = _write(tmp_path, {**MINI, "stages": ["nope"]})
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "stages" in result.output
