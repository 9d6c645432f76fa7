"""Tests of the world's HTTP server and of the URL lists written for it."""

from __future__ import annotations

import csv
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.world import WorldConfig, WorldServer, make_world, write_url_list

CONFIG = WorldConfig(seed=1, n_web=40, n_human=2, n_test=2, bad_rate=0.25)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, CONFIG)
    return out


@pytest.fixture(scope="module")
def server(world_dir: Path) -> Iterator[WorldServer]:
    with WorldServer(world_dir) as srv:
        yield srv


def _labels(world_dir: Path) -> list[dict]:
    return pq.read_table(world_dir / "web_labels.parquet").to_pylist()


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers["Content-Type"]


def _raw(server: WorldServer, path: str) -> int:
    """Status of a request sent exactly as written: urllib would normalise some of these."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_serves_an_image(server: WorldServer, world_dir: Path) -> None:
    assert server.base_url.startswith("http://127.0.0.1:")
    status, body, ctype = _get(server.base_url + "/images/web/w000000.jpg")
    assert status == 200 and ctype == "image/jpeg"
    assert body == (world_dir / "images/web/w000000.jpg").read_bytes()


def test_bad_inputs_are_served_as_labelled(server: WorldServer, world_dir: Path) -> None:
    seen = set()
    for row in _labels(world_dir):
        kind = row["bad_kind"]
        if kind in seen or kind is None:
            continue
        seen.add(kind)
        status, body, ctype = _get(f"{server.base_url}/{row['path']}")
        expected_status = {"http_404": 404, "http_500": 500}.get(kind, 200)
        assert status == expected_status, row
        if kind == "html_body":
            assert ctype.startswith("text/html") and body.lstrip().lower().startswith(b"<!doctype html")
        if kind == "huge_image":
            assert ctype == "image/png"
    assert "http_404" in seen and "http_500" in seen and "html_body" in seen


def test_missing_and_status_paths(server: WorldServer) -> None:
    assert _get(server.base_url + "/images/web/nope.jpg")[0] == 404
    assert _get(server.base_url + "/images/web")[0] == 404
    assert _get(server.base_url + "/status/500/anything.jpg")[0] == 500
    assert _get(server.base_url + "/status/503/x.jpg")[0] == 503


def test_path_traversal_is_refused(server: WorldServer) -> None:
    for path in ("/../world.json", "/images/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd"):
        assert _raw(server, path) in (403, 404), path
    assert _raw(server, "/world.json") == 200


def test_access_log_records_requests(world_dir: Path) -> None:
    with WorldServer(world_dir) as srv:
        _get(srv.base_url + "/images/web/w000001.jpg")
        _get(srv.base_url + "/missing.jpg")
        req = urllib.request.Request(srv.base_url + "/images/web/w000001.jpg", method="HEAD")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and r.read() == b""
        assert srv.access_log == [
            ("GET", "/images/web/w000001.jpg", 200),
            ("GET", "/missing.jpg", 404),
            ("HEAD", "/images/web/w000001.jpg", 200),
        ]
    with pytest.raises(RuntimeError, match="not running"):
        _ = srv.base_url


def test_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="world make"):
        WorldServer(tmp_path / "nope")


def _read_list(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_write_url_list(world_dir: Path, tmp_path: Path, ext: str) -> None:
    base = "http://127.0.0.1:1234"
    out = write_url_list(world_dir, base + "/", tmp_path / f"urls{ext}")
    rows = _read_list(out)
    web = pq.read_table(world_dir / "web.parquet").to_pylist()
    assert [r["url"] for r in rows] == [f"{base}/{w['path']}" for w in web]
    assert [r["caption"] for r in rows] == [w["caption"] for w in web]
    assert set(rows[0]) == {"url", "caption"}


def test_write_url_list_rejects_unknown_format(world_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=".parquet"):
        write_url_list(world_dir, "http://x", tmp_path / "urls.txt")


def _location(server: WorldServer, path: str) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Location")
    finally:
        conn.close()


def test_redirect_paths(server: WorldServer, world_dir: Path) -> None:
    image = "images/web/w000000.jpg"
    assert _location(server, f"/redirect/2/{image}") == (302, f"/redirect/1/{image}")
    assert _location(server, f"/redirect/0/{image}") == (302, f"/{image}")
    assert _location(server, "/redirect/loop/x.jpg") == (302, "/redirect/loop/x.jpg")
    assert _location(server, "/redirect/host/10.0.0.1:8080/a/b.jpg") == (302, "http://10.0.0.1:8080/a/b.jpg")
    assert _location(server, "/redirect/nonsense/x.jpg")[0] == 404
    # urllib follows a chain to the image.
    status, body, _ = _get(f"{server.base_url}/redirect/3/{image}")
    assert status == 200 and body == (world_dir / image).read_bytes()


def test_slow_paths_answer_for_the_rest_of_the_path(server: WorldServer, world_dir: Path) -> None:
    image = "images/web/w000000.jpg"
    status, body, _ = _get(f"{server.base_url}/slow/0/{image}")
    assert status == 200 and body == (world_dir / image).read_bytes()
    assert _get(f"{server.base_url}/slow/0/status/503/x.jpg")[0] == 503
    assert _get(f"{server.base_url}/slow/soon/{image}")[0] == 404
    assert _get(f"{server.base_url}/slow/nan/{image}")[0] == 404
    # A slow answer is slow: a client with a shorter timeout gives up.
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(f"{server.base_url}/slow/2/{image}", timeout=0.3)
