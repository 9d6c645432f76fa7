"""Paths built from data (shard numbers and names, manifest entries, server paths) stay inside
their folder: values like ../../etc/x or /etc/x are refused before anything is written."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from capfilt.core.errors import ConfigError
from capfilt.core.shards import inside, safe_component, shard_name, shard_path, stats_path

ESCAPES = ["../../etc/x", "/etc/x", "..", ".", "", "a/b", "a\\b", "C:x", "x\x00y", "../00001"]


@pytest.mark.parametrize("name", ESCAPES)
def test_a_name_that_could_leave_its_folder_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="one plain path component"):
        safe_component(name, "shard name")
    with pytest.raises(ValueError):
        inside(Path("/out"), "candidates", name)


@pytest.mark.parametrize("name", ["00001", "human-00003", "a.b", "...x", "é-名前"])
def test_plain_names_pass(name: str) -> None:
    assert safe_component(name) == name
    assert inside(Path("/out"), "cleaned", f"{name}.parquet") == Path("/out/cleaned") / f"{name}.parquet"


@pytest.mark.parametrize("shard", ["../../etc/x", "/etc/x", "3", -1, True, 2.0, None])
def test_shard_numbers_must_be_non_negative_ints(shard: object) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        shard_name(shard)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shard_path(Path("/out"), shard)  # type: ignore[arg-type]


def test_shard_files_are_directly_in_the_output_folder(tmp_path: Path) -> None:
    assert shard_path(tmp_path, 7) == tmp_path / "00007.parquet"
    assert stats_path(tmp_path, 123456) == tmp_path / "_stats" / "123456.json"


def test_download_shard_refuses_a_shard_id_from_data_before_writing(tmp_path: Path) -> None:
    from capfilt.stages.download import DownloadConfig, download_shard

    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    (tmp_path / "in.parquet").write_bytes(b"")  # never read: the shard id is checked first
    with pytest.raises(ValueError, match="non-negative int"):
        download_shard("../../x", str(tmp_path / "in.parquet"), str(out), DownloadConfig().model_dump_json())  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "in.parquet", "out"]


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "a/../../escaped"])
def test_rethreshold_refuses_a_manifest_whose_shard_names_leave_the_run(tmp_path: Path, name: str) -> None:
    from capfilt.stages.capfilt.config import STAGE, CapFiltConfig
    from capfilt.stages.capfilt.rethreshold import rethreshold

    run = tmp_path / "run"
    run.mkdir()
    # The files a real shard of that name would have, where the name leads: rethreshold must
    # refuse the name, not find the files and rewrite them.
    manifest = {
        "stage": STAGE,
        "config": CapFiltConfig().model_dump(mode="json"),
        "inputs": {name: str(tmp_path / "shard.parquet")},
        "fingerprint": {"settings": {"threshold": 0.5}},
    }
    (run / "_manifest.json").write_text(json.dumps(manifest))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="one plain path component"):
        rethreshold(run, 0.9)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert json.loads((run / "_manifest.json").read_text()) == manifest, "the manifest was rewritten"


def test_world_server_special_paths_cannot_traverse_either(tmp_path: Path) -> None:
    from capfilt.world.server import WorldServer

    root = tmp_path / "served"
    root.mkdir()
    (root / "ok.txt").write_text("ok")
    (tmp_path / "secret.txt").write_text("secret")
    with WorldServer(root) as srv:
        for path, ok in [
            ("/ok.txt", 200),
            ("/slow/0/ok.txt", 200),
            ("/redirect/0/ok.txt", 302),
            ("/slow/0/../secret.txt", 403),
            ("/slow/0/%2e%2e/secret.txt", 403),
            ("/redirect/0/../secret.txt", 403),
            ("/status/404/../../secret.txt", 403),
        ]:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                assert (resp.status, path) == (ok, path)
                assert b"secret" not in resp.read()
            finally:
                conn.close()
